//! Decoding the settings file's `anomaly:` block onto `crate::anomaly::Config`, with the same
//! positions, key paths and "did you mean" as the rest of the file. `anomaly:` with nothing
//! under it turns the module on with every default.

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
const SOURCES: &[&str] = &["check", "should_rate_limit", "access_log"];

impl Decoder<'_> {
    pub(super) fn anomaly(&mut self, node: &MarkedYaml<'_>, path: &str) -> AnomalySettings {
        let mut a = AnomalySettings::default();
        if is_null(node) {
            return a;
        }
        let Some(f) = self.mapping(node, path, ANOMALY_KEYS) else {
            return a;
        };
        if let Some(field) = f.get("enabled")
            && let Some(b) = self.boolean(field.value, &f.path("enabled"))
        {
            a.enabled = b;
        }
        let d = &mut a.detector;
        d.dry_run = self.flag(&f, "dry_run");
        if let Some(v) = self.field_ms(&f, "warmup", true) {
            d.warmup_ms = v;
        }
        if let Some(v) = self.field_ms(&f, "window", false) {
            d.window_ms = v;
        }
        if let Some(v) = self.field_ms(&f, "slow_window", false) {
            d.slow_window_ms = v;
        }
        if let Some(v) = self.field_ms(&f, "unban_suppress", true) {
            d.unban_suppress_ms = v;
        }
        if let Some(field) = f.get("replica") {
            let p = f.path("replica");
            match self.string(field.value, &p) {
                Some(v) if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) => self
                    .error(
                        field.value,
                        &p,
                        "must be 1-128 characters, no control characters",
                    ),
                Some(v) => d.replica = v,
                None => {}
            }
        }
        if let Some(field) = f.get("volume_from") {
            let p = f.path("volume_from");
            if let Some(v) = self.string(field.value, &p) {
                match v.as_str() {
                    "check" => d.volume_from = Source::Authz,
                    "should_rate_limit" => d.volume_from = Source::RateLimit,
                    "access_log" => d.volume_from = Source::AccessLog,
                    _ => {
                        let hint = match super::suggest(&v, SOURCES) {
                            Some(s) => format!("did you mean {s:?}? "),
                            None => String::new(),
                        };
                        self.error(
                            field.value,
                            &p,
                            format!(
                                "unknown source {v:?} ({hint}expected one of {})",
                                SOURCES.join(", ")
                            ),
                        );
                    }
                }
            }
        }
        if let Some(n) = self.field_uint(&f, "queue_size", 1, 16 * 1024 * 1024) {
            a.queue_size = n as usize;
        }
        let d = &mut a.detector;
        if let Some(n) = self.field_uint(&f, "max_tracked", 16, 16 * 1024 * 1024) {
            d.max_tracked = n as usize;
        }
        if let Some(n) = self.field_uint(&f, "shared_min_identities", 2, 1 << 20) {
            d.shared_min_identities = n;
        }
        if let Some(n) = self.field_uint(&f, "max_decisions_per_minute", 1, 1_000_000) {
            d.max_decisions_per_minute = n as u32;
        }
        if let Some(field) = f.get("ttl")
            && let Some(t) = self.mapping(field.value, &f.path("ttl"), TTL_KEYS)
        {
            if let Some(v) = self.field_ms(&t, "base", false) {
                d.ttl.base_ms = v;
            }
            if let Some(v) = self.field_ms(&t, "cap", false) {
                d.ttl.cap_ms = v;
            }
            if let Some(v) = self.field_float(&t, "jitter", 0.0, 1.0) {
                d.ttl.jitter = v;
            }
            if d.ttl.cap_ms < d.ttl.base_ms
                && let Some(field) = t.get("cap")
            {
                self.error(
                    field.value,
                    &t.path("cap"),
                    "must not be shorter than ttl.base",
                );
            }
        }
        if let Some(field) = f.get("volumetric")
            && let Some(t) = self.mapping(field.value, &f.path("volumetric"), VOLUMETRIC_KEYS)
        {
            d.volumetric.dry_run = self.flag(&t, "dry_run");
            if let Some(v) = self.field_float(&t, "p99_multiple", 1.0, 1e6) {
                d.volumetric.p99_multiple = v;
            }
            if let Some(v) = self.field_float(&t, "floor", 1.0, 1e9) {
                d.volumetric.floor = v;
            }
        }
        if let Some(field) = f.get("self_anomaly")
            && let Some(t) = self.mapping(field.value, &f.path("self_anomaly"), SELF_KEYS)
        {
            d.self_anomaly.dry_run = self.flag(&t, "dry_run");
            if let Some(v) = self.field_float(&t, "z", 1.0, 1e3) {
                d.self_anomaly.z = v;
            }
            if let Some(v) = self.field_float(&t, "min_std", 0.01, 10.0) {
                d.self_anomaly.min_std = v;
            }
            if let Some(v) = self.field_uint(&t, "warm_windows", 1, 1_000_000) {
                d.self_anomaly.warm_windows = v as u32;
            }
            if let Some(v) = self.field_float(&t, "floor", 1.0, 1e9) {
                d.self_anomaly.floor = v;
            }
        }
        if let Some(field) = f.get("failure_ratio")
            && let Some(t) = self.mapping(field.value, &f.path("failure_ratio"), FAILURE_KEYS)
        {
            d.failure_ratio.dry_run = self.flag(&t, "dry_run");
            if let Some(v) = self.field_uint(&t, "min_failures", 1, 1_000_000) {
                d.failure_ratio.min_failures = v as u32;
            }
            if let Some(v) = self.field_float(&t, "ratio", 0.01, 1.0) {
                d.failure_ratio.ratio = v;
            }
        }
        if let Some(field) = f.get("path_spread")
            && let Some(t) = self.mapping(field.value, &f.path("path_spread"), SPREAD_KEYS)
        {
            d.path_spread.dry_run = self.flag(&t, "dry_run");
            // Distinct paths are counted in 512 bits (linear counting): ~300 at most.
            if let Some(v) = self.field_uint(&t, "min_paths", 2, 300) {
                d.path_spread.min_paths = v;
            }
            if let Some(v) = self.field_float(&t, "min_failure_ratio", 0.0, 1.0) {
                d.path_spread.min_failure_ratio = v;
            }
        }
        if let Some(field) = f.get("prefix_escalation")
            && let Some(t) = self.mapping(field.value, &f.path("prefix_escalation"), PREFIX_KEYS)
        {
            d.prefix.dry_run = self.flag(&t, "dry_run");
            if let Some(v) = self.field_uint(&t, "min_offenders", 2, 1024) {
                d.prefix.min_offenders = v as usize;
            }
            if let Some(v) = self.field_ms(&t, "memory", false) {
                d.prefix.memory_ms = v;
            }
        }
        if let Some(field) = f.get("population_shift")
            && let Some(t) = self.mapping(field.value, &f.path("population_shift"), POPULATION_KEYS)
        {
            d.population.dry_run = self.flag(&t, "dry_run");
            if let Some(v) = self.field_float(&t, "surge_multiple", 1.0, 1e6) {
                d.population.surge_multiple = v;
            }
            if let Some(v) = self.field_float(&t, "floor", 1.0, 1e9) {
                d.population.floor = v;
            }
            if let Some(v) = self.field_ms(&t, "ttl", false) {
                d.population.ttl_ms = v;
            }
        }
        if let Some(field) = f.get("merge")
            && let Some(t) = self.mapping(field.value, &f.path("merge"), MERGE_KEYS)
        {
            if let Some(v) = self.field_uint(&t, "top_n", 1, 65_536) {
                d.merge.top_n = v as usize;
            }
            if let Some(v) = self.field_uint(&t, "min_count", 1, 1 << 30) {
                d.merge.min_count = v as u32;
            }
        }
        if let Some(field) = f.get("trust")
            && let Some(t) = self.mapping(field.value, &f.path("trust"), TRUST_KEYS)
        {
            let tr = &mut a.trust;
            if let Some(v) = self.field_ms(&t, "half_life", false) {
                tr.half_life_ms = v;
            }
            if let Some(v) = self.field_float(&t, "history_requests", 1.0, 1e12) {
                tr.history_requests = v;
            }
            if let Some(v) = self.field_float(&t, "bad_share", 0.001, 1.0) {
                tr.bad_share = v;
            }
            if let Some(v) = self.field_ms(&t, "window", false) {
                tr.window_ms = v;
            }
            if let Some(v) = self.field_float(&t, "erratic_z", 0.5, 1e3) {
                tr.erratic_z = v;
            }
            if let Some(v) = self.field_uint(&t, "max_identities", 16, 1 << 26) {
                tr.max_identities = v as usize;
            }
            if let Some(v) = self.field_uint(&t, "table_slots", 64, 1 << 26) {
                tr.table_slots = v as usize;
            }
        }
        let d = &mut a.detector;
        if d.slow_window_ms < d.window_ms
            && let Some(field) = f.get("slow_window")
        {
            self.error(
                field.value,
                &f.path("slow_window"),
                "must not be shorter than window",
            );
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
