//! Unused dependencies are kept out: every crate in `Cargo.toml` must be named by the code
//! that may use it (`[dependencies]` by `src/` or `build.rs`, `[build-dependencies]` by
//! `build.rs`, `[dev-dependencies]` by tests, benches or examples). A cargo-machete-style
//! check that needs no tool: the name as a path (`foo::`), an import (`use foo`) or a macro
//! (`foo!`).

use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The crate names of one `[section]` of Cargo.toml.
fn section(manifest: &str, name: &str) -> Vec<String> {
    let header = format!("[{name}]");
    let mut out = Vec::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == header;
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((krate, _)) = line.split_once('=') {
            out.push(krate.trim().to_string());
        }
    }
    out
}

fn sources(dirs: &[&str], files: &[&str]) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let mut text = String::new();
    for d in dirs {
        walk(&Path::new(ROOT).join(d), &mut text);
    }
    for f in files {
        text.push_str(&std::fs::read_to_string(Path::new(ROOT).join(f)).unwrap_or_default());
    }
    text
}

fn named(text: &str, krate: &str) -> bool {
    let ident = krate.replace('-', "_");
    [
        format!("{ident}::"),
        format!("use {ident}"),
        format!("{ident}!"),
    ]
    .iter()
    .any(|p| text.contains(p.as_str()))
}

fn unused(section_name: &str, text: &str) -> Vec<String> {
    let manifest = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).expect("Cargo.toml");
    let crates = section(&manifest, section_name);
    assert!(!crates.is_empty(), "no [{section_name}] in Cargo.toml");
    crates.into_iter().filter(|c| !named(text, c)).collect()
}

#[test]
fn every_dependency_is_used() {
    let code = sources(&["src"], &["build.rs"]);
    assert_eq!(unused("dependencies", &code), Vec::<String>::new());
    let build = sources(&[], &["build.rs"]);
    assert_eq!(unused("build-dependencies", &build), Vec::<String>::new());
    let dev = sources(&["tests", "benches", "examples", "src"], &[]);
    assert_eq!(unused("dev-dependencies", &dev), Vec::<String>::new());
}

#[test]
fn the_check_sees_an_unused_crate() {
    let text = "use serde::Deserialize;\nlet x = tokio::spawn(f);\nformat!(\"a\");";
    assert!(named(text, "serde"));
    assert!(named(text, "tokio"));
    assert!(!named(text, "foldhash"));
    assert!(named("foldhash::fast::RandomState", "foldhash"));
    assert!(named("use tonic_prost::ProstCodec;", "tonic-prost"));
    let manifest = "[package]\nname = \"x\"\n[dependencies]\na = \"1\"\n# c\nb-c = { version = \"2\" }\n[dev-dependencies]\nd = \"3\"\n";
    assert_eq!(section(manifest, "dependencies"), ["a", "b-c"]);
    assert_eq!(section(manifest, "dev-dependencies"), ["d"]);
}
