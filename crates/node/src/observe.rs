//! What the node reports about itself: every metric name and label lives here, so the
//! set stays consistent and bounded (no request IDs or principals as labels).
//!
//! The `metrics` facade is used; the binary installs the Prometheus recorder and the admin
//! listener renders it.

use std::time::Duration;

use crisp_routing::Scope;

use crate::Node;

pub fn scope_label(scope: Scope) -> &'static str {
    match scope {
        Scope::InRegion => "model",
        Scope::Geographic => "geographic",
        Scope::Global => "global",
    }
}

/// The outcome of one client request, recorded once at the API edge.
pub struct RequestOutcome<'a> {
    pub source: &'a str,
    /// The resolved profile or model ID; `"-"` when it did not resolve (unbounded input
    /// never becomes a label).
    pub profile: &'a str,
    pub scope: &'static str,
    /// `"-"` when nothing ran.
    pub inference_region: &'a str,
    /// `ok` or an error code such as `capacity_exhausted`.
    pub outcome: &'a str,
    pub duration: Duration,
}

pub fn request(o: &RequestOutcome<'_>) {
    let labels = [
        ("source", o.source.to_owned()),
        ("profile", o.profile.to_owned()),
        ("scope", o.scope.to_owned()),
        ("inference_region", o.inference_region.to_owned()),
        ("outcome", o.outcome.to_owned()),
    ];
    metrics::counter!("crisp_requests_total", &labels).increment(1);
    if o.inference_region != "-" && o.inference_region != o.source {
        metrics::counter!(
            "crisp_cross_region_requests_total",
            "source" => o.source.to_owned(),
            "inference_region" => o.inference_region.to_owned()
        )
        .increment(1);
    }
    metrics::histogram!(
        "crisp_request_duration_seconds",
        "source" => o.source.to_owned(),
        "outcome" => o.outcome.to_owned()
    )
    .record(o.duration.as_secs_f64());
}

/// Logs where an admitted request runs: at `info` when it had to fail over, otherwise at
/// `debug` (every request is in the audit trail and the metrics already; a log line per
/// request at full rate would cost more than the rest of its logging).
pub fn admitted(
    node: &Node,
    request_id: &str,
    admitted: &crate::pipeline::Admitted,
    api: &'static str,
    stream: bool,
) {
    let failovers = admitted.attempts.len();
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                request_id,
                source = node.region_code(),
                profile = %admitted.profile_id,
                inference_region = %admitted.inference_region,
                failovers,
                reason = %admitted.reason,
                api,
                stream,
                "request admitted"
            )
        };
    }
    if failovers > 0 {
        line!(info);
    } else {
        line!(debug);
    }
}

pub fn time_to_first_token(source: &str, inference_region: &str, ttft: Duration) {
    metrics::histogram!(
        "crisp_time_to_first_token_seconds",
        "source" => source.to_owned(),
        "inference_region" => inference_region.to_owned()
    )
    .record(ttft.as_secs_f64());
}

/// A candidate region refused a request and the next one was tried (or none was left).
pub fn failover(source: &str, region: &str, cause: &'static str) {
    metrics::counter!(
        "crisp_failovers_total",
        "source" => source.to_owned(),
        "region" => region.to_owned(),
        "cause" => cause
    )
    .increment(1);
}

pub fn cooldown(observer: &str, region: &str) {
    metrics::counter!(
        "crisp_cooldowns_total",
        "observer" => observer.to_owned(),
        "region" => region.to_owned()
    )
    .increment(1);
}

/// Tokens and cost of a completed request; cost in millionths of a US dollar.
pub fn usage(
    source: &str,
    inference_region: &str,
    model: &str,
    input: u32,
    output: u32,
    cost_usd: f64,
) {
    let base = [
        ("source", source.to_owned()),
        ("inference_region", inference_region.to_owned()),
        ("model", model.to_owned()),
    ];
    let with = |dir: &'static str| {
        let mut l = base.to_vec();
        l.push(("direction", dir.to_owned()));
        l
    };
    metrics::counter!("crisp_tokens_total", &with("input")).increment(u64::from(input));
    metrics::counter!("crisp_tokens_total", &with("output")).increment(u64::from(output));
    let micros = (cost_usd * 1e6).round();
    if micros.is_finite() && micros > 0.0 {
        metrics::counter!(
            "crisp_cost_usd_micros_total",
            "source" => source.to_owned(),
            "model" => model.to_owned()
        )
        .increment(micros as u64);
    }
}

/// Publishes this node's view of the fleet as gauges (called before each scrape, so ages
/// are current).
pub fn fleet_gauges(node: &Node) {
    let observer = node.region_code().to_owned();
    let local = node.load_report();
    for (i, region) in node.catalog.regions.iter().enumerate() {
        let Ok(ix) = crisp_catalog::RegionIx::try_from(i) else {
            continue;
        };
        let Some(summary) = node.fleet.summary(ix) else {
            continue;
        };
        let is_self = ix == node.region;
        let reachable = is_self || summary.reachable;
        metrics::gauge!(
            "crisp_region_reachable",
            "observer" => observer.clone(),
            "region" => region.code.clone()
        )
        .set(if reachable { 1.0 } else { 0.0 });
        let age = if is_self { Some(0) } else { summary.age_ms };
        if let Some(age) = age {
            metrics::gauge!(
                "crisp_region_view_age_seconds",
                "observer" => observer.clone(),
                "region" => region.code.clone()
            )
            .set(age as f64 / 1000.0);
        }
        for (m, model) in node.catalog.models.iter().enumerate() {
            let load = if is_self {
                local
                    .models
                    .iter()
                    .find(|l| l.model == model.id)
                    .map(|l| (l.slots, l.running, l.queue_limit, l.waiting))
            } else {
                summary
                    .loads
                    .get(m)
                    .copied()
                    .flatten()
                    .map(|l| (l.slots, l.running, l.queue_limit, l.waiting))
            };
            let Some((slots, running, queue_limit, waiting)) = load else {
                continue;
            };
            let labels = [
                ("observer", observer.clone()),
                ("region", region.code.clone()),
                ("model", model.id.clone()),
            ];
            metrics::gauge!("crisp_region_free_slots", &labels)
                .set(f64::from(slots.saturating_sub(running)));
            metrics::gauge!("crisp_region_queue_free", &labels)
                .set(f64::from(queue_limit.saturating_sub(waiting)));
            metrics::gauge!("crisp_region_cooldown_seconds", &labels)
                .set(summary.cooldown_ms.get(m).copied().unwrap_or(0) as f64 / 1000.0);
        }
    }
}
