//! The client-facing APIs. Each dialect module owns its wire format and maps
//! [`crate::error::PipelineError`] to its own status codes and error bodies.

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::Node;

pub mod bedrock;
pub mod openai;
pub mod ops;

/// The header every inference response carries: the region that ran the model. (Names
/// built at compile time: a name parsed from a string at each insert is copied each time.)
pub const INFERENCE_REGION_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-crisp-inference-region");
/// The request ID, also in logs.
pub const REQUEST_ID_HEADER: http::HeaderName = http::HeaderName::from_static("x-crisp-request-id");

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::list_models))
        .route("/healthz", get(ops::healthz))
        .route("/crisp/v1/fleet", get(ops::fleet))
        .merge(bedrock::routes())
        .fallback(openai::not_found)
        .with_state(node)
}
