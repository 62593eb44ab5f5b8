//! Realistic ext_authz `CheckRequest`s, as Envoy's `envoy.filters.http.ext_authz` sends them:
//! source and destination peers, the HTTP request with lower-case headers (pseudo-headers
//! included), and the body when `with_request_body` is on. Shared by the unit-free tests and
//! the benchmark (`#[path]`-included there).
#![allow(dead_code)]

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use std::collections::HashMap;

fn peer(ip: &str, port: u32, principal: &str) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                ),
                ..Default::default()
            })),
        }),
        principal: principal.into(),
        ..Default::default()
    }
}

/// Builds one CheckRequest.
#[derive(Clone)]
pub struct Check {
    source: String,
    principal: String,
    method: String,
    path: String,
    host: String,
    headers: HashMap<String, String>,
    body: String,
}

impl Check {
    /// `GET /` from `source` to `api.example.com`, with the headers a browser-ish client and
    /// Envoy add.
    pub fn new(source: &str) -> Check {
        let mut c = Check {
            source: source.into(),
            principal: String::new(),
            method: "GET".into(),
            path: "/".into(),
            host: "api.example.com".into(),
            headers: HashMap::new(),
            body: String::new(),
        };
        for (k, v) in [
            ("user-agent", "curl/8.5.0"),
            ("accept", "*/*"),
            ("x-request-id", "5f0f9a5e-4c1b-4e07-9d7a-0c3f3e0c1a11"),
            ("x-forwarded-proto", "https"),
            ("x-envoy-expected-rq-timeout-ms", "15000"),
        ] {
            c.headers.insert(k.into(), v.into());
        }
        c
    }

    pub fn method(mut self, m: &str) -> Check {
        self.method = m.into();
        self
    }

    pub fn path(mut self, p: &str) -> Check {
        self.path = p.into();
        self
    }

    pub fn host(mut self, h: &str) -> Check {
        self.host = h.into();
        self
    }

    pub fn header(mut self, k: &str, v: &str) -> Check {
        self.headers.insert(k.into(), v.into());
        self
    }

    pub fn principal(mut self, p: &str) -> Check {
        self.principal = p.into();
        self
    }

    /// A body as Envoy buffers it (`with_request_body`), with its content type.
    pub fn body(mut self, content_type: &str, body: &str) -> Check {
        self.headers
            .insert("content-type".into(), content_type.into());
        self.headers
            .insert("content-length".into(), body.len().to_string());
        self.body = body.into();
        self
    }

    /// A GraphQL POST: `{"query": ..., "variables": ...}`.
    pub fn graphql(self, query: &str, variables: Option<serde_json::Value>) -> Check {
        let mut b = serde_json::json!({ "query": query });
        if let Some(v) = variables {
            b["variables"] = v;
        }
        self.method("POST")
            .path("/graphql")
            .body("application/json", &b.to_string())
    }

    /// A gRPC call to `/service/method`.
    pub fn grpc(self, service: &str, method: &str) -> Check {
        self.method("POST")
            .path(&format!("/{service}/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
    }

    pub fn build(&self) -> CheckRequest {
        let mut headers = self.headers.clone();
        headers.insert(":method".into(), self.method.clone());
        headers.insert(":path".into(), self.path.clone());
        headers.insert(":authority".into(), self.host.clone());
        headers.insert(":scheme".into(), "https".into());
        CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(&self.source, 51_234, &self.principal)),
                destination: Some(peer("10.0.0.10", 8_443, "")),
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        id: "10813256387245478520".into(),
                        method: self.method.clone(),
                        headers,
                        path: self.path.clone(),
                        host: self.host.clone(),
                        scheme: "https".into(),
                        protocol: "HTTP/1.1".into(),
                        size: self.body.len() as i64,
                        body: self.body.clone(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }
}

/// What a CheckResponse says, flattened for assertions.
#[derive(Debug)]
pub struct Answer {
    /// `CheckResponse.status.code` (0 = OK).
    pub grpc_code: i32,
    /// HTTP status of a denial; 200 for OK.
    pub http: u32,
    /// Headers of the denial, or headers added upstream for OK.
    pub headers: HashMap<String, String>,
    /// Headers removed upstream (OK only).
    pub removed: Vec<String>,
    pub body: String,
}

impl Answer {
    pub fn of(r: &CheckResponse) -> Answer {
        let grpc_code = r.status.as_ref().map_or(0, |s| s.code);
        let collect = |hs: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption]| {
            hs.iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| (h.key.clone(), h.value.clone()))
                .collect::<HashMap<_, _>>()
        };
        match &r.http_response {
            Some(HttpResponse::OkResponse(ok)) => Answer {
                grpc_code,
                http: 200,
                headers: collect(&ok.headers),
                removed: ok.headers_to_remove.clone(),
                body: String::new(),
            },
            Some(HttpResponse::DeniedResponse(d)) | Some(HttpResponse::ErrorResponse(d)) => {
                Answer {
                    grpc_code,
                    http: d.status.as_ref().map_or(403, |s| s.code as u32),
                    headers: collect(&d.headers),
                    removed: Vec::new(),
                    body: d.body.clone(),
                }
            }
            None => Answer {
                grpc_code,
                http: if grpc_code == 0 { 200 } else { 403 },
                headers: HashMap::new(),
                removed: Vec::new(),
                body: String::new(),
            },
        }
    }

    pub fn ok(&self) -> bool {
        self.grpc_code == 0 && self.http == 200
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body {:?}: {e}", self.body))
    }

    pub fn header(&self, k: &str) -> Option<&str> {
        self.headers.get(k).map(String::as_str)
    }
}
