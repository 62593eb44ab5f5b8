# Installs what the metrics and monitor tests need and exports their paths:
#
#   RATETHROTTLE_TEST_PROMTOOL   promtool (Debian package `prometheus`), for
#                                `promtool check metrics` on /metrics (tests/metrics.rs)
#   RATETHROTTLE_TEST_PROMETHEUS the Prometheus server of the same package, scraping a sidecar
#                                and evaluating the Grafana dashboard's queries (tests/metrics.rs)
#   RATETHROTTLE_TEST_TMUX       tmux (Debian package `tmux`), to drive `ratethrottle monitor`
#                                (tests/monitor.rs)
#
# Sourced by scripts/test.sh; `source scripts/observability-tools.sh` works on its own too.
# As root on Debian it apt-get installs the package when promtool is missing; otherwise it
# prints what is missing and returns non-zero (it never exits the shell that sourced it).

ratethrottle_observability_tools() {
    if ! command -v tmux >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "==> installing tmux (Debian package tmux)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null 2>&1 ||
                { apt-get update -qq >/dev/null 2>&1 &&
                  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; } ||
                { echo "error: apt-get install tmux failed" >&2; return 1; }
        else
            echo "error: tmux is required (Debian: apt-get install tmux)" >&2
            return 1
        fi
    fi
    RATETHROTTLE_TEST_TMUX=$(command -v tmux)
    export RATETHROTTLE_TEST_TMUX
    if ! command -v promtool >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "==> installing promtool (Debian package prometheus)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
                { apt-get update -qq >/dev/null 2>&1 &&
                  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } ||
                { echo "error: apt-get install prometheus failed" >&2; return 1; }
        else
            echo "error: promtool is required (Debian: apt-get install prometheus)" >&2
            return 1
        fi
    fi
    RATETHROTTLE_TEST_PROMTOOL=$(command -v promtool)
    export RATETHROTTLE_TEST_PROMTOOL
    RATETHROTTLE_TEST_PROMETHEUS=$(command -v prometheus) ||
        { echo "error: the prometheus package did not install /usr/bin/prometheus" >&2; return 1; }
    export RATETHROTTLE_TEST_PROMETHEUS
}
ratethrottle_observability_tools
