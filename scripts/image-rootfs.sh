#!/usr/bin/env bash
# Lays out the root filesystem of the ratethrottle image in OUT_DIR/rootfs/:
#
#   usr/local/bin/ratethrottle          the static (musl) binary BINARY
#   etc/ssl/certs/ca-certificates.crt   the CA bundle (rediss://, the Kubernetes API, OTLP/TLS)
#   etc/passwd, etc/group               root, nonroot (65532) and nobody
#
# Both ways of building the image use it, so the image has one definition: the Containerfile's
# `builder` stage runs it after `cargo build`, and a binary built on the host goes in through
# the `prebuilt` stage with OUT_DIR as the build context:
#
#   cargo rustc --release --locked --target x86_64-unknown-linux-musl --bin ratethrottle -- -C strip=symbols
#   scripts/image-rootfs.sh target/x86_64-unknown-linux-musl/release/ratethrottle /tmp/ctx
#   podman build --build-arg ARTIFACTS=prebuilt -f Containerfile -t ratethrottle:0.1.0 /tmp/ctx
#
# CA_BUNDLE overrides where the CA bundle is read from (default: Debian's, from the
# ca-certificates package).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 BINARY OUT_DIR" >&2
    exit 2
fi
binary=$1
out=$2/rootfs
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
here=$(cd "$(dirname "$0")/.." && pwd)

[ -f "$binary" ] || {
    echo "error: $binary not found: build it first (cargo rustc --release --locked --target x86_64-unknown-linux-musl --bin ratethrottle -- -C strip=symbols)" >&2
    exit 1
}
[ -s "$ca" ] || {
    echo "error: no CA bundle at $ca (Debian: apt-get install ca-certificates)" >&2
    exit 1
}
install -D -m 0755 "$binary" "$out/usr/local/bin/ratethrottle"
install -D -m 0644 "$ca" "$out/etc/ssl/certs/ca-certificates.crt"
install -D -m 0644 "$here/container/passwd" "$out/etc/passwd"
install -D -m 0644 "$here/container/group" "$out/etc/group"
