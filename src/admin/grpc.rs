//! The admin gRPC API (`proto/ratethrottle/admin/v1/admin.proto`), served on the admin port
//! beside the HTTP routes, with its own reflection service.
//!
//! Owns: translating admin state into the API's messages; the stats and violation streams.
//! Must not touch: decisions (it only reads counters) or list rules (it calls the same
//! `Lists` as `/v1/lists`, with the same token).

use super::AdminState;
use super::lists::same;
use crate::anomaly::{Action, Scope};
use crate::lists::{EntrySource, ListEntry, ListKind};
use crate::proto::admin::v1 as pb;
use crate::rules::StatKey;
use crate::runtime::anomaly::{Anomaly, Recorded, parse_target};
use crate::runtime::blocklist::ListError;
use crate::telemetry::violations::{self, ViolationKind};
use pb::admin_service_server::{AdminService, AdminServiceServer};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// How often `WatchViolations` looks at the ring.
const VIOLATION_POLL: Duration = Duration::from_millis(200);

/// The admin gRPC service and reflection as axum routes, for the admin port's router.
/// `stop` turning true ends every open stream (with OK), so a watching `monitor` never holds
/// a shutdown up to its drain bound.
pub fn router(state: AdminState, stop: watch::Receiver<bool>) -> Result<axum::Router, String> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::ADMIN_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let reflection_name = format!(
        "/{}/{{*method}}",
        <tonic_reflection::server::v1::ServerReflectionServer<()> as NamedService>::NAME
    );
    let routes = tonic::service::Routes::new(AdminServiceServer::new(AdminGrpc { state, stop }))
        .add_service(reflection);
    let admin_name = format!(
        "/{}/{{*method}}",
        <AdminServiceServer<AdminGrpc> as NamedService>::NAME
    );
    Ok(axum::Router::new()
        .route_service(&admin_name, routes.clone())
        .route_service(&reflection_name, routes))
}

#[derive(Debug, Clone)]
pub struct AdminGrpc {
    state: AdminState,
    stop: watch::Receiver<bool>,
}

impl AdminGrpc {
    /// The anomaly module for a caller with the token; NOT_FOUND when it is not configured.
    fn anomaly<T>(&self, req: &Request<T>) -> Result<Arc<Anomaly>, Status> {
        authorized(&self.state, req, true)?;
        self.state.anomaly.clone().ok_or_else(|| {
            Status::not_found("anomaly detection is off: the settings file has no anomaly block")
        })
    }
}

fn decision(r: &Recorded) -> pb::Decision {
    let d = &r.decision;
    pb::Decision {
        id: format!("{}:{}", d.at_ms, d.value),
        scope: match d.scope {
            Scope::Ip => pb::DecisionScope::Ip,
            Scope::Ipv4Slash24 | Scope::Ipv6Slash64 | Scope::Ipv6Slash48 => {
                pb::DecisionScope::Range
            }
            Scope::Identity => pb::DecisionScope::Identity,
            Scope::Population => pb::DecisionScope::Population,
        } as i32,
        value: violations::truncate(&d.value),
        action: match d.action {
            Action::Deny => pb::DecisionAction::Block,
            Action::Throttle => pb::DecisionAction::Throttle,
            Action::Alert => pb::DecisionAction::Alert,
        } as i32,
        reason: d.reason.to_string(),
        created_at_ms: d.at_ms,
        expires_at_ms: r.expires_at_ms,
        score: d.evidence.count as f64,
        dry_run: d.dry_run,
        enforced: r.enforced,
        offense: d.offense,
        replica: d.replica.clone(),
        unbanned_at_ms: r.unbanned_at_ms.unwrap_or(0),
    }
}

/// Whether the caller showed the admin token: `Ok(true)` yes, `Ok(false)` no token sent,
/// an error for a wrong one or when no token is configured and `required`.
fn authorized<T>(s: &AdminState, req: &Request<T>, required: bool) -> Result<bool, Status> {
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim().to_string())
        });
    let Some(token) = s.admin_token.as_deref() else {
        return if required {
            Err(Status::not_found(
                "disabled: no admin token is configured (settings.admin_token, --admin-token \
                 or RATETHROTTLE_ADMIN_TOKEN)",
            ))
        } else {
            Ok(false)
        };
    };
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(true),
        None if !required => Ok(false),
        _ => Err(Status::unauthenticated("a valid bearer token is required")),
    }
}

fn kind_of(list: i32) -> Result<ListKind, Status> {
    match pb::ListKind::try_from(list) {
        Ok(pb::ListKind::Allow) => Ok(ListKind::Allow),
        Ok(pb::ListKind::Block) => Ok(ListKind::Block),
        _ => Err(Status::invalid_argument(
            "list must be LIST_KIND_ALLOW or LIST_KIND_BLOCK",
        )),
    }
}

fn entry(kind: ListKind, e: &ListEntry) -> pb::Entry {
    pb::Entry {
        list: match kind {
            ListKind::Allow => pb::ListKind::Allow,
            ListKind::Block => pb::ListKind::Block,
        } as i32,
        value: e.value.clone(),
        reason: e.reason.clone(),
        code: e.code.clone().unwrap_or_default(),
        expires_at_ms: e.expires_at_ms.unwrap_or(0),
        added_at_ms: e.added_at_ms,
        source: match e.source {
            EntrySource::Config => pb::EntrySource::Config,
            EntrySource::Runtime => pb::EntrySource::Runtime,
            EntrySource::Kubernetes => pb::EntrySource::Kubernetes,
        } as i32,
    }
}

fn list_status(e: ListError) -> Status {
    match e {
        ListError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ListError::FromConfig(_) | ListError::FromKubernetes(_) => {
            Status::failed_precondition(e.to_string())
        }
        ListError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AdminService for AdminGrpc {
    async fn get_config(
        &self,
        _req: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::GetConfigResponse>, Status> {
        let s = &self.state;
        let st = s.reload.read();
        Ok(Response::new(pb::GetConfigResponse {
            version: st.version.clone(),
            loaded_at_unix: st.loaded_at_unix,
            source: st.source.clone().unwrap_or_default(),
            last_error: st.last_error.clone().unwrap_or_default(),
            storage: s.engine.storage().kind().to_string(),
            storage_degraded: s.engine.storage().health().is_some_and(|h| h.is_degraded()),
            config_json: st.config.to_string(),
            kubernetes_json: st
                .kubernetes
                .as_ref()
                .and_then(|k| serde_json::to_string(k).ok())
                .unwrap_or_default(),
        }))
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        authorized(&self.state, &req, true)?;
        let lists = self.state.authz.lists();
        let kinds: &[ListKind] = match pb::ListKind::try_from(req.get_ref().list) {
            Ok(pb::ListKind::Unspecified) => &[ListKind::Allow, ListKind::Block],
            _ => &[kind_of(req.get_ref().list)?],
        };
        let entries = kinds
            .iter()
            .flat_map(|k| {
                lists
                    .entries(*k)
                    .iter()
                    .map(|e| entry(*k, e))
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(Response::new(pb::ListEntriesResponse {
            store: lists.backend_name().to_string(),
            entries,
        }))
    }

    async fn add_entry(
        &self,
        req: Request<pb::AddEntryRequest>,
    ) -> Result<Response<pb::AddEntryResponse>, Status> {
        authorized(&self.state, &req, true)?;
        let r = req.into_inner();
        let kind = kind_of(r.list)?;
        let ttl = (r.ttl_seconds > 0).then(|| Duration::from_secs(r.ttl_seconds));
        let code = Some(r.code).filter(|c| !c.is_empty());
        let added = self
            .state
            .authz
            .lists()
            .add(kind, &r.value, ttl, &r.reason, code.as_deref())
            .await
            .map_err(list_status)?;
        Ok(Response::new(pb::AddEntryResponse {
            entry: Some(entry(kind, &added)),
        }))
    }

    async fn remove_entry(
        &self,
        req: Request<pb::RemoveEntryRequest>,
    ) -> Result<Response<pb::RemoveEntryResponse>, Status> {
        authorized(&self.state, &req, true)?;
        let r = req.into_inner();
        let kind = kind_of(r.list)?;
        let removed = self
            .state
            .authz
            .lists()
            .remove(kind, &r.value)
            .await
            .map_err(list_status)?;
        Ok(Response::new(pb::RemoveEntryResponse { removed }))
    }

    async fn list_decisions(
        &self,
        req: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        let m = self.anomaly(&req)?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n => n as usize,
        };
        Ok(Response::new(pb::ListDecisionsResponse {
            decisions: m.decisions().iter().take(limit).map(decision).collect(),
        }))
    }

    async fn explain(
        &self,
        req: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let m = self.anomaly(&req)?;
        let subject = &req.get_ref().subject;
        let target = parse_target(subject).ok_or_else(|| {
            Status::invalid_argument(format!(
                "subject {} is not an address, an IPv4 /24, an IPv6 /64 or /48, or an identity",
                crate::lists::shorten(subject)
            ))
        })?;
        let x = m.explain(&target);
        let newest = m
            .decisions()
            .into_iter()
            .find(|r| r.decision.scope == x.scope && r.decision.value == x.value);
        let evidence = vec![
            pb::Evidence {
                signal: "volumetric".into(),
                value: f64::from(x.window_count),
                threshold: x.volumetric_threshold,
                window_ms: 0,
            },
            pb::Evidence {
                signal: "failures".into(),
                value: f64::from(x.slow_failures),
                threshold: f64::from(x.failure_min),
                window_ms: 0,
            },
            pb::Evidence {
                signal: "path_spread".into(),
                value: x.failing_paths as f64,
                threshold: x.path_spread_min as f64,
                window_ms: 0,
            },
        ];
        let summary = format!(
            "{} {}: {}, {} offense(s){}{}",
            x.scope.name(),
            violations::truncate(&x.value),
            if x.tracked { "tracked" } else { "not tracked" },
            x.offenses,
            x.active_until_ms
                .map_or(String::new(), |t| format!(", decision active until {t} ms")),
            if x.allowlisted { ", allowlisted" } else { "" },
        );
        Ok(Response::new(pb::ExplainResponse {
            decision: newest.as_ref().map(decision),
            evidence,
            summary,
            tracked: x.tracked,
            offenses: x.offenses,
            active_until_ms: x.active_until_ms.unwrap_or(0),
            allowlisted: x.allowlisted,
        }))
    }

    type WatchStatsStream = BoxStream<pb::StatsSnapshot>;

    async fn watch_stats(
        &self,
        req: Request<pb::WatchStatsRequest>,
    ) -> Result<Response<Self::WatchStatsStream>, Status> {
        let identities = authorized(&self.state, &req, false)?;
        let r = req.into_inner();
        let interval = Duration::from_millis(match r.interval_ms {
            0 => 1000,
            n => u64::from(n).clamp(100, 60_000),
        });
        let top_n = match r.top_n {
            0 => 10,
            n => n.min(100) as usize,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let state = self.state.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut prev: Option<Sample> = None;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let now = Sample::take(&state);
                let snap = snapshot(&state, &now, prev.as_ref(), top_n, identities).await;
                if tx.send(Ok(snap)).await.is_err() {
                    return;
                }
                prev = Some(now);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchViolationsStream = BoxStream<pb::Violation>;

    async fn watch_violations(
        &self,
        req: Request<pb::WatchViolationsRequest>,
    ) -> Result<Response<Self::WatchViolationsStream>, Status> {
        authorized(&self.state, &req, true)?;
        let log_owner = self.state.metrics.clone();
        let mut next = if req.get_ref().include_recent {
            0
        } else {
            log_owner.violations.next_seq()
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(VIOLATION_POLL);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if tx.is_closed() {
                    return;
                }
                for v in log_owner.violations.since(next) {
                    next = v.seq + 1;
                    // A full channel means a slow watcher: skip (the seq gap tells it).
                    match tx.try_send(Ok(violation(&v))) {
                        Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn violation(v: &violations::Violation) -> pb::Violation {
    pb::Violation {
        seq: v.seq,
        unix_ms: v.unix_ms,
        kind: match v.kind {
            ViolationKind::OverLimit => pb::ViolationKind::OverLimit,
            ViolationKind::RateLimited => pb::ViolationKind::RateLimited,
            ViolationKind::Blocked => pb::ViolationKind::Blocked,
        } as i32,
        domain: v.domain.clone(),
        entries: v
            .entries
            .iter()
            .map(|(key, value)| pb::DescriptorEntry {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        limit: v.limit.clone(),
        identity: v.identity.clone(),
    }
}

/// Counter readings at one instant; rates are differences between two.
struct Sample {
    at: Instant,
    requests: u64,
    over_limit: u64,
    checks: u64,
    denied: u64,
    /// stat key → (hits, over limit)
    rules: BTreeMap<StatKey, (u64, u64)>,
}

/// ext_authz outcomes that deny the request.
const DENIALS: &[&str] = &[
    "blocked",
    "rate_limited",
    "unauthenticated",
    "graphql_rejected",
    "bad_request",
    "unavailable",
];

impl Sample {
    fn take(s: &AdminState) -> Sample {
        let (mut checks, mut denied) = (0, 0);
        for (name, n) in s.authz.metrics().outcomes() {
            checks += n;
            if DENIALS.contains(&name) {
                denied += n;
            }
        }
        Sample {
            at: Instant::now(),
            requests: s.metrics.requests.load(Relaxed),
            over_limit: s.metrics.over_limit.load(Relaxed),
            checks,
            denied,
            rules: s
                .stats
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k, (v.total_hits.load(Relaxed), v.over_limit.load(Relaxed))))
                .collect(),
        }
    }
}

async fn snapshot(
    s: &AdminState,
    now: &Sample,
    prev: Option<&Sample>,
    top_n: usize,
    identities: bool,
) -> pb::StatsSnapshot {
    let secs = prev.map_or(0.0, |p| now.at.duration_since(p.at).as_secs_f64());
    let rate = |now: u64, before: Option<u64>| match before {
        Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
        _ => 0.0,
    };
    let mut domains: BTreeMap<&str, pb::DomainStats> = BTreeMap::new();
    let mut limited = Vec::new();
    for (key, (hits, over)) in &now.rules {
        let before = prev.and_then(|p| p.rules.get(key)).copied();
        let d = domains
            .entry(&key.domain)
            .or_insert_with(|| pb::DomainStats {
                domain: key.domain.to_string(),
                ..Default::default()
            });
        d.hits_total += hits;
        d.over_limit_total += over;
        d.hits_per_second += rate(*hits, before.map(|b| b.0));
        d.over_limit_per_second += rate(*over, before.map(|b| b.1));
        if *over > 0 {
            limited.push(pb::DescriptorStats {
                stat_key: violations::truncate(&key.to_string()),
                over_limit_per_second: rate(*over, before.map(|b| b.1)),
                over_limit_total: *over,
                hits_total: *hits,
            });
        }
    }
    limited.sort_by(|a, b| {
        b.over_limit_per_second
            .total_cmp(&a.over_limit_per_second)
            .then(b.over_limit_total.cmp(&a.over_limit_total))
    });
    limited.truncate(top_n);
    let log = &s.metrics.violations;
    let counts = log.counts();
    let rules = s.engine.rules().load();
    pb::StatsSnapshot {
        unix_ms: s.engine.clock().now() / 1_000_000,
        interval_ms: (secs * 1000.0) as u64,
        config_version: rules.version.clone(),
        requests_total: now.requests,
        over_limit_total: now.over_limit,
        requests_per_second: rate(now.requests, prev.map(|p| p.requests)),
        over_limit_per_second: rate(now.over_limit, prev.map(|p| p.over_limit)),
        invalid_requests_total: s.metrics.invalid_requests.load(Relaxed),
        storage_errors_total: s.metrics.storage_errors.load(Relaxed),
        domains: domains.into_values().collect(),
        top_limited: limited,
        blocked_identities: if identities {
            log.top_identities(top_n)
                .into_iter()
                .map(|(identity, count)| pb::IdentityCount { identity, count })
                .collect()
        } else {
            Vec::new()
        },
        identities_redacted: !identities,
        storage: Some(storage_health(s).await),
        queues: Some(pb::Queues {
            violations_recorded: counts.recorded,
            violations_sampled_out: counts.sampled_out,
            violations_dropped: counts.dropped,
            violations_capacity: violations::CAPACITY as u64,
        }),
        authz: Some(pb::AuthzStats {
            checks_per_second: rate(now.checks, prev.map(|p| p.checks)),
            denied_per_second: rate(now.denied, prev.map(|p| p.denied)),
            outcomes_total: s
                .authz
                .metrics()
                .outcomes()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }),
    }
}

async fn storage_health(s: &AdminState) -> pb::StorageHealth {
    let storage = s.engine.storage();
    let mut h = pb::StorageHealth {
        kind: storage.kind().to_string(),
        ..Default::default()
    };
    if let Some(m) = storage.memory() {
        h.memory_keys = m.len() as u64;
        h.memory_capacity = m.capacity() as u64;
    }
    if let Some(r) = storage.redis() {
        use fred::interfaces::ClientLike;
        let health = r.health();
        h.degraded = health.is_degraded();
        h.last_error = health.last_error().unwrap_or_default();
        h.errors_total = health.errors.load(Relaxed);
        h.fallbacks_total = health.fallbacks.load(Relaxed);
        h.commands_total = health.commands.load(Relaxed);
        let start = Instant::now();
        let ping = r.pool().next().ping::<String>(None);
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
            h.ping_ms = start.elapsed().as_secs_f64() * 1000.0;
        }
    }
    h
}
