//! Process-wide observability set up by the binary: logs and the metrics recorder.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use crisp_node::admin::MetricsRender;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    /// Compact human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Flushes log lines and exported spans at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    _logs: tracing_appender::non_blocking::WorkerGuard,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.shutdown();
        }
    }
}

/// Logs to stderr (text or JSON) and, when an OTLP endpoint is given, traces exported
/// over OTLP/HTTP with W3C trace context propagated across the backbone. Must run
/// outside the async runtime (the OTLP client runs its own).
pub fn init(default: &str, format: LogFormat, otlp: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Lines are formatted on the thread that logs and written to stderr by a thread of
    // their own, so a request never waits for the terminal or the log pipe. When that
    // thread falls behind, callers wait rather than lines being dropped.
    let (stderr, logs) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("crisp-logs")
        .finish(std::io::stderr());
    // Colours only for a terminal: a log file or pipe gets plain text.
    let ansi = std::io::stderr().is_terminal();
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .compact()
            .with_ansi(ansi)
            .with_writer(stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(stderr)
            .boxed(),
    };
    let (otel, provider) = match otlp {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .build()?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("crisp").build())
                .build();
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("crisp"));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    // Spans (request, attempt, forwarded) are for traces. Without an OTLP endpoint they
    // are not recorded at all: every log line about a request names its `request_id`
    // itself, and a request does not pay for creating, formatting and entering spans
    // that nothing exports.
    let spans = otel.is_some();
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(move |m| {
            spans || !m.is_span()
        }))
        .try_init();
    Ok(Telemetry {
        provider,
        _logs: logs,
    })
}

/// Installs the Prometheus recorder for this process and returns its renderer.
pub fn install_metrics() -> anyhow::Result<MetricsRender> {
    let latency = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(Arc::new(move || handle.render()))
}
