//! The layer map of `src/`, written once and checked: a module may use only modules in layers
//! below its own. A new top-level module must be placed in `LAYERS` before it compiles into a
//! green suite, and an import from a layer above fails here with the file and line.
//!
//! The map (lowest first) is the one `src/lib.rs` describes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each inner list is one layer; modules in a layer may not use each other.
const LAYERS: &[&[&str]] = &[
    // Leaves: stable digests, text helpers, generated protobuf types; no crate imports.
    &["digest", "text", "proto"],
    // Pure algorithms: counting and sans-IO detection (they may name things by digest).
    &["limiter", "anomaly"],
    // The allow/block entry model, CIDR trie and canonical entries.
    &["lists"],
    // Text → validated model. No I/O but reading the files it is given.
    &["config"],
    // The compiled match tree.
    &["rules"],
    // Counters in memory or Redis; metric counters and their rendering.
    &["storage", "telemetry"],
    // Alert-worthy events → grouped messages for sinks; the runtime and server emit into it.
    &["alerts"],
    // One ShouldRateLimit decision: plan, count, report.
    &["engine"],
    // What changes at run time: live merge of files and resources, reload, runtime lists.
    &["runtime"],
    // ext_authz: identity, lists, policies, answers.
    &["authz"],
    // The gRPC face, and the Kubernetes watcher feeding the runtime.
    &["service", "k8s"],
    // The admin HTTP API.
    &["admin"],
    // Assembly: bind, run every task together.
    &["server"],
    // The command line.
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/config/decode.rs` → `config`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// Every `crate::x` the code (not its comments) names, with its line: plain paths and
/// grouped imports (`use crate::{a, b::c}`).
fn crate_refs(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                let inner = group.split('}').next().unwrap_or_default();
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.push((n + 1, name));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.push((n + 1, name));
                }
            }
            rest = after;
        }
    }
    out
}

/// Imports that go up or sideways, as `file:line: from -> to` lines.
fn violations(src: &Path) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let from = module_of(src, &file);
        if from == "lib" || from == "main" {
            continue;
        }
        let Some(from_layer) = layer_of(&from) else {
            bad.push(format!(
                "{}: module `{from}` is not in the layer map (tests/architecture.rs LAYERS)",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read");
        for (line, to) in crate_refs(&text) {
            if to == from {
                continue;
            }
            let Some(to_layer) = layer_of(&to) else {
                bad.push(format!("{}:{line}: unknown module `{to}`", file.display()));
                continue;
            };
            let list = edges.entry(from.clone()).or_default();
            if !list.contains(&to) {
                list.push(to.clone());
            }
            if to_layer >= from_layer {
                bad.push(format!(
                    "{}:{line}: `{from}` (layer {from_layer}) uses `{to}` (layer {to_layer}); \
                     a module may use only layers below its own",
                    file.display()
                ));
            }
        }
    }
    (bad, edges)
}

#[test]
fn modules_use_only_layers_below_their_own() {
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"));
    let (bad, edges) = violations(src);
    assert!(
        bad.is_empty(),
        "layering violations:\n{}\nedges: {edges:#?}",
        bad.join("\n")
    );
    // The map is not vacuous: the main flow is there.
    for (from, to) in [
        ("rules", "config"),
        ("engine", "storage"),
        ("authz", "engine"),
        ("service", "authz"),
        ("server", "service"),
    ] {
        assert!(
            edges.get(from).is_some_and(|e| e.iter().any(|t| t == to)),
            "{from} -> {to} missing: {edges:#?}"
        );
    }
}

#[test]
fn the_checker_catches_an_upward_import() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::create_dir_all(src.join("config")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "pub mod config;\npub mod admin;\n").expect("write");
    std::fs::write(src.join("admin.rs"), "use crate::config::Config;\n").expect("write");
    std::fs::write(
        src.join("config/load.rs"),
        "// crate::admin in a comment is fine\nuse crate::{limiter, admin::AdminState};\n",
    )
    .expect("write");
    std::fs::write(src.join("newthing.rs"), "").expect("write");
    let (bad, _) = violations(src);
    assert!(
        bad.iter()
            .any(|b| b.contains("load.rs:2") && b.contains("`config` (layer 3) uses `admin`")),
        "{bad:?}"
    );
    assert!(!bad.iter().any(|b| b.contains("load.rs:1")), "{bad:?}");
    assert!(
        bad.iter()
            .any(|b| b.contains("`newthing` is not in the layer map")),
        "{bad:?}"
    );
    assert!(!bad.iter().any(|b| b.contains("admin.rs")), "{bad:?}");
}
