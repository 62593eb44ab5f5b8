//! Per-rule counters with envoyproxy/ratelimit's names (`total_hits`, `over_limit`,
//! `near_limit`, `within_limit`, `shadow_mode`).
//!
//! Stats live in a registry keyed by stat key, outside any `RuleSet`, so a reload hands the
//! same counters to the recompiled rules and Prometheus never sees them go backwards.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    series: Mutex<BTreeMap<String, Arc<RuleStats>>>,
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
    pub fn get(&self, key: &str) -> Arc<RuleStats> {
        let mut series = self.series.lock();
        if let Some(s) = series.get(key) {
            return s.clone();
        }
        let s = Arc::new(RuleStats::default());
        series.insert(key.to_string(), s.clone());
        s
    }

    /// The stats of a request value, for rules that ask for detailed metrics.
    pub fn get_detailed(&self, key: &str) -> Option<Arc<RuleStats>> {
        let mut series = self.series.lock();
        if let Some(s) = series.get(key) {
            return Some(s.clone());
        }
        if series.len() >= self.max_series {
            return None;
        }
        let s = Arc::new(RuleStats::default());
        series.insert(key.to_string(), s.clone());
        Some(s)
    }

    pub fn snapshot(&self) -> Vec<(String, Arc<RuleStats>)> {
        self.series
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
