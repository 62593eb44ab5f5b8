//! The event the hot path pushes: small, `Copy`, no heap, so a bounded queue can carry it.

use std::net::IpAddr;

use crate::digest::{IdentityDigest, identity_hash};

/// Bytes of text kept inline in a [`Label`]; longer text is cut at a char boundary.
pub const LABEL_BYTES: usize = 46;

/// A 64-bit hash of some text plus a short inline copy of it, so a decision can name the key
/// without the event owning a `String`. The hash is of the *whole* text: two identities that
/// share their first 46 bytes are still different keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label {
    hash: u64,
    len: u8,
    truncated: bool,
    bytes: [u8; LABEL_BYTES],
}

impl Label {
    /// The empty label (no identity: an unauthenticated caller).
    pub const EMPTY: Label = Label {
        hash: 0,
        len: 0,
        truncated: false,
        bytes: [0; LABEL_BYTES],
    };

    /// Hashes `text` and keeps its first [`LABEL_BYTES`] bytes, cut back to a char boundary.
    pub fn new(text: &str) -> Label {
        if text.is_empty() {
            return Label::EMPTY;
        }
        let mut end = text.len().min(LABEL_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; LABEL_BYTES];
        bytes[..end].copy_from_slice(&text.as_bytes()[..end]);
        let hash = Label::hash_of(text);
        Label {
            hash,
            len: end as u8,
            truncated: end < text.len(),
            bytes,
        }
    }

    /// The hash a label of `text` has, without building the label (the request path keys
    /// trust by it). Never 0: 0 means "no label".
    #[inline]
    pub fn hash_of(text: &str) -> u64 {
        identity_hash(text)
    }

    /// A label known only by its hash (an operator typed a `#xxh3:<hex>` digest): no text.
    pub fn from_hash(hash: u64) -> Label {
        Label {
            hash: hash.max(1),
            truncated: true,
            ..Label::EMPTY
        }
    }

    /// Whether the text was longer than the label keeps (then only the hash names it whole).
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// How lists name this text: the text itself, or its digest (`#xxh3:<hex>`) when it was
    /// cut — a block entry by digest matches exactly the identity the event came from.
    pub fn list_value(&self) -> String {
        if self.truncated {
            IdentityDigest(self.hash).to_string()
        } else {
            self.prefix().to_string()
        }
    }

    /// The hash of the whole text (0 for the empty label).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn is_empty(&self) -> bool {
        self.hash == 0
    }

    /// The kept prefix of the text (valid UTF-8 by construction).
    pub fn prefix(&self) -> &str {
        let n = usize::from(self.len).min(LABEL_BYTES);
        std::str::from_utf8(&self.bytes[..n]).unwrap_or("")
    }

    /// The text for humans: the prefix, with `…` when it was cut.
    pub fn display(&self) -> String {
        if self.truncated {
            format!("{}…", self.prefix())
        } else {
            self.prefix().to_string()
        }
    }
}

impl std::fmt::Debug for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Label({:?}, {:#x})", self.display(), self.hash)
    }
}

/// HTTP method, as a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Method {
    #[default]
    Other,
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl Method {
    pub fn parse(s: &str) -> Method {
        match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            _ => Method::Other,
        }
    }
}

/// Which part of the sidecar saw the request. Envoy calls both `Check` and `ShouldRateLimit`
/// for one request and later reports it in the access log, so the detector counts volume from
/// one source only ([`super::Config::volume_from`]) and outcomes from the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `ShouldRateLimit`.
    RateLimit,
    /// ext_authz `Check`.
    Authz,
    /// Envoy's gRPC access log (`StreamAccessLogs`).
    AccessLog,
}

/// What happened to the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Request time: was it over a limit, was it on our blocklist.
    Request { limited: bool, blocked: bool },
    /// Response time, from the access log.
    Response {
        status: u16,
        response_flags: u32,
        duration_ms: u32,
    },
}

/// One request as the detector sees it. `Copy` and ~150 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since an epoch the caller chooses (wall clock or virtual); must only be
    /// comparable with the `now` given to [`super::Detector::tick`].
    pub at_ms: u64,
    pub ip: IpAddr,
    /// The resolved identity; [`Label::EMPTY`] for an unauthenticated caller.
    pub identity: Label,
    /// The path (or route name).
    pub path: Label,
    pub method: Method,
    pub source: Source,
    pub outcome: Outcome,
    /// ratethrottle itself refused this request (our blocklist, our limit, or a 403/429 our
    /// ext_authz wrote). Never evidence: a ban's own 403s must not renew the ban.
    pub denied_by_us: bool,
}

impl Event {
    /// An `Authz` request-time event that was allowed (the common case in traces and tests).
    pub fn request(at_ms: u64, ip: IpAddr, identity: Label, path: Label) -> Event {
        Event {
            at_ms,
            ip,
            identity,
            path,
            method: Method::Get,
            source: Source::Authz,
            outcome: Outcome::Request {
                limited: false,
                blocked: false,
            },
            denied_by_us: false,
        }
    }

    /// An access-log event with `status`.
    pub fn response(at_ms: u64, ip: IpAddr, identity: Label, path: Label, status: u16) -> Event {
        Event {
            at_ms,
            ip,
            identity,
            path,
            method: Method::Get,
            source: Source::AccessLog,
            outcome: Outcome::Response {
                status,
                response_flags: 0,
                duration_ms: 0,
            },
            denied_by_us: false,
        }
    }

    /// A response that counts as a failure for the failure-ratio and path-spread detectors.
    pub fn is_failure(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Response {
                status: 401 | 403 | 404,
                ..
            }
        )
    }
}
