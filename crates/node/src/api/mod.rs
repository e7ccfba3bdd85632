//! The client-facing APIs. Each dialect module owns its wire format and maps
//! [`crate::error::PipelineError`] to its own status codes and error bodies.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};

use crate::Node;
use crate::error::PipelineError;

pub mod bedrock;
mod json;
pub mod openai;
pub mod ops;
pub mod responses;

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
        .route("/v1/models/{*id}", get(openai::retrieve_model))
        .route("/v1/responses", post(responses::create))
        .route("/healthz", get(ops::healthz))
        .route("/crisp/v1/fleet", get(ops::fleet))
        .merge(bedrock::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(node)
}

/// What this node serves, for the errors of requests it does not.
const OPENAI_ROUTES: &str = "POST /v1/chat/completions, POST /v1/responses, GET /v1/models, GET /v1/models/{id}, GET /healthz and GET /crisp/v1/fleet";
const BEDROCK_ROUTES: &str = "Converse, ConverseStream, InvokeModel, InvokeModelWithResponseStream, CountTokens (POST /model/{id}/converse, /converse-stream, /invoke, /invoke-with-response-stream, /count-tokens), ListInferenceProfiles, GetInferenceProfile, CreateInferenceProfile, DeleteInferenceProfile (/inference-profiles) and ListFoundationModels, GetFoundationModel (GET /foundation-models)";

/// Whether a request comes from a Bedrock SDK (signed with SigV4, or on one of Bedrock's
/// paths), whose errors must have Bedrock's shape for the SDK to show their message.
fn is_bedrock(req: &Request) -> bool {
    let signed = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256"));
    let path = req.uri().path();
    signed
        || ["/model/", "/inference-profiles", "/foundation-models"]
            .iter()
            .any(|p| path.starts_with(p))
}

async fn not_found(req: Request) -> Response {
    let (method, path) = (req.method(), req.uri().path());
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    if is_bedrock(&req) {
        let message = format!("no operation at {method} {path}; this node serves {BEDROCK_ROUTES}");
        return bedrock::error(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            &message,
            &request_id,
        );
    }
    let message = format!("no route for {method} {path}; this node serves {OPENAI_ROUTES}");
    openai::error_body(StatusCode::NOT_FOUND, "unknown_url", &message, &request_id)
}

/// The answer to a known path called with the wrong method, in the caller's dialect. The
/// router adds the `Allow` header.
async fn method_not_allowed(req: Request) -> Response {
    let path = req.uri().path();
    let allowed =
        if path == "/v1/chat/completions" || path == "/v1/responses" || path.starts_with("/model/")
        {
            "POST"
        } else if path == "/inference-profiles" {
            "GET (list) or POST (create)"
        } else if path.starts_with("/inference-profiles/") {
            "GET (read) or DELETE"
        } else {
            "GET"
        };
    let message = format!(
        "{path} does not take {}; send it with {allowed}",
        req.method()
    );
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    if is_bedrock(&req) {
        return bedrock::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UnknownOperationException",
            &message,
            &request_id,
        );
    }
    openai::error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &message,
        &request_id,
    )
}

/// Reads a request body of at most `limits.max_body_bytes`, refusing at once one whose
/// declared length is larger, and giving up when no byte arrives for
/// `limits.body_read_timeout` (a client that stops sending must not hold its connection).
pub(crate) async fn read_body(
    headers: &http::HeaderMap,
    mut body: axum::body::Body,
    limits: &crisp_catalog::Limits,
) -> Result<bytes::Bytes, PipelineError> {
    use futures::FutureExt;
    use http_body_util::BodyExt;

    let limit = limits.max_body_bytes;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(PipelineError::TooLarge { limit });
    }
    let mut first: Option<bytes::Bytes> = None;
    let mut more: Option<bytes::BytesMut> = None;
    loop {
        // Most bodies have arrived with their head: no timer for them.
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => tokio::time::timeout(limits.body_read_timeout, body.frame())
                .await
                .map_err(|_| PipelineError::BodyTimeout {
                    waited: limits.body_read_timeout,
                })?,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            PipelineError::InvalidRequest(format!("could not read the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let had =
            first.as_ref().map_or(0, bytes::Bytes::len) + more.as_ref().map_or(0, |m| m.len());
        if had + data.len() > limit {
            return Err(PipelineError::TooLarge { limit });
        }
        match (&mut first, &mut more) {
            (None, _) => first = Some(data),
            (Some(f), None) => {
                let mut m =
                    bytes::BytesMut::with_capacity(declared.unwrap_or(0).max(f.len() + data.len()));
                m.extend_from_slice(f);
                m.extend_from_slice(&data);
                more = Some(m);
            }
            (Some(_), Some(m)) => m.extend_from_slice(&data),
        }
    }
    Ok(match more {
        Some(m) => m.freeze(),
        None => first.unwrap_or_default(),
    })
}
