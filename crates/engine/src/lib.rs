//! Model backends: the one trait the node calls to run a request in its own region, and
//! the simulated engine that stands in for a GPU model server in the demo and the tests.
//!
//! This crate knows nothing of HTTP APIs, peers or routing: it takes a plain
//! [`GenerateRequest`] and yields [`Chunk`]s.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;

pub mod event_loop;
mod http1;
pub mod metrics;
pub mod openai;
pub mod pool;
pub mod sim;

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Approximate token count of `text`, the same on every node so that usage figures agree
/// wherever a request ran.
///
/// Real tokenizers split words and punctuation apart and average about four characters per
/// token on English text; this takes the larger of the two estimates: runs of letters and
/// digits plus every other non-space character, or the character count divided by four,
/// rounded up.
pub fn count_tokens(text: &str) -> u32 {
    let (pieces, chars) = pieces_and_chars(text);
    let estimate = pieces.max(chars.div_ceil(4));
    u32::try_from(estimate).unwrap_or(u32::MAX)
}

/// Tokens in a streamed chunk of an answer: one per run of letters and digits or other
/// non-space character, and at least one for a chunk that is not empty. Engines stream
/// about one token per chunk (a word from the simulator, a subword from vLLM and
/// llama.cpp) and batch several into one chunk when they come fast; this counts either
/// way, where counting chunks would miss the batched ones.
pub fn count_chunk_tokens(chunk: &str) -> u32 {
    if chunk.is_empty() {
        return 0;
    }
    let (pieces, _) = pieces_and_chars(chunk);
    u32::try_from(pieces.max(1)).unwrap_or(u32::MAX)
}

/// Runs of letters and digits plus every other non-space character, and characters.
fn pieces_and_chars(text: &str) -> (u64, u64) {
    let mut pieces: u64 = 0;
    let mut chars: u64 = 0;
    let mut in_word = false;
    for c in text.chars() {
        chars += 1;
        if c.is_alphanumeric() {
            if !in_word {
                pieces += 1;
                in_word = true;
            }
        } else {
            in_word = false;
            if !c.is_whitespace() {
                pieces += 1;
            }
        }
    }
    (pieces, chars)
}

/// Tokens charged per message on top of its content, for the role and the chat template's
/// separators, as chat-completion APIs do.
pub const MESSAGE_OVERHEAD_TOKENS: u32 = 4;

/// The prompt's tokens as crisp estimates them: what the simulated engine charges, what an
/// OpenAI-compatible engine is billed when it reports no usage, and what an answer that
/// ended before its engine reported usage is billed.
pub fn prompt_tokens(messages: &[Message]) -> u32 {
    messages.iter().fold(0u32, |sum, m| {
        sum.saturating_add(count_tokens(&m.content))
            .saturating_add(MESSAGE_OVERHEAD_TOKENS)
    })
}

/// A request as a backend sees it: no wire format, no routing.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub request_id: String,
    pub model: String,
    pub messages: Vec<Message>,
    /// Upper bound on generated tokens; `None` means the backend's default.
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
}

/// How the answer's tokens are sampled; a setting left `None` is the engine's default.
/// Simulated engines ignore them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sampling {
    pub temperature: Option<f32>,
    /// Nucleus sampling: only the tokens within this probability mass (0 < top_p <= 1).
    pub top_p: Option<f32>,
    /// Only the `top_k` likeliest tokens (vLLM, SGLang and llama.cpp take it; 0 means no
    /// limit there).
    pub top_k: Option<u32>,
    /// Only tokens at least this likely relative to the likeliest one (0..=1; vLLM, SGLang
    /// and llama.cpp take it).
    pub min_p: Option<f32>,
    /// Multiplicative penalty for tokens already in the prompt or the answer (> 0, 1 means
    /// none; vLLM and SGLang call it `repetition_penalty`, llama.cpp `repeat_penalty`).
    pub repetition_penalty: Option<f32>,
    /// Asks the engine for repeatable sampling (engines that support it).
    pub seed: Option<i64>,
    /// Penalties (-2..2) for tokens already present, and by how often they occur.
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model ended its answer.
    Stop,
    /// One of the request's stop sequences ended it (Bedrock's `stop_sequence`; OpenAI
    /// says `stop` for both).
    StopSequence,
    /// `max_tokens` ended it.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::StopSequence => "stop",
            FinishReason::Length => "length",
        }
    }

    /// The name that tells all three apart (between regions, on the backbone).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::StopSequence => "stop_sequence",
            FinishReason::Length => "length",
        }
    }

    /// From [`FinishReason::name`] or OpenAI's `finish_reason`; anything else is `Stop`.
    pub fn from_name(name: &str) -> FinishReason {
        match name {
            "length" => FinishReason::Length,
            "stop_sequence" => FinishReason::StopSequence,
            _ => FinishReason::Stop,
        }
    }
}

/// One piece of a generation. A well-formed stream is zero or more `Delta`s, then exactly
/// one `Done`.
#[derive(Clone, Debug, PartialEq)]
pub enum Chunk {
    Delta(String),
    Done {
        finish_reason: FinishReason,
        usage: Usage,
    },
}

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, BackendError>> + Send>>;

/// Why a backend did not (fully) serve a request. Each variant says who failed and whether
/// trying another region may help.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The engine is full (HTTP 429 / 503 upstream). Another region may take it.
    #[error("engine at capacity: {message}")]
    Capacity {
        retry_after: Option<Duration>,
        message: String,
    },
    /// The engine could not be reached or broke the connection. Another region may help.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine took too long. Another region may help.
    #[error("engine timed out: {0}")]
    Timeout(String),
    /// The request itself is wrong for this model (e.g. too long). Retrying elsewhere will
    /// not help, and it says nothing about the engine's health.
    #[error("request rejected by the model: {0}")]
    BadRequest(String),
    /// The engine failed in a way that is its own fault.
    #[error("engine error: {0}")]
    Internal(String),
}

impl BackendError {
    /// What went wrong, without the kind's prefix: what a peer sends over the backbone,
    /// where the receiving node rebuilds the same kind around it.
    pub fn detail(&self) -> &str {
        match self {
            BackendError::Capacity { message, .. } => message,
            BackendError::Unavailable(m)
            | BackendError::Timeout(m)
            | BackendError::BadRequest(m)
            | BackendError::Internal(m) => m,
        }
    }

    /// Whether trying the next candidate region may succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, BackendError::BadRequest(_))
    }

    /// Whether this error should put the region into cool-down (capacity errors only; a
    /// bad prompt must never eject a healthy fleet).
    pub fn trips_cooldown(&self) -> bool {
        matches!(
            self,
            BackendError::Capacity { .. } | BackendError::Unavailable(_) | BackendError::Timeout(_)
        )
    }
}

/// Load of one backend right now, for the routing view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineLoad {
    pub slots: u32,
    pub running: u32,
    pub queue_limit: u32,
    pub waiting: u32,
}

/// A model server in this region.
pub trait Backend: Send + Sync + 'static {
    /// Admit a generation. Resolves once the engine has accepted the request into a slot or
    /// its waiting queue (or refused it); the tokens then arrive on the stream, after any
    /// queueing and the time to first token. Dropping the stream cancels the
    /// generation and frees its slot at once.
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<ChunkStream, BackendError>>;

    /// The backend's load now.
    fn load(&self) -> EngineLoad;

    /// An active health check (e.g. the server's model list). Engines that live in this
    /// process are always healthy.
    fn health(&self) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }
}
