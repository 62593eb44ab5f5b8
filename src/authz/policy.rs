//! Stage 3: which limits a request is subject to.
//!
//! Owns: compiled policies — request matchers (host, method, path exact/prefix/regex,
//! headers, gRPC service/method) — and descriptor actions named after Envoy's rate limit
//! actions (`generic_key`, `request_headers`, `remote_address`, `masked_remote_address`,
//! `header_value_match`, `query_parameters`) plus ours (`identity`, `grpc_service`,
//! `grpc_method`, `path`, `method`). Actions produce descriptor entries that borrow the
//! request, the identity and the config: building descriptors allocates nothing.
//!
//! Must not touch: counting — descriptors go to the shared rule engine
//! (`RateLimitEngine::evaluate`) with the domain's rules and algorithms.

use super::request::RequestView;
use crate::config::authz::{
    ActionConfig, HeaderMatchConfig, MatchConfig, PolicyConfig, StringMatch,
};
use crate::engine::Descriptor;
use crate::lists::cidr::{Addr, AddrText, IpNet};
use crate::rules::Wildcard;
use regex::Regex;
use smallvec::SmallVec;

/// A descriptor built for one request.
#[derive(Debug, Clone)]
pub struct AuthzDescriptor<'a> {
    pub entries: SmallVec<[(&'a str, &'a str); 4]>,
    pub hits: u32,
}

impl<'a> Descriptor for AuthzDescriptor<'a> {
    type Entry = (&'a str, &'a str);
    fn entries(&self) -> &[(&'a str, &'a str)] {
        &self.entries
    }
    fn hits(&self) -> Option<u32> {
        Some(self.hits)
    }
}

/// A compiled string condition.
#[derive(Debug)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Matcher {
    fn new(m: &StringMatch) -> Matcher {
        match m {
            StringMatch::Exact(s) => Matcher::Exact(s.clone()),
            StringMatch::Prefix(s) => Matcher::Prefix(s.clone()),
            // Anchored: the whole value must match. Validated when the config loaded.
            StringMatch::Regex(r) => match Regex::new(&format!("^(?:{r})$")) {
                Ok(re) => Matcher::Regex(re),
                Err(_) => Matcher::Exact(r.clone()),
            },
        }
    }

    #[inline]
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Matcher::Exact(s) => v == s,
            Matcher::Prefix(p) => v.starts_with(p.as_str()),
            Matcher::Regex(re) => re.is_match(v),
        }
    }
}

#[derive(Debug)]
pub struct HeaderMatcher {
    name: String,
    value: Option<Matcher>,
    invert: bool,
}

impl HeaderMatcher {
    pub fn new(h: &HeaderMatchConfig) -> HeaderMatcher {
        HeaderMatcher {
            name: h.name.clone(),
            value: h.value.as_ref().map(Matcher::new),
            invert: h.invert,
        }
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let hit = match (req.header(&self.name), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(m)) => m.matches(v),
        };
        hit != self.invert
    }
}

#[derive(Debug)]
enum Host {
    Exact(String),
    Wildcard(Wildcard),
}

#[derive(Debug)]
enum Action {
    Generic {
        key: String,
        value: String,
    },
    Header {
        header: String,
        key: String,
        skip: bool,
    },
    RemoteAddress,
    Masked {
        v4: u8,
        v6: u8,
    },
    HeaderValueMatch {
        key: String,
        value: String,
        expect: bool,
        headers: Vec<HeaderMatcher>,
    },
    Query {
        name: String,
        key: String,
        skip: bool,
    },
    Identity {
        key: String,
    },
    GrpcService {
        key: String,
    },
    GrpcMethod {
        key: String,
    },
    Path {
        key: String,
    },
    Method {
        key: String,
    },
}

impl Action {
    fn new(a: &ActionConfig) -> Action {
        match a {
            ActionConfig::GenericKey {
                descriptor_key,
                descriptor_value,
            } => Action::Generic {
                key: descriptor_key.clone(),
                value: descriptor_value.clone(),
            },
            ActionConfig::RequestHeaders {
                header_name,
                descriptor_key,
                skip_if_absent,
            } => Action::Header {
                header: header_name.clone(),
                key: descriptor_key.clone(),
                skip: *skip_if_absent,
            },
            ActionConfig::RemoteAddress => Action::RemoteAddress,
            ActionConfig::MaskedRemoteAddress {
                v4_prefix_mask_len,
                v6_prefix_mask_len,
            } => Action::Masked {
                v4: *v4_prefix_mask_len,
                v6: *v6_prefix_mask_len,
            },
            ActionConfig::HeaderValueMatch {
                descriptor_key,
                descriptor_value,
                expect_match,
                headers,
            } => Action::HeaderValueMatch {
                key: descriptor_key.clone(),
                value: descriptor_value.clone(),
                expect: *expect_match,
                headers: headers.iter().map(HeaderMatcher::new).collect(),
            },
            ActionConfig::QueryParameters {
                query_parameter_name,
                descriptor_key,
                skip_if_absent,
            } => Action::Query {
                name: query_parameter_name.clone(),
                key: descriptor_key.clone(),
                skip: *skip_if_absent,
            },
            ActionConfig::Identity { descriptor_key } => Action::Identity {
                key: descriptor_key.clone(),
            },
            ActionConfig::GrpcService { descriptor_key } => Action::GrpcService {
                key: descriptor_key.clone(),
            },
            ActionConfig::GrpcMethod { descriptor_key } => Action::GrpcMethod {
                key: descriptor_key.clone(),
            },
            ActionConfig::Path { descriptor_key } => Action::Path {
                key: descriptor_key.clone(),
            },
            ActionConfig::Method { descriptor_key } => Action::Method {
                key: descriptor_key.clone(),
            },
        }
    }
}

/// What actions read besides the request: resolved once per Check.
pub struct Facts<'a> {
    pub req: &'a RequestView<'a>,
    pub identity: &'a str,
    pub client_ip: Option<Addr>,
    /// The client IP as text, printed once if an action needs it.
    pub ip_text: Option<AddrText>,
    /// Masked client addresses the actions asked for, printed once each.
    pub masked: SmallVec<[((u8, u8), AddrText); 2]>,
}

impl<'a> Facts<'a> {
    pub fn new(req: &'a RequestView<'a>, identity: &'a str, client_ip: Option<Addr>) -> Self {
        Facts {
            req,
            identity,
            client_ip,
            ip_text: None,
            masked: SmallVec::new(),
        }
    }

    /// Prints the masked addresses `actions` need (before descriptors borrow them).
    fn prepare(&mut self, actions: &[Action]) {
        let Some(ip) = self.client_ip else { return };
        for a in actions {
            if matches!(a, Action::RemoteAddress) && self.ip_text.is_none() {
                self.ip_text = Some(AddrText::new(ip));
            }
            if let Action::Masked { v4, v6 } = a
                && !self.masked.iter().any(|(k, _)| *k == (*v4, *v6))
            {
                self.masked
                    .push(((*v4, *v6), AddrText::net(&IpNet::masked(ip, *v4, *v6))));
            }
        }
    }
}

/// A descriptor's actions, compiled.
#[derive(Debug)]
pub struct DescriptorTemplate {
    actions: Vec<Action>,
}

impl DescriptorTemplate {
    pub fn new(actions: &[ActionConfig]) -> DescriptorTemplate {
        DescriptorTemplate {
            actions: actions.iter().map(Action::new).collect(),
        }
    }

    pub fn prepare(&self, facts: &mut Facts<'_>) {
        facts.prepare(&self.actions);
    }

    /// The descriptor for this request, or `None` when an action cannot produce its entry
    /// (as Envoy drops the whole descriptor then).
    pub fn build<'a>(&'a self, f: &'a Facts<'a>, hits: u32) -> Option<AuthzDescriptor<'a>> {
        let mut entries = SmallVec::new();
        for a in &self.actions {
            let entry: (&'a str, &'a str) = match a {
                Action::Generic { key, value } => (key, value),
                Action::Header { header, key, skip } => match f.req.header(header) {
                    Some(v) => (key, v),
                    None if *skip => continue,
                    None => return None,
                },
                Action::RemoteAddress => ("remote_address", f.ip_text.as_ref()?.as_str()),
                Action::Masked { v4, v6 } => {
                    let text = f
                        .masked
                        .iter()
                        .find(|(k, _)| *k == (*v4, *v6))
                        .map(|(_, t)| t)?;
                    ("masked_remote_address", text.as_str())
                }
                Action::HeaderValueMatch {
                    key,
                    value,
                    expect,
                    headers,
                } => {
                    if headers.iter().all(|h| h.matches(f.req)) != *expect {
                        return None;
                    }
                    (key, value)
                }
                Action::Query { name, key, skip } => match f.req.query_param(name) {
                    Some(v) => (key, v),
                    None if *skip => continue,
                    None => return None,
                },
                Action::Identity { key } => (key, f.identity),
                Action::GrpcService { key } => (key, f.req.grpc?.0),
                Action::GrpcMethod { key } => (key, f.req.grpc?.1),
                Action::Path { key } => (key, f.req.path),
                Action::Method { key } => (key, f.req.method),
            };
            entries.push(entry);
        }
        (!entries.is_empty()).then_some(AuthzDescriptor { entries, hits })
    }
}

/// One compiled policy.
#[derive(Debug)]
pub struct Policy {
    pub name: String,
    hosts: Vec<Host>,
    methods: Vec<String>,
    path: Option<Matcher>,
    headers: Vec<HeaderMatcher>,
    grpc: Option<(Option<String>, Option<String>)>,
    pub descriptors: Vec<DescriptorTemplate>,
    pub hits: u32,
}

impl Policy {
    pub fn new(p: &PolicyConfig) -> Policy {
        let m: &MatchConfig = &p.matcher;
        Policy {
            name: p.name.clone(),
            hosts: m
                .hosts
                .iter()
                .map(|h| match Wildcard::parse(h) {
                    Some(w) => Host::Wildcard(w),
                    None => Host::Exact(h.clone()),
                })
                .collect(),
            methods: m.methods.clone(),
            path: m.path.as_ref().map(Matcher::new),
            headers: m.headers.iter().map(HeaderMatcher::new).collect(),
            grpc: m
                .grpc
                .as_ref()
                .map(|g| (g.service.clone(), g.method.clone())),
            descriptors: p
                .descriptors
                .iter()
                .map(|d| DescriptorTemplate::new(d))
                .collect(),
            hits: p.hits,
        }
    }

    /// Whether every condition of the policy holds for `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method) {
            return false;
        }
        if !self.hosts.is_empty()
            && !self.hosts.iter().any(|h| match h {
                Host::Exact(e) => e.eq_ignore_ascii_case(req.host),
                Host::Wildcard(w) => w.matches(req.host),
            })
        {
            return false;
        }
        if let Some(p) = &self.path
            && !p.matches(req.path)
        {
            return false;
        }
        if let Some((service, method)) = &self.grpc {
            let Some((s, m)) = req.grpc else { return false };
            if service.as_deref().is_some_and(|x| x != s)
                || method.as_deref().is_some_and(|x| x != m)
            {
                return false;
            }
        }
        self.headers.iter().all(|h| h.matches(req))
    }
}
