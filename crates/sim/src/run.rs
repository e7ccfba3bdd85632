//! The discrete-event simulation of one strategy over a scenario's trace.
//!
//! Time is an integer count of microseconds. The fleet is a set of engines (slots, a FIFO
//! queue, prefill and decode rates); requests travel between regions at half the
//! topology's round trip; every region publishes its load on a fixed tick, and a report
//! reaches another region after the one-way delay plus jitter, or never (loss). A
//! strategy decides, for each arriving request, the order in which to try regions; a
//! region refusing (queue full, or down) sends the request back, and the source tries
//! the next region until the attempt budget or the deadline is spent, as a crisp node
//! does.
//!
//! The crisp strategy calls [`crisp_routing::route`], the function the nodes call, with
//! the views the source would have at that instant: its own engine exactly, other regions
//! as the last report that reached it, and its own cool-downs.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};

use crisp_routing::{Load, Query, RegionIx, RegionView, RouterConfig, Topology, route};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::scenario::{EngineSpec, Event, Scenario};
use crate::workload::{Request, Workload, splitmix, unit};

/// How requests are placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Strategy {
    /// No cross-region routing: the source region (or the boundary's nearest region),
    /// one attempt.
    Bare,
    /// Round-robin over the profile's regions, failing over to the next on refusal.
    RoundRobin,
    /// A random order of the profile's regions.
    Random,
    /// The region with the fewest requests outstanding from this source (what several
    /// gateways ship: each node only knows its own requests).
    LeastOutstanding,
    /// crisp's router, on the telemetry the source has.
    Crisp,
    /// Perfect, instant knowledge of every engine (no telemetry delay or loss, requests in
    /// flight included), choosing the lowest predicted time to first token.
    Oracle,
}

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::Bare,
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::LeastOutstanding,
        Strategy::Crisp,
        Strategy::Oracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Bare => "bare-model",
            Strategy::RoundRobin => "round-robin",
            Strategy::Random => "random",
            Strategy::LeastOutstanding => "least-outstanding",
            Strategy::Crisp => "crisp",
            Strategy::Oracle => "oracle",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// Longest candidate list a request keeps.
const MAX_ORDER: usize = 16;
/// Telemetry ticks kept per region.
const RING: usize = 128;
/// Cool-down after a region could not be reached, as a node applies it.
const UNREACHABLE_COOLDOWN_US: u64 = 1_000_000;

/// The per-region time series of one run.
#[derive(Clone, Debug)]
pub struct Series {
    pub bucket_s: f64,
    pub buckets: usize,
    pub regions: usize,
    /// Arrivals by source region, `[bucket * regions + region]`.
    pub arrivals: Vec<u64>,
    /// Requests completed, by inference region.
    pub served: Vec<u64>,
    /// Requests failed (no region could take them), by source region.
    pub errors: Vec<u64>,
    /// Mean share of slots busy, by region.
    pub utilisation: Vec<f32>,
}

/// What one strategy achieved.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub strategy: Strategy,
    pub offered: u64,
    pub served: u64,
    /// Requests refused everywhere they were tried (the 429s a client sees).
    pub capacity_errors: u64,
    /// Requests lost to a region outage while running or queued there.
    pub outage_errors: u64,
    /// Served in another region than the source.
    pub cross_region: u64,
    /// Attempts sent outside the request's boundary. Always zero, or the run is void.
    pub violations: u64,
    /// Attempts that a region refused (each failover counts).
    pub refusals: u64,
    pub cost_usd: f64,
    /// Client-side time to first token and end-to-end latency, in microseconds.
    pub ttft_us: Histogram<u64>,
    pub e2e_us: Histogram<u64>,
    pub series: Series,
    /// Requests served, `[source * regions + inference region]`.
    pub flows: Vec<u64>,
    pub events: u64,
}

impl Outcome {
    pub fn served_share(&self) -> f64 {
        ratio(self.served, self.offered)
    }
    pub fn cross_share(&self) -> f64 {
        ratio(self.cross_region, self.served)
    }
    pub fn ttft_ms(&self, q: f64) -> f64 {
        self.ttft_us.value_at_quantile(q) as f64 / 1000.0
    }
    pub fn e2e_ms(&self, q: f64) -> f64 {
        self.e2e_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A request reaches a region.
    Reach {
        slot: u32,
        region: u16,
    },
    /// A refusal reaches the source back.
    Back {
        slot: u32,
        cooldown_us: u64,
    },
    /// A request finishes in a region.
    Done {
        slot: u32,
        region: u16,
        model: u16,
        epoch: u32,
    },
    /// Every region publishes its load.
    Tick,
    Outage {
        region: u16,
        down: bool,
    },
    Capacity {
        region: u16,
        permille: u32,
    },
}

struct Engine {
    spec: EngineSpec,
    slots: u32,
    running: u32,
    queue: VecDeque<u32>,
    running_ids: Vec<u32>,
    in_transit: u32,
    epoch: u32,
    /// Mean time a request holds a slot, for the oracle's wait estimate.
    service_mean_us: f64,
}

impl Engine {
    fn load(&self) -> Load {
        Load {
            slots: self.slots,
            running: self.running,
            queue_limit: self.spec.queue_limit,
            waiting: self.queue.len() as u32,
        }
    }
    fn ttft_us(&self, prompt: u32) -> u64 {
        let ms = self.spec.ttft_ms + f64::from(prompt) / self.spec.prefill_tokens_per_s * 1000.0;
        (ms * 1000.0) as u64
    }
}

struct Live {
    req: Request,
    source: u16,
    order: [u16; MAX_ORDER],
    n: u8,
    tried: u8,
    ttft_us: u64,
    output: u32,
}

struct Sim<'a> {
    sc: &'a Scenario,
    strategy: Strategy,
    topo: Topology,
    router: RouterConfig,
    max_attempts: usize,
    deadline_us: u64,
    r: usize,
    m: usize,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    engines: Vec<Option<Engine>>,
    down_since: Vec<Option<u64>>,
    owd_us: Vec<u64>,
    // Telemetry.
    interval_us: u64,
    ticks: u64,
    ring: Vec<Load>,
    ring_ok: Vec<bool>,
    seen: Vec<(Load, u64, u64)>,
    // Per-source state.
    cooldown_until_us: Vec<u64>,
    outstanding: Vec<u32>,
    rr: Vec<u64>,
    rng: ChaCha8Rng,
    views: Vec<RegionView>,
    // Requests.
    live: Vec<Live>,
    free: Vec<u32>,
    in_flight: usize,
    out: Outcome,
}

/// Runs one strategy over the scenario's whole trace. `progress` receives the simulated
/// time reached, in microseconds, now and then.
pub fn simulate(scenario: &Scenario, strategy: Strategy, progress: &AtomicU64) -> Outcome {
    let mut sim = Sim::new(scenario, strategy);
    let mut workload = Workload::new(scenario);
    let mut arrivals: u64 = 0;
    loop {
        let next_event = sim.heap.peek().map(|Reverse((t, _, _))| *t);
        let next_arrival = workload.peek_us();
        let arrival_first = match (next_arrival, next_event) {
            (None, None) => break,
            (Some(a), Some(e)) => a < e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        if arrival_first {
            let Some(req) = workload.next() else { break };
            sim.now = req.at_us;
            sim.arrive(req);
            arrivals += 1;
            if arrivals.is_multiple_of(8192) {
                progress.store(sim.now, Ordering::Relaxed);
            }
        } else {
            let Some(Reverse((t, _, ev))) = sim.heap.pop() else {
                break;
            };
            sim.now = t;
            sim.out.events += 1;
            sim.handle(ev, workload.peek_us().is_some());
        }
    }
    progress.store(sim.now.max(secs_us(scenario.duration_s)), Ordering::Relaxed);
    sim.out
}

fn secs_us(s: f64) -> u64 {
    (s * 1e6) as u64
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario, strategy: Strategy) -> Sim<'a> {
        let r = sc.catalog.regions.len();
        let m = sc.catalog.models.len();
        let topo = sc.catalog.topology();
        let mut owd_us = vec![0; r * r];
        for a in 0..r {
            for b in 0..r {
                let rtt = topo.rtt_ms(a as RegionIx, b as RegionIx).unwrap_or(0.0);
                owd_us[a * r + b] = (f64::from(rtt) * 500.0 * sc.network_scale.max(0.0)) as u64;
            }
        }
        let mut engines = Vec::with_capacity(r * m);
        for row in &sc.engines {
            for spec in row {
                engines.push(spec.map(|spec| Engine {
                    spec,
                    slots: spec.slots,
                    running: 0,
                    queue: VecDeque::new(),
                    running_ids: Vec::new(),
                    in_transit: 0,
                    epoch: 0,
                    service_mean_us: spec.ttft_ms * 1000.0
                        + 100.0 / spec.decode_tokens_per_s.max(1e-9) * 1e6,
                }));
            }
        }
        let buckets = (sc.duration_s / sc.bucket_s).ceil() as usize + 1;
        let routing = sc.catalog.routing;
        let mut sim = Sim {
            sc,
            strategy,
            router: RouterConfig {
                stale_after_ms: routing.stale_after_ms,
                ..RouterConfig::default()
            },
            topo,
            max_attempts: usize::try_from(routing.max_attempts)
                .unwrap_or(MAX_ORDER)
                .clamp(1, MAX_ORDER),
            deadline_us: routing.deadline_ms.saturating_mul(1000),
            r,
            m,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            engines,
            down_since: vec![None; r],
            owd_us,
            interval_us: sc.telemetry_interval_ms.max(1) * 1000,
            ticks: 0,
            ring: vec![Load::default(); RING * r * m],
            ring_ok: vec![false; RING * r],
            seen: vec![(Load::default(), 0, u64::MAX); r * r * m],
            cooldown_until_us: vec![0; r * r * m],
            outstanding: vec![0; r * r * m],
            rr: vec![0; sc.traffic.len()],
            rng: ChaCha8Rng::seed_from_u64(splitmix(sc.seed ^ 0x005E_ED0F_0DE5)),
            views: vec![
                RegionView {
                    reachable: false,
                    observed_at_ms: 0,
                    load: None,
                    cooldown_until_ms: 0,
                };
                r
            ],
            live: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            out: Outcome {
                strategy,
                offered: 0,
                served: 0,
                capacity_errors: 0,
                outage_errors: 0,
                cross_region: 0,
                violations: 0,
                refusals: 0,
                cost_usd: 0.0,
                ttft_us: histogram(),
                e2e_us: histogram(),
                series: Series {
                    bucket_s: sc.bucket_s,
                    buckets,
                    regions: r,
                    arrivals: vec![0; buckets * r],
                    served: vec![0; buckets * r],
                    errors: vec![0; buckets * r],
                    utilisation: vec![0.0; buckets * r],
                },
                flows: vec![0; r * r],
                events: 0,
            },
        };
        sim.at(0, Ev::Tick);
        for e in &sc.events {
            match *e {
                Event::Outage {
                    region,
                    from_s,
                    to_s,
                } => {
                    sim.at(secs_us(from_s), Ev::Outage { region, down: true });
                    if to_s.is_finite() {
                        sim.at(
                            secs_us(to_s),
                            Ev::Outage {
                                region,
                                down: false,
                            },
                        );
                    }
                }
                Event::Capacity {
                    region,
                    factor,
                    from_s,
                    to_s,
                } => {
                    sim.at(
                        secs_us(from_s),
                        Ev::Capacity {
                            region,
                            permille: (factor * 1000.0).round() as u32,
                        },
                    );
                    if to_s.is_finite() {
                        sim.at(
                            secs_us(to_s),
                            Ev::Capacity {
                                region,
                                permille: 1000,
                            },
                        );
                    }
                }
                Event::Spike { .. } | Event::Daily { .. } => {}
            }
        }
        sim
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    fn bucket(&self, t: u64) -> usize {
        let b = (t as f64 / 1e6 / self.sc.bucket_s) as usize;
        b.min(self.out.series.buckets - 1)
    }

    fn owd(&self, a: u16, b: u16) -> u64 {
        self.owd_us[usize::from(a) * self.r + usize::from(b)]
    }

    fn engine(&self, region: u16, model: usize) -> Option<&Engine> {
        self.engines
            .get(usize::from(region) * self.m + model)
            .and_then(Option::as_ref)
    }

    fn engine_mut(&mut self, region: u16, model: usize) -> Option<&mut Engine> {
        self.engines
            .get_mut(usize::from(region) * self.m + model)
            .and_then(Option::as_mut)
    }

    fn sm(&self, source: u16, region: u16, model: usize) -> usize {
        (usize::from(source) * self.r + usize::from(region)) * self.m + model
    }

    fn arrive(&mut self, req: Request) {
        let traffic = &self.sc.traffic[usize::from(req.stream)];
        let source = traffic.source;
        let b = self.bucket(self.now);
        self.out.offered += 1;
        self.out.series.arrivals[b * self.r + usize::from(source)] += 1;
        let mut order = [0u16; MAX_ORDER];
        let n = self.order(&req, &mut order);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.live.push(Live {
                    req,
                    source,
                    order,
                    n: 0,
                    tried: 0,
                    ttft_us: 0,
                    output: 0,
                });
                (self.live.len() - 1) as u32
            }
        };
        let l = &mut self.live[slot as usize];
        *l = Live {
            req,
            source,
            order,
            n: n as u8,
            tried: 0,
            ttft_us: 0,
            output: 0,
        };
        self.in_flight += 1;
        if n == 0 {
            self.fail(slot, false);
        } else {
            self.dispatch(slot);
        }
    }

    /// The strategy's order of regions for a request; returns how many.
    fn order(&mut self, req: &Request, order: &mut [u16; MAX_ORDER]) -> usize {
        let sc = self.sc;
        let traffic = &sc.traffic[usize::from(req.stream)];
        let target = &traffic.target;
        let dest = &target.destinations;
        let source = traffic.source;
        let model = target.model;
        let k = self.max_attempts.min(dest.len());
        let fill = |order: &mut [u16; MAX_ORDER], list: &[u16]| {
            let n = list.len().min(k);
            order[..n].copy_from_slice(&list[..n]);
            n
        };
        match self.strategy {
            Strategy::Bare => {
                order[0] = target.home;
                1
            }
            Strategy::RoundRobin => {
                let c = &mut self.rr[usize::from(req.stream)];
                let start = (*c % dest.len() as u64) as usize;
                *c += 1;
                for (i, o) in order.iter_mut().take(k).enumerate() {
                    *o = dest[(start + i) % dest.len()];
                }
                k
            }
            Strategy::Random => {
                let mut list = dest.clone();
                list.shuffle(&mut self.rng);
                fill(order, &list)
            }
            Strategy::LeastOutstanding => {
                let mut list = dest.clone();
                list.sort_by_key(|&r| {
                    (
                        self.outstanding[self.sm(source, r, model)],
                        self.owd(source, r),
                        r,
                    )
                });
                fill(order, &list)
            }
            Strategy::Crisp => {
                let now_ms = self.now / 1000;
                for &r in dest {
                    let view = self.view(source, r, model);
                    self.views[usize::from(r)] = view;
                }
                let q = Query {
                    source,
                    destinations: dest,
                    scope: target.scope,
                    now_ms,
                };
                let decision = route(&q, &self.views, &self.topo, &self.router);
                let n = decision.candidates.len().min(k);
                for (o, c) in order.iter_mut().zip(&decision.candidates[..n]) {
                    *o = c.region;
                }
                n
            }
            Strategy::Oracle => {
                let mut scored: Vec<(bool, u64, u16)> = Vec::with_capacity(dest.len());
                for &r in dest {
                    if self.down_since[usize::from(r)].is_some() {
                        continue;
                    }
                    let Some(e) = self.engine(r, model) else {
                        continue;
                    };
                    let ahead = e.queue.len() as u64 + u64::from(e.in_transit);
                    let free = u64::from(e.slots.saturating_sub(e.running));
                    let admissible = u64::from(e.running) + ahead
                        < u64::from(e.slots) + u64::from(e.spec.queue_limit);
                    let wait = if ahead < free {
                        0
                    } else {
                        ((ahead - free + 1) as f64 * e.service_mean_us / f64::from(e.slots.max(1)))
                            as u64
                    };
                    let owd = self.owd(source, r);
                    scored.push((
                        !admissible,
                        2 * owd + wait + e.ttft_us(req.prompt_tokens),
                        r,
                    ));
                }
                scored.sort_unstable();
                let list: Vec<u16> = scored.iter().map(|s| s.2).collect();
                fill(order, &list)
            }
        }
    }

    /// What the source node knows of a region at this instant.
    fn view(&mut self, source: u16, region: u16, model: usize) -> RegionView {
        let now = self.now;
        let ri = usize::from(region);
        let stale_us = self.router.stale_after_ms.saturating_mul(1000);
        let reachable = match self.down_since[ri] {
            Some(d) => region != source && now.saturating_sub(d) < stale_us,
            None => true,
        };
        let sm = self.sm(source, region, model);
        let cooldown_until_ms = self.cooldown_until_us[sm].div_ceil(1000);
        if region == source {
            let load = self.engine(region, model).map(Engine::load);
            return RegionView {
                reachable,
                observed_at_ms: now / 1000,
                load,
                cooldown_until_ms,
            };
        }
        // The newest tick whose report has reached the source and was not lost.
        let owd = self.owd(source, region);
        let (cached_load, cached_at, cached_tick) = self.seen[sm];
        if self.ticks > 0 && now >= owd {
            let newest = ((now - owd) / self.interval_us).min(self.ticks - 1);
            let oldest = self.ticks.saturating_sub(RING as u64);
            let mut k = newest;
            loop {
                if cached_tick != u64::MAX && k <= cached_tick {
                    break;
                }
                let slot = (k as usize) % RING;
                if self.ring_ok[slot * self.r + ri] && self.report_arrives(source, region, k) {
                    let load = self.ring[(slot * self.r + ri) * self.m + model];
                    let at_ms = k * self.interval_us / 1000;
                    self.seen[sm] = (load, at_ms, k);
                    return RegionView {
                        reachable,
                        observed_at_ms: at_ms,
                        load: self.engine(region, model).map(|_| load),
                        cooldown_until_ms,
                    };
                }
                if k == oldest || k == 0 {
                    break;
                }
                k -= 1;
            }
        }
        RegionView {
            reachable,
            observed_at_ms: cached_at,
            load: if cached_tick == u64::MAX {
                None
            } else {
                self.engine(region, model).map(|_| cached_load)
            },
            cooldown_until_ms,
        }
    }

    /// Whether the report of tick `k` from `region` has reached `source` by now.
    fn report_arrives(&self, source: u16, region: u16, k: u64) -> bool {
        let key = self.sc.seed
            ^ (u64::from(source) << 48)
            ^ (u64::from(region) << 32)
            ^ k.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        if self.sc.telemetry_loss > 0.0 && unit(splitmix(key)) < self.sc.telemetry_loss {
            return false;
        }
        let jitter = if self.sc.telemetry_jitter_ms > 0.0 {
            (unit(splitmix(key ^ 0x4A17_7E12)) * self.sc.telemetry_jitter_ms * 1000.0) as u64
        } else {
            0
        };
        k * self.interval_us + self.owd(source, region) + jitter <= self.now
    }

    fn dispatch(&mut self, slot: u32) {
        let l = &mut self.live[slot as usize];
        let region = l.order[usize::from(l.tried)];
        l.tried += 1;
        let (source, stream) = (l.source, l.req.stream);
        let target = &self.sc.traffic[usize::from(stream)].target;
        if !target.destinations.contains(&region) {
            self.out.violations += 1;
        }
        let model = target.model;
        let sm = self.sm(source, region, model);
        self.outstanding[sm] += 1;
        if let Some(e) = self.engine_mut(region, model) {
            e.in_transit += 1;
        }
        let t = self.now + self.owd(source, region);
        self.at(t, Ev::Reach { slot, region });
    }

    fn handle(&mut self, ev: Ev, more_arrivals: bool) {
        match ev {
            Ev::Reach { slot, region } => self.reach(slot, region),
            Ev::Back { slot, cooldown_us } => self.back(slot, cooldown_us),
            Ev::Done {
                slot,
                region,
                model,
                epoch,
            } => self.done(slot, region, usize::from(model), epoch),
            Ev::Tick => self.tick(more_arrivals),
            Ev::Outage { region, down } => self.outage(region, down),
            Ev::Capacity { region, permille } => {
                for model in 0..self.m {
                    if let Some(e) = self.engine_mut(region, model) {
                        let s = u64::from(e.spec.slots) * u64::from(permille) / 1000;
                        e.slots = u32::try_from(s).unwrap_or(u32::MAX);
                        if permille > 0 {
                            e.slots = e.slots.max(1);
                        }
                    }
                    self.start_queued(region, model);
                }
            }
        }
    }

    fn reach(&mut self, slot: u32, region: u16) {
        let l = &self.live[slot as usize];
        let model = self.sc.traffic[usize::from(l.req.stream)].target.model;
        let source = l.source;
        let down = self.down_since[usize::from(region)].is_some();
        let back = self.now + self.owd(region, source);
        let Some(e) = self.engine_mut(region, model) else {
            self.at(
                back,
                Ev::Back {
                    slot,
                    cooldown_us: UNREACHABLE_COOLDOWN_US,
                },
            );
            return;
        };
        e.in_transit = e.in_transit.saturating_sub(1);
        if down {
            self.at(
                back,
                Ev::Back {
                    slot,
                    cooldown_us: UNREACHABLE_COOLDOWN_US,
                },
            );
        } else if e.running < e.slots {
            self.start(slot, region, model);
        } else if e.queue.len() < e.spec.queue_limit as usize {
            e.queue.push_back(slot);
        } else {
            let cooldown_us = e.spec.retry_after_ms.saturating_mul(1000);
            self.out.refusals += 1;
            self.at(back, Ev::Back { slot, cooldown_us });
        }
    }

    fn back(&mut self, slot: u32, cooldown_us: u64) {
        let l = &self.live[slot as usize];
        let (source, region) = (l.source, l.order[usize::from(l.tried) - 1]);
        let model = self.sc.traffic[usize::from(l.req.stream)].target.model;
        let sm = self.sm(source, region, model);
        self.outstanding[sm] = self.outstanding[sm].saturating_sub(1);
        if self.strategy == Strategy::Crisp {
            self.cooldown_until_us[sm] = self.now + cooldown_us;
        }
        let l = &self.live[slot as usize];
        if l.tried < l.n && self.now.saturating_sub(l.req.at_us) < self.deadline_us {
            self.dispatch(slot);
        } else {
            self.fail(slot, false);
        }
    }

    fn start(&mut self, slot: u32, region: u16, model: usize) {
        let seed = self.sc.seed;
        let l = &self.live[slot as usize];
        let (prompt, max_tokens, id, source, t0) = (
            l.req.prompt_tokens,
            l.req.max_tokens,
            l.req.id,
            l.source,
            l.req.at_us,
        );
        let owd = self.owd(region, source);
        let now = self.now;
        let Some(e) = self.engine_mut(region, model) else {
            return;
        };
        let output = if e.spec.natural_stop {
            natural_length(
                splitmix(seed ^ id.wrapping_mul(0xA076_1D64_78BD_642F)),
                max_tokens,
            )
        } else {
            max_tokens
        };
        let ttft = e.ttft_us(prompt);
        // The first token comes with the prefill; each further one costs a decode step.
        let decode =
            (f64::from(output.saturating_sub(1)) / e.spec.decode_tokens_per_s * 1e6) as u64;
        let service = ttft + decode;
        e.service_mean_us += (service as f64 - e.service_mean_us) / 64.0;
        e.running += 1;
        e.running_ids.push(slot);
        let epoch = e.epoch;
        let l = &mut self.live[slot as usize];
        l.ttft_us = now + ttft + owd - t0;
        l.output = output;
        self.at(
            now + service,
            Ev::Done {
                slot,
                region,
                model: model as u16,
                epoch,
            },
        );
    }

    fn start_queued(&mut self, region: u16, model: usize) {
        while let Some(e) = self.engine_mut(region, model) {
            if e.running >= e.slots {
                break;
            }
            let Some(next) = e.queue.pop_front() else {
                break;
            };
            self.start(next, region, model);
        }
    }

    fn done(&mut self, slot: u32, region: u16, model: usize, epoch: u32) {
        let Some(e) = self.engine_mut(region, model) else {
            return;
        };
        if e.epoch != epoch {
            return;
        }
        e.running = e.running.saturating_sub(1);
        if let Some(i) = e.running_ids.iter().position(|&s| s == slot) {
            e.running_ids.swap_remove(i);
        }
        let l = &self.live[slot as usize];
        let source = l.source;
        let traffic = &self.sc.traffic[usize::from(l.req.stream)];
        let e2e = self.now + self.owd(region, source) - l.req.at_us;
        let (ttft, prompt, output) = (l.ttft_us, l.req.prompt_tokens, l.output);
        let sm = self.sm(source, region, model);
        self.outstanding[sm] = self.outstanding[sm].saturating_sub(1);
        let out = &mut self.out;
        out.served += 1;
        if region != source {
            out.cross_region += 1;
        }
        out.cost_usd += traffic
            .target
            .price
            .cost(u64::from(prompt), u64::from(output));
        let _ = out.ttft_us.record(ttft.max(1));
        let _ = out.e2e_us.record(e2e.max(1));
        out.flows[usize::from(source) * self.r + usize::from(region)] += 1;
        let b = self.bucket(self.now);
        self.out.series.served[b * self.r + usize::from(region)] += 1;
        self.release(slot);
        self.start_queued(region, model);
    }

    fn fail(&mut self, slot: u32, outage: bool) {
        let source = self.live[slot as usize].source;
        if outage {
            self.out.outage_errors += 1;
        } else {
            self.out.capacity_errors += 1;
        }
        let b = self.bucket(self.now);
        self.out.series.errors[b * self.r + usize::from(source)] += 1;
        self.release(slot);
    }

    fn release(&mut self, slot: u32) {
        self.free.push(slot);
        self.in_flight -= 1;
    }

    fn outage(&mut self, region: u16, down: bool) {
        let ri = usize::from(region);
        if !down {
            self.down_since[ri] = None;
            return;
        }
        if self.down_since[ri].is_some() {
            return;
        }
        self.down_since[ri] = Some(self.now);
        for model in 0..self.m {
            let Some(e) = self.engine_mut(region, model) else {
                continue;
            };
            e.epoch += 1;
            e.running = 0;
            let mut lost: Vec<u32> = e.running_ids.drain(..).collect();
            lost.extend(e.queue.drain(..));
            for slot in lost {
                let source = self.live[slot as usize].source;
                let sm = self.sm(source, region, model);
                self.outstanding[sm] = self.outstanding[sm].saturating_sub(1);
                self.fail(slot, true);
            }
        }
    }

    fn tick(&mut self, more_arrivals: bool) {
        let k = self.ticks;
        let slot = (k as usize) % RING;
        let b = self.bucket(self.now);
        for region in 0..self.r {
            let up = self.down_since[region].is_none();
            self.ring_ok[slot * self.r + region] = up;
            let (mut busy, mut slots) = (0u64, 0u64);
            for model in 0..self.m {
                if let Some(e) = &self.engines[region * self.m + model] {
                    self.ring[(slot * self.r + region) * self.m + model] = e.load();
                    busy += u64::from(e.running);
                    slots += u64::from(e.spec.slots);
                }
            }
            if slots > 0 {
                // A running mean over the bucket's ticks.
                let per_bucket = (self.sc.bucket_s * 1e6 / self.interval_us as f64).max(1.0);
                self.out.series.utilisation[b * self.r + region] +=
                    (busy as f64 / slots as f64 / per_bucket) as f32;
            }
        }
        self.ticks += 1;
        if more_arrivals || self.in_flight > 0 {
            let t = self.now + self.interval_us;
            self.at(t, Ev::Tick);
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// How long the simulated engine's answer to `max_tokens` runs: half the time to the
/// limit, otherwise somewhere in the upper half of it (crisp-engine's rule).
fn natural_length(h: u64, max_tokens: u32) -> u32 {
    if max_tokens == 0 || h & 1 == 0 {
        return max_tokens;
    }
    let low = (max_tokens / 2).max(1);
    let span = u64::from(max_tokens - low) + 1;
    low + u32::try_from((h >> 1) % span).unwrap_or(0)
}
