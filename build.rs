//! Builds the gRPC reflection descriptor set from the one envoy-types ships, and stamps the
//! build's git commit and target into the binary for `ratethrottle --version`.
//!
//! envoy-types carries a prebuilt `FileDescriptorSet` of every Envoy proto but does not export
//! it. We find the crate through `cargo metadata`, keep only the files our services need (the
//! services we serve and their imports), and write them to
//! `OUT_DIR`. No protoc is involved.

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Only services this build serves: reflection must not advertise what isn't there.
const ROOTS: &[&str] = &[
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/service/accesslog/v3/als.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    stamp_version();
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

/// `RATETHROTTLE_GIT_COMMIT` and `RATETHROTTLE_BUILD_TARGET` for the `--version` line.
///
/// The commit comes from the environment variable of the same name when set (a container build
/// has no `.git`: pass `--build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD)`), else from
/// `git`, else "unknown" — a build without git or outside a checkout still works.
fn stamp_version() {
    println!("cargo:rerun-if-env-changed=RATETHROTTLE_GIT_COMMIT");
    let from_env = std::env::var("RATETHROTTLE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = from_env.unwrap_or_else(|| {
        // Rebuild when HEAD moves: the HEAD file (a branch switch) and the branch's ref (a
        // commit). Only files that exist: cargo reruns the script every build for a missing one.
        let branch = git(&["symbolic-ref", "-q", "HEAD"]);
        for path in ["HEAD", "packed-refs"].into_iter().chain(branch.as_deref()) {
            if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
                if Path::new(&dir).join(&p).exists() {
                    println!("cargo:rerun-if-changed={p}");
                }
            }
        }
        git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
    });
    println!("cargo:rustc-env=RATETHROTTLE_GIT_COMMIT={}", commit.trim());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=RATETHROTTLE_BUILD_TARGET={target}");
}

/// `git <args>`'s trimmed stdout, or None when git is missing, fails or prints nothing.
fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(std::env::var("CARGO_MANIFEST_DIR").ok()?)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
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
