//! Properties of `route` over arbitrary fleets, topologies, clocks and destination sets,
//! plus an equivalence check against a direct, allocation-happy restatement of the rules.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use crisp_routing::{
    Candidate, Decision, Excluded, Exclusion, Load, Query, Reason, RegionIx, RegionView,
    RouterConfig, Scope, Topology, route, route_into,
};
use proptest::prelude::*;
use proptest::sample::select;

#[derive(Clone, Debug)]
struct Scenario {
    fleet: Vec<RegionView>,
    rtt: Vec<f32>,
    price: Vec<f32>,
    source: RegionIx,
    destinations: Vec<RegionIx>,
    shuffled: Vec<RegionIx>,
    scope: Scope,
    now_ms: u64,
    cfg: RouterConfig,
}

impl Scenario {
    fn topology(&self) -> Topology {
        match Topology::new(self.rtt.clone(), self.price.clone()) {
            Ok(t) => t,
            Err(e) => panic!("generated topology is invalid: {e}"),
        }
    }

    fn query<'a>(&self, destinations: &'a [RegionIx]) -> Query<'a> {
        Query {
            source: self.source,
            destinations,
            scope: self.scope,
            now_ms: self.now_ms,
        }
    }

    fn decide(&self) -> Decision {
        route(
            &self.query(&self.destinations),
            &self.fleet,
            &self.topology(),
            &self.cfg,
        )
    }
}

fn arb_load() -> impl Strategy<Value = Load> {
    (0u32..6, 0u32..8, 0u32..5, 0u32..7).prop_map(|(slots, running, queue_limit, waiting)| Load {
        slots,
        running,
        queue_limit,
        waiting,
    })
}

fn arb_time() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0u64..20_000,
        1 => Just(0),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn arb_view() -> impl Strategy<Value = RegionView> {
    (
        proptest::bool::weighted(0.85),
        arb_time(),
        proptest::option::weighted(0.85, arb_load()),
        prop_oneof![3 => Just(0u64), 2 => arb_time()],
    )
        .prop_map(
            |(reachable, observed_at_ms, load, cooldown_until_ms)| RegionView {
                reachable,
                observed_at_ms,
                load,
                cooldown_until_ms,
            },
        )
}

fn arb_config() -> impl Strategy<Value = RouterConfig> {
    prop_oneof![
        3 => Just(RouterConfig::default()),
        3 => (0u64..5_000, 0.0f32..0.02, 0.0f32..2.0).prop_map(|(s, r, p)| RouterConfig {
            stale_after_ms: s,
            rtt_weight: r,
            price_weight: p,
        }),
        1 => (any::<u64>(), any::<f32>(), any::<f32>()).prop_map(|(s, r, p)| RouterConfig {
            stale_after_ms: s,
            rtt_weight: r,
            price_weight: p,
        }),
    ]
}

fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (1usize..40)
        .prop_flat_map(|n| {
            // Coarse round trips and prices make ties common.
            let rtt = prop::collection::vec((0u32..30).prop_map(|x| x as f32 * 10.0), n * n);
            let price = prop::collection::vec((1u32..8).prop_map(|x| x as f32 * 0.25), n);
            let fleet = prop::collection::vec(arb_view(), n.saturating_sub(2)..=n + 2);
            // Indices past the catalog exercise unknown regions.
            let index = 0..(n as RegionIx + 3);
            let destinations = prop::collection::vec(index.clone(), 0..50);
            (
                fleet,
                rtt,
                price,
                index,
                destinations,
                select(vec![Scope::InRegion, Scope::Geographic, Scope::Global]),
                arb_time(),
                arb_config(),
            )
        })
        .prop_flat_map(
            |(fleet, rtt, price, source, destinations, scope, now_ms, cfg)| {
                let shuffled = Just(destinations.clone()).prop_shuffle();
                (
                    Just(Scenario {
                        fleet,
                        rtt,
                        price,
                        source,
                        destinations,
                        shuffled: Vec::new(),
                        scope,
                        now_ms,
                        cfg,
                    }),
                    shuffled,
                )
            },
        )
        .prop_map(|(mut s, shuffled)| {
            s.shuffled = shuffled;
            s
        })
}

/// The rules of the crate documentation, stated directly.
fn reference(s: &Scenario) -> Decision {
    let topo = s.topology();
    let now = s.now_ms;
    let set: BTreeSet<RegionIx> = s.destinations.iter().copied().collect();
    let mut excluded = Vec::new();
    let mut kept = Vec::new();
    for &r in &set {
        let ix = usize::from(r);
        let Some(view) = s.fleet.get(ix).filter(|_| ix < topo.len()) else {
            excluded.push(Excluded {
                region: r,
                why: Exclusion::UnknownRegion,
            });
            continue;
        };
        if !view.reachable && r != s.source {
            excluded.push(Excluded {
                region: r,
                why: Exclusion::Unreachable,
            });
            continue;
        }
        let Some(load) = view.load else {
            excluded.push(Excluded {
                region: r,
                why: Exclusion::NotServing,
            });
            continue;
        };
        kept.push((r, *view, load));
    }

    let min_price = kept
        .iter()
        .filter_map(|(r, _, _)| topo.price(*r))
        .fold(f32::INFINITY, f32::min);

    struct Row {
        region: RegionIx,
        reason: Reason,
        score: f32,
        fill: f32,
        rtt: f32,
    }
    let mut rows: Vec<Row> = kept
        .into_iter()
        .map(|(r, view, load)| {
            let rtt = if r == s.source {
                0.0
            } else {
                topo.rtt_ms(s.source, r).unwrap_or(f32::INFINITY)
            };
            let rtt_ms = rtt.round() as u32;
            let age = now.saturating_sub(view.observed_at_ms);
            let free = load.slots.saturating_sub(load.running);
            let frac = |a: u32, b: u32| {
                if b == 0 {
                    0.0
                } else {
                    (f64::from(a) / f64::from(b)) as f32
                }
            };
            let mut score = frac(free, load.slots) - s.cfg.rtt_weight * rtt;
            if s.scope == Scope::Global {
                score -= s.cfg.price_weight * (topo.price(r).unwrap_or(1.0) - min_price);
            }
            if score.is_nan() {
                score = f32::NEG_INFINITY;
            }
            if score == 0.0 {
                score = 0.0;
            }
            let reason = if view.cooldown_until_ms > now {
                Reason::CoolingDown {
                    until_ms: view.cooldown_until_ms,
                }
            } else if age > s.cfg.stale_after_ms {
                Reason::Uncertain {
                    age_ms: age,
                    rtt_ms,
                }
            } else if free > 0 && r == s.source {
                Reason::SourceHasHeadroom { free_slots: free }
            } else if free > 0 {
                Reason::Headroom {
                    free_slots: free,
                    rtt_ms,
                }
            } else if load.waiting < load.queue_limit {
                Reason::QueueSpace {
                    queue_free: load.queue_limit - load.waiting,
                    rtt_ms,
                }
            } else {
                Reason::Saturated { rtt_ms }
            };
            Row {
                region: r,
                reason,
                score,
                fill: frac(load.waiting, load.queue_limit),
                rtt,
            }
        })
        .collect();

    rows.sort_by(|a, b| {
        let within = match (a.reason, b.reason) {
            (Reason::Headroom { .. }, Reason::Headroom { .. }) => b.score.total_cmp(&a.score),
            (Reason::QueueSpace { .. }, Reason::QueueSpace { .. }) => a.fill.total_cmp(&b.fill),
            (Reason::CoolingDown { until_ms: x }, Reason::CoolingDown { until_ms: y }) => x.cmp(&y),
            _ => Ordering::Equal,
        };
        let by_rtt = match a.reason {
            Reason::CoolingDown { .. } => Ordering::Equal,
            _ => a.rtt.total_cmp(&b.rtt),
        };
        a.reason
            .tier()
            .cmp(&b.reason.tier())
            .then(within)
            .then(by_rtt)
            .then(a.region.cmp(&b.region))
    });

    Decision {
        candidates: rows
            .into_iter()
            .map(|r| Candidate {
                region: r.region,
                reason: r.reason,
            })
            .collect(),
        excluded,
    }
}

fn candidate_regions(d: &Decision) -> Vec<RegionIx> {
    d.candidates.iter().map(|c| c.region).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn candidates_stay_inside_the_boundary(s in arb_scenario()) {
        let d = s.decide();
        for c in &d.candidates {
            prop_assert!(s.destinations.contains(&c.region), "{} outside {:?}", c.region, s.destinations);
        }
        for e in &d.excluded {
            prop_assert!(s.destinations.contains(&e.region));
        }
    }

    #[test]
    fn every_destination_is_accounted_for_exactly_once(s in arb_scenario()) {
        let d = s.decide();
        let set: BTreeSet<RegionIx> = s.destinations.iter().copied().collect();
        let mut seen: Vec<RegionIx> = candidate_regions(&d);
        seen.extend(d.excluded.iter().map(|e| e.region));
        seen.sort_unstable();
        prop_assert_eq!(seen, set.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn decisions_are_deterministic_and_ignore_destination_order(s in arb_scenario()) {
        let d = s.decide();
        prop_assert_eq!(&d, &s.decide());
        let topo = s.topology();
        let shuffled = route(&s.query(&s.shuffled), &s.fleet, &topo, &s.cfg);
        prop_assert_eq!(&d, &shuffled);
        let mut reused = Decision::default();
        route_into(&s.query(&s.shuffled), &s.fleet, &topo, &s.cfg, &mut reused);
        route_into(&s.query(&s.destinations), &s.fleet, &topo, &s.cfg, &mut reused);
        prop_assert_eq!(&d, &reused);
    }

    #[test]
    fn tiers_never_go_backwards(s in arb_scenario()) {
        let d = s.decide();
        for pair in d.candidates.windows(2) {
            prop_assert!(
                pair[0].reason.tier() <= pair[1].reason.tier(),
                "{:?} before {:?}", pair[0], pair[1]
            );
        }
        let source_tier = d.candidates.iter().filter(|c| c.reason.tier() == 0).count();
        prop_assert!(source_tier <= 1);
        for c in &d.candidates {
            if let Reason::SourceHasHeadroom { .. } = c.reason {
                prop_assert_eq!(c.region, s.source);
            }
        }
    }

    #[test]
    fn a_source_with_headroom_goes_first(s in arb_scenario()) {
        let d = s.decide();
        let ix = usize::from(s.source);
        let eligible = s.destinations.contains(&s.source)
            && ix < s.price.len()
            && s.fleet.get(ix).is_some_and(|v| {
                v.cooldown_until_ms <= s.now_ms
                    && s.now_ms.saturating_sub(v.observed_at_ms) <= s.cfg.stale_after_ms
                    && v.load.is_some_and(|l| l.running < l.slots)
            });
        if eligible {
            prop_assert_eq!(d.candidates.first().map(|c| c.region), Some(s.source));
        } else {
            prop_assert!(!d.candidates.iter().any(|c| c.reason.tier() == 0));
        }
    }

    #[test]
    fn cooling_down_comes_last(s in arb_scenario()) {
        let d = s.decide();
        let first_cooling = d.candidates.iter().position(|c| c.reason.tier() == 5);
        if let Some(i) = first_cooling {
            prop_assert!(d.candidates[i..].iter().all(|c| c.reason.tier() == 5));
        }
        for c in &d.candidates {
            let cooling = s.fleet[usize::from(c.region)].cooldown_until_ms > s.now_ms;
            prop_assert_eq!(cooling, c.reason.tier() == 5);
        }
    }

    #[test]
    fn matches_the_rules_as_stated(s in arb_scenario()) {
        prop_assert_eq!(s.decide(), reference(&s));
    }

    #[test]
    fn never_panics_on_anything(
        fleet in prop::collection::vec(
            (any::<bool>(), any::<u64>(), any::<Option<(u32, u32, u32, u32)>>(), any::<u64>()),
            0..12,
        ),
        n in 0usize..12,
        source in any::<RegionIx>(),
        destinations in prop::collection::vec(prop_oneof![0..14u16, any::<u16>()], 0..80),
        scope in select(vec![Scope::InRegion, Scope::Geographic, Scope::Global]),
        now_ms in any::<u64>(),
        cfg in (any::<u64>(), any::<f32>(), any::<f32>()),
    ) {
        let fleet: Vec<RegionView> = fleet
            .into_iter()
            .map(|(reachable, observed_at_ms, load, cooldown_until_ms)| RegionView {
                reachable,
                observed_at_ms,
                load: load.map(|(slots, running, queue_limit, waiting)| Load {
                    slots,
                    running,
                    queue_limit,
                    waiting,
                }),
                cooldown_until_ms,
            })
            .collect();
        let cfg = RouterConfig { stale_after_ms: cfg.0, rtt_weight: cfg.1, price_weight: cfg.2 };
        let q = Query { source, destinations: &destinations, scope, now_ms };
        let d = route(&q, &fleet, &Topology::uniform(n), &cfg);
        let set: BTreeSet<RegionIx> = destinations.iter().copied().collect();
        prop_assert_eq!(d.candidates.len() + d.excluded.len(), set.len());
        prop_assert!(d.candidates.iter().all(|c| set.contains(&c.region)));
    }
}
