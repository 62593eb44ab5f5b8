# Installs what the alert tests need and exports its path:
#
#   RATETHROTTLE_TEST_ALERTMANAGER  Alertmanager (Debian package `prometheus-alertmanager`
#                                   0.25), started by tests/alerts.rs on a free port with a
#                                   temp storage dir, to receive the sidecar's alerts on
#                                   `POST /api/v2/alerts`
#
# Sourced by scripts/test.sh; `source scripts/alerting-tools.sh` works on its own too. As
# root on Debian it apt-get installs the package when the binary is missing; otherwise it
# prints what is missing and returns non-zero (it never exits the shell that sourced it).
# The package's service is not started (tests run their own Alertmanager on a free port).

ratethrottle_alerting_tools() {
    local bin=/usr/bin/prometheus-alertmanager
    if [ ! -x "$bin" ]; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "==> installing Alertmanager (Debian package prometheus-alertmanager)"
            # policy-rc.d 101: the package's postinst must not start a system Alertmanager.
            local policy=/usr/sbin/policy-rc.d had_policy=0
            [ -e "$policy" ] && had_policy=1
            [ "$had_policy" = 1 ] || printf '#!/bin/sh\nexit 101\n' >"$policy"
            [ "$had_policy" = 1 ] || chmod +x "$policy"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null 2>&1 ||
                { apt-get update -qq >/dev/null 2>&1 &&
                  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null; } ||
                { [ "$had_policy" = 1 ] || rm -f "$policy"; echo "error: apt-get install prometheus-alertmanager failed" >&2; return 1; }
            [ "$had_policy" = 1 ] || rm -f "$policy"
        else
            echo "error: Alertmanager is required (Debian: apt-get install prometheus-alertmanager)" >&2
            return 1
        fi
    fi
    [ -x "$bin" ] || { echo "error: the prometheus-alertmanager package did not install $bin" >&2; return 1; }
    RATETHROTTLE_TEST_ALERTMANAGER="$bin"
    export RATETHROTTLE_TEST_ALERTMANAGER
}
ratethrottle_alerting_tools
