//! A borrowed view of one CheckRequest: the parts every stage reads, found once.
//!
//! Owns: deciding whether a CheckRequest is well-formed enough to judge (attributes and an
//! HTTP request present, headers within `max_header_bytes`), header lookup over either form
//! Envoy sends (`headers` map, or `header_map` with `encode_raw_headers`), and the request
//! facts stages share: method, path without query, query, host without port, gRPC
//! service/method, the body.
//!
//! Must not touch: decisions. Nothing here allocates.

use super::wire::{CheckInput, HeaderEntry, HeaderValue, HttpRequest, Peer};
use std::str::from_utf8;

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
    /// A string field a stage reads (method, path, host, query, a header name or `value`,
    /// the peer's address or principal) is not UTF-8, which protobuf requires of strings.
    #[error("a request attribute is not UTF-8")]
    NotUtf8,
}

impl Malformed {
    pub fn code(self) -> &'static str {
        match self {
            Malformed::NoAttributes | Malformed::NoHttpRequest => "missing_attributes",
            Malformed::HeadersTooLarge(_) => "headers_too_large",
            Malformed::BodyNotUtf8 => "bad_body",
            Malformed::NotUtf8 => "bad_encoding",
        }
    }
}

enum Headers<'a> {
    /// The `headers` map's entries; a key sent twice counts as its last entry, as in a map.
    Map(&'a [HeaderEntry]),
    /// `header_map` (`encode_raw_headers`): the first entry of a name.
    Raw(&'a [HeaderValue]),
}

/// One request, as the stages see it.
pub struct RequestView<'a> {
    http: &'a HttpRequest,
    source: Option<&'a Peer>,
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

fn text(b: &[u8]) -> Result<&str, Malformed> {
    from_utf8(b).map_err(|_| Malformed::NotUtf8)
}

impl<'a> RequestView<'a> {
    pub fn new(req: &'a CheckInput, max_header_bytes: usize) -> Result<RequestView<'a>, Malformed> {
        let attrs = req.attributes.as_ref().ok_or(Malformed::NoAttributes)?;
        let http = attrs
            .request
            .as_ref()
            .and_then(|r| r.http.as_ref())
            .ok_or(Malformed::NoHttpRequest)?;
        let headers = match &http.header_map {
            Some(m) if http.headers.is_empty() => Headers::Raw(&m.headers),
            _ => Headers::Map(&http.headers),
        };
        let size = header_bytes(&headers)?;
        if size > max_header_bytes {
            return Err(Malformed::HeadersTooLarge(max_header_bytes));
        }
        let source = attrs.source.as_ref();
        if let Some(p) = source {
            text(&p.principal)?;
            if let Some(sa) = p.address.as_ref().and_then(|a| a.socket_address.as_ref()) {
                text(&sa.address)?;
            }
        }
        let mut view = RequestView {
            http,
            source,
            headers,
            method: "",
            path: "",
            query: "",
            host: "",
            is_grpc: false,
            grpc: None,
        };
        view.method = match text(&http.method)? {
            "" => view.header(":method").unwrap_or_default(),
            m => m,
        };
        let target = match text(&http.path)? {
            "" => view.header(":path").unwrap_or_default(),
            p => p,
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        view.path = path;
        view.query = if query.is_empty() {
            text(&http.query)?
        } else {
            query
        };
        let host = match text(&http.host)? {
            "" => view
                .header(":authority")
                .or_else(|| view.header("host"))
                .unwrap_or_default(),
            h => h,
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
        let name = name.as_bytes();
        match self.headers {
            // Checked UTF-8 by `header_bytes`.
            Headers::Map(m) => m
                .iter()
                .rev()
                .find(|h| h.key == name)
                .and_then(|h| from_utf8(&h.value).ok()),
            Headers::Raw(m) => m.iter().find(|h| h.key == name).and_then(|h| {
                if h.raw_value.is_empty() {
                    from_utf8(&h.value).ok()
                } else {
                    // Raw bytes may be any octets; a value that is no text matches nothing.
                    from_utf8(&h.raw_value).ok()
                }
            }),
        }
    }

    /// The source address Envoy reports (the downstream peer, after Envoy's own XFF
    /// handling).
    pub fn source_address(&self) -> Option<&'a str> {
        let sa = self.source?.address.as_ref()?.socket_address.as_ref()?;
        from_utf8(&sa.address).ok()
    }

    /// The mTLS principal of the peer certificate, when Envoy validated one.
    pub fn principal(&self) -> Option<&'a str> {
        self.source
            .and_then(|p| from_utf8(&p.principal).ok())
            .filter(|p| !p.is_empty())
    }

    /// The body Envoy buffered (`with_request_body`): bytes when `pack_as_bytes`, else text.
    pub fn body(&self) -> Result<&'a str, Malformed> {
        let body = if self.http.raw_body.is_empty() {
            &self.http.body
        } else {
            &self.http.raw_body
        };
        from_utf8(body).map_err(|_| Malformed::BodyNotUtf8)
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

/// The bytes of every header name and value, once each string is known to be UTF-8 (a
/// raw value is bytes by definition and is not checked).
fn header_bytes(headers: &Headers<'_>) -> Result<usize, Malformed> {
    let mut size = 0;
    match headers {
        Headers::Map(m) => {
            for h in *m {
                text(&h.key)?;
                text(&h.value)?;
                size += h.key.len() + h.value.len();
            }
        }
        Headers::Raw(m) => {
            for h in *m {
                text(&h.key)?;
                text(&h.value)?;
                size += h.key.len() + h.value.len() + h.raw_value.len();
            }
        }
    }
    Ok(size)
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
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    fn req(http: HttpRequest) -> CheckInput {
        CheckInput::from(&CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(http),
                }),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn missing_parts_are_malformed() {
        assert_eq!(
            RequestView::new(&CheckInput::default(), 1024).err(),
            Some(Malformed::NoAttributes)
        );
        let no_http = CheckInput::from(&CheckRequest {
            attributes: Some(AttributeContext::default()),
        });
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
