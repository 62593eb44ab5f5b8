//! The CheckRequest as ext_authz decodes it: only the fields a stage reads, each a slice of
//! the request's own buffer.
//!
//! envoy-types' `CheckRequest` builds every field Envoy sends: a `String` for each of ~25
//! strings, a SipHash `HashMap` for the headers, the destination peer, the TLS session,
//! metadata — ~30 allocations per Check, most of them never read, and a ~1 KB struct moved
//! through tonic's futures. These messages have the same field numbers and wire types (a
//! `string` and a `bytes` field are the same on the wire), so prost decodes a real
//! CheckRequest into them; fields not declared here are skipped unread, and every declared
//! string is a `Bytes` that shares the buffer tonic decoded from (`DecodeBuf::copy_to_bytes`
//! splits it: no copy). The headers map arrives as its repeated entries (a proto3 map is
//! that on the wire); lookups in `request` scan them, last entry winning as in a map.
//!
//! UTF-8 is not checked here: `request::RequestView` checks what it reads.
//!
//! Owns: the lean message types and the conversion from envoy-types' `CheckRequest` (tests
//! and in-process callers). Must not touch: anything else.

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message;
use prost::bytes::Bytes;

/// `envoy.service.auth.v3.CheckRequest`.
#[derive(Clone, PartialEq, Message)]
pub struct CheckInput {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<Attributes>,
}

/// `AttributeContext`: `source` (1) and `request` (4).
#[derive(Clone, PartialEq, Message)]
pub struct Attributes {
    #[prost(message, optional, tag = "1")]
    pub source: Option<Peer>,
    #[prost(message, optional, tag = "4")]
    pub request: Option<Request>,
}

/// `AttributeContext.Peer`: `address` (1) and `principal` (4).
#[derive(Clone, PartialEq, Message)]
pub struct Peer {
    #[prost(message, optional, tag = "1")]
    pub address: Option<Address>,
    #[prost(bytes = "bytes", tag = "4")]
    pub principal: Bytes,
}

/// `config.core.v3.Address`: its `socket_address` (1) arm; a pipe or an internal address
/// (2, 3) is skipped and reads as no address.
#[derive(Clone, PartialEq, Message)]
pub struct Address {
    #[prost(message, optional, tag = "1")]
    pub socket_address: Option<SocketAddress>,
}

/// `config.core.v3.SocketAddress`: `address` (2).
#[derive(Clone, PartialEq, Message)]
pub struct SocketAddress {
    #[prost(bytes = "bytes", tag = "2")]
    pub address: Bytes,
}

/// `AttributeContext.Request`: `http` (2).
#[derive(Clone, PartialEq, Message)]
pub struct Request {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpRequest>,
}

/// `AttributeContext.HttpRequest`, without `id`, `scheme`, `fragment`, `size`, `protocol`.
#[derive(Clone, PartialEq, Message)]
pub struct HttpRequest {
    #[prost(bytes = "bytes", tag = "2")]
    pub method: Bytes,
    /// `map<string, string> headers`, as the entries it is on the wire.
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<HeaderEntry>,
    #[prost(bytes = "bytes", tag = "4")]
    pub path: Bytes,
    #[prost(bytes = "bytes", tag = "5")]
    pub host: Bytes,
    #[prost(bytes = "bytes", tag = "7")]
    pub query: Bytes,
    #[prost(bytes = "bytes", tag = "11")]
    pub body: Bytes,
    #[prost(bytes = "bytes", tag = "12")]
    pub raw_body: Bytes,
    /// `header_map`, sent instead of `headers` with `encode_raw_headers`.
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
}

/// One entry of the `headers` map.
#[derive(Clone, PartialEq, Message)]
pub struct HeaderEntry {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
}

/// `config.core.v3.HeaderMap`.
#[derive(Clone, PartialEq, Message)]
pub struct HeaderMap {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderValue>,
}

/// `config.core.v3.HeaderValue`: `value` is a string, `raw_value` any bytes.
#[derive(Clone, PartialEq, Message)]
pub struct HeaderValue {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: Bytes,
}

impl From<&CheckRequest> for CheckInput {
    /// Through the wire, so the conversion is exactly what the service decodes.
    fn from(req: &CheckRequest) -> CheckInput {
        CheckInput::decode(Bytes::from(req.encode_to_vec()))
            .expect("a CheckRequest's encoding decodes as a CheckInput")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3 as core;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context as ac;

    #[test]
    fn a_full_check_request_decodes_into_the_fields_read() {
        let mut http = ac::HttpRequest {
            id: "1".into(),
            method: "PÖST".into(),
            path: "/a/b?x=1".into(),
            host: "api.example.com".into(),
            scheme: "https".into(),
            query: "q".into(),
            protocol: "HTTP/2".into(),
            body: "{}".into(),
            raw_body: vec![0xff],
            header_map: Some(core::HeaderMap {
                headers: vec![core::HeaderValue {
                    key: "k".into(),
                    value: "v".into(),
                    raw_value: vec![0xfe],
                }],
            }),
            ..Default::default()
        };
        http.headers.insert("x-api-key".into(), "ключ".into());
        let peer = |ip: &str, principal: &str| ac::Peer {
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: ip.into(),
                    ..Default::default()
                })),
            }),
            principal: principal.into(),
            ..Default::default()
        };
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer("192.0.2.1", "spiffe://a/b")),
                destination: Some(peer("10.0.0.1", "dest")),
                request: Some(ac::Request {
                    time: None,
                    http: Some(http),
                }),
                context_extensions: [("x".to_string(), "y".to_string())].into(),
                ..Default::default()
            }),
        };
        let lean = CheckInput::from(&req);
        let a = lean.attributes.expect("attributes");
        let source = a.source.expect("source");
        assert_eq!(source.principal, "spiffe://a/b".as_bytes());
        let sa = source.address.and_then(|a| a.socket_address).expect("addr");
        assert_eq!(sa.address, "192.0.2.1".as_bytes());
        let h = a.request.and_then(|r| r.http).expect("http");
        assert_eq!(h.method, "PÖST".as_bytes());
        assert_eq!(h.path, "/a/b?x=1".as_bytes());
        assert_eq!(h.host, "api.example.com".as_bytes());
        assert_eq!(h.query, "q".as_bytes());
        assert_eq!(h.body, "{}".as_bytes());
        assert_eq!(h.raw_body, [0xff].as_slice());
        assert_eq!(h.headers.len(), 1);
        assert_eq!(h.headers[0].key, "x-api-key".as_bytes());
        assert_eq!(h.headers[0].value, "ключ".as_bytes());
        let raw = &h.header_map.expect("header_map").headers[0];
        assert_eq!((&raw.key[..], &raw.value[..]), (&b"k"[..], &b"v"[..]));
        assert_eq!(raw.raw_value, [0xfe].as_slice());
    }

    #[test]
    fn a_pipe_address_is_no_socket_address() {
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(ac::Peer {
                    address: Some(core::Address {
                        address: Some(core::address::Address::Pipe(core::Pipe {
                            path: "/run/envoy.sock".into(),
                            mode: 0,
                        })),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let lean = CheckInput::from(&req);
        let addr = lean.attributes.and_then(|a| a.source).and_then(|s| s.address);
        assert_eq!(addr.map(|a| a.socket_address), Some(None));
    }
}
