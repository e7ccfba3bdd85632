//! The routing decision, and nothing else.
//!
//! Given a profile's destination set (the boundary), the source region, a snapshot of every
//! region's load and health, and the clock as a plain number, [`route`] returns an ordered
//! list of candidate regions, each with the reason it is where it is, plus the regions it
//! left out and why. It performs no I/O, keeps no state and reads no clock: the same inputs
//! always give the same decision.
//!
//! The boundary is a filter, never a fallback: every candidate is a member of
//! `Query::destinations`. Nothing in this crate can produce a region outside it.
//!
//! # The order
//!
//! Each destination is either [`Excluded`] (unknown index, peer link down, model not
//! served) or becomes exactly one [`Candidate`]. Candidates come in tiers, best first:
//!
//! 1. [`Reason::SourceHasHeadroom`]: the source region, when it is a destination with fresh
//!    telemetry, a free slot and no cool-down. Serving locally beats any remote region.
//! 2. [`Reason::Headroom`]: other fresh regions with free slots, by score (free fraction of
//!    slots, less [`RouterConfig::rtt_weight`] per ms of round trip, less
//!    [`RouterConfig::price_weight`] per unit of price above the cheapest candidate for
//!    [`Scope::Global`] profiles), best first.
//! 3. [`Reason::QueueSpace`]: fresh regions with no free slot but queue space, emptiest
//!    queue first.
//! 4. [`Reason::Uncertain`]: regions whose telemetry is older than
//!    [`RouterConfig::stale_after_ms`], nearest first.
//! 5. [`Reason::Saturated`]: fresh regions with neither slot nor queue space, nearest first.
//! 6. [`Reason::CoolingDown`]: regions in a cool-down after a capacity error, the one that
//!    ends soonest first.
//!
//! Remaining ties go to the shorter round trip from the source (except among cool-downs),
//! then the lower region index, so the order does not depend on the order of
//! `Query::destinations`. The source is always 0 ms from itself. Scores are compared in
//! [`f32::total_cmp`] order, with a NaN score (from NaN or infinite weights) counted as
//! the worst. [`Topology`] holds the round-trip and price tables the order reads; an
//! index outside it or outside the fleet snapshot is an unknown region.
//!
//! For destination sets of up to 64 entries, [`route`] allocates only its output and
//! [`route_into`], which reuses a [`Decision`], allocates nothing once its vectors have
//! grown.

use core::fmt;

/// Index of a region in the catalog's region table (dense, `0..n`).
pub type RegionIx = u16;

/// What kind of profile the request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A bare model ID: the source region only.
    InRegion,
    /// A geographic profile (`eu.`, `us.`, ...): a frozen destination set.
    Geographic,
    /// A global profile: every region serving the model. Price may weigh in the order.
    Global,
}

/// A region's load for one model, as reported by its engines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Concurrent sequences the region can run.
    pub slots: u32,
    /// Sequences running now (`<= slots` normally, but do not rely on it).
    pub running: u32,
    /// Requests the region will queue when all slots are busy.
    pub queue_limit: u32,
    /// Requests queued now.
    pub waiting: u32,
}

/// This node's view of one region for one model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RegionView {
    /// Whether the node can reach that region's node at all (peer link up).
    pub reachable: bool,
    /// When `load` was observed, in the caller's millisecond clock.
    pub observed_at_ms: u64,
    /// `None`: the region does not serve the model (or has never reported it).
    pub load: Option<Load>,
    /// The region is cooling down after a capacity error until this instant (0 = not).
    pub cooldown_until_ms: u64,
}

/// Static facts about the regions: network distance and relative price.
#[derive(Clone, Debug)]
pub struct Topology {
    n: usize,
    rtt_ms: Vec<f32>,
    price: Vec<f32>,
}

/// Knobs of the decision. Defaults are sensible for a real fleet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterConfig {
    /// A view older than this is uncertain: not counted as headroom.
    pub stale_after_ms: u64,
    /// Score penalty per millisecond of round trip between source and candidate.
    pub rtt_weight: f32,
    /// Score penalty per unit of relative price (global profiles only).
    pub price_weight: f32,
}

/// Why a candidate is in the list, and in that place.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reason {
    /// The source region has a free slot: served locally.
    SourceHasHeadroom { free_slots: u32 },
    /// Another region has free slots (fresh telemetry).
    Headroom { free_slots: u32, rtt_ms: u32 },
    /// No free slot but queue space (fresh telemetry): will wait there.
    QueueSpace { queue_free: u32, rtt_ms: u32 },
    /// Telemetry older than `stale_after_ms`: headroom unknown.
    Uncertain { age_ms: u64, rtt_ms: u32 },
    /// Fresh telemetry says full; tried only after every better option.
    Saturated { rtt_ms: u32 },
    /// A recent capacity error; tried last.
    CoolingDown { until_ms: u64 },
}

/// Why a destination region is not a candidate at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// The peer link to that region is down.
    Unreachable,
    /// The region does not serve the model.
    NotServing,
    /// The index is not in the fleet snapshot or topology.
    UnknownRegion,
}

/// A region to try, and why it sits where it does in the order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub region: RegionIx,
    pub reason: Reason,
}

/// A destination region that is not a candidate, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Excluded {
    pub region: RegionIx,
    pub why: Exclusion,
}

/// One routing question.
#[derive(Clone, Copy, Debug)]
pub struct Query<'a> {
    pub source: RegionIx,
    /// The profile's destination set: the boundary. Duplicates are ignored.
    pub destinations: &'a [RegionIx],
    pub scope: Scope,
    pub now_ms: u64,
}

/// The answer: candidates in the order to try them, and the left-out destinations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    pub candidates: Vec<Candidate>,
    pub excluded: Vec<Excluded>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            stale_after_ms: 1500,
            rtt_weight: 0.002,
            price_weight: 0.5,
        }
    }
}

/// Why a [`Topology`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TopologyError {
    /// More regions than a [`RegionIx`] can name.
    TooManyRegions { n: usize },
    /// The round-trip table is not `n * n` long, `n` being the number of prices.
    RttLength { expected: usize, got: usize },
    /// The price list is not one entry per region.
    PriceLength { expected: usize, got: usize },
    /// A round trip is negative, infinite or NaN.
    InvalidRtt { from: usize, to: usize, value: f32 },
    /// A price is negative, infinite or NaN.
    InvalidPrice { region: usize, value: f32 },
    /// A coordinate is not a finite latitude in `[-90, 90]` and longitude in `[-180, 180]`.
    InvalidCoordinate { region: usize },
    /// The route factor is negative, infinite or NaN.
    InvalidRouteFactor,
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            TopologyError::TooManyRegions { n } => {
                write!(f, "{n} regions: more than a region index can name")
            }
            TopologyError::RttLength { expected, got } => {
                write!(f, "round-trip table has {got} entries, expected {expected}")
            }
            TopologyError::PriceLength { expected, got } => {
                write!(f, "price list has {got} entries, expected {expected}")
            }
            TopologyError::InvalidRtt { from, to, value } => write!(
                f,
                "round trip from region {from} to region {to} is {value}: must be finite and non-negative"
            ),
            TopologyError::InvalidPrice { region, value } => write!(
                f,
                "price of region {region} is {value}: must be finite and non-negative"
            ),
            TopologyError::InvalidCoordinate { region } => {
                write!(
                    f,
                    "coordinates of region {region} are not a valid latitude and longitude"
                )
            }
            TopologyError::InvalidRouteFactor => {
                f.write_str("route factor must be finite and non-negative")
            }
        }
    }
}

impl std::error::Error for TopologyError {}

/// Mean earth radius, in kilometres.
const EARTH_RADIUS_KM: f64 = 6371.0;
/// Light in fibre covers about 200 km per millisecond.
const FIBRE_KM_PER_MS: f64 = 200.0;

impl Topology {
    /// Builds a topology for `price.len()` regions from a row-major round-trip table
    /// (`rtt_ms[a * n + b]` is the round trip between regions `a` and `b`, in ms) and each
    /// region's price relative to a baseline of `1.0`.
    ///
    /// Every value must be finite and non-negative. The table need not be symmetric; its
    /// diagonal is ignored, as a region is always 0 ms from itself.
    pub fn new(rtt_ms: Vec<f32>, price: Vec<f32>) -> Result<Topology, TopologyError> {
        let n = price.len();
        if n > usize::from(RegionIx::MAX) + 1 {
            return Err(TopologyError::TooManyRegions { n });
        }
        let expected = n.saturating_mul(n);
        if rtt_ms.len() != expected {
            return Err(TopologyError::RttLength {
                expected,
                got: rtt_ms.len(),
            });
        }
        if let Some((i, &value)) = rtt_ms.iter().enumerate().find(|(_, v)| !valid_amount(**v)) {
            return Err(TopologyError::InvalidRtt {
                from: i / n,
                to: i % n,
                value,
            });
        }
        if let Some((region, &value)) = price.iter().enumerate().find(|(_, v)| !valid_amount(**v)) {
            return Err(TopologyError::InvalidPrice { region, value });
        }
        Ok(Topology { n, rtt_ms, price })
    }

    /// `n` regions, all 0 ms apart and at the baseline price.
    pub fn uniform(n: usize) -> Topology {
        Topology {
            n,
            rtt_ms: vec![0.0; n.saturating_mul(n)],
            price: vec![1.0; n],
        }
    }

    /// Builds a topology from each region's `(latitude, longitude)` in degrees: the round
    /// trip between two regions is the great-circle distance (haversine, earth radius
    /// 6371 km) there and back at 200 km per ms, times `route_factor` for the detours
    /// real fibre takes.
    pub fn from_coordinates(
        coords: &[(f64, f64)],
        route_factor: f64,
        price: Vec<f32>,
    ) -> Result<Topology, TopologyError> {
        if !(route_factor.is_finite() && route_factor >= 0.0) {
            return Err(TopologyError::InvalidRouteFactor);
        }
        if price.len() != coords.len() {
            return Err(TopologyError::PriceLength {
                expected: coords.len(),
                got: price.len(),
            });
        }
        let n = coords.len();
        if n > usize::from(RegionIx::MAX) + 1 {
            return Err(TopologyError::TooManyRegions { n });
        }
        if let Some(region) = coords.iter().position(|&(lat, lon)| {
            !((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon))
        }) {
            return Err(TopologyError::InvalidCoordinate { region });
        }
        let mut rtt = Vec::with_capacity(n.saturating_mul(n));
        for (a, &(lat_a, lon_a)) in coords.iter().enumerate() {
            for (b, &(lat_b, lon_b)) in coords.iter().enumerate() {
                let ms = if a == b {
                    0.0
                } else {
                    2.0 * haversine_km(lat_a, lon_a, lat_b, lon_b) / FIBRE_KM_PER_MS * route_factor
                };
                rtt.push(ms as f32);
            }
        }
        Topology::new(rtt, price)
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the topology has no region at all.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Round trip between regions `a` and `b`, in ms; `Some(0.0)` when `a == b`, `None`
    /// when either index is out of range.
    pub fn rtt_ms(&self, a: RegionIx, b: RegionIx) -> Option<f32> {
        let (a, b) = (usize::from(a), usize::from(b));
        if a >= self.n || b >= self.n {
            return None;
        }
        if a == b {
            return Some(0.0);
        }
        self.rtt_ms.get(a * self.n + b).copied()
    }

    /// Price of region `r` relative to the baseline `1.0`; `None` when out of range.
    pub fn price(&self, r: RegionIx) -> Option<f32> {
        self.price.get(usize::from(r)).copied()
    }
}

fn valid_amount(v: f32) -> bool {
    v.is_finite() && v >= 0.0
}

fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    // Rounding can push `h` a hair above 1 for antipodal points, where asin is NaN.
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

impl Reason {
    /// The tier of this reason in the candidate order: 0 for
    /// [`SourceHasHeadroom`](Reason::SourceHasHeadroom), tried first, up to 5 for
    /// [`CoolingDown`](Reason::CoolingDown), tried last. Candidates never appear in a
    /// lower tier after a higher one.
    pub fn tier(&self) -> u8 {
        match self {
            Reason::SourceHasHeadroom { .. } => 0,
            Reason::Headroom { .. } => 1,
            Reason::QueueSpace { .. } => 2,
            Reason::Uncertain { .. } => 3,
            Reason::Saturated { .. } => 4,
            Reason::CoolingDown { .. } => 5,
        }
    }
}

fn plural(n: impl Into<u64>) -> &'static str {
    if n.into() == 1 { "" } else { "s" }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Reason::SourceHasHeadroom { free_slots } => write!(
                f,
                "source region has {free_slots} free slot{}",
                plural(free_slots)
            ),
            Reason::Headroom { free_slots, rtt_ms } => write!(
                f,
                "{free_slots} free slot{}, {rtt_ms} ms round trip",
                plural(free_slots)
            ),
            Reason::QueueSpace { queue_free, rtt_ms } => write!(
                f,
                "no free slot, room for {queue_free} more in the queue, {rtt_ms} ms round trip"
            ),
            Reason::Uncertain { age_ms, rtt_ms } => write!(
                f,
                "telemetry {age_ms} ms old: headroom unknown, {rtt_ms} ms round trip"
            ),
            Reason::Saturated { rtt_ms } => write!(
                f,
                "full: no free slot and no queue space, {rtt_ms} ms round trip"
            ),
            Reason::CoolingDown { until_ms } => write!(
                f,
                "cooling down after a capacity error until t={until_ms} ms"
            ),
        }
    }
}

impl fmt::Display for Exclusion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Exclusion::Unreachable => "unreachable: peer link down",
            Exclusion::NotServing => "does not serve the model",
            Exclusion::UnknownRegion => "unknown region: not in the fleet snapshot or topology",
        })
    }
}

/// Decides where to send one request: the candidates in `q.destinations`, in the order to
/// try them, and the destinations left out. `fleet[i]` is this node's view of region `i`.
///
/// Each distinct destination appears exactly once, either as a candidate or in
/// `excluded`, which is sorted by region index. See the [crate documentation](crate) for
/// the order. Never panics, whatever the input.
pub fn route(q: &Query<'_>, fleet: &[RegionView], topo: &Topology, cfg: &RouterConfig) -> Decision {
    let mut out = Decision {
        // Room for the unsorted candidates and the sorted copies that replace them.
        candidates: Vec::with_capacity(q.destinations.len().saturating_mul(2)),
        excluded: Vec::new(),
    };
    route_into(q, fleet, topo, cfg, &mut out);
    out
}

/// [`route`], writing into `out` (cleared first) so that its vectors are reused.
pub fn route_into(
    q: &Query<'_>,
    fleet: &[RegionView],
    topo: &Topology,
    cfg: &RouterConfig,
    out: &mut Decision,
) {
    out.candidates.clear();
    out.excluded.clear();
    let ctx = Ctx {
        q,
        fleet,
        topo,
        cfg,
    };

    // Price only counts relative to the cheapest candidate, so that a fleet priced
    // uniformly above the baseline is scored like one at the baseline.
    let min_price = if q.scope == Scope::Global {
        q.destinations
            .iter()
            .filter_map(|&r| ctx.admit(r).ok())
            .map(|(price, _, _)| price)
            .fold(f32::INFINITY, f32::min)
    } else {
        0.0
    };

    // Candidates are pushed in destination order and sorted through packed integer keys,
    // computed once each: a comparator would redo the lookups and arithmetic for every
    // comparison.
    let mut inline = [0u128; INLINE_KEYS];
    let mut spilled = Vec::new();
    let keys: &mut [u128] = if q.destinations.len() <= INLINE_KEYS {
        &mut inline
    } else {
        spilled.resize(q.destinations.len(), 0);
        &mut spilled
    };
    let mut used = 0;
    for &region in q.destinations {
        match ctx.assess(region) {
            Err(why) => out.excluded.push(Excluded { region, why }),
            Ok(a) => {
                if let Some(slot) = keys.get_mut(used) {
                    *slot = ctx.sort_key(region, &a, min_price, out.candidates.len());
                    out.candidates.push(Candidate {
                        region,
                        reason: a.reason,
                    });
                    used += 1;
                }
            }
        }
    }
    let keys = keys.get_mut(..used).unwrap_or_default();
    keys.sort_unstable();

    // Above the position bits the key is a function of the region alone, so the copies of
    // a duplicated destination are adjacent and equal there: keep the first.
    let mut kept = 0;
    let mut last = None;
    for i in 0..keys.len() {
        let Some(&key) = keys.get(i) else { break };
        if last == Some(key >> POSITION_BITS) {
            continue;
        }
        last = Some(key >> POSITION_BITS);
        if let Some(slot) = keys.get_mut(kept) {
            *slot = key;
        }
        kept += 1;
    }

    // Appending the candidates in key order and then dropping the unsorted ones moves each
    // once; permuting in place would need either scratch space or chains of swaps.
    let pushed = out.candidates.len();
    for &key in keys.get(..kept).unwrap_or_default() {
        if let Some(&c) = out.candidates.get(position(key)) {
            out.candidates.push(c);
        }
    }
    out.candidates.drain(..pushed);

    out.excluded.sort_unstable_by_key(|e| e.region);
    out.excluded.dedup_by_key(|e| e.region);
}

/// Low bits of a sort key: where the candidate was pushed. Wide enough for any `Vec` of
/// candidates that fits in memory.
const POSITION_BITS: u32 = 45;

const POSITION_MASK: u128 = (1 << POSITION_BITS) - 1;

fn position(key: u128) -> usize {
    (key & POSITION_MASK) as usize
}

/// Destination sets up to this size sort their keys on the stack.
const INLINE_KEYS: usize = 64;

struct Ctx<'a, 'q> {
    q: &'a Query<'q>,
    fleet: &'a [RegionView],
    topo: &'a Topology,
    cfg: &'a RouterConfig,
}

/// What [`Ctx::assess`] learns about a candidate: its reason and what its place within
/// the tier depends on.
struct Assessed {
    reason: Reason,
    rtt: f32,
    price: f32,
    /// Free fraction of slots (headroom) or filled fraction of the queue (queue space).
    fraction: f32,
}

impl Ctx<'_, '_> {
    /// Whether `region` is a candidate at all; if so its price, view and load.
    fn admit(&self, region: RegionIx) -> Result<(f32, &RegionView, Load), Exclusion> {
        let price = self.topo.price(region).ok_or(Exclusion::UnknownRegion)?;
        let view = self
            .fleet
            .get(usize::from(region))
            .ok_or(Exclusion::UnknownRegion)?;
        // The source is this node's own region: there is no peer link to be down.
        if !view.reachable && region != self.q.source {
            return Err(Exclusion::Unreachable);
        }
        let load = view.load.ok_or(Exclusion::NotServing)?;
        Ok((price, view, load))
    }

    fn assess(&self, region: RegionIx) -> Result<Assessed, Exclusion> {
        let (price, view, load) = self.admit(region)?;
        let is_source = region == self.q.source;
        let now = self.q.now_ms;
        // An unknown source (outside the topology) puts every other region infinitely far.
        let rtt = self
            .topo
            .rtt_ms(self.q.source, region)
            .unwrap_or(if is_source { 0.0 } else { f32::INFINITY });
        // Round trips are never negative; the cast saturates an unknown (infinite) one.
        let rtt_ms = (rtt + 0.5) as u32;
        let mut fraction = 0.0;

        let reason = if view.cooldown_until_ms > now {
            Reason::CoolingDown {
                until_ms: view.cooldown_until_ms,
            }
        } else if now.saturating_sub(view.observed_at_ms) > self.cfg.stale_after_ms {
            Reason::Uncertain {
                age_ms: now.saturating_sub(view.observed_at_ms),
                rtt_ms,
            }
        } else {
            let free_slots = load.slots.saturating_sub(load.running);
            if free_slots > 0 {
                if is_source {
                    Reason::SourceHasHeadroom { free_slots }
                } else {
                    fraction = ratio(free_slots, load.slots);
                    Reason::Headroom { free_slots, rtt_ms }
                }
            } else if load.waiting < load.queue_limit {
                fraction = ratio(load.waiting, load.queue_limit);
                Reason::QueueSpace {
                    queue_free: load.queue_limit - load.waiting,
                    rtt_ms,
                }
            } else {
                Reason::Saturated { rtt_ms }
            }
        };
        Ok(Assessed {
            reason,
            rtt,
            price,
            fraction,
        })
    }

    /// A key whose integer order is the candidate order: tier (bits 125..128), the order
    /// within the tier (bits 61..125), the region index (bits 45..61), then the position
    /// the candidate was pushed at.
    fn sort_key(&self, region: RegionIx, a: &Assessed, min_price: f32, position: usize) -> u128 {
        let rtt = u64::from(ordered_bits(a.rtt));
        let within: u64 = match a.reason {
            Reason::SourceHasHeadroom { .. } => 0,
            Reason::Headroom { .. } => {
                let mut score = a.fraction - self.cfg.rtt_weight * a.rtt;
                if self.q.scope == Scope::Global {
                    score -= self.cfg.price_weight * (a.price - min_price);
                }
                // NaN (from NaN or infinite weights) would otherwise sort by its sign bit,
                // which arithmetic does not pin down; -0.0 would sort below 0.0.
                if score.is_nan() {
                    score = f32::NEG_INFINITY;
                } else if score == 0.0 {
                    score = 0.0;
                }
                // Higher scores first.
                (u64::from(!ordered_bits(score)) << 32) | rtt
            }
            Reason::QueueSpace { .. } => (u64::from(ordered_bits(a.fraction)) << 32) | rtt,
            Reason::Uncertain { .. } | Reason::Saturated { .. } => rtt,
            Reason::CoolingDown { until_ms } => until_ms,
        };
        (u128::from(a.reason.tier()) << 125)
            | (u128::from(within) << 61)
            | (u128::from(region) << POSITION_BITS)
            | (position as u128 & POSITION_MASK)
    }
}

fn ratio(part: u32, whole: u32) -> f32 {
    if whole == 0 {
        0.0
    } else {
        (f64::from(part) / f64::from(whole)) as f32
    }
}

/// Maps an `f32` to a `u32` whose unsigned order is [`f32::total_cmp`]'s order.
fn ordered_bits(x: f32) -> u32 {
    let bits = x.to_bits();
    if bits & 0x8000_0000 == 0 {
        bits | 0x8000_0000
    } else {
        !bits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn load(slots: u32, running: u32, queue_limit: u32, waiting: u32) -> Load {
        Load {
            slots,
            running,
            queue_limit,
            waiting,
        }
    }

    fn view(l: Load) -> RegionView {
        RegionView {
            reachable: true,
            observed_at_ms: NOW,
            load: Some(l),
            cooldown_until_ms: 0,
        }
    }

    fn idle() -> RegionView {
        view(load(4, 0, 8, 0))
    }

    fn busy() -> RegionView {
        view(load(4, 4, 8, 2))
    }

    fn full() -> RegionView {
        view(load(4, 4, 8, 8))
    }

    fn stale(mut v: RegionView) -> RegionView {
        v.observed_at_ms = NOW - 10_000;
        v
    }

    fn cooling(mut v: RegionView, until_ms: u64) -> RegionView {
        v.cooldown_until_ms = until_ms;
        v
    }

    /// Regions on a line, 10 ms apart, at the baseline price.
    fn line(n: usize) -> Topology {
        priced_line(vec![1.0; n])
    }

    fn priced_line(price: Vec<f32>) -> Topology {
        let n = price.len();
        let mut rtt = Vec::new();
        for a in 0..n {
            for b in 0..n {
                rtt.push(10.0 * a.abs_diff(b) as f32);
            }
        }
        match Topology::new(rtt, price) {
            Ok(t) => t,
            Err(e) => panic!("test topology: {e}"),
        }
    }

    fn query(source: RegionIx, destinations: &[RegionIx], scope: Scope) -> Query<'_> {
        Query {
            source,
            destinations,
            scope,
            now_ms: NOW,
        }
    }

    fn decide(source: RegionIx, dests: &[RegionIx], fleet: &[RegionView]) -> Decision {
        let topo = line(fleet.len());
        route(
            &query(source, dests, Scope::Geographic),
            fleet,
            &topo,
            &RouterConfig::default(),
        )
    }

    fn order(d: &Decision) -> Vec<RegionIx> {
        d.candidates.iter().map(|c| c.region).collect()
    }

    fn tiers(d: &Decision) -> Vec<u8> {
        d.candidates.iter().map(|c| c.reason.tier()).collect()
    }

    #[test]
    fn default_config() {
        let cfg = RouterConfig::default();
        assert_eq!(cfg.stale_after_ms, 1500);
        assert_eq!(cfg.rtt_weight, 0.002);
        assert_eq!(cfg.price_weight, 0.5);
    }

    #[test]
    fn topology_validates_its_tables() {
        assert_eq!(
            Topology::new(vec![0.0; 3], vec![1.0; 2]).map(|t| t.len()),
            Err(TopologyError::RttLength {
                expected: 4,
                got: 3
            })
        );
        assert!(matches!(
            Topology::new(vec![0.0, -1.0, 0.0, 0.0], vec![1.0; 2]),
            Err(TopologyError::InvalidRtt { from: 0, to: 1, .. })
        ));
        assert!(matches!(
            Topology::new(vec![0.0, 1.0, f32::NAN, 0.0], vec![1.0; 2]),
            Err(TopologyError::InvalidRtt { from: 1, to: 0, .. })
        ));
        assert!(matches!(
            Topology::new(vec![0.0; 4], vec![1.0, f32::INFINITY]),
            Err(TopologyError::InvalidPrice { region: 1, .. })
        ));
        assert!(matches!(
            Topology::new(vec![0.0; 4], vec![-0.5, 1.0]),
            Err(TopologyError::InvalidPrice { region: 0, .. })
        ));
        let empty = Topology::new(Vec::new(), Vec::new());
        assert!(empty.is_ok_and(|t| t.is_empty()));
    }

    #[test]
    fn topology_accessors() {
        let t = match Topology::new(vec![7.0, 20.0, 30.0, 7.0], vec![1.0, 1.5]) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(t.len(), 2);
        assert_eq!(t.rtt_ms(0, 1), Some(20.0));
        assert_eq!(t.rtt_ms(1, 0), Some(30.0));
        // The diagonal is ignored: a region is 0 ms from itself.
        assert_eq!(t.rtt_ms(1, 1), Some(0.0));
        assert_eq!(t.rtt_ms(0, 2), None);
        assert_eq!(t.rtt_ms(2, 2), None);
        assert_eq!(t.price(1), Some(1.5));
        assert_eq!(t.price(2), None);

        let u = Topology::uniform(3);
        assert_eq!(u.len(), 3);
        assert_eq!(u.rtt_ms(0, 2), Some(0.0));
        assert_eq!(u.price(2), Some(1.0));
    }

    #[test]
    fn topology_from_coordinates() {
        // London and New York: about 5570 km apart.
        let coords = [(51.5074, -0.1278), (40.7128, -74.0060), (51.5074, -0.1278)];
        let t = match Topology::from_coordinates(&coords, 1.5, vec![1.0; 3]) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let expected = 2.0 * 5570.0 / 200.0 * 1.5;
        let rtt = t.rtt_ms(0, 1).unwrap_or(f32::NAN);
        assert!((rtt - expected).abs() < 1.0, "{rtt} vs {expected}");
        assert_eq!(t.rtt_ms(1, 0), t.rtt_ms(0, 1));
        assert_eq!(t.rtt_ms(0, 2), Some(0.0));

        // Antipodes: half the circumference, no NaN.
        let t = Topology::from_coordinates(&[(0.0, 0.0), (0.0, 180.0)], 1.0, vec![1.0; 2]);
        let half = std::f64::consts::PI * EARTH_RADIUS_KM * 2.0 / 200.0;
        assert!(t.is_ok_and(|t| (f64::from(t.rtt_ms(0, 1).unwrap_or(0.0)) - half).abs() < 0.01));

        assert_eq!(
            Topology::from_coordinates(&coords, 1.0, vec![1.0; 2]).map(|t| t.len()),
            Err(TopologyError::PriceLength {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            Topology::from_coordinates(&[(0.0, 0.0), (91.0, 0.0)], 1.0, vec![1.0; 2])
                .map(|t| t.len()),
            Err(TopologyError::InvalidCoordinate { region: 1 })
        );
        assert_eq!(
            Topology::from_coordinates(&[(f64::NAN, 0.0)], 1.0, vec![1.0]).map(|t| t.len()),
            Err(TopologyError::InvalidCoordinate { region: 0 })
        );
        assert_eq!(
            Topology::from_coordinates(&coords, f64::NAN, vec![1.0; 3]).map(|t| t.len()),
            Err(TopologyError::InvalidRouteFactor)
        );
    }

    #[test]
    fn source_with_headroom_comes_first() {
        // Region 1 is idle and as close as it gets; the source has one slot left.
        let fleet = [view(load(4, 3, 8, 0)), idle(), idle()];
        let d = decide(0, &[2, 1, 0], &fleet);
        assert_eq!(order(&d), [0, 1, 2]);
        assert_eq!(
            d.candidates[0].reason,
            Reason::SourceHasHeadroom { free_slots: 1 }
        );
        assert!(d.excluded.is_empty());
    }

    #[test]
    fn source_is_reachable_whatever_its_view_says() {
        let mut own = idle();
        own.reachable = false;
        let d = decide(1, &[0, 1], &[idle(), own]);
        assert_eq!(order(&d), [1, 0]);
        assert_eq!(tiers(&d), [0, 1]);
    }

    #[test]
    fn busy_source_yields_to_remote_headroom() {
        let d = decide(0, &[0, 1], &[busy(), idle()]);
        assert_eq!(order(&d), [1, 0]);
        assert_eq!(
            d.candidates[1].reason,
            Reason::QueueSpace {
                queue_free: 6,
                rtt_ms: 0
            }
        );
    }

    #[test]
    fn source_outside_destinations_is_never_a_candidate() {
        let d = decide(0, &[1, 2], &[idle(), busy(), idle()]);
        assert_eq!(order(&d), [2, 1]);
        assert!(d.excluded.is_empty());
    }

    #[test]
    fn headroom_by_free_fraction() {
        let fleet = [
            idle(),
            view(load(4, 3, 8, 0)),
            view(load(4, 1, 8, 0)),
            view(load(10, 5, 8, 0)),
        ];
        let d = decide(0, &[1, 2, 3], &fleet);
        assert_eq!(order(&d), [2, 3, 1]);
        assert_eq!(
            d.candidates[0].reason,
            Reason::Headroom {
                free_slots: 3,
                rtt_ms: 20
            }
        );
    }

    #[test]
    fn headroom_rtt_penalty_outweighs_a_small_fraction_gain() {
        // 100 ms costs 0.2 of score: 9/10 free far away loses to 8/10 free nearby.
        let rtt = vec![
            0.0, 5.0, 100.0, //
            5.0, 0.0, 100.0, //
            100.0, 100.0, 0.0,
        ];
        let topo = match Topology::new(rtt, vec![1.0; 3]) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let fleet = [idle(), view(load(10, 2, 0, 0)), view(load(10, 1, 0, 0))];
        let q = query(0, &[2, 1], Scope::Geographic);
        let d = route(&q, &fleet, &topo, &RouterConfig::default());
        assert_eq!(order(&d), [1, 2]);
        // Without the penalty the emptier region wins.
        let cfg = RouterConfig {
            rtt_weight: 0.0,
            ..RouterConfig::default()
        };
        assert_eq!(order(&route(&q, &fleet, &topo, &cfg)), [2, 1]);
    }

    #[test]
    fn headroom_ties_go_to_rtt_then_index() {
        let topo = Topology::uniform(4);
        let fleet = [idle(); 4];
        let cfg = RouterConfig::default();
        let d = route(
            &query(0, &[3, 1, 2], Scope::Geographic),
            &fleet,
            &topo,
            &cfg,
        );
        assert_eq!(order(&d), [1, 2, 3]);
        // Equal scores with different round trips: the nearer first.
        let cfg = RouterConfig {
            rtt_weight: 0.0,
            ..cfg
        };
        let d = route(
            &query(0, &[3, 1, 2], Scope::Geographic),
            &fleet,
            &line(4),
            &cfg,
        );
        assert_eq!(order(&d), [1, 2, 3]);
        let d = route(
            &query(3, &[0, 1, 2], Scope::Geographic),
            &fleet,
            &line(4),
            &cfg,
        );
        assert_eq!(order(&d), [2, 1, 0]);
    }

    #[test]
    fn queue_space_by_fill_then_rtt() {
        let fleet = [
            idle(),
            view(load(4, 4, 10, 5)),
            view(load(4, 4, 10, 2)),
            view(load(4, 4, 20, 4)),
            view(load(4, 5, 10, 2)),
        ];
        let d = decide(0, &[1, 2, 3, 4], &fleet);
        // 2 and 3 are both 20 % full; 2 is nearer. 4 runs over its slots but is no worse.
        assert_eq!(order(&d), [2, 3, 4, 1]);
        assert_eq!(
            d.candidates[0].reason,
            Reason::QueueSpace {
                queue_free: 8,
                rtt_ms: 20
            }
        );
    }

    #[test]
    fn queue_space_tie_goes_to_the_source() {
        let fleet = [busy(), busy(), busy()];
        let d = decide(2, &[0, 1, 2], &fleet);
        assert_eq!(order(&d), [2, 1, 0]);
        assert_eq!(tiers(&d), [2, 2, 2]);
    }

    #[test]
    fn stale_comes_after_fresh_queue_space_and_before_saturated() {
        let fleet = [
            full(),
            stale(idle()),
            busy(),
            full(),
            stale(full()),
            cooling(idle(), NOW + 1),
        ];
        let d = decide(0, &[0, 1, 2, 3, 4, 5], &fleet);
        assert_eq!(order(&d), [2, 1, 4, 0, 3, 5]);
        assert_eq!(tiers(&d), [2, 3, 3, 4, 4, 5]);
        assert_eq!(
            d.candidates[1].reason,
            Reason::Uncertain {
                age_ms: 10_000,
                rtt_ms: 10
            }
        );
        assert_eq!(d.candidates[3].reason, Reason::Saturated { rtt_ms: 0 });
    }

    #[test]
    fn stale_source_is_not_preferred() {
        let d = decide(0, &[0, 1], &[stale(idle()), busy()]);
        assert_eq!(order(&d), [1, 0]);
        assert_eq!(tiers(&d), [2, 3]);
    }

    #[test]
    fn freshness_boundary_and_future_observations() {
        let cfg = RouterConfig::default();
        let mut at_limit = idle();
        at_limit.observed_at_ms = NOW - cfg.stale_after_ms;
        let mut past_limit = idle();
        past_limit.observed_at_ms = NOW - cfg.stale_after_ms - 1;
        let mut future = idle();
        future.observed_at_ms = NOW + 60_000;
        let d = decide(0, &[1, 2, 3], &[idle(), at_limit, past_limit, future]);
        assert_eq!(order(&d), [1, 3, 2]);
        assert_eq!(tiers(&d), [1, 1, 3]);
    }

    #[test]
    fn cooling_down_is_last_whatever_the_load() {
        let fleet = [
            cooling(idle(), NOW + 500),
            cooling(idle(), NOW + 100),
            full(),
            stale(full()),
            cooling(full(), NOW + 100),
            // A cool-down that ends now is over.
            cooling(idle(), NOW),
        ];
        let d = decide(0, &[0, 1, 2, 3, 4, 5], &fleet);
        assert_eq!(order(&d), [5, 3, 2, 1, 4, 0]);
        assert_eq!(
            d.candidates[5].reason,
            Reason::CoolingDown {
                until_ms: NOW + 500
            }
        );
    }

    #[test]
    fn unreachable_not_serving_and_unknown_are_excluded() {
        let mut down = idle();
        down.reachable = false;
        let mut off = idle();
        off.load = None;
        let fleet = [idle(), down, off, idle()];
        // Region 3 is in the fleet but not in the topology; 9 is in neither.
        let topo = line(3);
        let q = query(0, &[9, 3, 2, 1, 0], Scope::Geographic);
        let d = route(&q, &fleet, &topo, &RouterConfig::default());
        assert_eq!(order(&d), [0]);
        assert_eq!(
            d.excluded,
            [
                Excluded {
                    region: 1,
                    why: Exclusion::Unreachable
                },
                Excluded {
                    region: 2,
                    why: Exclusion::NotServing
                },
                Excluded {
                    region: 3,
                    why: Exclusion::UnknownRegion
                },
                Excluded {
                    region: 9,
                    why: Exclusion::UnknownRegion
                },
            ]
        );
        // An unreachable region that also serves nothing is reported unreachable.
        let mut gone = down;
        gone.load = None;
        let d = decide(0, &[1], &[idle(), gone]);
        assert_eq!(d.excluded[0].why, Exclusion::Unreachable);
        // The source's own view decides whether it serves the model.
        let d = decide(1, &[1], &[idle(), off]);
        assert_eq!(d.excluded[0].why, Exclusion::NotServing);
    }

    #[test]
    fn duplicate_destinations_count_once() {
        let mut down = idle();
        down.reachable = false;
        let d = decide(
            0,
            &[2, 1, 2, 0, 1, 2, 3, 3],
            &[idle(), busy(), idle(), down],
        );
        assert_eq!(order(&d), [0, 2, 1]);
        assert_eq!(d.excluded.len(), 1);
    }

    #[test]
    fn global_scope_weighs_price() {
        // Regions 1 and 2 are equally loaded and equally far; 2 is cheaper.
        let topo = Topology::new(
            vec![
                0.0, 10.0, 10.0, //
                10.0, 0.0, 10.0, //
                10.0, 10.0, 0.0,
            ],
            vec![1.0, 1.0, 0.6],
        );
        let topo = match topo {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let fleet = [full(), view(load(10, 2, 0, 0)), view(load(10, 2, 0, 0))];
        let cfg = RouterConfig::default();
        let global = route(&query(0, &[0, 1, 2], Scope::Global), &fleet, &topo, &cfg);
        assert_eq!(order(&global), [2, 1, 0]);
        // Geographic profiles ignore price: the tie goes to the lower index.
        let geo = route(
            &query(0, &[0, 1, 2], Scope::Geographic),
            &fleet,
            &topo,
            &cfg,
        );
        assert_eq!(order(&geo), [1, 2, 0]);
        // Price trades against load: 0.4 cheaper is worth 0.2 of free fraction.
        let fleet = [full(), view(load(10, 1, 0, 0)), view(load(10, 2, 0, 0))];
        let global = route(&query(0, &[0, 1, 2], Scope::Global), &fleet, &topo, &cfg);
        assert_eq!(order(&global), [2, 1, 0]);
        let fleet = [full(), view(load(10, 0, 0, 0)), view(load(10, 4, 0, 0))];
        let global = route(&query(0, &[0, 1, 2], Scope::Global), &fleet, &topo, &cfg);
        assert_eq!(order(&global), [1, 2, 0]);
    }

    #[test]
    fn global_price_is_relative_to_the_cheapest_candidate() {
        // A cheap region that is not a candidate does not penalise the others.
        let topo = match Topology::new(vec![0.0; 9], vec![0.1, 2.0, 3.0]) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let fleet = [idle(), view(load(10, 5, 0, 0)), view(load(10, 1, 0, 0))];
        let cfg = RouterConfig::default();
        let d = route(&query(0, &[1, 2], Scope::Global), &fleet, &topo, &cfg);
        // Scores: 1 → 0.5, 2 → 0.9 - 0.5 = 0.4.
        assert_eq!(order(&d), [1, 2]);
    }

    #[test]
    fn in_region_scope_uses_the_source_only() {
        let topo = line(3);
        let cfg = RouterConfig::default();
        let fleet = [idle(), busy(), idle()];
        let q = query(1, &[1], Scope::InRegion);
        let d = route(&q, &fleet, &topo, &cfg);
        assert_eq!(
            d.candidates,
            [Candidate {
                region: 1,
                reason: Reason::QueueSpace {
                    queue_free: 6,
                    rtt_ms: 0
                }
            }]
        );
        let fleet = [idle(), idle(), idle()];
        let d = route(&q, &fleet, &topo, &cfg);
        assert_eq!(
            d.candidates,
            [Candidate {
                region: 1,
                reason: Reason::SourceHasHeadroom { free_slots: 4 }
            }]
        );
        let mut off = idle();
        off.load = None;
        let d = route(&q, &[idle(), off, idle()], &topo, &cfg);
        assert!(d.candidates.is_empty());
        assert_eq!(d.excluded[0].why, Exclusion::NotServing);
    }

    #[test]
    fn empty_destinations_give_an_empty_decision() {
        assert_eq!(decide(0, &[], &[idle()]), Decision::default());
    }

    #[test]
    fn route_into_reuses_and_matches_route() {
        let fleet = [idle(), busy(), full(), stale(idle())];
        let topo = line(4);
        let cfg = RouterConfig::default();
        let mut out = Decision::default();
        let q = query(0, &[0, 1, 2, 3, 7], Scope::Global);
        route_into(&q, &fleet, &topo, &cfg, &mut out);
        assert_eq!(out, route(&q, &fleet, &topo, &cfg));
        let q = query(1, &[2], Scope::Geographic);
        route_into(&q, &fleet, &topo, &cfg, &mut out);
        assert_eq!(out, route(&q, &fleet, &topo, &cfg));
        assert_eq!(out.excluded, []);
    }

    #[test]
    fn many_destinations_spill_past_the_inline_keys() {
        let n = INLINE_KEYS * 2 + 3;
        let fleet = vec![busy(); n];
        let topo = line(n);
        let dests: Vec<RegionIx> = (0..n as RegionIx).rev().collect();
        let d = route(
            &query(0, &dests, Scope::Geographic),
            &fleet,
            &topo,
            &RouterConfig::default(),
        );
        let expected: Vec<RegionIx> = (0..n as RegionIx).collect();
        assert_eq!(order(&d), expected);
    }

    #[test]
    fn non_finite_weights_order_deterministically() {
        let fleet = [
            idle(),
            view(load(4, 2, 0, 0)),
            idle(),
            view(load(8, 1, 0, 0)),
        ];
        let topo = line(4);
        for w in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let cfg = RouterConfig {
                stale_after_ms: 1500,
                rtt_weight: w,
                price_weight: w,
            };
            let a = route(&query(0, &[3, 2, 1], Scope::Global), &fleet, &topo, &cfg);
            let b = route(&query(0, &[1, 2, 3], Scope::Global), &fleet, &topo, &cfg);
            assert_eq!(a, b);
            assert_eq!(tiers(&a), [1, 1, 1]);
        }
        // NaN scores sort as the worst score, ties by rtt then index.
        let cfg = RouterConfig {
            rtt_weight: f32::NAN,
            ..RouterConfig::default()
        };
        let d = route(
            &query(0, &[3, 2, 1], Scope::Geographic),
            &fleet,
            &topo,
            &cfg,
        );
        assert_eq!(order(&d), [1, 2, 3]);
    }

    #[test]
    fn extreme_clock_and_loads_do_not_panic() {
        let weird = [
            RegionView {
                reachable: true,
                observed_at_ms: u64::MAX,
                load: Some(load(u32::MAX, u32::MAX, u32::MAX, 0)),
                cooldown_until_ms: 0,
            },
            RegionView {
                reachable: true,
                observed_at_ms: 0,
                load: Some(load(0, u32::MAX, 0, u32::MAX)),
                cooldown_until_ms: u64::MAX,
            },
            RegionView {
                reachable: true,
                observed_at_ms: 0,
                load: Some(load(u32::MAX, 0, 0, 0)),
                cooldown_until_ms: 0,
            },
        ];
        for now_ms in [0, 1, u64::MAX] {
            let q = Query {
                source: RegionIx::MAX,
                destinations: &[0, 1, 2, RegionIx::MAX],
                scope: Scope::Global,
                now_ms,
            };
            let d = route(&q, &weird, &line(3), &RouterConfig::default());
            assert_eq!(d.candidates.len() + d.excluded.len(), 4);
        }
    }

    #[test]
    fn unknown_source_puts_every_region_far_away() {
        let d = decide(7, &[0, 1], &[idle(), idle()]);
        assert_eq!(order(&d), [0, 1]);
        assert_eq!(
            d.candidates[0].reason,
            Reason::Headroom {
                free_slots: 4,
                rtt_ms: u32::MAX
            }
        );
    }

    #[test]
    fn display_explains_briefly() {
        let cases = [
            (
                Reason::SourceHasHeadroom { free_slots: 3 },
                "source region has 3 free slots",
            ),
            (
                Reason::SourceHasHeadroom { free_slots: 1 },
                "source region has 1 free slot",
            ),
            (
                Reason::Headroom {
                    free_slots: 2,
                    rtt_ms: 84,
                },
                "2 free slots, 84 ms round trip",
            ),
            (
                Reason::QueueSpace {
                    queue_free: 5,
                    rtt_ms: 12,
                },
                "no free slot, room for 5 more in the queue, 12 ms round trip",
            ),
            (
                Reason::Uncertain {
                    age_ms: 2300,
                    rtt_ms: 20,
                },
                "telemetry 2300 ms old: headroom unknown, 20 ms round trip",
            ),
            (
                Reason::Saturated { rtt_ms: 7 },
                "full: no free slot and no queue space, 7 ms round trip",
            ),
            (
                Reason::CoolingDown { until_ms: 42 },
                "cooling down after a capacity error until t=42 ms",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
        assert_eq!(
            Exclusion::Unreachable.to_string(),
            "unreachable: peer link down"
        );
        assert_eq!(
            Exclusion::NotServing.to_string(),
            "does not serve the model"
        );
        assert!(
            Exclusion::UnknownRegion
                .to_string()
                .starts_with("unknown region")
        );
        assert!(
            TopologyError::RttLength {
                expected: 4,
                got: 3
            }
            .to_string()
            .contains("expected 4")
        );
    }

    proptest::proptest! {
        #[test]
        fn ordered_bits_follows_total_cmp(a: f32, b: f32) {
            proptest::prop_assert_eq!(ordered_bits(a).cmp(&ordered_bits(b)), a.total_cmp(&b));
        }
    }
}
