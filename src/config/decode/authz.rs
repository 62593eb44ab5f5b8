//! Decoding the settings file's `authz:` block, with the same positions, key paths and
//! strictness as the rest of the file. Key files named by JWT sources are read here (relative
//! to the settings file) and parsed, so a bad key is a config error with its line, not a
//! surprise at the first request.

use super::{Decoder, Fields, child, data, index, is_null};
use crate::config::authz::{
    ActionConfig, AuthzConfig, AuthzFailureMode, GraphqlConfig, GrpcMatch, HeaderMatchConfig,
    IdentityConfig, IdentitySource, JwtConfig, JwtInvalid, JwtKey, ListEntryConfig, ListsConfig,
    MatchConfig, PolicyConfig, StringMatch, WebsocketConfig,
};
use crate::limiter::NANOS_PER_SECOND;
use crate::lists::canonical_entry;
use saphyr::{MarkedYaml, Scalar, YamlData};
use std::path::PathBuf;

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

/// Public reason codes go into response bodies: keep them short and inert.
fn valid_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Header names as Envoy reports them: lower case.
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

impl Decoder<'_> {
    pub(super) fn authz(&mut self, node: &MarkedYaml<'_>, path: &str) -> AuthzConfig {
        let mut a = AuthzConfig::default();
        let Some(f) = self.mapping(node, path, AUTHZ_KEYS) else {
            return a;
        };
        if let Some(field) = f.get("domain") {
            let path = f.path("domain");
            match self.string(field.value, &path) {
                Some(v) if v.is_empty() => self.error(field.value, &path, "must not be empty"),
                Some(v) => a.domain = v,
                None => {}
            }
        }
        if let Some(field) = f.get("failure_mode") {
            let path = f.path("failure_mode");
            if let Some(v) = self.string(field.value, &path) {
                match v.to_ascii_lowercase().as_str() {
                    "allow" => a.failure_mode = AuthzFailureMode::Allow,
                    "deny" => a.failure_mode = AuthzFailureMode::Deny,
                    _ => self.error(
                        field.value,
                        &path,
                        format!("unknown failure mode {v:?} (expected allow or deny)"),
                    ),
                }
            }
        }
        if let Some(field) = f.get("max_header_bytes") {
            let path = f.path("max_header_bytes");
            match self.uint(field.value, &path, 64 * 1024 * 1024) {
                Some(0) => self.error(field.value, &path, "must be greater than 0"),
                Some(n) => a.max_header_bytes = n as usize,
                None => {}
            }
        }
        if let Some(field) = f.get("rate_limit_headers") {
            a.rate_limit_headers = self
                .boolean(field.value, &f.path("rate_limit_headers"))
                .unwrap_or(false);
        }
        if let Some(field) = f.get("identity") {
            a.identity = self.identity(field.value, &f.path("identity"));
        }
        if let Some(field) = f.get("lists") {
            a.lists = self.lists(field.value, &f.path("lists"));
        }
        if let Some(field) = f.get("policies") {
            a.policies = self.policies(field.value, &f.path("policies"));
        }
        if let Some(field) = f.raw("graphql") {
            a.graphql = Some(self.graphql(field.value, &f.path("graphql")));
        }
        if let Some(field) = f.raw("websocket") {
            a.websocket = Some(self.websocket(field.value, &f.path("websocket")));
        }
        a
    }

    /// A non-empty string.
    fn nonempty(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<String> {
        match self.string(node, path) {
            Some(v) if v.is_empty() => {
                self.error(node, path, "must not be empty");
                None
            }
            other => other,
        }
    }

    fn header_name(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<String> {
        let v = self.nonempty(node, path)?;
        if !valid_header_name(&v) {
            self.error(
                node,
                path,
                format!(
                    "{v:?} is not a lower-case header name (Envoy reports headers in lower case)"
                ),
            );
            return None;
        }
        Some(v)
    }

    /// A required non-empty string key of `f`.
    fn req(&mut self, f: &Fields<'_, '_>, name: &str) -> Option<String> {
        match f.get(name) {
            Some(field) => self.nonempty(field.value, &f.path(name)),
            None => {
                self.error(f.node, &f.path, format!("missing required key {name:?}"));
                None
            }
        }
    }

    /// An optional string key of `f` with a default.
    fn opt(&mut self, f: &Fields<'_, '_>, name: &str, default: &str) -> String {
        match f.get(name) {
            Some(field) => self
                .nonempty(field.value, &f.path(name))
                .unwrap_or_else(|| default.to_string()),
            None => default.to_string(),
        }
    }

    /// A string, or a list of strings.
    fn strings(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<String> {
        if let YamlData::Sequence(items) = data(node) {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if let Some(s) = self.nonempty(item, &index(path, i)) {
                    out.push(s);
                }
            }
            out
        } else {
            self.nonempty(node, path).into_iter().collect()
        }
    }

    fn identity(&mut self, node: &MarkedYaml<'_>, path: &str) -> IdentityConfig {
        let mut c = IdentityConfig::default();
        let Some(f) = self.mapping(node, path, IDENTITY_KEYS) else {
            return c;
        };
        if let Some(field) = f.get("sources") {
            let path = f.path("sources");
            if let Some(items) = self.sequence(field.value, &path, "a list of identity sources") {
                c.sources.clear();
                for (i, item) in items.iter().enumerate() {
                    let item_path = index(&path, i);
                    if let Some(s) = self.source(item, &item_path) {
                        if c.sources.iter().any(|x| x.name() == s.name()) {
                            self.error(
                                item,
                                &item_path,
                                format!("duplicate identity source name {:?}", s.name()),
                            );
                        }
                        c.sources.push(s);
                    }
                }
                if c.sources.is_empty() {
                    self.error(field.value, &path, "needs at least one source");
                }
            }
        }
        if let Some(field) = f.get("xff_num_trusted_hops") {
            let path = f.path("xff_num_trusted_hops");
            if let Some(n) = self.uint(field.value, &path, 16) {
                c.xff_num_trusted_hops = n as u32;
            }
        }
        if let Some(field) = f.get("header")
            && let Some(h) = self.header_name(field.value, &f.path("header"))
        {
            c.header = h;
        }
        if let Some(field) = f.get("strip_headers") {
            let path = f.path("strip_headers");
            if let Some(items) = self.sequence(field.value, &path, "a list of header names") {
                for (i, item) in items.iter().enumerate() {
                    if let Some(h) = self.header_name(item, &index(&path, i)) {
                        c.strip_headers.push(h);
                    }
                }
            }
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
        let name = f
            .get("name")
            .and_then(|field| self.nonempty(field.value, &f.path("name")));
        let field = f.raw(kind)?;
        let kpath = f.path(kind);
        Some(match kind {
            "header" => {
                let header = self.header_name(field.value, &kpath)?;
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

    fn key_file(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<(PathBuf, Vec<u8>)> {
        let name = self.nonempty(node, path)?;
        let base = self.file.parent().unwrap_or(std::path::Path::new("."));
        let file = base.join(&name);
        match std::fs::read(&file) {
            Ok(bytes) => Some((file, bytes)),
            Err(e) => {
                self.error(node, path, format!("cannot read {}: {e}", file.display()));
                None
            }
        }
    }

    fn jwt(&mut self, node: &MarkedYaml<'_>, path: &str) -> Option<JwtConfig> {
        let f = self.mapping(node, path, JWT_KEYS)?;
        let mut j = JwtConfig {
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
        };
        if let Some(field) = f.get("header")
            && let Some(h) = self.header_name(field.value, &f.path("header"))
        {
            j.header = h;
        }
        j.claim = self.opt(&f, "claim", "sub");
        if let Some(field) = f.get("hs256_secret")
            && let Some(s) = self.nonempty(field.value, &f.path("hs256_secret"))
        {
            j.keys.push(JwtKey::Hs256 {
                secret: s.into_bytes(),
            });
        }
        if let Some(field) = f.get("hs256_secret_env") {
            let path = f.path("hs256_secret_env");
            if let Some(var) = self.nonempty(field.value, &path) {
                match std::env::var(&var) {
                    Ok(s) if !s.is_empty() => j.keys.push(JwtKey::Hs256 {
                        secret: s.into_bytes(),
                    }),
                    _ => self.error(
                        field.value,
                        &path,
                        format!("environment variable {var} is not set"),
                    ),
                }
            }
        }
        if let Some(field) = f.get("rsa_public_key_file") {
            let path = f.path("rsa_public_key_file");
            if let Some((file, pem)) = self.key_file(field.value, &path) {
                match jsonwebtoken::DecodingKey::from_rsa_pem(&pem) {
                    Ok(_) => j.keys.push(JwtKey::RsaPem { file, pem }),
                    Err(e) => self.error(
                        field.value,
                        &path,
                        format!("{} is not an RSA public key in PEM: {e}", file.display()),
                    ),
                }
            }
        }
        if let Some(field) = f.get("ec_public_key_file") {
            let path = f.path("ec_public_key_file");
            if let Some((file, pem)) = self.key_file(field.value, &path) {
                match jsonwebtoken::DecodingKey::from_ec_pem(&pem) {
                    Ok(_) => j.keys.push(JwtKey::EcPem { file, pem }),
                    Err(e) => self.error(
                        field.value,
                        &path,
                        format!("{} is not an EC public key in PEM: {e}", file.display()),
                    ),
                }
            }
        }
        if let Some(field) = f.get("jwks_file") {
            let path = f.path("jwks_file");
            if let Some((file, bytes)) = self.key_file(field.value, &path) {
                let parsed = String::from_utf8(bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|json| {
                        super::super::jwks::parse_jwks(&json)
                            .map(|_| json)
                            .map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(json) => j.keys.push(JwtKey::Jwks { file, json }),
                    Err(e) => self.error(
                        field.value,
                        &path,
                        format!("{} is not a usable JWKS: {e}", file.display()),
                    ),
                }
            }
        }
        if let Some(field) = f.get("issuer") {
            j.issuer = self.nonempty(field.value, &f.path("issuer"));
        }
        if let Some(field) = f.get("audiences") {
            j.audiences = self.strings(field.value, &f.path("audiences"));
        }
        if let Some(field) = f.get("leeway") {
            let path = f.path("leeway");
            if let Some(d) = self.duration(field.value, &path) {
                j.leeway = d / NANOS_PER_SECOND;
            }
        }
        if let Some(field) = f.get("allow_unverified") {
            j.allow_unverified = self
                .boolean(field.value, &f.path("allow_unverified"))
                .unwrap_or(false);
        }
        if let Some(field) = f.get("require_exp") {
            j.require_exp = self
                .boolean(field.value, &f.path("require_exp"))
                .unwrap_or(true);
        }
        if let Some(field) = f.get("on_invalid") {
            let path = f.path("on_invalid");
            if let Some(v) = self.string(field.value, &path) {
                match v.as_str() {
                    "deny" => j.on_invalid = JwtInvalid::Deny,
                    "ignore" => j.on_invalid = JwtInvalid::Ignore,
                    _ => self.error(
                        field.value,
                        &path,
                        format!("unknown value {v:?} (expected deny or ignore)"),
                    ),
                }
            }
        }
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
            let Some(field) = f.get(name) else { continue };
            let path = f.path(name);
            let Some(items) = self.sequence(field.value, &path, "a list of entries") else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let item_path = index(&path, i);
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
                    self.error(node, path, "missing required key \"value\"");
                    return None;
                };
                (field.value, f.path("value"), Some(f))
            }
            _ => (node, path.to_string(), None),
        };
        let raw = self.nonempty(value_node, &value_path)?;
        let value = match canonical_entry(&raw) {
            Ok(v) => v,
            Err(e) => {
                self.error(value_node, &value_path, e);
                return None;
            }
        };
        let mut e = ListEntryConfig {
            value,
            reason: String::new(),
            code: None,
            expires_at: None,
            line,
        };
        let Some(f) = f else { return Some(e) };
        if let Some(field) = f.get("reason") {
            e.reason = self
                .string(field.value, &f.path("reason"))
                .unwrap_or_default();
        }
        if let Some(field) = f.get("code") {
            let path = f.path("code");
            if let Some(c) = self.string(field.value, &path) {
                if valid_code(&c) {
                    e.code = Some(c);
                } else {
                    self.error(
                        field.value,
                        &path,
                        format!("{c:?} is not a reason code (1-64 of a-z, 0-9, _ and -)"),
                    );
                }
            }
        }
        if let Some(field) = f.get("expires") {
            let path = f.path("expires");
            let parsed = match data(field.value) {
                YamlData::Value(Scalar::Integer(i)) => u64::try_from(*i).ok(),
                YamlData::Value(Scalar::String(s)) => parse_rfc3339_utc(s),
                _ => None,
            };
            match parsed {
                Some(t) => e.expires_at = Some(t),
                None => {
                    let found = self.describe(field.value);
                    self.error(
                        field.value,
                        &path,
                        format!(
                            "expected a UTC time like 2030-01-31T00:00:00Z or Unix seconds, \
                             found {found}"
                        ),
                    );
                }
            }
        }
        Some(e)
    }

    fn policies(&mut self, node: &MarkedYaml<'_>, path: &str) -> Vec<PolicyConfig> {
        let mut out: Vec<PolicyConfig> = Vec::new();
        let Some(items) = self.sequence(node, path, "a list of policies") else {
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let item_path = index(path, i);
            let Some(f) = self.mapping(item, &item_path, POLICY_KEYS) else {
                continue;
            };
            let name = self.req(&f, "name");
            let matcher = match f.get("match") {
                Some(field) => self.matcher(field.value, &f.path("match")),
                None => MatchConfig::default(),
            };
            let mut descriptors = Vec::new();
            match f.get("descriptors") {
                Some(field) => {
                    let dpath = f.path("descriptors");
                    if let Some(ds) = self.sequence(field.value, &dpath, "a list of descriptors") {
                        for (j, d) in ds.iter().enumerate() {
                            let actions = self.actions(d, &index(&dpath, j));
                            if !actions.is_empty() {
                                descriptors.push(actions);
                            }
                        }
                    }
                }
                None => self.error(item, &item_path, "missing required key \"descriptors\""),
            }
            let mut hits = 1;
            if let Some(field) = f.get("hits") {
                hits = self
                    .uint(field.value, &f.path("hits"), u64::from(u32::MAX))
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or(1);
            }
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

    fn matcher(&mut self, node: &MarkedYaml<'_>, path: &str) -> MatchConfig {
        let mut m = MatchConfig::default();
        let Some(f) = self.mapping(node, path, MATCH_KEYS) else {
            return m;
        };
        if let Some(field) = f.get("hosts") {
            m.hosts = self
                .strings(field.value, &f.path("hosts"))
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect();
        }
        if let Some(field) = f.get("methods") {
            m.methods = self
                .strings(field.value, &f.path("methods"))
                .into_iter()
                .map(|h| h.to_ascii_uppercase())
                .collect();
        }
        if let Some(field) = f.get("path") {
            m.path = self.string_match(field.value, &f.path("path"));
        }
        if let Some(field) = f.get("headers") {
            m.headers = self.header_matches(field.value, &f.path("headers"));
        }
        if let Some(field) = f.raw("grpc") {
            let path = f.path("grpc");
            let mut g = GrpcMatch::default();
            match data(field.value) {
                YamlData::Value(Scalar::Null | Scalar::Boolean(true)) => {}
                _ => {
                    if let Some(gf) = self.mapping(field.value, &path, GRPC_KEYS) {
                        if let Some(x) = gf.get("service") {
                            g.service = self.nonempty(x.value, &gf.path("service"));
                        }
                        if let Some(x) = gf.get("method") {
                            g.method = self.nonempty(x.value, &gf.path("method"));
                        }
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
        let Some(items) = self.sequence(node, path, "a list of header matches") else {
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let item_path = index(path, i);
            let Some(f) = self.mapping(item, &item_path, HEADER_MATCH_KEYS) else {
                continue;
            };
            let name = match f.get("name") {
                Some(field) => self.header_name(field.value, &f.path("name")),
                None => {
                    self.error(item, &item_path, "missing required key \"name\"");
                    None
                }
            };
            let kinds: Vec<&str> = ["exact", "prefix", "regex", "present"]
                .into_iter()
                .filter(|k| f.raw(k).is_some())
                .collect();
            let mut value = None;
            match kinds.as_slice() {
                [] => {}
                ["present"] => {
                    if let Some(field) = f.get("present")
                        && self.boolean(field.value, &f.path("present")) == Some(false)
                    {
                        self.error(
                            field.value,
                            &f.path("present"),
                            "use invert: true to match an absent header",
                        );
                    }
                }
                [one] => value = self.string_match_of(&f, one),
                [_, second, ..] => self.error(
                    item,
                    &child(&item_path, second),
                    "takes at most one of exact, prefix, regex, present",
                ),
            }
            let invert = match f.get("invert") {
                Some(field) => self
                    .boolean(field.value, &f.path("invert"))
                    .unwrap_or(false),
                None => false,
            };
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
        let Some(items) = self.sequence(node, path, "a list of actions") else {
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let item_path = index(path, i);
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
        if items.is_empty() {
            self.error(node, path, "a descriptor needs at least one action");
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
                Some(f) => d.req(f, name),
                None => {
                    d.error(node, &path, format!("missing required key {name:?}"));
                    None
                }
            }
        };
        let key_or = |d: &mut Self, default: &str| -> String {
            match &f {
                Some(f) => d.opt(f, "descriptor_key", default),
                None => default.to_string(),
            }
        };
        let flag = |d: &mut Self, name: &str, default: bool| -> bool {
            match f
                .as_ref()
                .and_then(|f| f.get(name).map(|x| (x.value, f.path(name))))
            {
                Some((v, p)) => d.boolean(v, &p).unwrap_or(default),
                None => default,
            }
        };
        Some(match kind {
            "generic_key" => ActionConfig::GenericKey {
                descriptor_value: need(self, "descriptor_value")?,
                descriptor_key: key_or(self, "generic_key"),
            },
            "request_headers" => {
                let header_name = match f.as_ref().and_then(|f| f.get("header_name")) {
                    Some(h) => self.header_name(h.value, &child(&path, "header_name"))?,
                    None => need(self, "header_name")?,
                };
                ActionConfig::RequestHeaders {
                    header_name,
                    descriptor_key: need(self, "descriptor_key")?,
                    skip_if_absent: flag(self, "skip_if_absent", false),
                }
            }
            "query_parameters" => ActionConfig::QueryParameters {
                query_parameter_name: need(self, "query_parameter_name")?,
                descriptor_key: need(self, "descriptor_key")?,
                skip_if_absent: flag(self, "skip_if_absent", false),
            },
            "remote_address" => ActionConfig::RemoteAddress,
            "masked_remote_address" => {
                let mut lens = [32u8, 128u8];
                if let Some(f) = &f {
                    for (i, (name, max)) in
                        [("v4_prefix_mask_len", 32u64), ("v6_prefix_mask_len", 128)]
                            .into_iter()
                            .enumerate()
                    {
                        if let Some(x) = f.get(name)
                            && let Some(n) = self.uint(x.value, &f.path(name), max)
                        {
                            lens[i] = n as u8;
                        }
                    }
                }
                ActionConfig::MaskedRemoteAddress {
                    v4_prefix_mask_len: lens[0],
                    v6_prefix_mask_len: lens[1],
                }
            }
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
        if let Some(field) = f.get("paths") {
            g.paths = self.strings(field.value, &f.path("paths"));
            if g.paths.iter().any(|p| !p.starts_with('/')) {
                self.error(field.value, &f.path("paths"), "paths must start with /");
            }
        }
        if let Some(field) = f.get("max_depth") {
            let path = f.path("max_depth");
            match self.uint(field.value, &path, 1_000) {
                Some(0) => self.error(field.value, &path, "must be greater than 0"),
                Some(n) => g.max_depth = n as u32,
                None => {}
            }
        }
        for (name, slot, max) in [
            ("max_complexity", &mut g.max_complexity, u64::MAX >> 1),
            ("default_field_cost", &mut g.default_field_cost, 1_000_000),
            ("default_list_size", &mut g.default_list_size, 1_000_000),
        ] {
            if let Some(field) = f.get(name)
                && let Some(n) = self.uint(field.value, &f.path(name), max)
            {
                *slot = n;
            }
        }
        if let Some(field) = f.get("max_body_bytes") {
            let path = f.path("max_body_bytes");
            match self.uint(field.value, &path, 64 * 1024 * 1024) {
                Some(0) => self.error(field.value, &path, "must be greater than 0"),
                Some(n) => g.max_body_bytes = n as usize,
                None => {}
            }
        }
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
                let found = self.describe(field.value);
                self.error(
                    field.value,
                    &path,
                    format!("expected a mapping of field name to cost, found {found}"),
                );
            }
        }
        if let Some(field) = f.get("list_arguments") {
            g.list_arguments = self.strings(field.value, &f.path("list_arguments"));
        }
        if let Some(field) = f.get("cost_descriptor") {
            g.cost_descriptor = self.actions(field.value, &f.path("cost_descriptor"));
        }
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
        if let Some(field) = f.get("descriptor") {
            w.descriptor = self.actions(field.value, &f.path("descriptor"));
        }
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
    sources: [{header: X-Api-Key}, {jwt: {claim: sub}}, {mtls: {}, client_ip: {}}, bogus]
  lists:
    block: [10.0.0.1/8, {value: 1.2.3.4, code: Bad Code}, {value: 1.2.3.5, expires: tomorrow}]
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
            "rt.yaml:6:13: authz.lists.block[0]: \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)",
            "authz.lists.block[1].code: \"Bad Code\" is not a reason code",
            "authz.lists.block[2].expires: expected a UTC time",
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
