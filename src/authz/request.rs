//! A borrowed view of one CheckRequest: the parts every stage reads, found once.
//!
//! Owns: deciding whether a CheckRequest is well-formed enough to judge (attributes and an
//! HTTP request present, headers within `max_header_bytes`), header lookup over either form
//! Envoy sends (`headers` map, or `header_map` with `encode_raw_headers`), and the request
//! facts stages share: method, path without query, query, host without port, gRPC
//! service/method, the body.
//!
//! Must not touch: decisions. Nothing here allocates.

use super::wire::{CheckInput, HeaderSpans};
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
    /// The method, path, host or query is not UTF-8, which protobuf requires of strings.
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
    Map(&'a [HeaderSpans]),
    /// `header_map` (`encode_raw_headers`): the first entry of a name.
    Raw(&'a [HeaderSpans]),
}

/// One request, as the stages see it.
pub struct RequestView<'a> {
    req: &'a CheckInput,
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
    pub fn new(req: &'a CheckInput, max_header_bytes: usize) -> Result<RequestView<'a>, Malformed> {
        if !req.has_attributes {
            return Err(Malformed::NoAttributes);
        }
        if !req.has_http {
            return Err(Malformed::NoHttpRequest);
        }
        let headers = if req.has_header_map && req.headers.is_empty() {
            Headers::Raw(&req.header_map)
        } else {
            Headers::Map(&req.headers)
        };
        // Each header counts 32 bytes on top of its name and value, as HTTP/2 counts a header
        // (RFC 7541 §4.1): thousands of empty headers are not free to scan.
        let size: usize = match headers {
            Headers::Map(m) => m.iter().map(|h| h.key.len() + h.value.len() + 32).sum(),
            Headers::Raw(m) => m
                .iter()
                .map(|h| h.key.len() + h.value.len() + h.raw_value.len() + 32)
                .sum(),
        };
        if size > max_header_bytes || req.too_many_headers {
            return Err(Malformed::HeadersTooLarge(max_header_bytes));
        }
        let text = |s| from_utf8(req.bytes(s)).map_err(|_| Malformed::NotUtf8);
        let mut view = RequestView {
            req,
            headers,
            method: "",
            path: "",
            query: "",
            host: "",
            is_grpc: false,
            grpc: None,
        };
        view.method = match text(req.method)? {
            "" => view.header(":method").unwrap_or_default(),
            m => m,
        };
        let target = match text(req.path)? {
            "" => view.header(":path").unwrap_or_default(),
            p => p,
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        view.path = path;
        view.query = if query.is_empty() {
            text(req.query)?
        } else {
            query
        };
        let host = match text(req.host)? {
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

    /// A header by its lower-case name. A value that is not UTF-8 matches nothing (only the
    /// headers a stage asks for are checked: a name is compared as bytes, so a name that is
    /// no text never equals one).
    #[inline]
    pub fn header(&self, name: &str) -> Option<&'a str> {
        let req = self.req;
        let name = name.as_bytes();
        let value = match self.headers {
            Headers::Map(m) => m.iter().rev().find(|h| req.bytes(h.key) == name)?.value,
            Headers::Raw(m) => {
                let h = m.iter().find(|h| req.bytes(h.key) == name)?;
                // `raw_value` (any octets) when sent, else `value`.
                if h.raw_value.is_empty() {
                    h.value
                } else {
                    h.raw_value
                }
            }
        };
        from_utf8(req.bytes(value)).ok()
    }

    /// The source address Envoy reports (the downstream peer, after Envoy's own XFF
    /// handling); none when it is not text.
    pub fn source_address(&self) -> Option<&'a str> {
        from_utf8(self.req.bytes(self.req.source_address?)).ok()
    }

    /// The mTLS principal of the peer certificate, when Envoy validated one (and it is text).
    pub fn principal(&self) -> Option<&'a str> {
        from_utf8(self.req.bytes(self.req.principal))
            .ok()
            .filter(|p| !p.is_empty())
    }

    /// The body Envoy buffered (`with_request_body`): bytes when `pack_as_bytes`, else text.
    pub fn body(&self) -> Result<&'a str, Malformed> {
        let body = if self.req.raw_body.is_empty() {
            self.req.body
        } else {
            self.req.raw_body
        };
        from_utf8(self.req.bytes(body)).map_err(|_| Malformed::BodyNotUtf8)
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

    /// `http` encoded with every `marker` replaced by as many `0xE9` bytes (no UTF-8).
    fn latin1(http: HttpRequest, marker: &str) -> CheckInput {
        use prost::Message;
        let mut bytes = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(http),
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        let m = marker.as_bytes();
        let at = bytes.windows(m.len()).position(|w| w == m).expect("marker");
        bytes[at..at + m.len()].fill(0xe9);
        CheckInput::decode(bytes.into()).expect("decodes")
    }

    #[test]
    fn what_a_stage_reads_must_be_utf8_and_nothing_else() {
        for field in ["method", "path", "host", "query"] {
            let mut http = HttpRequest::default();
            let slot = match field {
                "method" => &mut http.method,
                "path" => &mut http.path,
                "host" => &mut http.host,
                _ => &mut http.query,
            };
            *slot = "MARKER".into();
            let r = latin1(http, "MARKER");
            assert_eq!(
                RequestView::new(&r, 1 << 16).err(),
                Some(Malformed::NotUtf8),
                "{field}"
            );
        }
        let mut http = HttpRequest {
            path: "/".into(),
            ..Default::default()
        };
        http.headers.insert("user-agent".into(), "MARKER".into());
        http.headers.insert("x-api-key".into(), "k".into());
        let r = latin1(http, "MARKER");
        let v = RequestView::new(&r, 1 << 16).expect("an unread header does not matter");
        assert_eq!(v.header("user-agent"), None);
        assert_eq!(v.header("x-api-key"), Some("k"));
    }

    #[test]
    fn a_header_sent_twice_in_the_map_reads_as_its_last_entry() {
        let mut http = HttpRequest::default();
        http.headers.insert("x-a".into(), "one".into());
        http.headers.insert("x-b".into(), "two".into());
        let mut r = req(http);
        // Both entries named as the second: a map sent with one key twice, in wire order.
        r.headers[0].key = r.headers[1].key;
        let name = std::str::from_utf8(r.bytes(r.headers[1].key))
            .unwrap()
            .to_string();
        let last = std::str::from_utf8(r.bytes(r.headers[1].value))
            .unwrap()
            .to_string();
        let v = RequestView::new(&r, 1 << 16).unwrap();
        assert_eq!(v.header(&name), Some(last.as_str()));
    }

    #[test]
    fn thousands_of_empty_headers_are_too_large() {
        let mut http = HttpRequest::default();
        for i in 0..3000 {
            http.headers.insert(format!("{i}"), String::new());
        }
        // 3000 × (≤ 4 + 32) bytes: over 64 KiB only by the per-header overhead.
        let r = req(http);
        assert_eq!(
            RequestView::new(&r, 64 * 1024).err(),
            Some(Malformed::HeadersTooLarge(64 * 1024))
        );
        assert!(RequestView::new(&r, 1 << 20).is_ok());
        let mut over = r.clone();
        over.too_many_headers = true;
        assert_eq!(
            RequestView::new(&over, 64 << 20).err(),
            Some(Malformed::HeadersTooLarge(64 << 20))
        );
    }
}
