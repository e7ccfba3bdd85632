//! One trace spans the source node, the forwarded hop and the destination node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use support::{REGIONS, Setup, ask, eventually, inference_region};
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_crosses_the_backbone() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("crisp-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let f = Setup::new(&[REGIONS[0], REGIONS[3]]).start().await;
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(inference_region(&r), "eu-west-1");
    r.text().await.unwrap();

    let spans = || exporter.get_finished_spans().unwrap();
    eventually("both nodes exported their spans", || {
        let s = spans();
        s.iter().any(|s| s.name == "request") && s.iter().any(|s| s.name == "forwarded")
    })
    .await;
    let spans = spans();
    let request = spans.iter().find(|s| s.name == "request").unwrap();
    let attempt = spans.iter().find(|s| s.name == "attempt").unwrap();
    let forwarded = spans.iter().find(|s| s.name == "forwarded").unwrap();
    let trace = request.span_context.trace_id();
    assert_eq!(attempt.span_context.trace_id(), trace);
    assert_eq!(
        forwarded.span_context.trace_id(),
        trace,
        "the destination joined the source's trace"
    );
    assert!(forwarded.parent_span_is_remote);
    assert_eq!(forwarded.parent_span_id, attempt.span_context.span_id());
    let attr = |s: &opentelemetry_sdk::trace::SpanData, k: &str| {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| kv.value.to_string())
    };
    assert_eq!(attr(forwarded, "region").as_deref(), Some("eu-west-1"));
    assert_eq!(attr(forwarded, "peer").as_deref(), Some("us-east-1"));
    assert_eq!(attr(request, "source").as_deref(), Some("us-east-1"));
    f.stop().await;
}
