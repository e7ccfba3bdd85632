//! The source side of the backbone: forwarding requests and subscribing to telemetry.

use std::time::Duration;

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

const MAX_LINE: usize = 1 << 20;

/// A pool of HTTP/2 connections to peer nodes.
#[derive(Clone, Debug)]
pub struct PeerClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for PeerClient {
    fn default() -> Self {
        PeerClient::new()
    }
}

impl PeerClient {
    pub fn new() -> PeerClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .build(connector);
        PeerClient { client }
    }

    /// Forwards a request to the node at `addr`. Resolves when that node's engine admitted
    /// or refused it.
    pub async fn generate(
        &self,
        addr: &str,
        req: &wire::GenerateRequest,
    ) -> Result<ChunkStream, BackendError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| BackendError::Internal(format!("encoding a forwarded request: {e}")))?;
        let request = Request::post(format!("http://{addr}{}", wire::GENERATE_PATH))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| BackendError::Internal(format!("building a forwarded request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| BackendError::Unavailable(format!("peer {addr} unreachable: {e}")))?;
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
            });
            return Err(to_backend_error(err));
        }
        let body = response.into_body().into_data_stream();
        let stream = lines(body, MAX_LINE).map(move |line| {
            let line = line.map_err(BackendError::Unavailable)?;
            match serde_json::from_slice::<StreamEvent>(&line) {
                Ok(StreamEvent::Delta(text)) => Ok(Chunk::Delta(text)),
                Ok(StreamEvent::Done {
                    finish_reason,
                    usage,
                }) => Ok(Chunk::Done {
                    finish_reason: if finish_reason == "length" {
                        FinishReason::Length
                    } else {
                        FinishReason::Stop
                    },
                    usage: Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                    },
                }),
                Ok(StreamEvent::Error(e)) => Err(to_backend_error(e)),
                Err(e) => Err(BackendError::Internal(format!(
                    "peer sent an unreadable event: {e}"
                ))),
            }
        });
        Ok(Box::pin(stream))
    }

    /// Opens the telemetry stream of the node at `addr`.
    pub async fn telemetry(
        &self,
        addr: &str,
    ) -> Result<impl Stream<Item = Result<LoadReport, String>> + Send + use<>, String> {
        let request = Request::get(format!("http://{addr}{}", wire::TELEMETRY_PATH))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("peer {addr} unreachable: {e}"))?;
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
