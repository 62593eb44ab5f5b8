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
//! Owns: the serving threads and the round-robin hand-off. Must not touch: HTTP (tonic serves
//! each connection), decisions, and the background tasks, which stay on the main runtime.

use super::listen::{Guarded, Incoming};
use futures_util::StreamExt;
use std::future::Future;
use std::io;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

/// Connections accepted but not yet taken by their thread. A thread this far behind is
/// skipped; accept waits only when every thread is (nothing queues without bound).
const HANDOFF_QUEUE: usize = 64;

/// The accepted connections one serving thread gets, registered with its runtime as it polls.
pub type Handed = futures_util::stream::Map<
    ReceiverStream<std::net::TcpStream>,
    Box<dyn FnMut(std::net::TcpStream) -> io::Result<Guarded> + Send>,
>;

/// Serves `incoming` on `threads` single-threaded runtimes: `serve(connections, stop)` runs on
/// each (a tonic `Router::serve_with_incoming_shutdown`). The threads start here; the returned
/// accept loop ends when every thread's server has returned, after `stop` turned true; the
/// first error wins.
pub fn serve<F, Fut>(
    mut incoming: Incoming,
    threads: usize,
    handshake_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    serve: F,
) -> impl Future<Output = Result<(), tonic::transport::Error>> + Send
where
    F: Fn(Handed, watch::Receiver<bool>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = Result<(), tonic::transport::Error>>,
{
    let mut queues = Vec::with_capacity(threads);
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let (tx, rx) = mpsc::channel::<std::net::TcpStream>(HANDOFF_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        let serve = serve.clone();
        let stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("grpc-{i}"))
            .spawn(move || {
                let adopt: Box<dyn FnMut(std::net::TcpStream) -> io::Result<Guarded> + Send> =
                    Box::new(move |s| Guarded::adopt(s, handshake_timeout));
                let connections = ReceiverStream::new(rx).map(adopt);
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
            // Every queue full and then a stop: the threads no longer take connections, so
            // waiting on one would hold the shutdown until the drain bound.
            tokio::select! {
                () = hand_off(&mut queues, &mut next, socket) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        drop(queues);
        drop(incoming);
        let mut result = Ok(());
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
async fn hand_off(
    queues: &mut Vec<mpsc::Sender<std::net::TcpStream>>,
    next: &mut usize,
    mut socket: std::net::TcpStream,
) {
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
        let socket = || std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
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
}
