//! The settings file's `alerts:` block: where alerts go (sinks) and, per kind of event, when
//! one is worth sending (threshold, grouping window, cooldown) and how loud it is.
//!
//! Pure data. Secrets (a sink's URL, an HMAC key) are kept as references (`env:NAME`,
//! `file:/path`) or literals; resolving them is the server's job when it starts the alert
//! task, so the config layer never reads the environment. Present means on; absent means
//! alerts are off and every source's `emit` is one `Option` check.

use std::path::PathBuf;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// Events the sources may queue before new ones are dropped (and counted).
pub const DEFAULT_QUEUE_SIZE: usize = 4096;

/// What happened, as far as alerting is concerned. The order is the order of
/// [`AlertKind::ALL`] and of the per-kind settings array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AlertKind {
    /// A new anomaly decision (any detector but population shift; dry-run ones too, marked).
    AnomalyDecision,
    /// A population-shift decision: a surge of new or unauthenticated callers.
    PopulationSurge,
    /// Redis stopped answering; requests are answered by the failure mode.
    StorageDegraded,
    /// Redis answers again.
    StorageRecovered,
    /// A changed configuration could not be loaded; the last good one stays in force.
    ConfigReloadFailed,
    /// Over-limit and blocked answers of one domain above the threshold within the window.
    ViolationRate,
}

impl AlertKind {
    pub const ALL: [AlertKind; 6] = [
        AlertKind::AnomalyDecision,
        AlertKind::PopulationSurge,
        AlertKind::StorageDegraded,
        AlertKind::StorageRecovered,
        AlertKind::ConfigReloadFailed,
        AlertKind::ViolationRate,
    ];

    /// The configuration key, label value and metric label.
    pub fn name(self) -> &'static str {
        match self {
            AlertKind::AnomalyDecision => "anomaly_decision",
            AlertKind::PopulationSurge => "population_surge",
            AlertKind::StorageDegraded => "storage_degraded",
            AlertKind::StorageRecovered => "storage_recovered",
            AlertKind::ConfigReloadFailed => "config_reload_failed",
            AlertKind::ViolationRate => "violation_rate",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The defaults of each kind: immediate for state changes, grouped for floods.
    pub fn defaults(self) -> KindSettings {
        let s = |threshold, window_s: u64, cooldown_s: u64, severity| KindSettings {
            enabled: true,
            threshold,
            window_ms: window_s * 1000,
            cooldown_ms: cooldown_s * 1000,
            severity,
        };
        match self {
            AlertKind::AnomalyDecision => s(1, 60, 300, Severity::Warning),
            AlertKind::PopulationSurge => s(1, 10, 900, Severity::Critical),
            AlertKind::StorageDegraded => s(1, 0, 300, Severity::Critical),
            AlertKind::StorageRecovered => s(1, 0, 0, Severity::Info),
            AlertKind::ConfigReloadFailed => s(1, 0, 600, Severity::Warning),
            AlertKind::ViolationRate => s(1000, 60, 600, Severity::Warning),
        }
    }
}

/// How loud an alert is; sinks may drop those below their `min_severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const NAMES: &'static [&'static str] = &["info", "warning", "critical"];

    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        match s {
            "info" => Some(Severity::Info),
            "warning" => Some(Severity::Warning),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// When events of one kind become an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSettings {
    pub enabled: bool,
    /// Events of one key (a detector, a domain, ...) within `window` needed for an alert.
    pub threshold: u64,
    /// Grouping: events of one key within this long of the first become one alert carrying
    /// their count. 0 sends at the next flush (every 100 ms).
    pub window_ms: u64,
    /// After an alert for a key, no other for the same key for this long; the events in
    /// between are counted and reported in the next alert (`suppressed`).
    pub cooldown_ms: u64,
    pub severity: Severity,
}

/// A value that may be a secret: written in the file, or a reference resolved at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Literal(String),
    /// `env:NAME`: the environment variable's value.
    Env(String),
    /// `file:/path`: the file's content, trailing newline removed (a mounted Secret).
    File(PathBuf),
}

impl SecretRef {
    /// `env:NAME`, `file:/path`, or the text itself.
    pub fn parse(text: &str) -> SecretRef {
        if let Some(name) = text.strip_prefix("env:") {
            SecretRef::Env(name.to_string())
        } else if let Some(path) = text.strip_prefix("file:") {
            SecretRef::File(PathBuf::from(path))
        } else {
            SecretRef::Literal(text.to_string())
        }
    }

    /// How it is shown: references as written, literals redacted.
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Literal(_) => "<redacted>".into(),
            SecretRef::Env(n) => format!("env:{n}"),
            SecretRef::File(p) => format!("file:{}", p.display()),
        }
    }
}

/// Where alerts are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkType {
    /// A JSON POST of the alert, optionally signed (HMAC-SHA256 of the body).
    Webhook,
    /// A Slack incoming webhook: a readable text message.
    Slack,
    /// Prometheus Alertmanager: `POST {url}/api/v2/alerts`.
    Alertmanager,
}

impl SinkType {
    pub const NAMES: &'static [&'static str] = &["webhook", "slack", "alertmanager"];

    pub fn name(self) -> &'static str {
        match self {
            SinkType::Webhook => "webhook",
            SinkType::Slack => "slack",
            SinkType::Alertmanager => "alertmanager",
        }
    }
}

/// The header of a webhook's signature unless configured.
pub const DEFAULT_SIGNATURE_HEADER: &str = "x-ratethrottle-signature";

/// One sink as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Unique; the metric label and `/readyz` name. Defaults to the type (then `type-2`, ...).
    pub name: String,
    pub kind: SinkType,
    pub url: SecretRef,
    /// Webhook only: the HMAC-SHA256 key; the signature is sent as `sha256=<hex>`.
    pub hmac_key: Option<SecretRef>,
    pub signature_header: String,
    /// Alerts below this severity are not sent to this sink.
    pub min_severity: Severity,
}

/// `alerts:` as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSettings {
    /// `enabled: false` keeps the block but turns alerting off.
    pub enabled: bool,
    pub queue_size: usize,
    /// One HTTP attempt's bound.
    pub timeout_ms: u64,
    /// Retries of one alert (backoff 250 ms doubling to 10 s) stop this long after the
    /// first attempt; the alert is then dropped and counted as failed.
    pub deadline_ms: u64,
    /// A sink whose last `dead_after` alerts all failed is reported dead.
    pub dead_after: u32,
    pub sinks: Vec<SinkConfig>,
    /// Per kind, in [`AlertKind::ALL`] order.
    pub kinds: [KindSettings; 6],
    /// Added to every alert's labels (Alertmanager) and fields (webhook): e.g. `cluster`.
    pub labels: Vec<(String, String)>,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            enabled: true,
            queue_size: DEFAULT_QUEUE_SIZE,
            timeout_ms: 5_000,
            deadline_ms: 60_000,
            dead_after: 3,
            sinks: Vec::new(),
            kinds: AlertKind::ALL.map(AlertKind::defaults),
            labels: Vec::new(),
        }
    }
}

impl AlertSettings {
    pub fn kind(&self, k: AlertKind) -> &KindSettings {
        &self.kinds[k.index()]
    }
}

/// Checks a sink URL: `http://` or `https://`, a host, no user info. Used on literals when
/// the file is decoded and on resolved references when the server starts.
pub fn check_sink_url(url: &str) -> Result<(), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not a URL (expected http://host[:port]/path)"))?;
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "unsupported scheme {scheme:?} (expected http or https)"
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("user info in the URL is not supported".into());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, rest)) => (h, rest.strip_prefix(':')),
            None => return Err(format!("{url:?} has no valid host")),
        },
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?} has no valid host"));
    }
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return Err(format!("{url:?} has an invalid port"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{url:?} contains spaces or control characters"));
    }
    Ok(())
}

/// A summary for `/v1/config`: secrets as their references, never their values.
impl Serialize for AlertSettings {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("enabled", &self.enabled)?;
        m.serialize_entry("queue_size", &self.queue_size)?;
        let sinks: Vec<serde_json::Value> = self
            .sinks
            .iter()
            .map(|k| {
                serde_json::json!({
                    "name": k.name,
                    "type": k.kind.name(),
                    "url": k.url.describe(),
                    "signed": k.hmac_key.is_some(),
                    "min_severity": k.min_severity.name(),
                })
            })
            .collect();
        m.serialize_entry("sinks", &sinks)?;
        let kinds: serde_json::Map<String, serde_json::Value> = AlertKind::ALL
            .iter()
            .map(|k| {
                let c = self.kind(*k);
                (
                    k.name().to_string(),
                    serde_json::json!({
                        "enabled": c.enabled,
                        "threshold": c.threshold,
                        "window_ms": c.window_ms,
                        "cooldown_ms": c.cooldown_ms,
                        "severity": c.severity.name(),
                    }),
                )
            })
            .collect();
        m.serialize_entry("kinds", &kinds)?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_urls_are_checked() {
        for ok in [
            "http://127.0.0.1:9093",
            "https://hooks.slack.com/services/T/B/X",
            "http://am.monitoring.svc:9093/",
            "http://[::1]:8080/hook",
            "http://example.com/a?b=c",
        ] {
            assert_eq!(check_sink_url(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("hooks.slack.com/x", "is not a URL"),
            ("ftp://x/y", "unsupported scheme"),
            ("http:///path", "no valid host"),
            ("http://host:99999/", "invalid port"),
            ("http://host:abc/", "invalid port"),
            ("http://u:p@host/", "user info"),
            ("http://ho st/", "no valid host"),
        ] {
            let e = check_sink_url(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn secret_references_parse() {
        assert_eq!(SecretRef::parse("env:HOOK"), SecretRef::Env("HOOK".into()));
        assert_eq!(
            SecretRef::parse("file:/run/s/url"),
            SecretRef::File("/run/s/url".into())
        );
        assert_eq!(
            SecretRef::parse("http://x"),
            SecretRef::Literal("http://x".into())
        );
        assert_eq!(SecretRef::parse("http://x").describe(), "<redacted>");
    }
}
