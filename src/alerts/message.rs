//! What each sink receives for an alert: the webhook's JSON (and its signature), Slack's
//! readable text, Alertmanager's API v2 alert list. Pure functions of the alert.

use std::fmt::Write;

use serde_json::{Map, Value, json};

use super::group::Alert;
use crate::config::alerts::{AlertKind, Severity};

/// Facts every message carries besides the alert.
#[derive(Debug, Clone)]
pub struct Context {
    /// This replica (the pod name in Kubernetes).
    pub replica: String,
    /// `alerts.labels`, added to every alert.
    pub labels: Vec<(String, String)>,
    /// The severity of `storage_degraded` alerts: a recovery resolves the Alertmanager alert
    /// with the same labels.
    pub degraded_severity: Severity,
}

/// How long an Alertmanager alert of a one-off event stays active (it is never re-sent).
pub const EVENT_ACTIVE_MS: u64 = 15 * 60 * 1000;
/// How long a storage-degraded alert stays active unless a recovery resolves it first.
pub const STATE_ACTIVE_MS: u64 = 60 * 60 * 1000;

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

fn field<'a>(a: &'a Alert, name: &str) -> &'a str {
    a.fields
        .iter()
        .find(|(k, _)| *k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// One line saying what happened.
pub fn summary(a: &Alert) -> String {
    let window = a.window_ms as f64 / 1000.0;
    let first = a.samples.first().map(String::as_str).unwrap_or("");
    let mut s = match a.kind {
        AlertKind::AnomalyDecision => format!(
            "{} by detector {} ({}){}",
            plural(a.count, "anomaly decision", "anomaly decisions"),
            field(a, "detector"),
            field(a, "action"),
            if a.dry_run {
                ", dry run: not enforced"
            } else {
                ""
            }
        ),
        AlertKind::PopulationSurge => format!(
            "population surge: new or unauthenticated callers above the usual rate ({}){}",
            plural(a.count, "decision", "decisions"),
            if a.dry_run { ", dry run" } else { "" }
        ),
        AlertKind::StorageDegraded => {
            format!("storage degraded: {first}; requests are answered by the failure mode")
        }
        AlertKind::StorageRecovered => "storage recovered: counters are shared again".into(),
        AlertKind::ConfigReloadFailed => format!(
            "configuration reload failed ({}); the last good configuration stays in force: {first}",
            plural(a.count, "time", "times")
        ),
        AlertKind::ViolationRate => format!(
            "{} over-limit or blocked answers in domain {:?} within {window}s (threshold {})",
            a.count, a.key, a.threshold
        ),
    };
    if a.suppressed > 0 {
        let _ = write!(
            s,
            " (+{} during the cooldown since the last alert)",
            a.suppressed
        );
    }
    s
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// The webhook's JSON body.
pub fn webhook(a: &Alert, ctx: &Context) -> Vec<u8> {
    let fields: Map<String, Value> = a
        .fields
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(v.as_str())))
        .collect();
    let labels: Map<String, Value> = ctx
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    json!({
        "source": "ratethrottle",
        "replica": ctx.replica,
        "kind": a.kind.name(),
        "key": a.key,
        "severity": a.severity.name(),
        "summary": summary(a),
        "count": a.count,
        "suppressed": a.suppressed,
        "dry_run": a.dry_run,
        "first_at": rfc3339(a.first_ms),
        "last_at": rfc3339(a.last_ms),
        "threshold": a.threshold,
        "window_ms": a.window_ms,
        "samples": a.samples,
        "fields": fields,
        "labels": labels,
    })
    .to_string()
    .into_bytes()
}

/// `sha256=<hex>`: HMAC-SHA256 of the body under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A Slack incoming webhook's body: one readable message.
pub fn slack(a: &Alert, ctx: &Context) -> Vec<u8> {
    let icon = match a.severity {
        Severity::Critical => ":rotating_light:",
        Severity::Warning => ":warning:",
        Severity::Info => ":information_source:",
    };
    let mut text = format!(
        "{icon} *[{}] ratethrottle {}*{} on `{}`\n{}",
        a.severity.name().to_uppercase(),
        a.kind.name(),
        if a.dry_run { " (dry run)" } else { "" },
        ctx.replica,
        summary(a)
    );
    if !a.samples.is_empty() && a.kind != AlertKind::StorageDegraded {
        let samples: Vec<String> = a.samples.iter().map(|s| format!("`{s}`")).collect();
        let _ = write!(text, "\nSamples: {}", samples.join(", "));
    }
    let _ = write!(
        text,
        "\nFrom {} to {}",
        rfc3339(a.first_ms),
        rfc3339(a.last_ms)
    );
    json!({ "text": text }).to_string().into_bytes()
}

/// `Ratethrottle` + the kind in CamelCase: the Alertmanager `alertname`.
pub fn alertname(kind: AlertKind) -> String {
    let mut out = String::from("Ratethrottle");
    for part in kind.name().split('_') {
        let mut c = part.chars();
        if let Some(f) = c.next() {
            out.push(f.to_ascii_uppercase());
            out.extend(c);
        }
    }
    out
}

/// Alertmanager's `POST /api/v2/alerts` body: a list of one alert. A storage recovery
/// resolves the storage-degraded alert (same labels, `endsAt` now).
pub fn alertmanager(a: &Alert, ctx: &Context, now_ms: u64) -> Vec<u8> {
    let (kind, severity, ends_ms) = match a.kind {
        AlertKind::StorageRecovered => (AlertKind::StorageDegraded, ctx.degraded_severity, now_ms),
        AlertKind::StorageDegraded => (a.kind, a.severity, now_ms + STATE_ACTIVE_MS),
        k => (k, a.severity, now_ms + EVENT_ACTIVE_MS),
    };
    let mut labels = Map::new();
    for (k, v) in &ctx.labels {
        labels.insert(k.clone(), Value::from(v.as_str()));
    }
    labels.insert("alertname".into(), Value::from(alertname(kind)));
    labels.insert("service".into(), Value::from("ratethrottle"));
    labels.insert("kind".into(), Value::from(kind.name()));
    labels.insert("key".into(), Value::from(a.key.as_str()));
    labels.insert("severity".into(), Value::from(severity.name()));
    labels.insert("replica".into(), Value::from(ctx.replica.as_str()));
    if a.dry_run {
        labels.insert("dry_run".into(), Value::from("true"));
    }
    let mut annotations = Map::new();
    annotations.insert("summary".into(), Value::from(summary(a)));
    annotations.insert("count".into(), Value::from(a.count.to_string()));
    if a.suppressed > 0 {
        annotations.insert("suppressed".into(), Value::from(a.suppressed.to_string()));
    }
    if !a.samples.is_empty() {
        annotations.insert("samples".into(), Value::from(a.samples.join(", ")));
    }
    for (k, v) in &a.fields {
        annotations.insert((*k).to_string(), Value::from(v.as_str()));
    }
    json!([{
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(a.first_ms),
        "endsAt": rfc3339(ends_ms),
    }])
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(kind: AlertKind) -> Alert {
        Alert {
            kind,
            key: "volumetric".into(),
            severity: Severity::Warning,
            count: 500,
            suppressed: 0,
            first_ms: 1_700_000_000_123,
            last_ms: 1_700_000_060_000,
            samples: vec!["10.9.9.9".into()],
            fields: vec![("detector", "volumetric".into()), ("action", "deny".into())],
            dry_run: true,
            threshold: 1,
            window_ms: 60_000,
        }
    }

    fn ctx() -> Context {
        Context {
            replica: "pod-a".into(),
            labels: vec![("cluster".into(), "eu-1".into())],
            degraded_severity: Severity::Critical,
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn the_webhook_body_carries_the_count_and_the_signature_is_hmac_sha256() {
        let body = webhook(&alert(AlertKind::AnomalyDecision), &ctx());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["count"], 500);
        assert_eq!(v["dry_run"], true);
        assert_eq!(v["fields"]["detector"], "volumetric");
        assert_eq!(v["labels"]["cluster"], "eu-1");
        assert!(
            v["summary"]
                .as_str()
                .unwrap()
                .contains("500 anomaly decisions")
        );
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn alertmanager_gets_labels_and_a_recovery_resolves_the_degraded_alert() {
        let v: Value =
            serde_json::from_slice(&alertmanager(&alert(AlertKind::AnomalyDecision), &ctx(), 5))
                .unwrap();
        let a = &v[0];
        assert_eq!(a["labels"]["alertname"], "RatethrottleAnomalyDecision");
        assert_eq!(a["labels"]["dry_run"], "true");
        assert_eq!(a["labels"]["cluster"], "eu-1");
        assert_eq!(a["annotations"]["count"], "500");
        let mut r = alert(AlertKind::StorageRecovered);
        r.key = "redis".into();
        r.dry_run = false;
        let v: Value =
            serde_json::from_slice(&alertmanager(&r, &ctx(), 1_700_000_100_000)).unwrap();
        assert_eq!(v[0]["labels"]["alertname"], "RatethrottleStorageDegraded");
        assert_eq!(v[0]["labels"]["severity"], "critical");
        assert_eq!(v[0]["endsAt"], "2023-11-14T22:15:00.000Z");
    }

    #[test]
    fn slack_text_is_readable() {
        let v: Value =
            serde_json::from_slice(&slack(&alert(AlertKind::AnomalyDecision), &ctx())).unwrap();
        let t = v["text"].as_str().unwrap();
        assert!(
            t.starts_with(
                ":warning: *[WARNING] ratethrottle anomaly_decision* (dry run) on `pod-a`"
            ),
            "{t}"
        );
        assert!(
            t.contains("500 anomaly decisions by detector volumetric (deny)"),
            "{t}"
        );
        assert!(t.contains("Samples: `10.9.9.9`"), "{t}");
    }
}
