//! Stage 1: who is calling.
//!
//! Owns: the client IP (the source address Envoy reports, or — with `xff_num_trusted_hops`
//! N > 0 — the address N hops from the right of `x-forwarded-for` with the source address
//! as the last hop, exactly as Envoy's `xff_num_trusted_hops` counts, so a client that
//! rotates a forged leftmost entry is still seen at its real address), and the ordered
//! identity sources (header, JWT claim, mTLS principal, client IP); the first that yields
//! names the caller as `<source name>:<value>`.
//!
//! Must not touch: lists, limits, answers (it reports a bad token; `answer` words it).

use super::jwt::{JwtError, JwtVerifier};
use super::request::RequestView;
use crate::config::authz::{IdentityConfig, IdentitySource, JwtInvalid};
use crate::lists::cidr::{self, Addr};

enum Source {
    Header { header: String, name: String },
    Jwt(Box<JwtVerifier>),
    Mtls { name: String },
    ClientIp { name: String },
}

/// Which kind of source named the caller (metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Header,
    Jwt,
    Mtls,
    ClientIp,
    /// Nothing yielded (no source address, and no other source matched).
    Anonymous,
}

impl SourceKind {
    pub const ALL: [SourceKind; 5] = [
        SourceKind::Header,
        SourceKind::Jwt,
        SourceKind::Mtls,
        SourceKind::ClientIp,
        SourceKind::Anonymous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Header => "header",
            SourceKind::Jwt => "jwt",
            SourceKind::Mtls => "mtls",
            SourceKind::ClientIp => "client_ip",
            SourceKind::Anonymous => "anonymous",
        }
    }
}

/// The resolved caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `<source name>:<value>`, e.g. `api_key:k-123`, `user:alice`, `ip:203.0.113.7`.
    pub value: String,
    pub kind: SourceKind,
}

/// Compiled `authz.identity`.
pub struct IdentityResolver {
    sources: Vec<Source>,
    hops: u32,
    /// Upstream header carrying the identity.
    pub header: String,
    /// Headers removed upstream (the identity header is always replaced).
    pub strip_headers: Vec<String>,
}

impl std::fmt::Debug for IdentityResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityResolver")
            .field("sources", &self.sources.len())
            .field("hops", &self.hops)
            .finish_non_exhaustive()
    }
}

impl IdentityResolver {
    /// JWT keys of the sources that could not be used ([`JwtVerifier::skipped_keys`]).
    pub fn skipped_jwt_keys(&self) -> usize {
        self.sources
            .iter()
            .map(|s| match s {
                Source::Jwt(v) => v.skipped_keys(),
                _ => 0,
            })
            .sum()
    }

    pub fn new(c: &IdentityConfig) -> IdentityResolver {
        let sources = c
            .sources
            .iter()
            .map(|s| match s {
                IdentitySource::Header { header, name } => Source::Header {
                    header: header.clone(),
                    name: name.clone(),
                },
                IdentitySource::Jwt(j) => Source::Jwt(Box::new(JwtVerifier::new(j))),
                IdentitySource::Mtls { name } => Source::Mtls { name: name.clone() },
                IdentitySource::ClientIp { name } => Source::ClientIp { name: name.clone() },
            })
            .collect();
        IdentityResolver {
            sources,
            hops: c.xff_num_trusted_hops,
            header: c.header.clone(),
            strip_headers: c.strip_headers.clone(),
        }
    }

    /// The client's address; `None` when Envoy sent no parsable source address.
    ///
    /// With N trusted hops the chain is `x-forwarded-for` entries followed by the source
    /// address; the client is the entry N places left of the end. With fewer entries than
    /// that (or an unparsable one there) Envoy falls back to the source address; so do we.
    pub fn client_ip(&self, req: &RequestView<'_>) -> Option<Addr> {
        let source = req.source_address().and_then(cidr::parse_addr);
        if self.hops == 0 {
            return source;
        }
        let Some(xff) = req.header("x-forwarded-for") else {
            return source;
        };
        // Position N from the right of XFF + [source] is position N-1 from the right of XFF.
        let wanted = (self.hops - 1) as usize;
        let mut entries = xff.rsplit(',');
        match entries.nth(wanted).map(str::trim) {
            Some(e) if !e.is_empty() => cidr::parse_addr(e).or(source),
            _ => source,
        }
    }

    /// Resolves the caller. `Err` only for a present but invalid token with
    /// `on_invalid: deny`.
    pub fn resolve(
        &self,
        req: &RequestView<'_>,
        client_ip: Option<Addr>,
    ) -> Result<Identity, JwtError> {
        for s in &self.sources {
            match s {
                Source::Header { header, name } => {
                    if let Some(v) = req.header(header).map(str::trim).filter(|v| usable(v)) {
                        return Ok(identity(name, v, SourceKind::Header));
                    }
                }
                Source::Jwt(j) => {
                    let Some(token) = req.header(&j.header).and_then(|v| j.token(v)) else {
                        continue;
                    };
                    match j.verify(token) {
                        Ok(claim) => return Ok(identity(&j.name, &claim, SourceKind::Jwt)),
                        Err(e) if j.on_invalid == JwtInvalid::Deny => return Err(e),
                        Err(_) => {}
                    }
                }
                Source::Mtls { name } => {
                    if let Some(p) = req.principal().filter(|p| usable(p)) {
                        return Ok(identity(name, p, SourceKind::Mtls));
                    }
                }
                Source::ClientIp { name } => {
                    if let Some(a) = client_ip {
                        let text = cidr::AddrText::new(a);
                        return Ok(identity(name, text.as_str(), SourceKind::ClientIp));
                    }
                }
            }
        }
        Ok(Identity {
            value: "anonymous".into(),
            kind: SourceKind::Anonymous,
        })
    }
}

/// A value that can name the caller: non-empty and free of control characters, which
/// would inject headers when the identity is forwarded upstream (such a value is passed over,
/// and the next source decides).
fn usable(value: &str) -> bool {
    !value.is_empty() && !value.chars().any(char::is_control)
}

fn identity(name: &str, value: &str, kind: SourceKind) -> Identity {
    let mut s = String::with_capacity(name.len() + 1 + value.len());
    s.push_str(name);
    s.push(':');
    s.push_str(value);
    Identity { value: s, kind }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::wire::CheckInput;
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request,
    };
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    fn req(source: &str, headers: &[(&str, &str)], principal: &str) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(Peer {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: source.into(),
                            ..Default::default()
                        })),
                    }),
                    principal: principal.into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    fn resolver(hops: u32, sources: Vec<IdentitySource>) -> IdentityResolver {
        IdentityResolver::new(&IdentityConfig {
            sources,
            xff_num_trusted_hops: hops,
            ..IdentityConfig::default()
        })
    }

    fn ip_of(r: &IdentityResolver, source: &str, xff: Option<&str>) -> Option<String> {
        let headers: Vec<(&str, &str)> = xff.map(|x| ("x-forwarded-for", x)).into_iter().collect();
        let c = CheckInput::from(&req(source, &headers, ""));
        let v = RequestView::new(&c, 1 << 16).unwrap();
        r.client_ip(&v).map(|a| cidr::to_ip(a).to_string())
    }

    #[test]
    fn xff_is_counted_from_the_right_like_envoy() {
        let ip = IdentitySource::ClientIp { name: "ip".into() };
        let none = resolver(0, vec![ip.clone()]);
        // Envoy's docs, example 1: no trusted hops, XFF ignored.
        assert_eq!(
            ip_of(
                &none,
                "192.0.2.5",
                Some("203.0.113.128, 203.0.113.10, 203.0.113.1")
            )
            .as_deref(),
            Some("192.0.2.5")
        );
        // Example 3: two trusted hops: the second to last XFF address.
        let two = resolver(2, vec![ip.clone()]);
        assert_eq!(
            ip_of(
                &two,
                "192.0.2.5",
                Some("203.0.113.128, 203.0.113.10, 203.0.113.1")
            )
            .as_deref(),
            Some("203.0.113.10")
        );
        let one = resolver(1, vec![ip.clone()]);
        assert_eq!(
            ip_of(&one, "10.0.0.2", Some("6.6.6.6, 198.51.100.7")).as_deref(),
            Some("198.51.100.7")
        );
        // A rotated forged leftmost entry changes nothing.
        assert_eq!(
            ip_of(&one, "10.0.0.2", Some("7.7.7.7, 198.51.100.7")).as_deref(),
            Some("198.51.100.7")
        );
        // Too few entries, garbage, or none at all: the source address.
        assert_eq!(
            ip_of(&two, "10.0.0.2", Some("198.51.100.7")).as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(
            ip_of(&one, "10.0.0.2", Some("nonsense")).as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(ip_of(&one, "10.0.0.2", None).as_deref(), Some("10.0.0.2"));
        assert_eq!(
            ip_of(&one, "10.0.0.2", Some("2001:DB8::7")).as_deref(),
            Some("2001:db8::7")
        );
        assert_eq!(ip_of(&none, "", None), None);
    }

    #[test]
    fn first_source_that_yields_wins() {
        let r = resolver(
            0,
            vec![
                IdentitySource::Header {
                    header: "x-api-key".into(),
                    name: "api_key".into(),
                },
                IdentitySource::Mtls {
                    name: "spiffe".into(),
                },
                IdentitySource::ClientIp { name: "ip".into() },
            ],
        );
        let resolve = |c: &CheckRequest| {
            let c = CheckInput::from(c);
            let v = RequestView::new(&c, 1 << 16).unwrap();
            r.resolve(&v, r.client_ip(&v)).unwrap()
        };
        let id = resolve(&req("1.2.3.4", &[("x-api-key", "k1")], "spiffe://a"));
        assert_eq!(
            (id.value.as_str(), id.kind),
            ("api_key:k1", SourceKind::Header)
        );
        let id = resolve(&req("1.2.3.4", &[("x-api-key", "  ")], "spiffe://a"));
        assert_eq!(id.value, "spiffe:spiffe://a");
        let id = resolve(&req("::ffff:1.2.3.4", &[], ""));
        assert_eq!(
            (id.value.as_str(), id.kind),
            ("ip:1.2.3.4", SourceKind::ClientIp)
        );
        let id = resolve(&req("", &[], ""));
        assert_eq!(id.kind, SourceKind::Anonymous);
    }
}
