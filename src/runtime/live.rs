//! The configuration in force: the file configuration merged with domains that come from
//! elsewhere (Kubernetes `RateLimitPolicy` resources), compiled into one `RuleSet` and
//! swapped in whole.
//!
//! Owns: the merge and its precedence rule, which is what operators see documented —
//! a domain defined in the files wins over a resource naming the same domain, and between
//! resources the oldest (creation time, then namespace/name) wins; the losers are reported
//! as conflicts, never merged. Also checks what needs the files' settings (`burst` under a
//! non-bucket default algorithm).
//!
//! Must not touch: reading files (reload) or talking to Kubernetes (k8s). Each source hands
//! in already-decoded domains; a source that fails to decode keeps its last good input.

use crate::config::{Config, DescriptorConfig, DomainConfig, uses_burst};
use crate::digest::Fnv64;
use crate::limiter::{Clock, NANOS_PER_SECOND};
use crate::rules::{RuleSet, StatsRegistry};
use crate::runtime::reload::ReloadStatus;
use crate::telemetry::ServiceMetrics;
use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

/// A domain from outside the files.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalDomain {
    /// Who defined it, for messages: `RateLimitPolicy team-a/checkout`.
    pub source: String,
    /// Orders resources naming the same domain: the smallest wins (creation time as RFC 3339
    /// text sorts chronologically, then the source breaks ties).
    pub precedence: String,
    pub domain: DomainConfig,
}

/// Whether an external domain is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Accepted,
    /// Valid on its own, but not in force; the message says why.
    Conflict(String),
}

/// Called with every configuration put in force (after the rules), e.g. to compile the
/// `authz:` block.
pub type InstallHook = Box<dyn Fn(&Config) + Send + Sync>;

struct State {
    file: Option<Config>,
    external: Vec<ExternalDomain>,
    admissions: BTreeMap<String, Admission>,
}

/// The rules in force and every input they are built from.
pub struct LiveConfig {
    rules: Arc<ArcSwap<RuleSet>>,
    stats: Arc<StatsRegistry>,
    metrics: Arc<ServiceMetrics>,
    status: Arc<RwLock<ReloadStatus>>,
    hooks: Vec<InstallHook>,
    state: Mutex<State>,
    /// Bumped after every publish, so status writers learn that admissions may have changed.
    published: tokio::sync::watch::Sender<u64>,
    /// The server's clock: when a configuration was put in force; resource status times.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for LiveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConfig")
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl LiveConfig {
    pub fn new(
        rules: Arc<ArcSwap<RuleSet>>,
        stats: Arc<StatsRegistry>,
        metrics: Arc<ServiceMetrics>,
        status: Arc<RwLock<ReloadStatus>>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        LiveConfig {
            clock,
            rules,
            stats,
            metrics,
            status,
            hooks: Vec::new(),
            state: Mutex::new(State {
                file: None,
                external: Vec::new(),
                admissions: BTreeMap::new(),
            }),
            published: tokio::sync::watch::channel(0).0,
        }
    }

    /// Also runs `hook` with every configuration put in force.
    pub fn on_install(mut self, hook: impl Fn(&Config) + Send + Sync + 'static) -> Self {
        self.hooks.push(Box::new(hook));
        self
    }

    /// Puts a new file configuration in force, with the external domains it allows.
    pub fn set_file(&self, config: Config) {
        let mut state = self.state.lock();
        state.file = Some(config);
        self.publish(&mut state);
    }

    /// The version of the file configuration in force, if one was loaded.
    pub fn file_version(&self) -> Option<String> {
        self.state.lock().file.as_ref().map(|c| c.version.clone())
    }

    /// The domains of the file configuration in force (none before the first load).
    pub fn file_domains(&self) -> Vec<String> {
        self.state
            .lock()
            .file
            .as_ref()
            .map(|c| c.domains.iter().map(|d| d.domain.clone()).collect())
            .unwrap_or_default()
    }

    /// Replaces every external domain. Publishes only when the input changed, so a watcher
    /// relisting the same resources leaves the rules (and their counters) untouched.
    pub fn set_external(&self, mut external: Vec<ExternalDomain>) {
        external.sort_by(|a, b| (&a.precedence, &a.source).cmp(&(&b.precedence, &b.source)));
        let mut state = self.state.lock();
        if state.external == external {
            return;
        }
        state.external = external;
        self.publish(&mut state);
    }

    /// What became of each external domain, by source.
    pub fn admissions(&self) -> BTreeMap<String, Admission> {
        self.state.lock().admissions.clone()
    }

    /// The server's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Changes after every publish.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.published.subscribe()
    }

    fn publish(&self, state: &mut State) {
        let (config, admissions) = merge(state.file.as_ref(), &state.external);
        state.admissions = admissions;
        let compiled = RuleSet::compile(&config, &self.stats);
        self.rules.store(Arc::new(compiled));
        for hook in &self.hooks {
            hook(&config);
        }
        self.metrics.config_load_success.fetch_add(1, Relaxed);
        {
            let mut st = self.status.write();
            st.version = config.version.clone();
            st.loaded_at_unix = self.clock.now() / NANOS_PER_SECOND;
            st.config = serde_json::to_value(&config).unwrap_or_default();
        }
        tracing::info!(
            version = %config.version,
            domains = config.domains.len(),
            "configuration in force"
        );
        self.published.send_modify(|n| *n += 1);
    }
}

/// What `LiveConfig` would make of `external` beside `file`, without putting anything in
/// force (`ratethrottle config validate-resources`). `external` is taken in precedence order.
pub fn admissions_for(
    file: Option<&Config>,
    external: &[ExternalDomain],
) -> BTreeMap<String, Admission> {
    merge(file, external).1
}

/// The file configuration plus every external domain it leaves room for.
fn merge(
    file: Option<&Config>,
    external: &[ExternalDomain],
) -> (Config, BTreeMap<String, Admission>) {
    let mut config = file.cloned().unwrap_or_else(|| Config {
        settings: Default::default(),
        domains: Vec::new(),
        authz: None,
        anomaly: None,
        alerts: None,
        tracing: None,
        files: Vec::new(),
        version: String::new(),
    });
    let mut owner: HashMap<String, Owner> = config
        .domains
        .iter()
        .map(|d| (d.domain.clone(), Owner::File(d.file.display().to_string())))
        .collect();
    let file_domains = owner.len();
    let mut admissions = BTreeMap::new();
    let mut digest = Fnv64::new();
    for e in external {
        let admission = if let Some(first) = owner.get(&e.domain.domain) {
            Admission::Conflict(match first {
                Owner::Resource(source) => format!(
                    "domain {:?} is already defined by {source}, which is older",
                    e.domain.domain
                ),
                Owner::File(file) => format!(
                    "domain {:?} is defined in the file configuration ({file}), which takes \
                     precedence over resources",
                    e.domain.domain
                ),
            })
        } else if let Some(path) = burst_without_bucket(&e.domain, &config) {
            Admission::Conflict(format!(
                "{path}.burst: only applies to token_bucket, leaky_bucket and gcra, and this \
                 limit uses the default algorithm {} (set algorithm on the limit)",
                config.settings.default_algorithm.as_str()
            ))
        } else {
            Admission::Accepted
        };
        if admission == Admission::Accepted {
            owner.insert(e.domain.domain.clone(), Owner::Resource(e.source.clone()));
            // Length-prefixed, so no two different inputs are merely re-split.
            let content = serde_json::to_string(&e.domain).unwrap_or_default();
            for part in [e.source.as_bytes(), content.as_bytes()] {
                digest.write_u64(part.len() as u64);
                digest.write(part);
            }
            config.domains.push(e.domain.clone());
        }
        admissions.insert(e.source.clone(), admission);
    }
    if config.domains.len() > file_domains {
        config.version = format!("{}+{:016x}", config.version, digest.finish());
    }
    (config, admissions)
}

/// Who defined a domain, for conflict messages.
enum Owner {
    /// The file it is in.
    File(String),
    /// The resource (`RateLimitPolicy ns/name`).
    Resource(String),
}

/// The key path of the first limit that sets `burst` without an algorithm while the
/// settings' default algorithm has no bucket.
fn burst_without_bucket(domain: &DomainConfig, config: &Config) -> Option<String> {
    if uses_burst(config.settings.default_algorithm) {
        return None;
    }
    fn walk(ds: &[DescriptorConfig], path: &str) -> Option<String> {
        for (i, d) in ds.iter().enumerate() {
            let here = format!("{path}[{i}]");
            for (j, l) in d.limits.iter().enumerate() {
                if l.burst.is_some() && l.algorithm.is_none() {
                    return Some(if d.limits.len() == 1 {
                        format!("{here}.rate_limit")
                    } else {
                        format!("{here}.rate_limits[{j}]")
                    });
                }
            }
            if let Some(p) = walk(&d.descriptors, &format!("{here}.descriptors")) {
                return Some(p);
            }
        }
        None
    }
    walk(&domain.descriptors, "descriptors")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_domain, parse_str};

    fn external(source: &str, precedence: &str, yaml: &str) -> ExternalDomain {
        ExternalDomain {
            source: format!("RateLimitPolicy {source}"),
            precedence: precedence.into(),
            domain: parse_domain(source, yaml).unwrap(),
        }
    }

    fn file(yaml: &str) -> Config {
        parse_str("rules.yaml", yaml).unwrap()
    }

    const LIMIT: &str =
        "descriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n";

    #[test]
    fn file_domains_win_and_the_oldest_resource_wins() {
        let f = file(&format!("domain: shared\n{LIMIT}"));
        let ext = vec![
            external(
                "a/new",
                "2026-02-01T00:00:00Z",
                &format!("domain: other\n{LIMIT}"),
            ),
            external(
                "b/old",
                "2026-01-01T00:00:00Z",
                &format!("domain: other\n{LIMIT}"),
            ),
            external(
                "c/x",
                "2026-01-01T00:00:00Z",
                &format!("domain: shared\n{LIMIT}"),
            ),
        ];
        let mut sorted = ext.clone();
        sorted.sort_by(|a, b| (&a.precedence, &a.source).cmp(&(&b.precedence, &b.source)));
        let (config, admissions) = merge(Some(&f), &sorted);
        let names: Vec<_> = config.domains.iter().map(|d| d.domain.as_str()).collect();
        assert_eq!(names, ["shared", "other"]);
        assert_eq!(admissions["RateLimitPolicy b/old"], Admission::Accepted);
        let Admission::Conflict(m) = &admissions["RateLimitPolicy a/new"] else {
            panic!("{admissions:?}")
        };
        assert!(
            m.contains("already defined by RateLimitPolicy b/old"),
            "{m}"
        );
        let Admission::Conflict(m) = &admissions["RateLimitPolicy c/x"] else {
            panic!("{admissions:?}")
        };
        assert!(m.contains("file configuration (rules.yaml)"), "{m}");
        assert_ne!(config.version, f.version);
        assert!(config.version.starts_with(&f.version));
    }

    #[test]
    fn burst_needs_a_bucket_algorithm() {
        let e = external(
            "a/b",
            "t",
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, burst: 5}\n",
        );
        let (config, admissions) = merge(None, std::slice::from_ref(&e));
        assert!(config.domains.is_empty());
        let Admission::Conflict(m) = &admissions["RateLimitPolicy a/b"] else {
            panic!()
        };
        assert!(m.starts_with("descriptors[0].rate_limit.burst"), "{m}");
        let f = file("settings: {default_algorithm: token_bucket}\n");
        let (config, admissions) = merge(Some(&f), &[e]);
        assert_eq!(config.domains.len(), 1);
        assert_eq!(admissions["RateLimitPolicy a/b"], Admission::Accepted);
    }

    #[test]
    fn without_external_domains_the_version_is_the_files() {
        let f = file(&format!("domain: d\n{LIMIT}"));
        let (config, _) = merge(Some(&f), &[]);
        assert_eq!(config, f);
    }
}
