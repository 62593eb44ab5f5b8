//! The validated configuration: what the rest of the server reads once loading succeeded.
//!
//! Every type here is plain data that has already passed validation, so consumers never
//! re-check it. All of it is `Serialize` so the running server can show exactly what it
//! loaded (at `/v1/config`); units and algorithms serialize as their configuration names.

use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

use super::alerts::AlertSettings;
use super::anomaly::AnomalySettings;
use super::authz::AuthzConfig;
use super::otel::TracingSettings;
use crate::anomaly::Adaptive;
use crate::limiter::{Algorithm, Nanos, RejectedHits, Unit};

/// Everything loaded from one `load`/`parse_str` call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Server settings; the defaults when no file has a `settings` block.
    pub settings: Settings,
    /// Every domain of every file, in file order then document order. Domain names are unique.
    pub domains: Vec<DomainConfig>,
    /// The settings file's `authz:` block, if any.
    pub authz: Option<AuthzConfig>,
    /// The settings file's `anomaly:` block, if any (the module is off without one).
    pub anomaly: Option<AnomalySettings>,
    /// The settings file's `alerts:` block, if any (no alerts without one).
    pub alerts: Option<AlertSettings>,
    /// The settings file's `tracing:` block, if any and enabled (the `OTEL_*` environment
    /// can still turn export on without one).
    pub tracing: Option<TracingSettings>,
    /// The files read, in the order they were loaded (what a reload watcher should watch).
    #[serde(serialize_with = "ser_paths")]
    pub files: Vec<PathBuf>,
    /// A stable hex digest of the files' names and contents: equal versions mean the same
    /// input, so a reload can be skipped and operators can tell which config is live.
    pub version: String,
}

/// Server-wide settings from the (at most one) `settings` block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// Algorithm of every limit that names none (`fixed_window` unless set, as the reference).
    #[serde(serialize_with = "ser_algorithm")]
    pub default_algorithm: Algorithm,
    /// Whether rejected hits consume the limit (`count_rejected_hits: true` gives `Counted`,
    /// the reference's behaviour); shown as that boolean.
    #[serde(rename = "count_rejected_hits", serialize_with = "ser_rejected_hits")]
    pub rejected_hits: RejectedHits,
    /// Fraction of a limit above which a hit counts as "near limit" in stats, in (0, 1].
    pub near_limit_ratio: f64,
    /// Bound on the number of counter keys the in-memory store keeps (> 0).
    pub max_keys: usize,
    /// gRPC listen address; command-line flags and environment override it.
    pub grpc_addr: Option<String>,
    /// Admin/HTTP listen address; command-line flags and environment override it.
    pub admin_addr: Option<String>,
    /// Storage backend name; interpreted (and checked) by whoever builds the store.
    pub storage: Option<String>,
    /// How the Redis store behaves (ignored by the memory store).
    pub redis: RedisSettings,
    /// Bearer token of the admin list endpoints; `--admin-token`/`RATETHROTTLE_ADMIN_TOKEN`
    /// override it. Without one, list management is disabled. Never shown.
    #[serde(serialize_with = "ser_secret")]
    pub admin_token: Option<String>,
}

/// What a request gets when Redis cannot answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Answer OK: availability over enforcement.
    Allow,
    /// Answer OVER_LIMIT: enforcement over availability.
    Deny,
    /// Decide with this replica's in-memory limiter until Redis returns (default): limits
    /// stay enforced per replica, so the fleet may admit up to replicas × the limit.
    #[default]
    Local,
}

impl FailureMode {
    pub fn parse(s: &str) -> Option<FailureMode> {
        match s.to_ascii_lowercase().as_str() {
            "allow" => Some(FailureMode::Allow),
            "deny" => Some(FailureMode::Deny),
            "local" => Some(FailureMode::Local),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
            FailureMode::Local => "local",
        }
    }
}

impl Serialize for FailureMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// `settings.redis`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RedisSettings {
    /// Prepended to every key (before the `{hash tag}`).
    pub prefix: String,
    /// Deadline of one storage call, nanoseconds. Keep it under Envoy's rate limit filter
    /// `timeout` (20 ms by default) so the failure mode answers before Envoy gives up.
    pub timeout: Nanos,
    pub failure_mode: FailureMode,
    /// Answer descriptors known to be over limit until their reset without asking Redis.
    pub local_cache: bool,
    /// Connections (each pipelines concurrent requests).
    pub pool_size: usize,
    /// `cached` mode: decide known fixed-window counters locally and write their hits to
    /// Redis every this many nanoseconds (`None`: off). See the README's accuracy trade-off.
    pub cached_flush_interval: Option<Nanos>,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            prefix: "ratethrottle:".into(),
            timeout: 15_000_000,
            failure_mode: FailureMode::Local,
            local_cache: true,
            pool_size: 2,
            cached_flush_interval: None,
        }
    }
}

impl Settings {
    /// The default `near_limit_ratio`, the reference's 80%.
    pub const DEFAULT_NEAR_LIMIT_RATIO: f64 = 0.8;
    /// The default `max_keys`.
    pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_algorithm: Algorithm::FixedWindow,
            rejected_hits: RejectedHits::Free,
            near_limit_ratio: Self::DEFAULT_NEAR_LIMIT_RATIO,
            max_keys: Self::DEFAULT_MAX_KEYS,
            grpc_addr: None,
            admin_addr: None,
            storage: None,
            redis: RedisSettings::default(),
            admin_token: None,
        }
    }
}

/// One rate limit domain: the unit a request names, with its descriptor tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DomainConfig {
    /// The domain name, non-empty and unique across all loaded files.
    pub domain: String,
    /// Top-level descriptors; (key, value) pairs are unique among siblings.
    pub descriptors: Vec<DescriptorConfig>,
    /// The file the domain came from, so messages and `/v1/config` can point at it.
    #[serde(serialize_with = "ser_path")]
    pub file: PathBuf,
}

/// One node of a domain's descriptor tree.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DescriptorConfig {
    /// The descriptor entry key to match, non-empty.
    pub key: String,
    /// The value to match; `None` matches any value. May hold `*` wildcards (`foo*` is a
    /// prefix match, `*` elsewhere matches any run of characters). An empty value is `None`,
    /// as the reference treats it.
    pub value: Option<String>,
    /// The limits applied when a request matches at this depth (from `rate_limit` or
    /// `rate_limits`). Empty: a whitelist when matched at the request's depth.
    pub limits: Vec<RateLimitConfig>,
    /// Evaluate and count, but never reject.
    pub shadow_mode: bool,
    /// Name stats after the request's value, not this descriptor's (reference semantics).
    pub detailed_metric: bool,
    /// Include the request's value in the metric key (reference semantics).
    pub value_to_metric: bool,
    /// Every value matching this descriptor's wildcard shares one counter (the reference's
    /// `share_threshold`); without it each value has its own. Only with a wildcard value.
    pub share_threshold: bool,
    /// Nested descriptors, matched against the request's next entry.
    pub descriptors: Vec<DescriptorConfig>,
    /// 1-based line of the descriptor in its file, for messages and `/v1/config`.
    pub line: usize,
}

/// One limit of a descriptor.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RateLimitConfig {
    /// The window / refill unit; `None` only when `unlimited`.
    #[serde(serialize_with = "ser_opt_unit")]
    pub unit: Option<Unit>,
    /// Requests admitted per unit; 0 denies everything. 0 when `unlimited`.
    pub requests_per_unit: u32,
    /// Always admitted, never stored (the reference's `unlimited: true`).
    pub unlimited: bool,
    /// The name other limits' `replaces` refer to.
    pub name: Option<String>,
    /// Names of limits this one replaces when both match (unknown names are allowed).
    pub replaces: Vec<String>,
    /// The algorithm; `None` means the settings' `default_algorithm`.
    #[serde(serialize_with = "ser_opt_algorithm")]
    pub algorithm: Option<Algorithm>,
    /// Bucket capacity (token_bucket, leaky_bucket, gcra only); `None` means the algorithm's
    /// default (`Algorithm::default_burst`).
    pub burst: Option<u32>,
    /// After a rejection the key stays over limit this long, in nanoseconds.
    pub block_duration: Option<Nanos>,
    /// Scale `requests_per_unit` and `burst` by the caller's trust (adaptive limits).
    #[serde(
        serialize_with = "ser_adaptive",
        skip_serializing_if = "Option::is_none"
    )]
    pub adaptive: Option<Adaptive>,
    /// 1-based line of the limit in its file.
    pub line: usize,
}

impl RateLimitConfig {
    /// The algorithm that decides this limit once the settings' default is applied.
    pub fn effective_algorithm(&self, settings: &Settings) -> Algorithm {
        self.algorithm.unwrap_or(settings.default_algorithm)
    }
}

fn ser_adaptive<S: Serializer>(v: &Option<Adaptive>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    match v {
        None => s.serialize_none(),
        Some(a) => {
            let mut m = s.serialize_map(Some(3))?;
            m.serialize_entry("min_factor", &a.min_factor)?;
            m.serialize_entry("initial_factor", &a.initial_factor)?;
            m.serialize_entry("max_factor", &a.max_factor)?;
            m.end()
        }
    }
}

fn ser_secret<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

fn ser_path<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    // Lossy: a non-UTF-8 file name must not make the whole config unprintable.
    s.serialize_str(&path.to_string_lossy())
}

fn ser_paths<S: Serializer>(paths: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(paths.iter().map(|p| p.to_string_lossy()))
}

fn ser_algorithm<S: Serializer>(a: &Algorithm, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.as_str())
}

fn ser_opt_algorithm<S: Serializer>(a: &Option<Algorithm>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_some(a.as_str()),
        None => s.serialize_none(),
    }
}

fn ser_opt_unit<S: Serializer>(u: &Option<Unit>, s: S) -> Result<S::Ok, S::Error> {
    match u {
        Some(u) => s.serialize_some(u.as_str()),
        None => s.serialize_none(),
    }
}

fn ser_rejected_hits<S: Serializer>(r: &RejectedHits, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(matches!(r, RejectedHits::Counted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_default_matches_documented_defaults() {
        let s = Settings::default();
        assert_eq!(s.default_algorithm, Algorithm::FixedWindow);
        assert_eq!(s.rejected_hits, RejectedHits::Free);
        assert_eq!(s.near_limit_ratio, 0.8);
        assert_eq!(s.max_keys, 1_000_000);
        assert_eq!((s.grpc_addr, s.admin_addr, s.storage), (None, None, None));
    }

    #[test]
    fn serializes_units_and_algorithms_by_name() {
        let limit = RateLimitConfig {
            unit: Some(Unit::Minute),
            requests_per_unit: 7,
            unlimited: false,
            name: Some("n".into()),
            replaces: vec!["other".into()],
            algorithm: Some(Algorithm::TokenBucket),
            burst: Some(3),
            block_duration: Some(5_000_000_000),
            adaptive: None,
            line: 4,
        };
        let json = serde_json::to_value(&limit).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({
                "unit": "minute", "requests_per_unit": 7, "unlimited": false, "name": "n",
                "replaces": ["other"], "algorithm": "token_bucket", "burst": 3,
                "block_duration": 5_000_000_000u64, "line": 4
            })
        );
        let unlimited = RateLimitConfig {
            unit: None,
            requests_per_unit: 0,
            unlimited: true,
            name: None,
            replaces: vec![],
            algorithm: None,
            burst: None,
            block_duration: None,
            adaptive: None,
            line: 1,
        };
        let json = serde_json::to_value(&unlimited).unwrap_or_default();
        assert_eq!(json["unit"], serde_json::Value::Null);
        assert_eq!(json["algorithm"], serde_json::Value::Null);
    }

    #[test]
    fn serializes_settings_with_config_names() {
        let s = Settings {
            default_algorithm: Algorithm::Gcra,
            rejected_hits: RejectedHits::Counted,
            ..Settings::default()
        };
        let json = serde_json::to_value(&s).unwrap_or_default();
        assert_eq!(json["default_algorithm"], "gcra");
        assert_eq!(json["count_rejected_hits"], true);
        assert_eq!(json["max_keys"], 1_000_000);
    }

    #[test]
    fn effective_algorithm_falls_back_to_settings() {
        let mut limit = RateLimitConfig {
            unit: Some(Unit::Second),
            requests_per_unit: 1,
            unlimited: false,
            name: None,
            replaces: vec![],
            algorithm: None,
            burst: None,
            block_duration: None,
            adaptive: None,
            line: 1,
        };
        let settings = Settings {
            default_algorithm: Algorithm::LeakyBucket,
            ..Settings::default()
        };
        assert_eq!(limit.effective_algorithm(&settings), Algorithm::LeakyBucket);
        limit.algorithm = Some(Algorithm::Gcra);
        assert_eq!(limit.effective_algorithm(&settings), Algorithm::Gcra);
    }
}
