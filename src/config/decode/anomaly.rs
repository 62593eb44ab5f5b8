//! Decoding the settings file's `anomaly:` block onto `crate::anomaly::Config`, with the same
//! positions, key paths and "did you mean" as the rest of the file. `anomaly:` with nothing
//! under it turns the module on with every default.

use super::value::{Named, set};
use super::{Decoder, is_null};
use crate::anomaly::Source;
use crate::config::anomaly::AnomalySettings;
use saphyr::MarkedYaml;

const ANOMALY_KEYS: &[&str] = &[
    "enabled",
    "dry_run",
    "warmup",
    "replica",
    "queue_size",
    "window",
    "slow_window",
    "volume_from",
    "max_tracked",
    "shared_min_identities",
    "unban_suppress",
    "max_decisions_per_minute",
    "ttl",
    "volumetric",
    "self_anomaly",
    "failure_ratio",
    "path_spread",
    "prefix_escalation",
    "population_shift",
    "merge",
    "trust",
];
const TTL_KEYS: &[&str] = &["base", "cap", "jitter"];
const VOLUMETRIC_KEYS: &[&str] = &["dry_run", "p99_multiple", "floor"];
const SELF_KEYS: &[&str] = &["dry_run", "z", "min_std", "warm_windows", "floor"];
const FAILURE_KEYS: &[&str] = &["dry_run", "min_failures", "ratio"];
const SPREAD_KEYS: &[&str] = &["dry_run", "min_paths", "min_failure_ratio"];
const PREFIX_KEYS: &[&str] = &["dry_run", "min_offenders", "memory"];
const POPULATION_KEYS: &[&str] = &["dry_run", "surge_multiple", "floor", "ttl"];
const MERGE_KEYS: &[&str] = &["top_n", "min_count"];
const TRUST_KEYS: &[&str] = &[
    "half_life",
    "history_requests",
    "bad_share",
    "window",
    "erratic_z",
    "max_identities",
    "table_slots",
];

impl Named for Source {
    const WHAT: &'static str = "source";
    const NAMES: &'static [&'static str] = &["check", "should_rate_limit", "access_log"];
    fn parse_name(s: &str) -> Option<Self> {
        match s {
            "check" => Some(Source::Authz),
            "should_rate_limit" => Some(Source::RateLimit),
            "access_log" => Some(Source::AccessLog),
            _ => None,
        }
    }
}

/// A replica name: 1-128 characters, no control characters.
fn replica(v: String) -> Result<String, String> {
    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
        Err("must be 1-128 characters, no control characters".into())
    } else {
        Ok(v)
    }
}

impl Decoder<'_> {
    pub(super) fn anomaly(&mut self, node: &MarkedYaml<'_>, path: &str) -> AnomalySettings {
        let mut a = AnomalySettings::default();
        if is_null(node) {
            return a;
        }
        let Some(f) = self.mapping(node, path, ANOMALY_KEYS) else {
            return a;
        };
        set(&mut a.enabled, self.field(&f, "enabled"));
        let d = &mut a.detector;
        d.dry_run = self.flag(&f, "dry_run");
        set(&mut d.warmup_ms, self.field_ms(&f, "warmup", true));
        set(&mut d.window_ms, self.field_ms(&f, "window", false));
        let slow_window = self.field_ms(&f, "slow_window", false);
        set(&mut d.slow_window_ms, slow_window);
        let unban_suppress = self.field_ms(&f, "unban_suppress", true);
        set(&mut d.unban_suppress_ms, unban_suppress);
        set(&mut d.replica, self.field_with(&f, "replica", replica));
        set(&mut d.volume_from, self.field(&f, "volume_from"));
        let queue_size = self.field_uint(&f, "queue_size", 1, 16 << 20);
        set(&mut a.queue_size, queue_size);
        let max_tracked = self.field_uint(&f, "max_tracked", 16, 16 << 20);
        set(&mut d.max_tracked, max_tracked);
        let shared = self.field_uint(&f, "shared_min_identities", 2, 1 << 20);
        set(&mut d.shared_min_identities, shared);
        let decisions = self.field_uint(&f, "max_decisions_per_minute", 1, 1_000_000);
        set(&mut d.max_decisions_per_minute, decisions);
        if let Some(t) = self.section(&f, "ttl", TTL_KEYS) {
            set(&mut d.ttl.base_ms, self.field_ms(&t, "base", false));
            set(&mut d.ttl.cap_ms, self.field_ms(&t, "cap", false));
            set(&mut d.ttl.jitter, self.field_float(&t, "jitter", 0.0, 1.0));
            if d.ttl.cap_ms < d.ttl.base_ms {
                self.error_at(&t, "cap", "must not be shorter than ttl.base");
            }
        }
        if let Some(t) = self.section(&f, "volumetric", VOLUMETRIC_KEYS) {
            let v = &mut d.volumetric;
            v.dry_run = self.flag(&t, "dry_run");
            let p99_multiple = self.field_float(&t, "p99_multiple", 1.0, 1e6);
            set(&mut v.p99_multiple, p99_multiple);
            set(&mut v.floor, self.field_float(&t, "floor", 1.0, 1e9));
        }
        if let Some(t) = self.section(&f, "self_anomaly", SELF_KEYS) {
            let s = &mut d.self_anomaly;
            s.dry_run = self.flag(&t, "dry_run");
            set(&mut s.z, self.field_float(&t, "z", 1.0, 1e3));
            set(&mut s.min_std, self.field_float(&t, "min_std", 0.01, 10.0));
            let warm_windows = self.field_uint(&t, "warm_windows", 1, 1_000_000);
            set(&mut s.warm_windows, warm_windows);
            set(&mut s.floor, self.field_float(&t, "floor", 1.0, 1e9));
        }
        if let Some(t) = self.section(&f, "failure_ratio", FAILURE_KEYS) {
            let r = &mut d.failure_ratio;
            r.dry_run = self.flag(&t, "dry_run");
            let min_failures = self.field_uint(&t, "min_failures", 1, 1_000_000);
            set(&mut r.min_failures, min_failures);
            set(&mut r.ratio, self.field_float(&t, "ratio", 0.01, 1.0));
        }
        if let Some(t) = self.section(&f, "path_spread", SPREAD_KEYS) {
            let p = &mut d.path_spread;
            p.dry_run = self.flag(&t, "dry_run");
            // Distinct paths are counted in 512 bits (linear counting): ~300 at most.
            set(&mut p.min_paths, self.field_uint(&t, "min_paths", 2, 300));
            let ratio = self.field_float(&t, "min_failure_ratio", 0.0, 1.0);
            set(&mut p.min_failure_ratio, ratio);
        }
        if let Some(t) = self.section(&f, "prefix_escalation", PREFIX_KEYS) {
            d.prefix.dry_run = self.flag(&t, "dry_run");
            let min_offenders = self.field_uint(&t, "min_offenders", 2, 1024);
            set(&mut d.prefix.min_offenders, min_offenders);
            set(&mut d.prefix.memory_ms, self.field_ms(&t, "memory", false));
        }
        if let Some(t) = self.section(&f, "population_shift", POPULATION_KEYS) {
            let p = &mut d.population;
            p.dry_run = self.flag(&t, "dry_run");
            let surge_multiple = self.field_float(&t, "surge_multiple", 1.0, 1e6);
            set(&mut p.surge_multiple, surge_multiple);
            set(&mut p.floor, self.field_float(&t, "floor", 1.0, 1e9));
            set(&mut p.ttl_ms, self.field_ms(&t, "ttl", false));
        }
        if let Some(t) = self.section(&f, "merge", MERGE_KEYS) {
            set(&mut d.merge.top_n, self.field_uint(&t, "top_n", 1, 65_536));
            let min_count = self.field_uint(&t, "min_count", 1, 1 << 30);
            set(&mut d.merge.min_count, min_count);
        }
        if let Some(t) = self.section(&f, "trust", TRUST_KEYS) {
            let tr = &mut a.trust;
            set(&mut tr.half_life_ms, self.field_ms(&t, "half_life", false));
            let history = self.field_float(&t, "history_requests", 1.0, 1e12);
            set(&mut tr.history_requests, history);
            let bad_share = self.field_float(&t, "bad_share", 0.001, 1.0);
            set(&mut tr.bad_share, bad_share);
            set(&mut tr.window_ms, self.field_ms(&t, "window", false));
            let erratic_z = self.field_float(&t, "erratic_z", 0.5, 1e3);
            set(&mut tr.erratic_z, erratic_z);
            let max_identities = self.field_uint(&t, "max_identities", 16, 1 << 26);
            set(&mut tr.max_identities, max_identities);
            let table_slots = self.field_uint(&t, "table_slots", 64, 1 << 26);
            set(&mut tr.table_slots, table_slots);
        }
        if a.detector.slow_window_ms < a.detector.window_ms {
            self.error_at(&f, "slow_window", "must not be shorter than window");
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode_file;
    use std::path::Path;

    fn decode(text: &str) -> super::super::FileOutput {
        decode_file(Path::new("s.yaml"), text)
    }

    fn errors(text: &str) -> Vec<(String, String)> {
        decode(text)
            .errors
            .into_iter()
            .map(|e| (e.key, e.message))
            .collect()
    }

    #[test]
    fn a_full_block_maps_onto_the_detector_config() {
        let out = decode(
            "anomaly:\n  dry_run: true\n  warmup: 5s\n  replica: pod-a\n  queue_size: 1024\n  \
             volume_from: should_rate_limit\n  ttl: {base: 1m, cap: 1h, jitter: 0}\n  \
             volumetric: {floor: 20, p99_multiple: 4, dry_run: yes}\n  \
             failure_ratio: {min_failures: 5, ratio: 0.5}\n  path_spread: {min_paths: 10}\n  \
             prefix_escalation: {min_offenders: 2, memory: 1m}\n  unban_suppress: 0s\n",
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let (a, loc) = &out.anomaly[0];
        assert_eq!(loc.key, "anomaly");
        assert!(a.enabled);
        let d = &a.detector;
        assert!(d.dry_run && d.volumetric.dry_run && !d.failure_ratio.dry_run);
        assert_eq!(d.warmup_ms, 5000);
        assert_eq!(d.replica, "pod-a");
        assert_eq!(a.queue_size, 1024);
        assert_eq!(d.volume_from, crate::anomaly::Source::RateLimit);
        assert_eq!(
            (d.ttl.base_ms, d.ttl.cap_ms, d.ttl.jitter),
            (60_000, 3_600_000, 0.0)
        );
        assert_eq!((d.volumetric.floor, d.volumetric.p99_multiple), (20.0, 4.0));
        assert_eq!(d.failure_ratio.min_failures, 5);
        assert_eq!(d.path_spread.min_paths, 10);
        assert_eq!((d.prefix.min_offenders, d.prefix.memory_ms), (2, 60_000));
        assert_eq!(d.unban_suppress_ms, 0);
    }

    #[test]
    fn the_trust_block_maps_and_checks_its_values() {
        let out = decode(
            "anomaly:\n  trust: {half_life: 30m, history_requests: 50, bad_share: 0.2, \
             window: 5s, erratic_z: 2, max_identities: 1000, table_slots: 4096}\n",
        );
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let t = &out.anomaly[0].0.trust;
        assert_eq!(
            (t.half_life_ms, t.history_requests, t.bad_share, t.window_ms),
            (1_800_000, 50.0, 0.2, 5000)
        );
        assert_eq!(
            (t.erratic_z, t.max_identities, t.table_slots),
            (2.0, 1000, 4096)
        );
        let e = errors("anomaly:\n  trust: {half_life: 0s, bad_share: 2, max_identitys: 5}\n");
        assert!(
            e.iter()
                .any(|(k, m)| k == "anomaly.trust.half_life" && m.contains("at least 1ms"))
        );
        assert!(
            e.iter()
                .any(|(k, m)| k == "anomaly.trust.bad_share" && m.contains("must be from"))
        );
        assert!(e.iter().any(|(k, m)| k == "anomaly.trust.max_identitys"
            && m.contains("did you mean \"max_identities\"?")));
    }

    #[test]
    fn an_empty_block_turns_the_module_on_with_defaults() {
        let out = decode("anomaly:\n");
        assert!(out.errors.is_empty());
        let a = &out.anomaly[0].0;
        assert!(a.enabled);
        assert_eq!(a.detector.volumetric, crate::anomaly::Volumetric::default());
        assert!(
            a.detector.replica.is_empty(),
            "empty: the server uses the host name"
        );
    }

    #[test]
    fn bad_values_are_errors_with_their_key_path() {
        let e = errors(
            "anomaly:\n  warmpu: 5s\n  queue_size: 0\n  volume_from: chek\n  \
             volumetric: {floor: -1, p99_multipel: 3}\n  ttl: {base: 1h, cap: 1m}\n  \
             failure_ratio: {ratio: 2}\n  window: 0s\n  dry_run: maybe\n",
        );
        let has = |key: &str, needle: &str| {
            assert!(
                e.iter().any(|(k, m)| k == key && m.contains(needle)),
                "no {key}: {needle} in {e:#?}"
            );
        };
        has("anomaly.warmpu", "did you mean \"warmup\"?");
        has("anomaly.queue_size", "must be from 1 to");
        has("anomaly.volume_from", "did you mean \"check\"?");
        has("anomaly.volumetric.floor", "must be from 1 to");
        has(
            "anomaly.volumetric.p99_multipel",
            "did you mean \"p99_multiple\"?",
        );
        has("anomaly.ttl.cap", "must not be shorter than ttl.base");
        has("anomaly.failure_ratio.ratio", "must be from 0.01 to 1");
        has("anomaly.window", "must be at least 1ms");
        has("anomaly.dry_run", "expected true or false");
        assert_eq!(e.len(), 9, "{e:#?}");
        let e = errors("anomaly: [1]\n");
        assert_eq!(e[0].0, "anomaly");
        assert!(e[0].1.contains("expected a mapping"));
    }
}
