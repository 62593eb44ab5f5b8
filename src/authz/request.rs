//! A borrowed view of one CheckRequest: the parts every stage reads, found once.
//!
//! Owns: deciding whether a CheckRequest is well-formed enough to judge (attributes and an
//! HTTP request present, headers within `max_header_bytes`), header lookup over either form
//! Envoy sends (`headers` map, or `header_map` with `encode_raw_headers`), and the request
//! facts stages share: method, path without query, query, host without port, gRPC
//! service/method, the body.
//!
//! Must not touch: decisions. Nothing here allocates.

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::config::core::v3::address::Address;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer};
use std::collections::HashMap;

/// Why a CheckRequest cannot be judged. `code` is the public reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("the CheckRequest has no attributes")]
    NoAttributes,
    #[error("the CheckRequest has no HTTP request attributes")]
    NoHttpRequest,
    #[error("the request headers exceed {0} bytes")]
    HeadersTooLarge(usize),
    #[error("the request body is not UTF-8")]
    BodyNotUtf8,
}

impl Malformed {
    pub fn code(self) -> &'static str {
        match self {
            Malformed::NoAttributes | Malformed::NoHttpRequest => "missing_attributes",
            Malformed::HeadersTooLarge(_) => "headers_too_large",
            Malformed::BodyNotUtf8 => "bad_body",
        }
    }
}

enum Headers<'a> {
    Map(&'a HashMap<String, String>),
    Raw(&'a HeaderMap),
}

/// One request, as the stages see it.
pub struct RequestView<'a> {
    pub http: &'a HttpRequest,
    pub source: Option<&'a Peer>,
    headers: Headers<'a>,
    /// Upper case as sent (`GET`); from `:method` when the attribute is empty.
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    /// After `?`, undecoded; empty when none.
    pub query: &'a str,
    /// Without the port.
    pub host: &'a str,
    /// A gRPC request (`content-type: application/grpc*`): denials speak gRPC.
    pub is_grpc: bool,
    /// (`pkg.Service`, `Method`) of a gRPC request.
    pub grpc: Option<(&'a str, &'a str)>,
}

impl<'a> RequestView<'a> {
    pub fn new(
        req: &'a CheckRequest,
        max_header_bytes: usize,
    ) -> Result<RequestView<'a>, Malformed> {
        let attrs = req.attributes.as_ref().ok_or(Malformed::NoAttributes)?;
        let http = attrs
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or(Malformed::NoHttpRequest)?;
        let headers = match &http.header_map {
            Some(m) if http.headers.is_empty() => Headers::Raw(m),
            _ => Headers::Map(&http.headers),
        };
        let size: usize = match &headers {
            Headers::Map(m) => m.iter().map(|(k, v)| k.len() + v.len()).sum(),
            Headers::Raw(m) => m
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.len() + h.raw_value.len())
                .sum(),
        };
        if size > max_header_bytes {
            return Err(Malformed::HeadersTooLarge(max_header_bytes));
        }
        let mut view = RequestView {
            http,
            source: attrs.source.as_ref(),
            headers,
            method: "",
            path: "",
            query: "",
            host: "",
            is_grpc: false,
            grpc: None,
        };
        view.method = if http.method.is_empty() {
            view.header(":method").unwrap_or_default()
        } else {
            &http.method
        };
        let target = if http.path.is_empty() {
            view.header(":path").unwrap_or_default()
        } else {
            &http.path
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        view.path = path;
        view.query = if query.is_empty() { &http.query } else { query };
        let host = if http.host.is_empty() {
            view.header(":authority")
                .or_else(|| view.header("host"))
                .unwrap_or_default()
        } else {
            &http.host
        };
        view.host = strip_port(host);
        view.is_grpc = view
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        if view.is_grpc {
            view.grpc = path
                .strip_prefix('/')
                .and_then(|p| p.split_once('/'))
                .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
        }
        Ok(view)
    }

    /// A header by its lower-case name.
    #[inline]
    pub fn header(&self, name: &str) -> Option<&'a str> {
        match self.headers {
            Headers::Map(m) => m.get(name).map(String::as_str),
            Headers::Raw(m) => m.headers.iter().find(|h| h.key == name).and_then(|h| {
                if h.raw_value.is_empty() {
                    Some(h.value.as_str())
                } else {
                    std::str::from_utf8(&h.raw_value).ok()
                }
            }),
        }
    }

    /// The source address Envoy reports (the downstream peer, after Envoy's own XFF
    /// handling).
    pub fn source_address(&self) -> Option<&'a str> {
        match self.source?.address.as_ref()?.address.as_ref()? {
            Address::SocketAddress(s) => Some(&s.address),
            _ => None,
        }
    }

    /// The mTLS principal of the peer certificate, when Envoy validated one.
    pub fn principal(&self) -> Option<&'a str> {
        self.source
            .map(|p| p.principal.as_str())
            .filter(|p| !p.is_empty())
    }

    /// The body Envoy buffered (`with_request_body`): bytes when `pack_as_bytes`, else text.
    pub fn body(&self) -> Result<&'a str, Malformed> {
        if !self.http.raw_body.is_empty() {
            return std::str::from_utf8(&self.http.raw_body).map_err(|_| Malformed::BodyNotUtf8);
        }
        Ok(&self.http.body)
    }

    /// Envoy marks a body cut at `max_request_bytes` (`allow_partial_message`).
    pub fn body_truncated(&self) -> bool {
        self.header("x-envoy-auth-partial-body") == Some("true")
    }

    /// A query parameter's raw (undecoded) value.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Request;

    fn req(http: HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(http),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn missing_parts_are_malformed() {
        assert_eq!(
            RequestView::new(&CheckRequest::default(), 1024).err(),
            Some(Malformed::NoAttributes)
        );
        let no_http = CheckRequest {
            attributes: Some(AttributeContext::default()),
        };
        assert_eq!(
            RequestView::new(&no_http, 1024).err(),
            Some(Malformed::NoHttpRequest)
        );
        let mut http = HttpRequest::default();
        http.headers.insert("x-big".into(), "v".repeat(2000));
        assert_eq!(
            RequestView::new(&req(http), 1024).err(),
            Some(Malformed::HeadersTooLarge(1024))
        );
    }

    #[test]
    fn facts_from_attributes_or_pseudo_headers() {
        let mut http = HttpRequest {
            method: "POST".into(),
            path: "/pkg.Greeter/SayHello?x=1&y".into(),
            host: "api.example.com:8443".into(),
            ..Default::default()
        };
        http.headers
            .insert("content-type".into(), "application/grpc+proto".into());
        let r = req(http);
        let v = RequestView::new(&r, 1 << 16).unwrap();
        assert_eq!(v.method, "POST");
        assert_eq!(v.path, "/pkg.Greeter/SayHello");
        assert_eq!(v.query, "x=1&y");
        assert_eq!(v.query_param("x"), Some("1"));
        assert_eq!(v.query_param("y"), Some(""));
        assert_eq!(v.query_param("z"), None);
        assert_eq!(v.host, "api.example.com");
        assert_eq!(v.grpc, Some(("pkg.Greeter", "SayHello")));

        let raw = HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![
                    HeaderValue {
                        key: ":method".into(),
                        value: String::new(),
                        raw_value: b"GET".to_vec(),
                    },
                    HeaderValue {
                        key: ":path".into(),
                        value: "/a".into(),
                        raw_value: vec![],
                    },
                    HeaderValue {
                        key: ":authority".into(),
                        value: "[::1]:80".into(),
                        raw_value: vec![],
                    },
                ],
            }),
            ..Default::default()
        };
        let r = req(raw);
        let v = RequestView::new(&r, 1 << 16).unwrap();
        assert_eq!((v.method, v.path, v.host), ("GET", "/a", "[::1]"));
        assert_eq!(v.grpc, None);
    }
}
