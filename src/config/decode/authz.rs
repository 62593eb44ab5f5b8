//! Decoding the settings file's `authz:` block, with the same positions, key paths and
//! strictness as the rest of the file. Key files named by JWT sources are read here (relative
//! to the settings file) and parsed, so a bad key is a config error with its line, not a
//! surprise at the first request.

use super::value::{Duration, Fields, FromYaml, UpTo, non_empty, nonzero, set};
use super::{Decoder, child, data, index, is_null};
use crate::config::authz::{
    ActionConfig, AuthzConfig, AuthzFailureMode, GraphqlConfig, GrpcMatch, HeaderMatchConfig,
    IdentityConfig, IdentitySource, JwtConfig, JwtInvalid, JwtKey, ListEntryConfig, ListsConfig,
    MatchConfig, PolicyConfig, StringMatch, WebsocketConfig,
};
use crate::limiter::NANOS_PER_SECOND;
use crate::lists::canonical_entry;
use saphyr::{MarkedYaml, Scalar, YamlData};
use std::path::Path;

const AUTHZ_KEYS: &[&str] = &[
    "domain",
    "failure_mode",
    "max_header_bytes",
    "identity",
    "lists",
    "policies",
    "graphql",
    "websocket",
    "rate_limit_headers",
];
const IDENTITY_KEYS: &[&str] = &["sources", "xff_num_trusted_hops", "header", "strip_headers"];
const SOURCE_KINDS: &[&str] = &["header", "jwt", "mtls", "client_ip"];
const SOURCE_KEYS: &[&str] = &["header", "jwt", "mtls", "client_ip", "name"];
const JWT_KEYS: &[&str] = &[
    "header",
    "claim",
    "hs256_secret",
    "hs256_secret_env",
    "rsa_public_key_file",
    "ec_public_key_file",
    "jwks_file",
    "issuer",
    "audiences",
    "leeway",
    "allow_unverified",
    "require_exp",
    "on_invalid",
];
const LISTS_KEYS: &[&str] = &["allow", "block"];
const ENTRY_KEYS: &[&str] = &["value", "reason", "code", "expires"];
const POLICY_KEYS: &[&str] = &["name", "match", "descriptors", "hits"];
const MATCH_KEYS: &[&str] = &["hosts", "methods", "path", "headers", "grpc"];
const STRING_MATCH_KEYS: &[&str] = &["exact", "prefix", "regex"];
const HEADER_MATCH_KEYS: &[&str] = &["name", "exact", "prefix", "regex", "present", "invert"];
const GRPC_KEYS: &[&str] = &["service", "method"];
const ACTION_KINDS: &[&str] = &[
    "generic_key",
    "request_headers",
    "remote_address",
    "masked_remote_address",
    "header_value_match",
    "query_parameters",
    "identity",
    "grpc_service",
    "grpc_method",
    "path",
    "method",
];
const GENERIC_KEY_KEYS: &[&str] = &["descriptor_key", "descriptor_value"];
const REQUEST_HEADERS_KEYS: &[&str] = &["header_name", "descriptor_key", "skip_if_absent"];
const QUERY_KEYS: &[&str] = &["query_parameter_name", "descriptor_key", "skip_if_absent"];
const MASKED_KEYS: &[&str] = &["v4_prefix_mask_len", "v6_prefix_mask_len"];
const HEADER_VALUE_MATCH_KEYS: &[&str] = &[
    "descriptor_key",
    "descriptor_value",
    "expect_match",
    "headers",
];
const KEY_ONLY: &[&str] = &["descriptor_key"];
const GRAPHQL_KEYS: &[&str] = &[
    "paths",
    "max_depth",
    "max_complexity",
    "default_field_cost",
    "field_costs",
    "list_arguments",
    "default_list_size",
    "max_body_bytes",
    "cost_descriptor",
];
const WEBSOCKET_KEYS: &[&str] = &["descriptor"];
/// The largest `max_header_bytes` and `graphql.max_body_bytes`.
const MAX_BYTES: u64 = 64 * 1024 * 1024;

/// Public reason codes go into response bodies: keep them short and inert.
fn valid_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Header names as Envoy reports them: lower case.
/// An identity source's name: what identities start with (`<name>:<value>`). Not empty, and
/// not starting with `#`, which list entries keep for identity digests (`#xxh3:<hex>`).
fn source_name(v: String) -> Result<String, String> {
    let v = non_empty(v)?;
    if v.starts_with('#') {
        return Err(format!(
            "{v:?} starts with `#`, which list entries keep for identity digests"
        ));
    }
    Ok(v)
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b"-_.".contains(&b)
                || (i == 0 && b == b':')
        })
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) to Unix seconds.
pub(crate) fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month[(m - 1) as usize] {
        return None;
    }
    if hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3_600 + mm * 60 + ss).ok()
}

/// A header name as Envoy reports it: lower case, not empty.
fn header_name(v: String) -> Result<String, String> {
    let v = non_empty(v)?;
    if valid_header_name(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v:?} is not a lower-case header name (Envoy reports headers in lower case)"
        ))
    }
}

fn authz_failure_mode(v: String) -> Result<AuthzFailureMode, String> {
    match v.to_ascii_lowercase().as_str() {
        "allow" => Ok(AuthzFailureMode::Allow),
        "deny" => Ok(AuthzFailureMode::Deny),
        _ => Err(format!(
            "unknown failure mode {v:?} (expected allow or deny)"
        )),
    }
}

fn on_invalid(v: String) -> Result<JwtInvalid, String> {
    match v.as_str() {
        "deny" => Ok(JwtInvalid::Deny),
        "ignore" => Ok(JwtInvalid::Ignore),
        _ => Err(format!("unknown value {v:?} (expected deny or ignore)")),
    }
}

fn reason_code(c: String) -> Result<String, String> {
    if valid_code(&c) {
        Ok(c)
    } else {
        Err(format!(
            "{c:?} is not a reason code (1-64 of a-z, 0-9, _ and -)"
        ))
    }
}

/// A list entry's expiry: a UTC time like `2030-01-31T00:00:00Z`, or Unix seconds.
struct UnixTime(u64);

impl FromYaml for UnixTime {
    fn decode(d: &mut Decoder<'_>, node: &MarkedYaml<'_>, path: &str) -> Option<Self> {
        let parsed = match data(node) {
            YamlData::Value(Scalar::Integer(i)) => u64::try_from(*i).ok(),
            YamlData::Value(Scalar::String(s)) => parse_rfc3339_utc(s),
            _ => None,
        };
        if parsed.is_none() {
            let what = "a UTC time like 2030-01-31T00:00:00Z or Unix seconds";
            d.expected(node, path, what);
        }
        parsed.map(UnixTime)
    }
}

impl Decoder<'_> {
    pub(super) fn authz(&mut self, node: &MarkedYaml<'_>, path: &str) -> AuthzConfig {
        let mut a = AuthzConfig::default();
        let Some(f) = self.mapping(node, path, AUTHZ_KEYS) else {
            return a;
        };
        set(&mut a.domain, self.field_with(&f, "domain", non_empty));
        let failure_mode = self.field_with(&f, "failure_mode", authz_failure_mode);
        set(&mut a.failure_mode, failure_mode);
        let bytes = |UpTo::<MAX_BYTES>(n)| nonzero(n as usize);
        let max_header_bytes = self.field_with(&f, "max_header_bytes", bytes);
        set(&mut a.max_header_bytes, max_header_bytes);
        a.rate_limit_headers = self.flag(&f, "rate_limit_headers");
        let identity = self.field_by(&f, "identity", Self::identity);
        set(&mut a.identity, identity);
        set(&mut a.lists, self.field_by(&f, "lists", Self::lists));
        let policies = self.field_by(&f, "policies", Self::policies);
        set(&mut a.policies, policies);
        if let Some(field) = f.raw("graphql") {
            a.graphql = Some(self.graphql(field.value, &f.path("graphql")));
        }
        if let Some(field) = f.raw("websocket") {
            a.websocket = Some(self.websocket(field.value, &f.path("websocket")));
        }
        a
    }

    /// A non-empty string, or a list of them.
    fn strings(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<String> {
        if let YamlData::Sequence(items) = data(node) {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.extend(self.value_with(item, &index(path, i), non_empty));
            }
            out
        } else {
            self.value_with(node, path, non_empty).into_iter().collect()
        }
    }

    fn identity(&mut self, node: &MarkedYaml<'_>, path: &str) -> IdentityConfig {
        let mut c = IdentityConfig::default();
        let Some(f) = self.mapping(node, path, IDENTITY_KEYS) else {
            return c;
        };
        if let Some(items) = self.field_items(&f, "sources", "a list of identity sources") {
            c.sources.clear();
            for (item, item_path) in items {
                let Some(s) = self.source(item, &item_path) else {
                    continue;
                };
                if c.sources.iter().any(|x| x.name() == s.name()) {
                    let why = format!("duplicate identity source name {:?}", s.name());
                    self.error(item, &item_path, why);
                }
                c.sources.push(s);
            }
            if c.sources.is_empty() {
                self.error_at(&f, "sources", "needs at least one source");
            }
        }
        let hops = self.field_uint(&f, "xff_num_trusted_hops", 0, 16);
        set(&mut c.xff_num_trusted_hops, hops);
        set(&mut c.header, self.field_with(&f, "header", header_name));
        let strip = self.field_items(&f, "strip_headers", "a list of header names");
        for (item, item_path) in strip.unwrap_or_default() {
            let header = self.value_with(item, &item_path, header_name);
            c.strip_headers.extend(header);
        }
        c
    }

    fn source(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<IdentitySource> {
        // `- client_ip` and `- mtls` alone are fine.
        if let YamlData::Value(Scalar::String(s)) = data(node) {
            return match s.as_ref() {
                "client_ip" => Some(IdentitySource::ClientIp { name: "ip".into() }),
                "mtls" => Some(IdentitySource::Mtls {
                    name: "mtls".into(),
                }),
                other => {
                    self.error(
                        node,
                        path,
                        format!(
                            "unknown identity source {other:?} (expected a mapping with one of \
                             header, jwt, mtls, client_ip)"
                        ),
                    );
                    None
                }
            };
        }
        let f = self.mapping(node, path, SOURCE_KEYS)?;
        let kind = self.one_kind(&f, SOURCE_KINDS, "an identity source")?;
        let name = self.field_with(&f, "name", source_name);
        let field = f.raw(kind)?;
        let kpath = f.path(kind);
        Some(match kind {
            "header" => {
                let header = self.value_with(field.value, &kpath, header_name)?;
                IdentitySource::Header {
                    name: name.unwrap_or_else(|| header.clone()),
                    header,
                }
            }
            "jwt" => {
                let mut j = self.jwt(field.value, &kpath)?;
                if let Some(n) = name {
                    j.name = n;
                }
                IdentitySource::Jwt(Box::new(j))
            }
            "mtls" => {
                self.empty_or_true(field.value, &kpath);
                IdentitySource::Mtls {
                    name: name.unwrap_or_else(|| "mtls".into()),
                }
            }
            _ => {
                self.empty_or_true(field.value, &kpath);
                IdentitySource::ClientIp {
                    name: name.unwrap_or_else(|| "ip".into()),
                }
            }
        })
    }

    /// `{}`, null or `true`: a kind without options.
    fn empty_or_true(&mut self, node: &MarkedYaml<'_>, path: &str) {
        match data(node) {
            YamlData::Value(Scalar::Null | Scalar::Boolean(true)) => {}
            YamlData::Mapping(m) if m.is_empty() => {}
            _ => {
                let found = self.describe(node);
                self.error(
                    node,
                    path,
                    format!("takes no options ({{}}), found {found}"),
                );
            }
        }
    }

    /// Exactly one of `kinds` is a key of `f`: that one.
    fn one_kind<'k>(
        &mut self,
        f: &Fields<'_, '_>,
        kinds: &[&'k str],
        what: &str,
    ) -> Option<&'k str> {
        let present: Vec<&'k str> = kinds
            .iter()
            .copied()
            .filter(|k| f.raw(k).is_some())
            .collect();
        match present.as_slice() {
            [one] => Some(one),
            [] => {
                self.error(
                    f.node,
                    &f.path,
                    format!("{what} needs one of {}", kinds.join(", ")),
                );
                None
            }
            [_, second, ..] => {
                self.error(
                    f.node,
                    &child(&f.path, second),
                    format!("{what} takes exactly one of {}", kinds.join(", ")),
                );
                None
            }
        }
    }

    fn jwt(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<JwtConfig> {
        let f = self.mapping(node, path, JWT_KEYS)?;
        let mut j = JwtConfig::default();
        set(&mut j.header, self.field_with(&f, "header", header_name));
        set(&mut j.claim, self.field_with(&f, "claim", non_empty));
        let secret = |s: String| {
            let secret = non_empty(s)?.into_bytes();
            Ok(JwtKey::Hs256 { secret })
        };
        j.keys.extend(self.field_with(&f, "hs256_secret", secret));
        let from_env = |var: String| {
            let var = non_empty(var)?;
            if var.contains('=') || var.contains('\0') {
                return Err(format!("{var:?} is not an environment variable name"));
            }
            Ok(JwtKey::Hs256Env { var })
        };
        j.keys
            .extend(self.field_with(&f, "hs256_secret_env", from_env));
        // Key files are named relative to the settings file.
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let read = |name: String| {
            let file = dir.join(non_empty(name)?);
            match std::fs::read(&file) {
                Ok(bytes) => Ok((file, bytes)),
                Err(e) => Err(format!("cannot read {}: {e}", file.display())),
            }
        };
        let rsa = |name: String| {
            let (file, pem) = read(name)?;
            match jsonwebtoken::DecodingKey::from_rsa_pem(&pem) {
                Ok(_) => Ok(JwtKey::RsaPem { file, pem }),
                Err(e) => Err(format!(
                    "{} is not an RSA public key in PEM: {e}",
                    file.display()
                )),
            }
        };
        j.keys
            .extend(self.field_with(&f, "rsa_public_key_file", rsa));
        let ec = |name: String| {
            let (file, pem) = read(name)?;
            match jsonwebtoken::DecodingKey::from_ec_pem(&pem) {
                Ok(_) => Ok(JwtKey::EcPem { file, pem }),
                Err(e) => Err(format!(
                    "{} is not an EC public key in PEM: {e}",
                    file.display()
                )),
            }
        };
        j.keys.extend(self.field_with(&f, "ec_public_key_file", ec));
        let jwks = |name: String| {
            let (file, bytes) = read(name)?;
            let parsed = String::from_utf8(bytes)
                .map_err(|e| e.to_string())
                .and_then(|json| {
                    super::super::jwks::parse_jwks(&json)
                        .map(|_| json)
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok(json) => Ok(JwtKey::Jwks { file, json }),
                Err(e) => Err(format!("{} is not a usable JWKS: {e}", file.display())),
            }
        };
        j.keys.extend(self.field_with(&f, "jwks_file", jwks));
        j.issuer = self.field_with(&f, "issuer", non_empty);
        let audiences = self.field_by(&f, "audiences", Self::strings);
        set(&mut j.audiences, audiences);
        let leeway = self
            .field(&f, "leeway")
            .map(|Duration(d)| d / NANOS_PER_SECOND);
        set(&mut j.leeway, leeway);
        j.allow_unverified = self.flag(&f, "allow_unverified");
        set(&mut j.require_exp, self.field(&f, "require_exp"));
        let invalid = self.field_with(&f, "on_invalid", on_invalid);
        set(&mut j.on_invalid, invalid);
        let key_given = JWT_KEYS[2..7].iter().any(|k| f.raw(k).is_some());
        if j.keys.is_empty() && !j.allow_unverified && !key_given {
            self.error(
                f.node,
                &f.path,
                "needs a key (hs256_secret, hs256_secret_env, rsa_public_key_file, \
                 ec_public_key_file or jwks_file), or allow_unverified: true for tokens \
                 verified upstream",
            );
        }
        Some(j)
    }

    pub(super) fn lists(&mut self, node: &MarkedYaml<'_>, path: &str) -> ListsConfig {
        let mut l = ListsConfig::default();
        let Some(f) = self.mapping(node, path, LISTS_KEYS) else {
            return l;
        };
        for (name, out) in [("allow", &mut l.allow), ("block", &mut l.block)] {
            let items = self.field_items(&f, name, "a list of entries");
            for (item, item_path) in items.unwrap_or_default() {
                if let Some(e) = self.list_entry(item, &item_path) {
                    if let Some(first) = out.iter().find(|x| x.value == e.value) {
                        let message = format!(
                            "duplicate entry {:?}; the first is at line {}",
                            e.value, first.line
                        );
                        self.error(item, &item_path, message);
                    } else {
                        out.push(e);
                    }
                }
            }
        }
        l
    }

    fn list_entry(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<ListEntryConfig> {
        let line = node.span.start.line();
        let (value_node, value_path, f) = match data(node) {
            YamlData::Mapping(_) => {
                let f = self.mapping(node, path, ENTRY_KEYS)?;
                let Some(field) = f.get("value") else {
                    self.missing(&f, "value");
                    return None;
                };
                (field.value, f.path("value"), Some(f))
            }
            _ => (node, path.to_string(), None),
        };
        let value = self.value_with(value_node, &value_path, |raw: String| {
            canonical_entry(&non_empty(raw)?)
        })?;
        let mut e = ListEntryConfig {
            value,
            reason: String::new(),
            code: None,
            expires_at: None,
            line,
        };
        let Some(f) = f else { return Some(e) };
        e.reason = self.field(&f, "reason").unwrap_or_default();
        e.code = self.field_with(&f, "code", reason_code);
        e.expires_at = self.field(&f, "expires").map(|UnixTime(t)| t);
        Some(e)
    }

    fn policies(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<PolicyConfig> {
        let mut out: Vec<PolicyConfig> = Vec::new();
        let items = self
            .items(node, path, "a list of policies")
            .unwrap_or_default();
        for (item, item_path) in items {
            let Some(f) = self.mapping(item, &item_path, POLICY_KEYS) else {
                continue;
            };
            let name = self.required_with(&f, "name", non_empty);
            let matcher = self
                .field_by(&f, "match", Self::matcher)
                .unwrap_or_default();
            if f.get("descriptors").is_none() {
                self.missing(&f, "descriptors");
            }
            let descriptors = self
                .field_by(&f, "descriptors", Self::policy_descriptors)
                .unwrap_or_default();
            let hits = self.field(&f, "hits").unwrap_or(1);
            let Some(name) = name else { continue };
            if let Some(first) = out.iter().find(|p| p.name == name) {
                let message = format!(
                    "duplicate policy name {name:?}; the first is at line {}",
                    first.line
                );
                self.error(item, &item_path, message);
                continue;
            }
            out.push(PolicyConfig {
                name,
                matcher,
                descriptors,
                hits,
                line: item.span.start.line(),
            });
        }
        out
    }

    /// A policy's descriptors: a list of action lists (empty ones are reported and dropped).
    fn policy_descriptors(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<Vec<ActionConfig>> {
        let mut out = Vec::new();
        for (item, item_path) in self
            .items(node, path, "a list of descriptors")
            .unwrap_or_default()
        {
            let actions = self.actions(item, &item_path);
            if !actions.is_empty() {
                out.push(actions);
            }
        }
        out
    }

    fn matcher(&mut self, node: &MarkedYaml<'_>, path: &str) -> MatchConfig {
        let mut m = MatchConfig::default();
        let Some(f) = self.mapping(node, path, MATCH_KEYS) else {
            return m;
        };
        if let Some(hosts) = self.field_by(&f, "hosts", Self::strings) {
            m.hosts = hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        }
        if let Some(methods) = self.field_by(&f, "methods", Self::strings) {
            m.methods = methods.iter().map(|h| h.to_ascii_uppercase()).collect();
        }
        m.path = self.field_by(&f, "path", Self::string_match).flatten();
        let headers = self.field_by(&f, "headers", Self::header_matches);
        set(&mut m.headers, headers);
        if let Some(field) = f.raw("grpc") {
            let path = f.path("grpc");
            let mut g = GrpcMatch::default();
            match data(field.value) {
                YamlData::Value(Scalar::Null | Scalar::Boolean(true)) => {}
                _ => {
                    if let Some(gf) = self.mapping(field.value, &path, GRPC_KEYS) {
                        g.service = self.field_with(&gf, "service", non_empty);
                        g.method = self.field_with(&gf, "method", non_empty);
                    }
                }
            }
            m.grpc = Some(g);
        }
        m
    }

    fn string_match(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<StringMatch> {
        let f = self.mapping(node, path, STRING_MATCH_KEYS)?;
        let kind = self.one_kind(&f, STRING_MATCH_KEYS, "a match")?;
        self.string_match_of(&f, kind)
    }

    fn string_match_of(&mut self, f: &Fields<'_, '_>, kind: &str) -> Option<StringMatch> {
        let field = f.raw(kind)?;
        let path = f.path(kind);
        let v = self.string(field.value, &path)?;
        Some(match kind {
            "exact" => StringMatch::Exact(v),
            "prefix" => StringMatch::Prefix(v),
            _ => {
                if let Err(e) = regex::Regex::new(&v) {
                    // regex's message spans lines (pattern, caret, error): keep the error.
                    let text = e.to_string();
                    let last = text.lines().last().unwrap_or_default();
                    let reason = last.strip_prefix("error: ").unwrap_or(last);
                    self.error(field.value, &path, format!("invalid regex: {reason}"));
                    return None;
                }
                StringMatch::Regex(v)
            }
        })
    }

    fn header_matches(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<HeaderMatchConfig> {
        let mut out = Vec::new();
        let items = self
            .items(node, path, "a list of header matches")
            .unwrap_or_default();
        for (item, item_path) in items {
            let Some(f) = self.mapping(item, &item_path, HEADER_MATCH_KEYS) else {
                continue;
            };
            let name = self.required_with(&f, "name", header_name);
            let kinds: Vec<&str> = ["exact", "prefix", "regex", "present"]
                .into_iter()
                .filter(|k| f.raw(k).is_some())
                .collect();
            let mut value = None;
            match kinds.as_slice() {
                [] => {}
                ["present"] => {
                    if self.field(&f, "present") == Some(false) {
                        let why = "use invert: true to match an absent header";
                        self.error_at(&f, "present", why);
                    }
                }
                [one] => value = self.string_match_of(&f, one),
                [_, second, ..] => self.error(
                    item,
                    &child(&item_path, second),
                    "takes at most one of exact, prefix, regex, present",
                ),
            }
            let invert = self.flag(&f, "invert");
            if let Some(name) = name {
                out.push(HeaderMatchConfig {
                    name,
                    value,
                    invert,
                });
            }
        }
        out
    }

    /// One descriptor: a list of actions.
    fn actions(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<ActionConfig> {
        let mut out = Vec::new();
        let Some(items) = self.items(node, path, "a list of actions") else {
            return out;
        };
        if items.is_empty() {
            self.error(node, path, "a descriptor needs at least one action");
        }
        for (item, item_path) in items {
            let Some(f) = self.mapping(item, &item_path, ACTION_KINDS) else {
                continue;
            };
            let Some(kind) = self.one_kind(&f, ACTION_KINDS, "a descriptor action") else {
                continue;
            };
            if let Some(a) = self.action(&f, kind) {
                out.push(a);
            }
        }
        out
    }

    fn action(&mut self, outer: &Fields<'_, '_>, kind: &str) -> Option<ActionConfig> {
        let field = outer.raw(kind)?;
        let path = outer.path(kind);
        let node = field.value;
        let allowed: &[&str] = match kind {
            "generic_key" => GENERIC_KEY_KEYS,
            "request_headers" => REQUEST_HEADERS_KEYS,
            "query_parameters" => QUERY_KEYS,
            "masked_remote_address" => MASKED_KEYS,
            "header_value_match" => HEADER_VALUE_MATCH_KEYS,
            "remote_address" => &[],
            _ => KEY_ONLY,
        };
        // Actions without required keys may be written `{}` or left empty.
        let empty = is_null(node);
        let f = if empty {
            None
        } else {
            Some(self.mapping(node, &path, allowed)?)
        };
        let need = |d: &mut Self, name: &str| -> Option<String> {
            match &f {
                Some(f) => d.required_with(f, name, non_empty),
                None => {
                    d.error(node, &path, format!("missing required key {name:?}"));
                    None
                }
            }
        };
        let key_or = |d: &mut Self, default: &str| -> String {
            f.as_ref()
                .and_then(|f| d.field_with(f, "descriptor_key", non_empty))
                .unwrap_or_else(|| default.to_string())
        };
        let flag = |d: &mut Self, name: &str, default: bool| -> bool {
            f.as_ref().and_then(|f| d.field(f, name)).unwrap_or(default)
        };
        let mask = |d: &mut Self, name: &str, max: u8| -> u8 {
            f.as_ref()
                .and_then(|f| d.field_uint(f, name, 0, u64::from(max)))
                .unwrap_or(max)
        };
        Some(match kind {
            "generic_key" => ActionConfig::GenericKey {
                descriptor_value: need(self, "descriptor_value")?,
                descriptor_key: key_or(self, "generic_key"),
            },
            "request_headers" => ActionConfig::RequestHeaders {
                header_name: match &f {
                    Some(f) => self.required_with(f, "header_name", header_name)?,
                    None => need(self, "header_name")?,
                },
                descriptor_key: need(self, "descriptor_key")?,
                skip_if_absent: flag(self, "skip_if_absent", false),
            },
            "query_parameters" => ActionConfig::QueryParameters {
                query_parameter_name: need(self, "query_parameter_name")?,
                descriptor_key: need(self, "descriptor_key")?,
                skip_if_absent: flag(self, "skip_if_absent", false),
            },
            "remote_address" => ActionConfig::RemoteAddress,
            "masked_remote_address" => ActionConfig::MaskedRemoteAddress {
                v4_prefix_mask_len: mask(self, "v4_prefix_mask_len", 32),
                v6_prefix_mask_len: mask(self, "v6_prefix_mask_len", 128),
            },
            "header_value_match" => {
                let headers = match f.as_ref().and_then(|f| f.get("headers")) {
                    Some(h) => self.header_matches(h.value, &child(&path, "headers")),
                    None => {
                        need(self, "headers")?;
                        Vec::new()
                    }
                };
                ActionConfig::HeaderValueMatch {
                    descriptor_value: need(self, "descriptor_value")?,
                    descriptor_key: key_or(self, "header_match"),
                    expect_match: flag(self, "expect_match", true),
                    headers,
                }
            }
            "identity" => ActionConfig::Identity {
                descriptor_key: key_or(self, "identity"),
            },
            "grpc_service" => ActionConfig::GrpcService {
                descriptor_key: key_or(self, "grpc_service"),
            },
            "grpc_method" => ActionConfig::GrpcMethod {
                descriptor_key: key_or(self, "grpc_method"),
            },
            "path" => ActionConfig::Path {
                descriptor_key: key_or(self, "path"),
            },
            _ => ActionConfig::Method {
                descriptor_key: key_or(self, "method"),
            },
        })
    }

    fn graphql(&mut self, node: &MarkedYaml<'_>, path: &str) -> GraphqlConfig {
        let mut g = GraphqlConfig::default();
        if is_null(node) {
            return g;
        }
        let Some(f) = self.mapping(node, path, GRAPHQL_KEYS) else {
            return g;
        };
        if let Some(paths) = self.field_by(&f, "paths", Self::strings) {
            g.paths = paths;
            if g.paths.iter().any(|p| !p.starts_with('/')) {
                self.error_at(&f, "paths", "paths must start with /");
            }
        }
        let depth = |UpTo::<1_000>(n)| nonzero(n as u32);
        set(&mut g.max_depth, self.field_with(&f, "max_depth", depth));
        let complexity = self.field_uint(&f, "max_complexity", 0, u64::MAX >> 1);
        set(&mut g.max_complexity, complexity);
        let cost = self.field_uint(&f, "default_field_cost", 0, 1_000_000);
        set(&mut g.default_field_cost, cost);
        let size = self.field_uint(&f, "default_list_size", 0, 1_000_000);
        set(&mut g.default_list_size, size);
        let bytes = |UpTo::<MAX_BYTES>(n)| nonzero(n as usize);
        let max_body_bytes = self.field_with(&f, "max_body_bytes", bytes);
        set(&mut g.max_body_bytes, max_body_bytes);
        if let Some(field) = f.get("field_costs") {
            let path = f.path("field_costs");
            if let YamlData::Mapping(map) = data(field.value) {
                for (k, v) in map.iter() {
                    let name = self.raw_text(k);
                    if let Some(n) = self.uint(v, &child(&path, &name), 1_000_000) {
                        g.field_costs.push((name, n));
                    }
                }
            } else {
                self.expected(field.value, &path, "a mapping of field name to cost");
            }
        }
        let list_arguments = self.field_by(&f, "list_arguments", Self::strings);
        set(&mut g.list_arguments, list_arguments);
        let cost_descriptor = self.field_by(&f, "cost_descriptor", Self::actions);
        set(&mut g.cost_descriptor, cost_descriptor);
        g
    }

    fn websocket(&mut self, node: &MarkedYaml<'_>, path: &str) -> WebsocketConfig {
        let mut w = WebsocketConfig::default();
        if is_null(node) {
            return w;
        }
        let Some(f) = self.mapping(node, path, WEBSOCKET_KEYS) else {
            return w;
        };
        let descriptor = self.field_by(&f, "descriptor", Self::actions);
        set(&mut w.descriptor, descriptor);
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_utc("2030-01-01T00:00:00Z"),
            Some(1_893_456_000)
        );
        assert_eq!(
            parse_rfc3339_utc("2024-02-29T12:30:15Z"),
            Some(1_709_209_815)
        );
        assert_eq!(parse_rfc3339_utc("2023-02-29T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2030-01-01 00:00:00Z"), None);
        assert_eq!(parse_rfc3339_utc("2030-01-01T24:00:00Z"), None);
    }

    fn errors(yaml: &str) -> Vec<String> {
        match crate::config::parse_str("rt.yaml", yaml) {
            Ok(c) => panic!("expected errors, loaded {:?}", c.authz),
            Err(e) => e.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_full_block_decodes() {
        let c = crate::config::parse_str(
            "rt.yaml",
            "authz:
  domain: d
  failure_mode: allow
  identity:
    xff_num_trusted_hops: 2
    sources: [{header: x-api-key, name: key}, mtls, {client_ip: {}, name: addr}]
    strip_headers: [x-user]
  lists:
    block: [1.2.3.4, {value: 10.0.0.0/8, reason: r, code: c-1, expires: 2030-01-01T00:00:00Z}]
  policies:
    - name: p
      hits: 3
      match:
        hosts: [A.example.com]
        methods: [post]
        path: {regex: '/v[0-9]+/.*'}
        headers: [{name: x-tier, exact: free}, {name: x-debug, invert: true}]
        grpc: {service: s.S}
      descriptors:
        - [{generic_key: {descriptor_value: v}}, {masked_remote_address: {v4_prefix_mask_len: 24}}]
        - [{header_value_match: {descriptor_value: m, headers: [{name: x, prefix: y}]}}, {query_parameters: {query_parameter_name: q, descriptor_key: k}}]
  graphql: {max_depth: 3, field_costs: {a: 5}}
  websocket:
domains:
  - domain: d
",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = c.authz.unwrap();
        assert_eq!(a.failure_mode, AuthzFailureMode::Allow);
        assert_eq!(a.identity.xff_num_trusted_hops, 2);
        assert_eq!(a.identity.sources.len(), 3);
        assert_eq!(a.identity.sources[2].name(), "addr");
        assert_eq!(a.lists.block[1].expires_at, Some(1_893_456_000));
        assert_eq!(a.lists.block[1].code.as_deref(), Some("c-1"));
        let p = &a.policies[0];
        assert_eq!((p.hits, p.line), (3, 11));
        assert_eq!(p.matcher.hosts, vec!["a.example.com".to_string()]);
        assert_eq!(p.matcher.methods, vec!["POST".to_string()]);
        assert_eq!(p.descriptors.len(), 2);
        assert_eq!(a.graphql.unwrap().field_costs, vec![("a".to_string(), 5)]);
        assert!(a.websocket.is_some());
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_key_path() {
        let e = errors(
            "authz:
  domian: x
  identity:
    sources: [{header: X-Api-Key}, {jwt: {claim: sub}}, {mtls: {}, client_ip: {}}, bogus, {mtls: {}, name: '#x'}]
  lists:
    block: [10.0.0.1/8, {value: 1.2.3.4, code: Bad Code}, {value: 1.2.3.5, expires: tomorrow}, '#xxh3:nothex']
  policies:
    - name: p
      match: {path: {regex: '('}}
      descriptors: [[{generic_key: {}}], [{identity: {}, path: {}}], []]
    - descriptors: [[{request_headers: {header_name: x}}]]
  graphql: {max_depth: 0}
",
        );
        let expect = [
            "rt.yaml:2:3: authz.domian: unknown key \"domian\" (did you mean \"domain\"?)",
            "rt.yaml:4:24: authz.identity.sources[0].header: \"X-Api-Key\" is not a lower-case header name",
            "rt.yaml:4:42: authz.identity.sources[1].jwt: needs a key",
            "authz.identity.sources[2].client_ip: an identity source takes exactly one of",
            "authz.identity.sources[3]: unknown identity source \"bogus\"",
            "authz.identity.sources[4].name: \"#x\" starts with `#`, which list entries keep for identity digests",
            "rt.yaml:6:13: authz.lists.block[0]: \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)",
            "authz.lists.block[1].code: \"Bad Code\" is not a reason code",
            "authz.lists.block[2].expires: expected a UTC time",
            "authz.lists.block[3]: \"#xxh3:nothex\" is not an identity digest (#xxh3:<16 hex digits>",
            "rt.yaml:9:29: authz.policies[0].match.path.regex: invalid regex: unclosed group",
            "authz.policies[0].descriptors[0][0].generic_key: missing required key \"descriptor_value\"",
            "authz.policies[0].descriptors[1][0].path: a descriptor action takes exactly one of",
            "authz.policies[0].descriptors[2]: a descriptor needs at least one action",
            "authz.policies[1]: missing required key \"name\"",
            "authz.policies[1].descriptors[0][0].request_headers: missing required key \"descriptor_key\"",
            "rt.yaml:12:24: authz.graphql.max_depth: must be greater than 0",
        ];
        for want in expect {
            assert!(
                e.iter().any(|l| l.contains(want)),
                "missing {want:?} in\n{}",
                e.join("\n")
            );
        }
        let e = errors("authz:\n  policies: [{name: p, descriptors: [[{identity: {}}]]}]\n");
        assert!(
            e[0].contains(
                "authz.domain: policies count in domain \"ext_authz\", which no file defines"
            ),
            "{e:?}"
        );
        let e = errors("authz: {}\n---\nauthz: {}\n");
        assert!(e[0].contains("only one authz block is allowed"), "{e:?}");
        let e = errors(
            "authz:\n  identity:\n    sources: [{jwt: {rsa_public_key_file: /nonexistent.pem}}]\n",
        );
        assert!(e[0].contains("cannot read /nonexistent.pem"), "{e:?}");
    }
}
