//! Metrics of the anomaly module, with fixed label sets: events in and dropped, decisions by
//! detector, action and mode, the detector's memory, the queue depth, the access log
//! service's entries, and the detection latency (end of the window that crossed a threshold
//! → entry in force, or recorded for dry-run) as a histogram.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::anomaly::{Action, DetectorKind};

const ACTIONS: [Action; 3] = [Action::Throttle, Action::Deny, Action::Alert];
const MODES: [&str; 2] = ["enforced", "dry_run"];
/// Upper bounds of the latency buckets, in milliseconds.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [10, 50, 100, 250, 500, 1000, 2000, 5000, 10_000, 30_000];

#[derive(Debug, Default)]
pub struct AnomalyMetrics {
    /// Events the detector took from the queue.
    pub events: AtomicU64,
    /// Access log: HTTP entries turned into events, entries skipped, streams that failed.
    pub log_entries: AtomicU64,
    pub log_skipped: AtomicU64,
    pub log_stream_errors: AtomicU64,
    /// Decisions the list store refused (Redis down, ...).
    pub apply_errors: AtomicU64,
    /// Trust publishes or polls that failed (Redis down): factors stay as last read.
    pub trust_errors: AtomicU64,
    /// Top-keys exchanges with other replicas that failed (Redis down), and exports from
    /// them that could not be read.
    pub merge_errors: AtomicU64,
    pub merge_bad: AtomicU64,
    decisions: [[[AtomicU64; 2]; 3]; 6],
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_ms: AtomicU64,
}

/// The values read at render time.
#[derive(Debug, Clone, Copy, Default)]
pub struct AnomalyGauges {
    pub dropped: u64,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub memory_bytes: usize,
    pub memory_bound: usize,
    pub tracked_keys: usize,
    /// Callers with trust state, refused for lack of room, and held in the request path's
    /// table.
    pub trust_identities: usize,
    pub trust_refused: u64,
    pub trust_table_entries: usize,
}

fn detector_index(d: DetectorKind) -> usize {
    DetectorKind::ALL.iter().position(|k| *k == d).unwrap_or(0)
}

fn action_index(a: Action) -> usize {
    ACTIONS.iter().position(|k| *k == a).unwrap_or(0)
}

impl AnomalyMetrics {
    pub fn decision(&self, d: DetectorKind, a: Action, dry_run: bool) {
        self.decisions[detector_index(d)][action_index(a)][usize::from(dry_run)]
            .fetch_add(1, Relaxed);
    }

    pub fn decisions(&self, d: DetectorKind, a: Action, dry_run: bool) -> u64 {
        self.decisions[detector_index(d)][action_index(a)][usize::from(dry_run)].load(Relaxed)
    }

    pub fn latency(&self, ms: u64) {
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[i].fetch_add(1, Relaxed);
        self.latency_sum_ms.fetch_add(ms, Relaxed);
    }

    pub fn render(&self, out: &mut String, g: &AnomalyGauges) {
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            out,
            "ratethrottle_anomaly_events_total",
            "Events the anomaly detector consumed.",
            self.events.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_anomaly_events_dropped_total",
            "Events dropped because the anomaly queue was full.",
            g.dropped,
        );
        counter(
            out,
            "ratethrottle_anomaly_access_log_entries_total",
            "Envoy access log HTTP entries turned into events.",
            self.log_entries.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_anomaly_access_log_skipped_total",
            "Envoy access log entries without a client address or status.",
            self.log_skipped.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_anomaly_access_log_stream_errors_total",
            "Envoy access log streams that ended with an error.",
            self.log_stream_errors.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_anomaly_apply_errors_total",
            "Decisions the list store refused.",
            self.apply_errors.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_anomaly_merge_errors_total",
            "Heavy-hitter exchanges with other replicas through Redis that failed.",
            self.merge_errors.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_anomaly_merge_unreadable_total",
            "Other replicas' heavy-hitter exports that could not be read (skipped).",
            self.merge_bad.load(Relaxed),
        );
        counter(
            out,
            "ratethrottle_adaptive_trust_errors_total",
            "Trust publishes or reads that failed (factors stay as last read).",
            self.trust_errors.load(Relaxed),
        );
        gauge(
            out,
            "ratethrottle_adaptive_identities",
            "Callers with trust state on this replica.",
            g.trust_identities,
        );
        counter(
            out,
            "ratethrottle_adaptive_identities_refused_total",
            "Callers not given trust state because it was full (they keep the initial factor).",
            g.trust_refused,
        );
        gauge(
            out,
            "ratethrottle_adaptive_table_entries",
            "Callers whose trust the request path holds (the others get the initial factor).",
            g.trust_table_entries,
        );
        gauge(
            out,
            "ratethrottle_anomaly_queue_depth",
            "Events waiting in the anomaly queue.",
            g.queue_depth,
        );
        gauge(
            out,
            "ratethrottle_anomaly_queue_capacity",
            "Capacity of the anomaly queue.",
            g.queue_capacity,
        );
        gauge(
            out,
            "ratethrottle_anomaly_memory_bytes",
            "Bytes the detector holds (sketches, samples, exact state).",
            g.memory_bytes,
        );
        gauge(
            out,
            "ratethrottle_anomaly_memory_bound_bytes",
            "The most bytes the detector can hold with its settings.",
            g.memory_bound,
        );
        gauge(
            out,
            "ratethrottle_anomaly_tracked_keys",
            "Keys with exact state.",
            g.tracked_keys,
        );
        let name = "ratethrottle_anomaly_decisions_total";
        let _ = writeln!(
            out,
            "# HELP {name} Anomaly decisions by detector, action and mode.\n# TYPE {name} counter"
        );
        for d in DetectorKind::ALL {
            let detector = d.reason().split('/').next().unwrap_or_default();
            for a in ACTIONS {
                for (m, mode) in MODES.iter().enumerate() {
                    let v = self.decisions(d, a, m == 1);
                    let _ = writeln!(
                        out,
                        "{name}{{detector=\"{detector}\",action=\"{}\",mode=\"{mode}\"}} {v}",
                        a.name()
                    );
                }
            }
        }
        let name = "ratethrottle_anomaly_detection_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From the end of the window that crossed a threshold to the decision in force.\n# TYPE {name} histogram"
        );
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cum += self.latency[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1000.0);
        }
        cum += self.latency[LATENCY_BUCKETS_MS.len()].load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let sum = self.latency_sum_ms.load(Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cum}");
    }
}
