//! The validated `authz:` block of the settings file: how ext_authz identifies callers,
//! which allow/block entries come from config, which policies turn requests into
//! descriptors, and the protocol guards.
//!
//! Plain data that already passed validation (regexes compile, key files parse, entries are
//! IPs, CIDRs or identities). Secrets are never serialized: `/v1/config` shows them redacted.

use serde::{Serialize, Serializer};
use std::path::PathBuf;

/// `authz:`. Present only when the settings file has the block; without it, Check answers
/// every request OK (identity by client IP, no limits), and the lists still apply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuthzConfig {
    /// The rule domain (from `domains`) whose descriptors policies, the GraphQL cost budget
    /// and the WebSocket limit are decided in.
    pub domain: String,
    /// What a malformed CheckRequest (missing attributes, headers over `max_header_bytes`, an
    /// undecodable or truncated body) and a storage failure get.
    pub failure_mode: AuthzFailureMode,
    /// Total bytes of header names and values above which a request is malformed.
    pub max_header_bytes: usize,
    pub identity: IdentityConfig,
    pub lists: ListsConfig,
    pub policies: Vec<PolicyConfig>,
    pub graphql: Option<GraphqlConfig>,
    pub websocket: Option<WebsocketConfig>,
    /// Add `x-ratelimit-limit`/`-remaining`/`-reset` upstream on allowed requests.
    pub rate_limit_headers: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthzFailureMode {
    /// Answer OK: availability over enforcement.
    Allow,
    /// Answer with a denial (400/431/503): enforcement over availability (default).
    #[default]
    Deny,
}

impl AuthzFailureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthzFailureMode::Allow => "allow",
            AuthzFailureMode::Deny => "deny",
        }
    }
}

impl Serialize for AuthzFailureMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl AuthzConfig {
    pub const DEFAULT_DOMAIN: &'static str = "ext_authz";
    pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
}

impl Default for AuthzConfig {
    fn default() -> Self {
        AuthzConfig {
            domain: Self::DEFAULT_DOMAIN.into(),
            failure_mode: AuthzFailureMode::Deny,
            max_header_bytes: Self::DEFAULT_MAX_HEADER_BYTES,
            identity: IdentityConfig::default(),
            lists: ListsConfig::default(),
            policies: Vec::new(),
            graphql: None,
            websocket: None,
            rate_limit_headers: false,
        }
    }
}

/// `authz.identity`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityConfig {
    /// Tried in order; the first that yields names the caller. The client IP always yields.
    pub sources: Vec<IdentitySource>,
    /// Proxies in front of Envoy whose `x-forwarded-for` entries are trusted, counted from
    /// the right as Envoy's `xff_num_trusted_hops`. 0: the source address, XFF ignored.
    pub xff_num_trusted_hops: u32,
    /// Header carrying the resolved identity upstream (any copy from the client is replaced).
    pub header: String,
    /// Headers the client could forge that upstream trusts: removed from every allowed
    /// request.
    pub strip_headers: Vec<String>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            sources: vec![IdentitySource::ClientIp { name: "ip".into() }],
            xff_num_trusted_hops: 0,
            header: "x-ratethrottle-identity".into(),
            strip_headers: Vec::new(),
        }
    }
}

/// One identity source. The identity is `<name>:<value>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// A request header's value (e.g. `x-api-key`).
    Header { header: String, name: String },
    /// A claim of a verified JWT.
    Jwt(Box<JwtConfig>),
    /// The mTLS principal Envoy reports for the peer certificate.
    Mtls { name: String },
    /// The client IP (source address or trusted `x-forwarded-for` hop).
    ClientIp { name: String },
}

impl IdentitySource {
    pub fn name(&self) -> &str {
        match self {
            IdentitySource::Header { name, .. }
            | IdentitySource::Mtls { name }
            | IdentitySource::ClientIp { name } => name,
            IdentitySource::Jwt(j) => &j.name,
        }
    }
}

/// A JWT source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JwtConfig {
    pub name: String,
    /// Where the token is: `authorization` with the `Bearer` scheme by default.
    pub header: String,
    /// The claim whose value is the identity (`sub` by default); must be a string or number.
    pub claim: String,
    pub keys: Vec<JwtKey>,
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    pub leeway: u64,
    /// Decode without checking the signature (only for tokens already verified upstream,
    /// e.g. by Envoy's jwt_authn filter). Never the default.
    pub allow_unverified: bool,
    /// Refuse tokens without `exp` (default): such a token, once leaked, works forever.
    pub require_exp: bool,
    /// What a present but invalid token gets.
    pub on_invalid: JwtInvalid,
}

impl Default for JwtConfig {
    /// A source named `jwt` reading `Authorization: Bearer`, identity from `sub`, 30 s of
    /// leeway, `exp` required, signatures checked, bad tokens denied; no keys yet.
    fn default() -> Self {
        JwtConfig {
            name: "jwt".into(),
            header: "authorization".into(),
            claim: "sub".into(),
            keys: Vec::new(),
            issuer: None,
            audiences: Vec::new(),
            leeway: 30,
            allow_unverified: false,
            require_exp: true,
            on_invalid: JwtInvalid::Deny,
        }
    }
}

/// What a request with a bad token gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JwtInvalid {
    /// 401 with `invalid_token` or `expired_token` (default).
    #[default]
    Deny,
    /// Ignore the token: the next identity source decides.
    Ignore,
}

/// A verification key, with its material already read and checked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JwtKey {
    Hs256 {
        #[serde(serialize_with = "redacted")]
        secret: Vec<u8>,
    },
    /// `hs256_secret_env`: the secret is the variable's value, read where the verifier is
    /// built (`serve` refuses to start when it is unset); config never reads the environment.
    Hs256Env { var: String },
    RsaPem {
        file: PathBuf,
        #[serde(skip)]
        pem: Vec<u8>,
    },
    EcPem {
        file: PathBuf,
        #[serde(skip)]
        pem: Vec<u8>,
    },
    Jwks {
        file: PathBuf,
        #[serde(skip)]
        json: String,
    },
}

fn redacted<S: Serializer, T>(_: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

/// `authz.lists`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ListsConfig {
    pub allow: Vec<ListEntryConfig>,
    pub block: Vec<ListEntryConfig>,
}

/// One allow or block entry from the settings file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListEntryConfig {
    /// Canonical text: an address, a CIDR, or an identity (`user:alice`).
    pub value: String,
    /// Internal reason (shown to operators, never to callers).
    pub reason: String,
    /// Public reason code in the 403 body.
    pub code: Option<String>,
    /// Unix seconds after which the entry no longer applies.
    pub expires_at: Option<u64>,
    pub line: usize,
}

/// One policy: requests it matches produce its descriptors.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyConfig {
    pub name: String,
    pub matcher: MatchConfig,
    /// Each descriptor a list of actions, as Envoy's rate limit `actions`.
    pub descriptors: Vec<Vec<ActionConfig>>,
    /// Hits each descriptor adds (default 1).
    pub hits: u32,
    pub line: usize,
}

/// What a policy matches; every given condition must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct MatchConfig {
    /// Exact hosts or wildcards (`*.example.com`), port ignored; empty: any.
    pub hosts: Vec<String>,
    /// Upper-case methods; empty: any.
    pub methods: Vec<String>,
    pub path: Option<StringMatch>,
    pub headers: Vec<HeaderMatchConfig>,
    /// Only gRPC requests (`content-type: application/grpc*`), optionally one service/method.
    pub grpc: Option<GrpcMatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    /// A regex matched against the whole value.
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeaderMatchConfig {
    pub name: String,
    /// `None`: the header must be present (or absent with `invert`).
    pub value: Option<StringMatch>,
    pub invert: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct GrpcMatch {
    /// Fully qualified service (`pkg.Service`); `None`: any.
    pub service: Option<String>,
    pub method: Option<String>,
}

/// One descriptor entry producer, named after Envoy's rate limit actions.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionConfig {
    GenericKey {
        descriptor_key: String,
        descriptor_value: String,
    },
    RequestHeaders {
        header_name: String,
        descriptor_key: String,
        skip_if_absent: bool,
    },
    RemoteAddress,
    MaskedRemoteAddress {
        v4_prefix_mask_len: u8,
        v6_prefix_mask_len: u8,
    },
    HeaderValueMatch {
        descriptor_key: String,
        descriptor_value: String,
        expect_match: bool,
        headers: Vec<HeaderMatchConfig>,
    },
    QueryParameters {
        query_parameter_name: String,
        descriptor_key: String,
        skip_if_absent: bool,
    },
    /// The resolved identity (`<source>:<value>`).
    Identity {
        descriptor_key: String,
    },
    /// The gRPC service / method of a gRPC request (absent otherwise: no descriptor).
    GrpcService {
        descriptor_key: String,
    },
    GrpcMethod {
        descriptor_key: String,
    },
    /// The request path without its query string.
    Path {
        descriptor_key: String,
    },
    Method {
        descriptor_key: String,
    },
}

/// `authz.graphql`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphqlConfig {
    /// Paths (exact, query string ignored) where requests carry GraphQL.
    pub paths: Vec<String>,
    pub max_depth: u32,
    pub max_complexity: u64,
    /// Cost of a field without an entry in `field_costs`.
    pub default_field_cost: u64,
    /// Cost per field name (`__typename` costs 0 unless listed).
    pub field_costs: Vec<(String, u64)>,
    /// Arguments whose integer value multiplies the cost of the field's selection.
    pub list_arguments: Vec<String>,
    /// Multiplier when a list argument is a variable the request does not set.
    pub default_list_size: u64,
    /// Largest body analysed; larger (or truncated) bodies get a GraphQL error.
    pub max_body_bytes: usize,
    /// The descriptor charged with the query's complexity as its hits.
    pub cost_descriptor: Vec<ActionConfig>,
}

impl GraphqlConfig {
    pub fn default_cost_descriptor() -> Vec<ActionConfig> {
        vec![
            ActionConfig::GenericKey {
                descriptor_key: "generic_key".into(),
                descriptor_value: "graphql_cost".into(),
            },
            ActionConfig::Identity {
                descriptor_key: "identity".into(),
            },
        ]
    }
}

impl Default for GraphqlConfig {
    fn default() -> Self {
        GraphqlConfig {
            paths: vec!["/graphql".into()],
            max_depth: 10,
            max_complexity: 1_000,
            default_field_cost: 1,
            field_costs: Vec::new(),
            list_arguments: vec!["first".into(), "last".into(), "limit".into()],
            default_list_size: 10,
            max_body_bytes: 256 * 1024,
            cost_descriptor: Self::default_cost_descriptor(),
        }
    }
}

/// `authz.websocket`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebsocketConfig {
    /// The descriptor an upgrade request is counted on.
    pub descriptor: Vec<ActionConfig>,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        WebsocketConfig {
            descriptor: vec![
                ActionConfig::GenericKey {
                    descriptor_key: "generic_key".into(),
                    descriptor_value: "websocket".into(),
                },
                ActionConfig::Identity {
                    descriptor_key: "identity".into(),
                },
            ],
        }
    }
}
