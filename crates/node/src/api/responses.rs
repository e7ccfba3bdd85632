//! OpenAI's Responses API: `POST /v1/responses`, text in and text out, whole (JSON) or
//! streamed (SSE events). The only place that knows its JSON; authentication, the
//! pipeline, auditing and errors are the chat API's (`openai.rs`).
//!
//! crisp keeps no responses: a request that builds on a stored one
//! (`previous_response_id`, `conversation`), runs in the background, or asks for what
//! crisp does not carry to engines (tools, structured output, images) is refused with
//! what to send instead, and nothing runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use crisp_engine::{Chunk, FinishReason, Message, Sampling, Usage};
use futures::StreamExt;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};

use super::openai::{self, Failure, Wire};
use crate::Node;
use crate::audit::{self, Call, Ran};
use crate::error::PipelineError;
use crate::pipeline::InferRequest;

/// `POST /v1/responses`
pub async fn create(State(node): State<Arc<Node>>, req: Request) -> Response {
    openai::answer(node, req, Wire::Responses).await
}

/// Every field of OpenAI's create-response request is named here; any other is refused
/// (see `json.rs`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponsesRequest {
    model: String,
    input: Input,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stream: bool,
    /// Kept with the invocation log's record (`requestMetadata`).
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
    // What crisp cannot do: refused when asked for, accepted when off.
    #[serde(default)]
    tools: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    conversation: Option<IgnoredAny>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    text: Option<TextConfig>,
    #[serde(default)]
    prompt: Option<IgnoredAny>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    /// Extra output (encrypted reasoning, log probabilities): only `[]` is accepted.
    #[serde(default)]
    include: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    reasoning: Option<IgnoredAny>,
    /// crisp keeps no responses: only `false` is accepted.
    #[serde(default)]
    store: Option<bool>,
    /// `auto` and `default` are what every crisp request gets; other tiers are refused.
    #[serde(default)]
    service_tier: Option<String>,
    // Settings with no effect on a text answer, and identifiers: accepted, not carried.
    #[serde(default, rename = "tool_choice")]
    _tool_choice: Option<IgnoredAny>,
    #[serde(default, rename = "parallel_tool_calls")]
    _parallel_tool_calls: Option<IgnoredAny>,
    #[serde(default, rename = "max_tool_calls")]
    _max_tool_calls: Option<IgnoredAny>,
    #[serde(default, rename = "truncation")]
    _truncation: Option<IgnoredAny>,
    #[serde(default, rename = "stream_options")]
    _stream_options: Option<IgnoredAny>,
    #[serde(default, rename = "user")]
    _user: Option<IgnoredAny>,
    #[serde(default, rename = "safety_identifier")]
    _safety_identifier: Option<IgnoredAny>,
    #[serde(default, rename = "prompt_cache_key")]
    _prompt_cache_key: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextConfig {
    #[serde(default)]
    format: Option<TextFormat>,
    #[serde(default)]
    verbosity: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct TextFormat {
    #[serde(rename = "type")]
    kind: String,
}

type Input = super::json::TextOr<InputItem>;

impl super::json::Listed for InputItem {
    const EXPECTING: &'static str =
        r#"a string, or a list of messages like {"role": "user", "content": "Hello"}"#;
}

/// One item of `input`. Read by hand rather than derived: an item of another type (a tool
/// call, its output, reasoning) has fields of its own, and its refusal should name its
/// type, not the first of those fields; so a field a message does not have is kept aside
/// here and refused only once the item is known to be a message.
#[derive(Default)]
struct InputItem {
    /// `message` when given; other item types are refused.
    kind: Option<String>,
    role: Option<String>,
    content: Option<ItemContent>,
    /// The first field a message item does not have.
    unknown: Option<String>,
}

impl InputItem {
    /// A message item's fields. `id` and `status` come with the output items of an
    /// earlier answer that clients send back: accepted, not carried.
    const FIELDS: &[&str] = &["type", "role", "content", "id", "status"];
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = InputItem;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#"a message like {"role": "user", "content": "Hello"}"#)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<InputItem, A::Error> {
                use serde::de::Error;
                let mut item = InputItem::default();
                let mut seen = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if seen.contains(&key) {
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    match key.as_str() {
                        "type" => item.kind = map.next_value()?,
                        "role" => item.role = map.next_value()?,
                        "content" => item.content = map.next_value()?,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            if !InputItem::FIELDS.contains(&key.as_str()) && item.unknown.is_none()
                            {
                                item.unknown = Some(key.clone());
                            }
                        }
                    }
                    seen.push(key);
                }
                Ok(item)
            }
        }
        d.deserialize_map(Fields)
    }
}

type ItemContent = super::json::TextOr<ContentPart>;

/// A content part. Only text is carried; the other kinds OpenAI defines are read so that
/// their refusal names them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// Of an earlier answer's `output_text`: accepted, not carried.
    #[serde(default, rename = "annotations")]
    _annotations: Option<IgnoredAny>,
    #[serde(default, rename = "logprobs")]
    _logprobs: Option<IgnoredAny>,
    #[serde(default, rename = "image_url")]
    _image_url: Option<IgnoredAny>,
    #[serde(default, rename = "file_id")]
    _file_id: Option<IgnoredAny>,
    #[serde(default, rename = "file_data")]
    _file_data: Option<IgnoredAny>,
    #[serde(default, rename = "file_url")]
    _file_url: Option<IgnoredAny>,
    #[serde(default, rename = "filename")]
    _filename: Option<IgnoredAny>,
    #[serde(default, rename = "detail")]
    _detail: Option<IgnoredAny>,
    #[serde(default, rename = "refusal")]
    _refusal: Option<IgnoredAny>,
}

impl super::json::Listed for ContentPart {
    const EXPECTING: &'static str =
        r#"a string, or a list of parts like {"type": "input_text", "text": "Hello"}"#;
}

const EXAMPLE: &str = r#"{"model": "eu.amazon.nova-lite-v1:0", "input": "Hello"}"#;

impl ResponsesRequest {
    /// The first thing asked for that crisp cannot give, with what to do instead.
    fn unsupported(&self) -> Option<String> {
        let stateful = "crisp keeps no responses: send the whole conversation in `input`";
        let refuse = |what: &str, instead: &str| {
            Some(format!(
                "`{what}` is not supported: {instead}; nothing was run"
            ))
        };
        if self.previous_response_id.is_some() {
            return refuse("previous_response_id", stateful);
        }
        if self.conversation.is_some() {
            return refuse("conversation", stateful);
        }
        if self.background == Some(true) {
            return refuse(
                "background",
                "send the request without it and wait for the answer, or stream it",
            );
        }
        if self.prompt.is_some() {
            return refuse(
                "prompt",
                "send the prompt's text in `instructions` and `input`",
            );
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return refuse(
                "tools",
                "crisp routes text generation; remove `tools` and send the request again",
            );
        }
        if let Some(format) = self.text.as_ref().and_then(|t| t.format.as_ref())
            && format.kind != "text"
        {
            return refuse(
                "text.format",
                "only plain text answers are supported; remove it or use {\"type\": \"text\"}",
            );
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return refuse("top_logprobs", "crisp does not carry log probabilities");
        }
        if self.include.as_ref().is_some_and(|i| !i.is_empty()) {
            return refuse(
                "include",
                "crisp returns the answer's text only; remove `include` or send `[]`",
            );
        }
        if self.reasoning.is_some() {
            return refuse(
                "reasoning",
                "crisp does not carry reasoning settings to engines; remove `reasoning`",
            );
        }
        if self.text.as_ref().is_some_and(|t| t.verbosity.is_some()) {
            return refuse(
                "text.verbosity",
                "crisp does not carry it to engines; remove it",
            );
        }
        if self.store == Some(true) {
            return refuse("store", stateful);
        }
        if let Some(tier) = self
            .service_tier
            .as_deref()
            .filter(|t| *t != "auto" && *t != "default")
        {
            return refuse(
                "service_tier",
                &format!(
                    "every crisp request is served at one tier; remove {tier:?} or send \"auto\""
                ),
            );
        }
        None
    }

    fn into_pipeline(self, request_id: String) -> Result<(InferRequest, bool), String> {
        if let Some(why) = self.unsupported() {
            return Err(why);
        }
        openai::check_sampling(self.temperature, self.top_p)?;
        if self.max_output_tokens == Some(0) {
            return Err("`max_output_tokens` must be at least 1".into());
        }
        if let Some(n) = self
            .metadata
            .as_ref()
            .map(BTreeMap::len)
            .filter(|&n| n > 16)
        {
            return Err(format!("`metadata` has {n} pairs; at most 16 are allowed"));
        }
        let mut messages = Vec::new();
        if let Some(instructions) = self.instructions {
            messages.push(Message {
                role: "system".into(),
                content: instructions,
            });
        }
        match self.input {
            Input::Text(text) => messages.push(Message {
                role: "user".into(),
                content: text,
            }),
            Input::List(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    messages.push(item_message(i, item)?);
                }
            }
        }
        if !messages.iter().any(|m| m.role == "user") {
            return Err("`input` must contain at least one user message".into());
        }
        let stream = self.stream;
        Ok((
            InferRequest {
                request_id,
                requested: self.model,
                principal: None,
                action: if stream {
                    crisp_policy::Action::InvokeModelWithResponseStream
                } else {
                    crisp_policy::Action::InvokeModel
                },
                messages,
                max_tokens: self.max_output_tokens,
                sampling: Sampling {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    ..Sampling::default()
                },
                stop: Vec::new(),
            },
            stream,
        ))
    }
}

/// One input item as a message: `{"role": ..., "content": text or text parts}`.
fn item_message(i: usize, item: InputItem) -> Result<Message, String> {
    if let Some(kind) = item.kind.as_deref().filter(|k| *k != "message") {
        return Err(format!(
            "input[{i}] has type {kind:?}; only messages are supported (tool calls and their outputs are not)"
        ));
    }
    if let Some(field) = &item.unknown {
        return Err(super::json::unknown_field(
            &format!("input[{i}].{field}"),
            field,
            InputItem::FIELDS,
        ));
    }
    let role = item
        .role
        .ok_or_else(|| format!("input[{i}] has no `role`"))?;
    if !matches!(role.as_str(), "user" | "assistant" | "system" | "developer") {
        return Err(format!(
            "input[{i}].role {role:?} is not one of user, assistant, system, developer"
        ));
    }
    let content = match item.content {
        None => return Err(format!("input[{i}] has no `content`")),
        Some(ItemContent::Text(t)) => t,
        Some(ItemContent::List(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                match (part.kind.as_str(), part.text) {
                    ("input_text" | "output_text" | "text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(format!(
                            "input[{i}].content[{j}] has type {kind:?}; only \"input_text\" parts are supported"
                        ));
                    }
                }
            }
            text
        }
    };
    Ok(Message { role, content })
}

pub(super) async fn handle(
    node: &Arc<Node>,
    req: Request,
    call: &mut Call,
) -> Result<Response, Failure> {
    let request_id = String::from(&*call.request_id);
    let (principal, body) = openai::begin(node, req, call).await?;
    let request: ResponsesRequest = openai::json_object(&body)
        .and_then(super::json::from_json)
        .map_err(|e| {
            call.requested = openai::model_named(&body);
            (
                PipelineError::InvalidRequest(format!(
                    "the request body is not a valid Responses request: {e}. Send JSON like {EXAMPLE}"
                )),
                None,
            )
        })?;
    let requested = request.model.clone();
    call.requested = requested.as_str().into();
    let settings = Settings {
        id: format!("resp_{request_id}"),
        item_id: format!("msg_{request_id}"),
        created_at: openai::unix_now(),
        model: requested,
        instructions: request.instructions.clone(),
        max_output_tokens: request.max_output_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        metadata: request.metadata.clone().unwrap_or_default(),
    };
    let (infer, stream) = request
        .into_pipeline(request_id)
        .map_err(|e| (PipelineError::InvalidRequest(e), None))?;
    let (admitted, ran, headers) = openai::admit(node, call, infer, principal, stream).await?;
    if stream {
        let body = sse_body(node.clone(), call.clone(), ran, admitted.stream, settings);
        return Ok((headers, body).into_response());
    }
    let mut text = String::new();
    let mut stream = admitted.stream;
    let (finish, usage) = loop {
        match stream.next().await {
            Some(Ok(Chunk::Delta(t))) => text.push_str(&t),
            Some(Ok(Chunk::Done {
                finish_reason,
                usage,
            })) => break (finish_reason, usage),
            Some(Err(e)) => return Err((openai::from_backend(e), Some(ran))),
            None => {
                return Err((
                    PipelineError::ModelFailed(
                        "the engine ended the answer without finishing it".into(),
                    ),
                    Some(ran),
                ));
            }
        }
    };
    let response = settings.response(Some((&text, finish, usage)));
    let json = serde_json::to_vec(&response).map_err(|e| {
        (
            PipelineError::Internal(format!("answer JSON: {e}")),
            Some(ran.clone()),
        )
    })?;
    // The answer is complete only once its audit event is recorded.
    audit::completed(node, call, &ran, usage, &text)
        .await
        .map_err(|e| (e, Some(ran.clone())))?;
    Ok((headers, json).into_response())
}

/// What the response object repeats from the request.
struct Settings {
    id: String,
    item_id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    metadata: BTreeMap<String, String>,
}

impl Settings {
    /// The response object: in progress (`None`), or finished with its text.
    fn response(&self, done: Option<(&str, FinishReason, Usage)>) -> Value {
        let (status, incomplete, output, usage) = match done {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((text, finish, usage)) => {
                let status = item_status(finish);
                let incomplete = match finish {
                    FinishReason::Length => json!({"reason": "max_output_tokens"}),
                    FinishReason::Stop | FinishReason::StopSequence => Value::Null,
                };
                (
                    status,
                    incomplete,
                    json!([self.message(status, Some(text))]),
                    wire_usage(usage),
                )
            }
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": false,
            "temperature": self.temperature,
            "tool_choice": "none",
            "tools": [],
            "top_p": self.top_p,
            "store": false,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": self.metadata,
            "usage": usage,
        })
    }

    /// The assistant's message item; without text, as it starts.
    fn message(&self, status: &str, text: Option<&str>) -> Value {
        let content = match text {
            Some(t) => json!([output_text(t)]),
            None => json!([]),
        };
        json!({
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }
}

fn item_status(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop | FinishReason::StopSequence => "completed",
        FinishReason::Length => "incomplete",
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

fn wire_usage(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens.saturating_add(u.completion_tokens),
    })
}

/// Numbers the events of one stream and writes them as SSE.
struct Events {
    next: u64,
}

impl Events {
    fn event(&mut self, kind: &str, mut data: Value) -> Bytes {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.next);
        self.next += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    }
}

/// The streamed answer: `response.created`, the message's item and text part opening,
/// one `response.output_text.delta` per chunk, their closing, then `response.completed`
/// (or `response.incomplete` at the token limit) once the audit event is recorded; an
/// `error` event if the answer breaks off.
fn sse_body(
    node: Arc<Node>,
    call: Call,
    ran: Ran,
    answer: crisp_engine::ChunkStream,
    settings: Settings,
) -> Body {
    let events = Mutex::new(Events { next: 0 });
    let text = Mutex::new(String::new());
    let opening = {
        let mut ev = events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = &settings;
        let mut out = vec![
            ev.event("response.created", json!({"response": s.response(None)})),
            ev.event(
                "response.in_progress",
                json!({"response": s.response(None)}),
            ),
        ];
        out.push(ev.event(
            "response.output_item.added",
            json!({"output_index": 0, "item": s.message("in_progress", None)}),
        ));
        out.push(ev.event(
            "response.content_part.added",
            json!({"item_id": s.item_id, "output_index": 0, "content_index": 0, "part": output_text("")}),
        ));
        out
    };
    // Shared by every chunk's step: one reference count each, not a copy of the call.
    let state = Arc::new((node, call, ran, settings, events, text));
    let body = answer.then(move |item| {
        let state = state.clone();
        async move {
            let (node, call, ran, settings, events, text) = &*state;
            let out: Vec<Bytes> = match item {
                Ok(Chunk::Delta(delta)) => {
                    if let Ok(mut all) = text.lock() {
                        all.push_str(&delta);
                    }
                    let mut ev = events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    vec![ev.event(
                        "response.output_text.delta",
                        json!({"item_id": settings.item_id, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
                    )]
                }
                Ok(Chunk::Done {
                    finish_reason,
                    usage,
                }) => {
                    let all = text.lock().map(|t| t.clone()).unwrap_or_default();
                    // The final event goes out only once the audit event is recorded.
                    let audited = audit::completed(node, call, ran, usage, &all).await;
                    let mut ev = events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let s = &settings;
                    let status = item_status(finish_reason);
                    let mut v = vec![
                        ev.event(
                            "response.output_text.done",
                            json!({"item_id": s.item_id, "output_index": 0, "content_index": 0, "text": all, "logprobs": []}),
                        ),
                        ev.event(
                            "response.content_part.done",
                            json!({"item_id": s.item_id, "output_index": 0, "content_index": 0, "part": output_text(&all)}),
                        ),
                        ev.event(
                            "response.output_item.done",
                            json!({"output_index": 0, "item": s.message(status, Some(&all))}),
                        ),
                    ];
                    match audited {
                        Ok(()) => {
                            let last = match finish_reason {
                                FinishReason::Stop | FinishReason::StopSequence => {
                                    "response.completed"
                                }
                                FinishReason::Length => "response.incomplete",
                            };
                            let response = s.response(Some((&all, finish_reason, usage)));
                            v.push(ev.event(last, json!({"response": response})));
                        }
                        Err(e) => v.push(ev.event(
                            "error",
                            json!({"code": "audit_unavailable", "message": e.to_string(), "param": null}),
                        )),
                    }
                    v
                }
                Err(e) => {
                    let err = openai::from_backend(e);
                    audit::failed(node, call, Some(ran), "stream_interrupted", &err).await;
                    let mut ev = events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    vec![ev.event(
                        "error",
                        json!({"code": "stream_interrupted", "message": format!("the answer broke off: {err}"), "param": null}),
                    )]
                }
            };
            futures::stream::iter(out.into_iter().map(Ok::<_, std::convert::Infallible>))
        }
    });
    Body::from_stream(
        futures::stream::iter(opening.into_iter().map(Ok::<_, std::convert::Infallible>))
            .chain(body.flatten()),
    )
}
