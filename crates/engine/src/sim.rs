//! A simulated model server: the engine a region runs when there is no GPU.
//!
//! It behaves like a continuous-batching server from the outside, which is all the router
//! can observe: a fixed number of sequence slots, a bounded FIFO waiting queue behind them,
//! a time to first token that grows with the prompt, a steady per-sequence decode rate,
//! and a `429`-style [`BackendError::Capacity`] once slots and queue are both full.
//!
//! The generated text is nonsense drawn from a small vocabulary, but it is a pure function
//! of the model name and the messages, so every region serving the same model answers a
//! request with the same words. That keeps failover and cross-region tests comparable.
//!
//! All waiting uses `tokio::time`, so tests running with a paused clock see exact virtual
//! timings without sleeping; [`SimConfig::time_scale`] speeds real-time demos up.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::{
    Backend, BackendError, Chunk, ChunkStream, EngineLoad, FinishReason, GenerateRequest, Message,
    Usage,
};

pub use crate::{MESSAGE_OVERHEAD_TOKENS, prompt_tokens};

/// Below this spacing, tokens are sent in batches: one timer per token at thousands of
/// tokens per second would cost more than the simulated work.
const MIN_EMIT_GAP: Duration = Duration::from_millis(1);

/// Ceiling on any single simulated delay, so a zero or absurd rate in the configuration
/// gives a very slow engine instead of an overflow.
const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// How a simulated engine performs.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Sequences generated concurrently.
    pub slots: u32,
    /// Requests allowed to wait for a slot; one more is refused with `Capacity`.
    pub queue_limit: u32,
    /// Prompt processing rate.
    pub prefill_tokens_per_s: f64,
    /// Generation rate of each sequence.
    pub decode_tokens_per_s: f64,
    /// Time to first token on top of prefill.
    pub base_ttft_ms: f64,
    /// Generation limit when the request sets none.
    pub default_max_tokens: u32,
    /// Suggested back-off carried by `Capacity` errors.
    pub retry_after: Duration,
    /// Multiplies every delay: 1.0 is real time, 0.01 runs a hundred times faster.
    pub time_scale: f64,
    /// Context window: prompt tokens plus `max_tokens` must fit in it.
    pub context_tokens: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            slots: 8,
            queue_limit: 16,
            prefill_tokens_per_s: 4000.0,
            decode_tokens_per_s: 40.0,
            base_ttft_ms: 80.0,
            default_max_tokens: 64,
            retry_after: Duration::from_secs(1),
            time_scale: 1.0,
            context_tokens: 8192,
        }
    }
}

impl SimConfig {
    /// Time from getting a slot to the first token for a prompt of `prompt_tokens`.
    pub fn ttft(&self, prompt_tokens: u32) -> Duration {
        let prefill_ms = if self.prefill_tokens_per_s > 0.0 {
            f64::from(prompt_tokens) / self.prefill_tokens_per_s * 1000.0
        } else {
            f64::INFINITY
        };
        scaled_secs((self.base_ttft_ms + prefill_ms) / 1000.0, self.time_scale)
    }

    /// Spacing between two generated tokens of one sequence.
    pub fn token_interval(&self) -> Duration {
        let secs = if self.decode_tokens_per_s > 0.0 {
            1.0 / self.decode_tokens_per_s
        } else {
            f64::INFINITY
        };
        scaled_secs(secs, self.time_scale)
    }
}

/// `secs * scale` as a duration, clamped to `[0, MAX_DELAY]`; NaN counts as zero.
fn scaled_secs(secs: f64, scale: f64) -> Duration {
    let scaled = secs * scale;
    if scaled.is_nan() || scaled <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(scaled).map_or(MAX_DELAY, |d| d.min(MAX_DELAY))
}

/// A simulated model server for one model in one region. Clones share the same slots and
/// queue.
#[derive(Clone)]
pub struct SimEngine {
    inner: Arc<Inner>,
}

struct Inner {
    model: String,
    region: String,
    cfg: SimConfig,
    slots: Arc<Semaphore>,
    running: Arc<AtomicU32>,
    waiting: Arc<AtomicU32>,
}

impl fmt::Debug for SimEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimEngine")
            .field("model", &self.inner.model)
            .field("region", &self.inner.region)
            .field("config", &self.inner.cfg)
            .field("load", &self.inner.load())
            .finish()
    }
}

impl SimEngine {
    pub fn new(model: &str, region: &str, cfg: SimConfig) -> SimEngine {
        let permits = usize::try_from(cfg.slots)
            .unwrap_or(Semaphore::MAX_PERMITS)
            .min(Semaphore::MAX_PERMITS);
        SimEngine {
            inner: Arc::new(Inner {
                model: model.to_owned(),
                region: region.to_owned(),
                slots: Arc::new(Semaphore::new(permits)),
                running: Arc::new(AtomicU32::new(0)),
                waiting: Arc::new(AtomicU32::new(0)),
                cfg,
            }),
        }
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    /// The model this engine serves; it seeds the generated text.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    pub fn region(&self) -> &str {
        &self.inner.region
    }
}

impl Backend for SimEngine {
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<ChunkStream, BackendError>> {
        let inner = Arc::clone(&self.inner);
        // Admission has no await point, so it is decided in the first poll, atomically with
        // respect to the counters other requests see.
        Box::pin(async move { inner.admit(&req) })
    }

    fn load(&self) -> EngineLoad {
        self.inner.load()
    }
}

impl Inner {
    fn load(&self) -> EngineLoad {
        EngineLoad {
            slots: self.cfg.slots,
            running: self.running.load(Ordering::Acquire),
            queue_limit: self.cfg.queue_limit,
            waiting: self.waiting.load(Ordering::Acquire),
        }
    }

    fn admit(&self, req: &GenerateRequest) -> Result<ChunkStream, BackendError> {
        // A malformed request is refused before it can look like load: it must never be
        // reported as capacity, which would push healthy regions into cool-down.
        if req.messages.is_empty() {
            return Err(BackendError::BadRequest(
                "messages must not be empty".to_owned(),
            ));
        }
        let prompt = prompt_tokens(&req.messages);
        let max_tokens = req.max_tokens.unwrap_or(self.cfg.default_max_tokens);
        if u64::from(prompt) + u64::from(max_tokens) > u64::from(self.cfg.context_tokens) {
            let limit = if req.max_tokens.is_some() {
                format!("the answer may take up to {max_tokens} tokens")
            } else {
                format!("the answer may take up to {max_tokens} tokens (the engine's default)")
            };
            return Err(BackendError::BadRequest(format!(
                "the prompt has {prompt} tokens and {limit}, which exceeds the context limit of \
                 {} tokens for model {}; shorten the prompt or ask for fewer tokens",
                self.cfg.context_tokens, self.model
            )));
        }

        let slot = self.take_slot_or_queue()?;
        let (pieces, finish_reason) =
            plan_output(&self.model, &req.messages, max_tokens, &req.stop);
        let generation = Generation {
            slot,
            running: Arc::clone(&self.running),
            pieces,
            finish_reason,
            prompt_tokens: prompt,
            ttft: self.cfg.ttft(prompt),
            interval: self.cfg.token_interval(),
            first_token_at: None,
            emitted: 0,
            last_emit: None,
            finished: false,
        };
        // Fused so that a reader polling past the end keeps getting `None`.
        Ok(Box::pin(
            futures::stream::unfold(generation, Generation::step).fuse(),
        ))
    }

    fn take_slot_or_queue(&self) -> Result<Slot, BackendError> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => return Ok(Slot::running(permit, &self.running)),
            Err(TryAcquireError::Closed) => return Err(closed()),
            // Tokio's semaphore hands released permits to queued waiters first, so a
            // `try_acquire` that succeeds never overtakes a request already waiting.
            Err(TryAcquireError::NoPermits) => {}
        }

        let limit = self.cfg.queue_limit;
        let Some(waiting) = CountGuard::try_increment(&self.waiting, limit) else {
            return Err(BackendError::Capacity {
                retry_after: Some(self.cfg.retry_after),
                message: format!(
                    "engine for model {} in region {} is full: {} of {} slots running, {} of {} \
                     queue places taken",
                    self.model,
                    self.region,
                    self.running.load(Ordering::Acquire),
                    self.cfg.slots,
                    self.waiting.load(Ordering::Acquire),
                    limit
                ),
            });
        };

        // Register in the semaphore's FIFO now rather than on the stream's first poll, so
        // queue order is admission order even if callers poll their streams late. The
        // waker is replaced by the stream's own on its first poll. `unconstrained` keeps
        // tokio's cooperative budget from returning `Pending` without queueing.
        let mut acquire: AcquireFuture = Box::pin(tokio::task::unconstrained(
            Arc::clone(&self.slots).acquire_owned(),
        ));
        match acquire
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            // A slot came free between the two checks.
            Poll::Ready(Ok(permit)) => Ok(Slot::running(permit, &self.running)),
            Poll::Ready(Err(_)) => Err(closed()),
            Poll::Pending => Ok(Slot::Queued {
                acquire,
                _waiting: waiting,
            }),
        }
    }
}

fn closed() -> BackendError {
    BackendError::Internal("simulated engine is shut down".to_owned())
}

type AcquireFuture =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Decrements its counter when dropped, so no exit path (completion, error, a client
/// hanging up mid-stream) can leave the load figures inflated.
struct CountGuard(Arc<AtomicU32>);

impl CountGuard {
    fn increment(counter: &Arc<AtomicU32>) -> CountGuard {
        counter.fetch_add(1, Ordering::AcqRel);
        CountGuard(Arc::clone(counter))
    }

    /// Increments only while the counter is below `limit`.
    fn try_increment(counter: &Arc<AtomicU32>, limit: u32) -> Option<CountGuard> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| CountGuard(Arc::clone(counter)))
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Slot {
    Queued {
        acquire: AcquireFuture,
        _waiting: CountGuard,
    },
    Running {
        _permit: OwnedSemaphorePermit,
        _running: CountGuard,
        admitted_at: Instant,
    },
    Released,
}

impl Slot {
    fn running(permit: OwnedSemaphorePermit, running: &Arc<AtomicU32>) -> Slot {
        Slot::Running {
            _permit: permit,
            _running: CountGuard::increment(running),
            admitted_at: Instant::now(),
        }
    }
}

/// One request's progress. The stream owns it, so dropping the stream releases the slot or
/// the queue place at once.
struct Generation {
    slot: Slot,
    running: Arc<AtomicU32>,
    pieces: Vec<String>,
    finish_reason: FinishReason,
    prompt_tokens: u32,
    ttft: Duration,
    interval: Duration,
    first_token_at: Option<Instant>,
    emitted: usize,
    last_emit: Option<Instant>,
    finished: bool,
}

impl Generation {
    async fn step(mut self) -> Option<(Result<Chunk, BackendError>, Generation)> {
        if self.finished {
            return None;
        }

        if let Slot::Queued { acquire, .. } = &mut self.slot {
            let outcome = acquire.as_mut().await;
            // Replacing the slot drops the queue place's guard.
            self.slot = match outcome {
                Ok(permit) => Slot::running(permit, &self.running),
                Err(_) => {
                    self.finish();
                    return Some((Err(closed()), self));
                }
            };
        }

        let first_token_at = match self.first_token_at {
            Some(at) => at,
            None => {
                // Measured from admission, not from the first poll: the engine works on the
                // prompt whether or not the client is reading yet.
                let admitted_at = match &self.slot {
                    Slot::Running { admitted_at, .. } => *admitted_at,
                    Slot::Queued { .. } | Slot::Released => Instant::now(),
                };
                let at = later(admitted_at, self.ttft);
                tokio::time::sleep_until(at).await;
                self.first_token_at = Some(at);
                at
            }
        };

        let total = self.pieces.len();
        if self.emitted < total {
            let mut due_at = later(
                first_token_at,
                self.interval.saturating_mul(as_u32(self.emitted)),
            );
            if let Some(last) = self.last_emit {
                due_at = due_at.max(later(last, MIN_EMIT_GAP));
            }
            tokio::time::sleep_until(due_at).await;
            let now = Instant::now();
            // Everything due by now goes out together: a batch when tokens are closer than
            // the minimum gap, a catch-up when the reader fell behind.
            let due = if self.interval.is_zero() {
                total
            } else {
                let elapsed = now.saturating_duration_since(first_token_at);
                usize::try_from(elapsed.as_nanos() / self.interval.as_nanos())
                    .unwrap_or(usize::MAX)
                    .saturating_add(1)
            };
            let upto = due.clamp(self.emitted + 1, total);
            let text: String = self.pieces[self.emitted..upto].concat();
            self.emitted = upto;
            self.last_emit = Some(now);
            return Some((Ok(Chunk::Delta(text)), self));
        }

        let usage = Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: as_u32(self.emitted),
        };
        let finish_reason = self.finish_reason;
        self.finish();
        Some((
            Ok(Chunk::Done {
                finish_reason,
                usage,
            }),
            self,
        ))
    }

    /// Frees the slot as soon as the answer is complete, even if the client keeps the
    /// stream around.
    fn finish(&mut self) {
        self.finished = true;
        self.slot = Slot::Released;
    }
}

fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(MAX_DELAY))
        .unwrap_or(t)
}

fn as_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Plain words, one token each.
const VOCAB: [&str; 64] = [
    "the", "a", "model", "region", "answer", "request", "token", "river", "stone", "light",
    "quiet", "bright", "small", "large", "early", "late", "north", "south", "east", "west",
    "cloud", "rain", "wind", "field", "garden", "window", "paper", "signal", "engine", "bridge",
    "market", "harbor", "valley", "forest", "summer", "winter", "morning", "evening", "simple",
    "careful", "steady", "gentle", "rapid", "open", "closed", "green", "blue", "silver", "golden",
    "and", "of", "to", "in", "with", "under", "over", "near", "through", "before", "after", "is",
    "was", "will", "can",
];

/// The tokens the engine will send for this request, already cut at any stop sequence, and
/// why it stops.
fn plan_output(
    model: &str,
    messages: &[Message],
    max_tokens: u32,
    stop: &[String],
) -> (Vec<String>, FinishReason) {
    let seed = seed_of(model, messages);
    // The length draws from its own generator, so a smaller `max_tokens` yields a prefix of
    // the same words rather than a different answer.
    let mut length_rng =
        SplitMix64(seed ^ u64::from(max_tokens).wrapping_mul(0xA076_1D64_78BD_642F));
    let length = natural_length(&mut length_rng, max_tokens);
    let mut finish_reason = if length < max_tokens {
        FinishReason::Stop
    } else {
        FinishReason::Length
    };

    let mut word_rng = SplitMix64(seed);
    let mut pieces: Vec<String> = (0..length)
        .map(|i| {
            let word = VOCAB[word_rng.below(VOCAB.len() as u64) as usize];
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect();

    if let Some(cut) = first_stop(&pieces.concat(), stop) {
        truncate_pieces(&mut pieces, cut);
        finish_reason = FinishReason::StopSequence;
    }
    (pieces, finish_reason)
}

/// Half the time the answer runs to the limit; otherwise it ends on its own somewhere in
/// the upper half of the allowance, like a model that has said what it had to say.
fn natural_length(rng: &mut SplitMix64, max_tokens: u32) -> u32 {
    if max_tokens == 0 || rng.next_u64() & 1 == 0 {
        return max_tokens;
    }
    let low = (max_tokens / 2).max(1);
    let span = u64::from(max_tokens - low) + 1;
    low + u32::try_from(rng.below(span)).unwrap_or(0)
}

/// Byte offset where the earliest stop sequence begins.
fn first_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Keeps only the text before byte offset `cut`. The token the cut falls in is kept in part:
/// it was generated, only its tail is withheld.
fn truncate_pieces(pieces: &mut Vec<String>, cut: usize) {
    let mut start = 0;
    for (i, piece) in pieces.iter_mut().enumerate() {
        let end = start + piece.len();
        if end > cut {
            let keep = piece.get(..cut - start).unwrap_or_default().to_owned();
            *piece = keep;
            let kept = if piece.is_empty() { i } else { i + 1 };
            pieces.truncate(kept);
            return;
        }
        start = end;
    }
}

/// FNV-1a over the model and the messages. 0xFF never occurs in UTF-8, so it separates
/// fields unambiguously.
fn seed_of(model: &str, messages: &[Message]) -> u64 {
    const OFFSET: u64 = 0xCBF2_9CE4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01B3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    feed(model.as_bytes());
    for m in messages {
        feed(&[0xFF]);
        feed(m.role.as_bytes());
        feed(&[0xFF]);
        feed(m.content.as_bytes());
    }
    hash
}

/// SplitMix64: tiny, fast and well mixed even from similar seeds such as FNV hashes of
/// similar prompts.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform enough in `[0, n)` for a simulation; `n` must be non-zero.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(content: &str) -> Vec<Message> {
        vec![Message {
            role: "user".to_owned(),
            content: content.to_owned(),
        }]
    }

    #[test]
    fn smaller_limit_gives_a_prefix() {
        let (long, _) = plan_output("m", &msg("hi"), 40, &[]);
        let (short, _) = plan_output("m", &msg("hi"), 10, &[]);
        assert!(long.concat().starts_with(&short.concat()));
    }

    #[test]
    fn stop_cut_inside_a_token_keeps_its_head() {
        let mut pieces = vec!["one".to_owned(), " two".to_owned(), " three".to_owned()];
        truncate_pieces(&mut pieces, 6); // "one tw|o"
        assert_eq!(pieces, ["one", " tw"]);
        let mut pieces = vec!["one".to_owned(), " two".to_owned()];
        truncate_pieces(&mut pieces, 3); // cut exactly at a token boundary
        assert_eq!(pieces, ["one"]);
        let mut pieces = vec!["one".to_owned()];
        truncate_pieces(&mut pieces, 0);
        assert!(pieces.is_empty());
    }

    #[test]
    fn natural_length_stays_in_range() {
        for seed in 0..500u64 {
            for max in [0u32, 1, 2, 3, 10, 64] {
                let n = natural_length(&mut SplitMix64(seed), max);
                assert!(n <= max);
                assert!(max == 0 || n >= (max / 2).max(1));
            }
        }
    }

    #[test]
    fn bad_rates_do_not_overflow() {
        let cfg = SimConfig {
            prefill_tokens_per_s: 0.0,
            decode_tokens_per_s: f64::NAN,
            ..SimConfig::default()
        };
        assert_eq!(cfg.ttft(10), MAX_DELAY);
        assert_eq!(cfg.token_interval(), MAX_DELAY);
        let instant = SimConfig {
            time_scale: 0.0,
            ..SimConfig::default()
        };
        assert_eq!(instant.ttft(10), Duration::ZERO);
    }
}
