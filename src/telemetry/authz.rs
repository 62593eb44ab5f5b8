//! ext_authz counters: one per outcome and per stage result, fixed label sets (no label
//! comes from a request, so cardinality is bounded by this file). Rendered by `telemetry`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How a Check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Allowlisted,
    Blocked,
    RateLimited,
    Unauthenticated,
    GraphqlRejected,
    BadRequest,
    /// Malformed or failed, and let through by `failure_mode: allow`.
    FailedOpen,
    /// The limiter failed, denied by `failure_mode: deny`.
    Unavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Allowed,
        Outcome::Allowlisted,
        Outcome::Blocked,
        Outcome::RateLimited,
        Outcome::Unauthenticated,
        Outcome::GraphqlRejected,
        Outcome::BadRequest,
        Outcome::FailedOpen,
        Outcome::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Allowlisted => "allowlisted",
            Outcome::Blocked => "blocked",
            Outcome::RateLimited => "rate_limited",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::GraphqlRejected => "graphql_rejected",
            Outcome::BadRequest => "bad_request",
            Outcome::FailedOpen => "failed_open",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// A stage and what it concluded; the discriminant indexes `STAGES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    MalformedMissing,
    MalformedHeaders,
    MalformedBody,
    MalformedEncoding,
    IdentityHeader,
    IdentityJwt,
    IdentityMtls,
    IdentityClientIp,
    IdentityAnonymous,
    IdentityInvalidToken,
    ListAllow,
    ListBlock,
    LimitsEvaluated,
    LimitsOver,
    LimitsStorageError,
    GraphqlAnalysed,
    GraphqlParseError,
    GraphqlTooDeep,
    GraphqlTooComplex,
    GraphqlBudgetExceeded,
    WebsocketUpgrade,
    WebsocketLimited,
}

/// (stage, result) labels of each `Stage`, in discriminant order.
pub const STAGES: [(&str, &str); 22] = [
    ("request", "missing_attributes"),
    ("request", "headers_too_large"),
    ("request", "bad_body"),
    ("request", "bad_encoding"),
    ("identity", "header"),
    ("identity", "jwt"),
    ("identity", "mtls"),
    ("identity", "client_ip"),
    ("identity", "anonymous"),
    ("identity", "invalid_token"),
    ("lists", "allow_match"),
    ("lists", "block_match"),
    ("limits", "evaluated"),
    ("limits", "over_limit"),
    ("limits", "storage_error"),
    ("graphql", "analysed"),
    ("graphql", "parse_error"),
    ("graphql", "too_deep"),
    ("graphql", "too_complex"),
    ("graphql", "budget_exceeded"),
    ("websocket", "upgrade"),
    ("websocket", "limited"),
];

#[derive(Debug, Default)]
pub struct AuthzMetrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    stages: [AtomicU64; STAGES.len()],
    /// JWT keys of the configuration in force that could not be used.
    jwt_keys_skipped: AtomicU64,
}

impl AuthzMetrics {
    pub fn outcome(&self, o: Outcome) {
        self.outcomes[o as usize].fetch_add(1, Relaxed);
    }

    pub fn stage(&self, s: Stage) {
        self.stages[s as usize].fetch_add(1, Relaxed);
    }

    pub fn set_jwt_keys_skipped(&self, n: usize) {
        self.jwt_keys_skipped.store(n as u64, Relaxed);
    }

    pub fn jwt_keys_skipped(&self) -> u64 {
        self.jwt_keys_skipped.load(Relaxed)
    }

    pub fn get_stage(&self, s: Stage) -> u64 {
        self.stages[s as usize].load(Relaxed)
    }

    pub fn outcomes(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Outcome::ALL
            .iter()
            .map(|o| (o.as_str(), self.outcomes[*o as usize].load(Relaxed)))
    }

    pub fn stages(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        STAGES
            .iter()
            .zip(&self.stages)
            .map(|((s, r), v)| (*s, *r, v.load(Relaxed)))
    }

    pub fn get_outcome(&self, o: Outcome) -> u64 {
        self.outcomes[o as usize].load(Relaxed)
    }
}
