# Installs the OTLP receiver tests/otel.rs sends spans to and exports its interpreter:
#
#   RATETHROTTLE_TEST_OTLP_PYTHON    a Python with PyPI `opentelemetry-proto` and `grpcio`, in a
#                                    cached venv; it runs tests/support/otlp_collector.py, a
#                                    real OTLP/gRPC TraceService that prints every span as JSON
#   RATETHROTTLE_TEST_OTLP_RECEIVER  that collector script
#
# Sourced by scripts/test.sh; `source scripts/otel-tools.sh` works on its own too. Prints what
# is missing and returns non-zero on failure (it never exits the shell that sourced it).

ratethrottle_otel_tools() {
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/ratethrottle/otlp-venv"
    if ! "$venv/bin/python" -c 'import grpc, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc' >/dev/null 2>&1; then
        echo "==> installing the OTLP test receiver (PyPI opentelemetry-proto, grpcio) into $venv"
        python3 -m venv "$venv" ||
            { echo "error: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; return 1; }
        "$venv/bin/pip" install -q opentelemetry-proto grpcio ||
            { echo "error: pip install opentelemetry-proto grpcio failed" >&2; return 1; }
    fi
    RATETHROTTLE_TEST_OTLP_PYTHON="$venv/bin/python"
    RATETHROTTLE_TEST_OTLP_RECEIVER="$(pwd)/tests/support/otlp_collector.py"
    export RATETHROTTLE_TEST_OTLP_PYTHON RATETHROTTLE_TEST_OTLP_RECEIVER
}
ratethrottle_otel_tools
