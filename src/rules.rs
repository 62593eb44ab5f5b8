//! Descriptor matching: turns a loaded `Config` into a `RuleSet`, compiled once per config
//! version, and answers "which limits apply to this request descriptor?".
//!
//! Owns: the match tree (exact value, then wildcard in config order, then key-only, at the
//! request descriptor's own depth — envoyproxy/ratelimit's rules, on (key, value) pairs rather
//! than its joined `key_value` strings), rule identities (which decide whether counters
//! survive a reload) and the per-rule statistics.
//!
//! Must not touch: counting (limiter, storage), YAML (config) or gRPC types.

mod matcher;
mod stats;
mod wildcard;

#[cfg(test)]
mod tests;

pub use matcher::{DescriptorMatcher, Entry};
pub use stats::{RuleStats, StatKey, StatsRegistry};
pub use wildcard::Wildcard;

use crate::config::{Config, DescriptorConfig, RateLimitConfig, Settings};
use crate::digest::Fnv64;
use crate::limiter::{Limit, Unit};
use std::collections::HashMap;
use std::sync::Arc;

/// Identifies a counter: a 128-bit digest of the limit's fingerprint and the request's
/// (key, value) pairs. Fixed-size so the hot path never allocates a key string.
pub type CounterKey = u128;

/// One config node on the way to a rule: its key and value (`None`: any value).
type PathEntry = (String, Option<String>);

/// One limit of a rule, ready to be asked.
#[derive(Debug)]
pub struct RuleLimit {
    pub limit: Limit,
    /// The `name` from config, reported in `current_limit.name` and used by `replaces`.
    pub name: Option<Arc<str>>,
    pub replaces: Vec<Arc<str>>,
    /// Digest of everything that makes two limits count the same thing: domain, the
    /// descriptor path and the limit's parameters. Unchanged rules keep their fingerprint
    /// across reloads, so their counters carry over.
    pub fingerprint: u64,
    /// Scale the limit by the caller's trust. Not part of the fingerprint: turning it on or
    /// off, or the factor moving, never resets the counter.
    pub adaptive: Option<crate::anomaly::Adaptive>,
}

/// What a matched descriptor node says.
#[derive(Debug)]
pub struct Rule {
    /// `domain.key_value.key` as envoyproxy/ratelimit names its stats.
    pub stat_key: Arc<str>,
    /// The stat key's parts: the domain and the rest (`key1_value1.key2`).
    pub stat_domain: Arc<str>,
    pub stat_name: Arc<str>,
    pub limits: Vec<RuleLimit>,
    pub unlimited: bool,
    pub shadow_mode: bool,
    pub detailed_metric: bool,
    pub value_to_metric: bool,
    /// Per entry depth, the wildcard pattern that stands for the request's value in counter
    /// keys (`share_threshold`): every matching value shares one counter. Empty when none.
    pub shared_values: Box<[Option<Box<str>>]>,
    pub stats: Arc<RuleStats>,
}

impl Rule {
    /// The counter of `limit` (one of this rule's) for a request's `entries`, with the rule's
    /// shared wildcard patterns in place of the values they cover.
    #[inline]
    pub fn counter_key<E: Entry>(&self, limit: &RuleLimit, entries: &[E]) -> CounterKey {
        let pairs = entries.iter().enumerate();
        counter_key(
            limit.fingerprint,
            pairs.map(|(i, e)| (e.key(), self.key_value(i, e.value()))),
        )
    }

    /// The value a request entry at `depth` contributes to a counter key.
    #[inline]
    pub fn key_value<'a>(&'a self, depth: usize, value: &'a str) -> &'a str {
        match self.shared_values.get(depth) {
            Some(Some(pattern)) => pattern,
            _ => value,
        }
    }
}

/// The compiled rules of one config version. Immutable; swapped whole on reload.
#[derive(Debug)]
pub struct RuleSet {
    pub version: String,
    pub settings: Settings,
    domains: HashMap<Box<str>, DescriptorMatcher, foldhash::fast::RandomState>,
    /// Limits created on the fly for descriptors carrying Envoy's `limit` override, keyed
    /// by domain so their stats land under it.
    override_stats: Arc<RuleStats>,
}

impl RuleSet {
    /// An empty rule set: every request is answered OK without a limit.
    pub fn empty(stats: &StatsRegistry) -> RuleSet {
        RuleSet {
            version: String::new(),
            settings: Settings::default(),
            domains: HashMap::default(),
            override_stats: stats.get("override", ""),
        }
    }

    pub fn compile(config: &Config, stats: &StatsRegistry) -> RuleSet {
        let settings = config.settings.clone();
        let mut domains = HashMap::default();
        for domain in &config.domains {
            let mut matcher = DescriptorMatcher::default();
            for d in &domain.descriptors {
                compile_descriptor(
                    &mut matcher,
                    &settings,
                    stats,
                    &domain.domain,
                    &mut Vec::new(),
                    &mut Vec::new(),
                    d,
                );
            }
            domains.insert(domain.domain.as_str().into(), matcher);
        }
        RuleSet {
            version: config.version.clone(),
            settings,
            domains,
            override_stats: stats.get("override", ""),
        }
    }

    pub fn domain(&self, domain: &str) -> Option<&DescriptorMatcher> {
        self.domains.get(domain)
    }

    /// Every rule of every domain (for the admin API; not the request path).
    pub fn all_rules(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.domains.values().flat_map(|m| m.rules())
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    pub fn override_stats(&self) -> &Arc<RuleStats> {
        &self.override_stats
    }
}

/// The counter of a limit carried in a request (`descriptor.limit`, from Envoy's dynamic
/// metadata) for `entries`: keyed by the domain and the override itself, like the reference.
pub fn override_key<E: Entry>(domain: &str, limit: &Limit, entries: &[E]) -> CounterKey {
    let fingerprint = override_fingerprint(domain, limit);
    counter_key(fingerprint, entries.iter().map(|e| (e.key(), e.value())))
}

fn override_fingerprint(domain: &str, limit: &Limit) -> u64 {
    let mut h = Fnv64::new();
    h.write(b"override\0");
    h.write(domain.as_bytes());
    h.write_u64(limit.requests_per_unit as u64);
    h.write_u64(limit.unit.seconds());
    h.finish()
}

/// Digest of a limit and the request's entries: the storage key of one counter. Every
/// counter's identity is made here ([`Rule::counter_key`], [`override_key`]); storage only
/// names it (`rl:{<hex>}` in Redis).
#[inline]
fn counter_key<'a>(
    fingerprint: u64,
    entries: impl Iterator<Item = (&'a str, &'a str)>,
) -> CounterKey {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(&fingerprint.to_le_bytes());
    for (k, v) in entries {
        // Length prefixes make ("ab","c") and ("a","bc") different keys.
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    h.digest128()
}

fn compile_descriptor(
    parent: &mut DescriptorMatcher,
    settings: &Settings,
    stats: &StatsRegistry,
    domain: &str,
    path: &mut Vec<(String, Option<String>)>,
    shared: &mut Vec<Option<Box<str>>>,
    d: &DescriptorConfig,
) {
    // The reference reads `value: ""` as no value at all (Go's zero value): key-only.
    let value = d.value.clone().filter(|v| !v.is_empty());
    path.push((d.key.clone(), value.clone()));
    shared.push(value.clone().filter(|_| d.share_threshold).map(Into::into));
    let stat_key = stat_key(domain, path);
    let rule = (!d.limits.is_empty())
        .then(|| compile_rule(settings, stats, domain, (path, shared), &stat_key, d));
    let mut node = DescriptorMatcher::with_rule(rule);
    for child in &d.descriptors {
        compile_descriptor(&mut node, settings, stats, domain, path, shared, child);
    }
    parent.insert(&d.key, value.as_deref(), node);
    path.pop();
    shared.pop();
}

fn compile_rule(
    settings: &Settings,
    stats: &StatsRegistry,
    domain: &str,
    (path, shared): (&[PathEntry], &[Option<Box<str>>]),
    stat_key: &str,
    d: &DescriptorConfig,
) -> Arc<Rule> {
    let unlimited = d.limits.iter().any(|l| l.unlimited);
    let limits = d
        .limits
        .iter()
        .filter(|l| !l.unlimited)
        .map(|l| compile_limit(settings, domain, path, l))
        .collect();
    Arc::new(Rule {
        stat_key: stat_key.into(),
        stat_domain: domain.into(),
        stat_name: stat_key.get(domain.len() + 1..).unwrap_or_default().into(),
        limits,
        unlimited,
        shadow_mode: d.shadow_mode,
        detailed_metric: d.detailed_metric,
        value_to_metric: d.value_to_metric,
        shared_values: if shared.iter().any(Option::is_some) {
            shared.into()
        } else {
            Box::default()
        },
        stats: stats.get(domain, stat_key.get(domain.len() + 1..).unwrap_or_default()),
    })
}

fn compile_limit(
    settings: &Settings,
    domain: &str,
    path: &[(String, Option<String>)],
    l: &RateLimitConfig,
) -> RuleLimit {
    let algorithm = l.algorithm.unwrap_or(settings.default_algorithm);
    let unit = l.unit.unwrap_or(Unit::Second);
    let limit = Limit {
        algorithm,
        requests_per_unit: l.requests_per_unit,
        unit,
        burst: l
            .burst
            .unwrap_or_else(|| algorithm.default_burst(l.requests_per_unit))
            .max(1),
        block_duration: l.block_duration.unwrap_or(0),
    };
    let mut h = Fnv64::new();
    h.write(domain.as_bytes());
    for (k, v) in path {
        h.write(&[0xff]);
        h.write(k.as_bytes());
        h.write(&[0xfe]);
        if let Some(v) = v {
            h.write(v.as_bytes());
        }
    }
    h.write(&[0xfd]);
    h.write(limit.algorithm.as_str().as_bytes());
    h.write_u64(limit.requests_per_unit as u64);
    h.write_u64(limit.unit.seconds());
    h.write_u64(limit.burst as u64);
    RuleLimit {
        limit,
        name: l.name.as_deref().map(Arc::from),
        replaces: l.replaces.iter().map(|s| Arc::from(s.as_str())).collect(),
        fingerprint: h.finish(),
        adaptive: l.adaptive,
    }
}

/// `domain.key1_value1.key2`: the reference's stat key for a config node.
fn stat_key(domain: &str, path: &[(String, Option<String>)]) -> String {
    let mut s = String::from(domain);
    for (k, v) in path {
        s.push('.');
        s.push_str(k);
        if let Some(v) = v {
            s.push('_');
            s.push_str(v);
        }
    }
    s
}
