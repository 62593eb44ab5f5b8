//! Turning a stream of events into few alerts: per kind and key (a detector, a domain, ...),
//! a threshold within a grouping window, and a cooldown between alerts. Sans-IO: time is
//! passed in, so every rule is tested here without a clock.
//!
//! A group opens at the first event of a key and closes `window` later. A group that reached
//! `threshold` becomes one alert carrying its count, unless the key is cooling down: its
//! count is then kept as `suppressed` and reported by the key's next alert. A group below the
//! threshold is forgotten.

use std::collections::HashMap;

use crate::config::alerts::{AlertKind, KindSettings, Severity};

/// Samples (values decided on, error texts) kept per group.
pub const MAX_SAMPLES: usize = 5;
/// Keys tracked at once; events for more are dropped (and counted) until groups close.
pub const MAX_KEYS: usize = 1024;

/// One event as the grouper sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub kind: AlertKind,
    /// What the event is about within its kind (detector and mode, domain, `redis`, ...).
    pub key: String,
    /// How many events this is (a poll of the violation ring reports many at once).
    pub count: u64,
    /// One line about this event (a value decided on, an error), kept as a sample.
    pub sample: Option<String>,
    /// Extra facts of the first event of a group (detector, action, ...), shown on the alert.
    pub fields: Vec<(&'static str, String)>,
    pub dry_run: bool,
}

/// An alert to send: what the sinks render.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: AlertKind,
    pub key: String,
    pub severity: Severity,
    /// Events in the group.
    pub count: u64,
    /// Events of the key's groups closed during its cooldown since the last alert.
    pub suppressed: u64,
    pub first_ms: u64,
    pub last_ms: u64,
    pub samples: Vec<String>,
    pub fields: Vec<(&'static str, String)>,
    pub dry_run: bool,
    /// The threshold and window the group crossed.
    pub threshold: u64,
    pub window_ms: u64,
}

#[derive(Debug)]
struct Group {
    first_ms: u64,
    last_ms: u64,
    count: u64,
    samples: Vec<String>,
    fields: Vec<(&'static str, String)>,
    dry_run: bool,
}

#[derive(Debug, Default)]
struct KeyState {
    group: Option<Group>,
    last_sent_ms: Option<u64>,
    suppressed: u64,
}

/// What happened to groups in one `flush`, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlushCounts {
    /// Groups that reached their threshold during a cooldown.
    pub suppressed: u64,
    /// Groups that closed below their threshold.
    pub below_threshold: u64,
}

/// The grouper: one per alert task.
#[derive(Debug)]
pub struct Grouper {
    kinds: [KindSettings; 6],
    keys: HashMap<(AlertKind, String), KeyState>,
}

impl Grouper {
    pub fn new(kinds: [KindSettings; 6]) -> Grouper {
        Grouper {
            kinds,
            keys: HashMap::new(),
        }
    }

    /// Adds an event at `now_ms`. `false` when it was not taken: its kind is off, or too
    /// many keys are tracked.
    pub fn observe(&mut self, o: Observation, now_ms: u64) -> bool {
        if !self.kinds[o.kind.index()].enabled {
            return false;
        }
        let id = (o.kind, o.key);
        if !self.keys.contains_key(&id) && self.keys.len() >= MAX_KEYS {
            return false;
        }
        let st = self.keys.entry(id).or_default();
        let g = st.group.get_or_insert_with(|| Group {
            first_ms: now_ms,
            last_ms: now_ms,
            count: 0,
            samples: Vec::new(),
            fields: o.fields,
            dry_run: o.dry_run,
        });
        g.count = g.count.saturating_add(o.count);
        g.last_ms = now_ms;
        // A group is dry-run only if every event in it is.
        g.dry_run &= o.dry_run;
        if let Some(s) = o.sample
            && g.samples.len() < MAX_SAMPLES
            && !g.samples.contains(&s)
        {
            g.samples.push(s);
        }
        true
    }

    /// Closes every group whose window ended by `now_ms`; returns the alerts to send.
    pub fn flush(&mut self, now_ms: u64) -> (Vec<Alert>, FlushCounts) {
        let mut out = Vec::new();
        let mut counts = FlushCounts::default();
        for ((kind, key), st) in self.keys.iter_mut() {
            let cfg = &self.kinds[kind.index()];
            let Some(g) = st.group.as_ref() else {
                continue;
            };
            if now_ms < g.first_ms.saturating_add(cfg.window_ms) {
                continue;
            }
            let Some(g) = st.group.take() else {
                continue;
            };
            if g.count < cfg.threshold {
                counts.below_threshold += 1;
                continue;
            }
            let cooling = st
                .last_sent_ms
                .is_some_and(|t| now_ms < t.saturating_add(cfg.cooldown_ms));
            if cooling {
                st.suppressed = st.suppressed.saturating_add(g.count);
                counts.suppressed += 1;
                continue;
            }
            out.push(Alert {
                kind: *kind,
                key: key.clone(),
                severity: cfg.severity,
                count: g.count,
                suppressed: std::mem::take(&mut st.suppressed),
                first_ms: g.first_ms,
                last_ms: g.last_ms,
                samples: g.samples,
                fields: g.fields,
                dry_run: g.dry_run,
                threshold: cfg.threshold,
                window_ms: cfg.window_ms,
            });
            st.last_sent_ms = Some(now_ms);
        }
        // Forget keys with no open group whose cooldown is over and nothing to report.
        let kinds = &self.kinds;
        self.keys.retain(|(kind, _), st| {
            st.group.is_some()
                || st.suppressed > 0
                || st
                    .last_sent_ms
                    .is_some_and(|t| now_ms < t.saturating_add(kinds[kind.index()].cooldown_ms))
        });
        out.sort_by_key(|a| (a.first_ms, a.kind));
        (out, counts)
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(threshold: u64, window_ms: u64, cooldown_ms: u64) -> [KindSettings; 6] {
        AlertKind::ALL.map(|_| KindSettings {
            enabled: true,
            threshold,
            window_ms,
            cooldown_ms,
            severity: Severity::Warning,
        })
    }

    fn ev(key: &str, sample: &str) -> Observation {
        Observation {
            kind: AlertKind::AnomalyDecision,
            key: key.into(),
            count: 1,
            sample: Some(sample.into()),
            fields: vec![("detector", key.into())],
            dry_run: false,
        }
    }

    #[test]
    fn events_within_the_window_become_one_alert_with_their_count() {
        let mut g = Grouper::new(kinds(1, 1000, 0));
        for i in 0..500 {
            assert!(g.observe(ev("volumetric", &format!("10.0.0.{}", i % 7)), 100 + i));
        }
        assert!(g.flush(1099).0.is_empty(), "the window is still open");
        let (alerts, _) = g.flush(1100);
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!((a.count, a.first_ms, a.last_ms), (500, 100, 599));
        assert_eq!(a.samples.len(), MAX_SAMPLES);
        assert_eq!(a.fields, vec![("detector", "volumetric".to_string())]);
    }

    #[test]
    fn a_cooldown_suppresses_and_the_next_alert_reports_it() {
        let mut g = Grouper::new(kinds(1, 0, 10_000));
        g.observe(ev("volumetric", "a"), 0);
        assert_eq!(g.flush(0).0.len(), 1);
        for t in [1000, 2000, 3000] {
            g.observe(ev("volumetric", "b"), t);
            let (alerts, counts) = g.flush(t);
            assert!(alerts.is_empty());
            assert_eq!(counts.suppressed, 1);
        }
        // Another key is not cooling down.
        g.observe(ev("failure_ratio", "c"), 3000);
        assert_eq!(g.flush(3000).0.len(), 1);
        g.observe(ev("volumetric", "d"), 10_000);
        let (alerts, _) = g.flush(10_000);
        assert_eq!(alerts.len(), 1);
        assert_eq!((alerts[0].count, alerts[0].suppressed), (1, 3));
    }

    #[test]
    fn below_the_threshold_nothing_is_sent() {
        let mut g = Grouper::new(kinds(100, 60_000, 0));
        let mut o = ev("shop", "x");
        o.kind = AlertKind::ViolationRate;
        o.count = 60;
        g.observe(o.clone(), 0);
        let (alerts, counts) = g.flush(60_000);
        assert!(alerts.is_empty());
        assert_eq!(counts.below_threshold, 1);
        o.count = 60;
        g.observe(o.clone(), 61_000);
        g.observe(o, 90_000);
        let (alerts, _) = g.flush(121_000);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].count, 120);
        assert_eq!(
            g.tracked(),
            0,
            "nothing left to remember without a cooldown"
        );
    }

    #[test]
    fn dry_run_marks_only_groups_of_dry_run_events_and_off_kinds_are_ignored() {
        let mut k = kinds(1, 0, 0);
        k[AlertKind::ViolationRate.index()].enabled = false;
        let mut g = Grouper::new(k);
        let mut o = ev("volumetric", "a");
        o.dry_run = true;
        g.observe(o.clone(), 0);
        assert!(g.flush(0).0[0].dry_run);
        g.observe(o, 1);
        g.observe(ev("volumetric", "b"), 1);
        assert!(!g.flush(1).0[0].dry_run);
        let mut v = ev("shop", "x");
        v.kind = AlertKind::ViolationRate;
        assert!(!g.observe(v, 2));
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let mut g = Grouper::new(kinds(1, 1000, 0));
        for i in 0..MAX_KEYS {
            assert!(g.observe(ev(&format!("k{i}"), "s"), 0));
        }
        assert!(!g.observe(ev("one-more", "s"), 0));
        assert!(g.observe(ev("k1", "s"), 0), "a tracked key still counts");
        assert_eq!(g.flush(1000).0.len(), MAX_KEYS);
        assert!(g.observe(ev("one-more", "s"), 1000));
    }
}
