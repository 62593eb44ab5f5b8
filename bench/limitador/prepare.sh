#!/usr/bin/env bash
# Unpacks the published `limitador` 0.14.0 crate into target/limitador-0.14.0 with two `cfg`s
# widened, for Cargo.toml's path dependency. As published, 0.14.0 does not compile with
# `redis_storage` alone: src/storage/keys.rs (built for the Redis storages) calls `bin::…`, a
# module gated on `disk_storage` (RocksDB), which upstream's server always builds in, and `bin`
# calls `Counter::variables_for_key`, gated the same way. Both are plain serde/postcard code, so
# they are enabled for `redis_storage` too; nothing else changes, and RocksDB is never built.
# The crate comes from cargo (its registry cache, or a `cargo fetch`) and is checked against its
# crates.io checksum. (Being a path dependency, its build shows three dead-code warnings from
# the RocksDB key helpers.)
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.14.0
SHA256=77e33de992fdc347850a81f1ed242cc702900a9651a2b5d044d153a2db5e2d1a
DEST=target/limitador-$VERSION
GATE='#[cfg(any(feature = "disk_storage", feature = "redis_storage"))]'
if [ -f "$DEST/.patched" ]; then
    exit 0
fi
CACHE="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
find_crate() { find "$CACHE" -name "limitador-$VERSION.crate" 2>/dev/null | head -1; }
if [ -z "$(find_crate)" ]; then
    # Let cargo download it: a throwaway manifest that depends on exactly this version.
    mkdir -p target/fetch-limitador/src
    : > target/fetch-limitador/src/lib.rs
    printf '[package]\nname = "fetch-limitador"\nversion = "0.0.0"\nedition = "2021"\n[workspace]\n[dependencies]\nlimitador = { version = "=%s", default-features = false }\n' \
        "$VERSION" > target/fetch-limitador/Cargo.toml
    cargo fetch --manifest-path target/fetch-limitador/Cargo.toml
    rm -rf target/fetch-limitador
fi
CRATE=$(find_crate)
[ -n "$CRATE" ] || { echo "error: limitador-$VERSION.crate not found under $CACHE" >&2; exit 1; }
echo "$SHA256  $CRATE" | sha256sum -c --quiet - || { echo "error: $CRATE: checksum mismatch" >&2; exit 1; }
rm -rf "$DEST"
mkdir -p target
tar -xzf "$CRATE" -C target
# The two changes: the `disk_storage` gate right above `pub mod bin {` (src/storage/keys.rs) and
# above `pub(crate) fn variables_for_key` (src/counter.rs).
python3 - "$DEST" "$GATE" <<'PY'
import sys
dest, gate = sys.argv[1], sys.argv[2]
for rel, item in (("src/storage/keys.rs", "pub mod bin {"),
                  ("src/counter.rs", "    pub(crate) fn variables_for_key")):
    path = f"{dest}/{rel}"
    text = open(path).read()
    indent = item[:len(item) - len(item.lstrip())]
    old = f'{indent}#[cfg(feature = "disk_storage")]\n{item}'
    if text.count(old) != 1:
        sys.exit(f"error: {path}: the disk_storage gate above `{item.strip()}` was not found once")
    open(path, "w").write(text.replace(old, f"{indent}{gate}\n{item}"))
PY
touch "$DEST/.patched"
