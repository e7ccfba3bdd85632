//! The trace: every request of a scenario, generated lazily in arrival order.
//!
//! Each traffic stream draws from its own generator seeded from the scenario's seed and
//! the stream's index, so the trace is the same whichever strategy consumes it, and the
//! same on every run with the same seed. Nothing is held in memory but one pending
//! arrival per stream.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal, Pareto};

use crate::scenario::{Arrival, Dist, Event, Scenario};

/// One request of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Position in the trace, from 0.
    pub id: u64,
    /// Arrival time, in microseconds from the start.
    pub at_us: u64,
    /// The traffic stream (index into `Scenario::traffic`).
    pub stream: u16,
    pub prompt_tokens: u32,
    /// The `max_tokens` the request asks for.
    pub max_tokens: u32,
}

struct Stream {
    rng: ChaCha8Rng,
    /// Upper bound of the stream's rate, for thinning.
    max_rate: f64,
    exp: Option<Exp<f64>>,
    t: f64,
    /// Bursty streams: whether a burst is on, and when that changes.
    burst_on: bool,
    switch_at: f64,
    on_rate: f64,
    off_rate: f64,
    lon: f64,
    source: u16,
    base: f64,
}

/// The trace of a scenario, in arrival order.
pub struct Workload<'a> {
    scenario: &'a Scenario,
    streams: Vec<Stream>,
    next: BinaryHeap<Reverse<(u64, u16)>>,
    pending: Vec<Option<Request>>,
    issued: u64,
    end_s: f64,
}

fn stream_seed(seed: u64, stream: usize) -> u64 {
    splitmix(seed ^ (stream as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A well-mixed 64-bit hash step.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in `[0, 1)` from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

impl<'a> Workload<'a> {
    pub fn new(scenario: &'a Scenario) -> Workload<'a> {
        let max_spike: Vec<f64> = (0..scenario.catalog.regions.len())
            .map(|r| {
                scenario
                    .events
                    .iter()
                    .filter_map(|e| match *e {
                        Event::Spike { source, factor, .. } if usize::from(source) == r => {
                            Some(factor)
                        }
                        _ => None,
                    })
                    .fold(1.0_f64, f64::max)
            })
            .collect();
        let daily_max = scenario
            .events
            .iter()
            .filter_map(|e| match *e {
                Event::Daily { amplitude, .. } => Some(1.0 + amplitude),
                _ => None,
            })
            .fold(1.0_f64, f64::max);
        let mut streams = Vec::with_capacity(scenario.traffic.len());
        for (i, t) in scenario.traffic.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(scenario.seed, i));
            let (on_rate, off_rate, burst_max, burst_on, switch_at) = match t.arrival {
                Arrival::Poisson => (1.0, 1.0, 1.0, false, f64::INFINITY),
                Arrival::Bursty {
                    burst_factor,
                    mean_burst_s,
                    mean_gap_s,
                } => {
                    let p_on = mean_burst_s / (mean_burst_s + mean_gap_s);
                    let off = ((1.0 - p_on * burst_factor) / (1.0 - p_on)).max(0.0);
                    let first = exp_sample(&mut rng, mean_gap_s);
                    (burst_factor, off, burst_factor.max(off), false, first)
                }
            };
            let region = &scenario.catalog.regions[usize::from(t.source)];
            let max_rate = t.rate_per_s * max_spike[usize::from(t.source)] * daily_max * burst_max;
            streams.push(Stream {
                exp: (max_rate > 0.0).then(|| Exp::new(max_rate).ok()).flatten(),
                rng,
                max_rate,
                t: 0.0,
                burst_on,
                switch_at,
                on_rate,
                off_rate,
                lon: region.lon,
                source: t.source,
                base: t.rate_per_s,
            });
        }
        let mut w = Workload {
            scenario,
            pending: vec![None; streams.len()],
            streams,
            next: BinaryHeap::new(),
            issued: 0,
            end_s: scenario.duration_s,
        };
        for i in 0..w.streams.len() {
            w.advance(i);
        }
        w
    }

    /// The multiplier of a stream's rate at `t` from spikes and the daily cycle.
    fn multiplier(&self, source: u16, lon: f64, t: f64) -> f64 {
        let mut m = 1.0;
        for e in &self.scenario.events {
            match *e {
                Event::Spike {
                    source: s,
                    factor,
                    from_s,
                    to_s,
                } if s == source && t >= from_s && t < to_s => m *= factor,
                Event::Daily {
                    amplitude,
                    peak_local_hour,
                } => {
                    let local = self.scenario.start_hour_utc + t / 3600.0 + lon / 15.0;
                    let phase = (local - peak_local_hour) / 24.0 * std::f64::consts::TAU;
                    m *= 1.0 + amplitude * phase.cos();
                }
                _ => {}
            }
        }
        m
    }

    /// Draws the stream's next arrival (by thinning a Poisson process at its maximum
    /// rate) and its token counts.
    fn advance(&mut self, i: usize) {
        let scenario: &'a Scenario = self.scenario;
        let traffic = &scenario.traffic[i];
        loop {
            let s = &mut self.streams[i];
            let Some(exp) = s.exp else {
                return;
            };
            s.t += exp.sample(&mut s.rng);
            if s.t >= self.end_s {
                return;
            }
            while s.t >= s.switch_at {
                s.burst_on = !s.burst_on;
                let mean = match traffic.arrival {
                    Arrival::Bursty {
                        mean_burst_s,
                        mean_gap_s,
                        ..
                    } => {
                        if s.burst_on {
                            mean_burst_s
                        } else {
                            mean_gap_s
                        }
                    }
                    Arrival::Poisson => f64::INFINITY,
                };
                let d = exp_sample(&mut s.rng, mean);
                s.switch_at += d;
            }
            let burst = match traffic.arrival {
                Arrival::Poisson => 1.0,
                Arrival::Bursty { .. } if s.burst_on => s.on_rate,
                Arrival::Bursty { .. } => s.off_rate,
            };
            let (source, lon, t, base, max_rate) = (s.source, s.lon, s.t, s.base, s.max_rate);
            let rate = base * burst * self.multiplier(source, lon, t);
            let s = &mut self.streams[i];
            let u: f64 = s.rng.random();
            if u * max_rate < rate {
                let prompt_tokens = draw(&traffic.prompt_tokens, &mut s.rng);
                let max_tokens = draw(&traffic.output_tokens, &mut s.rng);
                let at_us = (t * 1e6) as u64;
                self.pending[i] = Some(Request {
                    id: 0,
                    at_us,
                    stream: i as u16,
                    prompt_tokens,
                    max_tokens,
                });
                self.next.push(Reverse((at_us, i as u16)));
                return;
            }
        }
    }

    /// Time of the next arrival, if any.
    pub fn peek_us(&self) -> Option<u64> {
        self.next.peek().map(|Reverse((t, _))| *t)
    }
}

impl Iterator for Workload<'_> {
    type Item = Request;

    fn next(&mut self) -> Option<Request> {
        let Reverse((_, i)) = self.next.pop()?;
        let i = usize::from(i);
        let mut req = self.pending[i].take()?;
        req.id = self.issued;
        self.issued += 1;
        self.advance(i);
        Some(req)
    }
}

fn exp_sample(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    if !(mean.is_finite() && mean > 0.0) {
        return f64::INFINITY;
    }
    Exp::new(1.0 / mean).map_or(f64::INFINITY, |e| e.sample(rng))
}

/// A token count from a distribution.
pub fn draw(d: &Dist, rng: &mut ChaCha8Rng) -> u32 {
    match *d {
        Dist::Fixed { value } => value,
        Dist::Lognormal {
            median,
            sigma,
            min,
            max,
        } => {
            let x = LogNormal::new(median.ln(), sigma).map_or(median, |l| l.sample(rng));
            (x.round() as u32).clamp(min, max)
        }
        Dist::Pareto { scale, shape, max } => {
            let x = Pareto::new(scale, shape).map_or(scale, |p| p.sample(rng));
            (x.round() as u32).clamp(1, max)
        }
    }
}
