//! The settings file's `tracing:` block: OpenTelemetry trace export (OTLP over gRPC).
//! Present means on (unless `enabled: false`); absent means off, unless the standard
//! `OTEL_*` environment variables turn it on (read by the command line, never here: this
//! module stays pure, `crate::telemetry::otel` merges the two).

use serde::Serialize;
use std::collections::BTreeMap;

/// Spans the exporter may hold before new ones are dropped (and counted).
pub const DEFAULT_QUEUE_SIZE: usize = 2048;
/// Spans per export call.
pub const DEFAULT_BATCH_SIZE: usize = 512;
/// Sampled fraction of requests that arrive without a sampled parent.
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

/// The OpenTelemetry sampler names (`OTEL_TRACES_SAMPLER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SamplerKind {
    AlwaysOn,
    AlwaysOff,
    #[serde(rename = "traceidratio")]
    TraceIdRatio,
    ParentbasedAlwaysOn,
    ParentbasedAlwaysOff,
    #[serde(rename = "parentbased_traceidratio")]
    ParentbasedTraceIdRatio,
}

impl SamplerKind {
    pub const NAMES: &'static [&'static str] = &[
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];

    pub fn parse(s: &str) -> Option<SamplerKind> {
        Some(match s {
            "always_on" => SamplerKind::AlwaysOn,
            "always_off" => SamplerKind::AlwaysOff,
            "traceidratio" => SamplerKind::TraceIdRatio,
            "parentbased_always_on" => SamplerKind::ParentbasedAlwaysOn,
            "parentbased_always_off" => SamplerKind::ParentbasedAlwaysOff,
            "parentbased_traceidratio" => SamplerKind::ParentbasedTraceIdRatio,
            _ => return None,
        })
    }

    /// Whether a sampled (or unsampled) parent decides for the request.
    pub fn parent_based(self) -> bool {
        matches!(
            self,
            SamplerKind::ParentbasedAlwaysOn
                | SamplerKind::ParentbasedAlwaysOff
                | SamplerKind::ParentbasedTraceIdRatio
        )
    }

    /// The fraction of root requests sampled, `ratio` being the configured argument.
    pub fn root_ratio(self, ratio: f64) -> f64 {
        match self {
            SamplerKind::AlwaysOn | SamplerKind::ParentbasedAlwaysOn => 1.0,
            SamplerKind::AlwaysOff | SamplerKind::ParentbasedAlwaysOff => 0.0,
            SamplerKind::TraceIdRatio | SamplerKind::ParentbasedTraceIdRatio => ratio,
        }
    }
}

/// Whether an OTLP endpoint is usable: `http://` or `https://`, a host, an optional port,
/// nothing after the authority but `/`. The message says what is wrong.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("{s:?} is not an http:// or https:// URL"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if authority.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!(
            "{s:?} must be scheme://host[:port] (OTLP/gRPC takes no path)"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        // `[::1]:4317`, `host:4317`; a bare IPv6 literal needs brackets.
        Some((h, p)) if !h.ends_with(':') && (!h.contains(':') || h.starts_with('[')) => {
            (h, Some(p))
        }
        _ => (authority, None),
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    if let Some(p) = port
        && p.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("{s:?} has an invalid port {p:?}"));
    }
    Ok(())
}

/// `tracing:` as loaded (validated).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TracingSettings {
    /// `enabled: false` keeps the block but turns export off.
    pub enabled: bool,
    /// The collector's OTLP/gRPC endpoint (`http://host:4317`); `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// overrides it; the OpenTelemetry default `http://localhost:4317` without either.
    pub endpoint: Option<String>,
    /// `service.name`; `OTEL_SERVICE_NAME` overrides it; `ratethrottle` without either.
    pub service_name: Option<String>,
    pub sampler: SamplerKind,
    /// The ratio samplers' argument, in [0, 1].
    pub sample_ratio: f64,
    /// Extra resource attributes (`OTEL_RESOURCE_ATTRIBUTES` adds to and overrides them).
    pub resource_attributes: BTreeMap<String, String>,
    pub queue_size: usize,
    pub batch_size: usize,
    /// How often queued spans are sent, in milliseconds.
    pub flush_interval_ms: u64,
    /// How long one export may take before its spans are dropped (and counted).
    pub export_timeout_ms: u64,
    /// Put descriptor entry values (which can be client addresses, user ids, tokens) on the
    /// ShouldRateLimit span. Off by default: spans carry the domain, the decision, the store
    /// and descriptor keys only.
    pub record_values: bool,
}

impl Default for TracingSettings {
    fn default() -> Self {
        TracingSettings {
            enabled: true,
            endpoint: None,
            service_name: None,
            sampler: SamplerKind::ParentbasedTraceIdRatio,
            sample_ratio: DEFAULT_SAMPLE_RATIO,
            resource_attributes: BTreeMap::new(),
            queue_size: DEFAULT_QUEUE_SIZE,
            batch_size: DEFAULT_BATCH_SIZE,
            flush_interval_ms: 1000,
            export_timeout_ms: 3000,
            record_values: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ok in [
            "http://collector:4317",
            "https://otel.example.com",
            "http://127.0.0.1:4317/",
            "http://[::1]:4317",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "collector:4317",
            "grpc://c:4317",
            "http://",
            "http://c:0",
            "http://c:99999",
            "http://c:4317/v1/traces",
            "http://:4317",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn samplers() {
        for n in SamplerKind::NAMES {
            let k = SamplerKind::parse(n).unwrap();
            assert_eq!(serde_json::to_value(k).unwrap(), *n);
        }
        assert_eq!(SamplerKind::parse("ratio"), None);
        assert_eq!(SamplerKind::ParentbasedTraceIdRatio.root_ratio(0.25), 0.25);
        assert_eq!(SamplerKind::AlwaysOn.root_ratio(0.25), 1.0);
        assert!(!SamplerKind::TraceIdRatio.parent_based());
    }
}
