//! The Helm chart (charts/ratethrottle), the plain manifests (k8s/manifests), the sidecar
//! example and the custom resource examples: `helm lint --strict`, `helm template` validated
//! against the Kubernetes 1.34 schemas and the CRDs (scripts/validate_k8s.py), and what the
//! rendered objects say.
//!
//! Needs helm and a Python with kubernetes-validate: `bash scripts/test.sh` installs them
//! (scripts/k8s-tools.sh) and exports RATETHROTTLE_TEST_HELM and RATETHROTTLE_TEST_K8S_PYTHON.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const CHART: &str = "charts/ratethrottle";
const FULL_VALUES: &str = "charts/ratethrottle/ci/full-values.yaml";
const BIN: &str = env!("CARGO_BIN_EXE_ratethrottle");
const CRD_NAMES: [&str; 2] = [
    "ratelimitpolicies.ratethrottle.io.yaml",
    "accesslists.ratethrottle.io.yaml",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tool(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "{var} is not set: run the tests with `bash scripts/test.sh` (e.g. \
             `bash scripts/test.sh cargo test --test chart`), which installs helm and \
             kubernetes-validate (scripts/k8s-tools.sh)"
        )
    })
}

fn helm_bin() -> PathBuf {
    tool("RATETHROTTLE_TEST_HELM")
}

fn python() -> PathBuf {
    tool("RATETHROTTLE_TEST_K8S_PYTHON")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn helm(args: &[&str]) -> Output {
    Command::new(helm_bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("run helm")
}

/// `helm template` of the chart as release `ratethrottle` in namespace `ns`; panics on failure.
fn template(ns: &str, extra: &[&str]) -> String {
    let mut args = vec!["template", "ratethrottle", CHART, "--namespace", ns];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}",
        text(&out)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `helm template` that must fail; returns its output.
fn template_fails(extra: &[&str]) -> String {
    let mut args = vec!["template", "ratethrottle", CHART, "--namespace", "rt"];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        !out.status.success(),
        "helm {args:?} succeeded but should fail"
    );
    text(&out)
}

/// The documents of a YAML stream as JSON values (PyYAML in the tools' venv does the parsing).
fn objects(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]\n\
             json.dump(docs, sys.stdout, default=str)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write yaml");
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "YAML did not parse:\n{}", text(&out));
    match serde_json::from_slice(&out.stdout).expect("json") {
        Value::Array(docs) => docs,
        other => panic!("not a list: {other}"),
    }
}

fn kinds(objs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objs
        .iter()
        .map(|o| o["kind"].as_str().expect("kind").to_string())
        .collect();
    k.sort();
    k
}

fn find<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind} in {:?}", kinds(objs));
    found[0]
}

/// The ConfigMap of the configuration (not the Grafana dashboard's).
fn config_map(objs: &[Value]) -> &Value {
    let found: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["data"].get("ratethrottle.json").is_none())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one config ConfigMap in {:?}",
        kinds(objs)
    );
    found[0]
}

fn container(objs: &[Value]) -> &Value {
    let containers = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    &containers[0]
}

/// The container's env as (name, value-or-valueFrom) pairs.
fn env(objs: &[Value]) -> Vec<(String, Value)> {
    container(objs)["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let v = e.get("value").or(e.get("valueFrom")).expect("value");
            (e["name"].as_str().expect("name").to_string(), v.clone())
        })
        .collect()
}

fn env_var(objs: &[Value], name: &str) -> Option<Value> {
    env(objs)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

fn crd_files() -> Vec<PathBuf> {
    CRD_NAMES
        .iter()
        .map(|n| {
            let p = root().join("k8s/crds").join(n);
            assert!(
                p.is_file(),
                "{} is missing (generated by `ratethrottle crd`)",
                p.display()
            );
            p
        })
        .collect()
}

/// Runs scripts/validate_k8s.py on `files` with the CRDs; returns (success, output).
fn validate_files(files: &[&Path], crds: &[PathBuf]) -> (bool, String) {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("scripts/validate_k8s.py"));
    for c in crds {
        cmd.arg("--crd").arg(c);
    }
    cmd.args(files);
    let out = cmd.output().expect("run validate_k8s.py");
    (out.status.success(), text(&out))
}

/// Validates a rendered stream (written to a temp file); panics with the report on failure.
fn assert_valid(yaml: &str, crds: &[PathBuf]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).expect("write");
    let (ok, report) = validate_files(&[&file], crds);
    assert!(ok, "validation failed:\n{report}\n--- rendered:\n{yaml}");
    report
}

#[test]
fn lint_strict_passes_with_defaults_and_with_everything_on() {
    let out = helm(&["lint", "--strict", CHART]);
    assert!(out.status.success(), "{}", text(&out));
    let out = helm(&["lint", "--strict", CHART, "-f", FULL_VALUES]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 chart(s) failed"), "{}", text(&out));
}

#[test]
fn defaults_render_valid_objects_and_nothing_optional() {
    let yaml = template("rt", &[]);
    let report = assert_valid(&yaml, &[]);
    let objs = objects(&yaml);
    assert_eq!(
        kinds(&objs),
        [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "ServiceAccount"
        ],
        "{report}"
    );
    let deploy = find(&objs, "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 1);
    // No custom resource watching: no RBAC, no API token in the pod.
    assert_eq!(
        deploy["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(env_var(&objs, "RATETHROTTLE_KUBERNETES"), None);
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_STORAGE"),
        Some(json!("memory"))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_CONFIG"),
        Some(json!("/etc/ratethrottle"))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_GRPC_ADDR"),
        Some(json!("0.0.0.0:8081"))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_ADMIN_ADDR"),
        Some(json!("0.0.0.0:8080"))
    );
    assert_eq!(env_var(&objs, "RATETHROTTLE_REDIS_PASSWORD"), None);
    assert_eq!(env_var(&objs, "RATETHROTTLE_ADMIN_TOKEN"), None);
    assert_eq!(container(&objs)["args"], json!(["serve"]));
    // The ConfigMap is mounted where RATETHROTTLE_CONFIG points.
    let mounts = &container(&objs)["volumeMounts"];
    assert_eq!(mounts[0]["mountPath"], "/etc/ratethrottle");
    assert_eq!(mounts[0]["readOnly"], true);
    let volumes = &deploy["spec"]["template"]["spec"]["volumes"];
    assert_eq!(volumes[0]["name"], mounts[0]["name"]);
    assert_eq!(
        volumes[0]["configMap"]["name"],
        config_map(&objs)["metadata"]["name"]
    );
}

#[test]
fn everything_on_renders_valid_objects_including_the_crds() {
    let crds = crd_files();
    let yaml = template("edge", &["-f", FULL_VALUES, "--include-crds"]);
    assert_valid(&yaml, &crds);
    let objs = objects(&yaml);
    assert_eq!(
        kinds(&objs),
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
    // The HPA owns the replica count.
    let deploy = find(&objs, "Deployment");
    assert!(deploy["spec"].get("replicas").is_none(), "{deploy}");
    let hpa = find(&objs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deploy["metadata"]["name"]
    );
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert_eq!(hpa["spec"]["maxReplicas"], 12);
    assert_eq!(hpa["spec"]["metrics"].as_array().expect("metrics").len(), 2);
    let pdb = find(&objs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert!(pdb["spec"].get("maxUnavailable").is_none());
    // The ServiceMonitor scrapes the Service's admin port.
    let sm = find(&objs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "admin");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    // The Grafana dashboard ConfigMap carries the chart's dashboard and the sidecar label.
    let board = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"].get("ratethrottle.json").is_some())
        .expect("dashboard ConfigMap");
    assert_eq!(board["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(
        board["metadata"]["annotations"]["grafana_folder"],
        "ratethrottle"
    );
    let shipped = std::fs::read_to_string(root().join(CHART).join("dashboards/ratethrottle.json"))
        .expect("dashboard");
    assert_eq!(
        serde_json::from_str::<Value>(board["data"]["ratethrottle.json"].as_str().expect("str"))
            .expect("dashboard json"),
        serde_json::from_str::<Value>(&shipped).expect("shipped json")
    );
    let svc = find(&objs, "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    for (k, v) in sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor selects {k}"
        );
    }
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(
        pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"],
        "a constraint without a selector gets the pods'"
    );
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    let annotations = &deploy["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["example.com/team"], "platform");
    assert_eq!(
        container(&objs)["args"],
        json!(["serve", "--reload-interval-ms", "5000"])
    );
    assert_eq!(env_var(&objs, "TZ"), Some(json!("UTC")));
    assert!(
        container(&objs)["startupProbe"]["httpGet"]["path"] == "/healthz",
        "{}",
        container(&objs)
    );
}

#[test]
fn probes_ports_and_service() {
    let objs = objects(&template("rt", &[]));
    let c = container(&objs);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
    assert!(c.get("startupProbe").is_none(), "startup probe is opt-in");
    assert_eq!(
        c["ports"],
        json!([
            {"name": "grpc", "containerPort": 8081, "protocol": "TCP"},
            {"name": "admin", "containerPort": 8080, "protocol": "TCP"}
        ])
    );
    let svc = find(&objs, "Service");
    assert_eq!(svc["metadata"]["name"], "ratethrottle");
    assert_eq!(
        svc["spec"]["ports"],
        json!([
            {"name": "grpc", "port": 8081, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
            {"name": "admin", "port": 8080, "targetPort": "admin", "protocol": "TCP", "appProtocol": "http"}
        ])
    );
    let deploy = find(&objs, "Deployment");
    assert_eq!(
        svc["spec"]["selector"],
        deploy["spec"]["selector"]["matchLabels"]
    );
    // Every selector label is on the pods.
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&deploy["spec"]["template"]["metadata"]["labels"][k], v);
    }

    let objs = objects(&template(
        "rt",
        &["--set", "ports.grpc=9001", "--set", "ports.admin=9000"],
    ));
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_GRPC_ADDR"),
        Some(json!("0.0.0.0:9001"))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_ADMIN_ADDR"),
        Some(json!("0.0.0.0:9000"))
    );
    assert_eq!(container(&objs)["ports"][0]["containerPort"], 9001);
}

#[test]
fn pods_run_restricted() {
    for extra in [&[][..], &["-f", FULL_VALUES][..]] {
        let objs = objects(&template("rt", extra));
        let c = &container(&objs)["securityContext"];
        assert_eq!(c["runAsNonRoot"], true);
        assert_eq!(c["runAsUser"], 65532);
        assert_eq!(c["readOnlyRootFilesystem"], true);
        assert_eq!(c["allowPrivilegeEscalation"], false);
        assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
        assert!(c["capabilities"].get("add").is_none());
        assert_eq!(c["seccompProfile"]["type"], "RuntimeDefault");
        let pod = &find(&objs, "Deployment")["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(pod["runAsNonRoot"], true);
        assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
    }
}

/// The two rules the watcher needs, and nothing more.
fn least_privilege() -> Value {
    json!([
        {"apiGroups": ["ratethrottle.io"], "resources": ["ratelimitpolicies", "accesslists"], "verbs": ["list", "watch"]},
        {"apiGroups": ["ratethrottle.io"], "resources": ["ratelimitpolicies/status", "accesslists/status"], "verbs": ["patch"]}
    ])
}

#[test]
fn rbac_is_namespaced_and_least_privilege_by_default() {
    let yaml = template("rt", &["--set", "kubernetes.enabled=true"]);
    assert_valid(&yaml, &[]);
    let objs = objects(&yaml);
    let k = kinds(&objs);
    assert!(!k.iter().any(|k| k.starts_with("Cluster")), "{k:?}");
    let role = find(&objs, "Role");
    assert_eq!(role["metadata"]["namespace"], "rt");
    assert_eq!(role["rules"], least_privilege());
    let binding = find(&objs, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "rt");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]})
    );
    let sa = find(&objs, "ServiceAccount");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "rt"}])
    );
    let deploy = find(&objs, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_KUBERNETES"),
        Some(json!("true"))
    );
    assert_eq!(env_var(&objs, "RATETHROTTLE_NAMESPACE"), Some(json!("rt")));
    assert_eq!(env_var(&objs, "RATETHROTTLE_ALL_NAMESPACES"), None);
    assert_eq!(env_var(&objs, "RATETHROTTLE_SELECTOR"), None);

    // Another namespace: the Role goes there, the binding names the release's ServiceAccount.
    let objs = objects(&template(
        "rt",
        &[
            "--set",
            "kubernetes.enabled=true",
            "--set",
            "kubernetes.namespace=apps",
            "--set",
            "kubernetes.selector=team=payments",
        ],
    ));
    assert_eq!(find(&objs, "Role")["metadata"]["namespace"], "apps");
    assert_eq!(find(&objs, "RoleBinding")["metadata"]["namespace"], "apps");
    assert_eq!(find(&objs, "RoleBinding")["subjects"][0]["namespace"], "rt");
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_NAMESPACE"),
        Some(json!("apps"))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_SELECTOR"),
        Some(json!("team=payments"))
    );

    // rbac.create=false: the watcher runs, the RBAC is the user's.
    let objs = objects(&template(
        "rt",
        &[
            "--set",
            "kubernetes.enabled=true",
            "--set",
            "kubernetes.rbac.create=false",
        ],
    ));
    assert!(!kinds(&objs).iter().any(|k| k.contains("Role")));
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_KUBERNETES"),
        Some(json!("true"))
    );
}

#[test]
fn cluster_role_only_when_watching_all_namespaces() {
    let objs = objects(&template(
        "rt",
        &[
            "--set",
            "kubernetes.enabled=true",
            "--set",
            "kubernetes.watchAllNamespaces=true",
        ],
    ));
    let k = kinds(&objs);
    assert!(!k.contains(&"Role".to_string()), "{k:?}");
    assert!(!k.contains(&"RoleBinding".to_string()), "{k:?}");
    let role = find(&objs, "ClusterRole");
    assert!(role["metadata"].get("namespace").is_none());
    assert_eq!(role["rules"], least_privilege());
    // Cluster-wide names carry the namespace: two releases of one name don't collide.
    assert_eq!(role["metadata"]["name"], "rt-ratethrottle");
    let binding = find(&objs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["namespace"], "rt");
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_ALL_NAMESPACES"),
        Some(json!("true"))
    );
    assert_eq!(env_var(&objs, "RATETHROTTLE_NAMESPACE"), None);

    // Without kubernetes.enabled, watchAllNamespaces grants nothing.
    let objs = objects(&template(
        "rt",
        &["--set", "kubernetes.watchAllNamespaces=true"],
    ));
    assert!(!kinds(&objs).iter().any(|k| k.contains("Role")));
}

#[test]
fn storage_and_secrets_reach_the_container() {
    // Full values: sentinel URL, password from an existing Secret, inline admin token.
    let objs = objects(&template("edge", &["-f", FULL_VALUES]));
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_STORAGE"),
        Some(json!(
            "redis-sentinel://redis-sentinel-0.redis:26379,redis-sentinel-1.redis:26379/mymaster"
        ))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_REDIS_PASSWORD"),
        Some(json!({"secretKeyRef": {"name": "redis-auth", "key": "password"}}))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_ADMIN_TOKEN"),
        Some(json!({"secretKeyRef": {"name": "ratethrottle", "key": "admin-token"}}))
    );
    let secret = find(&objs, "Secret");
    assert_eq!(
        secret["data"],
        json!({"admin-token": "Y2hhbmdlLW1lLWFkbWluLXRva2Vu"}),
        "only the inline value; the Redis password stays in its own Secret"
    );
    let annotations = &find(&objs, "Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert!(annotations["checksum/secret"].is_string(), "{annotations}");

    // Inline password, cluster URL.
    let objs = objects(&template(
        "rt",
        &[
            "--set",
            "storage.url=redis-cluster://r-0:6379\\,r-1:6379",
            "--set",
            "storage.redisPassword.value=pw",
        ],
    ));
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_STORAGE"),
        Some(json!("redis-cluster://r-0:6379,r-1:6379"))
    );
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_REDIS_PASSWORD"),
        Some(json!({"secretKeyRef": {"name": "ratethrottle", "key": "redis-password"}}))
    );
    assert_eq!(
        find(&objs, "Secret")["data"],
        json!({"redis-password": "cHc="})
    );
    assert_eq!(env_var(&objs, "RATETHROTTLE_ADMIN_TOKEN"), None);

    // An existing Secret wins over an inline value: no chart Secret.
    let objs = objects(&template(
        "rt",
        &[
            "--set",
            "storage.url=redis://redis:6379/0",
            "--set",
            "storage.redisPassword.value=pw",
            "--set",
            "storage.redisPassword.existingSecret=mine",
        ],
    ));
    assert!(!kinds(&objs).contains(&"Secret".to_string()));
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_REDIS_PASSWORD"),
        Some(json!({"secretKeyRef": {"name": "mine", "key": "redis-password"}}))
    );
}

/// The files of the rendered ConfigMap.
fn config_files(objs: &[Value]) -> Vec<(String, String)> {
    config_map(objs)["data"]
        .as_object()
        .expect("data")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string").to_string()))
        .collect()
}

/// `ratethrottle config validate` on the ConfigMap's files written to a directory.
fn assert_config_valid(objs: &[Value]) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in config_files(objs) {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(dir.path())
        .output()
        .expect("run ratethrottle");
    assert!(
        out.status.success(),
        "rendered config is invalid:\n{}\n{:?}",
        text(&out),
        config_files(objs)
    );
}

#[test]
fn config_map_holds_the_settings_and_domains_and_they_load() {
    let objs = objects(&template("rt", &[]));
    let files = config_files(&objs);
    assert_eq!(
        files,
        [(
            "ratethrottle.yaml".to_string(),
            "settings:\n  default_algorithm: fixed_window\n".to_string()
        )]
    );
    assert_config_valid(&objs);

    let objs = objects(&template("edge", &["-f", FULL_VALUES]));
    let files = config_files(&objs);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["edge.yaml", "example.yaml", "ratethrottle.yaml"]);
    // The key names the domain when the value has no `domain:`.
    assert!(files[0].1.contains("domain: edge\n"), "{}", files[0].1);
    assert!(files[2].1.contains("authz:\n"), "{}", files[2].1);
    assert!(files[2].1.contains("settings:\n"), "{}", files[2].1);
    assert_config_valid(&objs);

    // A broken rule in values is caught by the same check (so the check can fail).
    let objs = objects(&template(
        "rt",
        &[
            "--set",
            "config.domains.bad.descriptors[0].key=a",
            "--set",
            "config.domains.bad.descriptors[0].rate_limit.unit=fortnight",
        ],
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in config_files(&objs) {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(dir.path())
        .output()
        .expect("run ratethrottle");
    assert!(!out.status.success(), "{}", text(&out));

    // existingConfigMap: no ConfigMap rendered, the pods mount the named one.
    let objs = objects(&template(
        "rt",
        &["--set", "config.existingConfigMap=my-rules"],
    ));
    assert!(!kinds(&objs).contains(&"ConfigMap".to_string()));
    assert_eq!(
        find(&objs, "Deployment")["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"],
        "my-rules"
    );
}

#[test]
fn config_changes_do_not_roll_pods_unless_asked() {
    let pod_meta = |extra: &[&str]| -> Value {
        let objs = objects(&template("rt", extra));
        find(&objs, "Deployment")["spec"]["template"]["metadata"].clone()
    };
    let a = pod_meta(&["--set", "config.settings.default_algorithm=gcra"]);
    let b = pod_meta(&["--set", "config.settings.default_algorithm=token_bucket"]);
    assert_eq!(
        a, b,
        "hot reload: the pod template must not change with the config"
    );
    assert!(a.get("annotations").is_none(), "{a}");

    let a = pod_meta(&[
        "--set",
        "config.rollOnChange=true",
        "--set",
        "config.settings.default_algorithm=gcra",
    ]);
    let b = pod_meta(&[
        "--set",
        "config.rollOnChange=true",
        "--set",
        "config.settings.default_algorithm=token_bucket",
    ]);
    let (ca, cb) = (
        &a["annotations"]["checksum/config"],
        &b["annotations"]["checksum/config"],
    );
    assert!(ca.is_string() && cb.is_string(), "{a}");
    assert_ne!(ca, cb);
}

#[test]
fn schema_rejects_bad_values_with_a_message() {
    for (set, expect) in [
        ("replicaCount=-1", "/replicaCount"),
        ("storage.url=ftp://x", "/storage/url"),
        ("storage.url=redis:/x", "/storage/url"),
        ("storage.urll=memory", "urll"),
        ("replicaCount=two", "/replicaCount"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("service.grpcPort=70000", "/service/grpcPort"),
        ("kubernetes.enabled=yes", "/kubernetes/enabled"),
        ("autoscaling.minReplicas=0", "/autoscaling/minReplicas"),
        ("serviceMonitor.interval=soon", "/serviceMonitor/interval"),
        ("grpcThreads=5000", "/grpcThreads"),
        ("grpcThreads=-1", "/grpcThreads"),
        ("grpcThreads=many", "/grpcThreads"),
        ("grpcThreads=2.5", "/grpcThreads"),
    ] {
        for cmd in ["template", "lint"] {
            let args: Vec<&str> = if cmd == "lint" {
                vec!["lint", "--strict", CHART, "--set", set]
            } else {
                vec!["template", "rt", CHART, "--set", set]
            };
            let out = helm(&args);
            let msg = text(&out);
            assert!(
                !out.status.success(),
                "helm {cmd} --set {set} passed:\n{msg}"
            );
            assert!(
                msg.contains("schema") && msg.contains(expect),
                "helm {cmd} --set {set}: unclear message:\n{msg}"
            );
        }
    }
    // Each URL form of the storage is accepted.
    for url in [
        "memory",
        "redis://redis:6379/0",
        "rediss://redis:6380",
        "redis-sentinel://s-0:26379,s-1:26379/mymaster",
        "redis-cluster://r-0:6379,r-1:6379",
    ] {
        // Helm's --set splits on commas: escape them.
        let set = format!("storage.url={}", url.replace(',', "\\,"));
        let objs = objects(&template("rt", &["--set", &set]));
        assert_eq!(env_var(&objs, "RATETHROTTLE_STORAGE"), Some(json!(url)));
    }
}

/// `grpcThreads` reaches the container only when it is a number (`auto`, the default, leaves
/// the binary to count the CPUs its cgroup allows); 0, the shared pool, is a number too.
#[test]
fn grpc_threads_reach_the_container_only_when_set() {
    let objs = objects(&template("rt", &[]));
    assert_eq!(env_var(&objs, "RATETHROTTLE_GRPC_THREADS"), None);
    for n in ["0", "2", "1024"] {
        let set = format!("grpcThreads={n}");
        let objs = objects(&template("rt", &["--set", &set]));
        assert_eq!(env_var(&objs, "RATETHROTTLE_GRPC_THREADS"), Some(json!(n)));
    }
}

#[test]
fn templates_reject_contradictory_values() {
    let msg = template_fails(&[
        "--set",
        "kubernetes.enabled=true",
        "--set",
        "kubernetes.watchAllNamespaces=true",
        "--set",
        "kubernetes.namespace=apps",
    ]);
    assert!(
        msg.contains("kubernetes.namespace and kubernetes.watchAllNamespaces"),
        "{msg}"
    );
    let msg = template_fails(&["--set", "storage.redisPassword.value=pw"]);
    assert!(msg.contains("storage.url is memory"), "{msg}");
    let msg = template_fails(&[
        "--set",
        "autoscaling.enabled=true",
        "--set",
        "autoscaling.minReplicas=5",
        "--set",
        "autoscaling.maxReplicas=2",
    ]);
    assert!(
        msg.contains("minReplicas (5) is above autoscaling.maxReplicas (2)"),
        "{msg}"
    );
    let msg = template_fails(&["--set", "config.domains.ratethrottle.descriptors[0].key=a"]);
    assert!(msg.contains("taken by the settings file"), "{msg}");
}

/// NOTES.txt as `helm install --dry-run=client` prints it.
fn notes(extra: &[&str]) -> String {
    let mut args = vec![
        "install",
        "ratethrottle",
        CHART,
        "--namespace",
        "edge",
        "--dry-run=client",
    ];
    args.extend_from_slice(extra);
    let out = helm(&args);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    all.split_once("NOTES:")
        .unwrap_or_else(|| panic!("no NOTES:\n{all}"))
        .1
        .to_string()
}

#[test]
fn notes_show_envoy_config_pointing_at_the_service() {
    let n = notes(&[]);
    for want in [
        "address: ratethrottle.edge.svc.cluster.local, port_value: 8081",
        "name: envoy.filters.http.ratelimit",
        "transport_api_version: V3",
        "envoy_grpc: { cluster_name: ratethrottle }",
        "name: envoy.filters.http.ext_authz",
        "http2_protocol_options",
    ] {
        assert!(n.contains(want), "NOTES lack {want:?}:\n{n}");
    }
    assert!(!n.contains("WARNING"), "{n}");

    // Memory storage with more than one replica (or an autoscaler) is warned about...
    for extra in [
        &["--set", "replicaCount=3"][..],
        &["--set", "autoscaling.enabled=true"][..],
    ] {
        let n = notes(extra);
        assert!(
            n.contains("WARNING: storage is `memory` with more than one replica"),
            "{n}"
        );
    }
    // ...not with Redis.
    let n = notes(&[
        "--set",
        "replicaCount=3",
        "--set",
        "storage.url=redis://redis:6379",
    ]);
    assert!(!n.contains("WARNING"), "{n}");
    assert!(n.contains("storage: redis"), "{n}");
    // The domain of config.domains is filled in.
    let n = notes(&["--set", "config.domains.shop.descriptors[0].key=a"]);
    assert!(n.contains("domain: shop"), "{n}");
}

#[test]
fn plain_manifests_are_the_chart_rendered() {
    let file = root().join("k8s/manifests/ratethrottle.yaml");
    let committed = std::fs::read_to_string(&file).expect("read k8s/manifests/ratethrottle.yaml");
    let out = Command::new("bash")
        .args(["scripts/render-manifests.sh", "-"])
        .current_dir(root())
        .env("RATETHROTTLE_TEST_HELM", helm_bin())
        .output()
        .expect("run render-manifests.sh");
    assert!(out.status.success(), "{}", text(&out));
    let fresh = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        committed == fresh,
        "k8s/manifests/ratethrottle.yaml is stale: run `bash scripts/render-manifests.sh` and commit it"
    );
    // The script's output is exactly the documented helm command after the Namespace.
    let rendered = template("ratethrottle", &["--set", "kubernetes.enabled=true"]);
    assert!(
        committed.ends_with(&rendered),
        "not the helm template output"
    );
    assert!(committed.contains(
        "helm template ratethrottle charts/ratethrottle --namespace ratethrottle --set kubernetes.enabled=true"
    ));
    assert_valid(&committed, &[]);
    let objs = objects(&committed);
    assert_eq!(objs[0]["kind"], "Namespace");
    assert_eq!(objs[0]["metadata"]["name"], "ratethrottle");
    for o in &objs[1..] {
        let ns = &o["metadata"]["namespace"];
        assert!(
            ns == "ratethrottle" || o["kind"].as_str().is_some_and(|k| k.starts_with("Cluster")),
            "{} outside the namespace",
            o["metadata"]["name"]
        );
    }
    assert_eq!(find(&objs, "Role")["rules"], least_privilege());
}

#[test]
fn sidecar_example_is_valid_kubernetes_envoy_and_ratethrottle_config() {
    let file = root().join("k8s/examples/sidecar/deployment.yaml");
    let (ok, report) = validate_files(&[&file], &[]);
    assert!(ok, "{report}");
    let objs = objects(&std::fs::read_to_string(&file).expect("read"));
    let deploy = find(&objs, "Deployment");
    let containers = deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let names: Vec<&str> = containers
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["envoy", "ratethrottle"]);
    let rt = &containers[1];
    let grpc = rt["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "RATETHROTTLE_GRPC_ADDR")
        .expect("RATETHROTTLE_GRPC_ADDR");
    assert_eq!(grpc["value"], "127.0.0.1:8081");
    assert_eq!(rt["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(rt["livenessProbe"]["httpGet"]["path"], "/healthz");

    let configmaps: Vec<&Value> = objs.iter().filter(|o| o["kind"] == "ConfigMap").collect();
    assert_eq!(configmaps.len(), 2);
    let dir = tempfile::tempdir().expect("tempdir");
    // Envoy's config: `envoy --mode validate`, pointing at the pod's own ratethrottle.
    let envoy_yaml = configmaps[0]["data"]["envoy.yaml"]
        .as_str()
        .expect("envoy.yaml");
    assert!(envoy_yaml.contains("address: 127.0.0.1, port_value: 8081"));
    let envoy_file = dir.path().join("envoy.yaml");
    std::fs::write(&envoy_file, envoy_yaml).expect("write");
    let envoy = std::env::var_os("RATETHROTTLE_TEST_ENVOY").unwrap_or_else(|| {
        panic!("RATETHROTTLE_TEST_ENVOY is not set: run the tests with `bash scripts/test.sh`")
    });
    let out = Command::new(envoy)
        .args(["--mode", "validate", "-c"])
        .arg(&envoy_file)
        .output()
        .expect("run envoy");
    assert!(
        out.status.success(),
        "envoy rejects the sidecar config:\n{}",
        text(&out)
    );
    // ratethrottle's files: `ratethrottle config validate`.
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).expect("mkdir");
    for (name, content) in configmaps[1]["data"].as_object().expect("data") {
        std::fs::write(rules.join(name), content.as_str().expect("string")).expect("write");
    }
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&rules)
        .output()
        .expect("run ratethrottle");
    assert!(out.status.success(), "{}", text(&out));
    // The volumes mount those ConfigMaps.
    let volumes = deploy["spec"]["template"]["spec"]["volumes"].to_string();
    for cm in &configmaps {
        assert!(
            volumes.contains(&cm["metadata"]["name"].to_string()),
            "{volumes}"
        );
    }
}

/// The entries of `dir`, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    paths.sort();
    paths
}

#[test]
fn example_custom_resources_validate_against_the_crds() {
    let crds = crd_files();
    let dir = root().join("k8s/examples/kubernetes");
    let files: Vec<PathBuf> = listing(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate_files(&refs, &crds);
    assert!(ok, "{report}");
    // Every custom resource kind of the CRDs is exemplified.
    for kind in ["RateLimitPolicy", "AccessList"] {
        assert!(
            report.contains(&format!("{kind} ")),
            "no {kind} example:\n{report}"
        );
    }
}

#[test]
fn chart_crds_are_the_generated_ones() {
    let generated = crd_files();
    let chart_dir = root().join("charts/ratethrottle/crds");
    let in_chart: Vec<String> = listing(&chart_dir)
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    let mut expected: Vec<String> = CRD_NAMES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        in_chart, expected,
        "charts/ratethrottle/crds must hold exactly the generated CRDs"
    );
    for path in generated {
        let name = path.file_name().expect("name");
        let a = std::fs::read(&path).expect("read");
        let b = std::fs::read(chart_dir.join(name)).expect("read");
        assert!(
            a == b,
            "charts/ratethrottle/crds/{} differs from k8s/crds/",
            name.to_string_lossy()
        );
    }
    // And they are valid CustomResourceDefinitions.
    let refs: Vec<PathBuf> = crd_files();
    let paths: Vec<&Path> = refs.iter().map(PathBuf::as_path).collect();
    let (ok, report) = validate_files(&paths, &[]);
    assert!(ok, "{report}");
}

#[test]
fn validator_reports_bad_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        // An unknown field (strict).
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndatta: {}\n",
            "datta",
        ),
        // A wrong type.
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: http}]}\n",
            "spec.ports.0.port",
        ),
        // A kind without schema or CRD is an error, not skipped.
        (
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a}\n",
            "no schema",
        ),
        // A ServiceMonitor is checked structurally.
        (
            "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: a}\nspec: {selector: {matchLabels: {a: b}}, endpoints: [{port: admin, interval: soon}]}\n",
            "interval",
        ),
    ];
    for (i, (yaml, expect)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&file, yaml).expect("write");
        let (ok, report) = validate_files(&[&file], &[]);
        assert!(!ok, "accepted:\n{yaml}\n{report}");
        assert!(
            report.contains("ERROR") && report.contains(expect),
            "{report}"
        );
    }
    // A custom resource against a CRD: unknown fields, wrong group version.
    let crd = dir.path().join("crd.yaml");
    std::fs::write(
        &crd,
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec:\n  group: example.com\n  names: {kind: Widget, plural: widgets}\n  scope: Namespaced\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            required: [size]\n            properties:\n              size: {type: integer}\n              note: {type: string, nullable: true}\n",
    )
    .expect("write");
    let crds = [crd.clone()];
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a, namespace: b}\nspec: {size: 1, note: null}\n",
    )
    .expect("write");
    let (ok, report) = validate_files(&[&good], &crds);
    assert!(ok, "{report}");
    for (yaml, expect) in [
        (
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a}\nspec: {size: 1, colour: red}\n",
            "colour",
        ),
        (
            "apiVersion: example.com/v2\nkind: Widget\nmetadata: {name: a}\nspec: {size: 1}\n",
            "served versions",
        ),
        (
            "apiVersion: other.com/v1\nkind: Widget\nmetadata: {name: a}\nspec: {size: 1}\n",
            "group",
        ),
        (
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a}\nspec: {size: one}\n",
            "spec.size",
        ),
        (
            "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: A_}\nspec: {size: 1}\n",
            "metadata.name",
        ),
    ] {
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, yaml).expect("write");
        let (ok, report) = validate_files(&[&bad], &crds);
        assert!(!ok, "accepted:\n{yaml}\n{report}");
        assert!(report.contains(expect), "{report}");
    }
}

/// A `ratethrottle serve` started from a rendered Deployment's container, killed on drop.
struct Served {
    child: std::process::Child,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET against the admin port: (status, body).
fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {resp}"));
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Runs the binary with exactly the rendered container's args and env, except: the config
/// directory is the ConfigMap's files in a temp dir, both listeners are on loopback port 0,
/// the Kubernetes watcher variables are dropped (no cluster here), `storage` replaces the
/// storage URL when given, and Secret references resolve through `secrets`. Waits for
/// /readyz to answer 200.
fn serve_rendered(objs: &[Value], storage: Option<&str>, secrets: &[(&str, &str, &str)]) -> Served {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in config_files(objs) {
        std::fs::write(dir.path().join(name), content).expect("write");
    }
    let c = container(objs);
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string").to_string())
        .collect();
    let mut cmd = Command::new(BIN);
    cmd.args(&args).env_clear();
    for (name, value) in env(objs) {
        let value = match name.as_str() {
            "RATETHROTTLE_KUBERNETES"
            | "RATETHROTTLE_NAMESPACE"
            | "RATETHROTTLE_ALL_NAMESPACES"
            | "RATETHROTTLE_SELECTOR" => continue,
            "RATETHROTTLE_CONFIG" => dir.path().to_string_lossy().into_owned(),
            "RATETHROTTLE_GRPC_ADDR" | "RATETHROTTLE_ADMIN_ADDR" => "127.0.0.1:0".to_string(),
            "RATETHROTTLE_STORAGE" if storage.is_some() => storage.expect("some").to_string(),
            _ => match &value {
                Value::String(s) => s.clone(),
                _ => {
                    let r = &value["secretKeyRef"];
                    secrets
                        .iter()
                        .find(|(s, k, _)| r["name"] == *s && r["key"] == *k)
                        .unwrap_or_else(|| panic!("{name}: unexpected secret {r}"))
                        .2
                        .to_string()
                }
            },
        };
        cmd.env(name, value);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ratethrottle");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut served = Served {
        child,
        admin: String::new(),
        _dir: dir,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while served.admin.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no `listening` line from {args:?}"));
        if let Some(admin) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
        {
            served.admin = admin.to_string();
        }
    }
    loop {
        if http_get(&served.admin, "/readyz", None).0 == 200 {
            return served;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered 200"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_rendered_container_starts_the_binary() {
    // Defaults: memory storage, the default settings file, no admin token.
    let objs = objects(&template("rt", &[]));
    let served = serve_rendered(&objs, None, &[]);
    assert_eq!(http_get(&served.admin, "/healthz", None).0, 200);
    let (status, metrics) = http_get(&served.admin, "/metrics", None);
    assert_eq!(status, 200);
    assert!(metrics.contains("ratethrottle"), "{metrics}");
    assert_eq!(http_get(&served.admin, "/v1/lists", Some("x")).0, 404);
    drop(served);

    // Everything on, against the test Redis that needs a password: the URL without it, the
    // password from the (existing) Secret, the admin token from the chart's Secret, the extra
    // args, the authz block and the domains of the values.
    let auth_url = std::env::var("RATETHROTTLE_TEST_REDIS_AUTH_URL").unwrap_or_else(|_| {
        panic!(
            "RATETHROTTLE_TEST_REDIS_AUTH_URL is not set: run the tests with `bash scripts/test.sh`"
        )
    });
    let (password, host) = auth_url
        .strip_prefix("redis://:")
        .and_then(|rest| rest.split_once('@'))
        .unwrap_or_else(|| panic!("unexpected {auth_url}"));
    let url = format!("redis://{host}");
    let objs = objects(&template("edge", &["-f", FULL_VALUES]));
    let served = serve_rendered(
        &objs,
        Some(&url),
        &[
            ("redis-auth", "password", password),
            ("ratethrottle", "admin-token", "change-me-admin-token"),
        ],
    );
    let (status, body) = http_get(&served.admin, "/v1/lists", Some("change-me-admin-token"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"store\":\"redis\""), "{body}");
    assert!(
        body.contains("203.0.113.0/24"),
        "the authz block's list: {body}"
    );
    assert_eq!(http_get(&served.admin, "/v1/lists", Some("wrong")).0, 401);
    let (status, config) = http_get(&served.admin, "/v1/config", None);
    assert_eq!(status, 200);
    for domain in ["\"edge\"", "\"example\""] {
        assert!(config.contains(domain), "{domain} not loaded: {config}");
    }
}

/// The settable values: the paths of values.schema.json's closed objects, down to the values
/// that are scalars, lists or free-form maps in values.yaml.
fn value_paths(schema: &Value, values: &Value, prefix: &str, out: &mut Vec<String>) {
    for (key, sub) in schema["properties"].as_object().expect("properties") {
        if prefix.is_empty() && key == "global" {
            continue;
        }
        let path = format!("{prefix}{key}");
        let default = &values[key.as_str()];
        assert!(
            !default.is_null(),
            "{path} is in the schema but has no default in values.yaml"
        );
        let closed = sub["additionalProperties"] == false
            && sub["properties"]
                .as_object()
                .is_some_and(|p| p.keys().all(|k| default.get(k).is_some()));
        if closed {
            value_paths(sub, default, &format!("{path}."), out);
        } else {
            out.push(path);
        }
    }
}

#[test]
fn every_value_is_in_the_schema_commented_and_documented() {
    let dir = root().join(CHART);
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("values.schema.json")).expect("schema"),
    )
    .expect("schema json");
    let values_yaml = std::fs::read_to_string(dir.join("values.yaml")).expect("values");
    let values = objects(&values_yaml).remove(0);
    let mut paths = Vec::new();
    value_paths(&schema, &values, "", &mut paths);
    assert!(paths.len() > 50, "{paths:?}");

    // Every key of values.yaml is in the schema (closed objects), so the schema's paths are all.
    fn keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(m) = v {
            for (k, sub) in m {
                out.push(format!("{prefix}{k}"));
                keys(sub, &format!("{prefix}{k}."), out);
            }
        }
    }
    let mut all = Vec::new();
    keys(&values, "", &mut all);
    for p in &paths {
        assert!(all.contains(p), "{p} missing from values.yaml");
    }

    // The comment right above each value's line.
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut comment = false;
    let mut commented = Vec::new();
    for line in values_yaml.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            comment = false;
            continue;
        }
        if trimmed.starts_with('#') {
            comment = true;
            continue;
        }
        let Some((key, _)) = trimmed.split_once(':') else {
            comment = false;
            continue;
        };
        if key.starts_with('-') || key.contains(' ') {
            comment = false;
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key.to_string()));
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        if comment {
            commented.push(path.join("."));
        }
        comment = false;
    }
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README");
    for p in &paths {
        assert!(
            commented.contains(p),
            "values.yaml: {p} has no comment above it"
        );
        assert!(
            readme.contains(&format!("| `{p}` |")),
            "README.md: {p} is not in the values table"
        );
    }
}

#[test]
fn alerts_settings_secrets_and_the_prometheus_rule_render() {
    let args = [
        "--set",
        "config.alerts.sinks[0].type=slack",
        "--set",
        "config.alerts.sinks[0].url=env:RATETHROTTLE_ALERT_SLACK_URL",
        "--set",
        "config.alerts.sinks[1].type=webhook",
        "--set",
        "config.alerts.sinks[1].url=http://hooks.example/alert",
        "--set",
        "config.alerts.sinks[1].hmac_key=env:HOOK_KEY",
        "--set",
        "alertSecrets[0].env=RATETHROTTLE_ALERT_SLACK_URL",
        "--set",
        "alertSecrets[0].value=https://hooks.slack.com/services/T/B/X",
        "--set",
        "alertSecrets[1].env=HOOK_KEY",
        "--set",
        "alertSecrets[1].existingSecret=alert-hooks",
        "--set",
        "alertSecrets[1].existingSecretKey=hmac",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=prometheus",
    ];
    let yaml = template("rt", &args);
    assert_valid(&yaml, &crd_files());
    let objs = objects(&yaml);
    // The secrets reach the process as the variables the `env:` references name.
    assert_eq!(
        env_var(&objs, "RATETHROTTLE_ALERT_SLACK_URL"),
        Some(
            json!({"secretKeyRef": {"name": "ratethrottle", "key": "RATETHROTTLE_ALERT_SLACK_URL"}})
        )
    );
    assert_eq!(
        env_var(&objs, "HOOK_KEY"),
        Some(json!({"secretKeyRef": {"name": "alert-hooks", "key": "hmac"}}))
    );
    assert_eq!(
        find(&objs, "Secret")["data"],
        json!({"RATETHROTTLE_ALERT_SLACK_URL": "aHR0cHM6Ly9ob29rcy5zbGFjay5jb20vc2VydmljZXMvVC9CL1g="})
    );
    // The settings file carries the block, only references, and it loads.
    let files = config_files(&objs);
    let settings = &files
        .iter()
        .find(|(n, _)| n == "ratethrottle.yaml")
        .expect("settings")
        .1;
    assert!(settings.contains("alerts:\n"), "{settings}");
    assert!(!settings.contains("hooks.slack.com"), "{settings}");
    assert_config_valid(&objs);
    // The PrometheusRule holds exactly the rules file that promtool tests (tests/alerts.rs).
    let rule = find(&objs, "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    let shipped = objects(
        &std::fs::read_to_string(root().join(CHART).join("rules/ratethrottle.rules.yaml"))
            .expect("rules file"),
    );
    assert_eq!(rule["spec"]["groups"], shipped[0]["groups"]);
    let names: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(|r| r["alert"].as_str().expect("alert"))
        .collect();
    assert!(names.contains(&"RatethrottleStorageDegraded"), "{names:?}");
    assert!(names.contains(&"RatethrottleAlertSinkDead"), "{names:?}");
    // Off by default; a secret without a source is refused.
    assert!(!kinds(&objects(&template("rt", &[]))).contains(&"PrometheusRule".to_string()));
    let out = template_fails(&["--set", "alertSecrets[0].env=X"]);
    assert!(
        out.contains("alertSecrets: X needs existingSecret or value"),
        "{out}"
    );
}
