//! The source region's audit of each call: the API edges describe the call, this module
//! turns it into an event and waits until it is recorded (on disk, or written to the log
//! file with `[audit] durability = "write"`). Only the source node writes
//! events; a destination never keeps anything of a forwarded request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::connect_info::ConnectInfo;
use crisp_audit::{AdditionalEventData, AuditEvent, RequestParameters, Signer, Text, UserIdentity};
use crisp_engine::Usage;
use crisp_routing::Scope;
use crisp_transport::TlsStore;
use http::HeaderMap;

use crate::error::PipelineError;
use crate::pipeline::Admitted;
use crate::{Node, unix_ms};

/// Signs audit digests with the node's current certificate key.
pub struct NodeSigner(pub Arc<TlsStore>);

impl Signer for NodeSigner {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.current().sign(message)
    }
    fn certificate_der(&self) -> Vec<u8> {
        self.0.current().cert_der().to_vec()
    }
}

/// The node's audit log and what to do when it cannot write.
pub struct Audit {
    pub log: crisp_audit::AuditLog,
    /// Refuse new requests while the log is failing (rather than serve unaudited).
    pub refuse_on_failure: bool,
    broken_until_ms: AtomicU64,
}

/// How long a failed write keeps the node refusing before it tries again.
const BROKEN_FOR_MS: u64 = 5_000;

impl Audit {
    pub fn new(log: crisp_audit::AuditLog, refuse_on_failure: bool) -> Audit {
        Audit {
            log,
            refuse_on_failure,
            broken_until_ms: AtomicU64::new(0),
        }
    }

    /// Whether new requests must be refused now.
    pub fn refusing(&self) -> bool {
        self.refuse_on_failure && unix_ms() < self.broken_until_ms.load(Ordering::Relaxed)
    }

    async fn write(&self, event: &AuditEvent<'_>) -> Result<(), PipelineError> {
        match self.log.record(event).await {
            Ok(()) => Ok(()),
            Err(e) => {
                metrics::counter!("crisp_audit_failures_total").increment(1);
                tracing::error!(request_id = %event.request_id, error = %e, "cannot write the audit event");
                self.broken_until_ms
                    .store(unix_ms().saturating_add(BROKEN_FOR_MS), Ordering::Relaxed);
                if self.refuse_on_failure {
                    Err(PipelineError::AuditUnavailable(e.to_string()))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// What the API edge knows of a call. Its identity is shared text, so a copy that an
/// answer's guard keeps (see [`guarded`]) allocates nothing.
#[derive(Clone, Debug)]
pub struct Call {
    pub request_id: Arc<str>,
    pub event_name: &'static str,
    pub requested: Arc<str>,
    pub principal: Option<Arc<str>>,
    /// The credential the principal signed in with.
    pub access_key_id: Option<Arc<str>>,
    pub source_ip: Arc<str>,
    pub user_agent: Arc<str>,
    /// The request body, kept only when this region logs invocations.
    pub input: Option<serde_json::Value>,
}

impl Call {
    /// Records who signed in.
    pub fn signed_in(&mut self, caller: Option<&crisp_policy::keys::Caller>) {
        self.principal = caller.map(|c| c.principal.clone());
        self.access_key_id = caller.map(|c| c.key_id.clone());
    }

    /// Who called what, without the body: what an event needs.
    fn identity(&self) -> Call {
        Call {
            request_id: self.request_id.clone(),
            event_name: self.event_name,
            requested: self.requested.clone(),
            principal: self.principal.clone(),
            access_key_id: self.access_key_id.clone(),
            source_ip: self.source_ip.clone(),
            user_agent: self.user_agent.clone(),
            input: None,
        }
    }

    pub fn new(
        request_id: &str,
        event_name: &'static str,
        headers: &HeaderMap,
        extensions: &http::Extensions,
    ) -> Call {
        let user_agent = headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        // At most 256 characters of it.
        let user_agent = match user_agent.char_indices().nth(256) {
            Some((end, _)) => &user_agent[..end],
            None => user_agent,
        };
        Call {
            request_id: request_id.into(),
            event_name,
            requested: "".into(),
            principal: None,
            access_key_id: None,
            source_ip: extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or_else(|| "".into(), |c| Arc::from(c.0.ip().to_string())),
            user_agent: user_agent.into(),
            input: None,
        }
    }
}

/// What of an admitted request the audit needs once its stream is consumed; shared, so
/// the copies an answer's steps and guard keep allocate nothing.
#[derive(Clone, Debug)]
pub struct Ran(Arc<RanFacts>);

#[derive(Debug)]
pub struct RanFacts {
    pub inference_region: String,
    pub profile_id: String,
    pub model_id: String,
    pub scope: Scope,
    pub tried: Vec<String>,
    pub application: Option<crate::app_profiles::AppProfile>,
    pub receipt: crate::pipeline::ReceiptSlot,
    /// The prompt's estimated tokens: the input an answer that ends early is billed.
    pub prompt_tokens: u32,
    /// Tokens of the text the answer delivered so far ([`Admitted::delivered`]): what an
    /// answer that ends early is known to have produced.
    pub delivered: Arc<std::sync::atomic::AtomicU32>,
}

impl std::ops::Deref for Ran {
    type Target = RanFacts;

    fn deref(&self) -> &RanFacts {
        &self.0
    }
}

impl Ran {
    pub fn of(a: &Admitted) -> Ran {
        Ran(Arc::new(RanFacts {
            inference_region: a.inference_region.clone(),
            profile_id: a.profile_id.clone(),
            model_id: a.model_id.clone(),
            scope: a.scope,
            tried: a.attempts.iter().map(|t| t.region.clone()).collect(),
            application: a.application.clone(),
            receipt: a.receipt.clone(),
            prompt_tokens: a.prompt_tokens,
            delivered: a.delivered.clone(),
        }))
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The event's common part, borrowing the node's and the call's text: an event is
/// serialized and dropped before its call is.
fn base<'a>(node: &'a Node, call: &'a Call) -> AuditEvent<'a> {
    AuditEvent {
        event_version: crisp_audit::EVENT_VERSION.into(),
        event_id: uuid::Uuid::new_v4().to_string().into(),
        event_time: now_rfc3339().into(),
        event_source: "crisp".into(),
        event_name: call.event_name.into(),
        aws_region: node.region_code().into(),
        user_identity: UserIdentity {
            kind: if call.principal.is_some() {
                "Principal"
            } else {
                "Anonymous"
            }
            .into(),
            principal_id: call.principal.as_deref().unwrap_or_default().into(),
            account_id: node.catalog.deployment.account.as_str().into(),
            access_key_id: call.access_key_id.as_deref().unwrap_or_default().into(),
        },
        source_ip_address: (*call.source_ip).into(),
        user_agent: (*call.user_agent).into(),
        request_id: (*call.request_id).into(),
        request_parameters: RequestParameters {
            model_id: (*call.requested).into(),
        },
        ..AuditEvent::default()
    }
}

/// Records a completed call; returns once the event is recorded.
pub async fn completed(
    node: &Node,
    call: &Call,
    ran: &Ran,
    usage: Usage,
    output: &str,
) -> Result<(), PipelineError> {
    if let (Some(log), Some(input)) = (&node.invocation_log, &call.input) {
        log.record(&crate::invocations::Invocation {
            request_id: &call.request_id,
            operation: call.event_name,
            model_id: &call.requested,
            principal: call.principal.as_deref(),
            inference_region: &ran.inference_region,
            input: input.clone(),
            output: serde_json::json!({"role": "assistant", "content": [{"text": output}]}),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        })
        .await;
    }
    let Some(audit) = &node.audit else {
        return Ok(());
    };
    let cost = cost(node, ran, usage.prompt_tokens, usage.completion_tokens);
    let mut event = base(node, call);
    event.additional_event_data = AdditionalEventData {
        input_tokens: usage.prompt_tokens,
        output_tokens: usage.completion_tokens,
        cost_usd: cost,
        receipt: ran.receipt.get().cloned(),
        ..route(ran)
    };
    audit.write(&event).await
}

/// What `input` and `output` tokens cost at the source's price for the route's scope.
fn cost(node: &Node, ran: &Ran, input: u32, output: u32) -> f64 {
    node.catalog.model(&ran.model_id).map_or(0.0, |m| {
        let price = if ran.scope == Scope::Global {
            m.global_price
        } else {
            m.price
        };
        price.cost(u64::from(input), u64::from(output))
    })
}

/// Where the model ran: the route and the application profile it came through.
fn route(ran: &Ran) -> AdditionalEventData<'_> {
    AdditionalEventData {
        inference_region: Some(ran.inference_region.as_str().into()),
        profile_id: Some(ran.profile_id.as_str().into()),
        regions_tried: ran.tried.iter().map(|r| r.as_str().into()).collect(),
        application_profile: ran.application.as_ref().map(|a| a.id.as_str().into()),
        tags: ran.application.as_ref().map_or_else(Vec::new, tags),
        ..AdditionalEventData::default()
    }
}

/// An application profile's tags, as an event carries them.
fn tags(a: &crate::app_profiles::AppProfile) -> Vec<(Text<'_>, Text<'_>)> {
    a.tags
        .iter()
        .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
        .collect()
}

/// Where the model ran, for an event of an answer that did not complete: the route, and
/// what it delivered before it ended.
fn ran_early<'a>(node: &Node, ran: &'a Ran, data: &mut crisp_audit::AdditionalEventData<'a>) {
    *data = route(ran);
    // Another region's answer that broke off carries its receipt for what it produced.
    data.receipt = ran.receipt.get().cloned();
    let delivered = ran.delivered.load(std::sync::atomic::Ordering::Relaxed);
    if delivered > 0 {
        // The prompt was processed in full before the first chunk.
        data.partial = true;
        data.input_tokens = ran.prompt_tokens;
        data.output_tokens = delivered;
        data.cost_usd = cost(node, ran, ran.prompt_tokens, delivered);
    }
}

/// Records a call that failed or was refused.
pub async fn failed(node: &Node, call: &Call, ran: Option<&Ran>, code: &str, err: &PipelineError) {
    let Some(audit) = &node.audit else {
        return;
    };
    let mut event = base(node, call);
    event.error_code = Some(code.into());
    event.error_message = Some(err.to_string().into());
    if let Some(ran) = ran {
        ran_early(node, ran, &mut event.additional_event_data);
    } else if let PipelineError::Exhausted { attempts, .. } = err {
        event.additional_event_data.regions_tried =
            attempts.iter().map(|a| a.region.as_str().into()).collect();
    }
    // After the route: `ran_early` sets the whole of the event's data.
    event.additional_event_data.error_kind = Some(err.code().into());
    let _ = audit.write(&event).await;
}

/// Records a management call (creating or deleting an application inference profile):
/// the profile it made or removed, or why it was refused. Best effort: the change is
/// made by then.
pub async fn managed(
    node: &Node,
    call: &Call,
    application: Option<&crate::app_profiles::AppProfile>,
    failure: Option<(&str, &str, &str)>,
) {
    let Some(audit) = &node.audit else {
        return;
    };
    let mut event = base(node, call);
    event.management_event = true;
    let data = &mut event.additional_event_data;
    if let Some(a) = application {
        data.application_profile = Some(a.id.as_str().into());
        data.profile_id = Some(a.copy_from.as_str().into());
        data.tags = tags(a);
    }
    if let Some((code, kind, message)) = failure {
        data.error_kind = Some(kind.into());
        event.error_code = Some(code.into());
        event.error_message = Some(message.into());
    }
    let _ = audit.write(&event).await;
}

/// Records a call whose client went away before its answer ended (the handler or the
/// response body was dropped): the model ran, so the trail says so. Emptied by the
/// answer's last chunk or error, whose outcome the API edge records itself.
struct Unfinished(Option<(Arc<Node>, Call, Ran)>);

impl Unfinished {
    /// The answer reached its end (or broke): the API edge records the outcome.
    fn settle(&mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some((node, call, ran)) = self.0.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { abandoned(&node, &call, &ran).await });
        }
    }
}

/// The event of a call abandoned by its client mid-answer.
async fn abandoned(node: &Node, call: &Call, ran: &Ran) {
    let Some(audit) = &node.audit else {
        return;
    };
    let mut event = base(node, call);
    event.error_code = Some("ClientDisconnected".into());
    event.error_message = Some(
        format!(
            "the client closed the connection before the answer was complete; the model ran in {}",
            ran.inference_region
        )
        .into(),
    );
    ran_early(node, ran, &mut event.additional_event_data);
    event.additional_event_data.error_kind = Some("client_disconnected".into());
    let _ = audit.write(&event).await;
}

/// An admitted answer whose call is audited even if its client goes away before it ends
/// (unchanged on a node without an audit trail).
pub fn guarded(
    stream: crisp_engine::ChunkStream,
    node: &Arc<Node>,
    call: &Call,
    ran: &Ran,
) -> crisp_engine::ChunkStream {
    use futures::StreamExt;
    if node.audit.is_none() {
        return stream;
    }
    let mut guard = Unfinished(Some((node.clone(), call.identity(), ran.clone())));
    // The closure owns the guard: it is dropped with the stream. What the answer delivered
    // is counted as it passes the pipeline (`Admitted::delivered`).
    Box::pin(stream.inspect(move |item| {
        if !matches!(item, Ok(crisp_engine::Chunk::Delta(_))) {
            guard.settle();
        }
    }))
}

/// Wraps an admitted answer so that its final chunk is released only once the audit event
/// is recorded (a failed write turns it into an error), and a broken answer is audited as
/// failed; one its client abandons is audited too.
pub fn audited(
    node: Arc<Node>,
    call: Call,
    ran: Ran,
    stream: crisp_engine::ChunkStream,
) -> crisp_engine::ChunkStream {
    use futures::StreamExt;
    let stream = guarded(stream, &node, &call, &ran);
    // Shared by every chunk's step: one reference count each, not a copy of the call.
    let state = Arc::new((node, call, ran, std::sync::Mutex::new(String::new())));
    Box::pin(stream.then(move |item| {
        let state = state.clone();
        async move {
            let (node, call, ran, text) = &*state;
            match item {
                Ok(crisp_engine::Chunk::Delta(t)) => {
                    if node.invocation_log.is_some()
                        && let Ok(mut all) = text.lock()
                    {
                        all.push_str(&t);
                    }
                    Ok(crisp_engine::Chunk::Delta(t))
                }
                Ok(crisp_engine::Chunk::Done {
                    finish_reason,
                    usage,
                }) => {
                    let output = text.lock().map(|t| t.clone()).unwrap_or_default();
                    match completed(node, call, ran, usage, &output).await {
                        Ok(()) => Ok(crisp_engine::Chunk::Done {
                            finish_reason,
                            usage,
                        }),
                        Err(e) => Err(crisp_engine::BackendError::Internal(e.to_string())),
                    }
                }
                Err(e) => {
                    let err = PipelineError::ModelFailed(e.to_string());
                    failed(node, call, Some(ran), "ModelStreamErrorException", &err).await;
                    Err(e)
                }
            }
        }
    }))
}

/// Copies sealed audit files and their digests from the local log to the region's object
/// store, oldest first, remembering what was shipped; a store outage only delays it.
pub struct Shipper {
    pub dir: std::path::PathBuf,
    pub store: Arc<dyn object_store::ObjectStore>,
    /// Object key prefix, e.g. `audit/us-east-1`.
    pub prefix: String,
}

impl Shipper {
    /// From a URL: `s3://bucket/prefix` (S3 settings from `AWS_*` variables, including
    /// `AWS_ENDPOINT` for S3-compatible stores) or `file:///path`.
    pub fn from_url(dir: &std::path::Path, url: &str, region: &str) -> Result<Shipper, String> {
        // `{region}` names each region's own bucket from one shared configuration.
        let url = url.replace("{region}", region);
        let parsed = url::Url::parse(&url).map_err(|e| format!("audit store URL {url:?}: {e}"))?;
        let opts: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let (store, path) =
            object_store::parse_url_opts(&parsed, opts).map_err(|e| e.to_string())?;
        let base = path.as_ref().trim_matches('/');
        let prefix = if base.is_empty() {
            region.to_owned()
        } else {
            format!("{base}/{region}")
        };
        Ok(Shipper {
            dir: dir.to_owned(),
            store: Arc::from(store),
            prefix,
        })
    }

    fn shipped_marker(&self) -> std::path::PathBuf {
        self.dir.join("shipped.txt")
    }

    /// Sealed files and digests not yet shipped, in order.
    pub fn backlog(&self) -> std::io::Result<Vec<String>> {
        let shipped: std::collections::HashSet<String> =
            std::fs::read_to_string(self.shipped_marker())
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
        let mut names = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            let n = e?.file_name().to_string_lossy().into_owned();
            if n.starts_with("audit-") && n.ends_with(".jsonl") {
                names.push(n);
            }
        }
        let digests = self.dir.join("digests");
        if digests.exists() {
            for e in std::fs::read_dir(digests)? {
                let n = e?.file_name().to_string_lossy().into_owned();
                if n.starts_with("digest-") {
                    names.push(format!("digests/{n}"));
                }
            }
        }
        // Each file before its digest, oldest first.
        names.sort_by_key(|n| {
            let seq: String = n.chars().filter(char::is_ascii_digit).collect();
            (seq, n.starts_with("digests/"))
        });
        Ok(names.into_iter().filter(|n| !shipped.contains(n)).collect())
    }

    /// Ships what is pending; returns how many objects are still pending.
    pub async fn ship_once(&self) -> usize {
        use object_store::ObjectStoreExt;
        let pending = match self.backlog() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the audit log");
                return 0;
            }
        };
        let mut left = pending.len();
        for name in pending {
            let Ok(bytes) = std::fs::read(self.dir.join(&name)) else {
                continue;
            };
            let key = object_store::path::Path::from(format!("{}/{name}", self.prefix));
            match self
                .store
                .put(&key, object_store::PutPayload::from(bytes))
                .await
            {
                Ok(_) => {
                    left -= 1;
                    let mut marker = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(self.shipped_marker());
                    if let Ok(f) = marker.as_mut() {
                        use std::io::Write;
                        let _ = writeln!(f, "{name}");
                        let _ = f.sync_data();
                    }
                }
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "audit store unavailable; will retry");
                    break;
                }
            }
        }
        metrics::gauge!("crisp_audit_backlog").set(left as f64);
        left
    }
}
