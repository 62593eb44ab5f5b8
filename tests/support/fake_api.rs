//! A small Kubernetes API server for the two ratethrottle kinds, speaking real HTTP list +
//! watch the way kube-apiserver does, so the sidecar's real kube client runs against it.
//!
//! What it models: a global resourceVersion; lists (with `labelSelector` equality terms);
//! watches from a resourceVersion replaying history, then live ADDED/MODIFIED/DELETED, with
//! BOOKMARKs and a server-side watch timeout; expiry as the real server signals it — a 200
//! watch response carrying an in-stream `ERROR` event with a 410 `Status` — both for a
//! running watch and for a watch that asks for a compacted resourceVersion; the status
//! subresource with JSON merge patch; an outage (connections refused, in-flight watches
//! cut). It counts lists, watches and status patches so tests can assert on them.
#![allow(dead_code)]

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

const GROUP_VERSION: &str = "ratethrottle.io/v1alpha1";

pub const POLICIES: &str = "ratelimitpolicies";
pub const ACCESS_LISTS: &str = "accesslists";

fn kind_of(plural: &str) -> Option<&'static str> {
    match plural {
        POLICIES => Some("RateLimitPolicy"),
        ACCESS_LISTS => Some("AccessList"),
        _ => None,
    }
}

#[derive(Clone, Debug)]
struct Event {
    plural: String,
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Db {
    rv: u64,
    uid: u64,
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    history: Vec<Event>,
    /// Watches from below this resourceVersion (per plural) get 410.
    compacted: HashMap<String, u64>,
    lists: HashMap<String, u32>,
    watches: HashMap<String, u32>,
    patches: HashMap<(String, String, String), u32>,
}

struct Inner {
    db: Mutex<Db>,
    events: broadcast::Sender<Event>,
    /// Sends a plural: its running watches get an in-stream 410 and end.
    expire: broadcast::Sender<String>,
    /// Bumped to cut every running watch (outage).
    epoch: watch::Sender<u64>,
    up: AtomicBool,
    /// Without the CRDs the API server answers 404 for the kinds.
    crds: AtomicBool,
    /// Status patches wait this long before being handled (a hanging API server).
    patch_delay: Mutex<Duration>,
    watch_timeout: Mutex<Duration>,
}

/// The fake API server; stops on drop.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

type Params = Query<HashMap<String, String>>;

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let inner = Arc::new(Inner {
            db: Mutex::new(Db {
                rv: 100,
                ..Db::default()
            }),
            events: broadcast::channel(1024).0,
            expire: broadcast::channel(16).0,
            epoch: watch::channel(0).0,
            up: AtomicBool::new(true),
            crds: AtomicBool::new(true),
            patch_delay: Mutex::new(Duration::ZERO),
            watch_timeout: Mutex::new(Duration::from_secs(60)),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API server");
        let addr = listener.local_addr().expect("addr");
        let server = FakeApiServer {
            addr,
            inner,
            task: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new()
            .route(
                "/apis/ratethrottle.io/v1alpha1/{plural}",
                get(collection_all),
            )
            .route(
                "/apis/ratethrottle.io/v1alpha1/namespaces/{ns}/{plural}",
                get(collection_ns),
            )
            .route(
                "/apis/ratethrottle.io/v1alpha1/namespaces/{ns}/{plural}/{name}/status",
                axum::routing::patch(patch_status),
            )
            .with_state(self.inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        *self.task.lock().expect("task") = Some(task);
    }

    /// A kubeconfig pointing at this server, with `namespace` as the context's namespace.
    pub fn kubeconfig(&self, dir: &std::path::Path, namespace: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user:\n    token: test-token\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }

    /// Whether the CRDs are installed (without them, lists and watches get 404).
    pub fn set_crds_installed(&self, installed: bool) {
        self.inner.crds.store(installed, Ordering::SeqCst);
    }

    /// Status patches hang this long before they are handled.
    pub fn set_patch_delay(&self, d: Duration) {
        *self.inner.patch_delay.lock().expect("delay") = d;
    }

    /// Watches end after this long (the real server's `--min-request-timeout` behaviour).
    pub fn set_watch_timeout(&self, d: Duration) {
        *self.inner.watch_timeout.lock().expect("timeout") = d;
    }

    /// Creates or updates an object; a changed spec bumps `metadata.generation`.
    pub fn apply(&self, plural: &str, ns: &str, name: &str, labels: Value, spec: Value) {
        let kind = kind_of(plural).expect("known plural");
        let mut db = self.inner.db.lock().expect("db");
        db.rv += 1;
        let rv = db.rv;
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        let (object, event) = match db.objects.get(&key).cloned() {
            Some(mut obj) => {
                if obj["spec"] != spec {
                    let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                    obj["metadata"]["generation"] = json!(g + 1);
                }
                obj["spec"] = spec;
                obj["metadata"]["labels"] = labels;
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                (obj, "MODIFIED")
            }
            None => {
                db.uid += 1;
                let obj = json!({
                    "apiVersion": GROUP_VERSION,
                    "kind": kind,
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "uid": format!("00000000-0000-0000-0000-{:012}", db.uid),
                        "generation": 1,
                        "resourceVersion": rv.to_string(),
                        // Creation order is resourceVersion order, a second apart.
                        "creationTimestamp": format!("2026-01-01T00:{:02}:{:02}Z", (rv / 60) % 60, rv % 60),
                        "labels": labels,
                    },
                    "spec": spec,
                });
                (obj, "ADDED")
            }
        };
        db.objects.insert(key, object.clone());
        self.publish(&mut db, plural, rv, event, object);
    }

    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let mut db = self.inner.db.lock().expect("db");
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        if let Some(mut obj) = db.objects.remove(&key) {
            db.rv += 1;
            let rv = db.rv;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.publish(&mut db, plural, rv, "DELETED", obj);
        }
    }

    fn publish(&self, db: &mut Db, plural: &str, rv: u64, kind: &'static str, object: Value) {
        let e = Event {
            plural: plural.to_string(),
            rv,
            kind,
            object,
        };
        db.history.push(e.clone());
        let _ = self.inner.events.send(e);
    }

    pub fn object(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let db = self.inner.db.lock().expect("db");
        db.objects
            .get(&(plural.to_string(), ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The `Accepted` condition of an object's status, if written.
    pub fn accepted(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        let obj = self.object(plural, ns, name)?;
        obj["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")
            .cloned()
    }

    pub fn lists(&self, plural: &str) -> u32 {
        let db = self.inner.db.lock().expect("db");
        db.lists.get(plural).copied().unwrap_or(0)
    }

    pub fn watches(&self, plural: &str) -> u32 {
        let db = self.inner.db.lock().expect("db");
        db.watches.get(plural).copied().unwrap_or(0)
    }

    pub fn patches(&self, plural: &str, ns: &str, name: &str) -> u32 {
        let db = self.inner.db.lock().expect("db");
        db.patches
            .get(&(plural.to_string(), ns.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Compacts history for `plural` and ends its running watches with an in-stream 410,
    /// as etcd compaction does: the client must relist.
    pub fn expire_watches(&self, plural: &str) {
        {
            let mut db = self.inner.db.lock().expect("db");
            let rv = db.rv + 1;
            db.compacted.insert(plural.to_string(), rv);
        }
        let _ = self.inner.expire.send(plural.to_string());
    }

    /// An outage: running watches are cut, new connections refused, requests on kept-alive
    /// connections answered 503.
    pub fn stop(&self) {
        self.inner.up.store(false, Ordering::SeqCst);
        if let Some(task) = self.task.lock().expect("task").take() {
            task.abort();
        }
        self.inner.epoch.send_modify(|e| *e += 1);
    }

    /// Back on the same address, with the same objects and resourceVersions.
    pub async fn restart(&self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind fake API server");
        self.inner.up.store(true, Ordering::SeqCst);
        self.serve(listener);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().expect("task").take() {
            task.abort();
        }
        self.inner.epoch.send_modify(|e| *e += 1);
    }
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "apiserver down").into_response()
}

async fn collection_all(
    State(inner): State<Arc<Inner>>,
    Path(plural): Path<String>,
    q: Params,
) -> Response {
    collection(inner, None, plural, q.0).await
}

async fn collection_ns(
    State(inner): State<Arc<Inner>>,
    Path((ns, plural)): Path<(String, String)>,
    q: Params,
) -> Response {
    collection(inner, Some(ns), plural, q.0).await
}

/// `a=b,c!=d` equality terms, as much of label selectors as the tests use.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let labels = &object["metadata"]["labels"];
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()].as_str() != Some(v.trim())
        } else if let Some((k, v)) = term.split_once('=') {
            let v = v.trim_start_matches('=');
            labels[k.trim()].as_str() == Some(v.trim())
        } else {
            labels.get(term.trim()).is_some()
        }
    })
}

fn visible(e: &Event, plural: &str, ns: Option<&str>, selector: Option<&String>) -> bool {
    e.plural == plural
        && ns.is_none_or(|ns| e.object["metadata"]["namespace"] == ns)
        && selected(&e.object, selector)
}

async fn collection(
    inner: Arc<Inner>,
    ns: Option<String>,
    plural: String,
    q: HashMap<String, String>,
) -> Response {
    if !inner.up.load(Ordering::SeqCst) {
        return unavailable();
    }
    let Some(kind) = kind_of(&plural).filter(|_| inner.crds.load(Ordering::SeqCst)) else {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "the server could not find the requested resource",
            "reason": "NotFound", "details": {}, "code": 404});
        return (StatusCode::NOT_FOUND, axum::Json(status)).into_response();
    };
    let selector = q.get("labelSelector");
    if q.get("watch").map(String::as_str) != Some("true") {
        let mut db = inner.db.lock().expect("db");
        *db.lists.entry(plural.clone()).or_default() += 1;
        let items: Vec<Value> = db
            .objects
            .iter()
            .filter(|((p, n, _), o)| {
                *p == plural && ns.as_ref().is_none_or(|ns| ns == n) && selected(o, selector)
            })
            .map(|(_, o)| o.clone())
            .collect();
        let body = json!({
            "apiVersion": GROUP_VERSION,
            "kind": format!("{kind}List"),
            "metadata": { "resourceVersion": db.rv.to_string() },
            "items": items,
        });
        return axum::Json(body).into_response();
    }

    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = *inner.watch_timeout.lock().expect("timeout");
    let requested = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(timeout);
    let timeout = timeout.min(requested);
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    let (replay, mut live, gone, current) = {
        let mut db = inner.db.lock().expect("db");
        *db.watches.entry(plural.clone()).or_default() += 1;
        let gone = db.compacted.get(&plural).is_some_and(|c| from < *c);
        let replay: Vec<Event> = db
            .history
            .iter()
            .filter(|e| e.rv > from && visible(e, &plural, ns.as_deref(), selector))
            .cloned()
            .collect();
        // Subscribed under the lock: nothing published after the replay is missed.
        (replay, inner.events.subscribe(), gone, db.rv)
    };
    let mut expire = inner.expire.subscribe();
    let mut epoch = inner.epoch.subscribe();
    let selector = selector.cloned();
    tokio::spawn(async move {
        let line = |v: Value| format!("{v}\n");
        if gone {
            let _ = tx.send(line(expired(from, current))).await;
            return;
        }
        let mut last = from;
        for e in replay {
            last = e.rv;
            let _ = tx
                .send(line(json!({"type": e.kind, "object": e.object})))
                .await;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                e = live.recv() => match e {
                    Ok(e) if e.rv > last && visible(&e, &plural, ns.as_deref(), selector.as_ref()) => {
                        last = e.rv;
                        if tx.send(line(json!({"type": e.kind, "object": e.object}))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                p = expire.recv() => {
                    if p.as_deref() == Ok(plural.as_str()) {
                        let _ = tx.send(line(expired(last, last))).await;
                        return;
                    }
                }
                _ = epoch.changed() => return,
                _ = bookmark.tick() => {
                    let rv = last.max(from);
                    let mark = json!({"type": "BOOKMARK", "object": {
                        "apiVersion": GROUP_VERSION, "kind": kind,
                        "metadata": {"resourceVersion": rv.to_string()}
                    }});
                    if tx.send(line(mark)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => return,
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|l| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(l)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// The in-stream event kube-apiserver sends when a watch's resourceVersion is compacted.
fn expired(requested: u64, current: u64) -> Value {
    json!({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {requested} ({current})"),
        "reason": "Expired", "code": 410
    }})
}

async fn patch_status(
    State(inner): State<Arc<Inner>>,
    Path((ns, plural, name)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let delay = *inner.patch_delay.lock().expect("delay");
    tokio::time::sleep(delay).await;
    if !inner.up.load(Ordering::SeqCst) {
        return unavailable();
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "bad patch").into_response();
    };
    let Some(kind) = kind_of(&plural) else {
        return (StatusCode::NOT_FOUND, "unknown resource").into_response();
    };
    let mut db = inner.db.lock().expect("db");
    let key = (plural.clone(), ns, name);
    let Some(mut obj) = db.objects.get(&key).cloned() else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    // The status subresource ignores everything but status.
    merge_patch(&mut obj["status"], &patch["status"]);
    db.rv += 1;
    let rv = db.rv;
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    db.objects.insert(key.clone(), obj.clone());
    *db.patches.entry(key).or_default() += 1;
    let e = Event {
        plural,
        rv,
        kind: "MODIFIED",
        object: obj.clone(),
    };
    db.history.push(e.clone());
    let _ = inner.events.send(e);
    let _ = kind;
    axum::Json(obj).into_response()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Value::Object(t) = target {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}
