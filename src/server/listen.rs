//! Listening sockets and the connections they accept, for both ports.
//!
//! Owns: binding with a deep backlog, an accept loop that survives running out of file
//! descriptors (back off, log rate-limited, count — never spin), and the handshake deadline
//! every accepted connection starts with. Must not touch: HTTP; hyper and tonic take the
//! streams from here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Sleep;

use crate::telemetry::ServiceMetrics;

/// Connections the kernel queues for us before we accept them. The default of 128 (what
/// `TcpListener::bind` asks for) drops SYNs under a reconnect storm of a few hundred Envoys.
pub const BACKLOG: u32 = 1024;

/// Bytes a client must send before its connection leaves the handshake deadline: the
/// HTTP/2 connection preface is exactly 24, and any HTTP/1 request head is longer.
const HANDSHAKE_BYTES: usize = 24;

/// First pause after a failed accept; doubles up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per port this often; the lines in between are counted.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Binds `addr` with `SO_REUSEADDR` (as `TcpListener::bind` does) and a backlog of `backlog`.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Which listener: the metric label and the log field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Grpc,
    Admin,
}

impl Port {
    pub fn label(self) -> &'static str {
        match self {
            Port::Grpc => "grpc",
            Port::Admin => "admin",
        }
    }
}

/// Accepted connections of one listener, as a stream that never yields an error and never
/// busy-loops: on an accept failure (out of file descriptors, out of memory) it counts the
/// error, logs at most every few seconds, and sleeps 50 ms doubling to 1 s before trying
/// again. A peer that resets before we accept it (`ECONNABORTED`) is retried at once.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    port: Port,
    metrics: Arc<ServiceMetrics>,
    handshake_timeout: Duration,
    backoff: Duration,
    pause: Option<Pin<Box<Sleep>>>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Incoming {
    pub fn new(
        listener: TcpListener,
        port: Port,
        metrics: Arc<ServiceMetrics>,
        handshake_timeout: Duration,
    ) -> Incoming {
        Incoming {
            listener,
            port,
            metrics,
            handshake_timeout,
            backoff: MIN_BACKOFF,
            pause: None,
            last_log: None,
            unlogged: 0,
        }
    }

    fn counter(&self) -> &AtomicU64 {
        match self.port {
            Port::Grpc => &self.metrics.accept_errors_grpc,
            Port::Admin => &self.metrics.accept_errors_admin,
        }
    }

    fn failed(&mut self, e: &io::Error) {
        self.counter().fetch_add(1, Relaxed);
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                port = self.port.label(),
                error = %e,
                retry_in_ms = self.backoff.as_millis() as u64,
                suppressed = self.unlogged,
                "accepting a connection failed (out of file descriptors? see RLIMIT_NOFILE); backing off"
            );
            self.last_log = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Errors that are about one peer, not about us: retry at once.
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

impl futures_util::Stream for Incoming {
    type Item = io::Result<Guarded>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _)) => {
                    self.backoff = MIN_BACKOFF;
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(Some(Ok(Guarded::new(stream, self.handshake_timeout))));
                }
                Err(e) if is_peer_error(&e) => continue,
                Err(e) => self.failed(&e),
            }
        }
    }
}

/// An accepted TCP stream that fails its reads once `handshake_timeout` has passed since
/// accept without the peer having sent the first 24 bytes (an HTTP/2 preface or an HTTP/1
/// request head). hyper has no HTTP/2 handshake timeout, and a raw TCP connection that never
/// speaks would otherwise be held — through a graceful shutdown too — until the peer leaves.
/// After the handshake, hyper's own timers (HTTP/2 keepalive pings, HTTP/1 header read
/// timeout) take over.
#[derive(Debug)]
pub struct Guarded {
    inner: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
    received: usize,
    /// Counts this connection among a layout's open ones while it lives.
    _open: Option<OpenConnection>,
}

impl Guarded {
    fn new(inner: TcpStream, handshake_timeout: Duration) -> Guarded {
        Guarded {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            received: 0,
            _open: None,
        }
    }
}

/// One open connection in a shared count: +1 when made, −1 when dropped (with its
/// connection, or unserved in a hand-off queue).
#[derive(Debug)]
pub struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    pub fn new(count: &Arc<AtomicUsize>) -> OpenConnection {
        count.fetch_add(1, Relaxed);
        OpenConnection(Arc::clone(count))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Guarded {
    /// The socket, taken off this runtime's reactor so another runtime can serve it (the
    /// per-core layout accepts on one runtime and serves on others). The handshake deadline
    /// restarts where it is adopted.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        self.inner.into_std()
    }

    /// A socket handed over by another runtime's accept loop, registered with the current
    /// runtime's reactor. Must be called inside the runtime that will serve it.
    pub fn adopt(
        socket: std::net::TcpStream,
        handshake_timeout: Duration,
        open: OpenConnection,
    ) -> io::Result<Guarded> {
        let mut g = Guarded::new(TcpStream::from_std(socket)?, handshake_timeout);
        g._open = Some(open);
        Ok(g)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.deadline.is_none() {
            return polled;
        }
        if let Poll::Ready(Ok(())) = polled {
            self.received += buf.filled().len() - before;
            if self.received >= HANDSHAKE_BYTES || buf.filled().len() == before {
                // Handshake bytes in, or EOF (hyper closes on that by itself).
                self.deadline = None;
            }
            return polled;
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP request or HTTP/2 preface within the handshake timeout",
            )));
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::AsyncReadExt;
    use tokio::io::AsyncWriteExt;

    /// With 1024 queued, 600 clients connect to a listener that accepts none of them; with
    /// the old backlog of 128 the rest wait for a SYN retransmit (≥ 1 s) and time out here.
    #[tokio::test]
    async fn backlog_queues_hundreds_of_unaccepted_connections() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), BACKLOG).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects = (0..600)
            .map(|_| tokio::time::timeout(Duration::from_millis(800), TcpStream::connect(addr)));
        let results = futures_util::future::join_all(connects).await;
        let ok = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
        assert_eq!(ok, 600, "connections completed without an accept");
    }

    #[tokio::test]
    async fn a_silent_connection_fails_its_read_at_the_handshake_deadline() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), BACKLOG).unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(ServiceMetrics::default());
        let mut incoming = Incoming::new(listener, Port::Grpc, metrics, Duration::from_millis(200));
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        let err = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the deadline ends the read")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);

        // A client that sends its 24 bytes in time is past the deadline for good.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        talker
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut got = 0;
        while got < 24 {
            got += conn.read(&mut buf).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        talker.write_all(b"x").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
    }
}
