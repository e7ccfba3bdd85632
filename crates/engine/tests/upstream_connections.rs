//! How the OpenAI backend uses its connections to a plain-HTTP server: kept alive and
//! reused, replaced when the server has closed them, closed when an answer is abandoned,
//! and the bearer key and path sent as configured. The server is a small HTTP/1.1 server
//! on a real socket, so the test sees every connection and every byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crisp_engine::openai::{OpenAiBackend, OpenAiConfig};
use crisp_engine::{Backend, BackendError, Chunk, GenerateRequest, Message, Sampling};
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const ANSWER: &str = concat!(
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
    "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
    "data: [DONE]\n\n",
);

#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers every request on a connection, chunked.
    KeepAlive,
    /// Answers one request per connection and then closes it without saying so.
    CloseAfterOne,
    /// Sends the first event and then nothing more, keeping the connection open.
    Stall,
    /// Answers 429 with Retry-After.
    Busy,
    /// Sends a role-only event (no token) and then nothing.
    Silent,
    /// Sends the head at once and the events three seconds later, like an engine that
    /// admits a request and then generates for a while.
    SlowBody,
}

#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: AtomicUsize,
    /// Connections that the client closed.
    closed_by_client: AtomicUsize,
    last_head: std::sync::Mutex<String>,
    /// The last request's JSON body.
    last_body: std::sync::Mutex<serde_json::Value>,
}

async fn server(behaviour: Behaviour) -> (u16, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let (read, mut write) = sock.into_split();
                let mut read = BufReader::new(read);
                loop {
                    // Request head, then a Content-Length body.
                    let mut head = String::new();
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                            s.closed_by_client.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0; length];
                    read.read_exact(&mut body).await.unwrap();
                    s.requests.fetch_add(1, Ordering::SeqCst);
                    *s.last_head.lock().unwrap() = head;
                    if let Ok(json) = serde_json::from_slice(&body) {
                        *s.last_body.lock().unwrap() = json;
                    }
                    match behaviour {
                        Behaviour::Busy => {
                            let msg = r#"{"error":{"message":"busy"}}"#;
                            let r = format!(
                                "HTTP/1.1 429 Too Many Requests\r\nretry-after: 7\r\ncontent-length: {}\r\n\r\n{msg}",
                                msg.len()
                            );
                            write.write_all(r.as_bytes()).await.unwrap();
                        }
                        Behaviour::Stall | Behaviour::Silent => {
                            let first = if matches!(behaviour, Behaviour::Stall) {
                                ANSWER.split("\n\n").next().unwrap()
                            } else {
                                r#"data: {"choices":[{"delta":{"role":"assistant"},"finish_reason":null}]}"#
                            };
                            let chunk = format!("{first}\n\n");
                            let r = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n",
                                chunk.len()
                            );
                            write.write_all(r.as_bytes()).await.unwrap();
                        }
                        Behaviour::SlowBody => {
                            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                            write.write_all(head.as_bytes()).await.unwrap();
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            let r = format!("{:x}\r\n{ANSWER}\r\n0\r\n\r\n", ANSWER.len());
                            write.write_all(r.as_bytes()).await.unwrap();
                        }
                        Behaviour::KeepAlive | Behaviour::CloseAfterOne => {
                            let r = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{ANSWER}\r\n0\r\n\r\n",
                                ANSWER.len()
                            );
                            write.write_all(r.as_bytes()).await.unwrap();
                        }
                    }
                    if matches!(behaviour, Behaviour::CloseAfterOne) {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

fn backend(port: u16) -> OpenAiBackend {
    backend_with(port, Duration::from_secs(5))
}

fn backend_with(port: u16, first_token_timeout: Duration) -> OpenAiBackend {
    OpenAiBackend::new(config(port, first_token_timeout)).unwrap()
}

fn config(port: u16, first_token_timeout: Duration) -> OpenAiConfig {
    OpenAiConfig {
        base_url: format!("http://127.0.0.1:{port}/v1"),
        api_key: Some("sk-upstream".into()),
        upstream_model: "m".into(),
        connect_timeout: Duration::from_secs(1),
        first_token_timeout,
        total_timeout: Duration::from_secs(10),
        max_concurrency: 8,
        queue_limit: 8,
        metrics_url: None,
        default_retry_after: Duration::from_secs(1),
        ca_pem: None,
    }
}

fn request() -> GenerateRequest {
    GenerateRequest {
        request_id: "r".into(),
        model: "m".into(),
        messages: vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }],
        max_tokens: Some(4),
        sampling: Sampling::default(),
        stop: Vec::new(),
    }
}

/// Reads an answer the way the pipeline does: up to its final chunk, then drops it.
async fn answer(b: &OpenAiBackend) -> Result<String, BackendError> {
    let mut stream = b.generate(request()).await?;
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item? {
            Chunk::Delta(t) => text.push_str(&t),
            Chunk::Done { usage, .. } => {
                assert_eq!(usage.completion_tokens, 1);
                return Ok(text);
            }
        }
    }
    panic!("the answer did not finish")
}

#[tokio::test]
async fn connections_are_kept_alive_and_reused() {
    let (port, seen) = server(Behaviour::KeepAlive).await;
    let b = backend(port);
    for _ in 0..20 {
        assert_eq!(answer(&b).await.unwrap(), "Hello");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        seen.connections.load(Ordering::SeqCst),
        1,
        "one connection for all"
    );
    let head = seen.last_head.lock().unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("post /v1/chat/completions http/1.1"),
        "{head}"
    );
    assert!(head.contains(&format!("host: 127.0.0.1:{port}")), "{head}");
    assert!(head.contains("authorization: bearer sk-upstream"), "{head}");
    // Sampling settings go upstream only when the client set them.
    let body = seen.last_body.lock().unwrap().clone();
    assert!(
        body.get("top_p").is_none()
            && body.get("top_k").is_none()
            && body.get("min_p").is_none()
            && body.get("repeat_penalty").is_none()
            && body.get("seed").is_none(),
        "{body}"
    );
    let mut sampled = request();
    sampled.sampling.top_p = Some(0.5);
    sampled.sampling.top_k = Some(20);
    sampled.sampling.min_p = Some(0.05);
    sampled.sampling.repetition_penalty = Some(1.25);
    sampled.sampling.seed = Some(42);
    sampled.sampling.frequency_penalty = Some(0.25);
    let mut stream = b.generate(sampled).await.unwrap();
    while stream.next().await.is_some() {}
    let body = seen.last_body.lock().unwrap().clone();
    assert_eq!(
        (
            body["top_p"].as_f64(),
            body["top_k"].as_u64(),
            body["seed"].as_i64(),
            body["frequency_penalty"].as_f64(),
            body["min_p"].as_f64().map(|p| p as f32),
            body["repetition_penalty"].as_f64(),
            body["repeat_penalty"].as_f64(),
        ),
        (
            Some(0.5),
            Some(20),
            Some(42),
            Some(0.25),
            Some(0.05),
            Some(1.25),
            Some(1.25)
        )
    );
    assert!(body.get("presence_penalty").is_none(), "{body}");
    // Concurrent answers each get a connection, and those are kept for later.
    let all = futures::future::join_all((0..5).map(|_| answer(&b))).await;
    assert!(all.iter().all(|a| a.as_deref() == Ok("Hello")));
    assert!(seen.connections.load(Ordering::SeqCst) <= 5);
}

#[tokio::test]
async fn a_connection_the_server_closed_is_replaced_without_an_error() {
    let (port, seen) = server(Behaviour::CloseAfterOne).await;
    let b = backend(port);
    for _ in 0..10 {
        // Give the close time to arrive, so the idle connection is known dead or found so.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(answer(&b).await.unwrap(), "Hello");
    }
    assert_eq!(seen.requests.load(Ordering::SeqCst), 10, "each sent once");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn an_abandoned_answer_closes_its_connection() {
    let (port, seen) = server(Behaviour::Stall).await;
    let b = backend(port);
    let mut stream = b.generate(request()).await.unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Chunk::Delta(_)))));
    drop(stream);
    // The server sees the close: that is how an engine learns to stop generating.
    for _ in 0..100 {
        if seen.closed_by_client.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen.closed_by_client.load(Ordering::SeqCst), 1);
    assert_eq!(b.load().running, 0, "the slot is free again");
}

#[tokio::test]
async fn a_busy_server_is_a_capacity_refusal_with_its_retry_after() {
    let (port, seen) = server(Behaviour::Busy).await;
    let b = backend(port);
    for _ in 0..3 {
        match b.generate(request()).await {
            Err(BackendError::Capacity {
                retry_after,
                message,
            }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
                assert!(message.contains("busy"), "{message}");
            }
            Err(other) => panic!("expected a capacity refusal, got {other:?}"),
            Ok(_) => panic!("expected a capacity refusal, got an answer"),
        }
    }
    // The error answers were read to their end, so their connection was kept.
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_server_makes_the_engine_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    match backend(port).generate(request()).await {
        Err(BackendError::Unavailable(m)) => assert!(m.contains("unreachable"), "{m}"),
        Err(other) => panic!("expected unavailable, got {other:?}"),
        Ok(_) => panic!("expected unavailable, got an answer"),
    }
}

#[tokio::test]
async fn an_engine_that_sends_no_token_in_time_times_out() {
    let (port, _seen) = server(Behaviour::Silent).await;
    let b = backend_with(port, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let mut stream = b.generate(request()).await.unwrap();
    match stream.next().await {
        Some(Err(BackendError::Timeout(m))) => assert!(m.contains("in time"), "{m}"),
        other => panic!("expected a time-out, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(b.load().running, 0, "the slot is free again");
}

/// The pipeline's admission time-out and failover wait for `generate` to return, so it
/// must return at the engine's admission (the head of a streamed answer), not once the
/// answer is generated: the request goes upstream streamed whatever the client wants.
#[tokio::test]
async fn admission_is_the_answers_head_not_its_end() {
    let (port, seen) = server(Behaviour::SlowBody).await;
    let b = backend(port);
    let started = std::time::Instant::now();
    let mut stream = b.generate(request()).await.unwrap();
    let admitted = started.elapsed();
    assert!(
        admitted < Duration::from_secs(2),
        "admitted after {admitted:?}, with the answer"
    );
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        if let Chunk::Delta(t) = item.unwrap() {
            text.push_str(&t);
        }
    }
    assert_eq!(text, "Hello");
    let body = seen.last_body.lock().unwrap().clone();
    assert_eq!(
        body["stream"], true,
        "the request went upstream without \"stream\": true"
    );
}

#[tokio::test]
async fn the_engine_metrics_scraper_ends_with_its_backend() {
    let (port, seen) = server(Behaviour::KeepAlive).await;
    let b = OpenAiBackend::new(OpenAiConfig {
        metrics_url: Some(format!("http://127.0.0.1:{port}/metrics")),
        ..config(port, Duration::from_secs(5))
    })
    .unwrap();
    let task = b.spawn_scraper(Duration::from_millis(20)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(seen.requests.load(Ordering::SeqCst) > 0, "never scraped");
    // A replaced node drops its engines: the scraper stops with them.
    drop(b);
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the scraper outlived its backend")
        .unwrap();
    let after = seen.requests.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), after);
}
