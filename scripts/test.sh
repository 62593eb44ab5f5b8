#!/usr/bin/env bash
# Runs every check and test of ratethrottle on a fresh clone. Installs what the tests need
# (nothing beyond the Rust toolchain yet) or stops with a message naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required ($2)" >&2; exit 1; }
}
need cargo "install Rust from https://rustup.rs"
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test --all-targets"
cargo test --all-targets --locked
echo "==> all checks passed"
