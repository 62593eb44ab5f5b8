//! The CheckResponses Envoy acts on.
//!
//! Owns: the shape of every answer. Allowed: OK, the identity header added upstream (any
//! client copy replaced), spoofable identity headers removed, optionally the remaining
//! quota. Denied: the HTTP status, a short JSON body (a GraphQL-style one for GraphQL
//! requests), `Retry-After` and `x-ratelimit-*` on 429, and for gRPC requests `grpc-status`
//! / `grpc-message` headers plus the same code in `CheckResponse.status`, so gRPC clients see
//! RESOURCE_EXHAUSTED, PERMISSION_DENIED, UNAUTHENTICATED or INVALID_ARGUMENT rather than a
//! bare HTTP error. Bodies carry public codes only, never internal reasons.
//!
//! Must not touch: decisions.

use envoy_types::ext_authz::v3::pb::{HeaderAppendAction, HttpStatusCode};
use envoy_types::ext_authz::v3::{DeniedHttpResponseBuilder, OkHttpResponseBuilder};
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::google::rpc;

/// The quota figures of one limit, for headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Nanoseconds until the limit resets.
    pub reset_after: u64,
}

impl Quota {
    /// Whole seconds, rounded up, at least 1 (a client must not retry in a busy loop).
    pub fn retry_after_secs(&self) -> u64 {
        self.reset_after.div_ceil(1_000_000_000).max(1)
    }
}

/// gRPC codes used in answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcCode {
    InvalidArgument = 3,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// OK: forward upstream with `headers` set and `remove` removed.
pub fn allowed(
    identity_header: &str,
    identity: Option<String>,
    strip: &[String],
    quota: Option<Quota>,
) -> CheckResponse {
    let mut ok = OkHttpResponseBuilder::new();
    for h in strip {
        ok.remove_header(h.as_str());
    }
    match identity {
        Some(id) => {
            ok.add_header(
                identity_header,
                id,
                Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                false,
            );
        }
        None => {
            ok.remove_header(identity_header);
        }
    }
    if let Some(q) = quota {
        for (k, v) in [
            ("x-ratelimit-limit", q.limit.to_string()),
            ("x-ratelimit-remaining", q.remaining.to_string()),
            (
                "x-ratelimit-reset",
                q.reset_after.div_ceil(1_000_000_000).to_string(),
            ),
        ] {
            ok.add_header(
                k,
                v,
                Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
                false,
            );
        }
    }
    CheckResponse {
        status: Some(rpc::Status::default()),
        dynamic_metadata: None,
        http_response: Some(
            envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse::OkResponse(
                ok.build(),
            ),
        ),
    }
}

/// A denial.
#[derive(Debug, Clone)]
pub struct Denial {
    pub http: HttpStatusCode,
    pub grpc: GrpcCode,
    /// For `grpc-message` and `CheckResponse.status.message`: public words only.
    pub message: &'static str,
    /// Said after `message` to gRPC callers (Envoy turns a denial's body into the
    /// `grpc-message` of a gRPC request, so gRPC callers get this text as the body).
    pub detail: String,
    pub body: String,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

impl Denial {
    fn json(
        http: HttpStatusCode,
        grpc: GrpcCode,
        message: &'static str,
        body: serde_json::Value,
    ) -> Denial {
        Denial {
            http,
            grpc,
            message,
            detail: String::new(),
            body: body.to_string(),
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    /// 429 with `Retry-After` and the `x-ratelimit-*` headers.
    pub fn rate_limited(q: Quota, graphql: bool) -> Denial {
        let retry = q.retry_after_secs();
        let mut d = if graphql {
            graphql_error(
                HttpStatusCode::TooManyRequests,
                GrpcCode::ResourceExhausted,
                "rate limited",
                serde_json::json!({"errors": [{
                    "message": format!("Query cost budget exhausted; retry in {retry} s."),
                    "extensions": {"code": "RATE_LIMITED", "retryAfter": retry},
                }]})
                .to_string(),
            )
        } else {
            Denial::json(
                HttpStatusCode::TooManyRequests,
                GrpcCode::ResourceExhausted,
                "rate limited",
                serde_json::json!({"error": "rate_limited", "retry_after": retry}),
            )
        };
        d.detail = format!("retry after {retry}s");
        d.headers = vec![
            ("retry-after", retry.to_string()),
            ("x-ratelimit-limit", q.limit.to_string()),
            ("x-ratelimit-remaining", q.remaining.to_string()),
            ("x-ratelimit-reset", retry.to_string()),
        ];
        d
    }

    /// 403 naming the public reason code of the entry.
    pub fn blocked(code: &str) -> Denial {
        let mut d = Denial::json(
            HttpStatusCode::Forbidden,
            GrpcCode::PermissionDenied,
            "blocked",
            serde_json::json!({"error": "blocked", "code": code}),
        );
        d.detail = code.to_string();
        d
    }

    /// 401 for a present but invalid token.
    pub fn unauthenticated(code: &str) -> Denial {
        let mut d = Denial::json(
            HttpStatusCode::Unauthorized,
            GrpcCode::Unauthenticated,
            "unauthenticated",
            serde_json::json!({"error": "unauthenticated", "code": code}),
        );
        d.detail = code.to_string();
        d.headers = vec![(
            "www-authenticate",
            format!("Bearer error=\"invalid_token\", error_description=\"{code}\""),
        )];
        d
    }

    /// A CheckRequest that cannot be judged (under `failure_mode: deny`).
    pub fn malformed(code: &'static str, too_large: bool) -> Denial {
        let http = if too_large {
            HttpStatusCode::RequestHeaderFieldsTooLarge
        } else {
            HttpStatusCode::BadRequest
        };
        let mut d = Denial::json(
            http,
            GrpcCode::InvalidArgument,
            "bad request",
            serde_json::json!({"error": "bad_request", "code": code}),
        );
        d.detail = code.to_string();
        d
    }

    /// The limiter could not answer (under `failure_mode: deny`).
    pub fn unavailable() -> Denial {
        Denial::json(
            HttpStatusCode::ServiceUnavailable,
            GrpcCode::Unavailable,
            "unavailable",
            serde_json::json!({"error": "unavailable"}),
        )
    }

    /// 400 with a GraphQL-style error body.
    pub fn graphql(body: String) -> Denial {
        graphql_error(
            HttpStatusCode::BadRequest,
            GrpcCode::InvalidArgument,
            "invalid GraphQL request",
            body,
        )
    }

    /// `message: detail`, what a gRPC caller reads.
    fn grpc_text(&self) -> String {
        if self.detail.is_empty() {
            self.message.to_string()
        } else {
            format!("{}: {}", self.message, self.detail)
        }
    }

    /// The CheckResponse. For gRPC requests the `grpc-status`/`grpc-message` headers are
    /// added and the body is the plain message (Envoy's local reply makes the body the
    /// `grpc-message` of a gRPC request); other requests get the JSON body.
    pub fn into_response(self, grpc: bool) -> CheckResponse {
        let text = self.grpc_text();
        let mut denied = DeniedHttpResponseBuilder::new();
        denied.set_http_status(self.http);
        let set = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
        denied.add_header("content-type", self.content_type, set, false);
        for (k, v) in self.headers {
            denied.add_header(k, v, set, false);
        }
        if grpc {
            denied.add_header("grpc-status", (self.grpc as i32).to_string(), set, false);
            denied.add_header("grpc-message", text.as_str(), set, false);
            denied.set_body(text.as_str());
        } else {
            denied.set_body(self.body);
        }
        CheckResponse {
            status: Some(rpc::Status {
                code: self.grpc as i32,
                message: text,
                details: Vec::new(),
            }),
            dynamic_metadata: None,
            http_response: Some(
                envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse::DeniedResponse(
                    denied.build(),
                ),
            ),
        }
    }
}

fn graphql_error(
    http: HttpStatusCode,
    grpc: GrpcCode,
    message: &'static str,
    body: String,
) -> Denial {
    Denial {
        http,
        grpc,
        message,
        detail: String::new(),
        body,
        content_type: "application/json",
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;

    #[test]
    fn rate_limited_answer_has_headers_and_short_body() {
        let q = Quota {
            limit: 5,
            remaining: 0,
            reset_after: 1_200_000_000,
        };
        let r = Denial::rate_limited(q, false).into_response(true);
        assert_eq!(r.status.as_ref().map(|s| s.code), Some(8));
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("denied")
        };
        assert_eq!(d.status.map(|s| s.code), Some(429));
        let h: Vec<(String, String)> = d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        assert!(h.contains(&("retry-after".into(), "2".into())), "{h:?}");
        assert!(h.contains(&("x-ratelimit-limit".into(), "5".into())));
        assert!(h.contains(&("grpc-status".into(), "8".into())));
        assert_eq!(
            d.body, "rate limited: retry after 2s",
            "gRPC callers read the body"
        );
        let r = Denial::rate_limited(q, false).into_response(false);
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("denied")
        };
        assert_eq!(d.body, r#"{"error":"rate_limited","retry_after":2}"#);
    }

    #[test]
    fn allowed_replaces_identity_and_strips() {
        let r = allowed("x-id", Some("user:a".into()), &["x-user".into()], None);
        assert_eq!(r.status.as_ref().map(|s| s.code), Some(0));
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("ok")
        };
        assert_eq!(ok.headers_to_remove, vec!["x-user".to_string()]);
        let h = ok.headers[0].header.as_ref().unwrap();
        assert_eq!((h.key.as_str(), h.value.as_str()), ("x-id", "user:a"));
        assert_eq!(
            ok.headers[0].append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
    }
}
