//! The list/watch loop: both kinds through kube-runtime's watcher (relist on 410 Gone,
//! reconnect with backoff), applied to the live rules and lists, statuses written back.
//!
//! Objects are watched as `DynamicObject`s and decoded here, so one object the typed model
//! could not read becomes an `Invalid` status instead of a list that fails for everyone.
//! A relist is buffered until it is complete and then replaces the known set, so objects
//! deleted while the watch was down disappear, and nothing is dropped meanwhile.

use super::crd::{AccessList, RateLimitPolicy};
use super::resource::{Content, Kind, Tracked, status_matches, with_transition_time};
use crate::runtime::blocklist::Lists;
use crate::runtime::live::{ExternalDomain, LiveConfig};
use crate::runtime::reload::ReloadStatus;
use crate::telemetry::KubernetesStatus;
use futures_util::{FutureExt, Stream, StreamExt};
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use parking_lot::RwLock;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Which namespaces to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The client's namespace: the pod's own in a cluster, the kubeconfig context's outside.
    Default,
    Namespace(String),
    All,
}

/// `serve --kubernetes` options.
#[derive(Debug, Clone)]
pub struct KubernetesOptions {
    pub scope: Scope,
    /// A label selector (`team=payments,tier!=dev`) both kinds are filtered by.
    pub selector: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("no Kubernetes client configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(String),
}

type Key = (Kind, String, String);

/// Watches both kinds and keeps them in force until dropped.
pub struct Watcher {
    client: Client,
    options: KubernetesOptions,
    live: Arc<LiveConfig>,
    lists: Arc<Lists>,
    status: Arc<RwLock<ReloadStatus>>,
    objects: BTreeMap<Key, Tracked>,
    /// Relists in progress: objects seen since `Init`, swapped in at `InitDone`.
    relisting: BTreeMap<Kind, BTreeMap<Key, Tracked>>,
    /// Kinds whose first list is in force.
    synced: BTreeSet<Kind>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("options", &self.options)
            .field("objects", &self.objects.len())
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// A client from the environment: the in-cluster service account, else `KUBECONFIG` /
    /// `~/.kube/config`.
    pub async fn connect(
        options: KubernetesOptions,
        live: Arc<LiveConfig>,
        lists: Arc<Lists>,
        status: Arc<RwLock<ReloadStatus>>,
    ) -> Result<Watcher, KubernetesError> {
        let client = Client::try_default()
            .await
            .map_err(|e| KubernetesError::Config(e.to_string()))?;
        status.write().kubernetes = Some(KubernetesStatus::default());
        Ok(Watcher {
            client,
            options,
            live,
            lists,
            status,
            objects: BTreeMap::new(),
            relisting: BTreeMap::new(),
            synced: BTreeSet::new(),
        })
    }

    fn api(&self, kind: Kind, namespace: Option<&str>) -> Api<DynamicObject> {
        let ar = resource(kind);
        let scoped = match &self.options.scope {
            Scope::Namespace(ns) => Some(ns.as_str()),
            _ => None,
        };
        match (namespace.or(scoped), &self.options.scope) {
            (Some(ns), _) => Api::namespaced_with(self.client.clone(), ns, &ar),
            (None, Scope::All) => Api::all_with(self.client.clone(), &ar),
            (None, _) => Api::default_namespaced_with(self.client.clone(), &ar),
        }
    }

    fn stream(
        &self,
        kind: Kind,
    ) -> impl Stream<Item = (Kind, Result<Event<DynamicObject>, watcher::Error>)> + Send + use<>
    {
        let mut config = watcher::Config::default();
        if let Some(s) = &self.options.selector {
            config = config.labels(s);
        }
        watcher::watcher(self.api(kind, None), config)
            .default_backoff()
            .map(move |e| (kind, e))
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) {
        let scope = match &self.options.scope {
            Scope::Default => format!("namespace {}", self.client.default_namespace()),
            Scope::Namespace(ns) => format!("namespace {ns}"),
            Scope::All => "all namespaces".into(),
        };
        tracing::info!(%scope, selector = ?self.options.selector, "watching RateLimitPolicy and AccessList resources");
        let mut events = std::pin::pin!(futures_util::stream::select(
            self.stream(Kind::RateLimitPolicy),
            self.stream(Kind::AccessList),
        ));
        let (plans, plan_rx) = tokio::sync::mpsc::unbounded_channel();
        let writer = StatusWriter {
            clock: self.live.clock().clone(),
            client: self.client.clone(),
            status: self.status.clone(),
            plan: BTreeMap::new(),
            written: BTreeMap::new(),
        };
        // Polled with the watch, in this task: it lives exactly as long as the watch, and a
        // panic in it ends the watcher, which the server reports by name.
        let mut writer = std::pin::pin!(writer.run(plan_rx));
        let mut published = self.live.subscribe();
        // The current failure of each kind's watch: one kind may fail (say, its CRD is
        // missing) while the other works.
        let mut failing: BTreeMap<Kind, String> = BTreeMap::new();
        loop {
            tokio::select! {
                () = &mut writer => {
                    tracing::error!("the Kubernetes status writer stopped");
                    break;
                }
                next = events.next() => {
                    let Some((kind, event)) = next else { break };
                    let mut batch = Batch::default();
                    let mut next = Some((kind, event));
                    // Take every event already here before recompiling: a burst (a relist,
                    // our own status writes coming back) costs one recompilation, not one per
                    // object.
                    for _ in 0..BATCH_LIMIT {
                        let Some((kind, event)) = next.take() else { break };
                        match event {
                            Ok(event) => {
                                if failing.remove(&kind).is_some() {
                                    tracing::info!(kind = kind.as_str(), "Kubernetes watch recovered");
                                    self.report_failures(&failing);
                                }
                                batch.add(self.handle(kind, event));
                            }
                            Err(e) => {
                                let text = format!("{} watch: {e}{}", kind.as_str(), hint(&e));
                                self.kube_status(|k| k.watch_errors += 1);
                                // Backoff retries; say it once per distinct failure.
                                if failing.get(&kind) != Some(&text) {
                                    tracing::warn!("{text}; keeping the rules in force and retrying");
                                    failing.insert(kind, text);
                                    self.report_failures(&failing);
                                }
                            }
                        }
                        next = events.next().now_or_never().flatten();
                    }
                    if batch.content {
                        self.apply();
                        self.plan_statuses(&plans);
                    } else {
                        // Status-only changes (our own writes coming back, or another
                        // replica's): the writer learns what the objects now show, so it
                        // writes nothing that is already there.
                        for key in batch.status {
                            if let Some(t) = self.objects.get(&key) {
                                let _ = plans.send(WriterInput::Seen(key, t.seen_status.clone()));
                            }
                        }
                    }
                }
                Ok(()) = published.changed() => {
                    // A file reload can change which domains conflict.
                    self.plan_statuses(&plans);
                }
            }
        }
    }

    /// Folds one event into the known objects and says what it changed.
    fn handle(&mut self, kind: Kind, event: Event<DynamicObject>) -> Change {
        match event {
            Event::Init => {
                tracing::debug!(kind = kind.as_str(), "listing");
                self.relisting.insert(kind, BTreeMap::new());
                Change::Nothing
            }
            Event::InitApply(obj) => {
                let key = key(kind, &obj);
                let t = Tracked::from_object(kind, &obj, self.objects.get(&key));
                self.relisting.entry(kind).or_default().insert(key, t);
                Change::Nothing
            }
            Event::InitDone => {
                let fresh = self.relisting.remove(&kind).unwrap_or_default();
                self.objects.retain(|k, _| k.0 != kind);
                self.objects.extend(fresh);
                self.synced.insert(kind);
                let objects = self.objects.len();
                let all = self.synced.len() == 2;
                self.kube_status(|k| {
                    *k.lists.entry(kind.as_str()).or_default() += 1;
                    if all && !k.synced {
                        tracing::info!(objects, "Kubernetes resources synced");
                        k.synced = true;
                    }
                });
                Change::Content
            }
            Event::Apply(obj) => {
                let key = key(kind, &obj);
                let previous = self.objects.get(&key);
                let t = Tracked::from_object(kind, &obj, previous);
                let change = if previous.is_some_and(|p| p.same_spec(&t)) {
                    Change::Status(key.clone())
                } else {
                    if let Some(why) = &t.invalid {
                        tracing::warn!(resource = %t.source(), "invalid: {why}");
                    }
                    Change::Content
                };
                self.objects.insert(key, t);
                change
            }
            Event::Delete(obj) => match self.objects.remove(&key(kind, &obj)) {
                Some(_) => Change::Content,
                None => Change::Nothing,
            },
        }
    }

    fn report_failures(&self, failing: &BTreeMap<Kind, String>) {
        let text =
            (!failing.is_empty()).then(|| failing.values().cloned().collect::<Vec<_>>().join("; "));
        self.kube_status(|k| k.error = text);
    }

    fn kube_status(&self, f: impl FnOnce(&mut KubernetesStatus)) {
        if let Some(k) = self.status.write().kubernetes.as_mut() {
            f(k);
        }
    }

    /// Hands every good version to the live config and the lists (each a no-op when
    /// unchanged, so counters and snapshots survive relists and status-only updates).
    fn apply(&self) {
        let mut domains = Vec::new();
        let (mut allow, mut block) = (Vec::new(), Vec::new());
        for t in self.objects.values() {
            match &t.good {
                Some(Content::Domain(d)) => domains.push(ExternalDomain {
                    source: t.source(),
                    precedence: t.created.clone(),
                    domain: d.clone(),
                }),
                Some(Content::Lists { allow: a, block: b }) => {
                    allow.extend(a.iter().cloned());
                    block.extend(b.iter().cloned());
                }
                None => {}
            }
        }
        self.live.set_external(domains);
        self.lists.set_kubernetes(allow, block);
    }

    /// Hands the status every object should show to the status writer (only the newest plan
    /// matters, so a slow API server never queues work or delays the rules).
    fn plan_statuses(&self, plans: &tokio::sync::mpsc::UnboundedSender<WriterInput>) {
        let admissions = self.live.admissions();
        let mut accepted: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut refused: BTreeMap<&'static str, u64> = BTreeMap::new();
        for kind in [Kind::RateLimitPolicy, Kind::AccessList] {
            accepted.insert(kind.as_str(), 0);
            refused.insert(kind.as_str(), 0);
        }
        let mut plan = Vec::with_capacity(self.objects.len());
        for (key, t) in &self.objects {
            let desired = t.desired_status(admissions.get(&t.source()));
            let ok = desired["conditions"][0]["status"] == "True";
            *if ok { &mut accepted } else { &mut refused }
                .entry(key.0.as_str())
                .or_default() += 1;
            plan.push(StatusJob {
                key: key.clone(),
                seen: t.seen_status.clone(),
                desired,
            });
        }
        self.kube_status(|k| {
            k.accepted = accepted;
            k.refused = refused;
        });
        let _ = plans.send(WriterInput::Plan(plan));
    }
}

/// What one event changed.
enum Change {
    Nothing,
    /// Only the status (or metadata) of this object: the rules stay as they are.
    Status(Key),
    /// What is in force may change.
    Content,
}

/// Events taken at once before recompiling.
const BATCH_LIMIT: usize = 4096;

#[derive(Default)]
struct Batch {
    content: bool,
    status: Vec<Key>,
}

impl Batch {
    fn add(&mut self, change: Change) {
        match change {
            Change::Nothing => {}
            Change::Status(key) => self.status.push(key),
            Change::Content => self.content = true,
        }
    }
}

/// One object's status as seen and as it should be.
#[derive(Debug, Clone)]
struct StatusJob {
    key: Key,
    seen: Value,
    desired: Value,
}

/// What the status writer is told.
#[derive(Debug)]
enum WriterInput {
    /// Every object, after what is in force changed.
    Plan(Vec<StatusJob>),
    /// One object now shows this status (nothing else about it changed).
    Seen(Key, Value),
}

/// Writes the statuses that would change, in its own task. Several replicas compute the same
/// status from the same objects, so after one writes, the others see it match and write
/// nothing.
struct StatusWriter {
    /// The server's clock: `lastTransitionTime`-style stamps.
    clock: Arc<dyn crate::limiter::Clock>,
    client: Client,
    status: Arc<RwLock<ReloadStatus>>,
    /// Every object: (status seen, status wanted).
    plan: BTreeMap<Key, (Value, Value)>,
    /// The status last written per object, so a status is not written twice before the
    /// watch shows the first write.
    written: BTreeMap<Key, Value>,
}

/// Patches in flight at once: a hanging API server costs one timeout per round, not one
/// per object.
const STATUS_WRITES_IN_FLIGHT: usize = 16;
const STATUS_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

impl StatusWriter {
    async fn run(mut self, mut input: tokio::sync::mpsc::UnboundedReceiver<WriterInput>) {
        // Retries writes that failed (API server away); cheap when nothing is due.
        let mut retry = tokio::time::interval(Duration::from_secs(10));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut due = tokio::select! {
                message = input.recv() => match message {
                    Some(m) => self.take(m),
                    None => return,
                },
                _ = retry.tick() => true,
            };
            while let Ok(m) = input.try_recv() {
                due |= self.take(m);
            }
            if due {
                self.round().await;
            }
        }
    }

    /// Folds in one input; `true` when a write may be due.
    fn take(&mut self, input: WriterInput) -> bool {
        match input {
            WriterInput::Plan(jobs) => {
                self.plan = jobs
                    .into_iter()
                    .map(|j| (j.key, (j.seen, j.desired)))
                    .collect();
                self.written.retain(|k, _| self.plan.contains_key(k));
                true
            }
            WriterInput::Seen(key, seen) => match self.plan.get_mut(&key) {
                Some((s, desired)) => {
                    *s = seen;
                    !status_matches(s, desired)
                }
                None => false,
            },
        }
    }

    async fn round(&mut self) {
        let now = rfc3339_seconds(self.clock.now());
        let due: Vec<(Key, Value)> = self
            .plan
            .iter()
            .filter(|(key, (seen, desired))| {
                !status_matches(seen, desired)
                    && !self
                        .written
                        .get(*key)
                        .is_some_and(|w| status_matches(w, desired))
            })
            .map(|(key, (seen, desired))| {
                let status = with_transition_time(seen, desired.clone(), &now);
                (key.clone(), status)
            })
            .collect();
        let client = &self.client;
        let results: Vec<(Key, Value, Result<(), String>)> = futures_util::stream::iter(due)
            .map(|(key, status)| async move {
                let (kind, namespace, name) = &key;
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &resource(*kind));
                let patch = Patch::Merge(json!({ "status": status }));
                let params = PatchParams::default();
                let result = match tokio::time::timeout(
                    STATUS_WRITE_TIMEOUT,
                    api.patch_status(name, &params, &patch),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_string()),
                };
                (key, status, result)
            })
            .buffer_unordered(STATUS_WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (key, status, result) in results {
            let (kind, namespace, name) = &key;
            let mut st = self.status.write();
            let Some(k) = st.kubernetes.as_mut() else {
                continue;
            };
            match result {
                Ok(()) => {
                    k.status_writes += 1;
                    tracing::debug!(kind = kind.as_str(), %namespace, %name, "status written");
                    self.written.insert(key, status);
                }
                Err(e) => {
                    k.status_write_errors += 1;
                    tracing::warn!(kind = kind.as_str(), %namespace, %name, "writing status: {e}");
                }
            }
        }
    }
}

/// What to do about the failures an operator can fix.
fn hint(e: &watcher::Error) -> &'static str {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    match code {
        404 => " (are the CRDs installed? `ratethrottle crd | kubectl apply -f -`)",
        401 | 403 => {
            " (RBAC: the service account needs list and watch on ratelimitpolicies and \
             accesslists.ratethrottle.io, and patch on their status)"
        }
        _ => "",
    }
}

fn resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::RateLimitPolicy => ApiResource::erase::<RateLimitPolicy>(&()),
        Kind::AccessList => ApiResource::erase::<AccessList>(&()),
    }
}

fn key(kind: Kind, obj: &DynamicObject) -> Key {
    (
        kind,
        obj.metadata.namespace.clone().unwrap_or_default(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

/// `nanos` since the Unix epoch as RFC 3339 UTC, seconds precision, as Kubernetes writes
/// times.
fn rfc3339_seconds(nanos: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .and_then(|t| t.round(k8s_openapi::jiff::Unit::Second))
        .map(|t| t.to_string())
        .unwrap_or_default()
}
