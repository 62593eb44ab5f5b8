//! The operators' commands through the real binary against a real server: `test`, `stats`
//! (print, JSON and CSV export), `config show`, and their errors.

mod support;

use std::process::{Command, Output};
use support::{BIN, Sidecar};

const RULES: &str = r#"
domain: edge
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 20, name: per_key}
"#;

fn start() -> (tempfile::TempDir, Sidecar) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("edge.yaml"), RULES).expect("write");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    (dir, sc)
}

fn run(args: &[&str]) -> (Output, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RATETHROTTLE_ADMIN_TOKEN")
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out, stdout, stderr)
}

#[test]
fn test_fires_n_calls_and_stats_config_show_read_them_back() {
    let (dir, sc) = start();
    let grpc = sc.grpc.to_string();
    let admin = sc.admin.to_string();
    let (out, stdout, stderr) = run(&[
        "test",
        "--addr",
        &grpc,
        "--domain",
        "edge",
        "--descriptor",
        "api_key=k1",
        "--requests",
        "30",
        "--concurrency",
        "3",
    ]);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("allowed: 20  over_limit: 10  errors: 0"),
        "{stdout}"
    );
    // Ten slices of three calls, the last one fully over the limit with nothing left.
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("calls")).collect();
    assert_eq!(lines.len(), 10, "{stdout}");
    assert!(
        lines[9].contains("0 allowed    3 over_limit  remaining 0->0"),
        "{stdout}"
    );
    assert!(lines[0].contains("reset"), "{stdout}");

    let (out, stdout, stderr) = run(&["stats", "--admin-addr", &admin]);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("requests:") && stdout.contains("(30 total)"),
        "{stdout}"
    );
    assert!(stdout.contains("edge.api_key"), "{stdout}");

    let json = dir.path().join("stats.json");
    let (out, _, stderr) = run(&[
        "stats",
        "--admin-addr",
        &admin,
        "--export",
        json.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read")).expect("json");
    let snaps = v.as_array().expect("an array");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["requests_total"], 30);
    assert_eq!(snaps[0]["over_limit_total"], 10);
    assert_eq!(snaps[0]["top_limited"][0]["stat_key"], "edge.api_key");
    assert!(snaps[0]["interval_ms"].as_u64().expect("interval") >= 900);

    let csv = dir.path().join("stats.csv");
    let (out, _, stderr) = run(&[
        "stats",
        "--admin-addr",
        &admin,
        "--interval",
        "0.1",
        "--count",
        "3",
        "--export",
        csv.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{stderr}");
    let text = std::fs::read_to_string(&csv).expect("read");
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 4, "header + 3: {text}");
    assert!(rows[0].starts_with("unix_ms,interval_ms,config_version"));
    let header = rows[0].split(',').count();
    for r in &rows[1..] {
        assert_eq!(r.split(',').count(), header, "{r}");
        assert!(r.contains(",30,10,"), "{r}");
    }

    let (out, stdout, stderr) = run(&["config", "show", "--admin-addr", &admin]);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("# version: "), "{stdout}");
    assert!(stdout.contains("\"per_key\""), "{stdout}");
}

#[test]
fn unreachable_servers_and_unwritable_files_are_clear_errors() {
    // A port nothing listens on: bind, learn it, close.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .to_string();
    for args in [
        vec!["stats", "--admin-addr", &free],
        vec!["config", "show", "--admin-addr", &free],
        vec![
            "test",
            "--addr",
            &free,
            "--domain",
            "d",
            "--descriptor",
            "k=v",
        ],
    ] {
        let (out, _, stderr) = run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot reach"), "{args:?}: {stderr}");
        assert!(stderr.contains("refused"), "the cause is named: {stderr}");
    }
    let (out, _, stderr) = run(&[
        "stats",
        "--admin-addr",
        &free,
        "--export",
        "/nonexistent-dir/stats.csv",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("cannot write /nonexistent-dir/stats.csv"),
        "checked before connecting: {stderr}"
    );
    let (out, _, stderr) = run(&["stats", "--admin-addr", &free, "--export", "stats.txt"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains(".json or .csv"), "{stderr}");
    let (out, _, stderr) = run(&["stats", "--interval", "0"]);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
}
