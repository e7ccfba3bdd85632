//! Fake peers with genuine certificates that misbehave on purpose.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use crisp_node::backbone::wire::{self, LoadReport, ModelLoad, StreamEvent, WireUsage};
use crisp_node::serve::{Security, serve};
use crisp_transport::receipt::{Receipt, SignedReceipt};
use futures::StreamExt;

use super::{Federation, NOVA, REGIONS, Setup, eventually, now_secs, tls_for};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fake {
    /// Answers 429: at capacity, whatever its telemetry says.
    Full,
    Honest,
    NoReceipt,
    Tampered,
    SignedByAnotherRegion,
    Hang,
    /// Honest, but ends each answer's stream only 100 ms after its last event, and counts
    /// the answers whose stream it could end (the source read them to the end) in
    /// [`LATE_ENDS_FINISHED`].
    LateEnd,
}

/// Answers of a [`Fake::LateEnd`] peer whose streams were read to their end.
pub static LATE_ENDS_FINISHED: AtomicUsize = AtomicUsize::new(0);

/// A fake eu-west-1 with a genuine certificate that answers generations as `mode` says.
pub async fn run_fake(f: &mut Federation, mode: Fake) {
    let (_, listeners) = f.external.pop().unwrap();
    let store = tls_for(&f.ca, "eu-west-1");
    let other = tls_for(&f.ca, "eu-west-3").current();
    let me = store.current();
    let telemetry = || async {
        let reports = futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let r = LoadReport {
                region: "eu-west-1".into(),
                models: vec![ModelLoad {
                    model: NOVA.into(),
                    slots: 8,
                    running: 0,
                    queue_limit: 0,
                    waiting: 0,
                }],
            };
            let mut line = serde_json::to_vec(&r).unwrap();
            line.push(b'\n');
            Some((
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
                (),
            ))
        });
        Body::from_stream(reports)
    };
    let generate = move |body: bytes::Bytes| {
        let me = me.clone();
        let other = other.clone();
        async move {
            let req: wire::GenerateRequest = serde_json::from_slice(&body).unwrap();
            if mode == Fake::Hang {
                std::future::pending::<()>().await;
            }
            if mode == Fake::Full {
                let refusal = wire::PeerError {
                    kind: wire::PeerErrorKind::Capacity,
                    message: "engine at capacity".into(),
                    retry_after_ms: Some(1000),
                    receipt: None,
                };
                return (
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    Body::from(serde_json::to_vec(&refusal).unwrap()),
                );
            }
            let receipt = Receipt {
                request_id: req.request_id,
                profile: req.profile,
                model: req.model,
                source_region: req.source_region,
                inference_region: "eu-west-1".into(),
                input_tokens: 3,
                output_tokens: 1,
                issued_at_ms: now_secs() * 1000,
            };
            let signed = match mode {
                Fake::Honest | Fake::LateEnd => Some(SignedReceipt::sign(&me, &receipt)),
                Fake::NoReceipt => None,
                Fake::Tampered => {
                    let mut s = SignedReceipt::sign(&me, &receipt);
                    s.payload = s
                        .payload
                        .replace("\"output_tokens\":1", "\"output_tokens\":9");
                    Some(s)
                }
                Fake::SignedByAnotherRegion => Some(SignedReceipt::sign(&other, &receipt)),
                Fake::Hang | Fake::Full => None,
            };
            let events = [
                StreamEvent::Delta("hello".into()),
                StreamEvent::Done {
                    finish_reason: "stop".into(),
                    usage: WireUsage {
                        prompt_tokens: 3,
                        completion_tokens: 1,
                    },
                    receipt: signed,
                },
            ];
            let body: Vec<u8> = events
                .iter()
                .flat_map(|e| {
                    let mut l = serde_json::to_vec(e).unwrap();
                    l.push(b'\n');
                    l
                })
                .collect();
            if mode == Fake::LateEnd {
                let events = futures::stream::iter([Some(bytes::Bytes::from(body))]).chain(
                    futures::stream::once(async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        LATE_ENDS_FINISHED.fetch_add(1, Ordering::SeqCst);
                        None
                    }),
                );
                let events = events.filter_map(|b| async move { b.map(Ok::<_, std::io::Error>) });
                return (axum::http::StatusCode::OK, Body::from_stream(events));
            }
            (axum::http::StatusCode::OK, Body::from(body))
        }
    };
    let app = Router::new()
        .route(wire::TELEMETRY_PATH, get(telemetry))
        .route(wire::GENERATE_PATH, post(generate));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _stop_tx;
        serve(
            listeners.peer,
            app,
            Security::Mutual(store),
            stop,
            Duration::from_secs(1),
            None,
            crisp_node::serve::ConnectionLimits::peer(),
        )
        .await;
    });
}

pub async fn with_fake(mode: Fake) -> Federation {
    let mut f = Setup::new(&[REGIONS[0], REGIONS[2], REGIONS[3]])
        .external(&["eu-west-1"])
        .routing("admit_timeout_ms = 300")
        .start()
        .await;
    run_fake(&mut f, mode).await;
    let src = &f.node("us-east-1").node;
    let ix = src.catalog.region_ix("eu-west-1").unwrap();
    eventually("the fake is heard", || {
        src.fleet.summary(ix).unwrap().reachable
    })
    .await;
    f
}
