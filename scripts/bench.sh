#!/usr/bin/env bash
# The benchmark suite: one command, one table, measured in one run so ratios are meaningful
# on a noisy machine. Installs its tools (Debian nghttp2-client for h2load, wrk), starts Redis
# and Envoy like the test command does, and runs scripts/bench.py.
#   bash scripts/bench.sh            # full run (a few minutes)
#   BENCH_SECONDS=3 bash scripts/bench.sh
#   BENCH_ONLY=anomaly bash scripts/bench.sh   # only one comparison: anomaly, adaptive, tracing, redis
#   BENCH_ONLY=memory bash scripts/bench.sh    # memory store bytes per key (no servers, no tools)
#   BENCH_ONLY=limitador bash scripts/bench.sh # ratethrottle vs Kuadrant Limitador (bench/limitador)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${BENCH_ONLY:-}" = memory ]; then
    exec python3 scripts/bench.py "$@"
fi
missing=()
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
    else
        echo "error: install ${missing[*]} (Debian packages)" >&2
        exit 1
    fi
fi
cargo build --release --locked --bin ratethrottle --example ok_rls
# Kuadrant Limitador's RLS server over the `limitador` crate (bench/limitador, its own package,
# lock file and target dir). A failed build skips the Limitador rows, loudly, not the benchmark.
if [ -z "${BENCH_ONLY:-}" ] || [ "${BENCH_ONLY}" = limitador ]; then
    if bash bench/limitador/prepare.sh &&
        cargo build --release --locked --manifest-path bench/limitador/Cargo.toml; then
        export RATETHROTTLE_BENCH_LIMITADOR="$PWD/bench/limitador/target/release/limitador-bench-server"
    else
        echo "*** WARNING: bench/limitador failed to build (above): the Limitador rows are skipped ***" >&2
        unset RATETHROTTLE_BENCH_LIMITADOR
    fi
fi
exec bash scripts/test.sh python3 scripts/bench.py "$@"
