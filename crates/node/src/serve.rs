//! Serving a router on a listener, in the clear, over TLS, or over mutual TLS, with a
//! shutdown that drains: stop accepting, let open requests finish up to a grace period,
//! then close whatever is left. Connections are owned here, so nothing outlives the node.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use crisp_transport::{RegionIdentity, TlsStore};
use futures::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// A TLS handshake that takes longer than this is abandoned (a peer that connects and
/// hangs must not hold a task forever).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a listener allows its connections, so that clients which connect and then send
/// nothing, or too slowly, cannot hold the node's sockets and file descriptors.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Which listener, in logs and metrics.
    pub listener: &'static str,
    /// Connections served at once; further ones wait in the kernel's listen queue until
    /// one closes.
    pub max_connections: usize,
    /// Connections one address may hold at once; more are closed as they arrive.
    pub per_client: Option<usize>,
    /// How long a client may take to send a request head (and a kept-alive HTTP/1
    /// connection may wait for its next one).
    pub header_read_timeout: Duration,
    /// A connection that starts no request for this long is closed once its open
    /// requests are answered (HTTP/2: GOAWAY). `None`: never.
    pub idle_timeout: Option<Duration>,
}

impl ConnectionLimits {
    /// The client API's, from `[limits]`.
    pub fn client(limits: &crisp_catalog::Limits) -> ConnectionLimits {
        ConnectionLimits {
            listener: "client",
            max_connections: limits.max_connections,
            per_client: limits.max_connections_per_client,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: Some(limits.idle_timeout),
        }
    }

    /// The peer listener's: its callers are nodes that proved their identity in the
    /// handshake and keep their connections open between requests.
    pub fn peer() -> ConnectionLimits {
        ConnectionLimits {
            listener: "peer",
            max_connections: 4096,
            per_client: None,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: None,
        }
    }

    /// The admin listener's.
    pub fn admin() -> ConnectionLimits {
        ConnectionLimits {
            listener: "admin",
            max_connections: 256,
            per_client: None,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(120)),
        }
    }
}

/// How a listener protects its connections.
#[derive(Clone)]
pub enum Security {
    /// Only for the client API when the operator gives no certificate.
    Plain,
    /// TLS with a server certificate (the client API).
    Tls(Arc<ServerConfig>),
    /// Mutual TLS with the deployment CA (the peer listener). The peer's verified region
    /// identity is attached to every request as a [`PeerIdentity`] extension.
    Mutual(Arc<TlsStore>),
}

/// The region identity a peer proved in its TLS handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub RegionIdentity);

/// Single-threaded runtimes, each on a thread of its own, that accepted connections are
/// handed to in turn. A connection and everything its requests do (backend calls, audit
/// appends, timers) then stay on one thread: no wake-ups of other threads, no work
/// stealing, no shared I/O driver. The threads end when this is dropped.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: AtomicUsize,
    /// Dropping these ends the threads' runtimes.
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    /// `threads` runtimes named `{name}-{i}`. With `busy_poll`, each keeps polling its
    /// sockets for that long after its connections last read or wrote, instead of
    /// sleeping (see [`crisp_engine::event_loop::busy_poll`]).
    pub fn start(
        threads: usize,
        name: &str,
        busy_poll: Option<Duration>,
    ) -> std::io::Result<Workers> {
        let mut handles = Vec::with_capacity(threads);
        let mut stop = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            stop.push(tx);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    // Loop 0 is the shared runtime.
                    crisp_engine::event_loop::enter(i + 1);
                    runtime.block_on(async {
                        if let Some(window) = busy_poll {
                            tokio::spawn(crisp_engine::event_loop::busy_poll(window));
                        }
                        let _ = rx.await;
                    });
                })?;
        }
        Ok(Workers {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// The runtime for the next connection.
    fn next(&self) -> Option<&tokio::runtime::Handle> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.handles.get(i % self.handles.len().max(1))
    }
}

/// How long connections live on after the grace period, for the answers the node then
/// ends with an error (see [`crate::Node::cut_streams`]) to reach their clients.
const CUT_MARGIN: Duration = Duration::from_secs(1);

/// Serves `app` until `stop` turns true, then drains for at most `grace` (and
/// [`CUT_MARGIN`]). Each request
/// carries the peer's address as `ConnectInfo`. With `workers`, each connection is served
/// on one of their runtimes; otherwise on the caller's. At most `limits.max_connections`
/// are served at once: no more are accepted until one closes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    security: Security,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
    workers: Option<Arc<Workers>>,
    limits: ConnectionLimits,
) {
    let mut connections = JoinSet::new();
    let open = metrics::gauge!("crisp_open_connections", "listener" => limits.listener);
    let mut per_client = PerClient::new(limits);
    loop {
        open.set(connections.len() as f64);
        let room = connections.len() < limits.max_connections;
        if !room
            && FULL_LOG
                .admit(limits.listener, std::time::Instant::now())
                .is_some()
        {
            tracing::warn!(
                listener = limits.listener,
                max_connections = limits.max_connections,
                "connection limit reached; new connections wait until one closes (raise [limits] max_connections if these are real clients)"
            );
        }
        tokio::select! {
            accepted = listener.accept(), if room => {
                let (stream, remote) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !per_client.admit(remote.ip()) {
                    drop(stream);
                    continue;
                }
                if let Some(task) = Accepted::new(remote, &app, &security, &stop, limits)
                    .start(stream, workers.as_deref(), &mut connections)
                {
                    per_client.opened(task, remote.ip());
                }
            }
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                per_client.closed(ended.map_or_else(|e| e.id(), |(id, ())| id));
            }
            () = stopped(&mut stop) => break,
        }
    }
    // Connections the kernel has already queued would be reset with the listener: serve
    // them too (a reloaded node's replacement takes the new ones on the same port).
    while let Some(Ok((stream, remote))) = listener.accept().now_or_never() {
        let _ = Accepted::new(remote, &app, &security, &stop, limits).start(
            stream,
            workers.as_deref(),
            &mut connections,
        );
    }
    drop(listener);
    let drained = tokio::time::timeout(grace + CUT_MARGIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            left = connections.len(),
            "grace period over; closing connections"
        );
    }
    connections.abort_all();
    open.set(0.0);
}

/// The connections each client address holds, where a listener limits them.
struct PerClient {
    limits: ConnectionLimits,
    open: HashMap<IpAddr, usize>,
    tasks: HashMap<tokio::task::Id, IpAddr>,
}

impl PerClient {
    fn new(limits: ConnectionLimits) -> PerClient {
        PerClient {
            limits,
            open: HashMap::new(),
            tasks: HashMap::new(),
        }
    }

    /// Whether `ip` may open one more connection; a refusal is counted and logged.
    fn admit(&self, ip: IpAddr) -> bool {
        let Some(max) = self.limits.per_client else {
            return true;
        };
        if self.open.get(&ip).copied().unwrap_or(0) < max {
            return true;
        }
        metrics::counter!("crisp_connections_refused_total", "listener" => self.limits.listener, "reason" => "per_client")
            .increment(1);
        if let Some(also) = PER_CLIENT_LOG.admit(self.limits.listener, std::time::Instant::now()) {
            tracing::warn!(
                listener = self.limits.listener,
                client = %ip,
                max_connections_per_client = max,
                similar_not_logged = also,
                "a client reached its connection limit; its new connections are closed (raise [limits] max_connections_per_client, or remove it behind a load balancer)"
            );
        }
        false
    }

    fn opened(&mut self, task: tokio::task::Id, ip: IpAddr) {
        if self.limits.per_client.is_some() {
            *self.open.entry(ip).or_default() += 1;
            self.tasks.insert(task, ip);
        }
    }

    fn closed(&mut self, task: tokio::task::Id) {
        let Some(ip) = self.tasks.remove(&task) else {
            return;
        };
        if let Some(n) = self.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&ip);
            }
        }
    }
}

/// "A client reached its connection limit" logged at most once a minute per listener.
static PER_CLIENT_LOG: crate::observe::LogThrottle =
    crate::observe::LogThrottle::new(Duration::from_secs(60));

/// "Connection limit reached" logged at most once a minute per listener.
static FULL_LOG: crate::observe::LogThrottle =
    crate::observe::LogThrottle::new(Duration::from_secs(60));

/// How long a connection may take, once the node stops, to send its next request (or its
/// first, if it was accepted just before), which is then answered before the connection
/// is closed: closing it while the client may be sending would reset that request.
const NEXT_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Tells a stopping connection's driver when a request arrives.
#[derive(Default)]
struct Heard {
    /// Set once the node stops; until then requests notify nobody.
    watching: std::sync::atomic::AtomicBool,
    request: tokio::sync::Notify,
    /// Request heads parsed on the connection, for the idle timeout.
    started: AtomicUsize,
}

/// What every request of a connection carries: the client's address and, on the peer
/// listener, the peer's verified identity.
#[derive(Clone)]
struct Stamp {
    remote: SocketAddr,
    peer: Option<PeerIdentity>,
}

/// Serves `stream` with `app` until the connection ends. Once `stop` turns true, the
/// connection is given [`NEXT_REQUEST_WAIT`] to send a request (an idle keep-alive
/// client, or one accepted just before, may be sending one right then), answers the one
/// it is on or receives (with `connection: close`), and closes (HTTP/2: GOAWAY).
async fn drive<S: Io>(
    stream: S,
    app: Router,
    stamp: Stamp,
    mut stop: watch::Receiver<bool>,
    limits: ConnectionLimits,
) {
    let heard = Arc::new(Heard::default());
    let seen = heard.clone();
    // Wrapping the router's service, not its routes: nothing is rebuilt per connection.
    let service =
        tower::util::MapRequest::new(app, move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(stamp.remote));
            if let Some(peer) = &stamp.peer {
                req.extensions_mut().insert(peer.clone());
            }
            seen.started.fetch_add(1, Ordering::Relaxed);
            // Its head is parsed: a graceful close now answers it first.
            if seen.watching.load(Ordering::Relaxed) {
                seen.request.notify_waiters();
            }
            req
        });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that does not finish its request head in time is let go, so connections
    // that never send one cannot hold the node's sockets and file descriptors.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
        .into_owned();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = idle(&heard, limits.idle_timeout) => {
            GracefulConnection::graceful_shutdown(conn.as_mut());
            let _ = conn.await;
            return;
        }
        () = stopped(&mut stop) => {}
    }
    // Requests arrive only while the connection is polled here: none is missed.
    let next = heard.request.notified();
    let mut next = std::pin::pin!(next);
    next.as_mut().enable();
    heard.watching.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = next.as_mut() => {}
        () = tokio::time::sleep(NEXT_REQUEST_WAIT) => {}
    }
    GracefulConnection::graceful_shutdown(conn.as_mut());
    let _ = conn.await;
}

/// Returns once a whole `timeout` passes in which the connection starts no request (so
/// after between one and two of them without a new request); never without a timeout.
/// One timer per period, none per request.
async fn idle(heard: &Heard, timeout: Option<Duration>) {
    let Some(period) = timeout else {
        return std::future::pending().await;
    };
    let mut seen = heard.started.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(period).await;
        let now = heard.started.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// What serving one accepted connection needs.
struct Accepted {
    remote: SocketAddr,
    app: Router,
    security: Security,
    stop: watch::Receiver<bool>,
    limits: ConnectionLimits,
}

impl Accepted {
    fn new(
        remote: SocketAddr,
        app: &Router,
        security: &Security,
        stop: &watch::Receiver<bool>,
        limits: ConnectionLimits,
    ) -> Accepted {
        Accepted {
            remote,
            app: app.clone(),
            security: security.clone(),
            stop: stop.clone(),
            limits,
        }
    }

    /// Serves the connection on the next of `workers`, or on the caller's runtime.
    /// Returns the connection's task, if it started.
    fn start(
        self,
        stream: TcpStream,
        workers: Option<&Workers>,
        tasks: &mut JoinSet<()>,
    ) -> Option<tokio::task::Id> {
        let _ = stream.set_nodelay(true);
        match workers.and_then(Workers::next) {
            Some(runtime) => self.spawn_on(tasks, stream, runtime),
            None => Some(tasks.spawn(self.serve(stream)).id()),
        }
    }

    async fn serve<S: Io>(self, stream: S) {
        connection(stream, self).await;
    }

    /// Serves the connection on `runtime`, whose I/O driver the socket moves to.
    fn spawn_on(
        self,
        tasks: &mut JoinSet<()>,
        stream: TcpStream,
        runtime: &tokio::runtime::Handle,
    ) -> Option<tokio::task::Id> {
        let remote = self.remote;
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "cannot hand the connection to a client thread");
                return None;
            }
        };
        let task = tasks.spawn_on(
            async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => self.serve(Touching(stream)).await,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "cannot serve the connection");
                    }
                }
            },
            runtime,
        );
        Some(task.id())
    }
}

/// What a client connection is served over.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for S {}

/// A connection of a dedicated loop that tells the loop when it reads or writes (see
/// [`crisp_engine::event_loop::busy_poll`]).
struct Touching<S>(S);

/// Passes a poll's result on, telling the loop when the connection did read or write.
fn touched<T>(r: std::task::Poll<T>) -> std::task::Poll<T> {
    if r.is_ready() {
        crisp_engine::event_loop::touch();
    }
    r
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touching<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        touched(std::pin::Pin::new(&mut self.0).poll_read(cx, buf))
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touching<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        touched(std::pin::Pin::new(&mut self.0).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        touched(std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn connection<S: Io>(stream: S, accepted: Accepted) {
    let Accepted {
        remote,
        app,
        security,
        stop,
        limits,
    } = accepted;
    let stamp = Stamp { remote, peer: None };
    match security {
        Security::Plain => drive(stream, app, stamp, stop, limits).await,
        Security::Tls(config) => {
            let Some(tls) = handshake(TlsAcceptor::from(config), stream, remote, "client").await
            else {
                return;
            };
            drive(tls, app, stamp, stop, limits).await;
        }
        Security::Mutual(store) => {
            let acceptor = TlsAcceptor::from(store.current().server.clone());
            let Some(tls) = handshake(acceptor, stream, remote, "peer").await else {
                return;
            };
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| RegionIdentity::from_cert_der(c));
            let Some(identity) = identity else {
                // The CA issued a certificate without a region identity: not a crisp node.
                tracing::warn!(%remote, "peer certificate carries no region identity; closing");
                metrics::counter!("crisp_backbone_handshake_failures_total", "reason" => "no_identity")
                    .increment(1);
                return;
            };
            let stamp = Stamp {
                peer: Some(PeerIdentity(identity)),
                ..stamp
            };
            drive(tls, app, stamp, stop, limits).await;
        }
    }
}

async fn handshake<S: Io>(
    acceptor: TlsAcceptor,
    stream: S,
    remote: SocketAddr,
    side: &'static str,
) -> Option<tokio_rustls::server::TlsStream<S>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            let reason = classify(&e);
            // A peer with a wrong certificate retries every second: one line per reason
            // and second, with the count of those held back.
            if let Some(held) = HANDSHAKE_LOG.admit(reason, std::time::Instant::now()) {
                tracing::warn!(%remote, side, reason, error = %e, similar_refusals_not_logged = held, "TLS handshake refused");
            }
            metrics::counter!("crisp_backbone_handshake_failures_total", "reason" => reason)
                .increment(1);
            None
        }
        Err(_) => {
            tracing::warn!(%remote, side, "TLS handshake timed out");
            metrics::counter!("crisp_backbone_handshake_failures_total", "reason" => "timeout")
                .increment(1);
            None
        }
    }
}

/// Refused handshakes logged, at most one line a second per reason.
static HANDSHAKE_LOG: crate::observe::LogThrottle =
    crate::observe::LogThrottle::new(Duration::from_secs(1));

/// A bounded label for why a handshake failed.
fn classify(e: &std::io::Error) -> &'static str {
    let text = e.to_string().to_lowercase();
    if text.contains("expired") || text.contains("notvalidyet") || text.contains("not valid yet") {
        "certificate_time"
    } else if text.contains("unknownissuer")
        || text.contains("unknown issuer")
        || text.contains("unknownca")
        || text.contains("badcertificate")
        || text.contains("certificate")
        // A peer that cannot verify this node's certificate (another CA) aborts the
        // handshake with this alert.
        || text.contains("decrypterror")
        || text.contains("decrypt error")
    {
        "certificate"
    } else if text.contains("corrupt message") || text.contains("invalid") {
        "not_tls"
    } else {
        "other"
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One request on a fresh connection; the answer names the thread that served it.
    async fn served_by(addr: SocketAddr) -> String {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer.rsplit("\r\n\r\n").next().unwrap().to_owned()
    }

    #[tokio::test]
    async fn connections_are_spread_over_the_worker_threads_and_stay_on_them() {
        spread_and_stay(None).await;
    }

    #[tokio::test]
    async fn busy_polling_worker_threads_serve_the_same() {
        spread_and_stay(Some(Duration::from_micros(100))).await;
    }

    async fn spread_and_stay(busy_poll: Option<Duration>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::get(|| async {
                // Whatever the request awaits wakes it on the same thread.
                let before = std::thread::current().name().unwrap_or("?").to_owned();
                tokio::task::yield_now().await;
                let after = std::thread::current().name().unwrap_or("?").to_owned();
                format!("{before} {after}")
            }),
        );
        let workers = Arc::new(Workers::start(2, "test-client", busy_poll).unwrap());
        let (stop, rx) = watch::channel(false);
        let server = tokio::spawn(serve(
            listener,
            app,
            Security::Plain,
            rx,
            Duration::from_secs(1),
            Some(workers),
            ConnectionLimits::client(&crisp_catalog::Limits::default()),
        ));
        let mut threads = BTreeSet::new();
        for _ in 0..4 {
            let answer = served_by(addr).await;
            let (before, after) = answer.split_once(' ').unwrap();
            assert_eq!(before, after, "a request moved threads: {answer}");
            threads.insert(before.to_owned());
        }
        assert_eq!(
            threads,
            BTreeSet::from(["test-client-0".to_owned(), "test-client-1".to_owned()])
        );
        stop.send(true).unwrap();
        server.await.unwrap();
    }

    /// Serves a router that answers `GET /` with "ok" under `limits`, until the sender
    /// returned is dropped or set.
    async fn limited(limits: ConnectionLimits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, rx) = watch::channel(false);
        tokio::spawn(serve(
            listener,
            app,
            Security::Plain,
            rx,
            Duration::from_secs(1),
            None,
            limits,
        ));
        (addr, stop)
    }

    fn limits(max_connections: usize, header: u64, idle: u64) -> ConnectionLimits {
        ConnectionLimits {
            listener: "test",
            max_connections,
            per_client: None,
            header_read_timeout: Duration::from_millis(header),
            idle_timeout: Some(Duration::from_millis(idle)),
        }
    }

    /// Reads until the server closes; the bytes read.
    async fn until_closed(conn: &mut TcpStream) -> Vec<u8> {
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut all))
            .await
            .expect("the server did not close the connection")
            .unwrap();
        all
    }

    #[tokio::test]
    async fn a_connection_that_does_not_finish_its_request_head_is_closed() {
        let (addr, _stop) = limited(limits(100, 300, 60_000)).await;
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let answer = until_closed(&mut half).await;
        assert!(started.elapsed() >= Duration::from_millis(250));
        // hyper answers a head that timed out with 408 or not at all.
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
        // A client that sends its head in time is answered.
        let mut whole = TcpStream::connect(addr).await.unwrap();
        whole
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let text = String::from_utf8(until_closed(&mut whole).await).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_until_one_closes() {
        let (addr, _stop) = limited(limits(2, 60_000, 60_000)).await;
        // Two connections that send nothing hold both places.
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
        assert!(
            early.is_err(),
            "a third connection was served beyond the limit of 2"
        );
        drop(first);
        let text = String::from_utf8(until_closed(&mut third).await).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    }

    /// A request on a new connection from `from`: the answer, or `None` when the
    /// connection was closed unanswered.
    async fn ask_from(from: &str, addr: SocketAddr) -> Option<String> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut conn = socket.connect(addr).await.unwrap();
        // A closed connection may refuse the write or the read: both say "not served".
        conn.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut all))
            .await
            .expect("no answer and no close")
            .ok()?;
        (!all.is_empty()).then(|| String::from_utf8_lossy(&all).into_owned())
    }

    #[tokio::test]
    async fn a_client_address_beyond_its_connection_limit_is_closed_and_others_are_served() {
        let limits = ConnectionLimits {
            per_client: Some(2),
            ..limits(100, 60_000, 60_000)
        };
        let (addr, _stop) = limited(limits).await;
        // 127.0.0.1 holds its two places with connections that send nothing.
        let first = TcpStream::connect(addr).await.unwrap();
        let _second = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ask_from("127.0.0.1", addr).await, None);
        // Another address is served as usual.
        let other = ask_from("127.0.0.2", addr).await.unwrap();
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
        // Once one of its connections closes, 127.0.0.1 has a place again.
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = ask_from("127.0.0.1", addr).await.unwrap();
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    }

    #[tokio::test]
    async fn an_http2_connection_that_starts_no_request_is_closed() {
        let (addr, _stop) = limited(limits(100, 60_000, 300)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        let request = http::Request::get(format!("http://{addr}/"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = send.send_request(request).await.unwrap();
        assert_eq!(answer.status(), 200);
        drop(answer);
        let started = std::time::Instant::now();
        // The server ends the connection (GOAWAY) once it has been idle for 300-600 ms.
        tokio::time::timeout(Duration::from_secs(10), conn)
            .await
            .expect("the idle HTTP/2 connection was not closed")
            .unwrap()
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
    }
}
