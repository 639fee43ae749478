//! The listeners: accept loops for HTTP (hyper, HTTP/1.1 and HTTP/2) and gRPC (tonic), over
//! TCP or TLS, with bounds a hostile client cannot exhaust. (axum's `serve` has no header
//! timeout, idle timeout or connection cap, which is why this is written here.)
//!
//! # Design constraints
//! - At most `connections_max` connections per listener: one more is closed as soon as it is
//!   accepted (and counted), so a flood of connections cannot take every file descriptor.
//! - A TLS handshake must finish within `header_read_timeout`; an HTTP/1 request's head must
//!   arrive within it — the first request's from the accept, a later one's from its first
//!   byte — so half a header (or none) is not held for longer; a connection with no request
//!   running and no bytes moving for `idle_timeout` is closed (HTTP/2 connections, which
//!   exchange frames between requests, only by this). Both are
//!   watched here, not by hyper's `header_read_timeout`: since hyper 1.6 that timer also runs
//!   while a keep-alive connection waits for its next request (hyperium/hyper#3828), which
//!   would close every pooled client connection idle for `header_read_timeout` (5 s), not
//!   `idle_timeout` (60 s).
//! - Graceful shutdown: stop accepting, let running requests finish (bounded), then close.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::tls::Tls;

/// What a request knows of its connection: the peer and, with mTLS, its certificate's SANs.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub sans: Option<Arc<[String]>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub connections_max: usize,
}

impl Bounds {
    pub fn from_config(c: &quiver_core::config::ServerConfig) -> Bounds {
        Bounds {
            header_read_timeout: c.header_read_timeout.0,
            idle_timeout: c.idle_timeout.0,
            connections_max: c.connections_max,
        }
    }
}

/// How long running requests get to finish once shutdown begins.
pub(crate) const DRAIN_MAX: Duration = Duration::from_secs(10);

/// How an HTTP/2 connection without TLS (prior knowledge) begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Milliseconds since `START`, plus one (so a stamp is never 0, which means "none").
fn now_ms() -> i64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64 + 1
}

/// One accepted connection: plain or TLS, holding its slot and stamping its activity.
pub struct Conn {
    io: Io,
    peer: Peer,
    state: Arc<ConnState>,
    _slot: OwnedSemaphorePermit,
}

/// What a connection's watchdog reads (times in [`now_ms`], never 0 once stamped).
#[derive(Default)]
struct ConnState {
    /// When bytes last moved, either way.
    activity: AtomicI64,
    /// Requests running on the connection (the watchdog never closes one mid-request).
    running: AtomicUsize,
    /// When the first byte of a request head arrived, while no request runs (for the first
    /// request: when the connection was accepted); 0: none pending.
    head_since: AtomicI64,
    /// Whether heads are timed: HTTP/1 (HTTP/2 sends frames between requests, not heads).
    timed_heads: AtomicBool,
    /// No byte read yet (the first read tells an HTTP/2 preface).
    fresh: AtomicBool,
}

impl ConnState {
    /// A connection just accepted (`http2`: TLS negotiated `h2`); its first head is due now.
    fn new(http2: bool) -> ConnState {
        let now = now_ms();
        let state = ConnState::default();
        state.activity.store(now, Ordering::Relaxed);
        state.fresh.store(true, Ordering::Relaxed);
        state.timed_heads.store(!http2, Ordering::Relaxed);
        state
            .head_since
            .store(if http2 { 0 } else { now }, Ordering::Relaxed);
        state
    }

    /// `bytes` were read: with no request running they start (or continue) a request head.
    fn read(&self, bytes: &[u8]) {
        let now = now_ms();
        self.activity.store(now, Ordering::Relaxed);
        if self.fresh.swap(false, Ordering::Relaxed) && bytes.starts_with(H2_PREFACE) {
            self.timed_heads.store(false, Ordering::Relaxed);
            self.head_since.store(0, Ordering::Release);
        }
        if self.timed_heads.load(Ordering::Relaxed) && self.running.load(Ordering::Acquire) == 0 {
            let _ = self
                .head_since
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Whether the watchdog should close the connection now: a head that took longer than
    /// `head_ms`, or nothing moving for `idle_ms`, with no request running.
    fn expired(&self, head_ms: i64, idle_ms: i64) -> bool {
        if self.running.load(Ordering::Acquire) > 0 {
            return false;
        }
        let now = now_ms();
        let head = self.head_since.load(Ordering::Acquire);
        (head != 0 && now - head >= head_ms)
            || now - self.activity.load(Ordering::Relaxed) >= idle_ms
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() > before {
            self.state.read(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, data),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        };
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.activity.store(now_ms(), Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Accepts TCP connections that get a slot; handshakes are done per connection, on its own
/// task, so one slow client never holds up accepting the next.
struct Acceptor {
    listener: TcpListener,
    tls: Option<Tls>,
    slots: Arc<Semaphore>,
}

/// A TCP connection with a slot, before its TLS handshake.
struct Accepted {
    tcp: TcpStream,
    addr: SocketAddr,
    slot: OwnedSemaphorePermit,
}

impl Acceptor {
    fn new(listener: TcpListener, tls: Option<Tls>, bounds: Bounds) -> Acceptor {
        Acceptor {
            listener,
            tls,
            slots: Arc::new(Semaphore::new(bounds.connections_max)),
        }
    }

    /// The next connection that gets a slot (others are closed at once).
    async fn accept(&self) -> Accepted {
        loop {
            let (tcp, addr) = match self.listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                metrics::counter!(quiver_core::telemetry::CONNECTIONS_REFUSED_TOTAL).increment(1);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            return Accepted { tcp, addr, slot };
        }
    }

    /// Finishes the TLS handshake in time, or gives up on the connection.
    async fn handshake(tls: Option<Tls>, bounds: Bounds, a: Accepted) -> Option<Conn> {
        let (io, sans, http2) = match tls {
            None => (Io::Plain(a.tcp), None, false),
            Some(tls) => {
                let done =
                    tokio::time::timeout(bounds.header_read_timeout, tls.acceptor.accept(a.tcp))
                        .await;
                let s = done.ok()?.ok()?;
                let sans = s
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::from(crate::tls::client_sans(c)));
                let http2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                (Io::Tls(Box::new(s)), sans, http2)
            }
        };
        Some(Conn {
            io,
            peer: Peer {
                addr: Some(a.addr),
                sans,
            },
            state: Arc::new(ConnState::new(http2)),
            _slot: a.slot,
        })
    }
}

/// gRPC's incoming connections, as tonic takes them.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Tls>,
    bounds: Bounds,
) -> impl tokio_stream::Stream<Item = std::io::Result<Conn>> {
    let acceptor = Acceptor::new(listener, tls, bounds);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = acceptor.accept().await;
            let (sender, tls) = (tx.clone(), acceptor.tls.clone());
            tokio::spawn(async move {
                if let Some(conn) = Acceptor::handshake(tls, bounds, accepted).await {
                    let _ = sender.send(Ok(conn)).await;
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: TcpListener,
    tls: Option<Tls>,
    bounds: Bounds,
    router: crate::direct::Surface,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = Acceptor::new(listener, tls, bounds);
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = acceptor.accept() => a,
            () = &mut shutdown => break,
        };
        let (tls, router, graceful) = (acceptor.tls.clone(), router.clone(), graceful.clone());
        tokio::spawn(async move {
            if let Some(conn) = Acceptor::handshake(tls, bounds, accepted).await {
                serve_connection(conn, router, bounds, &graceful).await;
            }
        });
    }
    let graceful = Arc::try_unwrap(graceful).ok();
    if let Some(g) = graceful {
        if tokio::time::timeout(DRAIN_MAX, g.shutdown()).await.is_err() {
            tracing::warn!(
                "requests still running after {DRAIN_MAX:?} of shutdown; closing their connections"
            );
        }
    }
    Ok(())
}

/// Serves one connection with hyper, closing it when idle too long.
async fn serve_connection(
    conn: Conn,
    router: crate::direct::Surface,
    bounds: Bounds,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    let state = conn.state.clone();
    let peer = conn.peer.clone();
    let counted = state.clone();
    let svc = tower::ServiceBuilder::new()
        .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            req
        })
        .layer(InFlightLayer(counted))
        .service(router);
    let svc = hyper_util::service::TowerToHyperService::new(svc);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None) // watched below (see the module's design constraints)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(conn), svc)
        .into_owned();
    let watched = graceful.watch(connection);
    tokio::pin!(watched);
    let head_ms = bounds.header_read_timeout.as_millis() as i64;
    let idle_ms = bounds.idle_timeout.as_millis() as i64;
    let every = bounds
        .idle_timeout
        .min(bounds.header_read_timeout)
        .min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = &mut watched => return,
            _ = tick.tick() => if state.expired(head_ms, idle_ms) {
                return; // dropping the connection closes it
            },
        }
    }
}

/// Counts a connection's running requests (the watchdog never closes one mid-request); a
/// request that starts or ends leaves no head pending.
#[derive(Clone)]
struct InFlightLayer(Arc<ConnState>);

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;
    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight {
            inner,
            running: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct InFlight<S> {
    inner: S,
    running: Arc<ConnState>,
}

impl<S, R> tower::Service<R> for InFlight<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let guard = Running::new(self.running.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let _guard = guard; // released when the request ends, or is dropped mid-way
            fut.await
        })
    }
}

/// One running request on a connection.
struct Running(Arc<ConnState>);

impl Running {
    fn new(state: Arc<ConnState>) -> Running {
        state.running.fetch_add(1, Ordering::AcqRel);
        state.head_since.store(0, Ordering::Release);
        Running(state)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.head_since.store(0, Ordering::Release);
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_head_or_a_quiet_connection_expires_only_with_no_request_running() {
        let (head_ms, idle_ms) = (1_000, 60_000);
        let head = b"GET / HTTP/1.1\r\n";
        let s = Arc::new(ConnState::new(false));
        let accepted = s.head_since.load(Ordering::Acquire);
        assert!(accepted > 0, "the first head is due from the accept");
        s.read(head);
        s.read(head);
        assert_eq!(
            s.head_since.load(Ordering::Acquire),
            accepted,
            "bytes do not reset it"
        );
        s.head_since
            .store(now_ms() - 2 * head_ms, Ordering::Release);
        assert!(s.expired(head_ms, idle_ms), "a head older than head_ms");

        let running = Running::new(s.clone());
        assert!(!s.expired(head_ms, idle_ms), "never mid-request");
        s.read(b"body");
        assert_eq!(
            s.head_since.load(Ordering::Acquire),
            0,
            "a body is not a head"
        );
        drop(running);
        assert!(
            !s.expired(head_ms, idle_ms),
            "kept alive, waiting for the next request"
        );
        s.read(head);
        assert!(
            s.head_since.load(Ordering::Acquire) > 0,
            "the next head's first byte"
        );
        s.head_since.store(0, Ordering::Release);
        s.activity.store(now_ms() - idle_ms, Ordering::Relaxed);
        assert!(s.expired(head_ms, idle_ms), "quiet for idle_ms");
    }

    /// HTTP/2 exchanges frames (settings, pings, window updates) between requests: those are
    /// not a slow head, so only the idle timeout applies.
    #[test]
    fn http2_connections_are_bound_by_the_idle_timeout_only() {
        let (head_ms, idle_ms) = (1_000, 60_000);
        for s in [ConnState::new(true), ConnState::new(false)] {
            s.read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            s.read(b"a ping frame");
            assert_eq!(s.head_since.load(Ordering::Acquire), 0);
            s.activity.store(now_ms() - idle_ms / 2, Ordering::Relaxed);
            assert!(!s.expired(head_ms, idle_ms));
            s.activity.store(now_ms() - idle_ms, Ordering::Relaxed);
            assert!(s.expired(head_ms, idle_ms));
        }
    }
}
