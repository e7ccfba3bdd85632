//! The destination side of the backbone: runs forwarded requests on this region's engines
//! after re-checking the boundary, and pushes this region's load to peers.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use crisp_engine::{BackendError, Chunk, GenerateRequest, Message, Sampling, Usage};
use futures::StreamExt;
use tracing::Instrument;

use super::wire::{self, LoadReport, PeerError, PeerErrorKind, StreamEvent, WireUsage};
use crate::serve::PeerIdentity;
use crate::{Node, ReceiptFacts};

pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route(wire::GENERATE_PATH, post(generate))
        .route(wire::TELEMETRY_PATH, get(telemetry))
        .with_state(node)
}

fn refuse(kind: PeerErrorKind, message: String, retry_after_ms: Option<u64>) -> Response {
    let status = StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(&PeerError {
        kind,
        message,
        retry_after_ms,
        receipt: None,
    })
    .unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn peer_error(e: &BackendError) -> PeerError {
    let (kind, retry_after_ms) = match e {
        BackendError::Capacity { retry_after, .. } => (
            PeerErrorKind::Capacity,
            retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        ),
        BackendError::Unavailable(_) => (PeerErrorKind::Unavailable, None),
        BackendError::Timeout(_) => (PeerErrorKind::Timeout, None),
        BackendError::BadRequest(_) => (PeerErrorKind::BadRequest, None),
        BackendError::Internal(_) => (PeerErrorKind::Internal, None),
    };
    PeerError {
        kind,
        message: e.detail().to_owned(),
        retry_after_ms,
        receipt: None,
    }
}

fn line(event: &StreamEvent) -> Bytes {
    let mut v = serde_json::to_vec(event).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn generate(
    State(node): State<Arc<Node>>,
    Extension(PeerIdentity(peer)): Extension<PeerIdentity>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let span = tracing::info_span!(
        "forwarded",
        otel.kind = "server",
        peer = %peer.region,
        region = node.region_code()
    );
    crate::trace::set_parent(&span, &headers);
    run_forwarded(node, peer, body).instrument(span).await
}

async fn run_forwarded(
    node: Arc<Node>,
    peer: crisp_transport::RegionIdentity,
    body: Bytes,
) -> Response {
    let req: wire::GenerateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                PeerErrorKind::BadRequest,
                format!("unreadable forwarded request: {e}"),
                None,
            );
        }
    };
    // A peer speaks only for its own region: its certificate names it.
    if peer.region != req.source_region || peer.deployment != node.deployment() {
        tracing::warn!(
            request_id = %req.request_id,
            claimed = %req.source_region,
            certificate = %peer,
            "refused a forwarded request whose source region is not the peer's identity"
        );
        metrics::counter!("crisp_backbone_refused_total", "reason" => "identity").increment(1);
        return refuse(
            PeerErrorKind::OutsideBoundary,
            format!(
                "the request claims source region {} but the peer's certificate is {peer}",
                req.source_region
            ),
            None,
        );
    }
    // The destination decides for itself whether it may run this request: a source node
    // with a wrong or forged catalog cannot move a profile's data outside its boundary.
    let Some(source) = node.catalog.region_ix(&req.source_region) else {
        return refuse(
            PeerErrorKind::OutsideBoundary,
            format!("unknown source region {}", req.source_region),
            None,
        );
    };
    let target = match node.profiles.resolve(&node.catalog, &req.profile, source) {
        Ok(t) => t,
        Err(e) => return refuse(PeerErrorKind::OutsideBoundary, e.to_string(), None),
    };
    if target.model.id != req.model || !target.destinations().contains(&node.region) {
        metrics::counter!("crisp_backbone_refused_total", "reason" => "boundary").increment(1);
        tracing::warn!(
            request_id = %req.request_id,
            profile = %req.profile,
            source = %req.source_region,
            "refused a forwarded request outside its boundary"
        );
        return refuse(
            PeerErrorKind::OutsideBoundary,
            format!(
                "region {} is not in the destination set of {} for model {}; refused",
                node.region_code(),
                req.profile,
                req.model
            ),
            None,
        );
    }
    let Some(backend) = node.backend(&req.model) else {
        return refuse(
            PeerErrorKind::Unavailable,
            format!(
                "region {} has no engine for {}",
                node.region_code(),
                req.model
            ),
            None,
        );
    };
    let (request_id, profile, source_region) = (
        req.request_id.clone(),
        req.profile.clone(),
        req.source_region.clone(),
    );
    let request = GenerateRequest {
        request_id: req.request_id,
        model: req.model,
        messages: req
            .messages
            .into_iter()
            .map(|m| Message {
                role: m.role,
                content: m.content,
            })
            .collect(),
        max_tokens: req.max_tokens,
        sampling: Sampling {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            repetition_penalty: req.repetition_penalty,
            seed: req.seed,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
        },
        stop: req.stop,
    };
    // What an answer that breaks off is attested to have processed.
    let prompt_tokens = crisp_engine::prompt_tokens(&request.messages);
    match backend.generate(request).await {
        Ok(stream) => {
            node.count_admission(&target.model.id);
            let facts = ReceiptFacts {
                request_id: request_id.clone(),
                profile: profile.clone(),
                model: target.model.id.clone(),
                source_region: source_region.clone(),
            };
            let signer = node.clone();
            let mut sent = 0u32;
            let events = node.until_cut(stream).map(move |item| {
                let event = match item {
                    Ok(Chunk::Delta(text)) => {
                        sent = sent.saturating_add(crisp_engine::count_chunk_tokens(&text));
                        StreamEvent::Delta(text)
                    }
                    Ok(Chunk::Done {
                        finish_reason,
                        usage,
                    }) => StreamEvent::Done {
                        finish_reason: finish_reason.name().to_owned(),
                        usage: WireUsage {
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                        },
                        receipt: Some(signer.sign_receipt(&facts, usage)),
                    },
                    Err(e) => {
                        let mut error = peer_error(&e);
                        error.receipt = (sent > 0).then(|| {
                            let usage = Usage {
                                prompt_tokens,
                                completion_tokens: sent,
                            };
                            signer.sign_receipt(&facts, usage)
                        });
                        StreamEvent::Error(error)
                    }
                };
                Ok::<_, std::convert::Infallible>(line(&event))
            });
            (
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(events),
            )
                .into_response()
        }
        Err(e) => {
            let p = peer_error(&e);
            refuse(p.kind, p.message, p.retry_after_ms)
        }
    }
}

async fn telemetry(State(node): State<Arc<Node>>) -> Response {
    let interval = Duration::from_millis(node.catalog.routing.telemetry_interval_ms);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stopping = {
        let node = node.clone();
        async move { node.stopping().await }
    };
    let stream = futures::stream::unfold((node, ticker), |(node, mut ticker)| async move {
        ticker.tick().await;
        let report: LoadReport = node.load_report();
        let mut v = serde_json::to_vec(&report).unwrap_or_default();
        v.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(v)),
            (node, ticker),
        ))
    })
    .take_until(Box::pin(stopping));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}
