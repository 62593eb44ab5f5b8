//! Alerts: turning alert-worthy events into messages for sinks (webhook, Slack,
//! Alertmanager).
//!
//! Owns: the bounded queue sources push events into ([`Alerts::emit`]: lock-free, never
//! allocates in the queue, never waits; a full queue drops and counts), the one task that
//! drains it, groups events per kind and key (threshold, window, cooldown, severity:
//! `group`), renders them per sink (`message`) and delivers them (`send`: bounded attempts,
//! retries with backoff until a deadline, concurrent deliveries bounded), the sinks' health
//! (dead after N failed alerts: `/readyz` detail and metrics, never readiness) and the
//! watchers that turn storage health and the violation ring into events (`watch`).
//!
//! Must not touch: decisions. A source calls `emit` and returns; with alerts off `emit` is one
//! `Option` check. Secrets are resolved here at start from what the caller passes (the
//! environment is read by the server, never by this module).

mod group;
mod message;
mod send;
pub mod watch;

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use hyper::body::Bytes;

pub use crate::config::alerts::{AlertKind, AlertSettings, SecretRef, Severity, SinkType};
pub use group::{Alert, Grouper, Observation};
pub use message::{Context, alertname, rfc3339, signature};
pub use send::{HttpClient, SinkState};

use crate::config::alerts::check_sink_url;

/// How often the task drains the queue and closes groups.
pub const FLUSH: Duration = Duration::from_millis(100);
/// Deliveries in flight at once; an alert beyond it is dropped for that sink (counted).
pub const MAX_IN_FLIGHT: usize = 64;

/// Something worth telling an operator about, as a source reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertEvent {
    /// An anomaly decision (population shift ones become `population_surge`).
    Decision {
        detector: &'static str,
        action: &'static str,
        scope: &'static str,
        value: String,
        dry_run: bool,
    },
    StorageDegraded {
        reason: String,
    },
    StorageRecovered,
    ReloadFailed {
        error: String,
    },
    /// `count` over-limit or blocked answers in `domain` since the last report.
    Violations {
        domain: String,
        count: u64,
    },
}

impl AlertEvent {
    /// The event of an anomaly decision.
    pub fn decision(d: &crate::anomaly::Decision) -> AlertEvent {
        AlertEvent::Decision {
            detector: d.reason.split('/').next().unwrap_or(d.reason),
            action: d.action.name(),
            scope: d.scope.name(),
            value: d.value.clone(),
            dry_run: d.dry_run,
        }
    }

    pub fn kind(&self) -> AlertKind {
        match self {
            AlertEvent::Decision { detector, .. } if *detector == "population_shift" => {
                AlertKind::PopulationSurge
            }
            AlertEvent::Decision { .. } => AlertKind::AnomalyDecision,
            AlertEvent::StorageDegraded { .. } => AlertKind::StorageDegraded,
            AlertEvent::StorageRecovered => AlertKind::StorageRecovered,
            AlertEvent::ReloadFailed { .. } => AlertKind::ConfigReloadFailed,
            AlertEvent::Violations { .. } => AlertKind::ViolationRate,
        }
    }

    fn observation(self) -> Observation {
        let kind = self.kind();
        let base = |key: &str| Observation {
            kind,
            key: key.to_string(),
            count: 1,
            sample: None,
            fields: Vec::new(),
            dry_run: false,
        };
        match self {
            AlertEvent::Decision {
                detector,
                action,
                scope,
                value,
                dry_run,
            } => {
                // Dry-run and enforced decisions of a detector are told apart.
                let key = if dry_run {
                    format!("{detector} (dry run)")
                } else {
                    detector.to_string()
                };
                Observation {
                    sample: Some(value),
                    fields: vec![
                        ("detector", detector.to_string()),
                        ("action", action.to_string()),
                        ("scope", scope.to_string()),
                    ],
                    dry_run,
                    ..base(&key)
                }
            }
            AlertEvent::StorageDegraded { reason } => Observation {
                sample: Some(reason),
                ..base("redis")
            },
            AlertEvent::StorageRecovered => base("redis"),
            AlertEvent::ReloadFailed { error } => Observation {
                sample: Some(error.chars().take(500).collect()),
                ..base("config")
            },
            AlertEvent::Violations { domain, count } => Observation {
                count,
                fields: vec![("domain", domain.clone())],
                ..base(&domain)
            },
        }
    }
}

/// Counters of the alert path (sinks keep their own).
#[derive(Debug, Default)]
struct Counters {
    events: [AtomicU64; 6],
    dropped: AtomicU64,
    alerts: [AtomicU64; 6],
    suppressed: AtomicU64,
    deliveries_dropped: AtomicU64,
}

struct Inner {
    queue: ArrayQueue<AlertEvent>,
    counters: Counters,
    sinks: Vec<Arc<SinkState>>,
}

/// The handle sources emit into; cheap to clone (one `Arc`), `off()` when there is no
/// `alerts:` block.
#[derive(Clone, Default)]
pub struct Alerts(Option<Arc<Inner>>);

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Alerts(off)"),
            Some(i) => f
                .debug_struct("Alerts")
                .field("queued", &i.queue.len())
                .field("sinks", &i.sinks.len())
                .finish(),
        }
    }
}

/// One sink as `/readyz` and `/v1/config` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkHealth {
    pub name: String,
    pub dead: bool,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

impl Alerts {
    pub fn off() -> Alerts {
        Alerts(None)
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Offers one event. Never waits; a full queue drops it (counted).
    #[inline]
    pub fn emit(&self, ev: AlertEvent) {
        if let Some(i) = &self.0 {
            let kind = ev.kind();
            if i.queue.push(ev).is_err() {
                i.counters.dropped.fetch_add(1, Relaxed);
            } else {
                i.counters.events[kind.index()].fetch_add(1, Relaxed);
            }
        }
    }

    /// `emit` with the event built only when alerts are on.
    #[inline]
    pub fn emit_with(&self, ev: impl FnOnce() -> AlertEvent) {
        if self.0.is_some() {
            self.emit(ev());
        }
    }

    pub fn sinks(&self) -> Vec<SinkHealth> {
        let Some(i) = &self.0 else {
            return Vec::new();
        };
        i.sinks
            .iter()
            .map(|s| SinkHealth {
                name: s.name.clone(),
                dead: s.is_dead(),
                consecutive_failures: s.consecutive_failures(),
                last_error: s.last_error(),
            })
            .collect()
    }

    /// Lines for `/readyz`'s body about dead sinks (never its status: a dead sink does not
    /// make the replica worse at answering requests).
    pub fn readiness_detail(&self) -> String {
        let mut out = String::new();
        for s in self.sinks().iter().filter(|s| s.dead) {
            let _ = writeln!(
                out,
                "alert sink {} dead: last {} alerts failed ({})",
                s.name,
                s.consecutive_failures,
                s.last_error.as_deref().unwrap_or("unknown error")
            );
        }
        out
    }

    /// Appends the alert metrics in the Prometheus text format (nothing when off).
    pub fn render(&self, out: &mut String) {
        let Some(i) = &self.0 else {
            return;
        };
        let c = &i.counters;
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let name = "ratethrottle_alerts_events_total";
        head(out, name, "counter", "Alert-worthy events queued, by kind.");
        for k in AlertKind::ALL {
            let v = c.events[k.index()].load(Relaxed);
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {v}", k.name());
        }
        let name = "ratethrottle_alerts_events_dropped_total";
        head(
            out,
            name,
            "counter",
            "Events dropped because the alert queue was full.",
        );
        let _ = writeln!(out, "{name} {}", c.dropped.load(Relaxed));
        let name = "ratethrottle_alerts_queue_depth";
        head(out, name, "gauge", "Events waiting in the alert queue.");
        let _ = writeln!(out, "{name} {}", i.queue.len());
        let name = "ratethrottle_alerts_total";
        head(out, name, "counter", "Alerts made after grouping, by kind.");
        for k in AlertKind::ALL {
            let v = c.alerts[k.index()].load(Relaxed);
            let _ = writeln!(out, "{name}{{kind=\"{}\"}} {v}", k.name());
        }
        let name = "ratethrottle_alerts_suppressed_total";
        head(
            out,
            name,
            "counter",
            "Groups that reached their threshold during a cooldown (reported by the next alert).",
        );
        let _ = writeln!(out, "{name} {}", c.suppressed.load(Relaxed));
        let name = "ratethrottle_alerts_deliveries_dropped_total";
        head(
            out,
            name,
            "counter",
            "Deliveries not attempted: too many in flight.",
        );
        let _ = writeln!(out, "{name} {}", c.deliveries_dropped.load(Relaxed));
        type Field = fn(&SinkState) -> u64;
        let per_sink: [(&str, &str, &str, Field); 4] = [
            (
                "ratethrottle_alerts_sent_total",
                "counter",
                "Alerts delivered, by sink.",
                |s| s.sent.load(Relaxed),
            ),
            (
                "ratethrottle_alerts_failed_total",
                "counter",
                "Alerts given up on (deadline passed or refused), by sink.",
                |s| s.failed.load(Relaxed),
            ),
            (
                "ratethrottle_alerts_retries_total",
                "counter",
                "Failed attempts that were retried, by sink.",
                |s| s.retries.load(Relaxed),
            ),
            (
                "ratethrottle_alerts_sink_dead",
                "gauge",
                "1 when the sink's last alerts (alerts.dead_after) all failed.",
                |s| u64::from(s.is_dead()),
            ),
        ];
        for (name, kind, help, f) in per_sink {
            head(out, name, kind, help);
            for s in &i.sinks {
                let _ = writeln!(
                    out,
                    "{name}{{sink=\"{}\",type=\"{}\"}} {}",
                    s.name,
                    s.kind.name(),
                    f(s)
                );
            }
        }
    }
}

/// The alert task: drains the queue, groups, delivers. Run it for the life of the process.
pub struct AlertTask {
    inner: Arc<Inner>,
    grouper: Grouper,
    client: HttpClient,
    ctx: Context,
    timeout: Duration,
    deadline: Duration,
    /// The server's clock: alert windows and timestamps.
    clock: Arc<dyn crate::limiter::Clock>,
}

impl std::fmt::Debug for AlertTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertTask").finish_non_exhaustive()
    }
}

/// A secret's value: the literal, the environment variable (through `env`, so callers and
/// tests choose where variables come from) or the file's content without its trailing
/// newline.
pub fn resolve(r: &SecretRef, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let v = match r {
        SecretRef::Literal(s) => s.clone(),
        SecretRef::Env(name) => {
            env(name).ok_or_else(|| format!("environment variable {name} is not set"))?
        }
        SecretRef::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
    };
    if v.is_empty() {
        return Err(format!("{} is empty", r.describe()));
    }
    Ok(v)
}

/// Builds the handle and its task from the settings: resolves every sink's secrets and
/// checks its URL. An error names the key (`alerts.sinks[0].url: ...`).
pub fn build(
    settings: &AlertSettings,
    env: &dyn Fn(&str) -> Option<String>,
    replica: String,
    clock: Arc<dyn crate::limiter::Clock>,
) -> Result<(Alerts, AlertTask), String> {
    let mut sinks = Vec::new();
    for (i, s) in settings.sinks.iter().enumerate() {
        let at = |key: &str, e: String| format!("alerts.sinks[{i}].{key}: {e}");
        let url = resolve(&s.url, env).map_err(|e| at("url", e))?;
        check_sink_url(&url).map_err(|e| at("url", e))?;
        let url = match s.kind {
            SinkType::Alertmanager if !url.trim_end_matches('/').ends_with("/api/v2/alerts") => {
                format!("{}/api/v2/alerts", url.trim_end_matches('/'))
            }
            _ => url,
        };
        let uri: hyper::Uri = url.parse().map_err(|e| at("url", format!("{e}")))?;
        let key = match &s.hmac_key {
            Some(k) => Some(resolve(k, env).map_err(|e| at("hmac_key", e))?.into_bytes()),
            None => None,
        };
        sinks.push(Arc::new(SinkState::new(
            s.name.clone(),
            s.kind,
            uri,
            key,
            s.signature_header.clone(),
            s.min_severity,
            settings.dead_after,
        )));
    }
    let inner = Arc::new(Inner {
        queue: ArrayQueue::new(settings.queue_size.max(1)),
        counters: Counters::default(),
        sinks,
    });
    let task = AlertTask {
        inner: inner.clone(),
        grouper: Grouper::new(settings.kinds),
        client: HttpClient::new(),
        ctx: Context {
            replica,
            labels: settings.labels.clone(),
            degraded_severity: settings.kind(AlertKind::StorageDegraded).severity,
        },
        timeout: Duration::from_millis(settings.timeout_ms),
        deadline: Duration::from_millis(settings.deadline_ms),
        clock,
    };
    Ok((Alerts(Some(inner)), task))
}

impl AlertTask {
    /// Drains, groups and delivers until dropped.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush(&mut in_flight),
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            }
        }
    }

    fn flush(&mut self, in_flight: &mut tokio::task::JoinSet<()>) {
        let now = self.clock.now() / 1_000_000;
        let c = &self.inner.counters;
        while let Some(ev) = self.inner.queue.pop() {
            self.grouper.observe(ev.observation(), now);
        }
        let (alerts, counts) = self.grouper.flush(now);
        c.suppressed.fetch_add(counts.suppressed, Relaxed);
        for a in alerts {
            c.alerts[a.kind.index()].fetch_add(1, Relaxed);
            tracing::info!(kind = a.kind.name(), key = %a.key, count = a.count, severity = a.severity.name(), "alert");
            for sink in &self.inner.sinks {
                if a.severity < sink.min_severity {
                    continue;
                }
                if in_flight.len() >= MAX_IN_FLIGHT {
                    c.deliveries_dropped.fetch_add(1, Relaxed);
                    sink.failed.fetch_add(1, Relaxed);
                    continue;
                }
                let body = Bytes::from(match sink.kind {
                    SinkType::Webhook => message::webhook(&a, &self.ctx),
                    SinkType::Slack => message::slack(&a, &self.ctx),
                    SinkType::Alertmanager => message::alertmanager(&a, &self.ctx, now),
                });
                let (client, sink) = (self.client.clone(), sink.clone());
                let (timeout, deadline) = (self.timeout, self.deadline);
                in_flight.spawn(async move {
                    let _ = send::deliver(&client, &sink, body, timeout, deadline).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_costs_nothing_and_a_full_queue_drops_and_counts() {
        let off = Alerts::off();
        off.emit(AlertEvent::StorageRecovered);
        assert!(off.sinks().is_empty());
        let mut out = String::new();
        off.render(&mut out);
        assert!(out.is_empty());

        let settings = AlertSettings {
            queue_size: 2,
            ..Default::default()
        };
        let (alerts, _task) = build(
            &settings,
            &|_| None,
            "r".into(),
            Arc::new(crate::limiter::SystemClock),
        )
        .unwrap();
        for _ in 0..5 {
            alerts.emit(AlertEvent::StorageRecovered);
        }
        let mut out = String::new();
        alerts.render(&mut out);
        assert!(
            out.contains("ratethrottle_alerts_events_dropped_total 3\n"),
            "{out}"
        );
        assert!(
            out.contains("ratethrottle_alerts_events_total{kind=\"storage_recovered\"} 2\n"),
            "{out}"
        );
    }

    #[test]
    fn secrets_resolve_from_env_and_files_and_errors_name_the_key() {
        let env = |n: &str| (n == "HOOK").then(|| "http://127.0.0.1:9/h".to_string());
        assert_eq!(
            resolve(&SecretRef::Env("HOOK".into()), &env).unwrap(),
            "http://127.0.0.1:9/h"
        );
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(resolve(&SecretRef::File(f), &env).unwrap(), "s3cret");
        let build_with =
            |s: &AlertSettings| build(s, &env, "r".into(), Arc::new(crate::limiter::SystemClock));
        let mut settings = AlertSettings::default();
        settings.sinks.push(crate::config::alerts::SinkConfig {
            name: "am".into(),
            kind: SinkType::Alertmanager,
            url: SecretRef::Env("MISSING".into()),
            hmac_key: None,
            signature_header: "x".into(),
            min_severity: Severity::Info,
        });
        let e = build_with(&settings).unwrap_err();
        assert_eq!(
            e,
            "alerts.sinks[0].url: environment variable MISSING is not set"
        );
        settings.sinks[0].url = SecretRef::Env("HOOK".into());
        let (alerts, task) = build_with(&settings).unwrap();
        assert_eq!(alerts.sinks()[0].name, "am");
        assert_eq!(
            task.inner.sinks[0].url.to_string(),
            "http://127.0.0.1:9/h/api/v2/alerts"
        );
        settings.sinks[0].url = SecretRef::Literal("ftp://x".into());
        let e = build_with(&settings).unwrap_err();
        assert!(
            e.starts_with("alerts.sinks[0].url: unsupported scheme"),
            "{e}"
        );
    }

    #[test]
    fn population_shift_decisions_are_surges_and_dry_runs_have_their_own_key() {
        let ev = AlertEvent::Decision {
            detector: "population_shift",
            action: "throttle",
            scope: "population",
            value: "new".into(),
            dry_run: false,
        };
        assert_eq!(ev.kind(), AlertKind::PopulationSurge);
        let ev = AlertEvent::Decision {
            detector: "volumetric",
            action: "deny",
            scope: "ip",
            value: "10.0.0.1".into(),
            dry_run: true,
        };
        assert_eq!(ev.kind(), AlertKind::AnomalyDecision);
        let o = ev.observation();
        assert_eq!(o.key, "volumetric (dry run)");
        assert!(o.dry_run);
    }
}
