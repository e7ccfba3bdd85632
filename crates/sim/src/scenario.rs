//! Scenario files: what traffic arrives where, and what happens to the fleet meanwhile.
//!
//! A scenario names a fleet (an ordinary crisp configuration file, with its `crisp.lock`
//! beside it when there is one), then describes traffic streams per source region and
//! timed events. Everything is checked when it is loaded, and every mistake is reported
//! at once with where it is.

use std::fmt;
use std::path::{Path, PathBuf};

use crisp_catalog::profiles::{Lock, Plan, Profiles};
use crisp_catalog::{Catalog, Price, parse_config};
use crisp_routing::{RegionIx, Scope};
use serde::Deserialize;

/// A scenario as written in its TOML file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The fleet's crisp configuration, relative to the scenario file.
    pub fleet: PathBuf,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Arrivals stop after this long; requests in flight are then run to the end.
    pub duration_s: f64,
    /// Width of a time bucket in the per-region series [default: duration / 120].
    pub bucket_s: Option<f64>,
    /// UTC hour at simulated time 0 (for the daily cycle).
    #[serde(default)]
    pub start_hour_utc: f64,
    #[serde(default)]
    pub telemetry: TelemetryFile,
    #[serde(default)]
    pub engine: EngineDefaults,
    /// Per-region capacity overrides.
    #[serde(default)]
    pub capacity: Vec<CapacityFile>,
    #[serde(default)]
    pub traffic: Vec<TrafficFile>,
    #[serde(default, rename = "event")]
    pub events: Vec<EventFile>,
}

fn default_seed() -> u64 {
    1
}

/// How load reports travel between regions.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryFile {
    /// How often each region publishes its load [default: the fleet's
    /// `routing.telemetry_interval_ms`].
    pub interval_ms: Option<u64>,
    /// Share of reports that never arrive, `0..1`.
    #[serde(default)]
    pub loss: f64,
    /// Extra delay on top of the network's one-way time, uniform in `0..jitter_ms`.
    #[serde(default)]
    pub jitter_ms: f64,
}

/// Timing of engines whose backend kind carries no timing of its own (`openai`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineDefaults {
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ttft_ms: f64,
    pub retry_after_ms: u64,
}

impl Default for EngineDefaults {
    fn default() -> Self {
        EngineDefaults {
            prefill_tokens_per_s: 4000.0,
            decode_tokens_per_s: 40.0,
            ttft_ms: 80.0,
            retry_after_ms: 1000,
        }
    }
}

/// Overrides a region's engine size (every model it serves, or one).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityFile {
    pub region: String,
    pub model: Option<String>,
    pub slots: Option<u32>,
    pub queue_limit: Option<u32>,
}

/// One stream of requests: from a source region, through one profile or model ID.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficFile {
    pub source: String,
    /// A profile ID (`eu.amazon.nova-lite-v1:0`, `global....`) or a bare model ID.
    pub profile: String,
    /// Mean arrivals per second (before events and the daily cycle).
    pub rate_per_s: f64,
    #[serde(default)]
    pub arrival: Arrival,
    pub prompt_tokens: Dist,
    /// The `max_tokens` each request asks for.
    pub output_tokens: Dist,
}

/// How arrivals are spaced.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Independent arrivals at a steady mean rate.
    #[default]
    Poisson,
    /// Bursts at `burst_factor` times the mean rate, of mean length `mean_burst_s`, with
    /// gaps of mean length `mean_gap_s` at the rate that keeps the overall mean.
    Bursty {
        burst_factor: f64,
        mean_burst_s: f64,
        mean_gap_s: f64,
    },
}

/// A token-count distribution (heavy tails welcome).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    Fixed {
        value: u32,
    },
    /// Log-normal with the given median and shape, clamped to `[min, max]`.
    Lognormal {
        median: f64,
        sigma: f64,
        #[serde(default = "one")]
        min: u32,
        max: u32,
    },
    /// Pareto with the given scale (minimum) and shape, clamped to `max`.
    Pareto {
        scale: f64,
        shape: f64,
        max: u32,
    },
}

fn one() -> u32 {
    1
}

/// Something that happens to the fleet or its traffic during the run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFile {
    pub kind: EventKind,
    /// The region concerned (`spike`: the source region; `outage`, `capacity`: the
    /// serving region). Not used by `daily`.
    pub region: Option<String>,
    #[serde(default)]
    pub at_s: f64,
    /// [default: until the end]
    pub duration_s: Option<f64>,
    /// `spike`: the traffic multiplier; `capacity`: the share of slots left.
    pub factor: Option<f64>,
    /// `daily`: the swing around the mean, `0..1` (0.6: from 0.4x to 1.6x).
    pub amplitude: Option<f64>,
    /// `daily`: the local hour of the peak [default: 14].
    pub peak_local_hour: Option<f64>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Spike,
    Outage,
    Capacity,
    Daily,
}

/// Why a scenario could not be loaded: each problem with where it is.
#[derive(Debug, thiserror::Error)]
pub struct ScenarioError {
    pub path: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Where a traffic stream may run.
#[derive(Clone, Debug)]
pub struct Target {
    /// What the stream calls (profile or model ID).
    pub id: String,
    pub model: usize,
    pub scope: Scope,
    /// The boundary.
    pub destinations: Vec<RegionIx>,
    /// Where a stream without cross-region routing runs: the source if it is inside the
    /// boundary, otherwise the boundary's nearest region.
    pub home: RegionIx,
    pub price: Price,
}

/// A validated traffic stream.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub source: RegionIx,
    pub target: Target,
    pub rate_per_s: f64,
    pub arrival: Arrival,
    pub prompt_tokens: Dist,
    pub output_tokens: Dist,
}

/// A validated event.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    Spike {
        source: RegionIx,
        factor: f64,
        from_s: f64,
        to_s: f64,
    },
    Outage {
        region: RegionIx,
        from_s: f64,
        to_s: f64,
    },
    Capacity {
        region: RegionIx,
        factor: f64,
        from_s: f64,
        to_s: f64,
    },
    Daily {
        amplitude: f64,
        peak_local_hour: f64,
    },
}

/// An engine as the simulator runs it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineSpec {
    pub slots: u32,
    pub queue_limit: u32,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ttft_ms: f64,
    pub retry_after_ms: u64,
    /// Whether the engine ends answers early the way crisp's simulated engine does (half
    /// the answers stop in the upper half of `max_tokens`).
    pub natural_stop: bool,
}

/// A loaded, validated scenario with its fleet.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub fleet_path: PathBuf,
    pub catalog: Catalog,
    pub seed: u64,
    pub duration_s: f64,
    pub bucket_s: f64,
    pub start_hour_utc: f64,
    pub telemetry_interval_ms: u64,
    pub telemetry_loss: f64,
    pub telemetry_jitter_ms: f64,
    /// Multiplies the network's one-way delays (1: the distances of the coordinates; 0: a
    /// fleet on one machine, as `crisp up` runs it). The router still weighs distance.
    pub network_scale: f64,
    /// `engines[region][model]`.
    pub engines: Vec<Vec<Option<EngineSpec>>>,
    pub traffic: Vec<Traffic>,
    pub events: Vec<Event>,
}

impl Scenario {
    /// Reads a scenario file and the fleet it names.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let fail = |problems: Vec<String>| ScenarioError {
            path: path.to_owned(),
            problems,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail(vec![format!("cannot read the scenario: {e}")]))?;
        let file: ScenarioFile =
            toml::from_str(&text).map_err(|e| fail(vec![e.to_string().trim().to_owned()]))?;
        let fleet_path = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&file.fleet);
        let fleet_text = std::fs::read_to_string(&fleet_path).map_err(|e| {
            fail(vec![format!(
                "fleet: cannot read {}: {e}",
                fleet_path.display()
            )])
        })?;
        let catalog = parse_config(&fleet_text)
            .map_err(|e| fail(vec![format!("fleet {}: {e}", fleet_path.display())]))?;
        let lock_path = fleet_path.with_file_name("crisp.lock");
        let lock = match std::fs::read_to_string(&lock_path) {
            Ok(t) => {
                Lock::parse(&t).map_err(|e| fail(vec![format!("{}: {e}", lock_path.display())]))?
            }
            Err(_) => Plan::new(&catalog, &Lock::default()).apply(&Lock::default()),
        };
        let profiles = Profiles::build(&catalog, &lock);
        Scenario::from_parts(file, fleet_path, catalog, &profiles).map_err(fail)
    }

    /// Validates a parsed scenario against its fleet.
    pub fn from_parts(
        file: ScenarioFile,
        fleet_path: PathBuf,
        catalog: Catalog,
        profiles: &Profiles,
    ) -> Result<Scenario, Vec<String>> {
        let mut problems = Vec::new();
        let known = || {
            catalog
                .regions
                .iter()
                .map(|r| r.code.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let region = |field: &str, code: &str, problems: &mut Vec<String>| {
            let ix = catalog.region_ix(code);
            if ix.is_none() {
                problems.push(format!(
                    "{field}: unknown region {code:?}; the fleet has {}",
                    known()
                ));
            }
            ix
        };
        if !(file.duration_s.is_finite() && file.duration_s > 0.0) {
            problems.push("duration_s: must be a positive number of seconds".into());
        }
        let bucket_s = file.bucket_s.unwrap_or(file.duration_s / 120.0);
        if !(bucket_s.is_finite() && bucket_s > 0.0) {
            problems.push("bucket_s: must be a positive number of seconds".into());
        }
        let t = &file.telemetry;
        if !(0.0..1.0).contains(&t.loss) {
            problems.push("telemetry.loss: must be in 0..1 (a share of reports)".into());
        }
        if !(t.jitter_ms.is_finite() && t.jitter_ms >= 0.0) {
            problems.push("telemetry.jitter_ms: must be 0 or more".into());
        }
        let interval = t
            .interval_ms
            .unwrap_or(catalog.routing.telemetry_interval_ms);
        if interval == 0 {
            problems.push("telemetry.interval_ms: must be at least 1".into());
        }
        let e = &file.engine;
        for (v, name) in [
            (e.prefill_tokens_per_s, "prefill_tokens_per_s"),
            (e.decode_tokens_per_s, "decode_tokens_per_s"),
        ] {
            if !(v.is_finite() && v > 0.0) {
                problems.push(format!("engine.{name}: must be a positive rate"));
            }
        }

        // Engines: from the fleet's backends, then the overrides.
        let mut engines = vec![vec![None; catalog.models.len()]; catalog.regions.len()];
        for (m, model) in catalog.models.iter().enumerate() {
            for (r, backend) in &model.backends {
                let spec = match backend {
                    crisp_catalog::BackendSpec::Simulated(s) => EngineSpec {
                        slots: s.slots,
                        queue_limit: s.queue_limit,
                        prefill_tokens_per_s: s.prefill_tokens_per_s,
                        decode_tokens_per_s: s.decode_tokens_per_s,
                        ttft_ms: s.ttft_ms,
                        retry_after_ms: s.retry_after_ms,
                        natural_stop: true,
                    },
                    crisp_catalog::BackendSpec::OpenAi(replicas) => EngineSpec {
                        slots: replicas.iter().map(|x| x.max_concurrency).sum(),
                        queue_limit: replicas.iter().map(|x| x.queue_limit).sum(),
                        prefill_tokens_per_s: e.prefill_tokens_per_s,
                        decode_tokens_per_s: e.decode_tokens_per_s,
                        ttft_ms: e.ttft_ms,
                        retry_after_ms: e.retry_after_ms,
                        natural_stop: false,
                    },
                };
                if let Some(slot) = engines
                    .get_mut(usize::from(*r))
                    .and_then(|row| row.get_mut(m))
                {
                    *slot = Some(spec);
                }
            }
        }
        for (i, c) in file.capacity.iter().enumerate() {
            let field = format!("capacity[{i}]");
            let Some(r) = region(&format!("{field}.region"), &c.region, &mut problems) else {
                continue;
            };
            let model = match &c.model {
                Some(id) => match catalog.model_ix(id) {
                    Some(m) => Some(m),
                    None => {
                        problems.push(format!("{field}.model: unknown model {id:?}"));
                        continue;
                    }
                },
                None => None,
            };
            let mut touched = false;
            for (m, slot) in engines[usize::from(r)].iter_mut().enumerate() {
                if model.is_some_and(|x| x != m) {
                    continue;
                }
                if let Some(spec) = slot {
                    touched = true;
                    if let Some(s) = c.slots {
                        spec.slots = s;
                    }
                    if let Some(q) = c.queue_limit {
                        spec.queue_limit = q;
                    }
                }
            }
            if !touched {
                problems.push(format!(
                    "{field}: {} serves no such model in the fleet",
                    c.region
                ));
            }
        }

        let mut traffic = Vec::new();
        for (i, s) in file.traffic.iter().enumerate() {
            let field = format!("traffic[{i}]");
            let Some(source) = region(&format!("{field}.source"), &s.source, &mut problems) else {
                continue;
            };
            if !(s.rate_per_s.is_finite() && s.rate_per_s >= 0.0) {
                problems.push(format!(
                    "{field}.rate_per_s: must be 0 or more requests per second"
                ));
            }
            if let Arrival::Bursty {
                burst_factor,
                mean_burst_s,
                mean_gap_s,
            } = s.arrival
                && !(burst_factor >= 1.0 && mean_burst_s > 0.0 && mean_gap_s > 0.0)
            {
                problems.push(format!(
                    "{field}.arrival: a bursty arrival needs burst_factor >= 1 and positive mean_burst_s and mean_gap_s"
                ));
            }
            for (d, name) in [
                (&s.prompt_tokens, "prompt_tokens"),
                (&s.output_tokens, "output_tokens"),
            ] {
                if let Some(why) = dist_problem(d) {
                    problems.push(format!("{field}.{name}: {why}"));
                }
            }
            let target = match profiles.resolve(&catalog, &s.profile, source) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(format!("{field}.profile: {e}"));
                    continue;
                }
            };
            let Some(model) = catalog.model_ix(&target.model.id) else {
                continue;
            };
            let destinations = target.destinations().to_vec();
            let topo = catalog.topology();
            let home = if destinations.contains(&source) {
                source
            } else {
                destinations
                    .iter()
                    .copied()
                    .min_by(|&a, &b| {
                        let ra = topo.rtt_ms(source, a).unwrap_or(f32::MAX);
                        let rb = topo.rtt_ms(source, b).unwrap_or(f32::MAX);
                        ra.total_cmp(&rb).then(a.cmp(&b))
                    })
                    .unwrap_or(source)
            };
            let price = match target.scope {
                Scope::Global => target.model.global_price,
                _ => target.model.price,
            };
            traffic.push(Traffic {
                source,
                target: Target {
                    id: target.id().to_owned(),
                    model,
                    scope: target.scope,
                    destinations,
                    home,
                    price,
                },
                rate_per_s: s.rate_per_s,
                arrival: s.arrival,
                prompt_tokens: s.prompt_tokens,
                output_tokens: s.output_tokens,
            });
        }
        if file.traffic.is_empty() {
            problems.push("traffic: a scenario needs at least one [[traffic]] stream".into());
        }

        let mut events = Vec::new();
        for (i, ev) in file.events.iter().enumerate() {
            let field = format!("event[{i}]");
            let from_s = ev.at_s;
            let to_s = ev.duration_s.map_or(f64::INFINITY, |d| from_s + d);
            if !(from_s.is_finite() && from_s >= 0.0 && to_s >= from_s) {
                problems.push(format!(
                    "{field}: at_s and duration_s must be 0 or more seconds"
                ));
                continue;
            }
            let needs_region = |problems: &mut Vec<String>| match &ev.region {
                Some(code) => region(&format!("{field}.region"), code, problems),
                None => {
                    problems.push(format!("{field}: a {:?} event needs a region", ev.kind));
                    None
                }
            };
            match ev.kind {
                EventKind::Spike => {
                    let factor = ev.factor.unwrap_or(10.0);
                    if !(factor.is_finite() && factor >= 0.0) {
                        problems.push(format!("{field}.factor: must be 0 or more"));
                    }
                    if let Some(source) = needs_region(&mut problems) {
                        events.push(Event::Spike {
                            source,
                            factor,
                            from_s,
                            to_s,
                        });
                    }
                }
                EventKind::Outage => {
                    if let Some(region) = needs_region(&mut problems) {
                        events.push(Event::Outage {
                            region,
                            from_s,
                            to_s,
                        });
                    }
                }
                EventKind::Capacity => {
                    let factor = ev.factor.unwrap_or(0.5);
                    if !(0.0..=1.0).contains(&factor) {
                        problems.push(format!("{field}.factor: the share of slots left, in 0..1"));
                    }
                    if let Some(region) = needs_region(&mut problems) {
                        events.push(Event::Capacity {
                            region,
                            factor,
                            from_s,
                            to_s,
                        });
                    }
                }
                EventKind::Daily => {
                    let amplitude = ev.amplitude.unwrap_or(0.5);
                    if !(0.0..=1.0).contains(&amplitude) {
                        problems.push(format!("{field}.amplitude: must be in 0..1"));
                    }
                    events.push(Event::Daily {
                        amplitude,
                        peak_local_hour: ev.peak_local_hour.unwrap_or(14.0),
                    });
                }
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Scenario {
            name: file.name,
            description: file.description,
            fleet_path,
            seed: file.seed,
            duration_s: file.duration_s,
            bucket_s,
            start_hour_utc: file.start_hour_utc,
            telemetry_interval_ms: interval,
            telemetry_loss: t.loss,
            telemetry_jitter_ms: t.jitter_ms,
            network_scale: 1.0,
            engines,
            traffic,
            events,
            catalog,
        })
    }

    /// The same scenario with every arrival rate multiplied by `factor` (capacity
    /// planning: "what if traffic grows 30%?", or a live replay scaled down).
    pub fn scale_rates(&mut self, factor: f64) {
        for t in &mut self.traffic {
            t.rate_per_s *= factor;
        }
    }

    /// Expected number of arrivals (before the daily cycle and bursts, which keep the
    /// mean, and with spikes).
    pub fn expected_requests(&self) -> f64 {
        self.traffic
            .iter()
            .map(|t| {
                let extra: f64 = self
                    .events
                    .iter()
                    .map(|e| match *e {
                        Event::Spike {
                            source,
                            factor,
                            from_s,
                            to_s,
                        } if source == t.source => {
                            (factor - 1.0) * (to_s.min(self.duration_s) - from_s).max(0.0)
                        }
                        _ => 0.0,
                    })
                    .sum();
                t.rate_per_s * (self.duration_s + extra)
            })
            .sum()
    }
}

fn dist_problem(d: &Dist) -> Option<&'static str> {
    match *d {
        Dist::Fixed { .. } => None,
        Dist::Lognormal {
            median,
            sigma,
            min,
            max,
        } => (!(median > 0.0 && sigma >= 0.0 && sigma.is_finite() && min <= max && max > 0))
            .then_some("a lognormal needs median > 0, sigma >= 0 and min <= max"),
        Dist::Pareto { scale, shape, max } => (!(scale >= 1.0 && shape > 0.0 && max > 0))
            .then_some("a pareto needs scale >= 1, shape > 0 and max > 0"),
    }
}
