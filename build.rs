//! Builds the gRPC reflection descriptor set from the one envoy-types ships.
//!
//! envoy-types carries a prebuilt `FileDescriptorSet` of every Envoy proto but does not export
//! it. We find the crate through `cargo metadata`, keep only the files our services need (the
//! services we serve and their imports), and write them to
//! `OUT_DIR`. No protoc is involved.

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Only services this build serves: reflection must not advertise what isn't there.
const ROOTS: &[&str] = &[
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/auth/v3/external_auth.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let set_path = envoy_types_dir().join("src/generated/types.bin");
    let bytes =
        std::fs::read(&set_path).unwrap_or_else(|e| panic!("reading {}: {e}", set_path.display()));
    let set = FileDescriptorSet::decode(bytes.as_slice()).expect("envoy-types types.bin decodes");
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
    // Dependencies must precede dependents; the original set is already in that order.
    let filtered = FileDescriptorSet {
        file: set
            .file
            .iter()
            .filter(|f| keep.contains(f.name()))
            .cloned()
            .collect(),
    };
    std::fs::write(out.join("reflection.bin"), filtered.encode_to_vec())
        .expect("write reflection.bin");
}

fn envoy_types_dir() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = std::env::var("CARGO_MANIFEST_PATH")
        .or_else(|_| std::env::var("CARGO_MANIFEST_DIR").map(|d| format!("{d}/Cargo.toml")))
        .expect("manifest path");
    // Offline first (no network needed once the sources are here); cargo metadata also wants
    // other platforms' packages, which a build never downloads, so fall back to fetching them.
    let run = |offline: bool| {
        let mut cmd = std::process::Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1"]);
        if offline {
            cmd.arg("--offline");
        }
        cmd.arg("--manifest-path")
            .arg(&manifest)
            .output()
            .expect("run cargo metadata")
    };
    let mut output = run(true);
    if !output.status.success() {
        output = run(false);
    }
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata json");
    let pkg = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .expect("envoy-types in cargo metadata");
    let manifest_path = pkg["manifest_path"].as_str().expect("manifest_path");
    PathBuf::from(manifest_path)
        .parent()
        .expect("manifest has a parent")
        .to_path_buf()
}
