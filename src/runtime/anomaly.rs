//! The anomaly module at run time: the task that owns the detector, drains the hot path's
//! queue, ticks it with the server's clock, and applies its decisions to the runtime lists.
//!
//! Owns: reading the detector's time off the injected clock (wall milliseconds: windows line
//! up across replicas; the same clock the engine decides on and the lists expire by), the
//! allowlist it asks (the current lists snapshot: manual allow entries always win), writing
//! `deny` decisions as block entries (TTL, reason `anomaly:<detector>/v1 …`, code `anomaly`)
//! through [`Lists`] — in Redis when the counters are, so every replica enforces them, and
//! two replicas deciding the same key write the same hash field: one entry — the record of
//! recent decisions (enforced and dry-run, with evidence) for the admin API, and unbans.
//!
//! `throttle` decisions (an identity behind a shared address; new callers during a
//! population surge) take the caller's trust to 0 for their TTL — its adaptive limits drop to
//! their `min_factor` (limits without `adaptive` are unchanged). The same task feeds every
//! event to the [`TrustBook`] and publishes trust through [`TrustSink`] (Redis when the
//! counters are there, so every replica applies the same factor).
//!
//! Must not touch: the services (they only push to the queue), HTTP.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::alerts::{AlertEvent, Alerts};
use crate::anomaly::{
    Action, Decision, Detector, Drain, Explanation, Scope, Target, TrustBook, TrustExplanation,
    canonical, mask, subject,
};
use crate::limiter::Clock;
use crate::lists::cidr::{IpNet, addr};
use crate::lists::{ListKind, MAX_ENTRY_BYTES};
use crate::runtime::adaptive::TrustSink;
use crate::runtime::blocklist::Lists;
use crate::runtime::replicas::TopKeysExchange;
use crate::telemetry::anomaly::{AnomalyGauges, AnomalyMetrics};

/// The public code blocked callers see for an anomaly decision.
pub const CODE: &str = "anomaly";
/// Decisions kept for the API.
const KEEP: usize = 1000;
/// How often the detector closes windows and returns decisions.
const TICK: Duration = Duration::from_millis(250);
/// How often the queue is drained.
const DRAIN: Duration = Duration::from_millis(10);
/// Most events taken per drain.
const BATCH: usize = 1 << 16;

/// One decision as the API shows it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub decision: Decision,
    /// Unix ms when it stops applying.
    pub expires_at_ms: u64,
    /// Written to the blocklist (deny, not dry-run, accepted by the store).
    pub enforced: bool,
    /// Why an enforceable decision was not written (allowlisted, declared, store down, ...).
    pub note: Option<String>,
    /// Unix ms of a manual unban.
    pub unbanned_at_ms: Option<u64>,
}

/// A caller's trust as `explain` shows it.
#[derive(Debug, Clone)]
pub struct TrustExplained {
    /// What this replica learned.
    pub local: TrustExplanation,
    /// The trust the engine applies now (`None`: not in the table → the rule's
    /// initial_factor). With Redis, the last value any replica published.
    pub in_force: Option<crate::anomaly::TrustQ>,
    pub shared: bool,
}

/// The running module, shared by its task and the admin API.
pub struct Anomaly {
    detector: Mutex<Detector>,
    trust: Mutex<TrustBook>,
    trust_sink: TrustSink,
    /// Heavy hitters shared with the other replicas (Redis storage only).
    exchange: Option<TopKeysExchange>,
    /// The last window whose export this replica wrote.
    exported_epoch: Mutex<Option<u64>>,
    drain: Drain,
    lists: Arc<Lists>,
    metrics: Arc<AnomalyMetrics>,
    recent: Mutex<VecDeque<Recorded>>,
    clock: Arc<dyn Clock>,
    /// Where decisions are reported (`anomaly_decision` / `population_surge` alerts).
    alerts: std::sync::OnceLock<Alerts>,
}

impl std::fmt::Debug for Anomaly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Anomaly")
            .field("queue", &self.drain.len())
            .finish_non_exhaustive()
    }
}

/// Whether `target` is allowlisted now: an allow entry names the identity or contains the
/// address, or (for a prefix) overlaps it.
pub fn allowlisted(lists: &Lists, target: &Target, now_ms: u64) -> bool {
    let snap = lists.snapshot();
    let allow = &snap.allow;
    match target {
        Target::Identity(l) if l.is_truncated() => allow
            .match_identity_hash(l.hash(), l.prefix(), now_ms)
            .is_some(),
        Target::Identity(l) => allow.match_identity(l.prefix(), now_ms).is_some(),
        Target::Ip(ip) => allow.match_addr(addr(canonical(*ip)), now_ms).is_some(),
        Target::Prefix(ip, len) => {
            let net = mask(canonical(*ip), *len);
            let Ok(p) = IpNet::parse(&format!("{net}/{len}")) else {
                return false;
            };
            allow
                .entries()
                .iter()
                .filter(|e| e.is_active(now_ms))
                .any(|e| {
                    e.net()
                        .is_some_and(|n| n.contains(p.network()) || p.contains(n.network()))
                })
        }
        Target::Population => false,
    }
}

/// What an operator typed, as a target: a CIDR (`/24` IPv4, `/64` or `/48` IPv6), an
/// address, or an identity.
pub fn parse_target(value: &str) -> Option<Target> {
    let value = value.trim();
    if value.is_empty() || value.len() > MAX_ENTRY_BYTES {
        return None;
    }
    if let Some((a, len)) = value.split_once('/')
        && let (Ok(ip), Ok(len)) = (a.parse::<IpAddr>(), len.parse::<u8>())
    {
        let scope = match (canonical(ip), len) {
            (IpAddr::V4(_), 24) => Scope::Ipv4Slash24,
            (IpAddr::V6(_), 64) => Scope::Ipv6Slash64,
            (IpAddr::V6(_), 48) => Scope::Ipv6Slash48,
            _ => return None,
        };
        return Target::parse(scope, &format!("{}/{len}", canonical(ip)));
    }
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(Target::Ip(canonical(ip)));
    }
    Target::parse(Scope::Identity, value)
}

fn now_ms(clock: &dyn Clock) -> u64 {
    clock.now() / 1_000_000
}

/// What the module is wired to: the queue it drains, the lists it writes decisions to, its
/// metrics, and the server's clock.
pub struct Wiring {
    pub drain: Drain,
    pub lists: Arc<Lists>,
    pub metrics: Arc<AnomalyMetrics>,
    pub clock: Arc<dyn Clock>,
}

impl Anomaly {
    /// The module over `cfg`, reading events from `wiring.drain` and writing to its lists.
    pub fn new(
        cfg: crate::anomaly::Config,
        trust: crate::anomaly::TrustConfig,
        trust_sink: TrustSink,
        exchange: Option<TopKeysExchange>,
        wiring: Wiring,
    ) -> Arc<Anomaly> {
        let Wiring {
            drain,
            lists,
            metrics,
            clock,
        } = wiring;
        let allow = {
            let lists = lists.clone();
            let clock = clock.clone();
            Box::new(move |t: &Target| allowlisted(&lists, t, now_ms(&*clock)))
        };
        let book = TrustBook::new(trust, cfg.volume_from);
        Arc::new(Anomaly {
            detector: Mutex::new(Detector::with_allowlist(cfg, allow)),
            trust: Mutex::new(book),
            trust_sink,
            exchange,
            exported_epoch: Mutex::new(None),
            drain,
            lists,
            metrics,
            recent: Mutex::new(VecDeque::new()),
            clock,
            alerts: std::sync::OnceLock::new(),
        })
    }

    /// Reports every decision (enforced or dry-run) to `alerts` from now on.
    pub fn set_alerts(&self, alerts: Alerts) {
        let _ = self.alerts.set(alerts);
    }

    /// A reloaded settings file's `anomaly:` block: thresholds, TTLs, dry-run, warm-up and
    /// trust take effect now; what sizes memory or windows waits for a restart (logged).
    /// Turning the module on or off needs a restart too.
    pub fn reconfigure(&self, settings: Option<&crate::config::anomaly::AnomalySettings>) {
        let Some(a) = settings.filter(|a| a.enabled) else {
            tracing::warn!(
                "the reloaded settings turn anomaly detection off: that takes a restart; it stays on"
            );
            return;
        };
        let (changed, kept) = self.detector.lock().reconfigure(a.detector.clone());
        let trust_changed = self.trust.lock().reconfigure(a.trust.clone());
        if !changed && !trust_changed {
            return;
        }
        if kept.is_empty() {
            tracing::info!(dry_run = a.detector.dry_run, "anomaly settings reloaded");
        } else {
            tracing::warn!(kept = ?kept, "anomaly settings reloaded; these keep their old values until a restart");
        }
    }

    pub fn metrics(&self) -> &Arc<AnomalyMetrics> {
        &self.metrics
    }

    pub fn replica(&self) -> String {
        self.detector.lock().config().replica.clone()
    }

    pub fn gauges(&self) -> AnomalyGauges {
        let trust = self.trust.lock().stats();
        let d = self.detector.lock();
        AnomalyGauges {
            dropped: self.drain.dropped(),
            queue_depth: self.drain.len(),
            queue_capacity: self.drain.capacity(),
            memory_bytes: d.memory_bytes(),
            memory_bound: d.memory_bound(),
            tracked_keys: d.tracked(),
            trust_identities: trust.identities,
            trust_refused: trust.refused,
            trust_table_entries: self.trust_sink.table().len(),
        }
    }

    /// Drains the queue and ticks the detector until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut drain = tokio::time::interval(DRAIN);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_tick = 0;
        let mut next_poll = 0;
        loop {
            drain.tick().await;
            let now = now_ms(&*self.clock);
            self.drain_once(now);
            if now >= next_tick {
                next_tick = now + TICK.as_millis() as u64;
                let decisions = self.detector.lock().tick(now);
                for d in decisions {
                    self.apply(d).await;
                }
                self.exchange_top_keys().await;
                self.publish_trust(now).await;
            }
            if now >= next_poll {
                next_poll = now + crate::runtime::adaptive::POLL.as_millis() as u64;
                if let Err(e) = self.trust_sink.poll().await {
                    self.metrics
                        .trust_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!("reading shared trust: {e}");
                }
            }
        }
    }

    /// Writes this replica's heavy hitters for the last closed window (once) and merges the
    /// other replicas' for the same window; their merged counts are judged at the next tick.
    async fn exchange_top_keys(&self) {
        let Some(ex) = &self.exchange else {
            return;
        };
        let Some(top) = self.detector.lock().export_top() else {
            return;
        };
        let fresh = *self.exported_epoch.lock() != Some(top.epoch);
        if fresh {
            match ex.publish(&top).await {
                Ok(()) => *self.exported_epoch.lock() = Some(top.epoch),
                Err(e) => {
                    self.metrics
                        .merge_errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(epoch = top.epoch, "publishing top keys: {e}");
                }
            }
        }
        match ex.read(top.epoch).await {
            Ok((exports, bad)) => {
                let mut d = self.detector.lock();
                for t in &exports {
                    d.merge(t);
                }
                self.metrics
                    .merge_bad
                    .fetch_add(bad as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics
                    .merge_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(epoch = top.epoch, "reading top keys: {e}");
            }
        }
    }

    /// Re-scores the callers whose trust moved and publishes the changes. A failed publish
    /// is counted and retried with the next changes (trust is advisory: the rules' own
    /// limits hold meanwhile, scaled by the last factor read).
    async fn publish_trust(&self, now: u64) {
        let changes = self.trust.lock().tick(now);
        if changes.is_empty() {
            return;
        }
        if let Err(e) = self.trust_sink.publish(&changes, now).await {
            self.metrics
                .trust_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(changes = changes.len(), "publishing trust: {e}");
            let mut book = self.trust.lock();
            for (key, ..) in changes {
                book.republish(key);
            }
        }
    }

    /// Feeds every queued event to the detector, stamped with `now` (events wait at most
    /// one drain interval, far below a window).
    fn drain_once(&self, now: u64) -> usize {
        let mut d = self.detector.lock();
        let mut trust = self.trust.lock();
        let n = self.drain.drain(BATCH, |mut ev| {
            ev.at_ms = now;
            d.observe(&ev);
            trust.observe(&ev);
        });
        self.metrics
            .events
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    async fn apply(&self, d: Decision) {
        let now = now_ms(&*self.clock);
        self.metrics.decision(d.detector, d.action, d.dry_run);
        if let Some(a) = self.alerts.get() {
            a.emit_with(|| AlertEvent::decision(&d));
        }
        self.metrics.latency(now.saturating_sub(d.at_ms));
        let mut rec = Recorded {
            expires_at_ms: now.saturating_add(d.ttl_ms),
            enforced: false,
            note: None,
            unbanned_at_ms: None,
            decision: d,
        };
        let d = &rec.decision;
        if d.dry_run {
            tracing::info!(scope = d.scope.name(), value = %d.value, action = d.action.name(), reason = d.reason, "anomaly decision (dry run)");
        } else if d.action == Action::Deny {
            rec.note = self.enforce(d, rec.expires_at_ms).await.err();
            rec.enforced = rec.note.is_none();
            tracing::warn!(scope = d.scope.name(), value = %d.value, reason = d.reason, ttl_ms = d.ttl_ms, enforced = rec.enforced, note = ?rec.note, "anomaly decision");
        } else if d.action == Action::Throttle {
            rec.note = self.throttle(d, now, rec.expires_at_ms).err();
            rec.enforced = rec.note.is_none();
            tracing::warn!(scope = d.scope.name(), value = %d.value, reason = d.reason, ttl_ms = d.ttl_ms, enforced = rec.enforced, "anomaly decision: throttle (adaptive limits at min_factor)");
        } else {
            rec.note = Some("alert: nothing is enforced".into());
            tracing::warn!(scope = d.scope.name(), value = %d.value, action = d.action.name(), reason = d.reason, "anomaly decision");
        }
        let mut recent = self.recent.lock();
        if recent.len() >= KEEP {
            recent.pop_front();
        }
        recent.push_back(rec);
    }

    /// A throttle: the caller's trust is 0 until `until` (its adaptive limits at their
    /// min_factor); for the population, callers the table doesn't know read as trust 0.
    fn throttle(&self, d: &Decision, now: u64, until: u64) -> Result<(), String> {
        let key = match d.target {
            Target::Identity(l) => Some(l.hash()),
            Target::Ip(ip) => subject("", Some(ip)),
            Target::Population => {
                self.trust_sink.table().set_population_surge(until);
                return Ok(());
            }
            Target::Prefix(..) => None,
        };
        let key = key.ok_or("a prefix has no limits of its own to scale")?;
        self.trust.lock().throttle(key, now, until);
        Ok(())
    }

    /// Writes a deny as a block entry, unless a longer-lasting one for the value is there.
    async fn enforce(&self, d: &Decision, expires_at_ms: u64) -> Result<(), String> {
        let existing = self
            .lists
            .entries(ListKind::Block)
            .into_iter()
            .find(|e| e.value == d.value);
        if let Some(e) = existing
            && e.expires_at_ms.is_none_or(|t| t >= expires_at_ms)
        {
            return Err("already blocked for at least as long".into());
        }
        // An identity written by digest is named by its first bytes for whoever reads the list.
        let named = match d.target {
            Target::Identity(l) if l.is_truncated() => format!(" identity={:?}", l.display()),
            _ => String::new(),
        };
        let reason = format!(
            "anomaly:{}{named} count={} (±{}) threshold={:.1} window={}ms offense={} replica={}",
            d.reason,
            d.evidence.count,
            d.evidence.error_bound,
            d.evidence.threshold,
            d.evidence.window_ms,
            d.offense,
            d.replica
        );
        let ttl = Duration::from_millis(d.ttl_ms);
        match self
            .lists
            .add(ListKind::Block, &d.value, Some(ttl), &reason, Some(CODE))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.metrics
                    .apply_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e.to_string())
            }
        }
    }

    /// Recent decisions, newest first.
    pub fn decisions(&self) -> Vec<Recorded> {
        self.recent.lock().iter().rev().cloned().collect()
    }

    pub fn explain(&self, target: &Target) -> Explanation {
        self.detector.lock().explain(target)
    }

    /// The caller's trust and its inputs, and what the table on this replica holds for it
    /// (`None` for a prefix or the population, which have no trust).
    pub fn explain_trust(&self, target: &Target) -> Option<TrustExplained> {
        let key = match target {
            Target::Identity(l) => l.hash(),
            Target::Ip(ip) => subject("", Some(*ip))?,
            _ => return None,
        };
        let now = now_ms(&*self.clock);
        Some(TrustExplained {
            local: self.trust.lock().explain(key, now),
            in_force: self.trust_sink.table().get(key, now),
            shared: self.trust_sink.is_shared(),
        })
    }

    /// A manual unban: suppresses re-detection of the key, removes the block entry an
    /// anomaly decision wrote (never a manual one), marks its records. `Ok(false)` when there
    /// was neither a decision nor an anomaly entry for it.
    pub async fn unban(&self, target: &Target) -> Result<bool, String> {
        let now = now_ms(&*self.clock);
        self.detector.lock().unban(target, now);
        if let Some(key) = match target {
            Target::Identity(l) => Some(l.hash()),
            Target::Ip(ip) => subject("", Some(*ip)),
            _ => None,
        } {
            self.trust.lock().unthrottle(key);
        }
        let value = target.value();
        let mut found = false;
        for r in self.recent.lock().iter_mut() {
            if r.decision.value == value && r.unbanned_at_ms.is_none() {
                r.unbanned_at_ms = Some(now);
                found = true;
            }
        }
        let ours = self
            .lists
            .entries(ListKind::Block)
            .into_iter()
            .any(|e| e.value == value && e.code.as_deref() == Some(CODE));
        if ours {
            self.lists
                .remove(ListKind::Block, &value)
                .await
                .map_err(|e| e.to_string())?;
            found = true;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_text_parses_to_targets() {
        assert_eq!(
            parse_target("203.0.113.7"),
            Some(Target::Ip("203.0.113.7".parse().unwrap()))
        );
        assert_eq!(
            parse_target("203.0.113.0/24").map(|t| t.scope()),
            Some(Scope::Ipv4Slash24)
        );
        assert_eq!(
            parse_target("2001:db8:1:2::/64").map(|t| t.value()),
            Some("2001:db8:1:2::/64".to_string())
        );
        assert_eq!(parse_target("10.0.0.0/8"), None);
        assert_eq!(
            parse_target("user:alice").map(|t| t.scope()),
            Some(Scope::Identity)
        );
        assert_eq!(parse_target(""), None);
    }
}
