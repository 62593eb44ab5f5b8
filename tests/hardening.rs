//! Defects an adversarial run found, each through the real process: configs that would drop
//! every limit, identities with `/` in the lists, a Redis URL that panicked `serve`, header
//! injection through JWT claims, JWTs without `exp`, huge echoed values, and the reference's
//! `share_threshold`.

mod support;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use support::check::Check;
use support::{BIN, Sidecar, eventually, http_with, request, write_atomically};

const RULES: &str = "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: hour, requests_per_unit: 1}\n";

async fn code(sc: &Sidecar, key: &str) -> i32 {
    sc.client()
        .await
        .should_rate_limit(request("edge", &[&[("api_key", key)]]))
        .await
        .expect("rpc")
        .into_inner()
        .overall_code
}

async fn config_json(sc: &Sidecar) -> serde_json::Value {
    let (_, body) = sc.get("/v1/config").await;
    serde_json::from_str(&body).expect("json")
}

/// Waits until the sidecar has seen (and refused) the current file content.
async fn refused(sc: &Sidecar, what: &str) -> String {
    eventually(Duration::from_secs(10), what, || async {
        config_json(sc).await["last_error"].is_string()
    })
    .await;
    config_json(sc).await["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn an_empty_or_domainless_reload_keeps_the_limits_in_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, RULES).expect("write");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(code(&sc, "a").await, Code::Ok as i32);
    assert_eq!(code(&sc, "a").await, Code::OverLimit as i32);
    let version = config_json(&sc).await["version"].clone();

    // 0 bytes, whitespace and comments only, and the files deleted: each is refused.
    for (i, bad) in ["", "  \n# truncated\n", "\u{feff}\n"].iter().enumerate() {
        std::fs::write(&file, bad).expect("truncate");
        let err = refused(&sc, "empty file refused").await;
        assert!(err.contains("empty"), "{err}");
        assert_eq!(code(&sc, "a").await, Code::OverLimit as i32, "case {i}");
        assert_eq!(config_json(&sc).await["version"], version);
        write_atomically(&file, RULES);
        eventually(Duration::from_secs(10), "good file back", || async {
            config_json(&sc).await["last_error"].is_null()
        })
        .await;
    }
    std::fs::remove_file(&file).expect("delete");
    let err = refused(&sc, "deleted files refused").await;
    assert!(err.contains("every domain"), "{err}");
    assert_eq!(code(&sc, "a").await, Code::OverLimit as i32);
    let (status, _) = sc.get("/readyz").await;
    assert_eq!(status, 200, "the last good config still serves");
    let (_, metrics) = sc.get("/metrics").await;
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ratelimit_service_config_load_error "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(errors.is_some_and(|n| n >= 4.0), "{errors:?}\n{metrics}");
}

#[tokio::test]
async fn a_settings_file_that_drops_every_domain_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, RULES).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    assert_eq!(code(&sc, "a").await, Code::Ok as i32);
    // No `domains` key, and `domains: []` written out: both drop every domain.
    for (i, bad) in [
        "settings:\n  default_algorithm: fixed_window\n",
        "domains: []\n",
    ]
    .iter()
    .enumerate()
    {
        write_atomically(&file, bad);
        let err = refused(&sc, "domainless config refused").await;
        assert!(err.contains("every domain"), "case {i}: {err}");
        assert!(err.contains("--allow-empty-config"), "case {i}: {err}");
        assert_eq!(code(&sc, "a").await, Code::OverLimit as i32, "case {i}");
        write_atomically(&file, RULES);
        eventually(Duration::from_secs(10), "good file back", || async {
            config_json(&sc).await["last_error"].is_null()
        })
        .await;
    }
    drop(sc);

    // Explicitly allowed: the operator meant it.
    std::fs::write(&file, RULES).expect("write");
    let sc = Sidecar::start(Some(&file), &["--allow-empty-config"]);
    assert_eq!(code(&sc, "a").await, Code::Ok as i32);
    write_atomically(&file, "settings:\n  default_algorithm: fixed_window\n");
    eventually(Duration::from_secs(10), "empty config in force", || async {
        config_json(&sc).await["config"]["domains"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await;
    assert_eq!(code(&sc, "a").await, Code::Ok as i32, "no domain: no limit");
}

/// Non-atomic rewrites (`cat > f`: truncate, then write in pieces) while requests flow: no
/// request is ever decided without the limit.
#[tokio::test]
async fn truncate_then_write_races_never_drop_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, RULES).expect("write");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    assert_eq!(code(&sc, "a").await, Code::Ok as i32);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let file = file.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(2) {
                let text = format!("{RULES}# rewrite {n}\n");
                if n % 10 == 9 {
                    // Every tenth rewrite deletes the file first (`rm; cp` style).
                    std::fs::remove_file(&file).expect("delete");
                    std::thread::sleep(Duration::from_millis(20));
                }
                let mut f = std::fs::File::create(&file).expect("truncate");
                std::thread::sleep(Duration::from_millis(3));
                let (a, b) = text.split_at(text.len() / 2);
                f.write_all(a.as_bytes()).expect("write");
                f.flush().expect("flush");
                std::thread::sleep(Duration::from_millis(3));
                f.write_all(b.as_bytes()).expect("write");
                drop(f);
                std::thread::sleep(Duration::from_millis(14));
                n += 1;
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            n
        })
    };
    // Four clients decide concurrently while the file is rewritten.
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..4 {
        let mut client = sc.client().await;
        let stop = stop.clone();
        clients.spawn(async move {
            let mut decided = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = client
                    .should_rate_limit(request("edge", &[&[("api_key", "a")]]))
                    .await
                    .expect("rpc")
                    .into_inner();
                assert_eq!(
                    r.overall_code,
                    Code::OverLimit as i32,
                    "client {c}: a request was decided without the limit after {decided}"
                );
                decided += 1;
            }
            decided
        });
    }
    let mut decided = 0;
    while let Some(n) = clients.join_next().await {
        decided += n.expect("client");
    }
    let rewrites = writer.join().expect("writer");
    assert!(rewrites >= 50, "{rewrites} rewrites");
    assert!(decided > 100, "{decided} decisions");
}

#[test]
fn validate_refuses_an_empty_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("empty.yaml");
    std::fs::write(&file, "\n# nothing\n").expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty.yaml"), "{err}");
    assert!(err.contains("empty"), "{err}");
}

const AUTHZ: &str = "authz:
  domain: edge
  identity:
    sources:
      - mtls
      - jwt: {hs256_secret: s3cret, claim: sub}
        name: user
      - {header: x-api-key, name: key}
      - client_ip
  lists:
    block:
      - mtls:spiffe://cluster.local/ns/x/sa/blocked
      - {value: \"key:YWJj/ZGVm+Zw==\", reason: base64 key}
      - 10.9.0.0/16
";

fn authz_sidecar(extra: &str) -> (tempfile::TempDir, Sidecar) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, format!("{AUTHZ}{extra}")).expect("write");
    let sc = Sidecar::start(Some(&file), &["--admin-token", "t0ken"]);
    (dir, sc)
}

async fn admin(sc: &Sidecar, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(
        sc.admin,
        method,
        path,
        body,
        &[("authorization", "Bearer t0ken")],
    )
    .await
}

#[tokio::test]
async fn identities_with_slashes_can_be_listed_added_and_removed() {
    let (_dir, sc) = authz_sidecar("");
    let blocked = Check::new("192.0.2.1").principal("spiffe://cluster.local/ns/x/sa/blocked");
    assert_eq!(sc.check(&blocked).await.http, 403, "from the settings file");
    let keyed = Check::new("192.0.2.1").header("x-api-key", "YWJj/ZGVm+Zw==");
    assert_eq!(sc.check(&keyed).await.http, 403);
    assert_eq!(sc.check(&Check::new("10.9.1.1")).await.http, 403, "CIDR");

    let other = Check::new("192.0.2.1").principal("spiffe://cluster.local/ns/y/sa/api");
    assert!(sc.check(&other).await.ok());
    let (status, body) = admin(
        &sc,
        "POST",
        "/v1/lists/block",
        r#"{"value": "mtls:spiffe://cluster.local/ns/y/sa/api", "ttl_seconds": 60}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually(Duration::from_secs(5), "runtime block applies", || async {
        sc.check(&other).await.http == 403
    })
    .await;
    // Removed by its raw value (slashes in the path) ...
    let (status, body) = admin(
        &sc,
        "DELETE",
        "/v1/lists/block/mtls:spiffe://cluster.local/ns/y/sa/api",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eventually(Duration::from_secs(5), "unblocked", || async {
        sc.check(&other).await.ok()
    })
    .await;
    // ... and percent-encoded.
    let (status, _) = admin(
        &sc,
        "POST",
        "/v1/lists/block",
        r#"{"value": "user:https://idp.example/users/42"}"#,
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = admin(
        &sc,
        "DELETE",
        "/v1/lists/block/user%3Ahttps%3A%2F%2Fidp.example%2Fusers%2F42",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A CIDR with host bits is still refused; a bare value with a slash is not an identity.
    for bad in ["10.0.0.1/8", "2001:db8::1/32", "a/b"] {
        let (status, body) = admin(
            &sc,
            "POST",
            "/v1/lists/block",
            &format!(r#"{{"value": "{bad}"}}"#),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[test]
fn manage_adds_and_removes_an_identity_with_slashes() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_dir, sc) = authz_sidecar("");
    let addr = sc.admin.to_string();
    let manage = |args: &[&str]| {
        Command::new(BIN)
            .args(["manage", "--admin-addr", &addr, "--token", "t0ken"])
            .args(args)
            .output()
            .expect("run manage")
    };
    let id = "mtls:spiffe://cluster.local/ns/z/sa/w";
    let out = manage(&["--blocklist-add", id, "--duration", "60"]);
    assert!(out.status.success(), "{out:?}");
    let out = manage(&["--list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(id), "{out:?}");
    let check = Check::new("192.0.2.1").principal("spiffe://cluster.local/ns/z/sa/w");
    rt.block_on(async {
        eventually(Duration::from_secs(5), "blocked", || async {
            sc.check(&check).await.http == 403
        })
        .await;
    });
    let out = manage(&["--blocklist-remove", id]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn validate_resources_accepts_an_access_list_with_identity_slashes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("acl.yaml");
    std::fs::write(
        &file,
        "apiVersion: ratethrottle.io/v1alpha1\nkind: AccessList\nmetadata: {name: a, namespace: team}\nspec:\n  block:\n    - value: mtls:spiffe://cluster.local/ns/x/sa/y\n    - value: \"key:ab/cd==\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate-resources"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn a_rejected_huge_value_is_not_echoed_back_whole() {
    let (_dir, sc) = authz_sidecar("");
    let huge = "9".repeat(1 << 20);
    let (status, body) = admin(
        &sc,
        "POST",
        "/v1/lists/block",
        &format!(r#"{{"value": "1.2.3.{huge}"}}"#),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.len() < 1024, "{} bytes echoed", body.len());
}

fn token(claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"s3cret"),
    )
    .expect("sign")
}

fn exp() -> u64 {
    jsonwebtoken::get_current_timestamp() + 300
}

#[tokio::test]
async fn jwt_claims_with_control_characters_never_become_headers() {
    let (_dir, sc) = authz_sidecar("");
    for sub in ["a\r\nx-injected: 1", "a\nb", "a\u{0}b", "a\u{7f}"] {
        let t = token(serde_json::json!({"sub": sub, "exp": exp()}));
        let a = sc
            .check(&Check::new("192.0.2.1").header("authorization", &format!("Bearer {t}")))
            .await;
        assert_eq!(a.http, 401, "{sub:?}");
        assert_eq!(a.json()["code"], "invalid_token", "{sub:?}");
    }
    // Multi-byte text is fine.
    let t = token(serde_json::json!({"sub": "zoë/東京", "exp": exp()}));
    let a = sc
        .check(&Check::new("192.0.2.1").header("authorization", &format!("Bearer {t}")))
        .await;
    assert!(a.ok(), "{a:?}");
    assert_eq!(a.header("x-ratethrottle-identity"), Some("user:zoë/東京"));
}

#[tokio::test]
async fn jwts_without_exp_are_refused_unless_the_source_allows_them() {
    let (_dir, sc) = authz_sidecar("");
    let t = token(serde_json::json!({"sub": "forever"}));
    let a = sc
        .check(&Check::new("192.0.2.1").header("authorization", &format!("Bearer {t}")))
        .await;
    assert_eq!(a.http, 401);
    drop(sc);

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(
        &file,
        "authz:\n  identity:\n    sources:\n      - jwt: {hs256_secret: s3cret, require_exp: false}\n        name: user\n",
    )
    .expect("write");
    let sc = Sidecar::start(Some(&file), &[]);
    let a = sc
        .check(&Check::new("192.0.2.1").header("authorization", &format!("Bearer {t}")))
        .await;
    assert!(a.ok(), "{a:?}");
    assert_eq!(a.header("x-ratethrottle-identity"), Some("user:forever"));
}

fn serve_exit(storage: &str) -> std::process::Output {
    Command::new(BIN)
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .args(["--storage", storage])
        .env_remove("RATETHROTTLE_CONFIG")
        .output()
        .expect("run serve")
}

#[test]
fn bad_escapes_in_a_redis_url_are_a_clear_error_without_the_password() {
    for url in [
        "redis://:%a\u{e9}xyzzy@127.0.0.1:1",
        "redis://:%zzxyzzy@127.0.0.1:1",
        "redis://:xyzzy%@127.0.0.1:1",
        "redis://:xyzzy%f@127.0.0.1:1",
        "redis://u%ZZ:xyzzy@127.0.0.1:1",
    ] {
        let out = serve_exit(url);
        assert_eq!(out.status.code(), Some(64), "{url}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("percent"), "{url}: {err}");
        assert!(!err.contains("xyzzy"), "{url}: password leaked: {err}");
        assert!(!err.contains("panicked"), "{url}: {err}");
        // The URL is named with the password masked, so the operator sees which one.
        let (userinfo, host) = url
            .trim_start_matches("redis://")
            .rsplit_once('@')
            .expect("@");
        let user = userinfo.split(':').next().unwrap_or_default();
        let redacted = format!("\"redis://{user}:***@{host}\"");
        assert!(err.contains(&redacted), "{url}: {redacted} not in {err}");
    }
    // `config validate` catches the same URL in the settings file.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("s.yaml");
    std::fs::write(
        &file,
        "settings:\n  storage: \"redis://:%a\u{e9}xyzzy@127.0.0.1:6379\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("s.yaml:2"), "{err}");
    assert!(!err.contains("xyzzy"), "{err}");
}

/// envoyproxy/ratelimit's `share_threshold`: every value matching a wildcard shares one
/// counter (without it, each value has its own).
#[tokio::test]
async fn share_threshold_shares_one_counter_across_wildcard_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("edge.yaml"),
        "domain: edge
descriptors:
  - key: path
    value: /files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: path
    value: /own/*
    rate_limit: {unit: hour, requests_per_unit: 2}
",
    )
    .expect("write");
    let sc = Sidecar::start(Some(dir.path()), &[]);
    let mut client = sc.client().await;
    let mut codes = Vec::new();
    for p in [
        "/files/a", "/files/b", "/files/c", "/own/a", "/own/b", "/own/c",
    ] {
        let r = client
            .should_rate_limit(request("edge", &[&[("path", p)]]))
            .await
            .expect("rpc")
            .into_inner();
        codes.push(r.overall_code);
    }
    let (ok, over) = (Code::Ok as i32, Code::OverLimit as i32);
    assert_eq!(codes, [ok, ok, over, ok, ok, ok]);
}

#[test]
fn share_threshold_needs_a_wildcard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("edge.yaml");
    std::fs::write(
        &file,
        "domain: edge\ndescriptors:\n  - key: path\n    value: exact\n    share_threshold: true\n    rate_limit: {unit: hour, requests_per_unit: 2}\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("edge.yaml:5"), "{err}");
    assert!(err.contains("share_threshold"), "{err}");
}

/// `hs256_secret_env`: the secret comes from the environment of `serve` (config never reads
/// it). Set, tokens signed with it verify; unset, `serve` refuses to start naming the key
/// path and the variable, and `config validate` still accepts the file (the variable belongs
/// to the process that serves, not to the one that validates).
#[tokio::test]
async fn an_hs256_secret_from_the_environment_verifies_and_an_unset_one_stops_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(
        &file,
        "authz:\n  identity:\n    sources:\n      - jwt: {hs256_secret_env: RATETHROTTLE_TEST_JWT_SECRET}\n        name: user\n",
    )
    .expect("write");
    let sc = Sidecar::start_with_env(
        Some(&file),
        &[],
        &[("RATETHROTTLE_TEST_JWT_SECRET", "s3cret")],
    );
    let t = token(serde_json::json!({"sub": "env-user", "exp": exp()}));
    let a = sc
        .check(&Check::new("192.0.2.1").header("authorization", &format!("Bearer {t}")))
        .await;
    assert!(a.ok(), "{a:?}");
    assert_eq!(a.header("x-ratethrottle-identity"), Some("user:env-user"));
    drop(sc);

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
        .env_remove("RATETHROTTLE_TEST_JWT_SECRET")
        .output()
        .expect("run serve");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("authz.identity.sources[0].hs256_secret_env: environment variable RATETHROTTLE_TEST_JWT_SECRET is not set"),
        "{err}"
    );
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&file)
        .env_remove("RATETHROTTLE_TEST_JWT_SECRET")
        .output()
        .expect("run validate");
    assert!(out.status.success(), "{out:?}");
}
