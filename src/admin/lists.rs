//! `/v1/lists`: list, add (with TTL, reason and public code) and remove runtime allow/block
//! entries. Every call needs `Authorization: Bearer <admin token>`; without a configured
//! token the endpoints answer 404 (disabled), and the admin server binds to loopback unless
//! told otherwise.
//!
//! ```text
//! GET    /v1/lists                      both lists
//! GET    /v1/lists/{allow|block}        one list
//! POST   /v1/lists/{allow|block}        {"value": "203.0.113.0/24", "ttl_seconds": 3600,
//!                                        "reason": "ticket 4521", "code": "abuse"}
//! DELETE /v1/lists/{allow|block}/{value}   e.g. /v1/lists/block/10.0.0.0/8
//! ```

use super::AdminState;
use crate::lists::ListKind;
use crate::runtime::blocklist::ListError;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

pub(super) fn reply(code: StatusCode, body: serde_json::Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response()
}

pub(super) fn error(code: StatusCode, message: impl std::fmt::Display) -> Response {
    reply(code, json!({ "error": message.to_string() }))
}

/// Compares without leaking, through timing, how much of the token was right.
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i % b.len().max(1)).copied().unwrap_or(0));
    }
    diff == 0
}

/// `None` when the caller may proceed; otherwise the refusal.
pub(super) fn authorize(s: &AdminState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = s.admin_token.as_deref() else {
        return Some(error(
            StatusCode::NOT_FOUND,
            "list management is disabled: no admin token is configured \
             (settings.admin_token, --admin-token or RATETHROTTLE_ADMIN_TOKEN)",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| v[7..].trim())
        });
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => None,
        _ => Some(
            (
                StatusCode::UNAUTHORIZED,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::WWW_AUTHENTICATE, "Bearer"),
                ],
                "{\"error\":\"a valid bearer token is required\"}\n",
            )
                .into_response(),
        ),
    }
}

fn kind(name: &str) -> Result<ListKind, Box<Response>> {
    ListKind::parse(name).ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            format!("unknown list {name:?} (allow or block)"),
        ))
    })
}

fn list_error(e: ListError) -> Response {
    let code = match e {
        ListError::Invalid(_) => StatusCode::BAD_REQUEST,
        ListError::FromConfig(_) | ListError::FromKubernetes(_) => StatusCode::CONFLICT,
        ListError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, e)
}

pub async fn all(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(r) = authorize(&s, &headers) {
        return r;
    }
    let lists = s.authz.lists();
    reply(
        StatusCode::OK,
        json!({
            "store": lists.backend_name(),
            "allow": lists.entries(ListKind::Allow),
            "block": lists.entries(ListKind::Block),
        }),
    )
}

pub async fn one(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(list): Path<String>,
) -> Response {
    if let Some(r) = authorize(&s, &headers) {
        return r;
    }
    let kind = match kind(&list) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    reply(
        StatusCode::OK,
        json!({ "list": kind.as_str(), "entries": s.authz.lists().entries(kind) }),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRequest {
    value: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    code: Option<String>,
}

pub async fn add(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(list): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = authorize(&s, &headers) {
        return r;
    }
    let kind = match kind(&list) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let req: AddRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected {{\"value\": ip|cidr|identity, \"ttl_seconds\"?, \"reason\"?, \
                     \"code\"?}}: {e}"
                ),
            );
        }
    };
    if req.ttl_seconds == Some(0) {
        return error(
            StatusCode::BAD_REQUEST,
            "ttl_seconds must be greater than 0",
        );
    }
    let ttl = req.ttl_seconds.map(Duration::from_secs);
    match s
        .authz
        .lists()
        .add(kind, &req.value, ttl, &req.reason, req.code.as_deref())
        .await
    {
        Ok(entry) => reply(
            StatusCode::CREATED,
            json!({ "list": kind.as_str(), "entry": entry }),
        ),
        Err(e) => list_error(e),
    }
}

pub async fn remove(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path((list, value)): Path<(String, String)>,
) -> Response {
    if let Some(r) = authorize(&s, &headers) {
        return r;
    }
    let kind = match kind(&list) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    match s.authz.lists().remove(kind, &value).await {
        Ok(true) => reply(
            StatusCode::OK,
            json!({ "list": kind.as_str(), "removed": value }),
        ),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!(
                "{} is not in the {} list",
                crate::lists::shorten(&value),
                kind.as_str()
            ),
        ),
        Err(e) => list_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"ab", b"abc"));
        assert!(!same(b"abcd", b"abc"));
        assert!(!same(b"", b"abc"));
        assert!(!same(b"abc", b""));
    }
}
