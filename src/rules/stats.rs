//! Per-rule counters with envoyproxy/ratelimit's names (`total_hits`, `over_limit`,
//! `near_limit`, `within_limit`, `shadow_mode`).
//!
//! Stats live in a registry keyed by a typed `StatKey` (domain, rule key, request value),
//! outside any `RuleSet`, so a reload hands the same counters to the recompiled rules and
//! Prometheus never sees them go backwards. The parts stay apart all the way to the labels: a
//! domain with a dot (`api.v1`) is never split again.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Which series: the `domain` and `key` labels, and `value` for per-value series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatKey {
    pub domain: Box<str>,
    /// The reference's stat key below the domain: `key1_value1.key2`.
    pub key: Box<str>,
    /// For `detailed_metric` series: `key1_value1.key2_value2` of the request; else empty.
    pub value: Box<str>,
}

impl std::fmt::Display for StatKey {
    /// `domain.key`, or `domain.key|value`: the reference's full stat name (logs, tests).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.domain, self.key)?;
        if !self.value.is_empty() {
            write!(f, "|{}", self.value)?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct RuleStats {
    pub total_hits: AtomicU64,
    pub over_limit: AtomicU64,
    pub near_limit: AtomicU64,
    pub within_limit: AtomicU64,
    pub shadow_mode: AtomicU64,
}

impl RuleStats {
    pub fn add(field: &AtomicU64, n: u64) {
        if n > 0 {
            field.fetch_add(n, Relaxed);
        }
    }
}

/// Bounded: per-value series (`detailed_metric`) stop being created past `max_series`, and
/// their hits are then only counted on the rule's own series.
#[derive(Debug)]
pub struct StatsRegistry {
    series: Mutex<BTreeMap<StatKey, Arc<RuleStats>>>,
    max_series: usize,
}

impl Default for StatsRegistry {
    fn default() -> Self {
        StatsRegistry::new(10_000)
    }
}

impl StatsRegistry {
    pub fn new(max_series: usize) -> Self {
        StatsRegistry {
            series: Mutex::new(BTreeMap::new()),
            max_series,
        }
    }

    /// The stats of a config rule (always created: their number is bounded by the config).
    pub fn get(&self, domain: &str, key: &str) -> Arc<RuleStats> {
        let id = StatKey {
            domain: domain.into(),
            key: key.into(),
            value: "".into(),
        };
        self.series.lock().entry(id).or_default().clone()
    }

    /// The stats of a request value, for rules that ask for detailed metrics.
    pub fn get_detailed(&self, domain: &str, key: &str, value: &str) -> Option<Arc<RuleStats>> {
        let id = StatKey {
            domain: domain.into(),
            key: key.into(),
            value: value.into(),
        };
        let mut series = self.series.lock();
        if let Some(s) = series.get(&id) {
            return Some(s.clone());
        }
        if series.len() >= self.max_series {
            return None;
        }
        let s = Arc::new(RuleStats::default());
        series.insert(id, s.clone());
        Some(s)
    }

    pub fn snapshot(&self) -> Vec<(StatKey, Arc<RuleStats>)> {
        self.series
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
