//! The checked-in descriptor sets stay honest.
//!
//! `proto/envoy-reflection.bin` must equal what envoy-types (the version in Cargo.lock) ships,
//! filtered to the services we serve and their imports; `proto/admin.fields.txt` snapshots
//! every field number of our admin API, so renumbering a field fails here.
//!
//! `RATETHROTTLE_REGEN_DESCRIPTORS=1` rewrites both files instead of comparing
//! (`scripts/regen-descriptors.sh`).
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ENVOY_SET: &str = "proto/envoy-reflection.bin";
const ADMIN_SNAPSHOT: &str = "proto/admin.fields.txt";

/// Only services this build serves: reflection must not advertise what isn't there.
const ROOTS: &[&str] = &[
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/accesslog/v3/als.proto",
];

fn regen() -> bool {
    std::env::var_os("RATETHROTTLE_REGEN_DESCRIPTORS").is_some_and(|v| v == "1")
}

/// The envoy-types sources cargo resolved for this crate (registry, vendor dir or git).
///
/// Offline and for this platform only: unfiltered, cargo metadata wants every platform's
/// packages (crossterm's Windows crates), which a build never downloads.
fn envoy_types_dir() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", env!("RATETHROTTLE_BUILD_TARGET")])
        .arg("--manifest-path")
        .arg(Path::new(ROOT).join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata json");
    let pkg = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types in cargo metadata");
    PathBuf::from(pkg["manifest_path"].as_str().expect("manifest_path"))
        .parent()
        .expect("parent")
        .to_path_buf()
}

/// `ROOTS` and everything they import, in the original (dependency-first) order.
fn filtered(set: &FileDescriptorSet) -> FileDescriptorSet {
    let by_name: BTreeMap<&str, &FileDescriptorProto> =
        set.file.iter().map(|f| (f.name(), f)).collect();
    let mut keep = BTreeSet::new();
    let mut stack: Vec<&str> = ROOTS.to_vec();
    while let Some(name) = stack.pop() {
        if !keep.insert(name.to_string()) {
            continue;
        }
        let file = by_name
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from envoy-types descriptor set"));
        stack.extend(file.dependency.iter().map(String::as_str));
    }
    FileDescriptorSet {
        file: set
            .file
            .iter()
            .filter(|f| keep.contains(f.name()))
            .cloned()
            .collect(),
    }
}

fn services(set: &FileDescriptorSet) -> BTreeSet<String> {
    set.file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect()
}

#[test]
fn envoy_reflection_set_is_what_envoy_types_ships() {
    let source = envoy_types_dir().join("src/generated/types.bin");
    let bytes = std::fs::read(&source).expect("read envoy-types types.bin");
    let full = FileDescriptorSet::decode(bytes.as_slice()).expect("types.bin decodes");
    let expected = filtered(&full).encode_to_vec();
    let path = Path::new(ROOT).join(ENVOY_SET);
    if regen() {
        std::fs::write(&path, &expected).expect("write");
        return;
    }
    let checked_in = std::fs::read(&path).expect("read checked-in set");
    assert!(
        checked_in == expected,
        "{ENVOY_SET} differs from envoy-types' {} filtered to our services; run \
         scripts/regen-descriptors.sh",
        source.display()
    );
}

#[test]
fn envoy_reflection_set_decodes_and_holds_exactly_our_services() {
    let set = FileDescriptorSet::decode(ratethrottle::proto::ENVOY_DESCRIPTOR_SET)
        .expect("the checked-in set decodes");
    let expected: BTreeSet<String> = [
        "envoy.service.accesslog.v3.AccessLogService",
        "envoy.service.auth.v3.Authorization",
        "envoy.service.ratelimit.v3.RateLimitService",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(services(&set), expected);
    // Self-contained: every import is in the set, before its importer.
    let mut seen = BTreeSet::new();
    for f in &set.file {
        for d in &f.dependency {
            assert!(
                seen.contains(d.as_str()),
                "{} imports {d} before it",
                f.name()
            );
        }
        seen.insert(f.name());
    }
}

/// `message.field = number` for every field of every message (nested ones too), and
/// `enum.VALUE = number`.
fn field_lines(set: &FileDescriptorSet) -> Vec<String> {
    fn message(prefix: &str, m: &prost_types::DescriptorProto, out: &mut Vec<String>) {
        let name = format!("{prefix}.{}", m.name());
        for f in &m.field {
            out.push(format!(
                "{name}.{} = {} ({:?})",
                f.name(),
                f.number(),
                f.r#type()
            ));
        }
        for n in &m.nested_type {
            // Map entry messages are generated; their fields (key = 1, value = 2) are fixed.
            if !n.options.as_ref().is_some_and(|o| o.map_entry()) {
                message(&name, n, out);
            }
        }
        for e in &m.enum_type {
            enumeration(&name, e, out);
        }
    }
    fn enumeration(prefix: &str, e: &prost_types::EnumDescriptorProto, out: &mut Vec<String>) {
        for v in &e.value {
            out.push(format!(
                "{prefix}.{}.{} = {}",
                e.name(),
                v.name(),
                v.number()
            ));
        }
    }
    let mut out = Vec::new();
    for f in &set.file {
        for m in &f.message_type {
            message(f.package(), m, &mut out);
        }
        for e in &f.enum_type {
            enumeration(f.package(), e, &mut out);
        }
        for s in &f.service {
            for m in &s.method {
                out.push(format!(
                    "{}.{}/{}({}) returns ({}{})",
                    f.package(),
                    s.name(),
                    m.name(),
                    m.input_type(),
                    if m.server_streaming() { "stream " } else { "" },
                    m.output_type()
                ));
            }
        }
    }
    out
}

#[test]
fn admin_api_field_numbers_never_change() {
    let set = FileDescriptorSet::decode(ratethrottle::proto::ADMIN_DESCRIPTOR_SET)
        .expect("the admin set decodes");
    let now = field_lines(&set);
    let path = Path::new(ROOT).join(ADMIN_SNAPSHOT);
    if regen() {
        std::fs::write(&path, now.join("\n") + "\n").expect("write");
        return;
    }
    let snapshot = std::fs::read_to_string(&path).expect("read snapshot");
    // A field that was there must still be there with the same number and type; new fields
    // must be added to the snapshot (regen) so the next change is checked too.
    let missing: Vec<&str> = snapshot
        .lines()
        .filter(|l| !l.is_empty() && !now.iter().any(|n| n == l))
        .collect();
    assert!(
        missing.is_empty(),
        "fields changed or removed in the admin API (never renumber; reserve instead):\n{}",
        missing.join("\n")
    );
    let added: Vec<&String> = now
        .iter()
        .filter(|n| !snapshot.lines().any(|l| l == n.as_str()))
        .collect();
    assert!(
        added.is_empty(),
        "new fields not in {ADMIN_SNAPSHOT}; run scripts/regen-descriptors.sh:\n{added:?}"
    );
}

#[test]
fn the_snapshot_check_catches_a_renumbered_field() {
    let mut set =
        FileDescriptorSet::decode(ratethrottle::proto::ADMIN_DESCRIPTOR_SET).expect("decodes");
    let before = field_lines(&set);
    let m = set.file[0]
        .message_type
        .iter_mut()
        .find(|m| m.name() == "StatsSnapshot")
        .expect("StatsSnapshot");
    m.field[0].number = Some(99);
    let after = field_lines(&set);
    assert!(before.contains(&"ratethrottle.admin.v1.StatsSnapshot.unix_ms = 1 (Uint64)".into()));
    assert!(!after.contains(&"ratethrottle.admin.v1.StatsSnapshot.unix_ms = 1 (Uint64)".into()));
}
