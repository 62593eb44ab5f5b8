//! ext_authz: Envoy's `envoy.service.auth.v3.Authorization/Check`, as plain Rust.
//!
//! One Check runs these stages, each its own module, in this order:
//! 1. `request` + `identity`: is the CheckRequest judgeable, who is calling (header, JWT,
//!    mTLS principal, client IP with trusted `x-forwarded-for` hops);
//! 2. `lists`: allowlisted callers skip everything below, blocklisted ones get 403;
//! 3. `policy`: policies matching the request produce descriptors;
//! 4. `graphql` and `websocket`: protocol guards — query depth and complexity (a cost
//!    descriptor charged with the complexity), WebSocket upgrades (a connection descriptor);
//!
//! then every descriptor of stages 3 and 4 is decided in one call to the shared rule engine
//! (`RateLimitEngine::evaluate`: the same rules, six algorithms and storage as
//! `ShouldRateLimit`, and a rejected request consumes nothing), and `answer` words the
//! result. Owns: that order, the compiled `authz:` settings (swapped whole on reload) and
//! the per-stage metrics. Must not touch: gRPC (service::grpc adapts), list storage
//! (blocklist), counting (service, storage).

pub mod answer;
pub mod graphql;
pub mod identity;
pub mod jwt;
pub mod policy;
pub mod request;
pub mod websocket;
pub mod wire;

use crate::anomaly;
use crate::config::Config;
use crate::config::authz::{AuthzConfig, AuthzFailureMode};
use crate::engine::{OnStorageFailure, RateLimitEngine, RequestError, Verdict, Verdicts};
use crate::limiter::Clock;
use crate::runtime::blocklist::{self, Lists};
use crate::telemetry::authz::{AuthzMetrics, Outcome, Stage};
use crate::telemetry::violations::{Violation, ViolationKind, truncate};
use answer::{Denial, Quota};
use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use graphql::GraphqlGuard;
use identity::{IdentityResolver, SourceKind};
use policy::{AuthzDescriptor, DescriptorTemplate, Facts, Policy};
use request::{Malformed, RequestView};
use smallvec::SmallVec;
use std::sync::Arc;
use websocket::WebsocketGuard;
use wire::CheckInput;

/// The `authz:` settings, compiled.
#[derive(Debug)]
pub struct AuthzState {
    domain: String,
    failure_mode: AuthzFailureMode,
    max_header_bytes: usize,
    rate_limit_headers: bool,
    identity: IdentityResolver,
    policies: Vec<Policy>,
    graphql: Option<(GraphqlGuard, DescriptorTemplate)>,
    websocket: Option<WebsocketGuard>,
}

impl AuthzState {
    pub fn compile(c: &AuthzConfig) -> AuthzState {
        AuthzState {
            domain: c.domain.clone(),
            failure_mode: c.failure_mode,
            max_header_bytes: c.max_header_bytes,
            rate_limit_headers: c.rate_limit_headers,
            identity: IdentityResolver::new(&c.identity),
            policies: c.policies.iter().map(Policy::new).collect(),
            graphql: c.graphql.as_ref().map(|g| {
                (
                    GraphqlGuard::new(g),
                    DescriptorTemplate::new(&g.cost_descriptor),
                )
            }),
            websocket: c.websocket.as_ref().map(WebsocketGuard::new),
        }
    }
}

/// Decides Check requests.
#[derive(Clone)]
pub struct AuthzEngine {
    state: Arc<ArcSwap<AuthzState>>,
    limits: RateLimitEngine,
    lists: Arc<Lists>,
    metrics: Arc<AuthzMetrics>,
    clock: Arc<dyn Clock>,
    /// The anomaly module's queue, when `anomaly:` is configured: one `Copy` event per
    /// Check, pushed without waiting, locking or allocating.
    anomaly: Option<anomaly::Sink>,
}

/// What one Check tells the anomaly module, filled as the stages learn it (only when the
/// module is on).
/// What the lists say of a caller.
enum Listed {
    Allow,
    /// Blocked, with the public code the 403 names.
    Block(String),
}

/// The limits a request is subject to: each template with its hits and where it came from.
struct Collected<'s> {
    templates: SmallVec<[(&'s DescriptorTemplate, u32, Origin); 8]>,
    /// A GraphQL guard applied (a budget rejection answers in GraphQL's shape).
    graphql: bool,
}

struct Note {
    ip: Option<std::net::IpAddr>,
    identity: anomaly::Label,
    path: anomaly::Label,
    method: anomaly::Method,
    limited: bool,
    blocked: bool,
}

impl std::fmt::Debug for AuthzEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzEngine")
            .field("domain", &self.state.load().domain)
            .field("lists", &self.lists)
            .finish_non_exhaustive()
    }
}

/// Which descriptor of a request came from where (to word a 429).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Policy,
    GraphqlCost,
    Websocket,
}

impl AuthzEngine {
    pub fn new(
        limits: RateLimitEngine,
        lists: Arc<Lists>,
        metrics: Arc<AuthzMetrics>,
        clock: Arc<dyn Clock>,
    ) -> AuthzEngine {
        AuthzEngine {
            state: Arc::new(ArcSwap::from_pointee(AuthzState::compile(
                &AuthzConfig::default(),
            ))),
            limits,
            lists,
            metrics,
            clock,
            anomaly: None,
        }
    }

    /// Feeds every Check to the anomaly module through `sink`.
    pub fn with_anomaly(mut self, sink: anomaly::Sink) -> AuthzEngine {
        self.anomaly = Some(sink);
        self
    }

    /// Puts a loaded configuration's `authz:` block in force (defaults without one).
    pub fn install(&self, config: &Config) {
        let default = AuthzConfig::default();
        let c = config.authz.as_ref().unwrap_or(&default);
        let state = AuthzState::compile(c);
        self.metrics
            .set_jwt_keys_skipped(state.identity.skipped_jwt_keys());
        self.state.store(Arc::new(state));
        self.lists.set_config(
            blocklist::config_entries(&c.lists.allow),
            blocklist::config_entries(&c.lists.block),
        );
    }

    pub fn lists(&self) -> &Arc<Lists> {
        &self.lists
    }

    pub fn metrics(&self) -> &Arc<AuthzMetrics> {
        &self.metrics
    }

    /// The rate limit engine the policies count in (its store and service metrics).
    pub fn limits(&self) -> &RateLimitEngine {
        &self.limits
    }

    /// The domain the policies count in (for trace spans).
    pub fn domain(&self) -> String {
        self.state.load().domain.clone()
    }

    /// Puts a denial in the violation ring (sampled, bounded, truncated; see
    /// `telemetry::violations`).
    fn record_violation(&self, kind: ViolationKind, domain: &str, identity: &str, limit: &str) {
        let unix_ms = self.clock.now() / 1_000_000;
        let log = &self.limits.metrics().violations;
        if log.admit(unix_ms) {
            log.push(Violation {
                seq: 0,
                unix_ms,
                kind,
                domain: truncate(domain),
                entries: Vec::new(),
                limit: truncate(limit),
                identity: truncate(identity),
            });
        }
    }

    /// One Check. Always answers: problems become denials or, with `failure_mode: allow`,
    /// an OK.
    pub async fn check(&self, req: &CheckInput) -> CheckResponse {
        let Some(sink) = &self.anomaly else {
            return self.decide(req, &mut None).await;
        };
        let mut note = Some(Note {
            ip: None,
            identity: anomaly::Label::EMPTY,
            path: anomaly::Label::EMPTY,
            method: anomaly::Method::Other,
            limited: false,
            blocked: false,
        });
        let resp = self.decide(req, &mut note).await;
        if let Some(n) = note
            && let Some(ip) = n.ip
        {
            // Stamped by the detector task when it drains the queue (no clock read here).
            sink.push(anomaly::Event {
                at_ms: 0,
                ip,
                identity: n.identity,
                path: n.path,
                method: n.method,
                source: anomaly::Source::Authz,
                outcome: anomaly::Outcome::Request {
                    limited: n.limited,
                    blocked: n.blocked,
                },
                denied_by_us: n.limited || n.blocked,
            });
        }
        resp
    }

    /// The pipeline, as named phases: read the request, identify the caller, screen it
    /// against the lists, collect the limits that apply, count them, answer.
    async fn decide(&self, req: &CheckInput, note: &mut Option<Note>) -> CheckResponse {
        let st = self.state.load();
        let view = match RequestView::new(req, st.max_header_bytes) {
            Ok(v) => v,
            Err(m) => return self.malformed(&st, m, false),
        };
        let grpc = view.is_grpc;
        let (ip, identity) = match self.identify(&st, &view, note) {
            Ok(who) => who,
            Err(denied) => return *denied,
        };
        match self.screen(ip, &identity.value) {
            Some(Listed::Allow) => {
                self.metrics.stage(Stage::ListAllow);
                self.metrics.outcome(Outcome::Allowlisted);
                return self.allowed(&st, Some(identity.value), None);
            }
            Some(Listed::Block(code)) => {
                if let Some(n) = note.as_mut() {
                    n.blocked = true;
                }
                self.metrics.stage(Stage::ListBlock);
                self.metrics.outcome(Outcome::Blocked);
                self.record_violation(ViolationKind::Blocked, &st.domain, &identity.value, &code);
                return Denial::blocked(&code).into_response(grpc);
            }
            None => {}
        }
        let collected = match self.collect(&st, &view) {
            Ok(c) => c,
            Err(denied) => return *denied,
        };
        if collected.templates.is_empty() {
            self.metrics.outcome(Outcome::Allowed);
            return self.allowed(&st, Some(identity.value), None);
        }
        let mut verdicts = Verdicts::new();
        let mut origins: SmallVec<[Origin; 4]> = SmallVec::new();
        let decided = self
            .count(
                &st,
                &view,
                &identity.value,
                ip,
                &collected,
                &mut verdicts,
                &mut origins,
            )
            .await;
        self.answer(
            &st,
            decided,
            identity.value,
            &verdicts,
            &origins,
            collected.graphql,
            grpc,
            note,
        )
    }

    /// Phase 1: who is calling (and what the anomaly module is told about it). A bad token
    /// is the answer.
    fn identify(
        &self,
        st: &AuthzState,
        view: &RequestView<'_>,
        note: &mut Option<Note>,
    ) -> Result<(Option<crate::lists::cidr::Addr>, identity::Identity), Box<CheckResponse>> {
        let ip = st.identity.client_ip(view);
        let identity = match st.identity.resolve(view, ip) {
            Ok(id) => id,
            Err(e) => {
                self.metrics.stage(Stage::IdentityInvalidToken);
                self.metrics.outcome(Outcome::Unauthenticated);
                let denied = Denial::unauthenticated(&e.to_string()).into_response(view.is_grpc);
                return Err(Box::new(denied));
            }
        };
        if let Some(n) = note.as_mut() {
            n.ip = ip.map(crate::lists::cidr::to_ip);
            n.path = anomaly::Label::new(view.path);
            n.method = anomaly::Method::parse(view.method);
            // An identity derived from the address, or none, is the address's business.
            if !matches!(identity.kind, SourceKind::ClientIp | SourceKind::Anonymous) {
                n.identity = anomaly::Label::new(&identity.value);
            }
        }
        self.metrics.stage(match identity.kind {
            SourceKind::Header => Stage::IdentityHeader,
            SourceKind::Jwt => Stage::IdentityJwt,
            SourceKind::Mtls => Stage::IdentityMtls,
            SourceKind::ClientIp => Stage::IdentityClientIp,
            SourceKind::Anonymous => Stage::IdentityAnonymous,
        });
        Ok((ip, identity))
    }

    /// Phase 2: the client IP and the identity against the lists, allow first.
    fn screen(&self, ip: Option<crate::lists::cidr::Addr>, identity: &str) -> Option<Listed> {
        let lists = self.lists.snapshot();
        let now_ms = self.clock.now() / 1_000_000;
        let hit = |l: &crate::lists::CompiledList| {
            ip.and_then(|a| l.match_addr(a, now_ms))
                .or_else(|| l.match_identity(identity, now_ms))
                .map(|e| e.public_code().to_string())
        };
        if hit(&lists.allow).is_some() {
            Some(Listed::Allow)
        } else {
            hit(&lists.block).map(Listed::Block)
        }
    }

    /// Phase 3: the templates of the policies that match and of the guards that apply. A
    /// GraphQL document over its limits, or an unreadable body, is the answer.
    fn collect<'s>(
        &self,
        st: &'s AuthzState,
        view: &RequestView<'_>,
    ) -> Result<Collected<'s>, Box<CheckResponse>> {
        let mut c = Collected {
            templates: SmallVec::new(),
            graphql: false,
        };
        for p in st.policies.iter().filter(|p| p.matches(view)) {
            c.templates
                .extend(p.descriptors.iter().map(|d| (d, p.hits, Origin::Policy)));
        }
        if let Some((guard, cost)) = &st.graphql
            && guard.applies(view)
        {
            c.graphql = true;
            if let Err(m) = view.body() {
                return Err(Box::new(self.malformed(st, m, view.is_grpc)));
            }
            match guard.check(view) {
                Ok(a) => {
                    self.metrics.stage(Stage::GraphqlAnalysed);
                    if a.complexity > 0 {
                        let hits = u32::try_from(a.complexity).unwrap_or(u32::MAX);
                        c.templates.push((cost, hits, Origin::GraphqlCost));
                    }
                }
                Err(e) => {
                    self.metrics.stage(match e.code {
                        "QUERY_TOO_DEEP" => Stage::GraphqlTooDeep,
                        "QUERY_TOO_COMPLEX" => Stage::GraphqlTooComplex,
                        _ => Stage::GraphqlParseError,
                    });
                    self.metrics.outcome(Outcome::GraphqlRejected);
                    return Err(Box::new(
                        Denial::graphql(e.to_json()).into_response(view.is_grpc),
                    ));
                }
            }
        }
        if let Some(ws) = &st.websocket
            && websocket::is_upgrade(view)
        {
            self.metrics.stage(Stage::WebsocketUpgrade);
            c.templates.push((&ws.descriptor, 1, Origin::Websocket));
        }
        Ok(c)
    }

    /// Phase 4: the descriptors the templates build (borrowing the request, the identity and
    /// the config: nothing is copied), decided in one engine call.
    #[allow(clippy::too_many_arguments)]
    async fn count(
        &self,
        st: &AuthzState,
        view: &RequestView<'_>,
        identity: &str,
        ip: Option<crate::lists::cidr::Addr>,
        collected: &Collected<'_>,
        verdicts: &mut Verdicts,
        origins: &mut SmallVec<[Origin; 4]>,
    ) -> Result<bool, RequestError> {
        let mut facts = Facts::new(view, identity, ip);
        for (t, _, _) in &collected.templates {
            t.prepare(&mut facts);
        }
        let mut descriptors: SmallVec<[AuthzDescriptor<'_>; 4]> = SmallVec::new();
        for (t, hits, origin) in &collected.templates {
            if let Some(d) = t.build(&facts, *hits) {
                descriptors.push(d);
                origins.push(*origin);
            }
        }
        if descriptors.is_empty() {
            return Ok(false);
        }
        self.metrics.stage(Stage::LimitsEvaluated);
        self.limits
            .evaluate(
                &st.domain,
                &descriptors,
                1,
                verdicts,
                OnStorageFailure::LocalOrError,
            )
            .await
    }

    /// Phase 5: the answer for what the limits decided.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        st: &AuthzState,
        decided: Result<bool, RequestError>,
        identity: String,
        verdicts: &Verdicts,
        origins: &[Origin],
        graphql_request: bool,
        grpc: bool,
        note: &mut Option<Note>,
    ) -> CheckResponse {
        match decided {
            Ok(false) => {
                self.metrics.outcome(Outcome::Allowed);
                let quota = st.rate_limit_headers.then(|| closest(verdicts)).flatten();
                self.allowed(st, Some(identity), quota)
            }
            Ok(true) => {
                if let Some(n) = note.as_mut() {
                    n.limited = true;
                }
                self.metrics.stage(Stage::LimitsOver);
                // The rejecting limit with the longest wait is the one to report.
                let (i, q) = rejecting(verdicts);
                let origin = origins.get(i).copied().unwrap_or(Origin::Policy);
                match origin {
                    Origin::GraphqlCost => self.metrics.stage(Stage::GraphqlBudgetExceeded),
                    Origin::Websocket => self.metrics.stage(Stage::WebsocketLimited),
                    Origin::Policy => {}
                }
                self.metrics.outcome(Outcome::RateLimited);
                let limit = verdicts
                    .get(i)
                    .and_then(|v| v.limit.as_ref())
                    .and_then(|l| l.name.as_deref())
                    .unwrap_or_default();
                self.record_violation(ViolationKind::RateLimited, &st.domain, &identity, limit);
                let graphql_body = graphql_request && origin == Origin::GraphqlCost;
                Denial::rate_limited(q, graphql_body).into_response(grpc)
            }
            Err(e) => {
                // The engine logs storage failures (rate-limited); the answer is ours.
                self.metrics.stage(Stage::LimitsStorageError);
                self.failed(st, &e, Some(identity), grpc)
            }
        }
    }

    fn allowed(
        &self,
        st: &AuthzState,
        identity: Option<String>,
        quota: Option<Quota>,
    ) -> CheckResponse {
        answer::allowed(
            &st.identity.header,
            identity,
            &st.identity.strip_headers,
            quota,
        )
    }

    fn malformed(&self, st: &AuthzState, m: Malformed, grpc: bool) -> CheckResponse {
        self.metrics.stage(match m {
            Malformed::NoAttributes | Malformed::NoHttpRequest => Stage::MalformedMissing,
            Malformed::HeadersTooLarge(_) => Stage::MalformedHeaders,
            Malformed::BodyNotUtf8 => Stage::MalformedBody,
            Malformed::NotUtf8 => Stage::MalformedEncoding,
        });
        match st.failure_mode {
            AuthzFailureMode::Allow => {
                self.metrics.outcome(Outcome::FailedOpen);
                // Still never forward a forged identity.
                self.allowed(st, None, None)
            }
            AuthzFailureMode::Deny => {
                self.metrics.outcome(Outcome::BadRequest);
                Denial::malformed(m.code(), matches!(m, Malformed::HeadersTooLarge(_)))
                    .into_response(grpc)
            }
        }
    }

    fn failed(
        &self,
        st: &AuthzState,
        _e: &RequestError,
        identity: Option<String>,
        grpc: bool,
    ) -> CheckResponse {
        match st.failure_mode {
            AuthzFailureMode::Allow => {
                self.metrics.outcome(Outcome::FailedOpen);
                self.allowed(st, identity, None)
            }
            AuthzFailureMode::Deny => {
                self.metrics.outcome(Outcome::Unavailable);
                Denial::unavailable().into_response(grpc)
            }
        }
    }
}

fn quota_of(v: &Verdict) -> Option<Quota> {
    v.limit.as_ref().map(|l| Quota {
        limit: l.limit.requests_per_unit,
        remaining: v.remaining,
        reset_after: v.reset_after,
    })
}

/// The limit closest to rejecting (least remaining), for the optional upstream headers.
fn closest(verdicts: &[Verdict]) -> Option<Quota> {
    verdicts
        .iter()
        .filter_map(quota_of)
        .min_by_key(|q| (q.remaining, std::cmp::Reverse(q.reset_after)))
}

/// The rejecting verdict with the longest wait, and its index.
fn rejecting(verdicts: &[Verdict]) -> (usize, Quota) {
    verdicts
        .iter()
        .enumerate()
        .filter(|(_, v)| v.over_limit)
        .filter_map(|(i, v)| quota_of(v).map(|q| (i, q)))
        .max_by_key(|(_, q)| q.reset_after)
        .unwrap_or((
            0,
            Quota {
                limit: 0,
                remaining: 0,
                reset_after: 1_000_000_000,
            },
        ))
}

#[cfg(test)]
mod tests;
