//! The source side of the backbone: forwarding requests and subscribing to telemetry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use crisp_engine::event_loop::PerLoop;
use crisp_transport::identity::server_name;
use crisp_transport::tls::CaVerifier;
use crisp_transport::{SignedReceipt, TlsMaterial, TlsStore};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use rustls::pki_types::ServerName;

use bytes::Bytes;
use crisp_engine::{BackendError, Chunk, ChunkStream, FinishReason, Usage};
use futures::{Stream, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::lines;
use super::wire::{self, LoadReport, PeerError, PeerErrorKind, StreamEvent};
use crate::pipeline::ReceiptSlot;

const MAX_LINE: usize = 1 << 20;
/// How long a forwarded answer's stream may take to end after its last event.
const DRAIN_AFTER_LAST_EVENT: Duration = Duration::from_secs(1);

type Connector = HttpsConnector<HttpConnector>;
type HttpClient = Client<Connector, Full<Bytes>>;

/// Persistent HTTP/2 connections over mutual TLS to peer nodes, one per peer and event
/// loop, shared by that loop's forwarded requests and telemetry. Rebuilt when the node's
/// certificates rotate.
pub struct PeerClient {
    tls: Arc<TlsStore>,
    /// `host:port` of each peer → the name its certificate must carry.
    names: Arc<HashMap<String, String>>,
    cached: ArcSwap<Cached>,
}

struct Cached {
    material: Arc<TlsMaterial>,
    /// A client (and so a connection per peer) per event loop
    /// ([`crisp_engine::event_loop`]): a connection's task runs on the runtime that
    /// opened it, and a request from another loop would wake that one at every frame. A
    /// node serving clients on dedicated event loops forwards from each of them.
    clients: PerLoop<HttpClient>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("peers", &self.names)
            .finish()
    }
}

fn build(material: &Arc<TlsMaterial>, names: &Arc<HashMap<String, String>>) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    let names = names.clone();
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config((*material.client).clone())
        .https_only()
        .with_server_name_resolver(move |uri: &http::Uri| {
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            let name = names
                .get(authority)
                .ok_or_else(|| format!("{authority} is not a peer of this deployment"))?;
            let name: Result<ServerName<'static>, Box<dyn std::error::Error + Send + Sync>> =
                ServerName::try_from(name.clone()).map_err(|e| Box::new(e) as _);
            name
        })
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(Duration::from_secs(10))
        .http2_keep_alive_timeout(Duration::from_secs(5))
        .build(connector)
}

impl PeerClient {
    /// `peers` maps each peer's `host:port` to its region code.
    pub fn new(
        tls: Arc<TlsStore>,
        peers: impl IntoIterator<Item = (String, String)>,
    ) -> PeerClient {
        let deployment = tls.identity().deployment.clone();
        let names: Arc<HashMap<String, String>> = Arc::new(
            peers
                .into_iter()
                .map(|(addr, region)| (addr, server_name(&deployment, &region)))
                .collect(),
        );
        let material = tls.current();
        PeerClient {
            tls,
            names,
            cached: ArcSwap::from_pointee(Cached {
                material,
                clients: PerLoop::default(),
            }),
        }
    }

    /// This event loop's client for the current certificates.
    fn client(&self) -> HttpClient {
        let current = self.tls.current();
        let mut cached = self.cached.load_full();
        if !Arc::ptr_eq(&cached.material, &current) {
            cached = Arc::new(Cached {
                material: current,
                clients: PerLoop::default(),
            });
            self.cached.store(cached.clone());
        }
        let make = || build(&cached.material, &self.names);
        cached
            .clients
            .with(make, |client| client.clone())
            .unwrap_or_else(make)
    }

    /// Forwards a request to the node at `addr` in `region`. Resolves when that node's
    /// engine admitted or refused it. The stream ends with the destination's signed
    /// receipt, verified against the CA and stored in `receipt`; an answer without a valid
    /// receipt ends in an error, since nothing proves where it ran.
    pub async fn generate(
        &self,
        addr: &str,
        region: &str,
        req: &wire::GenerateRequest,
        receipt: ReceiptSlot,
    ) -> Result<ChunkStream, BackendError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| BackendError::Internal(format!("encoding a forwarded request: {e}")))?;
        let mut request = Request::post(format!("https://{addr}{}", wire::GENERATE_PATH))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| BackendError::Internal(format!("building a forwarded request: {e}")))?;
        crate::trace::inject(request.headers_mut());
        let response = self.client().request(request).await.map_err(|e| {
            BackendError::Unavailable(format!("peer {addr} unreachable: {}", causes(&e)))
        })?;
        let status = response.status();
        if status != StatusCode::OK {
            let bytes = Limited::new(response.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let err = serde_json::from_slice::<PeerError>(&bytes).unwrap_or(PeerError {
                kind: PeerErrorKind::Internal,
                message: format!(
                    "peer {addr} answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ),
                retry_after_ms: None,
                receipt: None,
            });
            return Err(to_backend_error(err));
        }
        let body = response.into_body().into_data_stream();
        let ca = self.tls.current().ca.clone();
        let expect = Expected {
            request_id: req.request_id.clone(),
            region: region.to_owned(),
            source: req.source_region.clone(),
        };
        let stream = lines(body, MAX_LINE).map(move |line| {
            let line = line.map_err(BackendError::Unavailable)?;
            match serde_json::from_slice::<StreamEvent>(&line) {
                Ok(StreamEvent::Delta(text)) => Ok(Chunk::Delta(text)),
                Ok(StreamEvent::Done {
                    finish_reason,
                    usage,
                    receipt: signed,
                }) => {
                    let checked = expect.check(&ca, signed)?;
                    let _ = receipt.set(checked);
                    Ok(Chunk::Done {
                        finish_reason: FinishReason::from_name(&finish_reason),
                        usage: Usage {
                            prompt_tokens: usage.prompt_tokens,
                            completion_tokens: usage.completion_tokens,
                        },
                    })
                }
                Ok(StreamEvent::Error(mut e)) => {
                    // An answer that broke off after it began is proven up to there.
                    if let Some(signed) = e.receipt.take()
                        && let Ok(checked) = expect.check(&ca, Some(signed))
                    {
                        let _ = receipt.set(checked);
                    }
                    Err(to_backend_error(e))
                }
                Err(e) => Err(BackendError::Internal(format!(
                    "peer sent an unreadable event: {e}"
                ))),
            }
        });
        // After the last event, read the body to its end: the destination closes the stream
        // right after it. A stream dropped before its END_STREAM arrives is reset, and frames
        // still in flight for it make h2 reset it again on its own; past 1,024 such resets it
        // closes the whole connection (GOAWAY), failing every request on that link.
        let stream = futures::stream::unfold(Some(Box::pin(stream)), |events| async move {
            let mut events = events?;
            let item = events.next().await?;
            if matches!(item, Ok(Chunk::Done { .. }) | Err(_)) {
                let rest = async { while events.next().await.is_some() {} };
                let _ = tokio::time::timeout(DRAIN_AFTER_LAST_EVENT, rest).await;
                return Some((item, None));
            }
            Some((item, Some(events)))
        });
        Ok(Box::pin(stream))
    }

    /// Opens the telemetry stream of the node at `addr`.
    pub async fn telemetry(
        &self,
        addr: &str,
    ) -> Result<impl Stream<Item = Result<LoadReport, String>> + Send + use<>, String> {
        let request = Request::get(format!("https://{addr}{}", wire::TELEMETRY_PATH))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self
            .client()
            .request(request)
            .await
            .map_err(|e| format!("peer {addr} unreachable: {}", causes(&e)))?;
        if response.status() != StatusCode::OK {
            return Err(format!(
                "peer {addr} refused telemetry: {}",
                response.status()
            ));
        }
        let body = response.into_body().into_data_stream();
        Ok(lines(body, MAX_LINE).map(|line| {
            let line = line?;
            serde_json::from_slice::<LoadReport>(&line).map_err(|e| e.to_string())
        }))
    }
}

/// What a destination's receipt must say.
struct Expected {
    request_id: String,
    region: String,
    source: String,
}

impl Expected {
    fn check(
        &self,
        ca: &CaVerifier,
        signed: Option<SignedReceipt>,
    ) -> Result<SignedReceipt, BackendError> {
        let fail = |why: String| {
            metrics::counter!("crisp_backbone_receipt_failures_total").increment(1);
            tracing::warn!(region = %self.region, request_id = %self.request_id, %why, "receipt refused");
            BackendError::Internal(format!(
                "the answer from {} came without a valid processing receipt ({why}); it cannot be proven where it ran",
                self.region
            ))
        };
        let signed = signed.ok_or_else(|| fail("no receipt".into()))?;
        let receipt = signed.verify(ca).map_err(|e| fail(e.to_string()))?;
        if receipt.request_id != self.request_id
            || receipt.inference_region != self.region
            || receipt.source_region != self.source
        {
            return Err(fail(format!(
                "receipt is for request {} from {} run in {}",
                receipt.request_id, receipt.source_region, receipt.inference_region
            )));
        }
        Ok(signed)
    }
}

fn to_backend_error(e: PeerError) -> BackendError {
    match e.kind {
        PeerErrorKind::Capacity => BackendError::Capacity {
            retry_after: e.retry_after_ms.map(Duration::from_millis),
            message: e.message,
        },
        PeerErrorKind::BadRequest => BackendError::BadRequest(e.message),
        PeerErrorKind::Timeout => BackendError::Timeout(e.message),
        // A destination that refuses the boundary disagrees with this node's catalog: do
        // not use it for this request, and let the other candidates try.
        PeerErrorKind::OutsideBoundary | PeerErrorKind::Unavailable => {
            BackendError::Unavailable(e.message)
        }
        PeerErrorKind::Internal => BackendError::Internal(e.message),
    }
}

/// An error with the errors that caused it: a refused TLS handshake says why (an unknown
/// issuer, a name mismatch) instead of only "client error (Connect)".
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}
