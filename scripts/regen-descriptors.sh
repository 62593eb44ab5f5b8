#!/usr/bin/env bash
# Regenerates the checked-in descriptor sets under proto/:
#   proto/envoy-reflection.bin  Envoy's services we serve (+ imports), from the envoy-types
#                               crate in Cargo.lock (its prebuilt types.bin; no protoc)
#   proto/admin.fields.txt      the field-number snapshot of proto/ratethrottle/admin/v1
# Run after bumping envoy-types or adding admin API fields; tests/descriptors.rs then checks
# the files stay equal to their sources.
set -euo pipefail
cd "$(dirname "$0")/.."
# Write both files (the tests that read what the crate embedded run next, on a rebuilt crate).
RATETHROTTLE_REGEN_DESCRIPTORS=1 cargo test --locked --test descriptors -- \
    envoy_reflection_set_is_what_envoy_types_ships admin_api_field_numbers_never_change
cargo test --locked --test descriptors
git status --short proto/
