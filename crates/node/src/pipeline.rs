//! The request pipeline, the same for every client dialect: resolve the profile, ask the
//! router for candidates, and try them in order (this region's engine or a peer's) until
//! one admits the request, the retry budget is spent or the deadline passes.
//!
//! Failover happens only before admission: once an engine has admitted the request, its
//! answer is streamed to the client, so no byte is ever sent twice.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crisp_catalog::RegionIx;
use crisp_catalog::profiles::Target;
use crisp_engine::{BackendError, Chunk, ChunkStream, GenerateRequest, Message, Sampling};
use crisp_routing::{Decision, Exclusion, Load, Query, Scope, route};
use crisp_transport::SignedReceipt;
use futures::StreamExt;
use tracing::Instrument;

use crate::app_profiles::AppProfile;
use crate::backbone::wire;
use crate::error::{Attempt, PipelineError};
use crate::{Node, observe};

/// A request in the pipeline's own terms.
#[derive(Clone, Debug)]
pub struct InferRequest {
    pub request_id: String,
    /// The model ID, profile ID or ARN as the client sent it.
    pub requested: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    /// The authenticated caller, when access control is on.
    pub principal: Option<Arc<str>>,
    /// What the caller is doing (streamed answers are their own action).
    pub action: crisp_policy::Action,
}

/// Filled with the destination's verified receipt when the answer completes.
pub type ReceiptSlot = Arc<OnceLock<SignedReceipt>>;

/// A request an engine has admitted: where, after which attempts, and its token stream.
pub struct Admitted {
    /// The signed receipt of the region that ran it, once the stream has finished; only
    /// answers from another region carry one.
    pub receipt: ReceiptSlot,
    pub inference_region: String,
    pub profile_id: String,
    pub model_id: String,
    pub scope: Scope,
    /// Regions that refused before the one that admitted.
    pub attempts: Vec<Attempt>,
    /// Why the router placed the admitting region where it was.
    pub reason: String,
    /// The application profile the request came through, for cost tracking by tag.
    pub application: Option<crate::app_profiles::AppProfile>,
    /// The prompt's tokens as crisp estimates them ([`crisp_engine::prompt_tokens`]):
    /// what an answer that ends before its engine reports usage is billed for its input.
    pub prompt_tokens: u32,
    /// Tokens of the text the answer delivered so far, as crisp estimates them
    /// ([`crisp_engine::count_chunk_tokens`], counted once per chunk as it passes): what
    /// an answer that ends early is known to have produced, for the metrics and the audit.
    pub delivered: Arc<AtomicU32>,
    pub stream: ChunkStream,
}

/// Warnings about engines failing requests, at most one per region per second.
static FAILURE_LOG: observe::LogThrottle = observe::LogThrottle::new(Duration::from_secs(1));

/// Cool-down after a capacity error that carries no Retry-After.
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

fn outcome(e: &BackendError) -> String {
    match e {
        BackendError::Capacity { .. } => "at capacity".to_owned(),
        BackendError::Unavailable(_) => "unreachable".to_owned(),
        BackendError::Timeout(_) => "timed out".to_owned(),
        BackendError::BadRequest(m) => format!("rejected: {m}"),
        BackendError::Internal(m) => format!("failed: {m}"),
    }
}

/// Records what happened to an admitted request as its answer streams: time to first
/// token, tokens and cost at the end, and the outcome (also when the client goes away).
struct Watch {
    served: Arc<observe::Served>,
    price: crisp_catalog::Price,
    started: std::time::Instant,
    first_token: bool,
    /// Tokens of the text delivered: the output tokens of an answer that ends early.
    delivered: Arc<AtomicU32>,
    /// The prompt's estimated tokens: the input tokens of an answer that ends early.
    prompt_tokens: u32,
    finished: bool,
}

impl Watch {
    fn finish(&mut self, outcome: &str) {
        self.finished = true;
        self.served.finished(outcome, self.started.elapsed());
    }

    /// An answer that ended before the engine reported its usage: its prompt and the
    /// tokens it delivered still count (the audit event says the same).
    fn finish_early(&mut self, outcome: &str) {
        let delivered = self.delivered.load(Ordering::Relaxed);
        if delivered > 0 {
            let cost = self
                .price
                .cost(u64::from(self.prompt_tokens), u64::from(delivered));
            self.served.usage(self.prompt_tokens, delivered, cost);
        }
        self.finish(outcome);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.finished {
            self.finish_early("client_disconnected");
        }
    }
}

fn watched(stream: ChunkStream, mut watch: Watch) -> ChunkStream {
    Box::pin(stream.inspect(move |item| match item {
        Ok(Chunk::Delta(text)) => {
            // Tokens, not chunks: engines batch tokens into one chunk when they come fast.
            let tokens = crisp_engine::count_chunk_tokens(text);
            // Relaxed: only this stream's poller adds; readers look once it has ended.
            let _ = watch
                .delivered
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_add(tokens))
                });
            if !watch.first_token {
                watch.first_token = true;
                watch.served.first_token(watch.started.elapsed());
            }
        }
        Ok(Chunk::Done { usage, .. }) => {
            let cost = watch.price.cost(
                u64::from(usage.prompt_tokens),
                u64::from(usage.completion_tokens),
            );
            watch
                .served
                .usage(usage.prompt_tokens, usage.completion_tokens, cost);
            watch.finish("ok");
        }
        Err(e) => {
            let region = watch.served.region();
            if let Some(held) = FAILURE_LOG.admit(region, Instant::now()) {
                tracing::warn!(region, error = %e, similar_failures_not_logged = held, "an admitted answer broke off");
            }
            watch.finish_early("stream_error");
        }
    }))
}

/// A bounded label for why a region did not take a request.
fn cause(e: &BackendError) -> &'static str {
    match e {
        BackendError::Capacity { .. } => "capacity",
        BackendError::Unavailable(_) => "unreachable",
        BackendError::Timeout(_) => "timeout",
        BackendError::BadRequest(_) => "rejected",
        BackendError::Internal(_) => "error",
    }
}

fn exclusion_text(why: Exclusion) -> &'static str {
    match why {
        Exclusion::Unreachable => "unreachable",
        Exclusion::NotServing => "not serving the model",
        Exclusion::UnknownRegion => "unknown region",
    }
}

/// What a request names (a model, a profile, or an ARN of either or of an application
/// inference profile), resolved in this region: the profile (or model) it runs as, and the
/// application profile it came through. An application profile routes exactly like the
/// profile or model it copies.
pub fn resolve<'a>(
    node: &'a Node,
    requested: &str,
) -> Result<(Target<'a>, Option<AppProfile>), PipelineError> {
    let catalog = &node.catalog;
    let application_arn =
        requested.starts_with("arn:") && requested.contains(":application-inference-profile/");
    let app_id = if application_arn {
        crisp_catalog::profiles::application_profile_id(catalog, requested)?
    } else {
        requested
    };
    let application = node
        .app_profiles
        .as_ref()
        .and_then(|store| store.get(app_id));
    if application.is_none() && application_arn {
        return Err(PipelineError::Resolve(
            crisp_catalog::profiles::ResolveError::Unknown {
                requested: requested.to_owned(),
                suggestion: None,
            },
        ));
    }
    if let Some(app) = &application
        && let Some(home) = app.region.as_deref()
        && home != node.region_code()
    {
        return Err(PipelineError::InvalidRequest(format!(
            "application inference profile {} copies the model {} in {home} and runs only there: call it through {home}'s endpoint, or create one from an inference profile to route across regions (nothing was run)",
            app.name, app.copy_from
        )));
    }
    let copied = application
        .as_ref()
        .map_or(requested, |a| a.copy_from.as_str());
    let target = node.profiles.resolve(catalog, copied, node.region)?;
    Ok((target, application))
}

/// Runs a request up to admission.
pub async fn run(node: &Arc<Node>, req: InferRequest) -> Result<Admitted, PipelineError> {
    let started = std::time::Instant::now();
    if node.audit.as_ref().is_some_and(|a| a.refusing()) {
        return Err(PipelineError::AuditUnavailable(
            "recent audit writes failed".into(),
        ));
    }
    let catalog = &node.catalog;
    let (target, application) = resolve(node, &req.requested)?;
    if let Some(access) = &node.access {
        let principal = req
            .principal
            .as_deref()
            .ok_or_else(|| PipelineError::Unauthenticated("no credentials".into()))?;
        let snapshot = access.snapshot();
        let through = application.as_ref().map(|a| a.policy_facts());
        let verdict = snapshot.authorize_through(
            principal,
            req.action,
            target.id(),
            node.region_code(),
            through.as_ref(),
        );
        if let crisp_policy::Verdict::Deny(reason) = verdict {
            metrics::counter!("crisp_authorization_denials_total", "source" => node.region_code().to_owned(), "reason" => reason.label())
                .increment(1);
            tracing::info!(request_id = %req.request_id, principal, profile = target.id(), reason = ?reason, "request denied");
            // What the caller may use instead: the other current profiles of the model,
            // and the bare model where this region serves it.
            let allowed = node
                .profiles
                .iter()
                .filter(|p| p.model == target.model.id && p.superseded_by.is_none())
                .map(|p| p.id.as_str())
                .chain(
                    target
                        .model
                        .serves(node.region)
                        .then_some(target.model.id.as_str()),
                )
                .filter(|id| *id != target.id())
                .filter(|id| {
                    snapshot
                        .authorize(principal, req.action, id, node.region_code())
                        .is_allowed()
                })
                .take(3)
                .map(str::to_owned)
                .collect();
            return Err(PipelineError::Denied {
                profile: target.id().to_owned(),
                reason: reason.category(),
                allowed,
            });
        }
    }
    let model_ix = catalog
        .model_ix(&target.model.id)
        .ok_or_else(|| PipelineError::Internal("resolved model missing".into()))?;
    let local_load = node.backend_at(model_ix).map(|b| {
        let l = b.load();
        Load {
            slots: l.slots,
            running: l.running,
            queue_limit: l.queue_limit,
            waiting: l.waiting,
        }
    });
    let views = node.fleet.views(model_ix, node.region, local_load);
    let query = Query {
        source: node.region,
        destinations: target.destinations(),
        scope: target.scope,
        now_ms: node.fleet.now_ms(),
    };
    let decision: Decision = route(&query, &views, &node.topology, &node.router);
    tracing::debug!(request_id = %req.request_id, profile = target.id(), ?decision, "routing decision");

    let settings = catalog.routing;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(settings.deadline_ms);
    let max_attempts = usize::try_from(settings.max_attempts).unwrap_or(usize::MAX);
    let admit_timeout = Duration::from_millis(settings.admit_timeout_ms);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut skipped: Vec<Attempt> = decision
        .excluded
        .iter()
        .map(|e| Attempt {
            region: catalog.region_code(e.region).to_owned(),
            outcome: exclusion_text(e.why).to_owned(),
        })
        .collect();
    let mut retry_after: Option<Duration> = None;
    let mut forwarded: Option<wire::GenerateRequest> = None;
    let receipt: ReceiptSlot = Arc::default();

    for (n, candidate) in decision.candidates.iter().enumerate() {
        let region = candidate.region;
        let code = catalog.region_code(region).to_owned();
        let now = tokio::time::Instant::now();
        if n >= max_attempts || now >= deadline {
            let why = if n >= max_attempts {
                "not tried: retry budget spent"
            } else {
                "not tried: deadline passed"
            };
            skipped.extend(decision.candidates[n..].iter().map(|c| Attempt {
                region: catalog.region_code(c.region).to_owned(),
                outcome: why.to_owned(),
            }));
            break;
        }
        let attempt = tracing::info_span!("attempt", region = %code, reason = %candidate.reason);
        let result = tokio::time::timeout(
            (deadline - now).min(admit_timeout),
            try_region(
                node,
                &req,
                &target.model.id,
                target.id(),
                region,
                &mut forwarded,
                &receipt,
            )
            .instrument(attempt),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::Timeout(format!(
                "{code} did not admit in time"
            )))
        });
        match result {
            Ok(stream) => {
                if region == node.region {
                    node.count_admission(&target.model.id);
                }
                let price = match target.scope {
                    Scope::Global => target.model.global_price,
                    _ => target.model.price,
                };
                let prompt_tokens = crisp_engine::prompt_tokens(&req.messages);
                let delivered = Arc::new(AtomicU32::new(0));
                let watch = Watch {
                    served: node.served.get(
                        node.region_code(),
                        target.id(),
                        target.scope,
                        &code,
                        &target.model.id,
                    ),
                    price,
                    started,
                    first_token: false,
                    delivered: delivered.clone(),
                    prompt_tokens,
                    finished: false,
                };
                return Ok(Admitted {
                    receipt,
                    inference_region: code,
                    profile_id: target.id().to_owned(),
                    model_id: target.model.id.clone(),
                    scope: target.scope,
                    attempts,
                    reason: candidate.reason.to_string(),
                    application: application.clone(),
                    prompt_tokens,
                    delivered,
                    stream: watched(node.until_cut(stream), watch),
                });
            }
            Err(e) => {
                // A full engine is routine; a broken one is what an operator must hear of,
                // once a second per region however many requests meet it.
                let broken = !matches!(
                    e,
                    BackendError::Capacity { .. } | BackendError::BadRequest(_)
                );
                match broken
                    .then(|| FAILURE_LOG.admit(&code, Instant::now()))
                    .flatten()
                {
                    Some(also) => {
                        tracing::warn!(request_id = %req.request_id, region = %code, error = %e, similar_failures_not_logged = also, "attempt failed");
                    }
                    None => {
                        tracing::debug!(request_id = %req.request_id, region = %code, error = %e, "attempt failed");
                    }
                }
                if e.trips_cooldown() {
                    let wait = match &e {
                        BackendError::Capacity {
                            retry_after: Some(d),
                            ..
                        } => *d,
                        _ => DEFAULT_COOLDOWN,
                    };
                    retry_after = Some(retry_after.map_or(wait, |r| r.min(wait)));
                    node.fleet.cool_down(
                        region,
                        model_ix,
                        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    );
                    observe::cooldown(node.region_code(), &code);
                }
                match e {
                    BackendError::BadRequest(m) => return Err(PipelineError::ModelRejected(m)),
                    e => {
                        observe::failover(node.region_code(), &code, cause(&e));
                        attempts.push(Attempt {
                            region: code,
                            outcome: outcome(&e),
                        });
                    }
                }
            }
        }
    }
    Err(PipelineError::Exhausted {
        profile: target.id().to_owned(),
        attempts,
        skipped,
        boundary: target
            .destinations()
            .iter()
            .map(|&r| catalog.region_code(r).to_owned())
            .collect(),
        retry_after: Some(retry_after.unwrap_or(DEFAULT_COOLDOWN)),
    })
}

async fn try_region(
    node: &Arc<Node>,
    req: &InferRequest,
    model: &str,
    profile: &str,
    region: RegionIx,
    forwarded: &mut Option<wire::GenerateRequest>,
    receipt: &ReceiptSlot,
) -> Result<ChunkStream, BackendError> {
    if region == node.region {
        let backend = node.backend(model).ok_or_else(|| {
            BackendError::Unavailable(format!("no engine for {model} in this region"))
        })?;
        // No receipt: the region that ran it is the one writing the audit event, and the
        // sealed audit file is signed with the same key a receipt would be.
        return backend
            .generate(GenerateRequest {
                request_id: req.request_id.clone(),
                model: model.to_owned(),
                messages: req.messages.clone(),
                max_tokens: req.max_tokens,
                sampling: req.sampling,
                stop: req.stop.clone(),
            })
            .await;
    }
    let (addr, code) = node
        .catalog
        .region(region)
        .map(|r| (r.peer_addr.as_str(), r.code.as_str()))
        .ok_or_else(|| BackendError::Unavailable("unknown region".into()))?;
    let body = forwarded.get_or_insert_with(|| wire::GenerateRequest {
        request_id: req.request_id.clone(),
        source_region: node.region_code().to_owned(),
        profile: profile.to_owned(),
        model: model.to_owned(),
        messages: req
            .messages
            .iter()
            .map(|m| wire::PeerMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect(),
        max_tokens: req.max_tokens,
        temperature: req.sampling.temperature,
        top_p: req.sampling.top_p,
        top_k: req.sampling.top_k,
        min_p: req.sampling.min_p,
        repetition_penalty: req.sampling.repetition_penalty,
        seed: req.sampling.seed,
        presence_penalty: req.sampling.presence_penalty,
        frequency_penalty: req.sampling.frequency_penalty,
        stop: req.stop.clone(),
    });
    node.peers.generate(addr, code, body, receipt.clone()).await
}
