//! A backend that is any OpenAI-compatible server: vLLM, SGLang, llama.cpp's server, TGI,
//! Ollama, or a provider's regional endpoint.
//!
//! Requests always stream upstream (with `stream_options.include_usage`), so tokens pass
//! through as they come and usage is known at the end; when the server reports no usage,
//! tokens are counted here. Also for callers that take their answer whole: a server
//! answers a non-streamed request's head only once the whole answer is generated, so its
//! admission (the `200`), which the pipeline's admission time-out and failover wait for,
//! would not be known before the end of a generation that may take minutes.
//!
//! Admission is the upstream's `200`: a `429`/`503` is a capacity refusal (its
//! `Retry-After` honoured), other `5xx`, timeouts and broken connections make the engine
//! unavailable, and other `4xx` (a prompt too long, say) reject the request without
//! saying anything about the engine's health.
//!
//! The engine's own load is read from its Prometheus `/metrics` when it has one, combined
//! with the requests in flight through this backend.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::metrics::EngineMetrics;
use crate::{
    Backend, BackendError, Chunk, ChunkStream, EngineLoad, FinishReason, GenerateRequest, Usage,
    count_tokens,
};

/// How to reach one OpenAI-compatible server.
#[derive(Clone)]
pub struct OpenAiConfig {
    /// Base URL up to `/v1`, e.g. `http://10.0.0.5:8000/v1`.
    pub base_url: String,
    /// Sent as a bearer token; never logged.
    pub api_key: Option<String>,
    /// The model name the server knows.
    pub upstream_model: String,
    pub connect_timeout: Duration,
    /// Time allowed until the first token arrives.
    pub first_token_timeout: Duration,
    /// Time allowed for the whole answer.
    pub total_timeout: Duration,
    /// Sequences this server runs at once (its scheduler's limit); the headroom basis.
    pub max_concurrency: u32,
    /// Requests it will queue beyond that before crisp treats it as full.
    pub queue_limit: u32,
    /// Where its Prometheus metrics are, if it has them.
    pub metrics_url: Option<String>,
    /// Cool-down when a 429/503 carries no Retry-After.
    pub default_retry_after: Duration,
    /// PEM certificates (a private CA) trusted for `https://` URLs besides the public
    /// roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("upstream_model", &self.upstream_model)
            .field("max_concurrency", &self.max_concurrency)
            .finish_non_exhaustive()
    }
}

struct Shared {
    cfg: OpenAiConfig,
    /// `{base_url}/chat/completions`.
    completions_url: String,
    /// Connections driven by their requests, for `http://` backends; `https://` ones go
    /// through `client`.
    plain: Option<Arc<crate::http1::Pool>>,
    /// `Authorization: Bearer <api_key>`, marked sensitive.
    bearer: Option<http::HeaderValue>,
    client: reqwest::Client,
    in_flight: AtomicU32,
    /// The engine's last scraped running and waiting requests ([`Scraped`]), read by
    /// every routing decision without a lock.
    scraped: AtomicU64,
}

/// Running and waiting requests from the engine's metrics, in one word so that both
/// come from the same scrape (`u32::MAX` of each at once would read as no scrape).
struct Scraped;

impl Scraped {
    const NONE: u64 = u64::MAX;

    fn pack(m: Option<&EngineMetrics>) -> u64 {
        m.map_or(Self::NONE, |m| {
            (u64::from(m.running) << 32) | u64::from(m.waiting)
        })
    }

    /// `(running, waiting)`, if the last scrape succeeded.
    fn unpack(word: u64) -> Option<(u32, u32)> {
        // The casts keep the low 32 bits of each half, which is what `pack` put there.
        #[allow(clippy::cast_possible_truncation)]
        (word != Self::NONE).then_some(((word >> 32) as u32, word as u32))
    }
}

/// One OpenAI-compatible server.
#[derive(Clone)]
pub struct OpenAiBackend {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("OpenAiBackend")
            .field(&self.shared.cfg)
            .finish()
    }
}

impl OpenAiBackend {
    pub fn new(cfg: OpenAiConfig) -> Result<OpenAiBackend, BackendError> {
        let completions_url = format!("{}/chat/completions", cfg.base_url.trim_end_matches('/'));
        let bearer = match &cfg.api_key {
            Some(key) => {
                let mut v =
                    http::HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                        BackendError::Internal(format!(
                            "the API key for {} is not a valid header value",
                            cfg.base_url
                        ))
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        if let Some(pem) = &cfg.ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|roots| !roots.is_empty())
                .ok_or_else(|| {
                    BackendError::Internal(format!(
                        "the CA file for {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        cfg.base_url
                    ))
                })?;
            for root in roots {
                client = client.add_root_certificate(root);
            }
        }
        let client = client
            .build()
            .map_err(|e| BackendError::Internal(format!("HTTP client: {e}")))?;
        Ok(OpenAiBackend {
            shared: Arc::new(Shared {
                plain: crate::http1::Pool::for_url(
                    &completions_url,
                    cfg.connect_timeout,
                    usize::try_from(cfg.max_concurrency.saturating_add(cfg.queue_limit))
                        .unwrap_or(1024)
                        .min(1024),
                )
                .map(Arc::new),
                bearer,
                completions_url,
                cfg,
                client,
                in_flight: AtomicU32::new(0),
                scraped: AtomicU64::new(Scraped::NONE),
            }),
        })
    }

    pub fn config(&self) -> &OpenAiConfig {
        &self.shared.cfg
    }

    /// Reads the engine's `/metrics` once and keeps what it says about load.
    pub async fn scrape(&self) -> Result<EngineMetrics, String> {
        let Some(url) = &self.shared.cfg.metrics_url else {
            return Err("no metrics URL configured".into());
        };
        let text = self
            .shared
            .client
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let m = EngineMetrics::parse(&text);
        self.shared
            .scraped
            .store(Scraped::pack(Some(&m)), Ordering::Relaxed);
        Ok(m)
    }

    /// Scrapes every `interval` until the returned task is aborted or the backend (every
    /// clone of it) is dropped, so a replaced node's engines stop being scraped.
    pub fn spawn_scraper(&self, interval: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.shared.cfg.metrics_url.as_ref()?;
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let weak = Arc::downgrade(&self.shared);
        Some(handle.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                let me = OpenAiBackend { shared };
                if let Err(e) = me.scrape().await {
                    tracing::debug!(url = ?me.shared.cfg.metrics_url, error = %e, "engine metrics unavailable");
                    me.shared
                        .scraped
                        .store(Scraped::pack(None), Ordering::Relaxed);
                }
            }
        }))
    }
}

/// An answer's body, from whichever client carried it.
struct Body(std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>);

impl Body {
    /// At most `limit` bytes of it, as text (for error answers).
    async fn text(mut self, limit: usize) -> String {
        let mut out = Vec::new();
        while out.len() < limit
            && let Some(Ok(chunk)) = self.0.next().await
        {
            out.extend_from_slice(&chunk[..chunk.len().min(limit - out.len())]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Shared {
    /// POSTs a chat completion request; returns the answer's status, headers and body.
    async fn send(
        &self,
        payload: Vec<u8>,
    ) -> Result<(http::StatusCode, http::HeaderMap, Body), BackendError> {
        let cfg = &self.cfg;
        let bearer = self.bearer.clone();
        if let Some(pool) = &self.plain {
            let mut req = pool.post(http_body_util::Full::new(Bytes::from(payload)));
            let headers = req.headers_mut();
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            headers.insert(
                http::header::ACCEPT,
                http::HeaderValue::from_static("text/event-stream"),
            );
            if let Some(v) = bearer {
                headers.insert(http::header::AUTHORIZATION, v);
            }
            let (status, headers, answer) = pool.send(req).await.map_err(|e| {
                BackendError::Unavailable(format!("{} unreachable: {e}", cfg.base_url))
            })?;
            return Ok((status, headers, Body(Box::pin(answer))));
        }
        let mut request = self
            .client
            .post(&self.completions_url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(payload);
        if let Some(v) = bearer {
            request = request.header(http::header::AUTHORIZATION, v);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                BackendError::Timeout(format!("{}: {}", cfg.base_url, with_causes(&e)))
            } else {
                BackendError::Unavailable(format!(
                    "{} unreachable: {}",
                    cfg.base_url,
                    with_causes(&e)
                ))
            }
        })?;
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response
            .bytes_stream()
            .map(|r| r.map_err(|e| e.to_string()));
        Ok((status, headers, Body(Box::pin(body))))
    }
}

/// An error with the causes under it (a TLS failure sits a few levels down), and what to
/// do when the server's certificate is not trusted.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if text.contains("UnknownIssuer") {
        text.push_str(
            " (if the server's certificate is from a private CA, give the backend ca_file = \"ca.pem\")",
        );
    } else if text.contains("NotValidForName") {
        text.push_str(" (base_url must use a name the server's certificate covers)");
    }
    text
}

/// Keeps the in-flight count right whatever way a request ends.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn retry_after(headers: &reqwest::header::HeaderMap, default: Duration) -> Duration {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(default, Duration::from_secs)
}

fn classify(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &str,
    cfg: &OpenAiConfig,
) -> BackendError {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error"))
                .and_then(|m| m.as_str().map(str::to_owned))
        })
        .unwrap_or_else(|| body.chars().take(300).collect());
    let what = format!("{} answered {status}: {message}", cfg.base_url);
    match status.as_u16() {
        429 | 503 => BackendError::Capacity {
            retry_after: Some(retry_after(headers, cfg.default_retry_after)),
            message: what,
        },
        408 | 504 => BackendError::Timeout(what),
        s if s >= 500 => BackendError::Unavailable(what),
        _ => BackendError::BadRequest(what),
    }
}

/// The chat completion request sent upstream: always streamed, with usage at the end.
#[derive(Serialize)]
struct UpstreamRequest<'a> {
    model: &'a str,
    messages: &'a [crate::Message],
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_p: Option<f32>,
    /// Sent under both engines' names: vLLM and SGLang read `repetition_penalty`, llama.cpp
    /// `repeat_penalty`, and each ignores the other's.
    #[serde(skip_serializing_if = "Option::is_none")]
    repetition_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repeat_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// One streamed chunk, borrowing its strings from the event where they need no
/// unescaping. Its choices are folded as they are read (their text joined, the last finish
/// reason kept), without collecting them.
#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default, borrow, deserialize_with = "fold_choices")]
    choices: Folded<'a>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// What the choices of one chunk say.
#[derive(Default)]
struct Folded<'a> {
    text: Option<Cow<'a, str>>,
    finish_reason: Option<Cow<'a, str>>,
    /// vLLM names the stop string that ended the answer (`stop_reason`).
    stop_string: bool,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow, deserialize_with = "maybe_borrowed")]
    finish_reason: Option<Cow<'a, str>>,
    /// vLLM: the stop string (or token ID) that ended the answer; `null` (no allocation)
    /// in every other chunk.
    #[serde(default)]
    stop_reason: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow, deserialize_with = "maybe_borrowed")]
    content: Option<Cow<'a, str>>,
}

/// serde borrows a `Cow<str>` field, but not one inside an `Option`.
fn maybe_borrowed<'de: 'a, 'a, D>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Text<'a>(#[serde(borrow)] Cow<'a, str>);
    Ok(Option::<Text<'a>>::deserialize(d)?.map(|t| t.0))
}

/// Reads a `choices` array (or `null`) into a [`Folded`].
fn fold_choices<'de: 'a, 'a, D>(d: D) -> Result<Folded<'a>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Choices;
    impl<'de> serde::de::Visitor<'de> for Choices {
        type Value = Folded<'de>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of choices")
        }
        fn visit_unit<E>(self) -> Result<Folded<'de>, E> {
            Ok(Folded::default())
        }
        fn visit_seq<A>(self, mut seq: A) -> Result<Folded<'de>, A::Error>
        where
            A: serde::de::SeqAccess<'de>,
        {
            let mut folded = Folded::default();
            while let Some(choice) = seq.next_element::<StreamChoice<'de>>()? {
                if let Some(content) = choice.delta.and_then(|d| d.content) {
                    folded.text = Some(match folded.text.take() {
                        None => content,
                        Some(before) => Cow::Owned(before.into_owned() + &content),
                    });
                }
                if choice.finish_reason.is_some() {
                    folded.finish_reason = choice.finish_reason;
                }
                if let Some(serde_json::Value::String(_)) = choice.stop_reason {
                    folded.stop_string = true;
                }
            }
            Ok(folded)
        }
    }
    d.deserialize_any(Choices)
}

#[derive(Deserialize, Clone, Copy)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// The `data:` payload of one SSE event (its `data:` lines joined by newlines), without
/// copying in the usual case of a single line; `None` for events without data.
fn sse_data(event: &Bytes) -> Option<Bytes> {
    let mut rest: &[u8] = event;
    let mut lines = std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        Some(line)
    })
    .filter_map(|l| l.strip_prefix(b"data:"))
    .map(|l| l.strip_prefix(b" ").unwrap_or(l));
    let first = lines.next()?;
    let Some(second) = lines.next() else {
        return Some(event.slice_ref(first));
    };
    let mut joined = BytesMut::from(first);
    for line in std::iter::once(second).chain(lines) {
        joined.extend_from_slice(b"\n");
        joined.extend_from_slice(line);
    }
    Some(joined.freeze())
}

/// Where the first event in `buf` ends (after its blank line).
fn event_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf)
        .find(|&i| buf.get(i + 1) == Some(&b'\n'))
        .map(|i| i + 2)
}

/// Turns an SSE byte stream into `data:` payloads. Events that arrive whole in one read
/// are sliced out of it; only an event split across reads (or with CRLF line ends) is
/// copied into a buffer to be joined.
fn sse_events<S>(body: S) -> impl Stream<Item = Result<Bytes, String>>
where
    S: Stream<Item = Result<Bytes, String>> + Send + Unpin,
{
    struct State<S> {
        body: S,
        /// The rest of the last read, while no partial event waits in `buf`.
        read: Bytes,
        /// A partial event, joined with what follows it.
        buf: BytesMut,
        done: bool,
    }
    let state = State {
        body,
        read: Bytes::new(),
        buf: BytesMut::new(),
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            // The next whole event: from the read while it has one, then from the buffer.
            let mut event = None;
            if !st.read.is_empty() {
                match event_end(&st.read) {
                    Some(end) => event = Some(st.read.split_to(end)),
                    None => {
                        st.buf.extend_from_slice(&st.read);
                        // Let go of the read (not just empty it): its buffer is the
                        // connection's to reuse.
                        st.read = Bytes::new();
                    }
                }
            }
            if event.is_none() {
                event = event_end(&st.buf).map(|end| st.buf.split_to(end).freeze());
            }
            if let Some(event) = event {
                if let Some(data) = sse_data(&event) {
                    return Some((Ok(data), st));
                }
                continue;
            }
            if st.done {
                return None;
            }
            match st.body.next().await {
                Some(Ok(chunk)) => {
                    if memchr::memchr(b'\r', &chunk).is_some() {
                        // Normalise CRLF so event boundaries are found either way.
                        st.buf.extend(chunk.iter().copied().filter(|&b| b != b'\r'));
                    } else if st.buf.is_empty() {
                        st.read = chunk;
                    } else {
                        st.buf.extend_from_slice(&chunk);
                    }
                }
                Some(Err(e)) => {
                    st.buf.clear();
                    st.read = Bytes::new();
                    st.done = true;
                    return Some((Err(e), st));
                }
                None => {
                    st.done = true;
                    if !st.buf.is_empty() {
                        st.buf.extend_from_slice(b"\n\n");
                    }
                }
            }
        }
    })
}

impl Backend for OpenAiBackend {
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<ChunkStream, BackendError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            if req.messages.is_empty() {
                return Err(BackendError::BadRequest(
                    "messages must not be empty".into(),
                ));
            }
            let cfg = &shared.cfg;
            let guard = InFlight::new(&shared);
            let prompt_tokens = crate::prompt_tokens(&req.messages);
            let body = UpstreamRequest {
                model: &cfg.upstream_model,
                messages: &req.messages,
                stream: true,
                stream_options: StreamOptions {
                    include_usage: true,
                },
                max_tokens: req.max_tokens,
                temperature: req.sampling.temperature,
                top_p: req.sampling.top_p,
                top_k: req.sampling.top_k,
                min_p: req.sampling.min_p,
                repetition_penalty: req.sampling.repetition_penalty,
                repeat_penalty: req.sampling.repetition_penalty,
                seed: req.sampling.seed,
                presence_penalty: req.sampling.presence_penalty,
                frequency_penalty: req.sampling.frequency_penalty,
                stop: &req.stop,
            };
            let payload = serde_json::to_vec(&body)
                .map_err(|e| BackendError::Internal(format!("request JSON: {e}")))?;
            // One timer per answer: it bounds the wait for the answer's head and its first
            // token, then the whole answer (each timer registered costs the runtime a wake-up).
            let now = tokio::time::Instant::now();
            let deadline = now + cfg.total_timeout;
            let mut timer = Box::pin(tokio::time::sleep_until(
                (now + cfg.first_token_timeout).min(deadline),
            ));
            let (status, headers, answer) = tokio::select! {
                biased;
                sent = shared.send(payload) => sent?,
                () = timer.as_mut() => {
                    return Err(BackendError::Timeout(format!(
                        "{} did not answer in {:?}",
                        cfg.base_url, cfg.first_token_timeout
                    )));
                }
            };
            if !status.is_success() {
                let text = answer.text(64 << 10).await;
                return Err(classify(status, &headers, &text, cfg));
            }
            let events = Box::pin(sse_events(answer.0));
            let state = Relay {
                events,
                guard: Some(guard),
                usage: None,
                finish: None,
                completion_counted: 0,
                prompt_tokens,
                first: true,
                done: false,
                timer,
                deadline,
            };
            let stream = futures::stream::unfold(state, |mut s| async move {
                let item = s.next().await?;
                Some((item, s))
            });
            Ok(Box::pin(stream) as ChunkStream)
        })
    }

    fn health(&self) -> BoxFuture<'static, Result<(), BackendError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let cfg = &shared.cfg;
            let mut req = shared
                .client
                .get(format!("{}/models", cfg.base_url.trim_end_matches('/')))
                .timeout(Duration::from_secs(2));
            if let Some(key) = &cfg.api_key {
                req = req.bearer_auth(key);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(BackendError::Unavailable(format!(
                    "{} health check answered {}",
                    cfg.base_url,
                    r.status()
                ))),
                Err(e) => Err(BackendError::Unavailable(format!(
                    "{} health check failed: {e}",
                    cfg.base_url
                ))),
            }
        })
    }

    fn load(&self) -> EngineLoad {
        let cfg = &self.shared.cfg;
        let in_flight = self.shared.in_flight.load(Ordering::Relaxed);
        let scraped = Scraped::unpack(self.shared.scraped.load(Ordering::Relaxed));
        // The engine's own view counts requests from every crisp node in the region; ours
        // counts only this node's. Take the larger of each.
        let (running, waiting) = match scraped {
            Some((scraped_running, scraped_waiting)) => (
                scraped_running.max(in_flight.min(cfg.max_concurrency)),
                scraped_waiting.max(in_flight.saturating_sub(cfg.max_concurrency)),
            ),
            None => (
                in_flight.min(cfg.max_concurrency),
                in_flight.saturating_sub(cfg.max_concurrency),
            ),
        };
        EngineLoad {
            slots: cfg.max_concurrency,
            running,
            queue_limit: cfg.queue_limit,
            waiting,
        }
    }
}

struct Relay {
    events: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>,
    guard: Option<InFlight>,
    usage: Option<WireUsage>,
    finish: Option<FinishReason>,
    completion_counted: u32,
    prompt_tokens: u32,
    first: bool,
    done: bool,
    /// Fires at the first-token deadline until the first token, then at the deadline for
    /// the whole answer: one timer per answer, not one per event.
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    deadline: tokio::time::Instant,
}

impl Relay {
    async fn next(&mut self) -> Option<Result<Chunk, BackendError>> {
        loop {
            if self.done {
                return None;
            }
            let next = tokio::select! {
                biased;
                event = self.events.next() => Ok(event),
                () = self.timer.as_mut() => Err(()),
            };
            let event = match next {
                Err(()) => {
                    self.done = true;
                    self.guard = None;
                    return Some(Err(BackendError::Timeout(
                        "the engine stopped producing tokens in time".into(),
                    )));
                }
                Ok(None) if self.finish.is_none() => {
                    // No [DONE] and no finish reason: the server gave up mid-answer (some
                    // report errors only this way once they have sent 200).
                    self.done = true;
                    self.guard = None;
                    return Some(Err(BackendError::Unavailable(
                        "the engine ended the answer without finishing it".into(),
                    )));
                }
                Ok(None) => return self.finish(),
                Ok(Some(Err(e))) => {
                    self.done = true;
                    self.guard = None;
                    return Some(Err(BackendError::Unavailable(format!(
                        "the engine's stream broke: {e}"
                    ))));
                }
                Ok(Some(Ok(data))) => data,
            };
            if event.as_ref() == b"[DONE]" {
                return self.finish();
            }
            // One UTF-8 check for the whole event, not one per string in it.
            let chunk: StreamChunk = match std::str::from_utf8(&event)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str(text).map_err(|e| e.to_string()))
            {
                Ok(c) => c,
                Err(e) => {
                    self.done = true;
                    self.guard = None;
                    return Some(Err(BackendError::Internal(format!(
                        "unreadable event from the engine: {e}"
                    ))));
                }
            };
            if let Some(u) = chunk.usage {
                self.usage = Some(u);
            }
            if let Some(f) = chunk.choices.finish_reason {
                self.finish = Some(match FinishReason::from_name(&f) {
                    FinishReason::Stop if chunk.choices.stop_string => FinishReason::StopSequence,
                    other => other,
                });
            }
            let text = chunk.choices.text.unwrap_or_default();
            if !text.is_empty() {
                if self.first {
                    self.first = false;
                    self.timer.as_mut().reset(self.deadline);
                }
                self.completion_counted = self
                    .completion_counted
                    .saturating_add(count_tokens(&text).max(1));
                return Some(Ok(Chunk::Delta(text.into_owned())));
            }
        }
    }

    fn finish(&mut self) -> Option<Result<Chunk, BackendError>> {
        if self.done {
            return None;
        }
        self.done = true;
        self.guard = None;
        let usage = match self.usage {
            Some(u) => Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            },
            None => Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_counted,
            },
        };
        Some(Ok(Chunk::Done {
            finish_reason: self.finish.unwrap_or(FinishReason::Stop),
            usage,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sse_data_lines_are_extracted_and_joined() {
        let one = Bytes::from_static(b"data: {\"a\":1}\n\n");
        let data = sse_data(&one).unwrap();
        assert_eq!(&data[..], b"{\"a\":1}");
        // A slice of the event, not a copy.
        assert_eq!(data.as_ptr(), one[6..].as_ptr());
        let two = Bytes::from_static(b"event: x\ndata:a\ndata: b\n\n");
        assert_eq!(&sse_data(&two).unwrap()[..], b"a\nb");
        assert!(sse_data(&Bytes::from_static(b": keep-alive\n\n")).is_none());
    }

    fn events_of(reads: &[&[u8]]) -> Vec<Bytes> {
        let body = futures::stream::iter(
            reads
                .iter()
                .map(|r| Ok(Bytes::copy_from_slice(r)))
                .collect::<Vec<_>>(),
        );
        futures::executor::block_on(sse_events(body).map(|e| e.unwrap()).collect())
    }

    #[test]
    fn sse_events_are_found_however_the_reads_cut_them() {
        let want: Vec<Bytes> = ["a", "b", "c"].iter().map(|s| Bytes::from(*s)).collect();
        let whole: &[u8] = b"data: a\n\n: keep-alive\n\ndata: b\n\ndata: c\n\n";
        assert_eq!(events_of(&[whole]), want);
        // Cut at every byte: the partial events are joined.
        for cut in 1..whole.len() {
            let (x, y) = whole.split_at(cut);
            assert_eq!(events_of(&[x, y]), want, "cut at {cut}");
        }
        assert_eq!(
            events_of(&[b"data: a\r\n\r\ndata: b\r", b"\n\r\ndata: c"]),
            want,
            "CRLF line ends, and a last event without its blank line"
        );
        // An event read whole is a slice of the read, not a copy.
        let read = Bytes::from_static(b"data: a\n\n");
        let body = futures::stream::iter([Ok::<_, String>(read.clone())]);
        let events: Vec<_> = futures::executor::block_on(sse_events(body).collect());
        assert_eq!(events[0].as_ref().unwrap().as_ptr(), read[6..].as_ptr());
    }

    #[test]
    fn chunk_text_is_borrowed_unless_it_has_escapes() {
        let plain = r#"{"choices":[{"delta":{"content":"Hello"},"finish_reason":null}]}"#;
        let chunk: StreamChunk = serde_json::from_str(plain).unwrap();
        assert!(matches!(chunk.choices.text, Some(Cow::Borrowed("Hello"))));
        assert!(chunk.choices.finish_reason.is_none());
        let escaped =
            r#"{"choices":[{"delta":{"content":"a\nb \"q\" \u00e9"},"finish_reason":"length"}]}"#;
        let chunk: StreamChunk = serde_json::from_str(escaped).unwrap();
        assert_eq!(chunk.choices.text.as_deref(), Some("a\nb \"q\" \u{e9}"));
        assert_eq!(chunk.choices.finish_reason.as_deref(), Some("length"));
    }

    #[test]
    fn chunk_choices_are_folded_in_order() {
        let two = r#"{"id":"x","choices":[{"delta":{"content":"a"}},{"delta":{}},{"delta":{"content":"b"},"finish_reason":"stop"}],"usage":null}"#;
        let chunk: StreamChunk = serde_json::from_str(two).unwrap();
        assert_eq!(chunk.choices.text.as_deref(), Some("ab"));
        assert_eq!(chunk.choices.finish_reason.as_deref(), Some("stop"));
        for empty in [
            r#"{"choices":null,"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            r#"{"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        ] {
            let chunk: StreamChunk = serde_json::from_str(empty).unwrap();
            assert!(chunk.choices.text.is_none() && chunk.choices.finish_reason.is_none());
            assert_eq!(chunk.usage.map(|u| u.completion_tokens), Some(2));
        }
        assert!(serde_json::from_str::<StreamChunk>(r#"{"choices":{}}"#).is_err());
    }

    #[test]
    fn a_stop_string_named_by_the_server_is_told_apart() {
        let fold = |json: &str| {
            serde_json::from_str::<StreamChunk>(json)
                .unwrap()
                .choices
                .stop_string
        };
        // vLLM names the stop string that ended the answer...
        let c = fold(r#"{"choices":[{"delta":{},"finish_reason":"stop","stop_reason":"\n\n"}]}"#);
        assert!(c);
        // ...and says null (or a token ID) otherwise; other servers say nothing.
        for json in [
            r#"{"choices":[{"delta":{"content":"a"},"finish_reason":null,"stop_reason":null}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop","stop_reason":128001}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        ] {
            assert!(!fold(json), "{json}");
        }
    }

    fn cfg() -> OpenAiConfig {
        OpenAiConfig {
            base_url: "http://engine/v1".into(),
            api_key: Some("sk-secret".into()),
            upstream_model: "m".into(),
            connect_timeout: Duration::from_secs(1),
            first_token_timeout: Duration::from_secs(1),
            total_timeout: Duration::from_secs(1),
            max_concurrency: 4,
            queue_limit: 4,
            metrics_url: None,
            default_retry_after: Duration::from_secs(3),
            ca_pem: None,
        }
    }

    #[test]
    fn upstream_statuses_map_to_who_failed() {
        let mut h = reqwest::header::HeaderMap::new();
        let body = r#"{"error": {"message": "This model's maximum context length is 512 tokens"}}"#;
        let e = classify(reqwest::StatusCode::BAD_REQUEST, &h, body, &cfg());
        assert!(matches!(&e, BackendError::BadRequest(m) if m.contains("maximum context length")));
        assert!(!e.trips_cooldown());
        let e = classify(reqwest::StatusCode::TOO_MANY_REQUESTS, &h, "", &cfg());
        assert_eq!(
            e,
            BackendError::Capacity {
                retry_after: Some(Duration::from_secs(3)),
                message: "http://engine/v1 answered 429 Too Many Requests: ".into()
            }
        );
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert!(matches!(
            classify(reqwest::StatusCode::SERVICE_UNAVAILABLE, &h, "", &cfg()),
            BackendError::Capacity { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(reqwest::StatusCode::BAD_GATEWAY, &h, "", &cfg()),
            BackendError::Unavailable(_)
        ));
        assert!(matches!(
            classify(reqwest::StatusCode::GATEWAY_TIMEOUT, &h, "", &cfg()),
            BackendError::Timeout(_)
        ));
    }

    #[test]
    fn scraped_load_is_kept_whole_in_one_word() {
        for (running, waiting) in [
            (0, 0),
            (3, 7),
            (u32::MAX - 1, 0),
            (0, u32::MAX),
            (12, 1 << 31),
        ] {
            let m = EngineMetrics {
                running,
                waiting,
                kv_cache_usage: Some(0.5),
            };
            assert_eq!(
                Scraped::unpack(Scraped::pack(Some(&m))),
                Some((running, waiting))
            );
        }
        assert_eq!(Scraped::unpack(Scraped::pack(None)), None);
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        assert!(!format!("{:?}", cfg()).contains("sk-secret"));
    }
}
