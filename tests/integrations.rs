//! k8s/examples/integrations/: the Istio, Envoy Gateway, Contour and Emissary-ingress wiring.
//!
//! For each product: its settings file passes `ratethrottle config validate`; its manifests
//! validate against the schemas the product's npm package publishes
//! (scripts/validate_integrations.mjs; Emissary has none); every Envoy fragment in them is
//! rendered into a full bootstrap that `envoy --mode validate` accepts; and that bootstrap runs
//! through a real Envoy against the real sidecar serving the settings file: a caller over the
//! limit gets 429, the blocked identity 403 — the descriptors and identities line up.
//!
//! The bootstraps stand in for what each controller generates: the objects' fields rendered
//! the way the product documents (Istio's ext_authz provider, Contour's ExtensionService and
//! descriptors, Emissary's label groups, Envoy Gateway's SecurityPolicy), and the raw Envoy
//! fragments (the EnvoyFilter's patches, the EnvoyPatchPolicy's JSON patches) inserted as is.
//!
//! Needs node with the schema packages (scripts/integration-tools.sh) and Envoy: run with
//! `bash scripts/test.sh cargo test --test integrations`.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

mod support;

use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::envoy::{Envoy, validate};
use support::{BIN, Sidecar, http_request};

const PRODUCTS: [&str; 4] = ["istio", "envoy-gateway", "contour", "emissary"];

fn dir(product: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("k8s/examples/integrations")
        .join(product)
}

fn env_path(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: run the tests with `bash scripts/test.sh cargo test --test \
             integrations`, which installs node and the schema packages \
             (scripts/integration-tools.sh)"
        )
    })
}

/// The YAML documents of a file as JSON values.
fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn manifests(product: &str) -> Vec<Value> {
    docs(&dir(product).join("manifests.yaml"))
}

fn object<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

// ---------------------------------------------------------------------------------------
// Settings files and schemas

#[test]
fn every_settings_file_passes_config_validate() {
    for product in PRODUCTS {
        let file = dir(product).join("ratethrottle.yaml");
        let out = Command::new(BIN)
            .args(["config", "validate"])
            .arg(&file)
            .output()
            .expect("run ratethrottle");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{product}: {text}");
        assert!(text.contains("valid (2 domains"), "{product}: {text}");
    }
}

/// Runs the schema validator on `files`; returns (success, one report per object).
fn schema_check(files: &[PathBuf]) -> (bool, Vec<Value>) {
    let out = Command::new(env_path("RATETHROTTLE_TEST_NODE"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/validate_integrations.mjs"))
        .arg(env_path("RATETHROTTLE_TEST_SCHEMA_MODULES"))
        .args(files)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "validator crashed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (out.status.success(), reports)
}

fn status_of(reports: &[Value]) -> Vec<(String, String)> {
    reports
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().expect("kind").to_string(),
                r["status"].as_str().expect("status").to_string(),
            )
        })
        .collect()
}

#[test]
fn manifests_validate_against_the_products_published_schemas() {
    let files: Vec<PathBuf> = PRODUCTS
        .iter()
        .map(|p| dir(p).join("manifests.yaml"))
        .collect();
    let (ok, reports) = schema_check(&files);
    assert!(ok, "{reports:#?}");
    let mut got = status_of(&reports);
    got.sort();
    let want: Vec<(String, String)> = [
        // Emissary: no registry package ships getambassador.io schemas.
        ("AuthService", "unchecked"),
        ("AuthorizationPolicy", "valid"),
        ("ContourConfiguration", "valid"),
        ("EnvoyFilter", "valid"),
        ("EnvoyPatchPolicy", "valid"),
        ("ExtensionService", "valid"),
        ("HTTPProxy", "valid"),
        // @kubernetes-models/istio's IstioOperator schema has no spec.
        ("IstioOperator", "partial"),
        ("Mapping", "unchecked"),
        ("RateLimitService", "unchecked"),
        ("ReferenceGrant", "valid"),
        ("SecurityPolicy", "valid"),
    ]
    .iter()
    .map(|(k, s)| (k.to_string(), s.to_string()))
    .collect();
    assert_eq!(got, want, "{reports:#?}");
}

#[test]
fn the_schema_check_rejects_unknown_fields_and_bad_values() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cases = [
        // A misspelled field: the CRD would silently drop it; TypeScript's check does not.
        (
            "contour",
            "    authorization:\n",
            "    authorisation:\n",
            "authorisation",
        ),
        ("contour", "protocol: h2c", "protocol: h3", "/spec/protocol"),
        (
            "istio",
            "action: CUSTOM",
            "action: EXTERNAL",
            "/spec/action",
        ),
        ("istio", "applyTo: CLUSTER", "applyTo: CLUSTERS", "applyTo"),
        (
            "envoy-gateway",
            "    failOpen: false",
            "    failOpn: false",
            "failOpn",
        ),
        (
            "envoy-gateway",
            "port: 8081\n    timeout",
            "port: eighty\n    timeout",
            "port",
        ),
    ];
    // One validator run over every broken copy (node and TypeScript start once).
    let mut files = Vec::new();
    for (i, (product, from, to, _)) in cases.iter().enumerate() {
        let text = std::fs::read_to_string(dir(product).join("manifests.yaml")).expect("read");
        assert!(
            text.contains(from),
            "{product}: {from:?} not in the manifest"
        );
        let file = tmp.path().join(format!("{i}-{product}.yaml"));
        std::fs::write(&file, text.replacen(from, to, 1)).expect("write");
        files.push(file);
    }
    let (ok, reports) = schema_check(&files);
    assert!(!ok, "{reports:#?}");
    for ((product, _, to, expect), file) in cases.iter().zip(&files) {
        let bad: Vec<&Value> = reports
            .iter()
            .filter(|r| r["file"] == file.to_str().expect("utf-8") && r["status"] == "invalid")
            .collect();
        assert_eq!(bad.len(), 1, "{product} {to:?}: {reports:#?}");
        let detail = bad[0]["detail"].as_str().expect("detail");
        assert!(detail.contains(expect), "{product} {to:?}: {detail}");
    }
}

// ---------------------------------------------------------------------------------------
// Bootstraps: each product's objects rendered into a full Envoy config

/// HTTP/2 (gRPC) cluster `name` to `addr`.
fn grpc_cluster(name: &str, addr: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}}}
        ]}]}
    })
}

/// A cluster from a manifest with its endpoints replaced by `addr` (the test's sidecar
/// instead of the Kubernetes Service name).
fn retarget(mut cluster: Value, addr: SocketAddr) -> Value {
    let endpoints = cluster["load_assignment"]["endpoints"]
        .as_array_mut()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 1, "{cluster}");
    let sa = &mut endpoints[0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(
        sa["address"], "ratethrottle.ratethrottle.svc.cluster.local",
        "the chart's Service"
    );
    assert_eq!(sa["port_value"], 8081, "the chart's gRPC port");
    *sa = json!({"address": addr.ip().to_string(), "port_value": addr.port()});
    cluster
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

/// The :authority of gRPC calls to a cluster whose name is not a valid host (Istio's
/// `outbound|8081||…`, Contour's `extension/ns/name`): each product sets the Service's host
/// name, and ratethrottle's HTTP/2 server rejects an invalid authority (the call fails 502).
const AUTHORITY: &str = "ratethrottle.ratethrottle.svc.cluster.local";

/// An ext_authz filter to `cluster`, as the products render theirs.
fn ext_authz(cluster: &str, timeout: &str, fail_open: bool, body_bytes: u64) -> Value {
    json!({"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster, "authority": AUTHORITY}, "timeout": timeout},
        "failure_mode_allow": fail_open,
        "with_request_body": {"max_request_bytes": body_bytes, "allow_partial_message": true, "pack_as_bytes": true}
    }})
}

/// A rate limit filter to `cluster`, as Contour and Emissary render theirs.
fn ratelimit(cluster: &str, domain: &str, deny_on_failure: bool, exhausted: bool) -> Value {
    json!({"name": "envoy.filters.http.ratelimit", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
        "domain": domain,
        "timeout": "0.1s",
        "failure_mode_deny": deny_on_failure,
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        "rate_limited_as_resource_exhausted": exhausted,
        "rate_limit_service": {"transport_api_version": "V3",
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster, "authority": AUTHORITY}}}
    }})
}

/// A rendered config: the gateway listener and what the product's objects add to it.
struct Rendered {
    listener_name: &'static str,
    http_filters: Vec<Value>,
    vhost_rate_limits: Vec<Value>,
    routes: Vec<Value>,
    clusters: Vec<Value>,
}

impl Rendered {
    /// The full bootstrap: the gateway listener on `listen`, a stand-in upstream answering
    /// 200 "ok", admin on `admin`.
    fn bootstrap(&self, listen: u16, upstream: u16, admin: u16) -> Value {
        let mut routes = self.routes.clone();
        routes.push(json!({"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}));
        let mut clusters = self.clusters.clone();
        clusters.push(json!({
            "name": "upstream", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]}
        }));
        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [
                    {
                        "name": self.listener_name,
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                        "default_filter_chain": {"filters": [{
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "gateway",
                                "use_remote_address": true,
                                "route_config": {"name": self.listener_name, "virtual_hosts": [{
                                    "name": "gateway", "domains": ["*"],
                                    "rate_limits": self.vhost_rate_limits,
                                    "routes": routes
                                }]},
                                "http_filters": self.http_filters
                            }
                        }]}
                    },
                    {
                        "name": "upstream",
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}},
                        "filter_chains": [{"filters": [{
                            "name": "envoy.filters.network.http_connection_manager",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                "stat_prefix": "upstream",
                                "route_config": {"virtual_hosts": [{"name": "upstream", "domains": ["*"],
                                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}]}]},
                                "http_filters": [router()]
                            }
                        }]}]
                    }
                ],
                "clusters": clusters
            }
        })
    }
}

/// Istio: the extension provider rendered as Istio does (an ext_authz filter calling
/// `outbound|<port>||<service>`), then the EnvoyFilter's three patches applied as written.
fn istio(sidecar: SocketAddr) -> Rendered {
    let objs = manifests("istio");
    let providers = &object(&objs, "IstioOperator")["spec"]["meshConfig"]["extensionProviders"];
    let policy = object(&objs, "AuthorizationPolicy");
    assert_eq!(policy["spec"]["action"], "CUSTOM");
    let provider = providers
        .as_array()
        .expect("extensionProviders")
        .iter()
        .find(|p| p["name"] == policy["spec"]["provider"]["name"])
        .expect("the AuthorizationPolicy names a provider of the mesh config");
    let grpc = &provider["envoyExtAuthzGrpc"];
    let authz_cluster = format!(
        "outbound|{}||{}",
        grpc["port"],
        grpc["service"].as_str().expect("service")
    );
    assert_eq!(
        authz_cluster,
        "outbound|8081||ratethrottle.ratethrottle.svc.cluster.local"
    );
    let mut authz = ext_authz(
        &authz_cluster,
        grpc["timeout"].as_str().expect("timeout"),
        grpc["failOpen"].as_bool().expect("failOpen"),
        grpc["includeRequestBodyInCheck"]["maxRequestBytes"]
            .as_u64()
            .expect("maxRequestBytes"),
    );
    let status: u64 = grpc["statusOnError"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("statusOnError");
    authz["typed_config"]["status_on_error"] = json!({"code": status});

    let mut rendered = Rendered {
        listener_name: "0.0.0.0_8080",
        http_filters: vec![authz, router()],
        vhost_rate_limits: Vec::new(),
        routes: Vec::new(),
        clusters: vec![grpc_cluster(&authz_cluster, sidecar)],
    };
    let filter = object(&objs, "EnvoyFilter");
    assert_eq!(
        filter["spec"]["workloadSelector"]["labels"], policy["spec"]["selector"]["matchLabels"],
        "the EnvoyFilter and the AuthorizationPolicy select the same gateway"
    );
    for patch in filter["spec"]["configPatches"].as_array().expect("patches") {
        let value = patch["patch"]["value"].clone();
        match (
            patch["applyTo"].as_str().expect("applyTo"),
            patch["patch"]["operation"].as_str().expect("operation"),
        ) {
            ("HTTP_FILTER", "INSERT_BEFORE") => {
                let before =
                    &patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"];
                let at = rendered
                    .http_filters
                    .iter()
                    .position(|f| &f["name"] == before)
                    .expect("the filter it is inserted before");
                rendered.http_filters.insert(at, value);
            }
            ("CLUSTER", "ADD") => rendered.clusters.push(retarget(value, sidecar)),
            ("VIRTUAL_HOST", "MERGE") => {
                rendered.vhost_rate_limits = value["rate_limits"].as_array().expect("rl").clone()
            }
            other => panic!("unexpected patch {other:?}"),
        }
    }
    rendered
}

/// JSON pointer `path` split into unescaped tokens.
fn pointer_tokens(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// RFC 6902 `add` of `value` at `path` inside `doc`.
fn json_patch_add(doc: &mut Value, path: &str, value: Value) {
    let tokens = pointer_tokens(path);
    let (last, parents) = tokens.split_last().expect("a non-empty path");
    let mut at = doc;
    for t in parents {
        at = match at {
            Value::Array(a) => &mut a[t.parse::<usize>().expect("index")],
            Value::Object(o) => o.get_mut(t).unwrap_or_else(|| panic!("no {t} in {path}")),
            _ => panic!("{path}: {t} is not in a container"),
        };
    }
    match at {
        Value::Array(a) if last == "-" => a.push(value),
        Value::Array(a) => a.insert(last.parse::<usize>().expect("index"), value),
        Value::Object(o) => {
            o.insert(last.clone(), value);
        }
        _ => panic!("{path}: not a container"),
    }
}

/// Envoy Gateway: the SecurityPolicy's ext_authz (a cluster per backendRef), then the
/// EnvoyPatchPolicy's JSON patches applied to the listener, route configuration and clusters
/// with the names Envoy Gateway gives them.
fn envoy_gateway(sidecar: SocketAddr, ports: (u16, u16, u16), with_patches: bool) -> Value {
    let objs = manifests("envoy-gateway");
    let sp = object(&objs, "SecurityPolicy");
    let ext = &sp["spec"]["extAuth"];
    let backend = &ext["grpc"]["backendRefs"][0];
    let grant = object(&objs, "ReferenceGrant");
    assert_eq!(grant["metadata"]["namespace"], backend["namespace"]);
    assert_eq!(grant["spec"]["to"][0]["name"], backend["name"]);
    assert_eq!(grant["spec"]["from"][0]["kind"], "SecurityPolicy");
    assert_eq!(
        grant["spec"]["from"][0]["namespace"],
        sp["metadata"]["namespace"]
    );
    assert_eq!(
        (backend["name"].as_str(), backend["port"].as_u64()),
        (Some("ratethrottle"), Some(8081)),
        "the chart's Service and gRPC port"
    );
    let cluster = "securitypolicy/default/ratethrottle/extauth/0";
    let timeout = ext["timeout"].as_str().expect("timeout").replace("ms", "");
    let timeout = format!("{}s", timeout.parse::<f64>().expect("ms") / 1000.0);
    let rendered = Rendered {
        listener_name: "default/eg/http",
        http_filters: vec![
            ext_authz(
                cluster,
                &timeout,
                ext["failOpen"].as_bool().expect("failOpen"),
                ext["bodyToExtAuth"]["maxRequestBytes"]
                    .as_u64()
                    .expect("maxRequestBytes"),
            ),
            router(),
        ],
        vhost_rate_limits: Vec::new(),
        routes: Vec::new(),
        clusters: vec![grpc_cluster(cluster, sidecar)],
    };
    let mut boot = rendered.bootstrap(ports.0, ports.1, ports.2);
    if !with_patches {
        return boot;
    }
    let epp = object(&objs, "EnvoyPatchPolicy");
    assert_eq!(epp["spec"]["targetRef"], sp["spec"]["targetRefs"][0]);
    for p in epp["spec"]["jsonPatches"].as_array().expect("jsonPatches") {
        let op = &p["operation"];
        assert_eq!(op["op"], "add");
        let path = op["path"].as_str().expect("path");
        let value = op["value"].clone();
        let name = p["name"].as_str().expect("name");
        let resources = &mut boot["static_resources"];
        match p["type"].as_str().expect("type") {
            "type.googleapis.com/envoy.config.listener.v3.Listener" => {
                let l = resources["listeners"]
                    .as_array_mut()
                    .expect("listeners")
                    .iter_mut()
                    .find(|l| l["name"] == name)
                    .unwrap_or_else(|| panic!("no listener {name}"));
                json_patch_add(l, path, value);
            }
            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration" => {
                let rc = resources["listeners"]
                    .as_array_mut()
                    .expect("listeners")
                    .iter_mut()
                    .map(|l| {
                        &mut l["default_filter_chain"]["filters"][0]["typed_config"]["route_config"]
                    })
                    .find(|rc| rc["name"] == name)
                    .unwrap_or_else(|| panic!("no route configuration {name}"));
                json_patch_add(rc, path, value);
            }
            "type.googleapis.com/envoy.config.cluster.v3.Cluster" => {
                assert_eq!(path, "", "a new cluster");
                assert_eq!(value["name"], name);
                resources["clusters"]
                    .as_array_mut()
                    .expect("clusters")
                    .push(retarget(value, sidecar));
            }
            other => panic!("unexpected patch type {other}"),
        }
    }
    boot
}

/// Contour's descriptor entries as Envoy rate limit actions.
fn contour_actions(descriptors: &Value) -> Vec<Value> {
    descriptors
        .as_array()
        .expect("descriptors")
        .iter()
        .map(|d| {
            let actions: Vec<Value> = d["entries"]
                .as_array()
                .expect("entries")
                .iter()
                .map(|e| {
                    if let Some(g) = e.get("genericKey") {
                        json!({"generic_key": {
                            "descriptor_key": g.get("key").cloned().unwrap_or(json!("generic_key")),
                            "descriptor_value": g["value"]}})
                    } else if let Some(h) = e.get("requestHeader") {
                        json!({"request_headers": {"header_name": h["headerName"], "descriptor_key": h["descriptorKey"]}})
                    } else if e.get("remoteAddress").is_some() {
                        json!({"remote_address": {}})
                    } else {
                        panic!("unexpected entry {e}")
                    }
                })
                .collect();
            json!({"actions": actions})
        })
        .collect()
}

/// Contour: the ExtensionService as cluster `extension/<ns>/<name>`, the HTTPProxy's
/// authorization and the ContourConfiguration's rateLimitService as filters, the HTTPProxy's
/// descriptors as virtual host and route rate limits (routes include the host's).
fn contour(sidecar: SocketAddr) -> Rendered {
    let objs = manifests("contour");
    let ext = object(&objs, "ExtensionService");
    assert_eq!(ext["spec"]["protocol"], "h2c");
    assert_eq!(
        ext["spec"]["services"][0],
        json!({"name": "ratethrottle", "port": 8081}),
        "the chart's Service and gRPC port"
    );
    let ext_ref =
        json!({"namespace": ext["metadata"]["namespace"], "name": ext["metadata"]["name"]});
    let cluster = format!(
        "extension/{}/{}",
        ext["metadata"]["namespace"].as_str().expect("ns"),
        ext["metadata"]["name"].as_str().expect("name")
    );
    let rls = &object(&objs, "ContourConfiguration")["spec"]["rateLimitService"];
    assert_eq!(rls["extensionService"], ext_ref);
    let proxy = object(&objs, "HTTPProxy");
    let vhost = &proxy["spec"]["virtualhost"];
    let auth = &vhost["authorization"];
    assert_eq!(auth["extensionRef"], ext_ref);
    assert!(
        vhost["tls"]["secretName"].is_string(),
        "Contour authorizes TLS hosts only"
    );
    let timeout = auth["responseTimeout"]
        .as_str()
        .expect("timeout")
        .replace("ms", "");
    let timeout = format!("{}s", timeout.parse::<f64>().expect("ms") / 1000.0);
    let authz = ext_authz(
        &cluster,
        &timeout,
        auth["failOpen"].as_bool().expect("failOpen"),
        auth["withRequestBody"]["maxRequestBytes"]
            .as_u64()
            .expect("maxRequestBytes"),
    );
    let rl = ratelimit(
        &cluster,
        rls["domain"].as_str().expect("domain"),
        !rls["failOpen"].as_bool().expect("failOpen"),
        rls["enableResourceExhaustedCode"] == true,
    );
    let routes = proxy["spec"]["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| {
            let limits = r.get("rateLimitPolicy")?;
            Some(json!({
                "match": {"prefix": r["conditions"][0]["prefix"]},
                "route": {"cluster": "upstream",
                          "rate_limits": contour_actions(&limits["global"]["descriptors"])},
                "typed_per_filter_config": {"envoy.filters.http.ratelimit": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimitPerRoute",
                    "vh_rate_limits": "INCLUDE"}}
            }))
        })
        .collect();
    Rendered {
        listener_name: "ingress_https",
        http_filters: vec![authz, rl, router()],
        vhost_rate_limits: contour_actions(&vhost["rateLimitPolicy"]["global"]["descriptors"]),
        routes,
        clusters: vec![grpc_cluster(&cluster, sidecar)],
    }
}

/// One Emissary `v3alpha1` label specifier as the Envoy rate limit action Emissary makes of it.
/// Emissary's CRD (`MappingLabelSpecifier` in emissary-ingress/emissary `crd_mapping.go`) takes
/// exactly one of five keys, each with its required fields; anything else is refused here, as
/// the API server would refuse it (no registry package ships Emissary's schemas).
fn emissary_label(s: &Value) -> Result<Value, String> {
    let obj = s
        .as_object()
        .ok_or(format!("a label specifier is a mapping: {s}"))?;
    let [(label, spec)] = obj.iter().collect::<Vec<_>>()[..] else {
        return Err(format!("a label specifier has exactly one key: {s}"));
    };
    let field = |name: &str| {
        spec[name]
            .as_str()
            .map(str::to_string)
            .ok_or(format!("{label}.{name} is required: {s}"))
    };
    let only = |allowed: &[&str]| match spec
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())))
    {
        Some(k) => Err(format!("{label}.{k} is not a field of {label}: {s}")),
        None => Ok(()),
    };
    match label.as_str() {
        "generic_key" => {
            only(&["key", "value"])?;
            let mut action = json!({"descriptor_value": field("value")?});
            if let Some(k) = spec["key"].as_str() {
                action["descriptor_key"] = json!(k);
            }
            Ok(json!({ "generic_key": action }))
        }
        "remote_address" | "source_cluster" | "destination_cluster" => {
            only(&["key"])?;
            if field("key")? != *label {
                return Err(format!("{label}.key must be {label:?}: {s}"));
            }
            Ok(json!({ label.as_str(): {} }))
        }
        "request_headers" => {
            only(&["key", "header_name", "omit_if_not_present"])?;
            Ok(json!({"request_headers": {
                "header_name": field("header_name")?,
                "descriptor_key": field("key")?,
                "skip_if_absent": spec["omit_if_not_present"].as_bool().unwrap_or(false),
            }}))
        }
        other => Err(format!(
            "{other:?} is not an Emissary label specifier (generic_key, remote_address, \
             request_headers, source_cluster, destination_cluster): {s}"
        )),
    }
}

#[test]
fn emissary_labels_are_read_as_emissary_reads_them() {
    let ok = json!({"request_headers": {"key": "identity", "header_name": "x-id", "omit_if_not_present": true}});
    assert_eq!(
        emissary_label(&ok).expect("valid"),
        json!({"request_headers": {"header_name": "x-id", "descriptor_key": "identity", "skip_if_absent": true}})
    );
    assert_eq!(
        emissary_label(&json!({"remote_address": {"key": "remote_address"}})).expect("valid"),
        json!({"remote_address": {}})
    );
    // A label name wrapped around the specifier (the form this example first shipped with),
    // two keys, a missing required field, a wrong fixed key, an unknown field: all refused.
    for bad in [
        json!({"identity": {"request_headers": {"key": "identity", "header_name": "x-id"}}}),
        json!({"generic_key": {"value": "api"}, "remote_address": {"key": "remote_address"}}),
        json!({"request_headers": {"key": "identity"}}),
        json!({"remote_address": {"key": "client"}}),
        json!({"generic_key": {"value": "api", "descriptor_value": "api"}}),
    ] {
        assert!(emissary_label(&bad).is_err(), "{bad}");
    }
}

/// Emissary: the AuthService and RateLimitService as filters and clusters, the Mapping's
/// label groups of the RateLimitService's domain as its route's rate limits.
fn emissary(sidecar: SocketAddr) -> Rendered {
    let objs = manifests("emissary");
    let auth = &object(&objs, "AuthService")["spec"];
    let rls = &object(&objs, "RateLimitService")["spec"];
    for spec in [auth, rls] {
        assert_eq!(spec["protocol_version"], "v3");
    }
    assert_eq!(auth["proto"], "grpc");
    assert_eq!(auth["auth_service"], "ratethrottle.ratethrottle:8081");
    assert_eq!(rls["service"], "ratethrottle.ratethrottle:8081");
    let cluster = "cluster_ratethrottle_ratethrottle_8081";
    let ms = |v: &Value| format!("{}s", v.as_f64().expect("timeout_ms") / 1000.0);
    let mut authz = ext_authz(
        cluster,
        &ms(&auth["timeout_ms"]),
        auth["failure_mode_allow"]
            .as_bool()
            .expect("failure_mode_allow"),
        auth["include_body"]["max_bytes"]
            .as_u64()
            .expect("max_bytes"),
    );
    authz["typed_config"]["status_on_error"] = json!({"code": auth["status_on_error"]["code"]});
    authz["typed_config"]["with_request_body"]["pack_as_bytes"] = json!(false);
    let domain = rls["domain"].as_str().expect("domain");
    let mut rl = ratelimit(
        cluster,
        domain,
        rls["failure_mode_deny"]
            .as_bool()
            .expect("failure_mode_deny"),
        false,
    );
    rl["typed_config"]["timeout"] = json!(ms(&rls["timeout_ms"]));
    let mapping = &object(&objs, "Mapping")["spec"];
    let groups = mapping["labels"][domain]
        .as_array()
        .expect("label groups of the rate limit domain");
    let rate_limits: Vec<Value> = groups
        .iter()
        .map(|g| {
            let (_, specifiers) = g.as_object().expect("group").iter().next().expect("one");
            let actions: Vec<Value> = specifiers
                .as_array()
                .expect("specifiers")
                .iter()
                .map(|s| emissary_label(s).unwrap_or_else(|e| panic!("{e}")))
                .collect();
            json!({"actions": actions})
        })
        .collect();
    Rendered {
        listener_name: "ambassador-listener-8080",
        http_filters: vec![authz, rl, router()],
        vhost_rate_limits: Vec::new(),
        routes: vec![json!({
            "match": {"prefix": mapping["prefix"]},
            "route": {"cluster": "upstream", "rate_limits": rate_limits}
        })],
        clusters: vec![grpc_cluster(cluster, sidecar)],
    }
}

fn bootstrap(product: &str, sidecar: SocketAddr, ports: (u16, u16, u16)) -> Value {
    if product == "envoy-gateway" {
        return envoy_gateway(sidecar, ports, true);
    }
    let rendered = match product {
        "istio" => istio(sidecar),
        "contour" => contour(sidecar),
        "emissary" => emissary(sidecar),
        other => panic!("unknown product {other}"),
    };
    rendered.bootstrap(ports.0, ports.1, ports.2)
}

#[test]
fn every_envoy_fragment_validates_in_a_full_bootstrap() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sidecar: SocketAddr = "127.0.0.1:8081".parse().expect("addr");
    for product in PRODUCTS {
        let boot = bootstrap(product, sidecar, (10000, 10001, 9901));
        let file = tmp.path().join(format!("{product}.json"));
        std::fs::write(&file, boot.to_string()).expect("write");
        validate(&file).unwrap_or_else(|e| panic!("{product}: {e}\n{boot:#}"));
    }
    // Without the EnvoyPatchPolicy, Envoy Gateway's config has no rate limit filter.
    let plain = envoy_gateway(sidecar, (10000, 10001, 9901), false).to_string();
    assert!(!plain.contains("envoy.filters.http.ratelimit"));
    // The check can fail: a fragment Envoy rejects.
    let mut bad = bootstrap("istio", sidecar, (10000, 10001, 9901));
    let filters = bad["static_resources"]["listeners"][0]["default_filter_chain"]["filters"][0]
        ["typed_config"]["http_filters"]
        .as_array_mut()
        .expect("filters");
    let rl = filters
        .iter_mut()
        .find(|f| f["name"] == "envoy.filters.http.ratelimit")
        .expect("ratelimit");
    rl["typed_config"]["enable_x_ratelimit_headers"] = json!("DRAFT_VERSION_99");
    let file = tmp.path().join("bad.json");
    std::fs::write(&file, bad.to_string()).expect("write");
    assert!(
        validate(&file).is_err(),
        "a bad enum passed envoy --mode validate"
    );
}

// ---------------------------------------------------------------------------------------
// End to end: the rendered config through Envoy against the sidecar

/// The product's settings file with every limit set to `requests_per_unit` per hour (an
/// hourly window: no test straddles it), by descriptor: the API limit per identity 3, the
/// limit per identity 5, per address 100. The structure — domains, keys, values, identities,
/// lists — is the shipped file's.
fn settings_for_test(product: &str) -> String {
    let mut settings: Value = docs(&dir(product).join("ratethrottle.yaml")).remove(0);
    fn walk(nodes: &mut Value, parent: &str) {
        for node in nodes.as_array_mut().into_iter().flatten() {
            let key = node["key"].as_str().unwrap_or_default().to_string();
            let path = format!("{parent}{key}");
            let limit = match path.as_str() {
                "generic_key/identity" => Some(3),
                "identity" => Some(5),
                "remote_address" => Some(100),
                _ => None,
            };
            let has = node.get("rate_limit").is_some() || node.get("rate_limits").is_some();
            if has {
                let n = limit.unwrap_or_else(|| panic!("unexpected limit at {path}"));
                node.as_object_mut().expect("node").remove("rate_limits");
                node["rate_limit"] = json!({"unit": "hour", "requests_per_unit": n});
            }
            if let Some(children) = node.get_mut("descriptors") {
                walk(children, &format!("{path}/"));
            }
        }
    }
    for domain in settings["domains"].as_array_mut().expect("domains") {
        walk(&mut domain["descriptors"], "");
    }
    settings.to_string()
}

async fn statuses(envoy: &Envoy, path: &str, key: &str, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = http_request(envoy.listener, "GET", path, &[("x-api-key", key)], "").await;
        if r.status == 200 {
            assert_eq!(r.body, "ok\n", "{r:?}");
        }
        out.push(r.status);
    }
    out
}

async fn limited_and_blocked_through_envoy(product: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("ratethrottle.yaml");
    std::fs::write(&file, settings_for_test(product)).expect("write settings");
    let sc = Sidecar::start(Some(&file), &[]);
    let envoy = Envoy::start_rendered_on_free_ports(&format!("{product}.json"), |ports| {
        bootstrap(product, sc.grpc, ports).to_string()
    });

    // The API: 3 per identity, the identity ext_authz resolved from x-api-key.
    assert_eq!(
        statuses(&envoy, "/api/items", "alice", 4).await,
        [200, 200, 200, 429],
        "{product}"
    );
    let r = http_request(
        envoy.listener,
        "GET",
        "/api/items",
        &[("x-api-key", "alice")],
        "",
    )
    .await;
    assert_eq!(r.status, 429, "{product}: {r:?}");
    assert_eq!(
        r.header("x-ratelimit-limit").map(|l| l.starts_with('3')),
        Some(true),
        "{product}: {r:?}"
    );
    // Another identity has its own counter.
    assert_eq!(
        statuses(&envoy, "/api/items", "bob", 1).await,
        [200],
        "{product}"
    );
    // Everything else: 5 per identity (Emissary's Mapping only covers /api/).
    let rest = statuses(&envoy, "/other", "carol", 6).await;
    if product == "emissary" {
        assert_eq!(rest, [200; 6], "{product}");
    } else {
        assert_eq!(rest, [200, 200, 200, 200, 200, 429], "{product}");
    }
    // The blocked identity of the settings file: 403 from ext_authz, with its public code.
    let r = http_request(
        envoy.listener,
        "GET",
        "/api/items",
        &[("x-api-key", "mallory")],
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{product}: {r:?}");
    assert_eq!(r.body, r#"{"code":"abuse","error":"blocked"}"#, "{product}");
    assert!(!r.body.contains("ticket"), "the reason stays private");
}

#[tokio::test]
async fn istio_limits_and_blocks_through_envoy() {
    limited_and_blocked_through_envoy("istio").await;
}

#[tokio::test]
async fn envoy_gateway_limits_and_blocks_through_envoy() {
    limited_and_blocked_through_envoy("envoy-gateway").await;
}

#[tokio::test]
async fn contour_limits_and_blocks_through_envoy() {
    limited_and_blocked_through_envoy("contour").await;
}

#[tokio::test]
async fn emissary_limits_and_blocks_through_envoy() {
    limited_and_blocked_through_envoy("emissary").await;
}

// ---------------------------------------------------------------------------------------
// The chart: `integration` picks the NOTES; bad values fail `helm template` by the schema

fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(env_path("RATETHROTTLE_TEST_HELM"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run helm");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// NOTES of `helm install --dry-run=client` in namespace `edge` with `--set` values.
fn notes(sets: &[&str]) -> String {
    let mut args = vec![
        "install",
        "ratethrottle",
        "charts/ratethrottle",
        "--namespace",
        "edge",
        "--dry-run=client",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, text) = helm(&args);
    assert!(ok, "{text}");
    text.split_once("NOTES:")
        .unwrap_or_else(|| panic!("no NOTES:\n{text}"))
        .1
        .to_string()
}

#[test]
fn notes_show_the_chosen_products_objects_for_this_release() {
    let cases: [(&str, &[&str]); 5] = [
        (
            "envoy",
            &[
                "name: envoy.filters.http.ratelimit",
                "address: ratethrottle.edge.svc.cluster.local, port_value: 9090",
            ],
        ),
        (
            "istio",
            &[
                "envoyExtAuthzGrpc:",
                "service: ratethrottle.edge.svc.cluster.local",
                "port: 9090",
                "action: CUSTOM",
                "k8s/examples/integrations/istio/",
            ],
        ),
        (
            "envoy-gateway",
            &[
                "kind: SecurityPolicy",
                "backendRefs: [ { name: ratethrottle, namespace: edge, port: 9090 } ]",
                "k8s/examples/integrations/envoy-gateway/",
            ],
        ),
        (
            "contour",
            &[
                "kind: ExtensionService",
                "services: [ { name: ratethrottle, port: 9090 } ]",
                "extensionService: { namespace: edge, name: ratethrottle }",
                "k8s/examples/integrations/contour/",
            ],
        ),
        (
            "emissary",
            &[
                "kind: AuthService",
                "auth_service: ratethrottle.edge:9090",
                "service: ratethrottle.edge:9090",
                "protocol_version: v3",
                "k8s/examples/integrations/emissary/",
            ],
        ),
    ];
    for (integration, want) in cases {
        let set = format!("integration={integration}");
        let n = notes(&[&set, "service.grpcPort=9090"]);
        for w in want {
            assert!(n.contains(w), "{integration}: NOTES lack {w:?}:\n{n}");
        }
        // Only the chosen product.
        for (other, marker) in [
            ("envoy", "name: envoy.filters.http.router"),
            ("istio", "envoyExtAuthzGrpc"),
            ("envoy-gateway", "kind: SecurityPolicy"),
            ("contour", "kind: ExtensionService"),
            ("emissary", "kind: AuthService"),
        ] {
            assert_eq!(
                n.contains(marker),
                other == integration,
                "{integration}: {marker}"
            );
        }
    }
    // The default stays the plain Envoy snippet.
    assert!(notes(&[]).contains("name: envoy.filters.http.router"));
    // A fullnameOverride reaches every product's objects.
    let n = notes(&["integration=emissary", "fullnameOverride=limiter"]);
    assert!(n.contains("auth_service: limiter.edge:8081"), "{n}");
}

#[test]
fn the_shipped_examples_name_the_service_the_chart_makes() {
    // Release `ratethrottle` in namespace `ratethrottle`, as the examples assume.
    let (ok, text) = helm(&[
        "template",
        "ratethrottle",
        "charts/ratethrottle",
        "--namespace",
        "ratethrottle",
        "--show-only",
        "templates/service.yaml",
    ]);
    assert!(ok, "{text}");
    let svc = serde_saphyr::from_str::<Value>(&text).expect("service yaml");
    assert_eq!(svc["metadata"]["name"], "ratethrottle");
    assert_eq!(svc["metadata"]["namespace"], "ratethrottle");
    let grpc = svc["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("grpc port")
        .clone();
    assert_eq!(grpc["port"], 8081);
    // …which is what every example references: the renderings above assert each reference
    // (Istio's provider and cluster, the SecurityPolicy's backendRef, the ExtensionService,
    // the AuthService and RateLimitService) is this name, namespace and port.
    assert_eq!(AUTHORITY, "ratethrottle.ratethrottle.svc.cluster.local");
}

#[test]
fn a_wrong_integration_service_name_or_port_fails_helm_template_by_the_schema() {
    for (set, expect) in [
        ("integration=nginx", "/integration"),
        ("integration=Istio", "/integration"),
        ("fullnameOverride=Rate_Throttle", "/fullnameOverride"),
        ("nameOverride=rate.throttle", "/nameOverride"),
        ("service.grpcPort=0", "/service/grpcPort"),
        ("service.grpcPort=grpc", "/service/grpcPort"),
        ("ports.grpc=70000", "/ports/grpc"),
    ] {
        let (ok, text) = helm(&[
            "template",
            "rt",
            "charts/ratethrottle",
            "--set",
            "integration=istio",
            "--set",
            set,
        ]);
        assert!(!ok, "--set {set} rendered:\n{text}");
        assert!(
            text.contains("schema") && text.contains(expect),
            "--set {set}: unclear message:\n{text}"
        );
    }
    for good in ["envoy", "istio", "envoy-gateway", "contour", "emissary"] {
        let set = format!("integration={good}");
        let (ok, text) = helm(&["template", "rt", "charts/ratethrottle", "--set", &set]);
        assert!(ok, "{good}: {text}");
    }
}
