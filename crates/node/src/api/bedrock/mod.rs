//! The Bedrock-compatible API: Converse, ConverseStream, InvokeModel (Amazon Nova's native
//! body), InvokeModelWithResponseStream, and the inference-profile control plane, signed
//! with SigV4 so `boto3` works with `endpoint_url=` pointed at a node. The only place that
//! knows Bedrock's JSON and error shapes; the request pipeline is the OpenAI API's.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crisp_catalog::profiles::{Profile, ProfileKind, ResolveError, profile_arn};
use crisp_engine::{BackendError, Chunk, FinishReason, Message, Sampling, Usage};
use crisp_policy::keys::Caller;
use futures::StreamExt;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::{INFERENCE_REGION_HEADER, REQUEST_ID_HEADER};
use crate::Node;
use crate::app_profiles::{AppProfile, AppProfileError, NewAppProfile};
use crate::audit::{self, Call, Ran};
use crate::error::PipelineError;
use crate::pipeline::{self, Admitted, InferRequest};

pub mod eventstream;
pub mod sigv4;

pub fn routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/model/{model_id}/converse", post(converse))
        .route("/model/{model_id}/converse-stream", post(converse_stream))
        .route("/model/{model_id}/invoke", post(invoke))
        .route("/model/{model_id}/count-tokens", post(count_tokens))
        .route(
            "/model/{model_id}/invoke-with-response-stream",
            post(invoke_stream),
        )
        .route(
            "/inference-profiles",
            get(list_profiles).post(create_profile),
        )
        .route(
            "/inference-profiles/{id}",
            get(get_profile).delete(delete_profile),
        )
        .route("/foundation-models", get(list_foundation_models))
        .route("/foundation-models/{id}", get(get_foundation_model))
}

// ---- errors ----

/// A Bedrock error: status, `x-amzn-ErrorType` and `{"message": ...}`.
pub fn error(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response {
    let mut r = (status, axum::Json(json!({ "message": message }))).into_response();
    if let Ok(v) = HeaderValue::from_str(kind) {
        r.headers_mut().insert("x-amzn-errortype", v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert("x-amzn-requestid", v.clone());
        r.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    r
}

/// The Bedrock exception name of a pipeline error (also the audit event's errorCode).
fn error_kind(err: &PipelineError) -> &'static str {
    error_shape(err).1
}

fn error_shape(err: &PipelineError) -> (StatusCode, &'static str) {
    match err {
        PipelineError::InvalidRequest(_)
        | PipelineError::TooLarge { .. }
        | PipelineError::ModelRejected(_) => (StatusCode::BAD_REQUEST, "ValidationException"),
        // Bedrock has no exception of its own for a client that stops sending.
        PipelineError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "ValidationException"),
        PipelineError::Unauthenticated(_) => (StatusCode::FORBIDDEN, "UnrecognizedClientException"),
        PipelineError::Denied { .. } => (StatusCode::FORBIDDEN, "AccessDeniedException"),
        PipelineError::AuditUnavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailableException",
        ),
        PipelineError::Resolve(ResolveError::Unknown { .. }) => {
            (StatusCode::NOT_FOUND, "ResourceNotFoundException")
        }
        PipelineError::Resolve(_) => (StatusCode::BAD_REQUEST, "ValidationException"),
        PipelineError::Exhausted { .. } => (StatusCode::TOO_MANY_REQUESTS, "ThrottlingException"),
        PipelineError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "ModelTimeoutException"),
        PipelineError::ModelFailed(_) => (StatusCode::FAILED_DEPENDENCY, "ModelErrorException"),
        PipelineError::Internal(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException")
        }
    }
}

fn pipeline_error(err: &PipelineError, request_id: &str) -> Response {
    let (status, kind) = error_shape(err);
    let mut r = error(status, kind, &error_message(err), request_id);
    if let Some(after) = err.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    r
}

/// What a pipeline error says to a Bedrock client.
fn error_message(err: &PipelineError) -> String {
    match err {
        // The managed service's wording, which clients and docs search for.
        PipelineError::Resolve(ResolveError::NotServedHere {
            model, profiles, ..
        }) => format!(
            "Invocation of model ID {model} with on-demand throughput isn't supported. Retry your request with the ID or ARN of an inference profile that contains this model{}",
            if profiles.is_empty() {
                String::new()
            } else {
                format!(": {}", profiles.join(", "))
            }
        ),
        other => other.to_string(),
    }
}

fn stream_exception(e: &BackendError) -> (&'static str, String) {
    match e {
        BackendError::Capacity { message, .. } => ("throttlingException", message.clone()),
        BackendError::Timeout(m) => ("modelTimeoutException", m.clone()),
        BackendError::BadRequest(m) => ("validationException", m.clone()),
        other => ("modelStreamErrorException", other.to_string()),
    }
}

// ---- authentication ----

/// A refused sign-in: why, and the key ID it presented when that is known (a revoked API
/// key, or the access key ID of a signature that does not hold), for its audit event.
type SignInRefused = (sigv4::SigV4Error, Option<String>);

/// Checks the SigV4 signature when the node has credentials configured, or a bearer API
/// key (what the SDKs send for Bedrock API keys, `AWS_BEARER_TOKEN_BEDROCK`) against the
/// same keys as the OpenAI API; returns who signed in with which credential, if any.
fn authenticate(
    node: &Node,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<Option<Caller>, SignInRefused> {
    let snapshot = node.access.as_ref().map(|a| a.snapshot());
    if snapshot.is_none() && node.sigv4_keys().is_none() {
        return Ok(None);
    }
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            v.get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case("bearer "))
        });
    if let Some(value) = bearer {
        let Some(snapshot) = &snapshot else {
            return Err((sigv4::SigV4Error::Unrecognized(
                "this node has no API keys ([access] keys): sign the request with SigV4 credentials instead".into(),
            ), None));
        };
        return snapshot.authenticate(Some(value)).map(Some).map_err(|e| {
            let key_id = e.key_id().map(str::to_owned);
            (sigv4::SigV4Error::Unrecognized(e.to_string()), key_id)
        });
    }
    // Credentials of principals first, then the node's own (demo) keys.
    let lookup = |akid: &str| -> Option<String> {
        snapshot
            .as_ref()
            .and_then(|s| s.sigv4(akid).map(|k| k.secret.clone()))
            .or_else(|| {
                node.sigv4_keys()
                    .and_then(|k| k.secret(akid).map(str::to_owned))
            })
    };
    // HTTP/1.1 carries the authority in Host, HTTP/2 in the URI.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let akid = sigv4::verify(
        &lookup,
        parts.method.as_str(),
        &authority,
        path,
        &parts.headers,
        body,
        node.region_code(),
        SystemTime::now(),
    )
    .map_err(|e| (e, sigv4::presented_access_key(&parts.headers)))?;
    // The principal the access key belongs to (none for keys outside access control).
    match snapshot.as_ref().and_then(|s| s.sigv4(&akid)) {
        // Only a caller who holds the secret learns the key was revoked.
        Some(key) if key.revoked => Err((
            sigv4::SigV4Error::Unrecognized(format!(
                "The security token included in the request is invalid: access key {akid} was revoked; ask an administrator for new credentials"
            )),
            Some(akid),
        )),
        Some(key) => Ok(Some(Caller {
            principal: key.principal.as_str().into(),
            key_id: akid.into(),
        })),
        None => Ok(None),
    }
}

async fn read(
    node: &Node,
    req: Request,
    request_id: &str,
) -> Result<(http::request::Parts, Bytes, Option<Arc<str>>), Response> {
    read_or_refuse(node, req)
        .await
        .map(|(parts, body, caller)| (parts, body, caller.map(|c| c.principal)))
        .map_err(|r| error(r.status, r.exception, &r.message, request_id))
}

/// A refused request: its status, exception, message and the kind of error that is the
/// same in both APIs (`errorKind` in its audit event).
struct Refusal {
    status: StatusCode,
    exception: &'static str,
    kind: &'static str,
    message: String,
    /// The key ID the caller presented, when known (see [`SignInRefused`]).
    key_id: Option<String>,
}

impl Refusal {
    fn invalid(message: String) -> Refusal {
        Refusal::of(&PipelineError::InvalidRequest(message))
    }

    fn of(err: &PipelineError) -> Refusal {
        let (status, exception) = error_shape(err);
        Refusal {
            status,
            exception,
            kind: err.code(),
            message: error_message(err),
            key_id: None,
        }
    }

    fn app(e: &AppProfileError) -> Refusal {
        let (status, exception, kind) = match e {
            AppProfileError::Invalid(_) => (
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "invalid_request",
            ),
            AppProfileError::Conflict(_) => (StatusCode::CONFLICT, "ConflictException", "conflict"),
            AppProfileError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "ResourceNotFoundException",
                "profile_not_found",
            ),
            AppProfileError::Store(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
                "profile_store_unavailable",
            ),
        };
        Refusal {
            status,
            exception,
            kind,
            message: e.to_string(),
            key_id: None,
        }
    }
}

/// Reads the (size-limited) body and authenticates the caller.
async fn read_or_refuse(
    node: &Node,
    req: Request,
) -> Result<(http::request::Parts, Bytes, Option<Caller>), Refusal> {
    let (parts, body) = req.into_parts();
    let bytes = super::read_body(&parts.headers, body, &node.catalog.limits)
        .await
        .map_err(|e| Refusal::of(&e))?;
    let principal = authenticate(node, &parts, &bytes).map_err(|(e, key_id)| {
        metrics::counter!("crisp_auth_failures_total", "api" => "bedrock", "reason" => e.exception())
            .increment(1);
        Refusal {
            status: StatusCode::FORBIDDEN,
            exception: e.exception(),
            kind: "invalid_api_key",
            message: e.to_string(),
            key_id,
        }
    })?;
    Ok((parts, bytes, principal))
}

// ---- Converse ----

/// A Converse request, also Amazon Nova's InvokeModel body. Every field of either is
/// named here; any other is refused (see `api/json.rs`), never dropped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConverseRequest {
    #[serde(default)]
    messages: Vec<ConverseMessage>,
    #[serde(default)]
    system: Vec<ContentBlock>,
    #[serde(default)]
    inference_config: Option<InferenceConfig>,
    /// Not carried to engines: a request with tools is refused, not answered without them.
    #[serde(default)]
    tool_config: Option<serde::de::IgnoredAny>,
    /// Marks an Anthropic Messages body (InvokeModel for Claude), whose top-level
    /// `max_tokens` and sampling fields this shape would not read: refused, not misread.
    #[serde(default, rename = "anthropic_version")]
    anthropic_version: Option<serde::de::IgnoredAny>,
    /// Guardrails are not applied by crisp: a request naming one is refused, never
    /// answered unguarded.
    #[serde(default)]
    guardrail_config: Option<serde::de::IgnoredAny>,
    /// Model-specific fields are not carried to engines; `{}` is accepted.
    #[serde(default)]
    additional_model_request_fields: Option<serde_json::Map<String, Value>>,
    /// Prompt management is not part of crisp.
    #[serde(default)]
    prompt_variables: Option<serde::de::IgnoredAny>,
    /// Key-value pairs recorded with the invocation log's record.
    #[serde(default)]
    request_metadata: Option<std::collections::BTreeMap<String, String>>,
    /// Model-specific output fields: crisp returns none, so only `[]` is accepted.
    #[serde(default)]
    additional_model_response_field_paths: Option<Vec<IgnoredAny>>,
    /// `{"latency": "standard"}` is what every request gets; `optimized` is refused.
    #[serde(default)]
    performance_config: Option<PerformanceConfig>,
    /// `{"type": "default"}` is what every request gets; other tiers are refused.
    #[serde(default)]
    service_tier: Option<ServiceTier>,
    /// Nova's native body names its schema: `messages-v1` is the one read here.
    #[serde(default)]
    schema_version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PerformanceConfig {
    latency: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceTier {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConverseMessage {
    role: String,
    content: Vec<ContentBlock>,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(default)]
    text: Option<String>,
    /// A prompt-caching checkpoint: a hint that does not change the answer, accepted
    /// and not carried.
    #[serde(default, rename = "cachePoint")]
    cache_point: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct InferenceConfig {
    /// Nova's native body spells it `max_new_tokens`, and `top_p`, `top_k`.
    #[serde(default, alias = "max_new_tokens")]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default, alias = "top_p")]
    top_p: Option<f32>,
    #[serde(default)]
    stop_sequences: Vec<String>,
    #[serde(default, alias = "top_k")]
    top_k: Option<u32>,
}

/// The refusal of an Anthropic Messages body, which crisp does not translate.
fn anthropic_refused() -> PipelineError {
    PipelineError::InvalidRequest(
        "Anthropic Messages bodies (anthropic_version) are not supported; send the same conversation with Converse (boto3 `converse`), which works for every model, or a body of the Converse shape: {\"messages\": [{\"role\": \"user\", \"content\": [{\"text\": \"Hello\"}]}], \"inferenceConfig\": {\"maxTokens\": 256}}".into(),
    )
}

fn to_pipeline(
    model_id: String,
    request_id: &str,
    body: &[u8],
) -> Result<InferRequest, PipelineError> {
    let req: ConverseRequest = std::str::from_utf8(body)
        .map_err(|e| format!("it is not UTF-8 ({e})"))
        .and_then(super::json::from_json)
        .map_err(|e| {
            // Another provider's native body does not parse as this shape: say what it
            // is rather than what did not parse.
            let fields = serde_json::from_slice::<serde_json::Map<String, Value>>(body);
            let has = |key: &str| fields.as_ref().is_ok_and(|m| m.contains_key(key));
            if has("anthropic_version") {
                return anthropic_refused();
            }
            if ["prompt", "inputText", "texts"].into_iter().any(has) {
                return PipelineError::InvalidRequest(
                    "this is not a Converse or Amazon Nova body: other providers' native InvokeModel bodies are not supported. Send the conversation with Converse (boto3 `converse`), which works for every model, or an InvokeModel body of the Converse shape: {\"messages\": [{\"role\": \"user\", \"content\": [{\"text\": \"Hello\"}]}]}".into(),
                );
            }
            PipelineError::InvalidRequest(format!(
                "the request body is not valid: {e}. Send {{\"messages\": [{{\"role\": \"user\", \"content\": [{{\"text\": \"Hello\"}}]}}]}}"
            ))
        })?;
    if req.anthropic_version.is_some() {
        return Err(anthropic_refused());
    }
    if req.messages.is_empty() {
        return Err(PipelineError::InvalidRequest(
            "messages must contain at least one message".into(),
        ));
    }
    let text = |blocks: Vec<ContentBlock>, at: &str| -> Result<String, PipelineError> {
        let mut out = String::new();
        for (i, b) in blocks.into_iter().enumerate() {
            match (b.text, b.cache_point) {
                (Some(t), None) => out.push_str(&t),
                (None, Some(_)) => {}
                _ => {
                    return Err(PipelineError::InvalidRequest(format!(
                        "{at}[{i}] is not a text block; only text content (and cachePoint) is supported"
                    )));
                }
            }
        }
        Ok(out)
    };
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if !req.system.is_empty() {
        messages.push(Message {
            role: "system".into(),
            content: text(req.system, "system")?,
        });
    }
    if req.messages.first().is_some_and(|m| m.role != "user") {
        return Err(PipelineError::InvalidRequest(
            "a conversation must start with a user message: make messages[0].role \"user\"".into(),
        ));
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        if m.role != "user" && m.role != "assistant" {
            return Err(PipelineError::InvalidRequest(format!(
                "messages[{i}].role must be user or assistant, not {:?}",
                m.role
            )));
        }
        if m.content.is_empty() {
            return Err(PipelineError::InvalidRequest(format!(
                "messages[{i}].content is empty: give it at least one {{\"text\": ...}} block"
            )));
        }
        messages.push(Message {
            content: text(m.content, &format!("messages[{i}].content"))?,
            role: m.role,
        });
    }
    let config = req.inference_config.unwrap_or_default();
    if config.max_tokens == Some(0) {
        return Err(PipelineError::InvalidRequest(
            "inferenceConfig.maxTokens must be at least 1".into(),
        ));
    }
    if config
        .temperature
        .is_some_and(|t| !(0.0..=1.0).contains(&t))
    {
        return Err(PipelineError::InvalidRequest(
            "inferenceConfig.temperature must be between 0 and 1".into(),
        ));
    }
    if config.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(PipelineError::InvalidRequest(
            "inferenceConfig.topP must be greater than 0 and at most 1".into(),
        ));
    }
    let unsupported = [
        (req.tool_config.is_some(), "toolConfig"),
        (req.guardrail_config.is_some(), "guardrailConfig"),
        (
            req.additional_model_request_fields
                .as_ref()
                .is_some_and(|f| !f.is_empty()),
            "additionalModelRequestFields",
        ),
        (req.prompt_variables.is_some(), "promptVariables"),
        (
            req.additional_model_response_field_paths
                .as_ref()
                .is_some_and(|p| !p.is_empty()),
            "additionalModelResponseFieldPaths",
        ),
        (
            req.performance_config
                .as_ref()
                .is_some_and(|p| p.latency != "standard"),
            "performanceConfig",
        ),
        (
            req.service_tier
                .as_ref()
                .is_some_and(|t| t.kind != "default"),
            "serviceTier",
        ),
        (
            req.schema_version
                .as_deref()
                .is_some_and(|v| v != "messages-v1"),
            "schemaVersion",
        ),
    ]
    .into_iter()
    .find_map(|(asked, name)| asked.then_some(name));
    if let Some(field) = unsupported {
        return Err(PipelineError::InvalidRequest(format!(
            "{field} is not supported: crisp routes text conversations (messages, system, inferenceConfig, requestMetadata); remove {field} and send the request again (nothing was run)"
        )));
    }
    if let Some(meta) = &req.request_metadata {
        check_request_metadata(meta)?;
    }
    Ok(InferRequest {
        request_id: request_id.to_owned(),
        requested: model_id,
        messages,
        max_tokens: config.max_tokens,
        sampling: Sampling {
            temperature: config.temperature,
            top_p: config.top_p,
            top_k: config.top_k,
            ..Sampling::default()
        },
        stop: config.stop_sequences,
        principal: None,
        action: crisp_policy::Action::InvokeModel,
    })
}

/// Bedrock's limits on `requestMetadata`: at most 16 pairs, keys of 1 to 256 characters,
/// values of at most 256.
fn check_request_metadata(
    meta: &std::collections::BTreeMap<String, String>,
) -> Result<(), PipelineError> {
    if meta.len() > 16 {
        return Err(PipelineError::InvalidRequest(format!(
            "requestMetadata has {} pairs; at most 16 are allowed",
            meta.len()
        )));
    }
    for (key, value) in meta {
        let chars = key.chars().count();
        if chars == 0 || chars > 256 {
            return Err(PipelineError::InvalidRequest(format!(
                "requestMetadata key {key:?} has {chars} characters; keys have 1 to 256"
            )));
        }
        if value.chars().count() > 256 {
            return Err(PipelineError::InvalidRequest(format!(
                "requestMetadata value of {key:?} is longer than 256 characters"
            )));
        }
    }
    Ok(())
}

fn stop_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "end_turn",
        FinishReason::StopSequence => "stop_sequence",
        FinishReason::Length => "max_tokens",
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "inputTokens": u.prompt_tokens,
        "outputTokens": u.completion_tokens,
        "totalTokens": u.prompt_tokens.saturating_add(u.completion_tokens),
    })
}

fn admitted_headers(admitted: &Admitted, request_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&admitted.inference_region) {
        h.insert(INFERENCE_REGION_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        h.insert(REQUEST_ID_HEADER, v.clone());
        h.insert("x-amzn-requestid", v);
    }
    h
}

/// Runs a request to admission; the dialect decides what to do with the answer.
async fn admit(
    node: &Arc<Node>,
    model_id: String,
    req: Request,
    request_id: &str,
    action: crisp_policy::Action,
    event_name: &'static str,
) -> Result<(Admitted, Call), Response> {
    let mut call = Call::new(request_id, event_name, req.headers(), req.extensions());
    call.requested = model_id.as_str().into();
    // InvokeModel names a guardrail in a header; crisp applies none, so it refuses.
    let guarded = req
        .headers()
        .contains_key("x-amzn-bedrock-guardrailidentifier");
    let (_, body, caller) = match read_or_refuse(node, req).await {
        Ok(read) => read,
        Err(r) => {
            // A refused caller is audited too: who tried, with which credential and error.
            let refused = if r.status == StatusCode::FORBIDDEN {
                PipelineError::Unauthenticated(r.message.clone())
            } else {
                PipelineError::InvalidRequest(r.message.clone())
            };
            call.access_key_id = r.key_id.map(Into::into);
            crate::observe::refused(node, request_id, "bedrock", &refused);
            audit::failed(node, &call, None, r.exception, &refused).await;
            return Err(error(r.status, r.exception, &r.message, request_id));
        }
    };
    call.signed_in(caller.as_ref());
    let principal = caller.map(|c| c.principal);
    if node.invocation_log.is_some() {
        call.input = serde_json::from_slice(&body).ok();
    }
    let fail = |e: PipelineError, call: Call| async move {
        crate::observe::refused(node, request_id, "bedrock", &e);
        audit::failed(node, &call, None, error_kind(&e), &e).await;
        pipeline_error(&e, request_id)
    };
    let infer = if guarded {
        Err(PipelineError::InvalidRequest(
            "guardrails are not supported: crisp applies none, so it does not answer a request that names one; remove the X-Amzn-Bedrock-GuardrailIdentifier header and send the request again (nothing was run)".into(),
        ))
    } else {
        to_pipeline(model_id, request_id, &body)
    };
    let mut infer = match infer {
        Ok(i) => i,
        Err(e) => return Err(fail(e, call).await),
    };
    infer.principal = principal;
    infer.action = action;
    let admitted = match pipeline::run(node, infer).await {
        Ok(a) => a,
        Err(e) => return Err(fail(e, call).await),
    };
    let stream = action == crisp_policy::Action::InvokeModelWithResponseStream;
    crate::observe::admitted(node, request_id, &admitted, "bedrock", stream);
    Ok((admitted, call))
}

fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn complete(admitted: Admitted) -> Result<(String, FinishReason, Usage), BackendError> {
    let mut stream = admitted.stream;
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item? {
            Chunk::Delta(t) => text.push_str(&t),
            Chunk::Done {
                finish_reason,
                usage,
            } => return Ok((text, finish_reason, usage)),
        }
    }
    Err(BackendError::Internal(
        "the engine ended the answer without finishing it".into(),
    ))
}

fn model_error(e: &BackendError, request_id: &str) -> Response {
    let err = match e {
        BackendError::Timeout(m) => PipelineError::Timeout(m.clone()),
        BackendError::BadRequest(m) => PipelineError::ModelRejected(m.clone()),
        other => PipelineError::ModelFailed(other.to_string()),
    };
    pipeline_error(&err, request_id)
}

async fn converse(
    State(node): State<Arc<Node>>,
    Path(model_id): Path<String>,
    req: Request,
) -> Response {
    answer_whole(node, model_id, req, "Converse").await
}

/// InvokeModel with Amazon Nova's native body: the Converse shape without metrics.
async fn invoke(
    State(node): State<Arc<Node>>,
    Path(model_id): Path<String>,
    req: Request,
) -> Response {
    answer_whole(node, model_id, req, "InvokeModel").await
}

// ---- CountTokens ----

#[derive(Deserialize)]
struct CountTokensRequest {
    input: CountTokensInput,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CountTokensInput {
    /// A Converse request's `messages` and `system`.
    #[serde(default)]
    converse: Option<Value>,
    /// An InvokeModel request's body, base64-encoded.
    #[serde(default)]
    invoke_model: Option<InvokeModelInput>,
}

#[derive(Deserialize)]
struct InvokeModelInput {
    body: String,
}

/// How many input tokens a conversation is: what crisp bills for its prompt when an engine
/// reports no usage, and what an answer that ends early is billed for its input. Runs no
/// model; the caller must be allowed to invoke the model or profile it names.
async fn count_tokens(
    State(node): State<Arc<Node>>,
    Path(model_id): Path<String>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    let (_, body, principal) = match read(&node, req, &request_id).await {
        Ok(read) => read,
        Err(r) => return r,
    };
    match count(&node, model_id, &body, principal.as_deref()) {
        Ok(tokens) => axum::Json(json!({"inputTokens": tokens})).into_response(),
        Err(e) => pipeline_error(&e, &request_id),
    }
}

fn count(
    node: &Node,
    model_id: String,
    body: &[u8],
    principal: Option<&str>,
) -> Result<u32, PipelineError> {
    use base64::Engine as _;
    let invalid = |why: String| {
        PipelineError::InvalidRequest(format!(
            "{why}. Send {{\"input\": {{\"converse\": {{\"messages\": [{{\"role\": \"user\", \"content\": [{{\"text\": \"Hello\"}}]}}]}}}}}}"
        ))
    };
    let req: CountTokensRequest = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the request body is not valid: {e}")))?;
    let conversation = match (req.input.converse, req.input.invoke_model) {
        (Some(converse), None) => {
            serde_json::to_vec(&converse).map_err(|e| invalid(e.to_string()))?
        }
        (None, Some(invoke)) => base64::engine::general_purpose::STANDARD
            .decode(invoke.body.as_bytes())
            .map_err(|e| invalid(format!("input.invokeModel.body is not base64: {e}")))?,
        _ => {
            return Err(invalid(
                "input must hold exactly one of converse and invokeModel".into(),
            ));
        }
    };
    let infer = to_pipeline(model_id, "", &conversation)?;
    let (target, application) = pipeline::resolve(node, &infer.requested)?;
    let through = application.as_ref().map(AppProfile::policy_facts);
    if let crisp_policy::Verdict::Deny(reason) = node.verdict(
        principal,
        crisp_policy::Action::InvokeModel,
        target.id(),
        through.as_ref(),
    ) {
        return Err(PipelineError::Denied {
            profile: target.id().to_owned(),
            reason: reason.category(),
            allowed: Vec::new(),
        });
    }
    Ok(crisp_engine::prompt_tokens(&infer.messages))
}

/// A non-streamed answer, returned once its audit event is recorded.
async fn answer_whole(
    node: Arc<Node>,
    model_id: String,
    req: Request,
    event: &'static str,
) -> Response {
    let request_id = new_request_id();
    let started = Instant::now();
    let (admitted, call) = match admit(
        &node,
        model_id,
        req,
        &request_id,
        crisp_policy::Action::InvokeModel,
        event,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    let headers = admitted_headers(&admitted, &request_id);
    let ran = Ran::of(&admitted);
    match complete(admitted).await {
        Ok((text, finish, usage)) => {
            if let Err(e) = audit::completed(&node, &call, &ran, usage, &text).await {
                return pipeline_error(&e, &request_id);
            }
            let mut body = json!({
                "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": stop_reason(finish),
                "usage": usage_json(usage),
            });
            if event == "Converse" {
                body["metrics"] = json!({"latencyMs": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)});
            }
            (headers, axum::Json(body)).into_response()
        }
        Err(e) => {
            let r = model_error(&e, &request_id);
            let err = PipelineError::ModelFailed(e.to_string());
            audit::failed(&node, &call, Some(&ran), "ModelErrorException", &err).await;
            r
        }
    }
}

fn stream_response(
    headers: HeaderMap,
    frames: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    let mut headers = headers;
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(eventstream::CONTENT_TYPE),
    );
    (
        headers,
        Body::from_stream(frames.map(Ok::<_, std::convert::Infallible>)),
    )
        .into_response()
}

async fn converse_stream(
    State(node): State<Arc<Node>>,
    Path(model_id): Path<String>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    let started = Instant::now();
    let (admitted, call) = match admit(
        &node,
        model_id,
        req,
        &request_id,
        crisp_policy::Action::InvokeModelWithResponseStream,
        "ConverseStream",
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    let headers = admitted_headers(&admitted, &request_id);
    let ran = Ran::of(&admitted);
    let answer = audit::audited(node.clone(), call, ran, admitted.stream);
    let start = eventstream::event("messageStart", &json!({"role": "assistant"}));
    let frames = answer.flat_map(move |item| {
        let out = match item {
            Ok(Chunk::Delta(text)) => vec![eventstream::event(
                "contentBlockDelta",
                &json!({"contentBlockIndex": 0, "delta": {"text": text}}),
            )],
            Ok(Chunk::Done {
                finish_reason,
                usage,
            }) => vec![
                eventstream::event("contentBlockStop", &json!({"contentBlockIndex": 0})),
                eventstream::event("messageStop", &json!({"stopReason": stop_reason(finish_reason)})),
                eventstream::event(
                    "metadata",
                    &json!({
                        "usage": usage_json(usage),
                        "metrics": {"latencyMs": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)},
                    }),
                ),
            ],
            Err(e) => {
                let (kind, message) = stream_exception(&e);
                vec![eventstream::exception(kind, &message)]
            }
        };
        futures::stream::iter(out)
    });
    stream_response(
        headers,
        futures::stream::once(async move { start }).chain(frames),
    )
}

async fn invoke_stream(
    State(node): State<Arc<Node>>,
    Path(model_id): Path<String>,
    req: Request,
) -> Response {
    use base64::Engine;
    let request_id = new_request_id();
    let started = Instant::now();
    let (admitted, call) = match admit(
        &node,
        model_id,
        req,
        &request_id,
        crisp_policy::Action::InvokeModelWithResponseStream,
        "InvokeModelWithResponseStream",
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    let headers = admitted_headers(&admitted, &request_id);
    let ran = Ran::of(&admitted);
    let answer = audit::audited(node.clone(), call, ran, admitted.stream);
    // Nova's native stream: each `chunk` event carries one JSON event, base64-encoded.
    let chunk = |v: Value| {
        let bytes = base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(&v).unwrap_or_default());
        eventstream::event("chunk", &json!({ "bytes": bytes }))
    };
    let start = chunk(json!({"messageStart": {"role": "assistant"}}));
    let frames = answer.flat_map(move |item| {
        let out = match item {
            Ok(Chunk::Delta(text)) => vec![chunk(
                json!({"contentBlockDelta": {"delta": {"text": text}, "contentBlockIndex": 0}}),
            )],
            Ok(Chunk::Done {
                finish_reason,
                usage,
            }) => vec![
                chunk(json!({"contentBlockStop": {"contentBlockIndex": 0}})),
                chunk(json!({"messageStop": {"stopReason": stop_reason(finish_reason)}})),
                chunk(json!({
                    "metadata": {"usage": usage_json(usage)},
                    "amazon-bedrock-invocationMetrics": {
                        "inputTokenCount": usage.prompt_tokens,
                        "outputTokenCount": usage.completion_tokens,
                        "invocationLatency": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    },
                })),
            ],
            Err(e) => {
                let (kind, message) = stream_exception(&e);
                vec![eventstream::exception(kind, &message)]
            }
        };
        futures::stream::iter(out)
    });
    stream_response(
        headers,
        futures::stream::once(async move { start }).chain(frames),
    )
}

// ---- control plane ----

const CREATED_AT: &str = "2026-01-01T00:00:00Z";

fn model_arns(node: &Node, p: &Profile) -> Vec<Value> {
    match p.kind {
        ProfileKind::Global => {
            vec![json!({"modelArn": format!("arn:aws:bedrock:::foundation-model/{}", p.model)})]
        }
        ProfileKind::Geographic { .. } => p
            .destinations
            .iter()
            .map(|&r| {
                json!({"modelArn": format!(
                    "arn:aws:bedrock:{}::foundation-model/{}",
                    node.catalog.region_code(r),
                    p.model
                )})
            })
            .collect(),
    }
}

fn profile_json(node: &Node, p: &Profile) -> Value {
    let description = match &p.kind {
        ProfileKind::Global => format!("Routes {} to any region that serves it", p.model),
        ProfileKind::Geographic { geography, version } => format!(
            "Routes {} inside geography {geography} (version {version}, frozen destination set){}",
            p.model,
            p.superseded_by
                .as_ref()
                .map(|n| format!("; superseded by {n}"))
                .unwrap_or_default()
        ),
    };
    json!({
        "inferenceProfileName": p.id,
        "inferenceProfileId": p.id,
        "inferenceProfileArn": profile_arn(&node.catalog, node.region, &p.id),
        "description": description,
        "createdAt": CREATED_AT,
        "updatedAt": CREATED_AT,
        "models": model_arns(node, p),
        "status": "ACTIVE",
        "type": "SYSTEM_DEFINED",
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    max_results: Option<usize>,
    next_token: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn list_profiles(
    State(node): State<Arc<Node>>,
    Query(q): Query<ListQuery>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    let principal = match read(&node, req, &request_id).await {
        Ok((_, _, p)) => p,
        Err(r) => return r,
    };
    let principal = principal.as_deref();
    let list = crisp_policy::Action::ListInferenceProfiles;
    let max = q.max_results.unwrap_or(100);
    if !(1..=1000).contains(&max) {
        return error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            "maxResults must be between 1 and 1000",
            &request_id,
        );
    }
    let start = match q.next_token.as_deref().map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                "nextToken is not a token this API returned; start again without it",
                &request_id,
            );
        }
    };
    // Only what the caller may see.
    let system = || {
        node.profiles
            .iter()
            .filter(|p| node.permits(principal, list, &p.id))
            .map(|p| profile_json(&node, p))
    };
    let application = || {
        node.app_profiles
            .iter()
            .flat_map(|s| s.list())
            .filter(|a| {
                node.verdict(principal, list, &a.copy_from, Some(&a.policy_facts()))
                    .is_allowed()
            })
            .map(|a| app_profile_json(&node, &a))
            .collect::<Vec<Value>>()
    };
    let all: Vec<Value> = match q.kind.as_deref() {
        None => system().chain(application()).collect(),
        Some("SYSTEM_DEFINED") => system().collect(),
        Some("APPLICATION") => application(),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                "ValidationException",
                &format!("type must be SYSTEM_DEFINED or APPLICATION, not {other:?}"),
                &request_id,
            );
        }
    };
    let page: Vec<Value> = all.iter().skip(start).take(max).cloned().collect();
    let mut body = json!({ "inferenceProfileSummaries": page });
    if start + max < all.len() {
        body["nextToken"] = json!((start + max).to_string());
    }
    axum::Json(body).into_response()
}

async fn get_profile(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    let principal = match read(&node, req, &request_id).await {
        Ok((_, _, p)) => p,
        Err(r) => return r,
    };
    let get = crisp_policy::Action::GetInferenceProfile;
    let key = id
        .rsplit_once("inference-profile/")
        .map_or(id.as_str(), |(_, k)| k);
    if let Some(a) = node
        .app_profiles
        .as_ref()
        .and_then(|s| s.get(crate::app_profiles::app_profile_id(&id)))
    {
        if let Err(r) = check_permitted(
            &node,
            principal.as_deref(),
            get,
            &a.copy_from,
            Some(&a.policy_facts()),
        ) {
            return error(r.status, r.exception, &r.message, &request_id);
        }
        return axum::Json(app_profile_json(&node, &a)).into_response();
    }
    match node.profiles.get(key) {
        Some(p) => {
            if let Some(r) = denied(&node, principal.as_deref(), get, &p.id, &request_id) {
                return r;
            }
            axum::Json(profile_json(&node, p)).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!(
                "inference profile {id:?} does not exist; ListInferenceProfiles shows the available ones"
            ),
            &request_id,
        ),
    }
}

/// ListFoundationModels' filters.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelFilters {
    by_provider: Option<String>,
    by_customization_type: Option<String>,
    by_output_modality: Option<String>,
    by_inference_type: Option<String>,
}

impl ModelFilters {
    /// What is wrong with a filter, if anything. Every model of a deployment
    /// takes and gives text, and none can be customized or provisioned.
    fn check(&self) -> Result<(), String> {
        let one_of = |name: &str, value: &Option<String>, allowed: &[&str]| match value {
            Some(v) if !allowed.contains(&v.as_str()) => {
                Err(format!("{name} {v:?} is not one of {}", allowed.join(", ")))
            }
            _ => Ok(()),
        };
        one_of(
            "byCustomizationType",
            &self.by_customization_type,
            &["FINE_TUNING", "CONTINUED_PRE_TRAINING", "DISTILLATION"],
        )?;
        one_of(
            "byOutputModality",
            &self.by_output_modality,
            &["TEXT", "IMAGE", "EMBEDDING"],
        )?;
        one_of(
            "byInferenceType",
            &self.by_inference_type,
            &["ON_DEMAND", "PROVISIONED"],
        )
    }

    fn pass(&self, node: &Node, m: &crisp_catalog::Model) -> bool {
        self.by_provider
            .as_deref()
            .is_none_or(|p| provider_of(m).eq_ignore_ascii_case(p))
            && self.by_customization_type.is_none()
            && self
                .by_output_modality
                .as_deref()
                .is_none_or(|o| o == "TEXT")
            && match self.by_inference_type.as_deref() {
                None => true,
                Some("ON_DEMAND") => m.serves(node.region),
                Some(_) => false,
            }
    }
}

async fn list_foundation_models(
    State(node): State<Arc<Node>>,
    Query(filters): Query<ModelFilters>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    if let Err(r) = read(&node, req, &request_id).await {
        return r;
    }
    if let Err(e) = filters.check() {
        return error(
            StatusCode::BAD_REQUEST,
            "ValidationException",
            &e,
            &request_id,
        );
    }
    let summaries: Vec<Value> = node
        .catalog
        .models
        .iter()
        .filter(|m| filters.pass(&node, m))
        .map(|m| foundation_model_json(&node, m))
        .collect();
    axum::Json(json!({ "modelSummaries": summaries })).into_response()
}

/// A model's provider: the first part of its ID (`amazon` of `amazon.nova-lite-v1:0`).
fn provider_of(m: &crisp_catalog::Model) -> &str {
    m.id.split('.').next().unwrap_or_default()
}

/// GetFoundationModel: one model of the catalog, by ID or ARN.
async fn get_foundation_model(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    if let Err(r) = read(&node, req, &request_id).await {
        return r;
    }
    let wanted = id
        .rsplit_once("foundation-model/")
        .map_or(id.as_str(), |(_, m)| m);
    match node.catalog.models.iter().find(|m| m.id == wanted) {
        Some(m) => {
            axum::Json(json!({ "modelDetails": foundation_model_json(&node, m) })).into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!(
                "foundation model {id:?} does not exist in this deployment; ListFoundationModels shows the available ones"
            ),
            &request_id,
        ),
    }
}

fn foundation_model_json(node: &Node, m: &crisp_catalog::Model) -> Value {
    let here = m.serves(node.region);
    json!({
        "modelArn": format!("arn:aws:bedrock:{}::foundation-model/{}", node.region_code(), m.id),
        "modelId": m.id,
        "modelName": m.name,
        "providerName": provider_of(m),
        "inputModalities": ["TEXT"],
        "outputModalities": ["TEXT"],
        "responseStreamingSupported": true,
        "inferenceTypesSupported": if here { json!(["ON_DEMAND", "INFERENCE_PROFILE"]) } else { json!(["INFERENCE_PROFILE"]) },
        "modelLifecycle": {"status": "ACTIVE"},
    })
}

// ---- authorization of control-plane calls ----

fn denied(
    node: &Node,
    principal: Option<&str>,
    action: crisp_policy::Action,
    id: &str,
    request_id: &str,
) -> Option<Response> {
    check_permitted(node, principal, action, id, None)
        .err()
        .map(|r| error(r.status, r.exception, &r.message, request_id))
}

/// Whether the principal may take this control-plane action on `id`.
fn check_permitted(
    node: &Node,
    principal: Option<&str>,
    action: crisp_policy::Action,
    id: &str,
    application: Option<&crisp_policy::Application>,
) -> Result<(), Refusal> {
    if node
        .verdict(principal, action, id, application)
        .is_allowed()
    {
        return Ok(());
    }
    metrics::counter!("crisp_authorization_denials_total", "source" => node.region_code().to_owned(), "reason" => "control_plane")
        .increment(1);
    Err(Refusal {
        status: StatusCode::FORBIDDEN,
        exception: "AccessDeniedException",
        kind: "access_denied",
        message: format!(
            "{} on {id} is not allowed for this principal",
            action.name()
        ),
        key_id: None,
    })
}

// ---- application inference profiles ----

fn app_arn(node: &Node, id: &str) -> String {
    format!(
        "arn:aws:bedrock:{}:{}:application-inference-profile/{id}",
        node.region_code(),
        node.catalog.deployment.account
    )
}

fn app_profile_json(node: &Node, a: &AppProfile) -> Value {
    // The models are those of the profile it copies, so clients see where it may run.
    let models = match node.profiles.get(&a.copy_from) {
        Some(p) => model_arns(node, p),
        None => vec![json!({"modelArn": format!(
            "arn:aws:bedrock:{}::foundation-model/{}",
            a.region.as_deref().unwrap_or(node.region_code()),
            a.copy_from
        )})],
    };
    json!({
        "inferenceProfileName": a.name,
        "inferenceProfileId": a.id,
        "inferenceProfileArn": app_arn(node, &a.id),
        "description": a.description,
        "createdAt": a.created_at,
        "updatedAt": a.created_at,
        "models": models,
        "status": "ACTIVE",
        "type": "APPLICATION",
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateProfile {
    inference_profile_name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    client_request_token: Option<String>,
    model_source: ModelSource,
    #[serde(default)]
    tags: Vec<Tag>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModelSource {
    copy_from: String,
}

#[derive(Deserialize)]
struct Tag {
    key: String,
    value: String,
}

async fn create_profile(State(node): State<Arc<Node>>, req: Request) -> Response {
    let request_id = new_request_id();
    let mut call = Call::new(
        &request_id,
        "CreateInferenceProfile",
        req.headers(),
        req.extensions(),
    );
    let outcome = create_app_profile(&node, req, &mut call).await.map(|p| {
        let body = json!({"inferenceProfileArn": app_arn(&node, &p.id), "status": "ACTIVE"});
        (p, (StatusCode::CREATED, axum::Json(body)).into_response())
    });
    managed(&node, &call, outcome).await
}

async fn create_app_profile(
    node: &Arc<Node>,
    req: Request,
    call: &mut Call,
) -> Result<AppProfile, Refusal> {
    let (body, principal) = sign_in_managed(node, req, call).await?;
    let Some(store) = node.app_profiles.clone() else {
        return Err(Refusal::invalid(
            "application inference profiles are not enabled on this deployment: set [deployment] profile_store".into(),
        ));
    };
    let create: CreateProfile = serde_json::from_slice(&body)
        .map_err(|e| Refusal::invalid(format!("the request body is not valid: {e}")))?;
    call.requested = create.model_source.copy_from.as_str().into();
    // copyFrom must name something this deployment can route: resolve it now, and keep
    // the ID it resolves to (a model or a system profile).
    // A copy of a model runs where the model is, in this region only; a copy of a system
    // profile routes like it.
    let (copy_from, region) =
        match node
            .profiles
            .resolve(&node.catalog, &create.model_source.copy_from, node.region)
        {
            Ok(t) if t.profile.is_none() => {
                (t.id().to_owned(), Some(node.region_code().to_owned()))
            }
            Ok(t) => (t.id().to_owned(), None),
            Err(e) => return Err(Refusal::of(&PipelineError::Resolve(e))),
        };
    let tags: Vec<(String, String)> = create.tags.into_iter().map(|t| (t.key, t.value)).collect();
    // The profile it would create, as policies see it (no ID yet).
    let to_be = crisp_policy::Application {
        id: String::new(),
        name: create.inference_profile_name.clone(),
        tags: crate::app_profiles::policy_tags(&tags),
    };
    check_permitted(
        node,
        principal.as_deref(),
        crisp_policy::Action::CreateInferenceProfile,
        &copy_from,
        Some(&to_be),
    )?;
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let new = NewAppProfile {
        name: create.inference_profile_name,
        description: create.description,
        copy_from,
        region,
        tags,
        client_request_token: create.client_request_token,
    };
    store.create(new, &now).await.map_err(|e| Refusal::app(&e))
}

async fn delete_profile(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let request_id = new_request_id();
    let mut call = Call::new(
        &request_id,
        "DeleteInferenceProfile",
        req.headers(),
        req.extensions(),
    );
    call.requested = id.as_str().into();
    let outcome = delete_app_profile(&node, &id, req, &mut call)
        .await
        .map(|p| (p, axum::Json(json!({})).into_response()));
    managed(&node, &call, outcome).await
}

async fn delete_app_profile(
    node: &Arc<Node>,
    id: &str,
    req: Request,
    call: &mut Call,
) -> Result<AppProfile, Refusal> {
    let (_, principal) = sign_in_managed(node, req, call).await?;
    if node.profiles.get(id).is_some() {
        return Err(Refusal::invalid(format!(
            "{id} is a system-defined inference profile; only application profiles can be deleted"
        )));
    }
    let not_found = || Refusal::app(&AppProfileError::NotFound(id.to_owned()));
    let store = node.app_profiles.clone().ok_or_else(not_found)?;
    let app_id = crate::app_profiles::app_profile_id(id);
    let existing = store.get(app_id).ok_or_else(not_found)?;
    check_permitted(
        node,
        principal.as_deref(),
        crisp_policy::Action::DeleteInferenceProfile,
        &existing.copy_from,
        Some(&existing.policy_facts()),
    )?;
    store.delete(app_id).await.map_err(|e| Refusal::app(&e))?;
    Ok(existing)
}

/// What a management call starts with: its body and who signed in (recorded in `call`,
/// with the key presented when sign-in is refused). A change that could not be audited is
/// not made: while the audit log is failing (and `[audit] on_failure = "refuse"`),
/// management calls are refused like inference calls.
async fn sign_in_managed(
    node: &Node,
    req: Request,
    call: &mut Call,
) -> Result<(Bytes, Option<Arc<str>>), Refusal> {
    let (_, body, caller) = read_or_refuse(node, req).await.inspect_err(|r| {
        call.access_key_id = r.key_id.as_deref().map(Into::into);
    })?;
    call.signed_in(caller.as_ref());
    if node.audit.as_ref().is_some_and(|a| a.refusing()) {
        return Err(Refusal::of(&PipelineError::AuditUnavailable(
            "recent audit writes failed".into(),
        )));
    }
    Ok((body, caller.map(|c| c.principal)))
}

/// Audits a management call (creating or deleting an application inference profile) as
/// it ended, then answers it.
async fn managed(
    node: &Node,
    call: &Call,
    outcome: Result<(AppProfile, Response), Refusal>,
) -> Response {
    match outcome {
        Ok((profile, response)) => {
            audit::managed(node, call, Some(&profile), None).await;
            response
        }
        Err(r) => {
            audit::managed(node, call, None, Some((r.exception, r.kind, &r.message))).await;
            error(r.status, r.exception, &r.message, &call.request_id)
        }
    }
}
