//! W3C trace context across the backbone, so one trace spans the source node, the
//! forwarded hop and the destination node. Exporting spans (OTLP) is the binary's choice;
//! without an OpenTelemetry layer installed, nothing is injected or extracted.

use http::HeaderMap;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes the current span's context into outgoing headers (`traceparent`).
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// Makes `span` a child of the context carried by incoming headers, if any.
pub fn set_parent(span: &tracing::Span, headers: &HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}
