//! The decision engine: one `ShouldRateLimit` answer — validate, match, count, report — as
//! envoyproxy/ratelimit gives it, plus our algorithms and semantics. Plain Rust that the gRPC
//! service, ext_authz policies and tests call alike.
//!
//! Owns: planning the counters a request touches, the storage call, the failure mode when
//! storage fails, stats and verdicts. Must not touch: gRPC, configuration loading, the
//! algorithms' arithmetic (limiter) or storage internals.

use crate::anomaly::{Adaptive, TrustQ, TrustTable};
use crate::limiter::{Clock, Limit, Nanos, Outcome, RejectedHits, Unit};
use crate::rules::{self, Rule, RuleLimit, RuleSet, RuleStats, StatsRegistry};
use crate::storage::{CounterOp, Storage, StorageError};
use crate::telemetry::ServiceMetrics;
use crate::telemetry::violations::{self, Violation, ViolationKind};
use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry as PbEntry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit::Unit as PbUnit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a request was refused before any counting. Each maps to INVALID_ARGUMENT, except
/// storage failures (UNAVAILABLE).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("rate limit domain must not be empty")]
    EmptyDomain,
    #[error("rate limit descriptor list must not be empty")]
    NoDescriptors,
    #[error("descriptor {0} has no entries")]
    EmptyDescriptor(usize),
    #[error("descriptor {descriptor} entry {entry} has an empty key")]
    EmptyKey { descriptor: usize, entry: usize },
    #[error("descriptor {0} limit override has an unknown unit")]
    BadOverrideUnit(usize),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl rules::Entry for PbEntry {
    fn key(&self) -> &str {
        &self.key
    }
    fn value(&self) -> &str {
        &self.value
    }
}

/// What `evaluate` does when the storage cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStorageFailure {
    /// Answer by the store's `failure_mode` (allow, deny, local): `ShouldRateLimit`.
    FailureMode,
    /// Decide with the local limiter under `failure_mode: local`; otherwise return the
    /// error, for the caller's own failure mode (ext_authz's `authz.failure_mode`).
    LocalOrError,
}

/// At most one storage-failure log line per this many nanoseconds.
const LOG_EVERY: Nanos = 1_000_000_000;

/// Decides `ShouldRateLimit` requests against the rules in force.
#[derive(Clone)]
pub struct RateLimitEngine {
    rules: Arc<ArcSwap<RuleSet>>,
    storage: Arc<Storage>,
    clock: Arc<dyn Clock>,
    stats: Arc<StatsRegistry>,
    metrics: Arc<ServiceMetrics>,
    /// Callers' trust, read by adaptive limits (empty unless the anomaly module is on).
    trust: Arc<TrustTable>,
    /// Storage failures since the last log line, and when the next may be written.
    failure_log: Arc<(AtomicU64, AtomicU64)>,
}

impl std::fmt::Debug for RateLimitEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitEngine")
            .field("version", &self.rules.load().version)
            .field("storage", &self.storage.kind())
            .finish_non_exhaustive()
    }
}

/// What one request descriptor resolved to before counting.
enum Plan<'a> {
    /// Unknown domain, no rule, a whitelist node, or every limit replaced.
    NoLimit,
    Unlimited,
    Limits {
        rule: Option<&'a Arc<Rule>>,
        ops: std::ops::Range<usize>,
        hits: u32,
    },
}

/// Most requests carry a handful of descriptors, each with one or two limits.
type Ops = SmallVec<[CounterOp; 8]>;

/// A request descriptor as the rule engine reads it, whoever built it: a `ShouldRateLimit`
/// descriptor as it arrived, or one ext_authz built from request attributes (borrowing the
/// request's strings, so nothing is copied).
pub trait Descriptor {
    type Entry: rules::Entry;
    fn entries(&self) -> &[Self::Entry];
    /// Hits of this descriptor; `None` takes the request's.
    fn hits(&self) -> Option<u32> {
        None
    }
    /// Envoy's `is_negative_hits`: give the hits back.
    fn is_negative(&self) -> bool {
        false
    }
    /// Envoy's per-descriptor limit override.
    fn limit_override(&self) -> Option<&RateLimitOverride> {
        None
    }
}

impl Descriptor for RateLimitDescriptor {
    type Entry = PbEntry;
    fn entries(&self) -> &[PbEntry] {
        &self.entries
    }
    fn hits(&self) -> Option<u32> {
        self.hits_addend
            .as_ref()
            .map(|h| u32::try_from(h.value).unwrap_or(u32::MAX))
    }
    fn is_negative(&self) -> bool {
        self.is_negative_hits
    }
    fn limit_override(&self) -> Option<&RateLimitOverride> {
        self.limit.as_ref()
    }
}

/// The limit a verdict reports.
#[derive(Debug, Clone)]
pub struct VerdictLimit {
    /// The `name` from config, if any.
    pub name: Option<Arc<str>>,
    pub limit: Limit,
}

/// What the engine decided for one descriptor.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// An enforced limit rejected this descriptor (shadow-mode rejections are not).
    pub over_limit: bool,
    /// `None`: no limit applies (unmatched, whitelisted, replaced or unlimited).
    pub limit: Option<VerdictLimit>,
    /// Requests still admissible (u32::MAX for `unlimited`).
    pub remaining: u32,
    /// Nanoseconds until the reported limit resets (see `limiter::Outcome`).
    pub reset_after: Nanos,
}

impl Verdict {
    fn no_limit(remaining: u32) -> Verdict {
        Verdict {
            over_limit: false,
            limit: None,
            remaining,
            reset_after: 0,
        }
    }
}

/// One verdict per descriptor; inline for the usual handful.
pub type Verdicts = SmallVec<[Verdict; 4]>;

impl RateLimitEngine {
    pub fn new(
        rules: Arc<ArcSwap<RuleSet>>,
        storage: Arc<Storage>,
        clock: Arc<dyn Clock>,
        stats: Arc<StatsRegistry>,
        metrics: Arc<ServiceMetrics>,
    ) -> Self {
        RateLimitEngine {
            rules,
            storage,
            clock,
            stats,
            metrics,
            trust: Arc::default(),
            failure_log: Arc::default(),
        }
    }

    /// Adaptive limits read callers' trust from `table` (the anomaly module writes it).
    pub fn with_trust(mut self, table: Arc<TrustTable>) -> Self {
        self.trust = table;
        self
    }

    pub fn trust(&self) -> &Arc<TrustTable> {
        &self.trust
    }

    /// Logs a storage failure, at most once a second with the count since the last line.
    fn log_storage_failure(&self, e: &StorageError, now: Nanos) {
        let (count, next) = &*self.failure_log;
        count.fetch_add(1, Relaxed);
        let due = next.load(Relaxed);
        if now >= due
            && next
                .compare_exchange(due, now.saturating_add(LOG_EVERY), Relaxed, Relaxed)
                .is_ok()
        {
            let n = count.swap(0, Relaxed);
            tracing::warn!(
                failures = n,
                "storage error: {e}; answering by the failure mode (at most one line a second)"
            );
        }
    }

    pub fn rules(&self) -> &Arc<ArcSwap<RuleSet>> {
        &self.rules
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The clock decisions are made on; background tasks that expire state take it too.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// Puts an OVER_LIMIT answer in the violation ring (sampled; nothing is built when the
    /// second's budget is spent): its first rejected descriptor, values truncated.
    fn record_violation(&self, req: &RateLimitRequest, resp: &RateLimitResponse) {
        let unix_ms = self.clock.now() / 1_000_000;
        let log = &self.metrics.violations;
        if !log.admit(unix_ms) {
            return;
        }
        let over = resp
            .statuses
            .iter()
            .position(|s| s.code == Code::OverLimit as i32);
        let descriptor = over.and_then(|i| req.descriptors.get(i));
        let limit = over
            .and_then(|i| resp.statuses.get(i))
            .and_then(|s| s.current_limit.as_ref())
            .map(|l| l.name.clone())
            .unwrap_or_default();
        log.push(Violation {
            seq: 0,
            unix_ms,
            kind: ViolationKind::OverLimit,
            domain: violations::truncate(&req.domain),
            entries: descriptor
                .map(|d| {
                    d.entries
                        .iter()
                        .map(|e| (violations::truncate(&e.key), violations::truncate(&e.value)))
                        .collect()
                })
                .unwrap_or_default(),
            limit,
            identity: String::new(),
        });
    }

    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, RequestError> {
        self.metrics.requests.fetch_add(1, Relaxed);
        let result = self.decide(req).await;
        match &result {
            Ok(r) if r.overall_code == Code::OverLimit as i32 => {
                self.metrics.over_limit.fetch_add(1, Relaxed);
                self.record_violation(req, r);
            }
            Ok(_) => {}
            Err(RequestError::Storage(_)) => {
                self.metrics.storage_errors.fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.metrics.invalid_requests.fetch_add(1, Relaxed);
            }
        }
        result
    }

    async fn decide(&self, req: &RateLimitRequest) -> Result<RateLimitResponse, RequestError> {
        validate(req)?;
        // The reference reads an unset (zero) request-level hits_addend as one hit.
        let request_hits = if req.hits_addend == 0 {
            1
        } else {
            req.hits_addend
        };
        let mut verdicts = Verdicts::new();
        let over = self
            .evaluate(
                &req.domain,
                &req.descriptors,
                request_hits,
                &mut verdicts,
                OnStorageFailure::FailureMode,
            )
            .await?;
        Ok(response(verdicts, over))
    }

    /// Decides the descriptors of one request in `domain` against the rules in force: the
    /// rule engine shared by `ShouldRateLimit` and ext_authz. Fills one `Verdict` per
    /// descriptor, in order, and returns whether any enforced limit rejected the request.
    /// All counters of the request are decided in one storage call, so a rejected request
    /// consumes nothing (unless `count_rejected_hits`).
    pub async fn evaluate<D: Descriptor>(
        &self,
        domain: &str,
        descriptors: &[D],
        request_hits: u32,
        verdicts: &mut Verdicts,
        on_failure: OnStorageFailure,
    ) -> Result<bool, RequestError> {
        let rules = self.rules.load();
        let mut ops = Ops::new();
        let mut names = LimitNames::new();
        let trust = TrustLookup::new(&self.trust, self.clock.now());
        let plans = plan(
            &rules,
            domain,
            descriptors,
            request_hits,
            trust,
            &mut ops,
            &mut names,
        )?;
        self.count(&mut ops, rules.settings.rejected_hits, on_failure)
            .await?;
        verdicts.clear();
        let mut over = false;
        for (plan, d) in plans.iter().zip(descriptors) {
            let verdict = self.verdict(&rules, plan, d.entries(), &ops, &names);
            over |= verdict.over_limit;
            verdicts.push(verdict);
        }
        Ok(over)
    }

    /// Phase 2: every counter of the request in one storage call. A storage failure is
    /// answered by the failure mode (counted as the reference's `redis_error`), or returned
    /// when the caller decides failures itself (ext_authz without a local fallback).
    async fn count(
        &self,
        ops: &mut Ops,
        rejected_hits: RejectedHits,
        on_failure: OnStorageFailure,
    ) -> Result<(), RequestError> {
        if ops.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let Err(e) = self.storage.check_and_update(ops, now, rejected_hits).await else {
            return Ok(());
        };
        self.log_storage_failure(&e, now);
        match on_failure {
            OnStorageFailure::FailureMode => {
                self.metrics.storage_errors.fetch_add(1, Relaxed);
            }
            OnStorageFailure::LocalOrError if self.storage.decides_locally_on_failure() => {}
            OnStorageFailure::LocalOrError => return Err(e.into()),
        }
        self.storage.answer_failure(ops, now, rejected_hits);
        Ok(())
    }

    /// Phase 3: one descriptor's verdict from its counters' outcomes, with its stats.
    fn verdict<E: rules::Entry>(
        &self,
        rules: &RuleSet,
        plan: &Plan<'_>,
        entries: &[E],
        ops: &Ops,
        names: &LimitNames<'_>,
    ) -> Verdict {
        let Plan::Limits {
            rule,
            ops: range,
            hits,
        } = plan
        else {
            return match plan {
                Plan::Unlimited => Verdict::no_limit(u32::MAX),
                _ => Verdict::no_limit(0),
            };
        };
        let (j, outcome) = reported(&ops[range.clone()]);
        let op = &ops[range.start + j];
        let shadow = rule.is_some_and(|r| r.shadow_mode);
        let rejected = ops[range.clone()]
            .iter()
            .any(|o| o.outcome.is_some_and(|x| !x.allowed));
        let stats = rule.map_or(rules.override_stats(), |r| &r.stats);
        let settings = &rules.settings;
        self.record(
            stats,
            rule,
            entries,
            *hits,
            rejected,
            shadow,
            &outcome,
            &op.limit,
            settings.near_limit_ratio,
        );
        Verdict {
            over_limit: rejected && !shadow,
            limit: Some(VerdictLimit {
                name: names[range.start + j].cloned(),
                limit: op.limit,
            }),
            remaining: outcome.remaining,
            reset_after: outcome.reset_after,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record<E: rules::Entry>(
        &self,
        stats: &RuleStats,
        rule: &Option<&Arc<Rule>>,
        entries: &[E],
        hits: u32,
        rejected: bool,
        shadow: bool,
        outcome: &Outcome,
        limit: &Limit,
        near_ratio: f64,
    ) {
        let apply = |s: &RuleStats| {
            let hits = hits as u64;
            RuleStats::add(&s.total_hits, hits);
            if rejected {
                RuleStats::add(&s.over_limit, hits);
                if shadow {
                    RuleStats::add(&s.shadow_mode, hits);
                }
            } else {
                RuleStats::add(&s.within_limit, hits);
                let used = limit.requests_per_unit.saturating_sub(outcome.remaining) as f64;
                if used > (limit.requests_per_unit as f64 * near_ratio).floor() {
                    RuleStats::add(&s.near_limit, hits);
                }
            }
        };
        apply(stats);
        // Per-value series only when the rule asks: their cardinality is the request's.
        if let Some(r) = rule
            && (r.detailed_metric || r.value_to_metric)
        {
            let mut value = String::new();
            for (i, e) in entries.iter().enumerate() {
                if i > 0 {
                    value.push('.');
                }
                value.push_str(e.key());
                value.push('_');
                // Bound label size: values can be megabytes long.
                value.push_str(truncate(e.value(), 128));
            }
            if let Some(s) = self
                .stats
                .get_detailed(&r.stat_domain, &r.stat_name, &value)
            {
                apply(&s);
            }
        }
    }
}

/// The name of each counter op's limit, index for index (for `current_limit.name`).
type LimitNames<'a> = SmallVec<[Option<&'a Arc<str>>; 8]>;

/// Phase 1: which counters the request touches. Matches every descriptor against the rules
/// in force (Envoy's per-descriptor `limit` override first), drops replaced limits, and
/// pushes one op per limit with its counter key; returns one plan per descriptor.
fn plan<'r, D: Descriptor>(
    rules: &'r RuleSet,
    domain: &str,
    descriptors: &[D],
    request_hits: u32,
    trust: TrustLookup<'_>,
    ops: &mut Ops,
    names: &mut LimitNames<'r>,
) -> Result<SmallVec<[Plan<'r>; 8]>, RequestError> {
    let matcher = rules.domain(domain);
    let found: SmallVec<[Option<&Arc<Rule>>; 8]> = descriptors
        .iter()
        .map(|d| matcher.and_then(|m| m.find(d.entries())))
        .collect();
    let replaced = replaced_names(&found);
    let mut p = Planner { ops, names, trust };
    let mut plans = SmallVec::new();
    for (i, d) in descriptors.iter().enumerate() {
        let hits = d.hits().unwrap_or(request_hits);
        // Envoy's override (from dynamic metadata) wins over config, as in the reference,
        // but only inside a configured domain.
        if let (Some(o), Some(_)) = (d.limit_override(), matcher) {
            let limit =
                override_limit(&rules.settings, o).ok_or(RequestError::BadOverrideUnit(i))?;
            plans.push(p.plan_override(domain, limit, d, hits));
            continue;
        }
        plans.push(match found[i] {
            None => Plan::NoLimit,
            Some(rule) if rule.unlimited => Plan::Unlimited,
            Some(rule) => p.plan_rule(rule, &replaced, d, descriptors, hits),
        });
    }
    Ok(plans)
}

/// Where phase 1 puts what it plans: the request's counter ops and their limits' names.
struct Planner<'r, 'o, 't> {
    ops: &'o mut Ops,
    names: &'o mut LimitNames<'r>,
    trust: TrustLookup<'t>,
}

impl<'r> Planner<'r, '_, '_> {
    /// Envoy's override: one counter, keyed by the domain and the override itself.
    fn plan_override<D: Descriptor>(
        &mut self,
        domain: &str,
        limit: Limit,
        d: &D,
        hits: u32,
    ) -> Plan<'r> {
        let start = self.ops.len();
        let mut op = CounterOp::new(
            rules::override_key(domain, &limit, d.entries()),
            limit,
            hits,
            false,
        );
        op.negative = d.is_negative();
        self.ops.push(op);
        self.names.push(None);
        Plan::Limits {
            rule: None,
            ops: start..self.ops.len(),
            hits,
        }
    }

    /// A configured rule: one counter per limit another descriptor's rule doesn't replace,
    /// scaled by the caller's trust when the limit is adaptive.
    fn plan_rule<D: Descriptor>(
        &mut self,
        rule: &'r Arc<Rule>,
        replaced: &[&str],
        d: &D,
        descriptors: &[D],
        hits: u32,
    ) -> Plan<'r> {
        let start = self.ops.len();
        for l in rule
            .limits
            .iter()
            .filter(|l| !is_replaced(replaced, l.name.as_deref()))
        {
            let key = rule.counter_key(l, d.entries());
            let limit = self.trust.effective(l, descriptors);
            let mut op = CounterOp::new(key, limit, hits, rule.shadow_mode);
            op.negative = d.is_negative();
            self.ops.push(op);
            self.names.push(l.name.as_ref());
        }
        if self.ops.len() == start {
            return Plan::NoLimit;
        }
        Plan::Limits {
            rule: Some(rule),
            ops: start..self.ops.len(),
            hits,
        }
    }
}

/// The caller's trust, looked up at most once per request and only when an adaptive limit
/// matched: the request path of a config without `adaptive` pays one branch per limit.
struct TrustLookup<'t> {
    table: &'t TrustTable,
    now_ms: u64,
    looked_up: Option<Option<TrustQ>>,
}

impl<'t> TrustLookup<'t> {
    fn new(table: &'t TrustTable, now: Nanos) -> Self {
        TrustLookup {
            table,
            now_ms: now / 1_000_000,
            looked_up: None,
        }
    }

    /// `l`'s limit as enforced for this request: scaled by the caller's factor when
    /// adaptive (the counter key is the same either way).
    #[inline]
    fn effective<D: Descriptor>(&mut self, l: &RuleLimit, descriptors: &[D]) -> Limit {
        let Some(adaptive) = &l.adaptive else {
            return l.limit;
        };
        let trust = *self.looked_up.get_or_insert_with(|| {
            caller(descriptors).and_then(|key| self.table.get(key, self.now_ms))
        });
        let factor = adaptive.factor(trust);
        Limit {
            requests_per_unit: Adaptive::scale(l.limit.requests_per_unit, factor),
            burst: Adaptive::scale(l.limit.burst, factor),
            ..l.limit
        }
    }
}

/// Whose trust applies: the request's `identity` entry (ext_authz's `identity` action, or a
/// header action with `descriptor_key: identity`), else its `remote_address` — the same
/// keys the anomaly module learns trust under.
fn caller<D: Descriptor>(descriptors: &[D]) -> Option<u64> {
    let mut address = None;
    use rules::Entry as _;
    for e in descriptors.iter().flat_map(|d| d.entries()) {
        match e.key() {
            "identity" if !e.value().is_empty() => {
                return crate::anomaly::subject(e.value(), None);
            }
            "remote_address" if address.is_none() => address = e.value().parse().ok(),
            _ => {}
        }
    }
    crate::anomaly::subject("", address)
}

/// The limit of Envoy's per-descriptor override, with the default algorithm; `None` for an
/// unknown unit.
fn override_limit(settings: &crate::config::Settings, o: &RateLimitOverride) -> Option<Limit> {
    let algorithm = settings.default_algorithm;
    Some(Limit {
        algorithm,
        requests_per_unit: o.requests_per_unit,
        unit: unit_from_pb(o.unit)?,
        burst: algorithm.default_burst(o.requests_per_unit).max(1),
        block_duration: 0,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn validate(req: &RateLimitRequest) -> Result<(), RequestError> {
    if req.domain.is_empty() {
        return Err(RequestError::EmptyDomain);
    }
    if req.descriptors.is_empty() {
        return Err(RequestError::NoDescriptors);
    }
    for (i, d) in req.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return Err(RequestError::EmptyDescriptor(i));
        }
        if let Some(j) = d.entries.iter().position(|e| e.key.is_empty()) {
            return Err(RequestError::EmptyKey {
                descriptor: i,
                entry: j,
            });
        }
    }
    Ok(())
}

/// Limit names replaced by other matched limits of the same request (the reference's
/// `replaces`). Allocates only when some matched limit replaces another.
fn replaced_names<'a>(found: &[Option<&'a Arc<Rule>>]) -> SmallVec<[&'a str; 4]> {
    let mut names = SmallVec::new();
    for rule in found.iter().flatten() {
        for l in &rule.limits {
            names.extend(l.replaces.iter().map(|n| &**n));
        }
    }
    names
}

fn is_replaced(replaced: &[&str], name: Option<&str>) -> bool {
    name.is_some_and(|n| replaced.contains(&n))
}

/// Among several limits of one descriptor, the one to report: a rejecting limit with the
/// longest wait if any rejects, otherwise the one with the least remaining.
fn reported(ops: &[CounterOp]) -> (usize, Outcome) {
    let mut best: Option<(usize, Outcome)> = None;
    for (j, op) in ops.iter().enumerate() {
        let Some(o) = op.outcome else { continue };
        let better = match &best {
            None => true,
            Some((_, b)) => match (o.allowed, b.allowed) {
                (false, true) => true,
                (true, false) => false,
                (false, false) => o.reset_after > b.reset_after,
                (true, true) => {
                    o.remaining < b.remaining
                        || (o.remaining == b.remaining && o.reset_after > b.reset_after)
                }
            },
        };
        if better {
            best = Some((j, o));
        }
    }
    // Storage fills every outcome; an op without one would be a storage bug, reported as
    // an admitted look so the request is still answered.
    best.unwrap_or((
        0,
        Outcome {
            allowed: true,
            remaining: 0,
            reset_after: 0,
            expires_at: 0,
        },
    ))
}

/// Phase 4 of ShouldRateLimit: the verdicts as Envoy's answer.
fn response(verdicts: Verdicts, over: bool) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = verdicts.into_iter().map(status).collect();
    let overall = if over { Code::OverLimit } else { Code::Ok };
    let response_headers_to_add = if over {
        vec![retry_after(&statuses)]
    } else {
        Vec::new()
    };
    RateLimitResponse {
        overall_code: overall as i32,
        statuses,
        response_headers_to_add,
        ..Default::default()
    }
}

/// One descriptor's status: its limit, what remains and when it resets.
fn status(v: Verdict) -> DescriptorStatus {
    let Some(l) = v.limit else {
        return ok_status(v.remaining);
    };
    DescriptorStatus {
        code: if v.over_limit {
            Code::OverLimit as i32
        } else {
            Code::Ok as i32
        },
        current_limit: Some(RateLimit {
            name: l.name.as_deref().unwrap_or_default().to_string(),
            requests_per_unit: l.limit.requests_per_unit,
            unit: unit_to_pb(l.limit.unit) as i32,
        }),
        limit_remaining: v.remaining,
        duration_until_reset: Some(duration(v.reset_after)),
        quota: None,
    }
}

/// Envoy adds this to its 429: clients learn when to come back (the longest wait among the
/// limits that rejected, in whole seconds, rounded up).
fn retry_after(statuses: &[DescriptorStatus]) -> HeaderValue {
    let wait = statuses
        .iter()
        .filter(|s| s.code == Code::OverLimit as i32)
        .filter_map(|s| s.duration_until_reset.as_ref())
        .map(|d| d.seconds.max(0) as u64 + u64::from(d.nanos > 0))
        .max()
        .unwrap_or(0);
    HeaderValue {
        key: "retry-after".into(),
        value: wait.to_string(),
        raw_value: Vec::new(),
    }
}

fn ok_status(remaining: u32) -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        limit_remaining: remaining,
        ..Default::default()
    }
}

fn duration(nanos: u64) -> PbDuration {
    PbDuration {
        seconds: (nanos / 1_000_000_000) as i64,
        nanos: (nanos % 1_000_000_000) as i32,
    }
}

pub fn unit_to_pb(unit: Unit) -> PbUnit {
    match unit {
        Unit::Second => PbUnit::Second,
        Unit::Minute => PbUnit::Minute,
        Unit::Hour => PbUnit::Hour,
        Unit::Day => PbUnit::Day,
        Unit::Week => PbUnit::Week,
        Unit::Month => PbUnit::Month,
        Unit::Year => PbUnit::Year,
    }
}

pub fn unit_from_pb(unit: i32) -> Option<Unit> {
    Some(match PbUnit::try_from(unit).ok()? {
        PbUnit::Second => Unit::Second,
        PbUnit::Minute => Unit::Minute,
        PbUnit::Hour => Unit::Hour,
        PbUnit::Day => Unit::Day,
        PbUnit::Week => Unit::Week,
        PbUnit::Month => Unit::Month,
        PbUnit::Year => Unit::Year,
        PbUnit::Unknown => return None,
    })
}

#[cfg(test)]
mod tests;
