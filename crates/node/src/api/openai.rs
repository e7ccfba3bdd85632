//! The OpenAI-compatible API: `POST /v1/chat/completions` (JSON and SSE),
//! `GET /v1/models` and `GET /v1/models/{id}`, and the edge both OpenAI wire formats
//! share (authentication, body limits, error bodies). The only place that knows the chat
//! completions JSON; `responses.rs` knows the Responses API's.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crisp_catalog::profiles::{ProfileKind, ResolveError};
use crisp_engine::{BackendError, Chunk, FinishReason, Message, Sampling, Usage};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument;

use super::{INFERENCE_REGION_HEADER, REQUEST_ID_HEADER};
use serde::de::IgnoredAny;

use crate::audit::{self, Call, Ran};
use crate::error::{Culprit, PipelineError};
use crate::pipeline::{self, Admitted, InferRequest};
use crate::{Node, observe};
use crisp_policy::keys::{Caller, KeyError};

// ---- request ----

/// Every field of OpenAI's chat completion request is named here; any other is refused
/// (see `json.rs`), so a misspelt one is not taken for a request without it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    top_p: Option<f32>,
    /// Not OpenAI's, but vLLM's, SGLang's and llama.cpp's, which clients of open models
    /// send: carried to the engine.
    #[serde(default)]
    top_k: Option<u32>,
    /// vLLM's, SGLang's and llama.cpp's too.
    #[serde(default)]
    min_p: Option<f32>,
    /// vLLM's and SGLang's name; llama.cpp's `repeat_penalty` is read as the same.
    #[serde(default, alias = "repeat_penalty")]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    // Features crisp does not carry to engines: a request asking for one is refused
    // rather than answered without it. `null` (or the value meaning "off") is accepted,
    // as SDKs send them.
    #[serde(default)]
    tools: Option<IgnoredAny>,
    #[serde(default)]
    tool_choice: Option<IgnoredAny>,
    #[serde(default)]
    functions: Option<IgnoredAny>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<IgnoredAny>,
    #[serde(default)]
    audio: Option<IgnoredAny>,
    #[serde(default)]
    prediction: Option<IgnoredAny>,
    #[serde(default)]
    web_search_options: Option<IgnoredAny>,
    /// `["text"]` is accepted; audio output is not available.
    #[serde(default)]
    modalities: Option<Vec<String>>,
    /// Token biases are not carried to engines; `{}` is accepted.
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Key-value pairs recorded with the invocation log's record (`requestMetadata`).
    #[serde(default)]
    metadata: Option<std::collections::BTreeMap<String, String>>,
    /// Asks OpenAI to keep the completion; crisp keeps none, so only `false` is accepted.
    #[serde(default)]
    store: Option<bool>,
    /// `auto` and `default` are what every crisp request gets; other tiers are refused.
    #[serde(default)]
    service_tier: Option<String>,
    #[serde(default)]
    reasoning_effort: Option<IgnoredAny>,
    #[serde(default)]
    verbosity: Option<IgnoredAny>,
    // Identifiers and hints with no effect on the answer: accepted, not carried.
    #[serde(default, rename = "user")]
    _user: Option<IgnoredAny>,
    #[serde(default, rename = "safety_identifier")]
    _safety_identifier: Option<IgnoredAny>,
    #[serde(default, rename = "prompt_cache_key")]
    _prompt_cache_key: Option<IgnoredAny>,
    #[serde(default, rename = "parallel_tool_calls")]
    _parallel_tool_calls: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

impl ChatRequest {
    /// The first feature the request asks for that crisp cannot give it.
    fn unsupported(&self) -> Option<&'static str> {
        [
            (self.tools.is_some(), "tools"),
            (self.tool_choice.is_some(), "tool_choice"),
            (self.functions.is_some(), "functions"),
            (self.function_call.is_some(), "function_call"),
            (
                self.response_format
                    .as_ref()
                    .is_some_and(|f| f.kind != "text"),
                "response_format",
            ),
            (self.logprobs == Some(true), "logprobs"),
            (self.top_logprobs.is_some(), "top_logprobs"),
            (self.audio.is_some(), "audio"),
            (self.prediction.is_some(), "prediction"),
            (self.web_search_options.is_some(), "web_search_options"),
            (
                self.modalities
                    .as_ref()
                    .is_some_and(|m| m.iter().any(|m| m != "text")),
                "modalities",
            ),
            (
                self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()),
                "logit_bias",
            ),
            (self.store == Some(true), "store"),
            (
                self.service_tier
                    .as_deref()
                    .is_some_and(|t| t != "auto" && t != "default"),
                "service_tier",
            ),
            (self.reasoning_effort.is_some(), "reasoning_effort"),
            (self.verbosity.is_some(), "verbosity"),
        ]
        .into_iter()
        .find_map(|(asked, name)| asked.then_some(name))
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// A participant's name: accepted, not carried (engines take role and text).
    #[serde(default, rename = "name")]
    _name: Option<IgnoredAny>,
    /// An assistant's refusal text, as OpenAI returned it: accepted, not carried.
    #[serde(default, rename = "refusal")]
    _refusal: Option<IgnoredAny>,
    /// A tool message's call ID: accepted with the tool's output in `content`.
    #[serde(default, rename = "tool_call_id")]
    _tool_call_id: Option<IgnoredAny>,
    // Tool calls and audio in the history: refused, as tools are (`[]` is accepted).
    #[serde(default)]
    tool_calls: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    function_call: Option<IgnoredAny>,
    #[serde(default)]
    audio: Option<IgnoredAny>,
}

type Content = super::json::TextOr<Part>;

/// A content part. Only text is carried; the other kinds OpenAI defines are read so that
/// their refusal names them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default, rename = "image_url")]
    _image_url: Option<IgnoredAny>,
    #[serde(default, rename = "input_audio")]
    _input_audio: Option<IgnoredAny>,
    #[serde(default, rename = "file")]
    _file: Option<IgnoredAny>,
    #[serde(default, rename = "refusal")]
    _refusal: Option<IgnoredAny>,
    /// A prompt-caching hint some clients add: accepted, not carried.
    #[serde(default, rename = "cache_control")]
    _cache_control: Option<IgnoredAny>,
}

impl super::json::Listed for Part {
    const EXPECTING: &'static str =
        r#"a string, or a list of parts like {"type": "text", "text": "Hello"}"#;
}

const EXAMPLE: &str =
    r#"{"model": "eu.amazon.nova-lite-v1:0", "messages": [{"role": "user", "content": "Hello"}]}"#;

impl ChatRequest {
    fn into_pipeline(self, request_id: String) -> Result<(InferRequest, bool, bool), String> {
        if self.messages.is_empty() {
            return Err("`messages` must contain at least one message".into());
        }
        if let Some(n) = self.metadata.as_ref().map(|m| m.len()).filter(|&n| n > 16) {
            return Err(format!("`metadata` has {n} pairs; at most 16 are allowed"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err("only `n` = 1 is supported".into());
        }
        if let Some(feature) = self.unsupported() {
            return Err(format!(
                "`{feature}` is not supported: crisp routes text chat completions (messages, max_tokens, temperature, top_p, top_k, min_p, seed, presence, frequency and repetition penalties, stop, stream); remove `{feature}` and send the request again (nothing was run)"
            ));
        }
        check_sampling(self.temperature, self.top_p)?;
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(format!("`{name}` must be between -2 and 2"));
            }
        }
        if self.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return Err("`min_p` must be between 0 and 1".into());
        }
        if self
            .repetition_penalty
            .is_some_and(|p| !(p > 0.0 && p.is_finite()))
        {
            return Err("`repetition_penalty` must be greater than 0 (1 means no penalty)".into());
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(format!(
                    "messages[{i}].role {:?} is not one of system, developer, user, assistant, tool",
                    m.role
                ));
            }
            if let Some(field) = [
                (
                    m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()),
                    "tool_calls",
                ),
                (m.function_call.is_some(), "function_call"),
                (m.audio.is_some(), "audio"),
            ]
            .into_iter()
            .find_map(|(has, field)| has.then_some(field))
            {
                return Err(format!(
                    "messages[{i}].{field} is not supported: crisp does not carry tools or audio to engines, so a history with them would reach the model without them; send the conversation as text and send the request again (nothing was run)"
                ));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::List(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {
                                return Err(format!(
                                    "messages[{i}].content[{j}] is a text part without `text`"
                                ));
                            }
                            (other, _) => {
                                return Err(format!(
                                    "messages[{i}].content[{j}] has type {other:?}; only \"text\" parts are supported"
                                ));
                            }
                        }
                    }
                    text
                }
            };
            messages.push(Message {
                role: m.role,
                content,
            });
        }
        let include_usage = self.stream_options.is_some_and(|o| o.include_usage);
        let stop = match self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if self.max_tokens == Some(0) || self.max_completion_tokens == Some(0) {
            return Err("`max_tokens` must be at least 1".into());
        }
        Ok((
            InferRequest {
                request_id,
                requested: self.model,
                principal: None,
                action: if self.stream {
                    crisp_policy::Action::InvokeModelWithResponseStream
                } else {
                    crisp_policy::Action::InvokeModel
                },
                messages,
                max_tokens: self.max_completion_tokens.or(self.max_tokens),
                sampling: Sampling {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                    seed: self.seed,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                },
                stop,
            },
            self.stream,
            include_usage,
        ))
    }
}

/// The body as text, if it is UTF-8 and a JSON object (a struct would also be read from
/// an array, by position): one check for the whole body, not one per string in it.
pub(super) fn json_object(body: &[u8]) -> Result<&str, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("it is not UTF-8 ({e})"))?;
    if !text.trim_start().starts_with('{') {
        return Err("it is not a JSON object".into());
    }
    Ok(text)
}

/// The `model` a body names, read leniently, for the audit event of a request refused
/// as invalid: what the caller asked for, where the body says it (at most 256 bytes; an
/// audit event does not carry more of a body it refused).
pub(super) fn model_named(body: &[u8]) -> Arc<str> {
    #[derive(Deserialize)]
    struct Named {
        #[serde(default)]
        model: Option<String>,
    }
    serde_json::from_slice::<Named>(body)
        .ok()
        .and_then(|n| n.model)
        .filter(|m| m.len() <= 256)
        .map_or_else(|| Arc::from(""), Arc::from)
}

/// OpenAI's ranges for the sampling settings both wire formats take.
pub(super) fn check_sampling(temperature: Option<f32>, top_p: Option<f32>) -> Result<(), String> {
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return Err("`temperature` must be between 0 and 2".into());
    }
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err("`top_p` must be greater than 0 and at most 1".into());
    }
    Ok(())
}

// ---- response ----

#[derive(Serialize)]
struct Completion<'a> {
    id: String,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice; 1],
    usage: WireUsage,
}

#[derive(Serialize)]
struct Choice {
    index: u32,
    message: AssistantMessage,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage {
    role: &'static str,
    content: String,
}

#[derive(Serialize, Clone, Copy)]
struct WireUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<Usage> for WireUsage {
    fn from(u: Usage) -> Self {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens),
        }
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---- errors ----

/// OpenAI's error code for a pipeline error (also the `outcome` metric label).
pub fn error_code(err: &PipelineError) -> &'static str {
    err.code()
}

fn error_parts(err: &PipelineError) -> (StatusCode, &'static str) {
    let kind = match err.culprit() {
        Culprit::Client => "invalid_request_error",
        Culprit::Capacity => "rate_limit_error",
        Culprit::Upstream | Culprit::Internal => "api_error",
    };
    match err {
        PipelineError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, kind),
        PipelineError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, kind),
        PipelineError::Resolve(ResolveError::Unknown { .. }) => (StatusCode::NOT_FOUND, kind),
        PipelineError::Exhausted { .. } => (StatusCode::TOO_MANY_REQUESTS, kind),
        PipelineError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, kind),
        PipelineError::Denied { .. } => (StatusCode::FORBIDDEN, "permission_error"),
        PipelineError::AuditUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, kind),
        PipelineError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, kind),
        PipelineError::ModelFailed(_) => (StatusCode::BAD_GATEWAY, kind),
        PipelineError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, kind),
        PipelineError::InvalidRequest(_)
        | PipelineError::Resolve(_)
        | PipelineError::ModelRejected(_) => (StatusCode::BAD_REQUEST, kind),
    }
}

/// OpenAI's error body for a pipeline error, with its status.
pub fn error_response(err: &PipelineError, request_id: &str) -> Response {
    let (status, kind) = error_parts(err);
    let code = err.code();
    let param = match err {
        PipelineError::Resolve(_) => Some("model"),
        _ => None,
    };
    let body = json!({"error": {
        "message": err.to_string(),
        "type": kind,
        "param": param,
        "code": code,
    }});
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    if let Some(after) = err.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    response
}

pub(super) fn from_backend(e: BackendError) -> PipelineError {
    match e {
        BackendError::BadRequest(m) => PipelineError::ModelRejected(m),
        BackendError::Timeout(m) => PipelineError::Timeout(m),
        other => PipelineError::ModelFailed(other.to_string()),
    }
}

/// An OpenAI error body for a request that reached no handler.
pub fn error_body(status: StatusCode, code: &str, message: &str, request_id: &str) -> Response {
    let body = json!({"error": {
        "message": message,
        "type": "invalid_request_error",
        "param": null,
        "code": code,
    }});
    let mut response = (status, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}

// ---- handlers ----

async fn read_body(node: &Node, req: Request) -> Result<Bytes, PipelineError> {
    let (parts, body) = req.into_parts();
    super::read_body(&parts.headers, body, &node.catalog.limits).await
}

/// The two OpenAI wire formats for generating text.
#[derive(Clone, Copy)]
pub(super) enum Wire {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/responses`
    Responses,
}

pub async fn chat_completions(State(node): State<Arc<Node>>, req: Request) -> Response {
    answer(node, req, Wire::Chat).await
}

/// Runs one generation call of either wire format; a refusal or failure is logged,
/// counted, audited and answered with OpenAI's error body.
pub(super) async fn answer(node: Arc<Node>, req: Request, wire: Wire) -> Response {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        request_id = %request_id,
        source = node.region_code()
    );
    let event_name = match wire {
        Wire::Chat => "ChatCompletion",
        Wire::Responses => "CreateResponse",
    };
    let mut call = Call::new(&request_id, event_name, req.headers(), req.extensions());
    let result = match wire {
        Wire::Chat => handle(&node, req, &mut call).instrument(span).await,
        Wire::Responses => {
            super::responses::handle(&node, req, &mut call)
                .instrument(span)
                .await
        }
    };
    match result {
        Ok(response) => response,
        Err((e, ran)) => {
            observe::refused(&node, &request_id, "openai", &e);
            audit::failed(&node, &call, ran.as_ref(), error_code(&e), &e).await;
            error_response(&e, &request_id)
        }
    }
}

pub(super) type Failure = (PipelineError, Option<Ran>);

/// What every generation call starts with: who is calling (before anything else is
/// read), then the size-limited body, kept for the invocation log when there is one.
pub(super) async fn begin(
    node: &Node,
    req: Request,
    call: &mut Call,
) -> Result<(Option<Arc<str>>, Bytes), Failure> {
    let signed = match authenticate(node, req.headers()) {
        Ok(signed) => signed,
        Err(e) => {
            // Its audit event names the key it presented, when that is known.
            call.access_key_id = e.key_id().map(Into::into);
            return Err((refused_key(e), None));
        }
    };
    call.signed_in(signed.as_ref());
    let principal = signed.map(|c| c.principal);
    let body = read_body(node, req).await.map_err(|e| (e, None))?;
    if node.invocation_log.is_some() {
        call.input = serde_json::from_slice(&body).ok();
    }
    Ok((principal, body))
}

/// Runs a parsed request through the pipeline to admission. The answer's headers say
/// where it runs, carry the request's ID and its content type (SSE when streamed).
pub(super) async fn admit(
    node: &Arc<Node>,
    call: &Call,
    mut infer: InferRequest,
    principal: Option<Arc<str>>,
    stream: bool,
) -> Result<(Admitted, Ran, HeaderMap), Failure> {
    let request_id = infer.request_id.clone();
    infer.principal = principal;
    let mut admitted = pipeline::run(node, infer).await.map_err(|e| (e, None))?;
    observe::admitted(node, &request_id, &admitted, "openai", stream);
    let ran = Ran::of(&admitted);
    // From here the model runs: a client that leaves before the answer ends is audited.
    admitted.stream = audit::guarded(admitted.stream, node, call, &ran);
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&admitted.inference_region) {
        headers.insert(INFERENCE_REGION_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID_HEADER, v);
    }
    if stream {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    } else {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    Ok((admitted, ran, headers))
}

async fn handle(node: &Arc<Node>, req: Request, call: &mut Call) -> Result<Response, Failure> {
    let request_id = String::from(&*call.request_id);
    let (principal, body) = begin(node, req, call).await?;
    let chat: ChatRequest = json_object(&body)
        .and_then(super::json::from_json)
        .map_err(|e| {
            call.requested = model_named(&body);
            (
                PipelineError::InvalidRequest(format!(
                    "the request body is not a valid chat completion request: {e}. Send JSON like {EXAMPLE}"
                )),
                None,
            )
        })?;
    let requested = chat.model.clone();
    call.requested = requested.as_str().into();
    let (infer, stream, include_usage) = chat
        .into_pipeline(request_id.clone())
        .map_err(|e| (PipelineError::InvalidRequest(e), None))?;
    let (admitted, ran, headers) = admit(node, call, infer, principal, stream).await?;
    if stream {
        let body = sse_body(
            node.clone(),
            call.clone(),
            ran,
            admitted,
            requested,
            include_usage,
        );
        Ok((headers, body).into_response())
    } else {
        let (completion, usage) = collect(admitted, &requested, &request_id)
            .await
            .map_err(|e| (e, Some(ran.clone())))?;
        // Serialized before it is audited, into a buffer sized for a short answer.
        let mut json = Vec::with_capacity(384 + completion.choices[0].message.content.len());
        serde_json::to_writer(&mut json, &completion).map_err(|e| {
            (
                PipelineError::Internal(format!("answer JSON: {e}")),
                Some(ran.clone()),
            )
        })?;
        // The answer is complete only once its audit event is recorded.
        let [Choice { message, .. }] = &completion.choices;
        audit::completed(node, call, &ran, usage, &message.content)
            .await
            .map_err(|e| (e, Some(ran.clone())))?;
        Ok((headers, json).into_response())
    }
}

async fn collect<'a>(
    admitted: Admitted,
    requested: &'a str,
    request_id: &str,
) -> Result<(Completion<'a>, Usage), PipelineError> {
    let mut stream = admitted.stream;
    let mut content = String::new();
    while let Some(item) = stream.next().await {
        match item.map_err(from_backend)? {
            Chunk::Delta(t) => content.push_str(&t),
            Chunk::Done {
                finish_reason,
                usage,
            } => {
                let c = Completion {
                    id: format!("chatcmpl-{request_id}"),
                    object: "chat.completion",
                    created: unix_now(),
                    model: requested,
                    choices: [Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content,
                        },
                        finish_reason: finish_reason.as_str(),
                    }],
                    usage: usage.into(),
                };
                return Ok((c, usage));
            }
        }
    }
    Err(PipelineError::ModelFailed(
        "the engine ended the answer without finishing it".into(),
    ))
}

fn sse(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

fn sse_error(code: &str, message: String) -> Bytes {
    sse(&json!({"error": {"message": message, "type": "api_error", "code": code}}))
}

fn sse_body(
    node: Arc<Node>,
    call: Call,
    ran: Ran,
    admitted: Admitted,
    requested: String,
    include_usage: bool,
) -> Body {
    let id = format!("chatcmpl-{}", call.request_id);
    let created = unix_now();
    let chunk = move |delta: serde_json::Value, finish: Option<FinishReason>| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": requested,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish.map(FinishReason::as_str)}],
        })
    };
    let first = sse(&chunk(json!({"role": "assistant", "content": ""}), None));
    // Shared by every chunk's step: one reference count each, not a copy of the call.
    let state = Arc::new((node, call, ran, chunk, std::sync::Mutex::new(String::new())));
    let events = admitted.stream.then(move |item| {
        let state = state.clone();
        async move {
            let (node, call, ran, chunk, text) = &*state;
            let out: Vec<Bytes> = match item {
                Ok(Chunk::Delta(delta)) => {
                    if node.invocation_log.is_some()
                        && let Ok(mut all) = text.lock()
                    {
                        all.push_str(&delta);
                    }
                    vec![sse(&chunk(json!({"content": delta}), None))]
                }
                Ok(Chunk::Done {
                    finish_reason,
                    usage,
                }) => {
                    let mut v = vec![sse(&chunk(json!({}), Some(finish_reason)))];
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = json!(WireUsage::from(usage));
                        v.push(sse(&u));
                    }
                    // The final event goes out only once the audit event is recorded.
                    let output = text.lock().map(|t| t.clone()).unwrap_or_default();
                    match audit::completed(node, call, ran, usage, &output).await {
                        Ok(()) => v.push(Bytes::from_static(b"data: [DONE]\n\n")),
                        Err(e) => v.push(sse_error("audit_unavailable", e.to_string())),
                    }
                    v
                }
                Err(e) => {
                    let err = from_backend(e);
                    audit::failed(node, call, Some(ran), "stream_interrupted", &err).await;
                    vec![sse_error(
                        "stream_interrupted",
                        format!("the answer broke off: {err}"),
                    )]
                }
            };
            futures::stream::iter(out.into_iter().map(Ok::<_, std::convert::Infallible>))
        }
    });
    Body::from_stream(futures::stream::once(async move { Ok(first) }).chain(events.flatten()))
}

/// `GET /v1/models`: the profiles and this region's models the caller may see (the
/// `ListInferenceProfiles` action, as Bedrock's listing), each with its destinations.
pub async fn list_models(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let principal = match caller(&node, &headers) {
        Ok(p) => p,
        Err(e) => return error_response(&e, &request_id),
    };
    let data: Vec<serde_json::Value> = model_entries(&node)
        .filter(|(id, _)| {
            node.permits(
                principal.as_deref(),
                crisp_policy::Action::ListInferenceProfiles,
                id,
            )
        })
        .map(|(_, entry)| entry)
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}` (the SDKs' `models.retrieve`): one entry of the listing, for a
/// caller allowed `GetInferenceProfile` on it.
pub async fn retrieve_model(
    State(node): State<Arc<Node>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let principal = match caller(&node, &headers) {
        Ok(p) => p,
        Err(e) => return error_response(&e, &request_id),
    };
    let entry = model_entries(&node).find(|(known, _)| *known == id);
    let (entry, checked) = match entry {
        Some((_, entry)) => (entry, id),
        // An ARN, as chat completions take one: a system profile's, a foundation model's
        // or an application profile's.
        None if id.starts_with("arn:") => match arn_entry(&node, &id) {
            Ok(found) => found,
            Err(e) => return error_response(&e, &request_id),
        },
        None => {
            let e = PipelineError::Resolve(ResolveError::Unknown {
                requested: id,
                suggestion: None,
            });
            return error_response(&e, &request_id);
        }
    };
    let action = crisp_policy::Action::GetInferenceProfile;
    if let crisp_policy::Verdict::Deny(reason) =
        node.verdict(principal.as_deref(), action, &checked, None)
    {
        let e = PipelineError::Denied {
            profile: checked,
            reason: reason.category(),
            allowed: Vec::new(),
        };
        return error_response(&e, &request_id);
    }
    Json(entry).into_response()
}

/// The `/v1/models` entry an ARN names, and the ID access is checked against: the
/// profile's or model's own entry, or for an application profile one of its own (its
/// ARN, the model and boundary of what it copies).
fn arn_entry(node: &Node, arn: &str) -> Result<(serde_json::Value, String), PipelineError> {
    let (target, application) = pipeline::resolve(node, arn)?;
    let id = target.id().to_owned();
    let Some(app) = application else {
        let entry = model_entries(node)
            .find(|(known, _)| *known == id)
            .map(|(_, entry)| entry)
            .ok_or_else(|| {
                PipelineError::Resolve(ResolveError::Unknown {
                    requested: arn.to_owned(),
                    suggestion: None,
                })
            })?;
        return Ok((entry, id));
    };
    let destinations: Vec<&str> = target
        .destinations()
        .iter()
        .map(|&r| node.catalog.region_code(r))
        .collect();
    let entry = json!({
        "id": arn,
        "object": "model",
        "created": 0,
        "owned_by": "crisp",
        "crisp": {
            "kind": "application_profile",
            "name": app.name,
            "copies": app.copy_from,
            "model": target.model.id,
            "destinations": destinations,
            "superseded_by": null,
        },
    });
    Ok((entry, id))
}

/// Every ID a client of this region can call, with its `/v1/models` entry: the profiles,
/// then the models served here (a bare model ID means "this region only").
fn model_entries(node: &Node) -> impl Iterator<Item = (&str, serde_json::Value)> {
    let catalog = &node.catalog;
    let codes = |d: &[crisp_catalog::RegionIx]| -> Vec<&str> {
        d.iter().map(|&r| catalog.region_code(r)).collect()
    };
    let entry = |id: &str, kind: &str, model: &str, destinations: Vec<&str>, next: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": 0,
            "owned_by": "crisp",
            "crisp": {
                "kind": kind,
                "model": model,
                "destinations": destinations,
                "superseded_by": next,
            },
        })
    };
    let profiles = node.profiles.iter().map(move |p| {
        let kind = match &p.kind {
            ProfileKind::Global => "global_profile",
            ProfileKind::Geographic { .. } => "geographic_profile",
        };
        let doc = entry(
            &p.id,
            kind,
            &p.model,
            codes(&p.destinations),
            p.superseded_by.as_deref(),
        );
        (p.id.as_str(), doc)
    });
    let models = catalog
        .models
        .iter()
        .filter(|m| m.serves(node.region))
        .map(move |m| {
            let doc = entry(&m.id, "model", &m.id, vec![node.region_code()], None);
            (m.id.as_str(), doc)
        });
    profiles.chain(models)
}

/// Who is calling: the principal named by the request's API key when the node has
/// access control (and an error saying what to send when the key is missing or
/// unknown), nobody when it has none.
pub fn caller(node: &Node, headers: &HeaderMap) -> Result<Option<Arc<str>>, PipelineError> {
    Ok(signed_in(node, headers)?.map(|c| c.principal))
}

/// Who signed in with the request's API key, and with which key.
pub fn signed_in(node: &Node, headers: &HeaderMap) -> Result<Option<Caller>, PipelineError> {
    authenticate(node, headers).map_err(refused_key)
}

/// Who signed in, or why the key was refused.
fn authenticate(node: &Node, headers: &HeaderMap) -> Result<Option<Caller>, KeyError> {
    let Some(access) = &node.access else {
        return Ok(None);
    };
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    access.snapshot().authenticate(header).map(Some)
}

/// A refused API key, counted.
fn refused_key(e: KeyError) -> PipelineError {
    metrics::counter!("crisp_auth_failures_total", "api" => "openai", "reason" => "api_key")
        .increment(1);
    PipelineError::Unauthenticated(e.to_string())
}
