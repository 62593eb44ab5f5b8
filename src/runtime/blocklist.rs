//! The runtime allow/block lists: where entries added at run time live, how they reach every
//! replica, and the snapshot the Check path reads.
//!
//! Owns: merging the settings file's entries with runtime ones into one `ListSet` snapshot,
//! rebuilt on every change and swapped in atomically (lookups take no lock); the runtime
//! store — in this process for a single replica (`memory`), or in Redis when the counters
//! are (`redis`): one hash per list plus a version counter that every replica polls every
//! 250 ms, so a change reaches all replicas well within a second; expiry (lookups ignore
//! expired entries at once; stores drop them on the next sweep).
//!
//! Must not touch: how entries are matched (authz::lists) or answered, HTTP (admin).
//! When Redis fails, the last snapshot stays in force and changes are refused (503), never
//! silently kept on one replica only.

mod redis;

pub use redis::RedisLists;

use crate::limiter::Clock;
use crate::lists::{CompiledList, EntrySource, ListEntry, ListKind, ListSet};
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

/// Why a list change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0:?} is defined in the settings file; change it there")]
    FromConfig(String),
    #[error("{0:?} is defined by an AccessList resource; change it there")]
    FromKubernetes(String),
    #[error("list store unavailable: {0}")]
    Unavailable(String),
}

enum Backend {
    Memory,
    Redis(RedisLists),
}

/// The allow and block lists of this process.
pub struct Lists {
    backend: Backend,
    clock: Arc<dyn Clock>,
    /// From the settings file (replaced on reload).
    config: Mutex<(Vec<ListEntry>, Vec<ListEntry>)>,
    /// From `AccessList` resources (replaced whenever one changes).
    kubernetes: Mutex<(Vec<ListEntry>, Vec<ListEntry>)>,
    /// Runtime entries: the store itself (`memory`), or the last copy read from Redis.
    runtime: Mutex<Vec<(ListKind, ListEntry)>>,
    snapshot: ArcSwap<ListSet>,
}

impl std::fmt::Debug for Lists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot.load();
        f.debug_struct("Lists")
            .field("backend", &self.backend_name())
            .field("allow", &s.allow.len())
            .field("block", &s.block.len())
            .finish()
    }
}

fn now_ms(clock: &dyn Clock) -> u64 {
    clock.now() / 1_000_000
}

impl Lists {
    /// Runtime entries kept in this process.
    pub fn memory(clock: Arc<dyn Clock>) -> Lists {
        Lists::with(Backend::Memory, clock)
    }

    /// Runtime entries shared through Redis.
    pub fn redis(store: RedisLists, clock: Arc<dyn Clock>) -> Lists {
        Lists::with(Backend::Redis(store), clock)
    }

    fn with(backend: Backend, clock: Arc<dyn Clock>) -> Lists {
        Lists {
            backend,
            clock,
            config: Mutex::new((Vec::new(), Vec::new())),
            kubernetes: Mutex::new((Vec::new(), Vec::new())),
            runtime: Mutex::new(Vec::new()),
            snapshot: ArcSwap::from_pointee(ListSet::default()),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Memory => "memory",
            Backend::Redis(_) => "redis",
        }
    }

    /// The lists in force (lock-free).
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<ListSet>> {
        self.snapshot.load()
    }

    /// Replaces the settings file's entries (on load and reload).
    pub fn set_config(&self, allow: Vec<ListEntry>, block: Vec<ListEntry>) {
        *self.config.lock() = (allow, block);
        self.rebuild();
    }

    /// Replaces the entries of `AccessList` resources. A no-op when nothing changed, so a
    /// watcher relisting the same resources rebuilds nothing.
    pub fn set_kubernetes(&self, allow: Vec<ListEntry>, block: Vec<ListEntry>) {
        {
            let mut k = self.kubernetes.lock();
            if k.0 == allow && k.1 == block {
                return;
            }
            *k = (allow, block);
        }
        self.rebuild();
    }

    fn rebuild(&self) {
        let (allow, block) = {
            let config = self.config.lock();
            let kubernetes = self.kubernetes.lock();
            let runtime = self.runtime.lock();
            let of = |kind: ListKind, from_config: &[ListEntry]| {
                let mut v: Vec<ListEntry> = from_config.to_vec();
                v.extend(match kind {
                    ListKind::Allow => kubernetes.0.iter().cloned(),
                    ListKind::Block => kubernetes.1.iter().cloned(),
                });
                v.extend(
                    runtime
                        .iter()
                        .filter(|(k, _)| *k == kind)
                        .map(|(_, e)| e.clone()),
                );
                v
            };
            (
                of(ListKind::Allow, &config.0),
                of(ListKind::Block, &config.1),
            )
        };
        self.snapshot.store(Arc::new(ListSet {
            allow: CompiledList::build(allow),
            block: CompiledList::build(block),
        }));
    }

    /// Active entries of one list, configured and runtime.
    pub fn entries(&self, kind: ListKind) -> Vec<ListEntry> {
        let now = now_ms(&*self.clock);
        self.snapshot()
            .list(kind)
            .entries()
            .iter()
            .filter(|e| e.is_active(now))
            .cloned()
            .collect()
    }

    /// Adds (or replaces) a runtime entry. `value` is an IP, a CIDR or an identity.
    pub async fn add(
        &self,
        kind: ListKind,
        value: &str,
        ttl: Option<Duration>,
        reason: &str,
        code: Option<&str>,
    ) -> Result<ListEntry, ListError> {
        let value = crate::lists::canonical_entry(value).map_err(ListError::Invalid)?;
        if let Some(c) = code
            && (c.is_empty()
                || c.len() > 64
                || !c.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                }))
        {
            return Err(ListError::Invalid(format!(
                "{c:?} is not a reason code (1-64 of a-z, 0-9, _ and -)"
            )));
        }
        if reason.len() > 1024 {
            return Err(ListError::Invalid(
                "reason is longer than 1024 bytes".into(),
            ));
        }
        self.check_not_declared(kind, &value)?;
        let now = now_ms(&*self.clock);
        let entry = ListEntry {
            value,
            reason: reason.to_string(),
            code: code.map(str::to_string),
            expires_at_ms: ttl.map(|t| now.saturating_add(t.as_millis() as u64)),
            added_at_ms: now,
            source: EntrySource::Runtime,
        };
        match &self.backend {
            Backend::Memory => {
                let mut runtime = self.runtime.lock();
                runtime.retain(|(k, e)| !(*k == kind && e.value == entry.value));
                runtime.push((kind, entry.clone()));
            }
            Backend::Redis(r) => {
                r.set(kind, &entry).await?;
                self.refresh().await?;
            }
        }
        self.rebuild();
        tracing::info!(list = kind.as_str(), value = %entry.value, expires_at_ms = ?entry.expires_at_ms, "list entry added");
        Ok(entry)
    }

    /// Removes a runtime entry; `Ok(false)` when there was none.
    pub async fn remove(&self, kind: ListKind, value: &str) -> Result<bool, ListError> {
        let value = crate::lists::canonical_entry(value).map_err(ListError::Invalid)?;
        self.check_not_declared(kind, &value)?;
        let removed = match &self.backend {
            Backend::Memory => {
                let mut runtime = self.runtime.lock();
                let before = runtime.len();
                runtime.retain(|(k, e)| !(*k == kind && e.value == value));
                runtime.len() != before
            }
            Backend::Redis(r) => {
                let removed = r.delete(kind, &value).await?;
                self.refresh().await?;
                removed
            }
        };
        self.rebuild();
        if removed {
            tracing::info!(list = kind.as_str(), value = %value, "list entry removed");
        }
        Ok(removed)
    }

    /// Entries declared in the settings file or a resource change there, not at run time:
    /// a runtime change would be undone by the next reload.
    fn check_not_declared(&self, kind: ListKind, value: &str) -> Result<(), ListError> {
        let has = |lists: &(Vec<ListEntry>, Vec<ListEntry>)| {
            let list = match kind {
                ListKind::Allow => &lists.0,
                ListKind::Block => &lists.1,
            };
            list.iter().any(|e| e.value == value)
        };
        if has(&self.config.lock()) {
            return Err(ListError::FromConfig(value.to_string()));
        }
        if has(&self.kubernetes.lock()) {
            return Err(ListError::FromKubernetes(value.to_string()));
        }
        Ok(())
    }

    /// Reads the shared store when it changed (Redis); `Ok(true)` when the snapshot changed.
    pub async fn refresh(&self) -> Result<bool, ListError> {
        let Backend::Redis(r) = &self.backend else {
            return Ok(false);
        };
        let Some(entries) = r.load_if_changed().await? else {
            return Ok(false);
        };
        let now = now_ms(&*self.clock);
        let (active, expired): (Vec<_>, Vec<_>) =
            entries.into_iter().partition(|(_, e)| e.is_active(now));
        *self.runtime.lock() = active;
        self.rebuild();
        // Expired entries no longer apply anywhere; drop them from the store (any replica
        // may do it, it is idempotent).
        for (kind, e) in expired {
            let _ = r.delete(kind, &e.value).await;
        }
        Ok(true)
    }

    /// Drops expired runtime entries (memory) so they stop taking space.
    fn sweep(&self) {
        let now = now_ms(&*self.clock);
        let changed = {
            let mut runtime = self.runtime.lock();
            let before = runtime.len();
            runtime.retain(|(_, e)| e.is_active(now));
            runtime.len() != before
        };
        if changed {
            self.rebuild();
        }
    }

    /// Keeps the snapshot current until the task is dropped: polls Redis every 250 ms, or
    /// sweeps expired entries every few seconds in memory.
    pub async fn run(self: Arc<Self>) {
        match &self.backend {
            Backend::Memory => {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    self.sweep();
                }
            }
            Backend::Redis(r) => {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut failing = false;
                loop {
                    tick.tick().await;
                    match self.refresh().await {
                        Ok(_) => {
                            if failing {
                                tracing::info!("list store reachable again");
                                failing = false;
                            }
                        }
                        Err(e) => {
                            if !failing {
                                tracing::warn!(
                                    "list store: {e}; keeping the last lists ({} allow, {} block)",
                                    self.snapshot().allow.len(),
                                    self.snapshot().block.len()
                                );
                                failing = true;
                            }
                            r.forget_version();
                        }
                    }
                }
            }
        }
    }
}

/// Converts the settings file's entries.
pub fn config_entries(list: &[crate::config::authz::ListEntryConfig]) -> Vec<ListEntry> {
    declared_entries(list, EntrySource::Config)
}

/// Converts declared entries (settings file, `AccessList` resources).
pub fn declared_entries(
    list: &[crate::config::authz::ListEntryConfig],
    source: EntrySource,
) -> Vec<ListEntry> {
    list.iter()
        .map(|e| ListEntry {
            value: e.value.clone(),
            reason: e.reason.clone(),
            code: e.code.clone(),
            expires_at_ms: e.expires_at.map(|s| s.saturating_mul(1_000)),
            added_at_ms: 0,
            source,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::ManualClock;
    use crate::lists::cidr::parse_addr;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn runtime_entries_expire_and_config_entries_are_protected() {
        let clock = Arc::new(ManualClock::new(1_000_000_000_000));
        let lists = Lists::memory(clock.clone());
        lists.set_config(
            vec![],
            config_entries(&[crate::config::authz::ListEntryConfig {
                value: "10.0.0.0/8".into(),
                reason: "internal".into(),
                code: None,
                expires_at: None,
                line: 1,
            }]),
        );
        block_on(async {
            let e = lists
                .add(
                    ListKind::Block,
                    "2001:DB8::/32",
                    Some(Duration::from_secs(60)),
                    "abuse",
                    Some("abuse"),
                )
                .await
                .unwrap();
            assert_eq!(e.value, "2001:db8::/32");
            let a = parse_addr("2001:db8::5").unwrap();
            let now = || clock.now() / 1_000_000;
            assert!(lists.snapshot().block.match_addr(a, now()).is_some());
            clock.advance(Duration::from_secs(61));
            assert!(lists.snapshot().block.match_addr(a, now()).is_none());
            lists.sweep();
            assert_eq!(lists.entries(ListKind::Block).len(), 1);
            assert!(matches!(
                lists.remove(ListKind::Block, "10.0.0.0/8").await,
                Err(ListError::FromConfig(_))
            ));
            assert!(matches!(
                lists
                    .add(ListKind::Block, "10.0.0.1/8", None, "", None)
                    .await,
                Err(ListError::Invalid(_))
            ));
            assert!(matches!(
                lists
                    .add(ListKind::Block, "user:x", None, "", Some("Bad Code"))
                    .await,
                Err(ListError::Invalid(_))
            ));
            lists
                .add(ListKind::Allow, "user:ops", None, "", None)
                .await
                .unwrap();
            assert!(lists.remove(ListKind::Allow, "user:ops").await.unwrap());
            assert!(!lists.remove(ListKind::Allow, "user:ops").await.unwrap());
        });
    }
}
