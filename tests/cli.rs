//! The command line: `config validate`, `check`, and `serve`'s refusals.

mod support;

use std::process::Command;
use support::{BIN, Sidecar};

#[test]
fn validate_accepts_the_shipped_example() {
    let out = Command::new(BIN)
        .args(["config", "validate", "k8s/examples/config"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn validate_accepts_the_shipped_authz_example() {
    let out = Command::new(BIN)
        .args(["config", "validate", "k8s/examples/authz/ratethrottle.yaml"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_prints_every_error_with_file_line_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n  - key: b\n    rate_limt: {unit: second, requests_per_unit: 1}\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:4"), "{err}");
    assert!(err.contains("unit"), "{err}");
    assert!(err.contains("bad.yaml:6"), "{err}");
    assert!(err.contains("rate_limt"), "{err}");
}

#[test]
fn serve_refuses_a_bad_config_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "domain: [unclosed\n").expect("write");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--config",
        ])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.yaml:"));
}

#[test]
fn serve_fails_loudly_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let out = Command::new(BIN)
        .args(["serve", "--admin-addr", "127.0.0.1:0", "--grpc-addr", &addr])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
}

#[tokio::test]
async fn check_prints_the_answer_of_a_running_server() {
    let sc = Sidecar::start(Some(std::path::Path::new("k8s/examples/config")), &[]);
    let run = |hits: &str| {
        Command::new(BIN)
            .args([
                "check",
                "--addr",
                &sc.grpc.to_string(),
                "--domain",
                "example",
            ])
            .args(["--descriptor", "api_key=cli-test", "--hits", hits])
            .output()
            .expect("run")
    };
    let out = run("1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("overall_code: OK"), "{text}");
    assert!(text.contains("descriptor 0: OK"), "{text}");
    let out = run("1000000");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("overall_code: OVER_LIMIT"), "{text}");
}

#[test]
fn serve_refuses_a_storage_url_it_cannot_use() {
    for url in [
        "memcached://x:1",
        "redis://h:notaport",
        "redis-sentinel://h:1",
    ] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .args(["--storage", url])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(64), "{url}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("storage"),
            "{url}"
        );
    }
}

#[test]
fn serve_kubernetes_without_a_cluster_to_talk_to_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such-kubeconfig");
    let out = Command::new(BIN)
        .args(["serve", "--kubernetes", "--grpc-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", &missing)
        .env("HOME", dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no Kubernetes client configuration"),
        "{stderr}"
    );
}

#[test]
fn kubernetes_flags_need_kubernetes_and_a_redis_password_needs_a_redis_url() {
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("serve")
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(args)
            .env_remove("RATETHROTTLE_KUBERNETES")
            .output()
            .expect("run")
    };
    let out = run(&["--namespace", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kubernetes"));
    let out = run(&["--kubernetes", "--namespace", "x", "--all-namespaces"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&[
        "--storage",
        "redis://:pw@127.0.0.1:1",
        "--redis-password",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already has a password"));
    for storage in [&["--storage", "memory"][..], &[]] {
        let mut args = storage.to_vec();
        args.extend(["--redis-password", "x"]);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
    }
}

#[test]
fn validate_resources_checks_manifests_like_the_watcher() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let examples = root.join("k8s/examples/kubernetes");
    let out = Command::new(BIN)
        .args(["config", "validate-resources"])
        .arg(examples.join("ratelimitpolicy.yaml"))
        .arg(examples.join("accesslist.yaml"))
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("RateLimitPolicy shop/checkout: accepted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("AccessList shop/edge: accepted"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: ratethrottle.io/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: x, namespace: team}\n\
         spec:\n  domain: checkout\n  descriptors:\n    - key: k\n      rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate-resources"])
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "RateLimitPolicy team/x: refused: spec.descriptors[0].rate_limit.unit: unknown unit"
        ),
        "{stderr}"
    );

    // A domain the file configuration already defines is a conflict.
    let config = dir.path().join("rules.yaml");
    std::fs::write(&config, "domain: checkout\ndescriptors: []\n").expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate-resources", "--config"])
        .arg(&config)
        .arg(examples.join("ratelimitpolicy.yaml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("defined in the file configuration"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 2 resource(s) would be refused"),
        "{stderr}"
    );
}

/// The README's complete `anomaly:` example is a valid settings file.
#[test]
fn the_readme_anomaly_example_validates() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme.find("```yaml\nanomaly:").expect("anomaly example") + "```yaml\n".len();
    let len = readme[start..].find("```").expect("end of example");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("anomaly.yaml");
    std::fs::write(&file, &readme[start..start + len]).expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
}

/// The README's adaptive limits example (with the anomaly block it needs) validates.
#[test]
fn the_readme_adaptive_example_validates() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme.find("## Adaptive limits").expect("section");
    let start = section + readme[section..].find("```yaml\n").expect("example") + "```yaml\n".len();
    let len = readme[start..].find("```").expect("end of example");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("adaptive.yaml");
    std::fs::write(&file, format!("anomaly:\n{}", &readme[start..start + len])).expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    // And a broken adaptive block is an error naming its key path.
    let broken = readme[start..start + len].replace("max_factor: 2.0", "max_factor: 0.1");
    std::fs::write(&file, format!("anomaly:\n{broken}")).expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("domains[0].descriptors[0].rate_limit.adaptive")
            && stderr.contains("min_factor 0.25 is above max_factor 0.1"),
        "{stderr}"
    );
}

/// The README's complete `alerts:` example is a valid settings file.
#[test]
fn the_readme_alerts_example_validates() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let start = readme.find("```yaml\nalerts:").expect("alerts example") + "```yaml\n".len();
    let len = readme[start..].find("```").expect("end of example");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("alerts.yaml");
    std::fs::write(&file, &readme[start..start + len]).expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
}
