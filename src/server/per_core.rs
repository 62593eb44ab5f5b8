//! The gRPC port's per-core layout: one accept loop hands each new connection, round robin, to
//! one of N threads that each run a single-threaded tokio runtime and serve it there for its
//! whole life.
//!
//! Why: on tokio's shared work-stealing pool a connection's HTTP/2 task and the task of each
//! of its streams wake each other across threads, and every wake-up crosses the pool's shared
//! queues. An Envoy keeps a few long-lived connections per worker, so pinning a connection to
//! one thread keeps all of its work (decode, decide, encode, write) on one core with no cross-
//! thread hand-off; the kernel spreads load over connections instead (see the README's
//! "Performance" section for the measured figures).
//!
//! But a pinned connection can use only its own core. Envoy opens one HTTP/2 connection per
//! worker to the service, so an Envoy with fewer workers than we have threads would leave
//! cores idle: with `--concurrency 1` in front of two threads, Envoy's rate limited requests
//! ran at 0.66–0.73× the shared pool's rate. So as long as no more connections are open than
//! there are threads (the new one counted), a new connection is served on the main runtime's
//! shared pool, which spreads one connection's streams over its workers; beyond that, new
//! ones are pinned, taking turns. A few connections get the layout that served them best
//! before, many get the per-core one.
//!
//! Owns: the serving threads, the pool lane and the hand-off. Must not touch: HTTP (tonic
//! serves each connection), decisions, and the background tasks, which stay on the main
//! runtime.

use super::listen::{Guarded, Incoming, OpenConnection};
use futures_util::StreamExt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Connections accepted but not yet taken by their thread. A thread this far behind is
/// skipped; accept waits only when every thread is (nothing queues without bound).
const HANDOFF_QUEUE: usize = 64;

/// A connection on its way to its lane, counted open.
type Handoff = (std::net::TcpStream, OpenConnection);

/// The accepted connections one lane gets, registered with its runtime as it polls.
pub type Handed = futures_util::stream::Map<
    ReceiverStream<Handoff>,
    Box<dyn FnMut(Handoff) -> io::Result<Guarded> + Send>,
>;

fn handed(rx: mpsc::Receiver<Handoff>, handshake_timeout: Duration) -> Handed {
    let adopt: Box<dyn FnMut(Handoff) -> io::Result<Guarded> + Send> =
        Box::new(move |(s, open)| Guarded::adopt(s, handshake_timeout, open));
    ReceiverStream::new(rx).map(adopt)
}

/// Serves `incoming` on `threads` single-threaded runtimes and, while fewer connections than
/// `threads` are open, on the calling runtime's pool: `serve(connections, stop)` runs on each
/// lane (a tonic `Router::serve_with_incoming_shutdown`). The threads start here; the
/// returned accept loop ends when every lane's server has returned, after `stop` turned true;
/// the first error wins.
pub fn serve<F, Fut>(
    mut incoming: Incoming,
    threads: usize,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    serve: F,
) -> impl Future<Output = Result<(), tonic::transport::Error>> + Send
where
    F: Fn(Handed, watch::Receiver<bool>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
{
    let threads = threads.max(1);
    let open = Arc::new(AtomicUsize::new(0));
    let mut queues = Vec::with_capacity(threads);
    let mut done = Vec::with_capacity(threads + 1);
    let (pool_tx, pool_rx) = mpsc::channel::<Handoff>(HANDOFF_QUEUE);
    let pool = tokio::spawn(serve.clone()(
        handed(pool_rx, handshake_timeout),
        stop.clone(),
    ));
    for i in 0..threads {
        let (tx, rx) = mpsc::channel::<Handoff>(HANDOFF_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        let serve = serve.clone();
        let stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("grpc-{i}"))
            .spawn(move || {
                let connections = handed(rx, handshake_timeout);
                let result = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => Ok(rt.block_on(serve(connections, stop))),
                    Err(e) => Err(e),
                };
                let _ = done_tx.send(result);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "starting a gRPC serving thread failed");
            continue;
        }
        queues.push(tx);
        done.push(done_rx);
    }
    async move {
        let mut next = 0usize;
        let mut pool_tx = Some(pool_tx);
        while !queues.is_empty() {
            let conn = tokio::select! {
                conn = incoming.next() => conn,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(Ok(conn)) = conn else { break };
            let socket = match conn.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "handing a connection to its serving thread failed");
                    continue;
                }
            };
            let conn = (socket, OpenConnection::new(&open));
            // No more open than threads, this one counted: the pool spreads their streams.
            let conn = match &pool_tx {
                Some(tx) if open.load(Ordering::Relaxed) <= threads => match tx.try_send(conn) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(c)) => c,
                    Err(mpsc::error::TrySendError::Closed(c)) => {
                        pool_tx = None;
                        c
                    }
                },
                _ => conn,
            };
            // Every queue full and then a stop: the threads no longer take connections, so
            // waiting on one would hold the shutdown until the drain bound.
            tokio::select! {
                () = hand_off(&mut queues, &mut next, conn) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        drop(queues);
        drop(pool_tx);
        drop(incoming);
        let mut result = Ok(());
        match pool.await {
            Ok(Err(e)) => result = Err(e),
            Err(e) => tracing::error!(error = %e, "the gRPC pool lane failed"),
            Ok(Ok(())) => {}
        }
        for d in done {
            match d.await {
                Ok(Ok(Err(e))) if result.is_ok() => result = Err(e),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "a gRPC serving thread's runtime failed to start")
                }
                _ => {}
            }
        }
        result
    }
}

/// Gives `socket` to the next thread in turn that has room (a thread that is behind is
/// skipped, not waited for); waits for the next one only when every queue is full. A thread
/// whose server ended is dropped from the turn and the socket goes to another.
async fn hand_off(queues: &mut Vec<mpsc::Sender<Handoff>>, next: &mut usize, mut socket: Handoff) {
    'turn: while !queues.is_empty() {
        for k in 0..queues.len() {
            let i = (*next + k) % queues.len();
            match queues[i].try_send(socket) {
                Ok(()) => {
                    *next = (i + 1) % queues.len();
                    return;
                }
                Err(mpsc::error::TrySendError::Full(s)) => socket = s,
                Err(mpsc::error::TrySendError::Closed(s)) => {
                    socket = s;
                    queues.swap_remove(i);
                    *next = 0;
                    continue 'turn;
                }
            }
        }
        let i = *next % queues.len();
        match queues[i].send(socket).await {
            Ok(()) => {
                *next = (i + 1) % queues.len();
                return;
            }
            Err(mpsc::error::SendError(s)) => {
                socket = s;
                queues.swap_remove(i);
                *next = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hand_off_takes_turns_skips_a_full_thread_and_drops_an_ended_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let socket = || {
            (
                std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap(),
                OpenConnection::new(&open),
            )
        };
        let (tx0, mut rx0) = mpsc::channel(1);
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, rx2) = mpsc::channel(1);
        let mut queues = vec![tx0, tx1, tx2];
        let mut next = 0;
        hand_off(&mut queues, &mut next, socket()).await;
        hand_off(&mut queues, &mut next, socket()).await;
        assert!(
            rx0.try_recv().is_ok() && rx1.try_recv().is_ok(),
            "one each, in turn"
        );
        // Thread 2's server ended: its socket goes to another thread, and it leaves the turn.
        drop(rx2);
        hand_off(&mut queues, &mut next, socket()).await;
        assert_eq!(queues.len(), 2);
        assert!(rx0.try_recv().is_ok());
        // Thread 1, next in turn, is behind (its queue full): the socket goes to thread 0.
        assert_eq!(next, 1);
        queues[1].try_send(socket()).unwrap();
        hand_off(&mut queues, &mut next, socket()).await;
        assert!(rx0.try_recv().is_ok(), "the full thread was skipped");
        assert!(rx1.try_recv().is_ok() && rx1.try_recv().is_err());
    }

    /// The lane of each connection: the pool while no more are open than threads, then the
    /// threads in turn; once connections close, the pool takes new ones again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_few_connections_share_the_pool_and_more_are_pinned() {
        use crate::telemetry::ServiceMetrics;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = Incoming::new(
            listener,
            super::super::listen::Port::Grpc,
            Arc::new(ServiceMetrics::default()),
            Duration::from_secs(10),
        );
        let (lanes_tx, mut lanes) = mpsc::unbounded_channel::<(String, Guarded)>();
        let (stop_tx, stop) = watch::channel(false);
        let serve = move |mut conns: Handed, _stop: watch::Receiver<bool>| {
            let lanes_tx = lanes_tx.clone();
            async move {
                while let Some(Ok(c)) = conns.next().await {
                    let lane = std::thread::current().name().unwrap_or("").to_string();
                    let _ = lanes_tx.send((lane, c));
                }
                Ok(())
            }
        };
        let accept = tokio::spawn(super::serve(
            incoming,
            2,
            Duration::from_secs(10),
            stop,
            serve,
        ));
        let mut clients = Vec::new();
        let mut next_lane = async |clients: &mut Vec<std::net::TcpStream>| {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            lanes.recv().await.expect("a lane")
        };
        let (a, first) = next_lane(&mut clients).await;
        let (b, _second) = next_lane(&mut clients).await;
        let (c, third) = next_lane(&mut clients).await;
        let (d, fourth) = next_lane(&mut clients).await;
        assert!(
            !a.starts_with("grpc-") && !b.starts_with("grpc-"),
            "{a} {b}"
        );
        let mut pinned = [c, d];
        pinned.sort();
        assert_eq!(pinned, ["grpc-0", "grpc-1"]);
        // Back to two open (one in the pool): the next goes to the pool again.
        drop((first, third, fourth));
        let (e, _fifth) = next_lane(&mut clients).await;
        assert!(!e.starts_with("grpc-"), "{e}");
        stop_tx.send(true).unwrap();
        drop(clients);
        let _ = tokio::time::timeout(Duration::from_secs(5), accept).await;
    }
}
