//! `serve --kubernetes` against a fake API server that speaks real list + watch (see
//! tests/support/fake_api.rs): the real binary, the real kube client, live rule changes.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::fake_api::{ACCESS_LISTS, FakeApiServer, POLICIES};
use support::{Sidecar, check::Check, eventually, http_with};

const WAIT: Duration = Duration::from_secs(15);
const NS: &str = "team-a";

/// Hourly windows: a test's hits never straddle a window boundary in practice.
fn policy(domain: &str, per_hour: u32) -> Value {
    json!({"domain": domain, "descriptors": [
        {"key": "path", "value": "/a", "rate_limit": {"unit": "hour", "requests_per_unit": per_hour}},
        {"key": "path", "value": "/b", "rate_limit": {"unit": "hour", "requests_per_unit": 1}},
    ]})
}

struct Running {
    _dir: tempfile::TempDir,
    sc: Sidecar,
}

fn start(api: &FakeApiServer, settings: Option<&str>, extra: &[&str]) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = api.kubeconfig(dir.path(), NS);
    let config = settings.map(|s| {
        let path = dir.path().join("ratethrottle.yaml");
        std::fs::write(&path, s).expect("write settings");
        path
    });
    let mut args = vec!["--kubernetes"];
    args.extend_from_slice(extra);
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path").to_string();
    let sc = Sidecar::start_with_env(
        config.as_deref(),
        &args,
        &[("KUBECONFIG", kubeconfig.as_str())],
    );
    Running { _dir: dir, sc }
}

/// The answer to one request with the entry `key=value` in `domain`, through `/json`.
async fn answer_for(sc: &Sidecar, domain: &str, key: &str, value: &str) -> Value {
    let body =
        json!({"domain": domain, "descriptors": [{"entries": [{"key": key, "value": value}]}]});
    let (_, text) = sc.post("/json", &body.to_string()).await;
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("/json: {text}"))
}

/// The overall code of one request for `path` in `domain`.
async fn code(sc: &Sidecar, domain: &str, path: &str) -> String {
    let v = answer_for(sc, domain, "path", path).await;
    v["overallCode"].as_str().unwrap_or_default().to_string()
}

/// The requests per unit of the limit one request for `path` in `domain` met, if any (the
/// request counts).
async fn limit_of(sc: &Sidecar, domain: &str, path: &str) -> Option<u64> {
    let v = answer_for(sc, domain, "path", path).await;
    v["statuses"][0]["currentLimit"]["requestsPerUnit"].as_u64()
}

/// A limit of one is in force: the next request passes, the one after is over the limit.
async fn admits_one_more(sc: &Sidecar, domain: &str) {
    assert_eq!(code(sc, domain, "/a").await, "OK", "{domain}");
    assert_eq!(code(sc, domain, "/a").await, "OVER_LIMIT", "{domain}");
}

/// The value of the series `name` (with its labels, exactly as rendered) at /metrics.
async fn metric(sc: &Sidecar, name: &str) -> Option<u64> {
    let (_, text) = sc.get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn ready(sc: &Sidecar) {
    ready_within(sc, WAIT).await;
}

async fn ready_within(sc: &Sidecar, wait: Duration) {
    eventually(wait, "ready", || async { sc.get("/readyz").await.0 == 200 }).await;
}

async fn accepted(
    api: &FakeApiServer,
    plural: &str,
    name: &str,
    status: &str,
    generation: i64,
) -> Value {
    accepted_within(api, plural, name, status, generation, WAIT).await
}

async fn accepted_within(
    api: &FakeApiServer,
    plural: &str,
    name: &str,
    status: &str,
    generation: i64,
    wait: Duration,
) -> Value {
    let mut last = None;
    eventually(
        wait,
        &format!("{name} Accepted={status} at generation {generation}"),
        || {
            let c = api.accepted(plural, NS, name);
            let hit = c
                .as_ref()
                .is_some_and(|c| c["status"] == status && c["observedGeneration"] == generation);
            last = c;
            async move { hit }
        },
    )
    .await;
    last.expect("condition")
}

#[tokio::test]
async fn rules_from_resources_apply_live_without_resetting_unchanged_counters() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 2));
    let r = start(&api, None, &[]);
    ready(&r.sc).await;

    assert_eq!(code(&r.sc, "api", "/a").await, "OK");
    admits_one_more(&r.sc, "api").await;
    assert_eq!(code(&r.sc, "api", "/b").await, "OK");
    assert_eq!(code(&r.sc, "api", "/b").await, "OVER_LIMIT");
    let c = accepted(&api, POLICIES, "api", "True", 1).await;
    assert_eq!(c["reason"], "Accepted");
    let obj = api.object(POLICIES, NS, "api").expect("object");
    assert_eq!(obj["status"]["rules"], 2);
    assert_eq!(obj["status"]["observedGeneration"], 1);
    assert!(obj["status"]["conditions"][0]["lastTransitionTime"].is_string());

    // Raise /a's limit: /a is a new rule with a fresh counter, /b's exhausted counter stays.
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 5));
    eventually(WAIT, "the new /a limit", || async {
        code(&r.sc, "api", "/a").await == "OK"
    })
    .await;
    assert_eq!(code(&r.sc, "api", "/b").await, "OVER_LIMIT");
    accepted(&api, POLICIES, "api", "True", 2).await;

    // A second domain from a second resource; then deleting the first takes its rules away.
    api.apply(POLICIES, NS, "web", json!({}), policy("web", 1));
    // Until the domain exists, answers carry no limit; the first that does takes the one hit.
    eventually(WAIT, "domain web", || async {
        limit_of(&r.sc, "web", "/a").await.is_some()
    })
    .await;
    assert_eq!(code(&r.sc, "web", "/a").await, "OVER_LIMIT");
    api.delete(POLICIES, NS, "api");
    eventually(WAIT, "domain api removed", || async {
        // Unknown domains are answered OK without a limit.
        let v = answer_for(&r.sc, "api", "path", "/b").await;
        v["overallCode"] == "OK" && v["statuses"][0]["currentLimit"].is_null()
    })
    .await;
    assert_eq!(code(&r.sc, "web", "/a").await, "OVER_LIMIT");
}

#[tokio::test]
async fn an_invalid_resource_says_why_in_its_status_and_the_old_rules_stay() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 1));
    let r = start(&api, None, &[]);
    ready(&r.sc).await;
    accepted(&api, POLICIES, "api", "True", 1).await;

    let mut bad = policy("api", 100);
    bad["descriptors"][0]["rate_limit"]["unit"] = json!("fortnight");
    api.apply(POLICIES, NS, "api", json!({}), bad);
    let c = accepted(&api, POLICIES, "api", "False", 2).await;
    assert_eq!(c["reason"], "Invalid");
    let m = c["message"].as_str().expect("message");
    assert!(
        m.contains("spec.descriptors[0].rate_limit.unit: unknown unit \"fortnight\""),
        "{m}"
    );
    assert!(
        m.contains("previously accepted generation stays in force"),
        "{m}"
    );
    // Generation 1's limit of 1 is still the one in force.
    admits_one_more(&r.sc, "api").await;

    // A brand-new invalid resource is refused and defines nothing.
    api.apply(POLICIES, NS, "empty", json!({}), json!({"descriptors": []}));
    let c = accepted(&api, POLICIES, "empty", "False", 1).await;
    assert!(
        c["message"].as_str().unwrap_or_default().contains("domain"),
        "{c}"
    );
    assert!(r.sc.stderr().contains("invalid"), "the refusal is logged");
    let refused = r#"ratethrottle_kubernetes_resources{kind="RateLimitPolicy",accepted="false"}"#;
    eventually(WAIT, "both refusals counted", || async {
        metric(&r.sc, refused).await == Some(2)
    })
    .await;

    // Fixing it puts the new generation in force.
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 3));
    accepted(&api, POLICIES, "api", "True", 3).await;
    eventually(WAIT, "generation 3 in force", || async {
        code(&r.sc, "api", "/a").await == "OK"
    })
    .await;
}

#[tokio::test]
async fn file_domains_take_precedence_and_the_oldest_resource_wins() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "old", json!({}), policy("shared", 1));
    api.apply(POLICIES, NS, "new", json!({}), policy("shared", 50));
    api.apply(POLICIES, NS, "filed", json!({}), policy("files", 50));
    let settings = "domain: files\ndescriptors:\n  - key: path\n    value: /a\n    rate_limit: {unit: hour, requests_per_unit: 1}\n";
    let r = start(&api, Some(settings), &[]);
    ready(&r.sc).await;

    let c = accepted(&api, POLICIES, "filed", "False", 1).await;
    assert_eq!(c["reason"], "DomainConflict");
    assert!(
        c["message"]
            .as_str()
            .unwrap_or_default()
            .contains("file configuration"),
        "{c}"
    );
    let c = accepted(&api, POLICIES, "new", "False", 1).await;
    assert!(
        c["message"]
            .as_str()
            .unwrap_or_default()
            .contains("RateLimitPolicy team-a/old"),
        "{c}"
    );
    accepted(&api, POLICIES, "old", "True", 1).await;
    for domain in ["files", "shared"] {
        assert_eq!(code(&r.sc, domain, "/a").await, "OK");
        assert_eq!(code(&r.sc, domain, "/a").await, "OVER_LIMIT", "{domain}");
    }
    // The older one goes: the newer one takes the domain over.
    api.delete(POLICIES, NS, "old");
    accepted(&api, POLICIES, "new", "True", 1).await;
    assert_eq!(code(&r.sc, "shared", "/a").await, "OK");
}

#[tokio::test]
async fn a_file_reload_that_takes_a_domain_turns_the_resource_into_a_conflict_and_back() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 1));
    let r = start(&api, Some("domain: other\ndescriptors: []\n"), &[]);
    ready(&r.sc).await;
    accepted(&api, POLICIES, "api", "True", 1).await;
    let settings = r._dir.path().join("ratethrottle.yaml");
    let taken = "domain: api\ndescriptors:\n  - key: path\n    value: /a\n    rate_limit: {unit: minute, requests_per_unit: 7}\n";
    support::write_atomically(&settings, taken);
    let c = accepted(&api, POLICIES, "api", "False", 1).await;
    assert_eq!(c["reason"], "DomainConflict");
    assert_eq!(limit_of(&r.sc, "api", "/a").await, Some(7));
    support::write_atomically(&settings, "domain: other\ndescriptors: []\n");
    accepted(&api, POLICIES, "api", "True", 1).await;
    eventually(WAIT, "the resource's limit back in force", || async {
        limit_of(&r.sc, "api", "/a").await == Some(1)
    })
    .await;
}

#[tokio::test]
async fn watch_expiry_relists_exactly_once_and_watch_timeouts_do_not_relist() {
    let api = FakeApiServer::start().await;
    api.set_watch_timeout(Duration::from_millis(700));
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 1));
    let r = start(&api, None, &[]);
    ready(&r.sc).await;
    accepted(&api, POLICIES, "api", "True", 1).await;
    assert_eq!(api.lists(POLICIES), 1);

    // Several server-side watch timeouts: the client re-watches from its resourceVersion.
    let before = api.watches(POLICIES);
    eventually(WAIT, "three re-watches", || async {
        api.watches(POLICIES) >= before + 3
    })
    .await;
    assert_eq!(
        api.lists(POLICIES),
        1,
        "a watch timeout is not a reason to relist"
    );

    // Compaction: the running watch gets an in-stream 410; a change made meanwhile must
    // arrive through the one relist.
    api.set_watch_timeout(Duration::from_secs(60));
    api.expire_watches(POLICIES);
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 2));
    eventually(WAIT, "relisted", || async { api.lists(POLICIES) >= 2 }).await;
    eventually(WAIT, "the change made during expiry", || async {
        code(&r.sc, "api", "/a").await == "OK"
    })
    .await;
    accepted(&api, POLICIES, "api", "True", 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.lists(POLICIES), 2, "one 410, exactly one relist");
    let lists = r#"ratethrottle_kubernetes_lists_total{kind="RateLimitPolicy"}"#;
    assert_eq!(metric(&r.sc, lists).await, Some(2));
    assert!(metric(&r.sc, "ratethrottle_kubernetes_watch_errors_total").await >= Some(1));
    assert_eq!(
        api.lists(ACCESS_LISTS),
        1,
        "the other kind's watch was not disturbed"
    );
}

#[tokio::test]
async fn an_api_server_outage_keeps_the_rules_and_recovers() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 2));
    let mut r = start(&api, None, &[]);
    ready(&r.sc).await;
    assert_eq!(code(&r.sc, "api", "/a").await, "OK");

    api.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(code(&r.sc, "api", "/a").await, "OK");
    assert_eq!(
        code(&r.sc, "api", "/a").await,
        "OVER_LIMIT",
        "rules stay in force"
    );
    assert_eq!(r.sc.get("/readyz").await.0, 200, "synced once: stays ready");
    let (_, cfg) = r.sc.get("/v1/config").await;
    let cfg: Value = serde_json::from_str(&cfg).expect("json");
    assert_eq!(cfg["kubernetes"]["synced"], true);
    assert!(cfg["kubernetes"]["error"].is_string(), "{cfg}");

    api.restart().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 10));
    eventually(
        Duration::from_secs(60),
        "the change after the outage",
        || async { code(&r.sc, "api", "/a").await == "OK" },
    )
    .await;
    accepted(&api, POLICIES, "api", "True", 2).await;
    assert!(r.sc.child_alive());
}

#[tokio::test]
async fn a_hanging_status_write_never_delays_rules() {
    let api = FakeApiServer::start().await;
    api.set_patch_delay(Duration::from_secs(3600));
    let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        api.apply(POLICIES, NS, name, json!({}), policy(&format!("d{i}"), 1));
    }
    let r = start(&api, None, &[]);
    ready(&r.sc).await;
    // Eight hanging writes (5 s timeout each) are in flight; every change still applies.
    for round in 0..3u32 {
        api.apply(POLICIES, NS, "p0", json!({}), policy("d0", 100 + round));
        eventually(WAIT, &format!("change {round} in force"), || async {
            limit_of(&r.sc, "d0", "/a").await == Some(u64::from(100 + round))
        })
        .await;
    }
    assert_eq!(
        api.accepted(POLICIES, NS, "p0"),
        None,
        "no write got through yet"
    );
    // The API server recovers: the retry writes every status.
    api.set_patch_delay(Duration::ZERO);
    for name in &names {
        let generation = if name == "p0" { 4 } else { 1 };
        accepted_within(
            &api,
            POLICIES,
            name,
            "True",
            generation,
            Duration::from_secs(40),
        )
        .await;
    }
    assert!(metric(&r.sc, "ratethrottle_kubernetes_status_write_errors_total").await >= Some(8));
}

#[tokio::test]
async fn not_ready_until_the_first_sync() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 1));
    api.stop();
    let r = start(&api, None, &[]);
    let (code_, body) = r.sc.get("/readyz").await;
    assert_eq!(code_, 503, "{body}");
    assert!(body.contains("first Kubernetes sync"), "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(r.sc.get("/readyz").await.0, 503);

    api.restart().await;
    ready_within(&r.sc, Duration::from_secs(60)).await;
    // Ready means the resources are in force.
    admits_one_more(&r.sc, "api").await;
}

#[tokio::test]
async fn missing_crds_are_named_and_installing_them_makes_it_ready() {
    let api = FakeApiServer::start().await;
    api.set_crds_installed(false);
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 1));
    let r = start(&api, None, &[]);
    eventually(WAIT, "the 404 explained", || async {
        let (status, body) = r.sc.get("/readyz").await;
        status == 503 && body.contains("are the CRDs installed?")
    })
    .await;
    api.set_crds_installed(true);
    ready_within(&r.sc, Duration::from_secs(60)).await;
    admits_one_more(&r.sc, "api").await;
}

#[tokio::test]
async fn access_lists_apply_to_check_and_are_not_editable_at_runtime() {
    let api = FakeApiServer::start().await;
    api.apply(
        ACCESS_LISTS,
        NS,
        "abusers",
        json!({}),
        json!({"block": [{"value": "203.0.113.7", "reason": "scraper", "code": "scraping"}]}),
    );
    let settings = "settings:\n  admin_token: t0ken\nauthz:\n  domain: edge\n";
    let r = start(&api, Some(settings), &[]);
    ready(&r.sc).await;
    let a = r.sc.check(&Check::new("203.0.113.7")).await;
    assert_eq!(a.http, 403, "{}", a.body);
    assert!(a.body.contains("scraping"), "{}", a.body);
    assert_eq!(r.sc.check(&Check::new("198.51.100.1")).await.http, 200);
    accepted(&api, ACCESS_LISTS, "abusers", "True", 1).await;
    assert_eq!(
        api.object(ACCESS_LISTS, NS, "abusers").expect("obj")["status"]["block"],
        1
    );

    let auth = [("authorization", "Bearer t0ken")];
    let (status, body) = http_with(
        r.sc.admin,
        "DELETE",
        "/v1/lists/block/203.0.113.7",
        "",
        &auth,
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("AccessList"), "{body}");
    let (_, body) = http_with(r.sc.admin, "GET", "/v1/lists", "", &auth).await;
    assert!(body.contains("\"kubernetes\""), "{body}");

    // An invalid update keeps the entry; a valid one replaces it.
    api.apply(
        ACCESS_LISTS,
        NS,
        "abusers",
        json!({}),
        json!({"block": [{"value": "10.0.0.1/8"}]}),
    );
    let c = accepted(&api, ACCESS_LISTS, "abusers", "False", 2).await;
    assert!(
        c["message"]
            .as_str()
            .unwrap_or_default()
            .contains("host bits"),
        "{c}"
    );
    assert_eq!(r.sc.check(&Check::new("203.0.113.7")).await.http, 403);
    api.apply(
        ACCESS_LISTS,
        NS,
        "abusers",
        json!({}),
        json!({"block": ["10.0.0.0/8"]}),
    );
    eventually(WAIT, "the new block list", || async {
        r.sc.check(&Check::new("203.0.113.7")).await.http == 200
            && r.sc.check(&Check::new("10.1.2.3")).await.http == 403
    })
    .await;
}

#[tokio::test]
async fn statuses_are_written_once_even_by_two_replicas() {
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "api", json!({}), policy("api", 1));
    let a = start(&api, None, &[]);
    ready(&a.sc).await;
    accepted(&api, POLICIES, "api", "True", 1).await;
    let b = start(&api, None, &[]);
    ready(&b.sc).await;
    // b sees a's status, which is already what it would write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.patches(POLICIES, NS, "api"), 1);

    api.apply(POLICIES, NS, "api", json!({}), policy("api", 2));
    accepted(&api, POLICIES, "api", "True", 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let patches = api.patches(POLICIES, NS, "api");
    // Both may race to the same new status once; they never keep rewriting it.
    assert!((2..=3).contains(&patches), "{patches} status writes");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(api.patches(POLICIES, NS, "api"), patches);
    let writes = "ratethrottle_kubernetes_status_writes_total";
    let (wa, wb) = (metric(&a.sc, writes).await, metric(&b.sc, writes).await);
    assert_eq!(
        wa.unwrap_or(0) + wb.unwrap_or(0),
        u64::from(patches),
        "{wa:?} + {wb:?}"
    );
}

#[tokio::test]
async fn namespace_and_selector_limit_what_is_watched() {
    let api = FakeApiServer::start().await;
    api.apply(
        POLICIES,
        NS,
        "mine",
        json!({"team": "a"}),
        policy("mine", 1),
    );
    api.apply(
        POLICIES,
        NS,
        "unlabelled",
        json!({}),
        policy("unlabelled", 1),
    );
    api.apply(
        POLICIES,
        "team-b",
        "theirs",
        json!({"team": "a"}),
        policy("theirs", 1),
    );
    let r = start(&api, None, &["--selector", "team=a"]);
    ready(&r.sc).await;
    admits_one_more(&r.sc, "mine").await;
    for other in ["unlabelled", "theirs"] {
        code(&r.sc, other, "/a").await;
        assert_eq!(
            code(&r.sc, other, "/a").await,
            "OK",
            "{other} is not watched"
        );
    }
    assert!(api.accepted(POLICIES, "team-b", "theirs").is_none());

    let all = start(&api, None, &["--all-namespaces", "--selector", "team=a"]);
    ready(&all.sc).await;
    code(&all.sc, "theirs", "/a").await;
    assert_eq!(code(&all.sc, "theirs", "/a").await, "OVER_LIMIT");
}

/// Every resource under k8s/examples/kubernetes, and every domain file of the example
/// configuration pasted under `spec:` unchanged, is accepted and in force.
#[tokio::test]
async fn shipped_examples_and_pasted_domain_files_are_accepted() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let api = FakeApiServer::start().await;
    let mut expected = Vec::new();
    for file in ["ratelimitpolicy.yaml", "accesslist.yaml"] {
        let text = std::fs::read_to_string(root.join("k8s/examples/kubernetes").join(file))
            .expect("read example");
        for doc in serde_saphyr::from_multiple::<Value>(&text).expect("example YAML") {
            let plural = match doc["kind"].as_str() {
                Some("RateLimitPolicy") => POLICIES,
                Some("AccessList") => ACCESS_LISTS,
                other => panic!("{file}: unexpected kind {other:?}"),
            };
            let (ns, name) = (
                doc["metadata"]["namespace"].as_str().expect("namespace"),
                doc["metadata"]["name"].as_str().expect("name"),
            );
            api.apply(
                plural,
                ns,
                name,
                doc["metadata"]["labels"].clone(),
                doc["spec"].clone(),
            );
            expected.push((plural, ns.to_string(), name.to_string()));
        }
    }
    // A reference-style domain file, as users have them today, pasted as the spec.
    let domain_file = "domain: pasted\ndescriptors:\n  - key: database\n    value: users\n    rate_limit:\n      unit: second\n      requests_per_unit: 500\n  - key: message_type\n    value: marketing\n    descriptors:\n      - key: to_number\n        rate_limit:\n          unit: day\n          requests_per_unit: 5\n";
    let spec: Value = serde_saphyr::from_str(domain_file).expect("domain file");
    api.apply(POLICIES, "shop", "pasted", json!({}), spec);
    expected.push((POLICIES, "shop".into(), "pasted".into()));

    let r = start(&api, None, &["--all-namespaces"]);
    ready(&r.sc).await;
    for (plural, ns, name) in &expected {
        eventually(WAIT, &format!("{plural} {ns}/{name} accepted"), || async {
            api.object(plural, ns, name)
                .and_then(|o| {
                    o["status"]["conditions"][0]["status"]
                        .as_str()
                        .map(String::from)
                })
                .as_deref()
                == Some("True")
        })
        .await;
    }
    let v = answer_for(&r.sc, "pasted", "database", "users").await;
    assert_eq!(
        v["statuses"][0]["currentLimit"]["requestsPerUnit"], 500,
        "{v}"
    );
}

#[tokio::test]
async fn hundreds_of_resources_get_exactly_one_status_write_each() {
    let api = FakeApiServer::start().await;
    let n = 300;
    for i in 0..n {
        api.apply(
            POLICIES,
            NS,
            &format!("p{i}"),
            json!({}),
            policy(&format!("d{i}"), 1),
        );
    }
    let r = start(&api, None, &[]);
    ready(&r.sc).await;
    eventually(Duration::from_secs(60), "every status written", || async {
        (0..n).all(|i| api.accepted(POLICIES, NS, &format!("p{i}")).is_some())
    })
    .await;
    api.apply(POLICIES, NS, "p7", json!({}), policy("d7", 77));
    eventually(WAIT, "a change among hundreds", || async {
        limit_of(&r.sc, "d7", "/a").await == Some(77)
    })
    .await;
    accepted(&api, POLICIES, "p7", "True", 2).await;
    // Our own writes coming back as MODIFIED events must not cause more writes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes: u32 = (0..n)
        .map(|i| api.patches(POLICIES, NS, &format!("p{i}")))
        .sum();
    assert_eq!(writes, n + 1);
    assert_eq!(api.lists(POLICIES), 1);
}

/// End to end: a real Envoy with the shipped rate limit config, the sidecar taking its rules
/// from a RateLimitPolicy, and the resource changed and deleted while traffic flows.
#[tokio::test]
async fn envoy_enforces_resource_rules_and_follows_their_changes() {
    use support::envoy::Envoy;
    let limit = |n: u32| {
        json!({"domain": "example", "descriptors": [
            {"key": "api_key", "rate_limit": {"unit": "hour", "requests_per_unit": n}}
        ]})
    };
    let api = FakeApiServer::start().await;
    api.apply(POLICIES, NS, "edge", json!({}), limit(2));
    let r = start(&api, None, &[]);
    ready(&r.sc).await;
    let envoy = Envoy::start("http-ratelimit.yaml", &[r.sc.grpc], |t| t);
    let get = |key: &'static str| {
        let listener = envoy.listener;
        async move {
            support::http_request(listener, "GET", "/api/items", &[("x-api-key", key)], "")
                .await
                .status
        }
    };
    assert_eq!(get("alice").await, 200);
    assert_eq!(get("alice").await, 200);
    assert_eq!(get("alice").await, 429);

    api.apply(POLICIES, NS, "edge", json!({}), limit(3));
    eventually(WAIT, "Envoy admits under the raised limit", || async {
        get("alice").await == 200
    })
    .await;

    api.delete(POLICIES, NS, "edge");
    eventually(WAIT, "no limit once the resource is gone", || async {
        let statuses = [
            get("bob").await,
            get("bob").await,
            get("bob").await,
            get("bob").await,
        ];
        statuses.iter().all(|s| *s == 200)
    })
    .await;
}
