//! The inter-node protocol: the only place that knows its bytes.
//!
//! - `POST /crisp/peer/v1/generate`: a request the source forwards to a destination. The
//!   answer is `200` with newline-delimited JSON [`StreamEvent`]s once the destination's
//!   engine admitted it, or an error status with one [`PeerError`].
//! - `GET /crisp/peer/v1/telemetry`: newline-delimited JSON [`LoadReport`]s, pushed every
//!   telemetry interval for as long as the connection lives.
//!
//! Every link is mutual TLS (`crisp-transport`); the destination checks that the claimed
//! source region is the one its peer certificate names.
//!
//! Stability promise: nodes of adjacent releases must understand each other; fields are
//! only ever added, with defaults.

use crisp_transport::SignedReceipt;
use serde::{Deserialize, Serialize};

pub const GENERATE_PATH: &str = "/crisp/peer/v1/generate";
pub const TELEMETRY_PATH: &str = "/crisp/peer/v1/telemetry";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerMessage {
    pub role: String,
    pub content: String,
}

/// A request forwarded from a source region.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GenerateRequest {
    pub request_id: String,
    /// The region the client called.
    pub source_region: String,
    /// The profile or model ID the client asked for; the destination re-checks that it
    /// is itself inside that boundary.
    pub profile: String,
    pub model: String,
    pub messages: Vec<PeerMessage>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub stop: Vec<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// One line of a forwarded generation's answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum StreamEvent {
    Delta(String),
    Done {
        finish_reason: String,
        usage: WireUsage,
        /// The destination's signed statement of where it ran.
        #[serde(default)]
        receipt: Option<SignedReceipt>,
    },
    Error(PeerError),
}

/// Why a destination refused or broke off a request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerError {
    pub kind: PeerErrorKind,
    pub message: String,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// An answer that broke off after it began: the destination's signed statement of
    /// where it ran and what it produced until then (the estimated tokens of the prompt and
    /// of the text sent), so the source's event of it is proven like a completed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<crisp_transport::SignedReceipt>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PeerErrorKind {
    /// The engine is full (429).
    Capacity,
    /// The destination is not inside the request's boundary (403).
    OutsideBoundary,
    /// The request is wrong for the model (400).
    BadRequest,
    Timeout,
    Unavailable,
    Internal,
}

impl PeerErrorKind {
    pub fn status(self) -> u16 {
        match self {
            PeerErrorKind::Capacity => 429,
            PeerErrorKind::OutsideBoundary => 403,
            PeerErrorKind::BadRequest => 400,
            PeerErrorKind::Timeout => 504,
            PeerErrorKind::Unavailable => 503,
            PeerErrorKind::Internal => 500,
        }
    }
}

/// A region's load, pushed to its peers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub region: String,
    pub models: Vec<ModelLoad>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelLoad {
    pub model: String,
    pub slots: u32,
    pub running: u32,
    pub queue_limit: u32,
    pub waiting: u32,
}
