//! Delivering one rendered alert to one sink: HTTP POST (hyper's client; https with the
//! system's CA certificates through rustls), each attempt bounded, retried with backoff
//! (250 ms doubling to 10 s) until a deadline, and the sink's health kept: a sink whose last
//! `dead_after` alerts all failed is dead until one succeeds.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::Mutex;

use crate::config::alerts::{Severity, SinkType};

const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Bytes of a sink's error answer kept for the log and `/readyz`.
const ERROR_BODY: usize = 200;

/// A sink with its secrets resolved, and its counters.
#[derive(Debug)]
pub struct SinkState {
    pub name: String,
    pub kind: SinkType,
    /// Where to POST (for Alertmanager, `{url}/api/v2/alerts`).
    pub url: hyper::Uri,
    pub hmac_key: Option<Vec<u8>>,
    pub signature_header: String,
    pub min_severity: Severity,
    /// Alerts delivered.
    pub sent: AtomicU64,
    /// Alerts given up on (deadline passed, or refused with a 4xx).
    pub failed: AtomicU64,
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
    consecutive_failures: AtomicU32,
    dead_after: u32,
    last_error: Mutex<Option<String>>,
}

impl SinkState {
    pub fn new(
        name: String,
        kind: SinkType,
        url: hyper::Uri,
        hmac_key: Option<Vec<u8>>,
        signature_header: String,
        min_severity: Severity,
        dead_after: u32,
    ) -> SinkState {
        SinkState {
            name,
            kind,
            url,
            hmac_key,
            signature_header,
            min_severity,
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            dead_after: dead_after.max(1),
            last_error: Mutex::new(None),
        }
    }

    /// The last `dead_after` alerts to this sink all failed.
    pub fn is_dead(&self) -> bool {
        self.consecutive_failures.load(Relaxed) >= self.dead_after
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    fn record(&self, result: &Result<(), String>) {
        match result {
            Ok(()) => {
                self.sent.fetch_add(1, Relaxed);
                if self.consecutive_failures.swap(0, Relaxed) >= self.dead_after {
                    tracing::info!(sink = %self.name, "alert sink answers again");
                }
            }
            Err(e) => {
                self.failed.fetch_add(1, Relaxed);
                let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
                *self.last_error.lock() = Some(e.clone());
                if n == self.dead_after {
                    tracing::error!(sink = %self.name, failures = n, "alert sink dead: {e}");
                } else {
                    tracing::warn!(sink = %self.name, "alert not delivered: {e}");
                }
            }
        }
    }
}

/// The HTTP client every delivery shares (connections are pooled per sink).
#[derive(Clone, Debug)]
pub enum HttpClient {
    Tls(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
    /// No CA certificates could be loaded: http only (the reason is kept for errors).
    Plain(Client<HttpConnector, Full<Bytes>>, String),
}

impl HttpClient {
    pub fn new() -> HttpClient {
        let exec = hyper_util::rt::TokioExecutor::new();
        match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
            Ok(b) => HttpClient::Tls(
                Client::builder(exec).build(b.https_or_http().enable_http1().build()),
            ),
            Err(e) => {
                let why = format!("no CA certificates for https ({e})");
                tracing::warn!("alert sinks: {why}; http only");
                HttpClient::Plain(Client::builder(exec).build_http(), why)
            }
        }
    }

    async fn post(
        &self,
        sink: &SinkState,
        body: Bytes,
        signature: Option<&str>,
    ) -> Result<(), String> {
        let mut req = hyper::Request::post(sink.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("ratethrottle/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(sig) = signature {
            req = req.header(sink.signature_header.as_str(), sig);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let resp = match self {
            HttpClient::Tls(c) => c.request(req).await,
            HttpClient::Plain(c, why) => {
                if sink.url.scheme_str() == Some("https") {
                    return Err(why.clone());
                }
                c.request(req).await
            }
        }
        .map_err(|e| error_chain(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            return Ok(());
        }
        let text: String = String::from_utf8_lossy(&body)
            .chars()
            .take(ERROR_BODY)
            .collect();
        Err(format!("HTTP {}: {}", status.as_u16(), text.trim()))
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

/// `e` and its causes on one line (hyper's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Whether an answer is worth retrying: network errors, timeouts, 5xx, 408 and 429 are;
/// other 4xx mean the request itself is refused.
fn retryable(e: &str) -> bool {
    match e.strip_prefix("HTTP ").and_then(|r| r.get(..3)) {
        Some(code) => !code.starts_with('4') || code == "408" || code == "429",
        None => true,
    }
}

/// Delivers one body to one sink, retrying until `deadline` after the first attempt; each
/// attempt is bounded by `timeout`. Updates the sink's counters and health.
pub async fn deliver(
    client: &HttpClient,
    sink: &SinkState,
    body: Bytes,
    timeout: Duration,
    deadline: Duration,
) -> Result<(), String> {
    let signature = sink
        .hmac_key
        .as_ref()
        .map(|k| super::message::signature(k, &body));
    let start = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let result = loop {
        let left = deadline.saturating_sub(start.elapsed());
        let attempt = timeout.min(left).max(Duration::from_millis(1));
        let r = match tokio::time::timeout(
            attempt,
            client.post(sink, body.clone(), signature.as_deref()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", attempt.as_millis())),
        };
        let e = match r {
            Ok(()) => break Ok(()),
            Err(e) => e,
        };
        if !retryable(&e) || start.elapsed() + backoff >= deadline {
            break Err(e);
        }
        sink.retries.fetch_add(1, Relaxed);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    sink.record(&result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_not_retried_but_outages_are() {
        assert!(retryable("HTTP 500: oops"));
        assert!(retryable("HTTP 503: "));
        assert!(retryable("HTTP 429: slow down"));
        assert!(retryable("connection refused"));
        assert!(!retryable("HTTP 400: bad"));
        assert!(!retryable("HTTP 404: no such hook"));
    }

    #[test]
    fn a_sink_is_dead_after_its_last_n_alerts_failed_and_alive_after_one_success() {
        let s = SinkState::new(
            "hook".into(),
            SinkType::Webhook,
            hyper::Uri::from_static("http://127.0.0.1:1/"),
            None,
            "x-sig".into(),
            Severity::Info,
            2,
        );
        s.record(&Err("refused".into()));
        assert!(!s.is_dead());
        s.record(&Err("refused".into()));
        assert!(s.is_dead());
        assert_eq!(s.last_error().as_deref(), Some("refused"));
        s.record(&Ok(()));
        assert!(!s.is_dead());
        assert_eq!((s.sent.load(Relaxed), s.failed.load(Relaxed)), (1, 2));
    }
}
