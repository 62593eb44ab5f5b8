//! Stage 4, WebSocket: connection attempts are limited per identity.
//!
//! Owns: recognising an upgrade (HTTP/1.1 `upgrade: websocket` with `connection: upgrade`,
//! or HTTP/2's extended CONNECT with `:protocol: websocket`) and the descriptor it is counted
//! on. Must not touch: counting (the shared rule engine decides, with any algorithm).

use super::policy::DescriptorTemplate;
use super::request::RequestView;
use crate::config::authz::WebsocketConfig;

/// Compiled `authz.websocket`.
#[derive(Debug)]
pub struct WebsocketGuard {
    pub descriptor: DescriptorTemplate,
}

impl WebsocketGuard {
    pub fn new(c: &WebsocketConfig) -> WebsocketGuard {
        WebsocketGuard {
            descriptor: DescriptorTemplate::new(&c.descriptor),
        }
    }
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the request opens a WebSocket.
pub fn is_upgrade(req: &RequestView<'_>) -> bool {
    if req.method == "CONNECT" {
        return req
            .header(":protocol")
            .is_some_and(|p| p.eq_ignore_ascii_case("websocket"));
    }
    // Envoy may drop hop-by-hop `connection` before ext_authz; `upgrade` alone suffices.
    req.header("upgrade")
        .is_some_and(|u| has_token(u, "websocket"))
        && req
            .header("connection")
            .is_none_or(|c| has_token(c, "upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authz::wire::CheckInput;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    fn check(method: &str, headers: &[(&str, &str)]) -> bool {
        let c = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: method.into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        };
        is_upgrade(&RequestView::new(&CheckInput::from(&c), 1 << 16).unwrap())
    }

    #[test]
    fn recognises_upgrades() {
        assert!(check(
            "GET",
            &[("upgrade", "websocket"), ("connection", "Upgrade")]
        ));
        assert!(check(
            "GET",
            &[
                ("upgrade", "WebSocket"),
                ("connection", "keep-alive, upgrade")
            ]
        ));
        assert!(check("GET", &[("upgrade", "websocket")]));
        assert!(check("CONNECT", &[(":protocol", "websocket")]));
        assert!(!check(
            "GET",
            &[("upgrade", "h2c"), ("connection", "upgrade")]
        ));
        assert!(!check(
            "GET",
            &[("upgrade", "websocket"), ("connection", "close")]
        ));
        assert!(!check("GET", &[]));
    }
}
