//! The admin port's HTTP server: hyper's HTTP/1 and HTTP/2 with the timeouts `axum::serve`
//! has no knob for.
//!
//! Owns: per-connection tasks of the admin port and their graceful close. Must not touch:
//! routes (`crate::admin`).

use super::ConnectionOptions;
use super::listen::Incoming;
use futures_util::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::pin::pin;
use tokio::sync::watch;

/// Serves `router` on `incoming` until `stop` turns true, then asks every connection to
/// close (HTTP/1: after the response in flight; HTTP/2: GOAWAY) and returns once all have.
/// The caller bounds that wait (`shutdown_drain`).
///
/// A request head must arrive within `handshake_timeout` (hyper's HTTP/1 header read
/// timeout, which also closes a keep-alive connection idle that long); HTTP/2 peers are
/// pinged every `http2_keepalive` and dropped when a ping goes unanswered as long.
pub async fn serve(
    incoming: Incoming,
    router: axum::Router,
    opts: ConnectionOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(opts.http2_keepalive)
        .keep_alive_timeout(opts.http2_keepalive);
    // Every connection task holds a receiver; `closed()` resolves when the last one ends.
    let (open, _) = watch::channel(());
    let mut incoming = incoming;
    loop {
        let io = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            io = incoming.next() => match io {
                Some(Ok(io)) => io,
                // `Incoming` retries its own errors; it ends only with its listener.
                Some(Err(_)) | None => break,
            },
        };
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        let alive = open.subscribe();
        tokio::spawn(async move {
            let conn = builder.serve_connection(TokioIo::new(io), service);
            let mut conn = pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            };
            let result = match done {
                Some(r) => r,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended");
            }
            drop(alive);
        });
    }
    // Close the listening socket now, not after the drain: new clients are refused at once.
    drop(incoming);
    open.closed().await;
}
