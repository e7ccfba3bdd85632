#![allow(clippy::unwrap_used)]

use std::time::Duration;

use crisp_engine::sim::{MESSAGE_OVERHEAD_TOKENS, SimConfig, SimEngine, prompt_tokens};
use crisp_engine::{
    Backend, BackendError, Chunk, ChunkStream, EngineLoad, FinishReason, GenerateRequest, Message,
    Sampling, Usage, count_tokens,
};
use futures::StreamExt;
use tokio::time::Instant;

fn request(prompt: &str, max_tokens: Option<u32>) -> GenerateRequest {
    GenerateRequest {
        request_id: "req-1".to_owned(),
        model: "llama-sim".to_owned(),
        messages: vec![
            Message {
                role: "system".to_owned(),
                content: "You are terse.".to_owned(),
            },
            Message {
                role: "user".to_owned(),
                content: prompt.to_owned(),
            },
        ],
        max_tokens,
        sampling: Sampling::default(),
        stop: Vec::new(),
    }
}

fn engine(cfg: SimConfig) -> SimEngine {
    SimEngine::new("llama-sim", "eu-west", cfg)
}

struct Outcome {
    text: String,
    deltas: Vec<(Instant, String)>,
    finish_reason: FinishReason,
    usage: Usage,
    done_at: Instant,
}

async fn drain(mut stream: ChunkStream) -> Outcome {
    let mut deltas = Vec::new();
    while let Some(item) = stream.next().await {
        match item.unwrap() {
            Chunk::Delta(text) => deltas.push((Instant::now(), text)),
            Chunk::Done {
                finish_reason,
                usage,
            } => {
                assert!(stream.next().await.is_none(), "nothing may follow Done");
                return Outcome {
                    text: deltas.iter().map(|(_, t)| t.as_str()).collect(),
                    deltas,
                    finish_reason,
                    usage,
                    done_at: Instant::now(),
                };
            }
        }
    }
    panic!("stream ended without Done");
}

async fn run(engine: &SimEngine, req: GenerateRequest) -> Outcome {
    drain(engine.generate(req).await.unwrap()).await
}

fn load(slots: u32, running: u32, queue_limit: u32, waiting: u32) -> EngineLoad {
    EngineLoad {
        slots,
        running,
        queue_limit,
        waiting,
    }
}

fn assert_close(actual: Duration, expected: Duration) {
    let diff = actual.abs_diff(expected);
    assert!(
        diff <= Duration::from_millis(1),
        "expected about {expected:?}, got {actual:?}"
    );
}

/// Lets spawned tasks run up to their next timer without moving the paused clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[test]
fn token_counting() {
    assert_eq!(count_tokens(""), 0);
    assert_eq!(count_tokens("   "), 1); // three characters round up to one token
    assert_eq!(count_tokens("Hello, world!"), 4);
    assert_eq!(count_tokens("one two three"), 4); // 13 chars / 4, rounded up
    assert_eq!(count_tokens("a b c d e f"), 6);
    assert_eq!(count_tokens("supercalifragilistic"), 5);
    assert_eq!(count_tokens("x.y.z"), 5);
    assert_eq!(
        prompt_tokens(&request("Hello, world!", None).messages),
        count_tokens("You are terse.") + 4 + 2 * MESSAGE_OVERHEAD_TOKENS
    );
}

#[tokio::test(start_paused = true)]
async fn same_input_same_text_in_every_region() {
    let a = SimEngine::new("llama-sim", "eu-west", SimConfig::default());
    let b = SimEngine::new("llama-sim", "us-east", SimConfig::default());
    let first = run(&a, request("Tell me about rivers.", Some(32))).await;
    let again = run(&a, request("Tell me about rivers.", Some(32))).await;
    let elsewhere = run(&b, request("Tell me about rivers.", Some(32))).await;
    assert!(!first.text.is_empty());
    assert_eq!(first.text, again.text);
    assert_eq!(first.text, elsewhere.text);
    assert_eq!(first.usage, elsewhere.usage);
    assert_eq!(first.finish_reason, elsewhere.finish_reason);

    let other_prompt = run(&a, request("Tell me about stones.", Some(32))).await;
    assert_ne!(first.text, other_prompt.text);
    let other_model = SimEngine::new("mistral-sim", "eu-west", SimConfig::default());
    let other_model = run(&other_model, request("Tell me about rivers.", Some(32))).await;
    assert_ne!(first.text, other_model.text);
}

#[tokio::test(start_paused = true)]
async fn usage_matches_the_deltas() {
    let e = engine(SimConfig::default());
    let req = request("Count my tokens, please.", Some(20));
    let expected_prompt = prompt_tokens(&req.messages);
    let out = run(&e, req).await;
    assert_eq!(out.usage.prompt_tokens, expected_prompt);
    let words = out.text.split_whitespace().count();
    assert_eq!(out.usage.completion_tokens as usize, words);
    // One token per delta at 40 tokens/s; the first has no leading space, the rest do.
    assert_eq!(out.deltas.len(), words);
    assert!(!out.deltas[0].1.starts_with(' '));
    assert!(out.deltas[1..].iter().all(|(_, t)| t.starts_with(' ')));
}

#[tokio::test(start_paused = true)]
async fn finish_reason_is_length_at_the_limit_and_stop_before_it() {
    let e = engine(SimConfig {
        time_scale: 0.0,
        ..SimConfig::default()
    });
    let (mut stops, mut lengths) = (0, 0);
    for i in 0..40 {
        let out = run(&e, request(&format!("prompt number {i}"), Some(16))).await;
        let n = out.usage.completion_tokens;
        match out.finish_reason {
            FinishReason::Length => {
                assert_eq!(n, 16);
                lengths += 1;
            }
            FinishReason::Stop => {
                assert!((8..16).contains(&n), "natural length {n} outside [8, 16)");
                stops += 1;
            }
            FinishReason::StopSequence => panic!("no stop sequences were given"),
        }
    }
    assert!(stops > 0 && lengths > 0, "stops {stops}, lengths {lengths}");

    // The engine's default applies when the request sets no limit.
    let e = engine(SimConfig {
        default_max_tokens: 5,
        time_scale: 0.0,
        ..SimConfig::default()
    });
    let out = run(&e, request("no limit given", None)).await;
    assert!(out.usage.completion_tokens <= 5);

    let out = run(&e, request("zero", Some(0))).await;
    assert_eq!(out.usage.completion_tokens, 0);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert!(out.deltas.is_empty());
}

#[tokio::test(start_paused = true)]
async fn stop_sequences_end_the_answer_before_them() {
    let e = engine(SimConfig::default());
    let full = run(&e, request("Say something long.", Some(40))).await;
    let words: Vec<&str> = full.text.split(' ').collect();
    assert!(words.len() >= 20);

    // A stop string spanning a word boundary, taken from the middle of the answer.
    let stop = format!("{} {}", &words[6][1..], words[7]);
    let cut = full.text.find(&stop).unwrap();
    let mut req = request("Say something long.", Some(40));
    req.stop = vec!["never-generated".to_owned(), stop.clone()];
    let out = run(&e, req).await;
    assert_eq!(out.text, full.text[..cut]);
    assert!(!out.text.contains(&stop));
    assert_eq!(out.finish_reason, FinishReason::StopSequence);
    // The token the stop string starts in was generated, so it is counted.
    assert_eq!(
        out.usage.completion_tokens as usize,
        out.deltas.len(),
        "{:?}",
        out.deltas
    );

    // A stop string matching the very start leaves nothing to send.
    let mut req = request("Say something long.", Some(40));
    req.stop = vec![words[0].to_owned()];
    let out = run(&e, req).await;
    assert_eq!(out.text, "");
    assert_eq!(out.usage.completion_tokens, 0);
    assert_eq!(out.finish_reason, FinishReason::StopSequence);

    // Stop strings that never occur change nothing.
    let mut req = request("Say something long.", Some(40));
    req.stop = vec!["zzz".to_owned(), String::new()];
    let out = run(&e, req).await;
    assert_eq!(out.text, full.text);
    assert_eq!(out.finish_reason, full.finish_reason);
}

#[tokio::test(start_paused = true)]
async fn admission_runs_then_queues_then_refuses() {
    let cfg = SimConfig {
        slots: 2,
        queue_limit: 1,
        retry_after: Duration::from_millis(750),
        ..SimConfig::default()
    };
    let e = engine(cfg);
    assert_eq!(e.load(), load(2, 0, 1, 0));
    let a = e.generate(request("a", None)).await.unwrap();
    let b = e.generate(request("b", None)).await.unwrap();
    assert_eq!(e.load(), load(2, 2, 1, 0));
    let c = e.generate(request("c", None)).await.unwrap();
    assert_eq!(e.load(), load(2, 2, 1, 1));

    let err = e.generate(request("d", None)).await.err().unwrap();
    match &err {
        BackendError::Capacity {
            retry_after,
            message,
        } => {
            assert_eq!(*retry_after, Some(Duration::from_millis(750)));
            assert!(message.contains("llama-sim"), "{message}");
            assert!(message.contains("eu-west"), "{message}");
        }
        other => panic!("expected Capacity, got {other:?}"),
    }
    assert!(err.retryable());
    assert!(err.trips_cooldown());
    // A refusal leaves no trace in the load.
    assert_eq!(e.load(), load(2, 2, 1, 1));
    drop((a, b, c));
    assert_eq!(e.load(), load(2, 0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_running_stream_lets_the_queued_one_start() {
    let cfg = SimConfig {
        slots: 2,
        queue_limit: 1,
        ..SimConfig::default()
    };
    let ttft = cfg.ttft(prompt_tokens(&request("c", None).messages));
    let e = engine(cfg);
    let a = e.generate(request("a", Some(64))).await.unwrap();
    let b = e.generate(request("b", Some(64))).await.unwrap();
    let mut c = e.generate(request("c", Some(64))).await.unwrap();
    assert_eq!(e.load(), load(2, 2, 1, 1));

    // Let some virtual time pass while c waits: it must not start on its own.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(a);
    let hung_up = Instant::now();
    assert_eq!(e.load().running, 1);

    let first = tokio::spawn(async move {
        let chunk = c.next().await.unwrap().unwrap();
        (Instant::now(), chunk, c)
    });
    settle().await;
    assert_eq!(e.load(), load(2, 2, 1, 0));
    let (at, chunk, c) = first.await.unwrap();
    assert!(matches!(chunk, Chunk::Delta(_)));
    assert_close(at - hung_up, ttft);

    // The queue place is free again.
    let d = e.generate(request("d", None)).await.unwrap();
    assert_eq!(e.load(), load(2, 2, 1, 1));
    drop((b, c, d));
    assert_eq!(e.load(), load(2, 0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_queued_stream_leaves_the_queue() {
    let e = engine(SimConfig {
        slots: 1,
        queue_limit: 1,
        ..SimConfig::default()
    });
    let a = e.generate(request("a", None)).await.unwrap();
    let b = e.generate(request("b", None)).await.unwrap();
    assert_eq!(e.load(), load(1, 1, 1, 1));
    assert!(matches!(
        e.generate(request("c", None)).await,
        Err(BackendError::Capacity { .. })
    ));
    drop(b);
    assert_eq!(e.load(), load(1, 1, 1, 0));
    let c = e.generate(request("c", None)).await.unwrap();
    assert_eq!(e.load(), load(1, 1, 1, 1));

    // The slot b would have had goes to c.
    drop(a);
    let out = drain(c).await;
    assert!(out.usage.completion_tokens > 0);
    assert_eq!(e.load(), load(1, 0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_while_it_is_being_polled_frees_everything() {
    let e = engine(SimConfig {
        slots: 1,
        queue_limit: 1,
        ..SimConfig::default()
    });
    let mut a = e.generate(request("a", None)).await.unwrap();
    let mut b = e.generate(request("b", None)).await.unwrap();
    // Both streams are parked inside their futures: a in its first-token wait, b in the queue.
    let pending_a = tokio::time::timeout(Duration::from_millis(10), a.next()).await;
    assert!(pending_a.is_err());
    let pending_b = tokio::time::timeout(Duration::from_millis(10), b.next()).await;
    assert!(pending_b.is_err());
    drop(b);
    drop(a);
    assert_eq!(e.load(), load(1, 0, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn queue_is_first_in_first_out_even_if_polled_out_of_order() {
    let e = engine(SimConfig {
        slots: 1,
        queue_limit: 2,
        ..SimConfig::default()
    });
    let a = e.generate(request("a", Some(4))).await.unwrap();
    let b = e.generate(request("b", Some(4))).await.unwrap();
    let c = e.generate(request("c", Some(4))).await.unwrap();
    // c's reader is ready first; b was admitted first and must still go first.
    let c_task = tokio::spawn(drain(c));
    settle().await;
    let b_task = tokio::spawn(drain(b));
    settle().await;
    drop(a);
    let (b_out, c_out) = (b_task.await.unwrap(), c_task.await.unwrap());
    assert!(b_out.done_at < c_out.deltas[0].0);
}

#[tokio::test(start_paused = true)]
async fn a_finished_stream_frees_its_slot_before_it_is_dropped() {
    let e = engine(SimConfig {
        slots: 1,
        queue_limit: 0,
        ..SimConfig::default()
    });
    let mut a = e.generate(request("a", Some(3))).await.unwrap();
    while let Some(chunk) = a.next().await {
        if matches!(chunk.unwrap(), Chunk::Done { .. }) {
            break;
        }
    }
    assert_eq!(e.load().running, 0);
    let b = e.generate(request("b", Some(3))).await.unwrap();
    assert_eq!(e.load().running, 1);
    drop((a, b));
}

#[tokio::test(start_paused = true)]
async fn first_token_and_decode_follow_the_configured_rates() {
    let cfg = SimConfig::default();
    let req = request(&"word ".repeat(400), Some(30));
    let prompt = prompt_tokens(&req.messages);
    assert!(prompt > 400);
    // 80 ms plus the prompt at 4000 tokens/s.
    let ttft = Duration::from_secs_f64(0.080 + f64::from(prompt) / 4000.0);
    assert_close(cfg.ttft(prompt), ttft);
    let step = Duration::from_millis(25);

    let e = engine(cfg);
    let start = Instant::now();
    let out = run(&e, req).await;
    assert_close(out.deltas[0].0 - start, ttft);
    for pair in out.deltas.windows(2) {
        assert_close(pair[1].0 - pair[0].0, step);
    }
    let n = out.deltas.len() as u32;
    assert!(n >= 15);
    assert_close(out.done_at - start, ttft + step * (n - 1));
}

#[tokio::test(start_paused = true)]
async fn time_scale_shrinks_every_delay() {
    let cfg = SimConfig {
        time_scale: 0.01,
        ..SimConfig::default()
    };
    let req = request("quick", Some(64));
    let prompt = prompt_tokens(&req.messages);
    let ttft = Duration::from_secs_f64((0.080 + f64::from(prompt) / 4000.0) * 0.01);
    let e = engine(cfg);
    let start = Instant::now();
    let out = run(&e, req).await;
    assert_close(out.deltas[0].0 - start, ttft);
    // 0.25 ms per token is below the batching threshold: several tokens per delta.
    let n = out.usage.completion_tokens;
    assert!(out.deltas.len() < n as usize);
    assert_eq!(out.text.split_whitespace().count(), n as usize);
    let decode = Duration::from_micros(250) * (n - 1);
    assert_close(out.done_at - start, ttft + decode);
}

#[tokio::test(start_paused = true)]
async fn fast_decoding_is_batched() {
    let e = engine(SimConfig {
        decode_tokens_per_s: 100_000.0,
        ..SimConfig::default()
    });
    let start = Instant::now();
    let out = run(&e, request("fast", Some(2000))).await;
    let n = out.usage.completion_tokens as usize;
    assert!(n >= 1000);
    assert_eq!(out.text.split_whitespace().count(), n);
    // 20 ms of decoding at 10 µs per token, in batches about a millisecond apart.
    assert!(out.deltas.len() <= 30, "{} deltas", out.deltas.len());
    let ttft = e
        .config()
        .ttft(prompt_tokens(&request("fast", None).messages));
    assert_close(
        out.done_at - start,
        ttft + Duration::from_micros(10) * (n as u32 - 1),
    );
}

#[tokio::test(start_paused = true)]
async fn queued_request_waits_for_the_slot_then_its_own_first_token() {
    let cfg = SimConfig {
        slots: 1,
        queue_limit: 1,
        ..SimConfig::default()
    };
    let e = engine(cfg);
    let a = e.generate(request("first", Some(8))).await.unwrap();
    let b = e.generate(request("second", Some(8))).await.unwrap();
    let b_task = tokio::spawn(drain(b));
    let a_out = drain(a).await;
    let b_out = b_task.await.unwrap();
    let ttft_b = e
        .config()
        .ttft(prompt_tokens(&request("second", None).messages));
    assert_close(b_out.deltas[0].0 - a_out.done_at, ttft_b);
}

#[tokio::test(start_paused = true)]
async fn first_token_time_counts_from_admission_not_from_the_first_read() {
    let e = engine(SimConfig::default());
    let req = request("late reader", Some(8));
    let ttft = e.config().ttft(prompt_tokens(&req.messages));
    let start = Instant::now();
    let mut stream = e.generate(req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(40)).await;
    stream.next().await.unwrap().unwrap();
    assert_close(Instant::now() - start, ttft);
}

#[tokio::test(start_paused = true)]
async fn bad_requests_are_refused_without_touching_the_load() {
    let e = engine(SimConfig {
        slots: 1,
        queue_limit: 0,
        context_tokens: 100,
        ..SimConfig::default()
    });
    let mut empty = request("x", None);
    empty.messages.clear();
    let err = e.generate(empty).await.err().unwrap();
    assert_eq!(
        err,
        BackendError::BadRequest("messages must not be empty".to_owned())
    );
    assert!(!err.retryable());
    assert!(!err.trips_cooldown());

    let long = request(&"word ".repeat(60), Some(50));
    let prompt = prompt_tokens(&long.messages);
    let err = e.generate(long).await.err().unwrap();
    match &err {
        BackendError::BadRequest(message) => {
            assert!(message.contains(&format!("{prompt} tokens")), "{message}");
            assert!(message.contains("100"), "{message}");
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert!(!err.trips_cooldown());
    assert_eq!(e.load(), load(1, 0, 0, 0));

    // Fits exactly: prompt plus max_tokens equal to the context is allowed.
    let fits = request("short", None);
    let room = 100 - prompt_tokens(&fits.messages);
    let a = e.generate(request("short", Some(room))).await.unwrap();
    // Even with the engine full, a bad request is a bad request, not a capacity error.
    let mut empty = request("x", None);
    empty.messages.clear();
    assert!(matches!(
        e.generate(empty).await,
        Err(BackendError::BadRequest(_))
    ));
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admission_never_overfills() {
    let e = engine(SimConfig {
        slots: 4,
        queue_limit: 4,
        time_scale: 0.001,
        ..SimConfig::default()
    });
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let e = e.clone();
            tokio::spawn(async move { e.generate(request(&format!("p{i}"), None)).await })
        })
        .collect();
    let mut admitted = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(stream) => admitted.push(stream),
            Err(BackendError::Capacity { .. }) => refused += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    // Nobody reads, so nothing finishes: exactly slots + queue get in.
    assert_eq!(admitted.len(), 8);
    assert_eq!(refused, 56);
    assert_eq!(e.load(), load(4, 4, 4, 4));

    let outs = futures::future::join_all(admitted.into_iter().map(drain)).await;
    assert!(outs.iter().all(|o| o.usage.completion_tokens > 0));
    assert_eq!(e.load(), load(4, 0, 4, 0));
}

#[tokio::test(start_paused = true)]
async fn polling_past_the_end_keeps_returning_none() {
    let e = engine(SimConfig::default());
    let mut stream = e.generate(request("end", Some(2))).await.unwrap();
    while stream.next().await.is_some() {}
    assert!(stream.next().await.is_none());
    assert!(stream.next().await.is_none());
}

/// A chunk's tokens: about one per word or punctuation mark, so a batch of several tokens
/// in one chunk counts as several, and a one-token chunk as one.
#[test]
fn chunk_tokens_count_batched_tokens() {
    use crisp_engine::count_chunk_tokens;
    assert_eq!(count_chunk_tokens(""), 0);
    assert_eq!(count_chunk_tokens(" "), 1);
    assert_eq!(count_chunk_tokens("lorem "), 1);
    assert_eq!(count_chunk_tokens("ing"), 1);
    assert_eq!(count_chunk_tokens("lorem ipsum dolor, "), 4);
}
