//! HTTP/1.1 to a plain-HTTP backend (`http://`, the usual way to reach a model server
//! inside a region), with keep-alive connections that are driven by the request using
//! them.
//!
//! A general-purpose client runs each connection in a task of its own and hands the
//! request, the response head and every body chunk across channels between that task and
//! the caller. Here the caller polls its connection itself while it waits for the head and
//! reads the body, so an answer costs no task hand-offs; the connection goes back to the
//! pool once its answer has been read to the end, and is closed if the answer is dropped
//! half-read (which is how the backend learns that the client went away).
//!
//! Idle connections are kept per event loop ([`crate::event_loop`]): a socket belongs to
//! the runtime that opened it, and on a node serving clients from dedicated
//! single-threaded runtimes, a connection taken up by another one would cost a
//! cross-thread wake-up at every step of every answer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::event_loop::PerLoop;

type Connection = http1::Connection<TokioIo<TcpStream>, Full<Bytes>>;

/// One keep-alive connection: the handle to send on and the connection state machine,
/// which makes progress only while someone polls it.
struct Conn {
    send: http1::SendRequest<Full<Bytes>>,
    /// `None` once the connection has closed.
    conn: Option<Pin<Box<Connection>>>,
}

impl Conn {
    /// Lets the connection read and write what it can; `false` once it has closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(c) = self.conn.as_mut()
            && let Poll::Ready(result) = c.as_mut().poll(cx)
        {
            if let Err(e) = result {
                tracing::debug!(error = %e, "backend connection ended");
            }
            // Dropping it fails whatever was queued on it, returning unsent requests.
            self.conn = None;
        }
        self.conn.is_some()
    }

    /// Drives the connection until it can take a request; `false` if it has closed.
    async fn ready(&mut self) -> bool {
        futures::future::poll_fn(|cx| {
            if !self.drive(cx) {
                return Poll::Ready(false);
            }
            self.send.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }
}

/// Idle connections to one `host:port`.
pub(crate) struct Pool {
    /// `host:port`, for connecting.
    authority: String,
    /// The same, as every request's `Host` header.
    host: http::HeaderValue,
    /// The URL's path and query, what a request names (parsed once, cloned per request).
    path: Uri,
    connect_timeout: Duration,
    max_idle: usize,
    /// How long a connection may sit idle before it is closed rather than reused.
    idle_limit: Duration,
    idle: PerLoop<Idle>,
}

/// One event loop's idle connections, most recently used first, with when each became idle.
type Idle = VecDeque<(Instant, Conn)>;

/// Idle connections older than this are closed instead of reused: servers close theirs
/// after a keep-alive timeout (uvicorn, which vLLM and SGLang use, after 5 s), and a
/// request written just as the server closes would fail.
const IDLE_LIMIT: Duration = Duration::from_secs(4);

/// A failure before the backend answered.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made (refused, unreachable, timed out).
    Connect(String),
    /// The connection broke before an answer arrived.
    Io(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "cannot connect: {e}"),
            SendError::Io(e) => write!(f, "connection failed: {e}"),
        }
    }
}

impl Pool {
    /// For an `http://host:port/...` URL; `None` for other schemes.
    pub(crate) fn for_url(url: &str, connect_timeout: Duration, max_idle: usize) -> Option<Pool> {
        let uri: Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let host = uri.host()?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = format!("{host}:{port}");
        Some(Pool {
            host: http::HeaderValue::from_str(&authority).ok()?,
            authority,
            path: uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()
                .ok()?,
            connect_timeout,
            max_idle: max_idle.max(1),
            idle_limit: IDLE_LIMIT,
            idle: PerLoop::default(),
        })
    }

    /// A POST of `body` to the URL, with its `Host`; headers and URI built without
    /// parsing or copying.
    pub(crate) fn post<B>(&self, body: B) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.path.clone();
        req.headers_mut()
            .insert(http::header::HOST, self.host.clone());
        req
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle
            .with(VecDeque::new, |idle| {
                let (since, conn) = idle.pop_front()?;
                if since.elapsed() < self.idle_limit {
                    return Some(conn);
                }
                // This was the most recently used one: all the others are older still.
                idle.clear();
                None
            })
            .flatten()
    }

    fn put_back(&self, conn: Conn) {
        self.idle.with(VecDeque::new, |idle| {
            if idle.len() < self.max_idle {
                // Most recently used first: it is the least likely to have been closed.
                idle.push_front((Instant::now(), conn));
            }
        });
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| {
                SendError::Connect(format!("no connection within {:?}", self.connect_timeout))
            })?
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        Ok(Conn {
            send,
            conn: Some(Box::pin(conn)),
        })
    }

    /// Sends `req` on an idle connection (or a new one) and returns the response head with
    /// its body, which keeps the connection until it has been read to the end. A request
    /// that an idle connection could not take (it had been closed) is sent again on a new
    /// one; one that was written is never sent twice.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Answer), SendError> {
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            if !conn.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Io("the backend closed the connection".into()));
            }
            let mut sending = std::pin::pin!(conn.send.try_send_request(req));
            // The connection writes the request and reads the head only when polled.
            let result = futures::future::poll_fn(|cx| {
                conn.drive(cx);
                sending.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let answer = Answer {
                        conn: Some(conn),
                        body,
                        pool: self.clone(),
                        done: false,
                    };
                    return Ok((parts.status, parts.headers, answer));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on a fresh connection.
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Io(e.into_error().to_string())),
                },
            }
        }
    }
}

/// A response body that owns the connection it arrives on.
pub(crate) struct Answer {
    conn: Option<Conn>,
    body: Incoming,
    pool: Arc<Pool>,
    done: bool,
}

impl Stream for Answer {
    type Item = Result<Bytes, String>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(c) = this.conn.as_mut()
            && !c.drive(cx)
        {
            // Closed: whatever the body already holds is still read below.
            this.conn = None;
        }
        loop {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.to_string())));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    if let Some(conn) = this.conn.take() {
                        this.pool.put_back(conn);
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for Answer {
    /// An answer dropped before its end keeps its connection only if the rest of the body
    /// is already here (the usual case after an SSE `[DONE]`: only the end of the chunked
    /// body or nothing is left). Otherwise the connection is closed, which tells the
    /// backend to stop generating.
    fn drop(&mut self) {
        if self.done || self.conn.is_none() {
            return;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Some(c) = self.conn.as_mut()
            && !c.drive(&mut cx)
        {
            return;
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(&mut cx) {
                // Already received, not wanted: read past it.
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(None) => {
                    if let Some(conn) = self.conn.take() {
                        self.pool.put_back(conn);
                    }
                    return;
                }
                Poll::Pending | Poll::Ready(Some(Err(_))) => return,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server answering every request on a connection with a tiny fixed body; counts
    /// the connections it accepted.
    async fn server() -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    // Each request here fits one read and has no body.
                    while sock.read(&mut buf).await.unwrap_or(0) > 0 {
                        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if sock.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    async fn get(pool: &Arc<Pool>) {
        let req = pool.post(Full::new(Bytes::new()));
        let (status, _, mut answer) = pool.send(req).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        while answer.next().await.is_some() {}
    }

    #[tokio::test]
    async fn idle_connections_are_reused_until_they_are_too_old() {
        let (port, accepted) = server().await;
        let mut pool = Pool::for_url(
            &format!("http://127.0.0.1:{port}/v1/x"),
            Duration::from_secs(1),
            4,
        )
        .unwrap();
        pool.idle_limit = Duration::from_millis(100);
        let pool = Arc::new(pool);
        get(&pool).await;
        get(&pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused while fresh");
        tokio::time::sleep(Duration::from_millis(150)).await;
        get(&pool).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new one once too old");
    }

    /// Makes `gets` requests from a thread of its own with a single-threaded runtime, in
    /// event loop `id` (the shared loop 0 when `None`).
    fn on_thread(id: Option<usize>, pool: &Arc<Pool>, gets: usize) {
        let pool = pool.clone();
        std::thread::spawn(move || {
            if let Some(id) = id {
                crate::event_loop::enter(id);
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for _ in 0..gets {
                    get(&pool).await;
                }
            });
        })
        .join()
        .unwrap();
    }

    // The server runs on the runtime's workers while this thread waits for the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_connections_are_kept_per_event_loop() {
        let (port, accepted) = server().await;
        let pool = Arc::new(
            Pool::for_url(
                &format!("http://127.0.0.1:{port}/v1/x"),
                Duration::from_secs(1),
                4,
            )
            .unwrap(),
        );
        get(&pool).await;
        on_thread(Some(1), &pool, 2);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "event loop 1 opened one of its own and reused it"
        );
        on_thread(None, &pool, 1);
        get(&pool).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "threads of the shared loop share its idle connection"
        );
    }

    #[test]
    fn only_plain_http_urls_get_a_pool() {
        let d = Duration::from_secs(1);
        let p = Pool::for_url("http://10.0.0.5:8000/v1/chat/completions", d, 1).unwrap();
        let req = p.post(());
        assert_eq!(req.method(), http::Method::POST);
        assert_eq!(req.uri(), "/v1/chat/completions");
        assert_eq!(req.headers()[http::header::HOST], "10.0.0.5:8000");
        let req = Pool::for_url("http://vllm/v1?x=1", d, 1).unwrap().post(());
        assert_eq!(req.headers()[http::header::HOST], "vllm:80");
        assert_eq!(req.uri(), "/v1?x=1");
        assert!(Pool::for_url("https://api.example.com/v1", d, 1).is_none());
    }
}
