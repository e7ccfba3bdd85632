//! What the node reports about itself: every metric name and label lives here, so the
//! set stays consistent and bounded (no request IDs or principals as labels).
//!
//! The `metrics` facade is used; the binary installs the Prometheus recorder and the admin
//! listener renders it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crisp_routing::Scope;
use metrics::{Counter, Histogram};

use crate::Node;
use crate::error::PipelineError;

/// Lets one log line per key through per `every`, counting the ones it holds back.
pub(crate) struct LogThrottle {
    every: Duration,
    last: std::sync::Mutex<Vec<(String, Instant, u64)>>,
}

impl LogThrottle {
    pub(crate) const fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            last: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// `Some(n)` when a line about `key` may be logged now, `n` being the lines held
    /// back since the last one; `None` when it is held back.
    pub(crate) fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.iter_mut().find(|(k, _, _)| k == key) {
            Some((_, at, held)) if now.saturating_duration_since(*at) < self.every => {
                *held += 1;
                None
            }
            Some((_, at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                last.push((key.to_owned(), now, 0));
                Some(0)
            }
        }
    }
}

/// Refusals logged, at most one line a second per kind (a full fleet refuses many).
static REFUSAL_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// A request refused before an engine admitted it, in either dialect: counted in
/// `crisp_requests_total` with its code as the outcome, and logged.
pub fn refused(node: &Node, request_id: &str, api: &'static str, err: &PipelineError) {
    // The profile, when the request resolved to one before it was refused (an ID from
    // the catalog or the lock, never the client's text).
    let (profile, scope) = match err {
        PipelineError::Exhausted { profile, .. } | PipelineError::Denied { profile, .. } => {
            let scope = node
                .profiles
                .get(profile)
                .map_or(Scope::InRegion, crisp_catalog::profiles::Profile::scope);
            (profile.as_str(), scope_label(scope))
        }
        _ => ("-", "-"),
    };
    request(&RequestOutcome {
        source: node.region_code(),
        profile,
        scope,
        inference_region: "-",
        outcome: err.code(),
        duration: Duration::ZERO,
    });
    if let Some(held) = REFUSAL_LOG.admit(err.code(), Instant::now()) {
        tracing::info!(
            request_id,
            api,
            source = node.region_code(),
            error = %err,
            retryable = err.retryable(),
            similar_refusals_not_logged = held,
            "request refused"
        );
    }
}

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
        cross_region(o.source, o.inference_region).increment(1);
    }
    metrics::histogram!(
        "crisp_request_duration_seconds",
        "source" => o.source.to_owned(),
        "outcome" => o.outcome.to_owned()
    )
    .record(o.duration.as_secs_f64());
}

/// The metrics of requests admitted to one profile in one region, with their handles
/// resolved once: looking a metric up by its labels builds, hashes and compares its key
/// every time, six times per request.
pub struct Served {
    /// The labels, for outcomes other than `ok`.
    source: String,
    profile: String,
    scope: &'static str,
    region: String,
    requests_ok: Counter,
    duration_ok: Histogram,
    first_token: Histogram,
    input_tokens: Counter,
    output_tokens: Counter,
    cost: Counter,
    /// What requests cost beyond the whole micro-dollars `cost` counted, in pico-dollars:
    /// a request costing less than a micro-dollar still adds up. One per cost counter, for
    /// the life of the process (see [`cost_carry`]).
    cost_carry: Arc<std::sync::atomic::AtomicU64>,
    /// For answers from another region.
    cross_region: Option<Counter>,
}

impl Served {
    /// The region that runs the requests.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// A request that ended: the handles for `ok`, the labels for anything else.
    pub fn finished(&self, outcome: &str, duration: Duration) {
        if outcome != "ok" {
            request(&RequestOutcome {
                source: &self.source,
                profile: &self.profile,
                scope: self.scope,
                inference_region: &self.region,
                outcome,
                duration,
            });
            return;
        }
        self.requests_ok.increment(1);
        if let Some(c) = &self.cross_region {
            c.increment(1);
        }
        self.duration_ok.record(duration.as_secs_f64());
    }

    pub fn first_token(&self, ttft: Duration) {
        self.first_token.record(ttft.as_secs_f64());
    }

    /// Tokens and cost of a completed request; cost in US dollars.
    pub fn usage(&self, input: u32, output: u32, cost_usd: f64) {
        self.input_tokens.increment(u64::from(input));
        self.output_tokens.increment(u64::from(output));
        let Some(pico) = cost_picos(cost_usd) else {
            return;
        };
        let mut whole = 0;
        let _ = self.cost_carry.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |carry| {
                let total = carry.saturating_add(pico);
                whole = total / PICOS_PER_MICRO;
                Some(total % PICOS_PER_MICRO)
            },
        );
        if whole > 0 {
            self.cost.increment(whole);
        }
    }

    fn new(source: &str, profile: &str, scope: Scope, region: &str, model: &str) -> Served {
        let scope = scope_label(scope);
        let requests = [
            ("source", source.to_owned()),
            ("profile", profile.to_owned()),
            ("scope", scope.to_owned()),
            ("inference_region", region.to_owned()),
            ("outcome", "ok".to_owned()),
        ];
        let tokens = |direction: &'static str| {
            [
                ("source", source.to_owned()),
                ("inference_region", region.to_owned()),
                ("model", model.to_owned()),
                ("direction", direction.to_owned()),
            ]
        };
        Served {
            requests_ok: metrics::counter!("crisp_requests_total", &requests),
            duration_ok: metrics::histogram!(
                "crisp_request_duration_seconds",
                "source" => source.to_owned(),
                "outcome" => "ok"
            ),
            first_token: metrics::histogram!(
                "crisp_time_to_first_token_seconds",
                "source" => source.to_owned(),
                "inference_region" => region.to_owned()
            ),
            input_tokens: metrics::counter!("crisp_tokens_total", &tokens("input")),
            output_tokens: metrics::counter!("crisp_tokens_total", &tokens("output")),
            cost: metrics::counter!(
                "crisp_cost_usd_micros_total",
                "source" => source.to_owned(),
                "model" => model.to_owned()
            ),
            cost_carry: cost_carry(source, model),
            cross_region: (region != source).then(|| cross_region(source, region)),
            source: source.to_owned(),
            profile: profile.to_owned(),
            scope,
            region: region.to_owned(),
        }
    }
}

/// [`Served`] by profile and region, for one node (the node is built after the metrics
/// recorder is installed, so its handles record into it). Bounded like the labels are:
/// profiles times regions. Read on every request without a lock; a new pair copies the
/// map (a profile's first answer from a region, rare once a node has run a while).
#[derive(Default)]
pub struct ServedCache(ArcSwap<HashMap<String, HashMap<String, Arc<Served>>>>);

impl ServedCache {
    pub fn get(
        &self,
        source: &str,
        profile: &str,
        scope: Scope,
        region: &str,
        model: &str,
    ) -> Arc<Served> {
        if let Some(served) = self.0.load().get(profile).and_then(|by| by.get(region)) {
            return served.clone();
        }
        let made = Arc::new(Served::new(source, profile, scope, region, model));
        self.0.rcu(|cache| {
            if cache.get(profile).is_some_and(|by| by.contains_key(region)) {
                // Another request added the pair meanwhile: the first one in is kept.
                return cache.clone();
            }
            let mut cache = HashMap::clone(cache);
            cache
                .entry(profile.to_owned())
                .or_default()
                .insert(region.to_owned(), made.clone());
            Arc::new(cache)
        });
        self.0
            .load()
            .get(profile)
            .and_then(|by| by.get(region))
            .cloned()
            .unwrap_or(made)
    }
}

fn cross_region(source: &str, region: &str) -> Counter {
    metrics::counter!(
        "crisp_cross_region_requests_total",
        "source" => source.to_owned(),
        "inference_region" => region.to_owned()
    )
}

const PICOS_PER_MICRO: u64 = 1_000_000;

/// The sub-micro-dollar remainder of the cost counter of `source` and `model`: shared by
/// every profile of the model and kept across configuration reloads (each reload builds a
/// node with new handles), like the counter itself, so no fraction is dropped.
fn cost_carry(source: &str, model: &str) -> Arc<std::sync::atomic::AtomicU64> {
    type Carries = Mutex<HashMap<(String, String), Arc<std::sync::atomic::AtomicU64>>>;
    static CARRIES: std::sync::LazyLock<Carries> = std::sync::LazyLock::new(Carries::default);
    let Ok(mut carries) = CARRIES.lock() else {
        return Arc::default();
    };
    carries
        .entry((source.to_owned(), model.to_owned()))
        .or_default()
        .clone()
}

fn cost_picos(cost_usd: f64) -> Option<u64> {
    let picos = (cost_usd * 1e12).round();
    // The price table keeps a request's cost far below u64::MAX pico-dollars ($18M).
    (picos.is_finite() && picos > 0.0).then_some(picos as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_cheaper_than_a_micro_dollar_still_add_up() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let served = metrics::with_local_recorder(&recorder, || {
            Served::new("eu-west-1", "eu.m", Scope::Geographic, "eu-west-1", "m")
        });
        // 0.3 micro-dollars each: rounded per request, a thousand of them counted 0.
        for _ in 0..1000 {
            served.usage(10, 5, 0.000_000_3);
        }
        let text = handle.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("crisp_cost_usd_micros_total{"))
            .unwrap_or_default();
        assert!(line.ends_with(" 300"), "{text}");
    }

    #[test]
    fn the_cost_remainder_survives_a_reload() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Each reload builds the node's handles anew; 0.7 micro-dollars between reloads.
        for _ in 0..10 {
            let served = metrics::with_local_recorder(&recorder, || {
                Served::new("eu-west-1", "eu.r", Scope::Geographic, "eu-west-1", "r")
            });
            served.usage(10, 5, 0.000_000_7);
        }
        let text = handle.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("crisp_cost_usd_micros_total{"))
            .unwrap_or_default();
        assert!(line.ends_with(" 7"), "{text}");
    }

    #[test]
    fn a_throttled_log_lets_one_line_a_period_through_per_key_and_counts_the_rest() {
        let log = LogThrottle::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(log.admit("eu-west-1", t0), Some(0));
        for ms in [1, 200, 999] {
            assert_eq!(log.admit("eu-west-1", t0 + Duration::from_millis(ms)), None);
        }
        // Another region has its own allowance.
        assert_eq!(
            log.admit("us-east-1", t0 + Duration::from_millis(10)),
            Some(0)
        );
        assert_eq!(
            log.admit("eu-west-1", t0 + Duration::from_millis(1000)),
            Some(3)
        );
        assert_eq!(
            log.admit("eu-west-1", t0 + Duration::from_millis(1001)),
            None
        );
        assert_eq!(
            log.admit("eu-west-1", t0 + Duration::from_millis(2500)),
            Some(1)
        );
    }
}
