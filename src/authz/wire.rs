//! The CheckRequest as ext_authz decodes it: only the fields a stage reads, each a span of
//! the request's own buffer.
//!
//! envoy-types' `CheckRequest` builds every field Envoy sends: a `String` for each of ~25
//! strings, a SipHash `HashMap` for the headers, the destination peer, the TLS session,
//! metadata: ~30 allocations per Check, most of them never read, and 2.3 µs to decode
//! Envoy's usual request (`benches/decisions.rs`, `check/decode_envoy_types`). prost's derive
//! over messages with only the read fields, as `Bytes` (tried first, kept below as the tests'
//! reference decoder), still takes 1.1 µs: an atomic increment and decrement per field, a
//! `Vec` grown per header. This hand decoder walks the same wire format once and records
//! where each read field lies (`Span`s into one `Bytes`): no allocation for up to 16 headers,
//! no atomics, a fraction of the time (`check/decode_lean`). It is the protobuf rules, not a
//! subset of them: a message field sent twice is merged, a scalar's last value wins, a oneof
//! arm replaces the other (a pipe address after a socket address reads as no address),
//! unknown fields of every wire type (groups included) are skipped, and a truncated or
//! malformed message is an error, as prost reports it.
//!
//! UTF-8 is not checked here: `request::RequestView` checks what it reads.
//!
//! Owns: the wire decoding of CheckRequest and, for tests, the conversion from
//! envoy-types' `CheckRequest`. Must not touch: anything else.

#[cfg(test)]
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
#[cfg(test)]
use prost::Message;
use prost::bytes::Bytes;
use smallvec::SmallVec;

/// Where a field's bytes lie in the message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    len: u32,
}

impl Span {
    /// Its length in bytes.
    pub fn len(self) -> usize {
        self.len as usize
    }

    pub fn is_empty(self) -> bool {
        self.len == 0
    }
}

/// One header: name and value (and, in `header_map`, the raw value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderSpans {
    pub key: Span,
    pub value: Span,
    pub raw_value: Span,
}

/// The fields of one CheckRequest a stage reads.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    buf: Bytes,
    /// `attributes` was sent.
    pub has_attributes: bool,
    /// `attributes.request.http` was sent.
    pub has_http: bool,
    /// `attributes.source.address.socket_address.address`, when the source is a socket.
    pub source_address: Option<Span>,
    /// `attributes.source.principal`.
    pub principal: Span,
    pub method: Span,
    pub path: Span,
    pub host: Span,
    pub query: Span,
    pub body: Span,
    pub raw_body: Span,
    /// The `headers` map's entries, in wire order.
    pub headers: SmallVec<[HeaderSpans; 16]>,
    /// `header_map` was sent (`encode_raw_headers`).
    pub has_header_map: bool,
    /// `header_map`'s entries, in order.
    pub header_map: SmallVec<[HeaderSpans; 0]>,
    /// More than `MAX_HEADERS` entries were sent in one form (the rest are not kept).
    pub too_many_headers: bool,
}

/// Why bytes are not a CheckRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated message")]
    Truncated,
    #[error("invalid varint")]
    Varint,
    #[error("invalid tag")]
    Tag,
    #[error("field {0} has the wrong wire type")]
    WireType(u32),
    #[error("unbalanced group")]
    Group,
    #[error("message over 4 GiB")]
    TooLarge,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// How deep unknown groups may nest (prost's `RECURSION_LIMIT`).
const GROUP_DEPTH: u32 = 100;

/// The most header entries kept per form. A 4 MB message could carry two million empty
/// entries (48 MB of spans, and a scan of all of them per lookup); past this the request
/// is marked `too_many_headers` and `RequestView` answers 431 whatever `max_header_bytes`
/// says. Envoy's own default is 100 headers.
pub const MAX_HEADERS: usize = 8192;

/// A cursor over one message (or a nested one: `end` bounds it).
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A varint; one byte (every tag and length under 128) without the loop.
    #[inline]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        match self.buf.get(self.pos) {
            Some(&b) if b < 0x80 && self.pos < self.end => {
                self.pos += 1;
                Ok(u64::from(b))
            }
            _ => self.varint_long(),
        }
    }

    #[cold]
    fn varint_long(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf[..self.end]
                .get(self.pos)
                .ok_or(DecodeError::Truncated)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                // The tenth byte may carry only the top bit (prost's rule).
                return if i == 9 && b > 1 {
                    Err(DecodeError::Varint)
                } else {
                    Ok(v)
                };
            }
        }
        Err(DecodeError::Varint)
    }

    /// The next field's number and wire type; `None` at the end of the message.
    #[inline]
    fn tag(&mut self) -> Result<Option<(u32, u8)>, DecodeError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        // A key over 32 bits is invalid as a whole (prost's rule), not only its field.
        let key = u32::try_from(self.varint()?).map_err(|_| DecodeError::Tag)?;
        let field = key >> 3;
        let wire = (key & 7) as u8;
        if field == 0 || wire > FIXED32 {
            return Err(DecodeError::Tag);
        }
        Ok(Some((field, wire)))
    }

    /// A length-delimited field's span (the caller checked the wire type).
    #[inline]
    fn span(&mut self) -> Result<Span, DecodeError> {
        let len = usize::try_from(self.varint()?).map_err(|_| DecodeError::Truncated)?;
        if len > self.end - self.pos {
            return Err(DecodeError::Truncated);
        }
        let span = Span {
            start: self.pos as u32,
            len: len as u32,
        };
        self.pos += len;
        Ok(span)
    }

    /// A nested message: a reader over its bytes, and this one moved past them.
    fn nested(&mut self, field: u32, wire: u8) -> Result<Reader<'a>, DecodeError> {
        let s = expect_len(self, field, wire)?;
        Ok(Reader {
            buf: self.buf,
            pos: s.start as usize,
            end: (s.start + s.len) as usize,
        })
    }

    /// Skips a field this decoder does not read. Groups nest at most `GROUP_DEPTH` deep (as
    /// prost's recursion limit): a megabyte of group starts must not exhaust the stack.
    fn skip(&mut self, field: u32, wire: u8, depth: u32) -> Result<(), DecodeError> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.advance(8),
            FIXED32 => self.advance(4),
            LEN => self.span().map(drop),
            START_GROUP if depth >= GROUP_DEPTH => Err(DecodeError::Group),
            START_GROUP => loop {
                match self.tag()? {
                    None => return Err(DecodeError::Group),
                    Some((f, END_GROUP)) if f == field => return Ok(()),
                    Some((_, END_GROUP)) => return Err(DecodeError::Group),
                    Some((f, w)) => self.skip(f, w, depth + 1)?,
                }
            },
            _ => Err(DecodeError::Group),
        }
    }

    fn advance(&mut self, n: usize) -> Result<(), DecodeError> {
        if n > self.end - self.pos {
            return Err(DecodeError::Truncated);
        }
        self.pos += n;
        Ok(())
    }
}

fn expect_len(r: &mut Reader<'_>, field: u32, wire: u8) -> Result<Span, DecodeError> {
    if wire != LEN {
        return Err(DecodeError::WireType(field));
    }
    r.span()
}

/// Calls `f` for each field of the message `r` reads, skipping what `f` declines.
fn fields(
    r: &mut Reader<'_>,
    mut f: impl FnMut(&mut Reader<'_>, u32, u8) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    while let Some((field, wire)) = r.tag()? {
        if !f(r, field, wire)? {
            r.skip(field, wire, 0)?;
        }
    }
    Ok(())
}

impl CheckInput {
    /// Decodes one CheckRequest.
    pub fn decode(buf: Bytes) -> Result<CheckInput, DecodeError> {
        if u32::try_from(buf.len()).is_err() {
            return Err(DecodeError::TooLarge);
        }
        let mut input = CheckInput::default();
        let mut r = Reader {
            buf: &buf,
            pos: 0,
            end: buf.len(),
        };
        fields(&mut r, |r, field, wire| match field {
            1 => {
                input.has_attributes = true;
                input.attributes(&mut r.nested(field, wire)?)?;
                Ok(true)
            }
            _ => Ok(false),
        })?;
        input.buf = buf;
        Ok(input)
    }

    /// The bytes of a span.
    #[inline]
    pub fn bytes(&self, s: Span) -> &[u8] {
        &self.buf[s.start as usize..(s.start + s.len) as usize]
    }

    /// `AttributeContext`: `source` (1), `request` (4).
    fn attributes(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        fields(r, |r, field, wire| match field {
            1 => self.peer(&mut r.nested(field, wire)?).map(|()| true),
            4 => fields(&mut r.nested(field, wire)?, |r, field, wire| match field {
                2 => {
                    self.has_http = true;
                    self.http(&mut r.nested(field, wire)?).map(|()| true)
                }
                _ => Ok(false),
            })
            .map(|()| true),
            _ => Ok(false),
        })
    }

    /// `Peer`: `address` (1: `Address`, whose oneof arm 1 is `SocketAddress`, whose field 2
    /// is the address), `principal` (4).
    fn peer(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        fields(r, |r, field, wire| match field {
            1 => fields(&mut r.nested(field, wire)?, |r, field, wire| match field {
                1 => {
                    // The socket arm sent again merges into it; after another arm it
                    // starts afresh.
                    let mut address = self.source_address.unwrap_or_default();
                    fields(&mut r.nested(field, wire)?, |r, field, wire| match field {
                        2 => {
                            address = expect_len(r, field, wire)?;
                            Ok(true)
                        }
                        _ => Ok(false),
                    })?;
                    self.source_address = Some(address);
                    Ok(true)
                }
                2 | 3 => {
                    expect_len(r, field, wire)?;
                    self.source_address = None;
                    Ok(true)
                }
                _ => Ok(false),
            })
            .map(|()| true),
            4 => {
                self.principal = expect_len(r, field, wire)?;
                Ok(true)
            }
            _ => Ok(false),
        })
    }

    /// `HttpRequest`.
    fn http(&mut self, r: &mut Reader<'_>) -> Result<(), DecodeError> {
        fields(r, |r, field, wire| {
            let slot = match field {
                2 => &mut self.method,
                4 => &mut self.path,
                5 => &mut self.host,
                7 => &mut self.query,
                11 => &mut self.body,
                12 => &mut self.raw_body,
                3 => {
                    let h = header(&mut r.nested(field, wire)?, false)?;
                    self.too_many_headers |= !keep(&mut self.headers, h);
                    return Ok(true);
                }
                13 => {
                    self.has_header_map = true;
                    let mut m = r.nested(field, wire)?;
                    return fields(&mut m, |r, field, wire| match field {
                        1 => {
                            let h = header(&mut r.nested(field, wire)?, true)?;
                            self.too_many_headers |= !keep(&mut self.header_map, h);
                            Ok(true)
                        }
                        _ => Ok(false),
                    })
                    .map(|()| true);
                }
                _ => return Ok(false),
            };
            *slot = expect_len(r, field, wire)?;
            Ok(true)
        })
    }
}

/// Keeps `h` unless `MAX_HEADERS` are kept already; whether it was.
fn keep<A: smallvec::Array<Item = HeaderSpans>>(list: &mut SmallVec<A>, h: HeaderSpans) -> bool {
    let room = list.len() < MAX_HEADERS;
    if room {
        list.push(h);
    }
    room
}

/// A map entry (`key` 1, `value` 2) or, `raw`, a `HeaderValue` (also `raw_value` 3).
fn header(r: &mut Reader<'_>, raw: bool) -> Result<HeaderSpans, DecodeError> {
    let mut h = HeaderSpans::default();
    fields(r, |r, field, wire| {
        let slot = match field {
            1 => &mut h.key,
            2 => &mut h.value,
            3 if raw => &mut h.raw_value,
            _ => return Ok(false),
        };
        *slot = expect_len(r, field, wire)?;
        Ok(true)
    })?;
    Ok(h)
}

/// Tests only: the service decodes from the wire, and a conversion that could fail (a message
/// over 4 GiB) has no place in the server.
#[cfg(test)]
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

    /// The reference: prost's derive over the same fields (string fields as `bytes`, which
    /// is the same on the wire, so no UTF-8 check on either side).
    mod reference {
        use prost::bytes::Bytes;

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct CheckRequest {
            #[prost(message, optional, tag = "1")]
            pub attributes: Option<Attributes>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Attributes {
            #[prost(message, optional, tag = "1")]
            pub source: Option<Peer>,
            #[prost(message, optional, tag = "4")]
            pub request: Option<Request>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Peer {
            #[prost(message, optional, tag = "1")]
            pub address: Option<Address>,
            #[prost(bytes = "bytes", tag = "4")]
            pub principal: Bytes,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Address {
            #[prost(oneof = "Arm", tags = "1, 2, 3")]
            pub address: Option<Arm>,
        }
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Arm {
            #[prost(message, tag = "1")]
            Socket(SocketAddress),
            #[prost(bytes = "bytes", tag = "2")]
            Pipe(Bytes),
            #[prost(bytes = "bytes", tag = "3")]
            Internal(Bytes),
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct SocketAddress {
            #[prost(bytes = "bytes", tag = "2")]
            pub address: Bytes,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Request {
            #[prost(message, optional, tag = "2")]
            pub http: Option<HttpRequest>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct HttpRequest {
            #[prost(bytes = "bytes", tag = "2")]
            pub method: Bytes,
            #[prost(message, repeated, tag = "3")]
            pub headers: Vec<Entry>,
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
            #[prost(message, optional, tag = "13")]
            pub header_map: Option<HeaderMap>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Entry {
            #[prost(bytes = "bytes", tag = "1")]
            pub key: Bytes,
            #[prost(bytes = "bytes", tag = "2")]
            pub value: Bytes,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct HeaderMap {
            #[prost(message, repeated, tag = "1")]
            pub headers: Vec<RawHeader>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct RawHeader {
            #[prost(bytes = "bytes", tag = "1")]
            pub key: Bytes,
            #[prost(bytes = "bytes", tag = "2")]
            pub value: Bytes,
            #[prost(bytes = "bytes", tag = "3")]
            pub raw_value: Bytes,
        }
    }

    /// The HTTP request the hand decoder read, in the reference's shape.
    fn http_of(c: &CheckInput) -> Option<reference::HttpRequest> {
        let b = |s: Span| Bytes::copy_from_slice(c.bytes(s));
        c.has_http.then(|| reference::HttpRequest {
            method: b(c.method),
            headers: c
                .headers
                .iter()
                .map(|h| reference::Entry {
                    key: b(h.key),
                    value: b(h.value),
                })
                .collect(),
            path: b(c.path),
            host: b(c.host),
            query: b(c.query),
            body: b(c.body),
            raw_body: b(c.raw_body),
            header_map: c.has_header_map.then(|| reference::HeaderMap {
                headers: c
                    .header_map
                    .iter()
                    .map(|h| reference::RawHeader {
                        key: b(h.key),
                        value: b(h.value),
                        raw_value: b(h.raw_value),
                    })
                    .collect(),
            }),
        })
    }

    /// Whether the hand decoder and the reference read the same request.
    fn same(c: &CheckInput, r: &reference::CheckRequest) -> bool {
        let source = r.attributes.as_ref().and_then(|a| a.source.as_ref());
        let address = source
            .and_then(|s| s.address.as_ref())
            .and_then(|a| match &a.address {
                Some(reference::Arm::Socket(s)) => Some(s.address.clone()),
                _ => None,
            });
        let principal = source.map(|s| s.principal.clone()).unwrap_or_default();
        let http = r
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.clone());
        c.has_attributes == r.attributes.is_some()
            && http_of(c) == http
            && c.source_address.map(|s| Bytes::copy_from_slice(c.bytes(s))) == address
            && c.bytes(c.principal) == &principal[..]
    }

    fn full_request() -> CheckRequest {
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
        http.headers.insert("user-agent".into(), "curl/8".into());
        let peer = |ip: &str, principal: &str| ac::Peer {
            address: Some(core::Address {
                address: Some(core::address::Address::SocketAddress(core::SocketAddress {
                    address: ip.into(),
                    port_specifier: Some(core::socket_address::PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            principal: principal.into(),
            ..Default::default()
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer("192.0.2.1", "spiffe://a/b")),
                destination: Some(peer("10.0.0.1", "dest")),
                request: Some(ac::Request {
                    time: Some(envoy_types::pb::google::protobuf::Timestamp {
                        seconds: 1,
                        nanos: 2,
                    }),
                    http: Some(http),
                }),
                context_extensions: [("x".to_string(), "y".to_string())].into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_full_check_request_decodes_into_the_fields_read() {
        let c = CheckInput::from(&full_request());
        assert!(c.has_attributes && c.has_http);
        let text = |s: Span| std::str::from_utf8(c.bytes(s)).unwrap();
        assert_eq!(text(c.principal), "spiffe://a/b");
        assert_eq!(text(c.source_address.expect("socket")), "192.0.2.1");
        assert_eq!(
            (text(c.method), text(c.path), text(c.host), text(c.query)),
            ("PÖST", "/a/b?x=1", "api.example.com", "q")
        );
        assert_eq!((text(c.body), c.bytes(c.raw_body)), ("{}", &[0xff][..]));
        let mut headers: Vec<_> = c
            .headers
            .iter()
            .map(|h| (text(h.key), text(h.value)))
            .collect();
        headers.sort();
        assert_eq!(headers, [("user-agent", "curl/8"), ("x-api-key", "ключ")]);
        let raw = c.header_map[0];
        assert_eq!(
            (c.bytes(raw.key), c.bytes(raw.value), c.bytes(raw.raw_value)),
            (&b"k"[..], &b"v"[..], &[0xfe][..])
        );
    }

    #[test]
    fn the_last_address_arm_sent_is_the_one_read() {
        let with = |a: core::address::Address| CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(ac::Peer {
                    address: Some(core::Address { address: Some(a) }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let pipe = with(core::address::Address::Pipe(core::Pipe {
            path: "/run/envoy.sock".into(),
            mode: 0,
        }))
        .encode_to_vec();
        let socket = full_request().encode_to_vec();
        // Concatenated messages merge: the socket then the pipe is a pipe, and back.
        let mut socket_then_pipe = socket.clone();
        socket_then_pipe.extend_from_slice(&pipe);
        let mut pipe_then_socket = pipe.clone();
        pipe_then_socket.extend_from_slice(&socket);
        for (bytes, address) in [
            (pipe, None),
            (socket_then_pipe, None),
            (pipe_then_socket, Some(&b"192.0.2.1"[..])),
        ] {
            let c = CheckInput::decode(Bytes::from(bytes.clone())).expect("decodes");
            assert_eq!(c.source_address.map(|s| c.bytes(s)), address);
            let r = reference::CheckRequest::decode(&bytes[..]).expect("reference decodes");
            assert!(same(&c, &r));
        }
    }

    /// Every prefix and thousands of byte mutations of a real request, plus messages sent
    /// twice (merged): the hand decoder accepts exactly what prost accepts and reads the
    /// same fields.
    #[test]
    fn agrees_with_prost_on_every_prefix_mutation_and_merge() {
        let whole = full_request().encode_to_vec();
        let mut cases: Vec<Vec<u8>> = (0..=whole.len()).map(|n| whole[..n].to_vec()).collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut m = whole.clone();
            for _ in 0..(1 + next() % 3) {
                let i = (next() % m.len() as u64) as usize;
                m[i] = next() as u8;
            }
            cases.push(m);
        }
        let mut twice = whole.clone();
        twice.extend_from_slice(&whole);
        cases.push(twice);
        let (mut accepted, mut rejected) = (0, 0);
        for bytes in &cases {
            let mine = CheckInput::decode(Bytes::from(bytes.clone()));
            let theirs = reference::CheckRequest::decode(&bytes[..]);
            match (&mine, &theirs) {
                (Ok(c), Ok(r)) => {
                    assert!(same(c, r), "different reads of {bytes:?}");
                    accepted += 1;
                }
                (Err(_), Err(_)) => rejected += 1,
                _ => panic!("disagree on {bytes:?}: {mine:?} vs {theirs:?}"),
            }
        }
        // Both kinds were exercised.
        assert!(
            accepted > 1000 && rejected > 1000,
            "{accepted} / {rejected}"
        );
    }

    /// `inner` as length-delimited field `field` (lengths under 128).
    fn wrap(field: u8, inner: &[u8]) -> Vec<u8> {
        let mut out = vec![(field << 3) | 2, inner.len() as u8];
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn a_headers_entry_reads_key_and_value_only() {
        // An entry of the `headers` map with a varint field 3: unknown to a map entry (it
        // is `raw_value`, length-delimited, only in `header_map`), so skipped.
        let entry = [0x0a, 1, b'k', 0x12, 1, b'v', 3 << 3, 5];
        let bytes = wrap(1, &wrap(4, &wrap(2, &wrap(3, &entry))));
        let c = CheckInput::decode(Bytes::from(bytes.clone())).expect("decodes");
        assert_eq!(c.bytes(c.headers[0].value), b"v");
        let r = reference::CheckRequest::decode(&bytes[..]).expect("reference decodes");
        assert!(same(&c, &r));
        // The same field in `header_map` is `raw_value`, and a varint there is malformed.
        let bytes = wrap(1, &wrap(4, &wrap(2, &wrap(13, &wrap(1, &entry)))));
        assert!(CheckInput::decode(Bytes::from(bytes.clone())).is_err());
        assert!(reference::CheckRequest::decode(&bytes[..]).is_err());
    }

    #[test]
    fn groups_nest_as_deep_as_prost_allows_and_no_deeper() {
        let nested = |n: usize| {
            let mut b = vec![(9 << 3) | 3; n];
            b.extend(std::iter::repeat_n((9 << 3) | 4, n));
            b
        };
        for (n, ok) in [(100, true), (101, false), (1_000_000, false)] {
            let bytes = nested(n);
            let mine = CheckInput::decode(Bytes::from(bytes.clone()));
            let theirs = reference::CheckRequest::decode(&bytes[..]);
            assert_eq!((mine.is_ok(), theirs.is_ok()), (ok, ok), "{n} groups deep");
        }
    }

    #[test]
    fn header_entries_past_the_cap_are_counted_not_kept() {
        let entry = wrap(3, &[]);
        let mut http = Vec::new();
        for _ in 0..MAX_HEADERS + 5 {
            http.extend_from_slice(&entry);
        }
        let mut bytes = vec![(1 << 3) | 2];
        let request = [vec![(2 << 3) | 2], varint(http.len()), http].concat();
        let attributes = [vec![(4 << 3) | 2], varint(request.len()), request].concat();
        bytes.extend(varint(attributes.len()));
        bytes.extend(attributes);
        let c = CheckInput::decode(Bytes::from(bytes)).expect("decodes");
        assert_eq!(c.headers.len(), MAX_HEADERS);
        assert!(c.too_many_headers);
    }

    fn varint(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out
    }

    #[test]
    fn groups_are_skipped_and_unbalanced_ones_rejected() {
        // Field 9 (unknown) as a group holding a varint field, then attributes.
        let mut bytes = vec![(9 << 3) | 3, (1 << 3), 1, (9 << 3) | 4];
        bytes.extend_from_slice(&full_request().encode_to_vec());
        let c = CheckInput::decode(Bytes::from(bytes.clone())).expect("decodes");
        assert!(c.has_http);
        let r = reference::CheckRequest::decode(&bytes[..]).expect("reference decodes");
        assert!(same(&c, &r));
        for bad in [
            vec![(9 << 3) | 3],
            vec![(9 << 3) | 3, (8 << 3) | 4],
            vec![(9 << 3) | 4],
        ] {
            assert!(CheckInput::decode(Bytes::from(bad.clone())).is_err());
            assert!(reference::CheckRequest::decode(&bad[..]).is_err());
        }
    }
}
