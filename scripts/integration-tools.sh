# Installs what tests/integrations.rs needs to check the Istio, Envoy Gateway and Contour
# manifests of k8s/examples/integrations/ against their published schemas, cached under
# ~/.cache/ratethrottle/ (or $XDG_CACHE_HOME/ratethrottle/), and exports:
#
#   RATETHROTTLE_TEST_NODE             node (Debian nodejs; npm comes with Debian npm)
#   RATETHROTTLE_TEST_SCHEMA_MODULES   a node_modules dir with the pinned npm packages below
#
# The packages: @kubernetes-models/istio, -/envoy-gateway, -/contour and -/gateway-api (the
# products' CRD schemas as validators and TypeScript interfaces; scripts/validate_integrations.mjs
# uses both), TypeScript (the unknown-field check) and js-yaml. No registry package ships
# Emissary-ingress's CRD schemas: its objects are checked end to end only.
#
# Sourced by scripts/test.sh; `source scripts/integration-tools.sh` works on its own too.
# Idempotent: a second run only checks the cache. On failure it prints what is missing and
# returns non-zero (it never exits the shell that sourced it).

ratethrottle_integration_tools() {
    local pkgs=(
        "@kubernetes-models/istio@3.0.1"
        "@kubernetes-models/envoy-gateway@2.0.0"
        "@kubernetes-models/contour@6.0.0"
        "@kubernetes-models/gateway-api@2.0.0"
        "typescript@5.9.3"
        "js-yaml@4.1.0"
    )
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/ratethrottle"
    # The directory name changes with the pins, so a new pin installs afresh.
    local dir="$cache/integration-schemas-$(printf '%s\n' "${pkgs[@]}" | cksum | cut -d' ' -f1)"

    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "==> installing nodejs and npm (Debian packages)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null 2>&1 ||
                { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; } ||
                { echo "error: apt-get install nodejs npm failed" >&2; return 1; }
        else
            echo "error: node and npm are required (Debian: apt-get install nodejs npm)" >&2
            return 1
        fi
    fi

    if [ ! -f "$dir/.complete" ]; then
        echo "==> installing the Istio/Envoy Gateway/Contour schema packages (npm) into $dir"
        rm -rf "$dir"
        mkdir -p "$dir" || return 1
        printf '{"name":"ratethrottle-integration-schemas","private":true}\n' >"$dir/package.json"
        if ! (cd "$dir" && npm install --silent --no-audit --no-fund --ignore-scripts "${pkgs[@]}" >npm.log 2>&1); then
            cat "$dir/npm.log" >&2
            echo "error: npm install ${pkgs[*]} failed" >&2
            return 1
        fi
        touch "$dir/.complete"
    fi
    if [ ! -f "$dir/node_modules/typescript/bin/tsc" ] || [ ! -d "$dir/node_modules/@kubernetes-models/istio" ]; then
        echo "error: $dir is incomplete; delete it to reinstall" >&2
        return 1
    fi

    export RATETHROTTLE_TEST_NODE="$(command -v node)"
    export RATETHROTTLE_TEST_SCHEMA_MODULES="$dir/node_modules"
}

ratethrottle_integration_tools
