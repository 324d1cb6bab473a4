//! What a Reeve server lets in, the same for the REST bridge and the gRPC services: a
//! cap on open connections, a deadline for a request's headers, a deadline for an idle
//! connection, and the process's file-descriptor limit raised to what the system allows.
//!
//! A client that opens connections and never finishes its headers (or sends nothing at
//! all) must not be able to hold file descriptors until the process can no longer accept
//! its load balancer's health checks. So every accepted socket is wrapped in a
//! [`GuardedStream`] that fails its reads once a deadline passes:
//!
//! - **header deadline**: a request head must be complete [`Limits::header_timeout`]
//!   after the connection opened, or after its first byte arrived on an idle HTTP/1
//!   keep-alive connection (on HTTP/2, after the connection opened: later frames on an
//!   idle HTTP/2 connection are pings and window updates, not heads);
//! - **idle deadline**: a connection that has read and written nothing for
//!   [`Limits::idle_timeout`] is closed (longer than a load balancer's own idle timeout,
//!   so the balancer closes first and never sends on a connection we are closing).
//!
//! Over the cap, a new connection is closed at once (a balancer retries elsewhere)
//! rather than left in the kernel's backlog where health checks would hang.
//!
//! This module knows nothing of HTTP beyond telling an HTTP/2 preface from an HTTP/1
//! request line; it learns that a request head was complete from [`TrackRequests`], the
//! layer every server puts in front of its routes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once (lowered to a quarter of the descriptor limit).
    pub max_connections: usize,
    /// How long a client has to send a complete request head.
    pub header_timeout: Duration,
    /// How long a connection may stay without any byte read or written.
    pub idle_timeout: Duration,
}

impl Limits {
    /// The REST bridge, behind a load balancer: the idle timeout (75 s) is longer than
    /// the usual balancer idle timeouts (60 s), so the balancer closes idle connections
    /// first.
    pub const HTTP: Limits = Limits {
        max_connections: 10_000,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(75),
    };

    /// The gRPC services, called by the bridge and the gateway over long-lived HTTP/2
    /// connections: idle ones are kept five minutes, so pooled channels rarely reconnect.
    pub const GRPC: Limits = Limits {
        max_connections: 10_000,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
    };

    /// The cap actually applied: `max_connections`, but never more than a quarter of the
    /// descriptor limit (three servers and the database pools share one process under
    /// `reeve up`), and at least 64.
    pub fn effective_max_connections(&self) -> usize {
        let quarter = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| usize::try_from(soft / 4).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX);
        self.max_connections.min(quarter.max(64))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (once per process) and returns the
/// soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    static RAISED: OnceLock<Option<u64>> = OnceLock::new();
    *RAISED.get_or_init(|| match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(nofile = limit, "file descriptor limit");
            Some(limit)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot raise the file descriptor limit");
            None
        }
    })
}

/// What one connection has done, shared by its stream and its requests.
#[derive(Debug)]
pub struct Tracker {
    state: Mutex<ConnState>,
}

#[derive(Debug)]
struct ConnState {
    last_activity: Instant,
    /// When the head now awaited began (the connection's opening, or the first byte
    /// after an idle spell on HTTP/1); `None` while no head is awaited.
    head_started: Option<Instant>,
    in_flight: usize,
    /// Learnt from the first bytes: `Some(true)` for the HTTP/2 preface.
    http2: Option<bool>,
}

const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Tracker {
    fn new(now: Instant) -> Tracker {
        Tracker {
            state: Mutex::new(ConnState {
                last_activity: now,
                head_started: Some(now),
                in_flight: 0,
                http2: None,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut ConnState) -> T) -> T {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut state)
    }

    fn on_read(&self, bytes: &[u8]) {
        let now = Instant::now();
        self.with(|s| {
            s.last_activity = now;
            if s.http2.is_none() {
                let n = bytes.len().min(HTTP2_PREFACE.len());
                s.http2 = Some(bytes[..n] == HTTP2_PREFACE[..n]);
            }
            if s.in_flight == 0 && s.head_started.is_none() && s.http2 == Some(false) {
                s.head_started = Some(now);
            }
        });
    }

    fn on_write(&self) {
        let now = Instant::now();
        self.with(|s| s.last_activity = now);
    }

    /// When this connection must have done something, and what it failed to do.
    fn deadline(&self, limits: &Limits) -> (Instant, &'static str) {
        self.with(|s| {
            let idle = s.last_activity + limits.idle_timeout;
            match s.head_started {
                Some(started) if s.in_flight == 0 && started + limits.header_timeout < idle => {
                    (started + limits.header_timeout, "header_timeout")
                }
                _ => (idle, "idle_timeout"),
            }
        })
    }

    /// A request head was complete and its request is being served: until the returned
    /// guard is dropped, no header deadline applies.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.with(|s| {
            s.in_flight += 1;
            s.head_started = None;
        });
        RequestGuard(Arc::clone(self))
    }
}

/// Held while a request is served; see [`Tracker::request_started`].
#[derive(Debug)]
pub struct RequestGuard(Arc<Tracker>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        self.0.with(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.last_activity = now;
        });
    }
}

/// What servers learn of an accepted connection: its peer and its [`Tracker`]. tonic
/// puts it in each request's extensions; axum as `ConnectInfo<ConnInfo>`.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: SocketAddr,
    pub tracker: Arc<Tracker>,
}

/// Accepts connections within [`Limits`]; a `Stream` of connections for tonic and an
/// `axum::serve::Listener` for axum.
#[derive(Debug)]
pub struct GuardedListener {
    listener: TcpListener,
    limits: Limits,
    permits: Arc<Semaphore>,
    server: &'static str,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl GuardedListener {
    /// Guards `listener` with `limits`; `server` names it in metrics and logs.
    pub fn new(listener: TcpListener, limits: Limits, server: &'static str) -> GuardedListener {
        let max = limits.effective_max_connections();
        GuardedListener {
            listener,
            limits,
            permits: Arc::new(Semaphore::new(max)),
            server,
            backoff: None,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection within the cap. Connections over the cap are closed at once;
    /// accept errors are retried (after a pause when descriptors or memory run out).
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(GuardedStream, SocketAddr)> {
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                match backoff.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => self.backoff = None,
                }
            }
            let (stream, remote_addr) = match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(accepted)) => accepted,
                Poll::Ready(Err(error)) => {
                    if !is_connection_error(&error) {
                        tracing::warn!(server = self.server, %error, "accept failed; pausing");
                        self.backoff =
                            Some(Box::pin(tokio::time::sleep(Duration::from_millis(50))));
                    }
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                metrics::counter!("reeve_connections_refused_total", "server" => self.server)
                    .increment(1);
                tracing::debug!(server = self.server, "connection cap reached; closing");
                drop(stream);
                continue;
            };
            // Without TCP_NODELAY a reply waits ~40 ms for the peer's delayed ACK.
            let _ = stream.set_nodelay(true);
            metrics::gauge!("reeve_connections_open", "server" => self.server).increment(1.0);
            let now = Instant::now();
            let tracker = Arc::new(Tracker::new(now));
            let (deadline, _) = tracker.deadline(&self.limits);
            return Poll::Ready((
                GuardedStream {
                    stream,
                    remote_addr,
                    tracker,
                    limits: self.limits,
                    server: self.server,
                    timer: Box::pin(tokio::time::sleep_until(deadline)),
                    _permit: permit,
                },
                remote_addr,
            ));
        }
    }
}

/// Errors that concern one connection only (the peer gave up before we accepted).
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

impl tokio_stream::Stream for GuardedListener {
    type Item = io::Result<GuardedStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut()
            .poll_accept(cx)
            .map(|(stream, _)| Some(Ok(stream)))
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedStream, SocketAddr) {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> ConnInfo {
        stream.io().conn_info()
    }
}

/// An accepted connection whose reads fail once its header or idle deadline passes.
#[derive(Debug)]
pub struct GuardedStream {
    stream: TcpStream,
    remote_addr: SocketAddr,
    tracker: Arc<Tracker>,
    limits: Limits,
    server: &'static str,
    timer: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl GuardedStream {
    pub fn conn_info(&self) -> ConnInfo {
        ConnInfo {
            remote_addr: self.remote_addr,
            tracker: Arc::clone(&self.tracker),
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        metrics::gauge!("reeve_connections_open", "server" => self.server).decrement(1.0);
    }
}

impl tonic::transport::server::Connected for GuardedStream {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.conn_info()
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.tracker.on_read(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => loop {
                // Nothing to read: the connection is waiting on its peer, so its deadline
                // runs (re-read each time, since requests move it).
                let (deadline, reason) = this.tracker.deadline(&this.limits);
                if deadline <= Instant::now() {
                    metrics::counter!("reeve_connections_closed_total", "server" => this.server, "reason" => reason)
                        .increment(1);
                    tracing::debug!(server = this.server, reason, "closing a connection");
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, reason)));
                }
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                if this.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.tracker.on_write();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.tracker.on_write();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The layer that tells each connection's [`Tracker`] when a request head was complete
/// and when its response is ready. Requests from elsewhere (tests calling a router
/// directly) pass through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackRequests;

impl<S> tower::Layer<S> for TrackRequests {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Tracked<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Tracked<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions();
        let guard = extensions
            .get::<ConnInfo>()
            .or_else(|| {
                extensions
                    .get::<axum::extract::ConnectInfo<ConnInfo>>()
                    .map(|info| &info.0)
            })
            .map(|info| info.tracker.request_started());
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop(guard);
            response
        })
    }
}
