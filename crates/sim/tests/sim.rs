//! The simulator through its public boundary: scenarios in, outcomes out.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use crisp_catalog::parse_config;
use crisp_catalog::profiles::{Lock, Plan, Profiles};
use crisp_sim::scenario::{Arrival, Dist, EventFile, EventKind, ScenarioFile, TrafficFile};
use crisp_sim::workload::Workload;
use crisp_sim::{Outcome, Scenario, Strategy, compare, simulate};
use proptest::prelude::*;
use proptest::strategy::Strategy as _;

const DEMO: &str = include_str!("../../../examples/demo.toml");
const NOVA: &str = "amazon.nova-lite-v1:0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn demo_scenario(file: ScenarioFile) -> Result<Scenario, Vec<String>> {
    let catalog = parse_config(DEMO).expect("the demo configuration is valid");
    let lock = Plan::new(&catalog, &Lock::default()).apply(&Lock::default());
    let profiles = Profiles::build(&catalog, &lock);
    Scenario::from_parts(file, PathBuf::from("demo.toml"), catalog, &profiles)
}

fn file(traffic: Vec<TrafficFile>, events: Vec<EventFile>) -> ScenarioFile {
    ScenarioFile {
        name: "test".into(),
        description: String::new(),
        fleet: PathBuf::from("demo.toml"),
        seed: 5,
        duration_s: 60.0,
        bucket_s: None,
        start_hour_utc: 0.0,
        telemetry: Default::default(),
        engine: Default::default(),
        capacity: Vec::new(),
        traffic,
        events,
    }
}

fn stream(source: &str, profile: &str, rate: f64) -> TrafficFile {
    TrafficFile {
        source: source.into(),
        profile: profile.into(),
        rate_per_s: rate,
        arrival: Arrival::Poisson,
        prompt_tokens: Dist::Lognormal {
            median: 200.0,
            sigma: 1.0,
            min: 1,
            max: 4000,
        },
        output_tokens: Dist::Fixed { value: 40 },
    }
}

fn run(s: &Scenario, strategy: Strategy) -> Outcome {
    simulate(s, strategy, &AtomicU64::new(0))
}

fn fingerprint(o: &Outcome) -> (u64, u64, u64, u64, u64, Vec<u64>, Vec<u64>, u64) {
    (
        o.offered,
        o.served,
        o.capacity_errors,
        o.outage_errors,
        o.cross_region,
        o.flows.clone(),
        o.series.served.clone(),
        o.ttft_us.value_at_quantile(0.99),
    )
}

#[test]
fn same_seed_same_result_different_seed_different_trace() {
    let s = Scenario::load(&root().join("scenarios/friday-spike.toml")).expect("ships valid");
    let mut short = s.clone();
    short.duration_s = 600.0;
    for strategy in [Strategy::Crisp, Strategy::Random, Strategy::Oracle] {
        assert_eq!(
            fingerprint(&run(&short, strategy)),
            fingerprint(&run(&short, strategy)),
            "{strategy:?} is not deterministic"
        );
    }
    // Threads do not change anything either.
    let progress: Vec<AtomicU64> = Strategy::ALL.iter().map(|_| AtomicU64::new(0)).collect();
    let together = compare(&short, &Strategy::ALL, &progress);
    for o in &together {
        assert_eq!(fingerprint(o), fingerprint(&run(&short, o.strategy)));
    }
    let mut other = short.clone();
    other.seed += 1;
    assert_ne!(
        fingerprint(&run(&short, Strategy::Crisp)),
        fingerprint(&run(&other, Strategy::Crisp))
    );
}

#[test]
fn every_strategy_sees_the_same_trace() {
    let s = demo_scenario(file(
        vec![stream("us-east-1", "us.amazon.nova-lite-v1:0", 8.0)],
        vec![],
    ))
    .expect("valid");
    let offered: Vec<u64> = Strategy::ALL.iter().map(|&x| run(&s, x).offered).collect();
    assert!(offered.iter().all(|&o| o == offered[0]), "{offered:?}");
    assert_eq!(offered[0], Workload::new(&s).count() as u64);
}

#[test]
fn arrival_rates_hold_their_mean() {
    let mut bursty = stream("us-east-1", NOVA, 20.0);
    bursty.arrival = Arrival::Bursty {
        burst_factor: 4.0,
        mean_burst_s: 5.0,
        mean_gap_s: 30.0,
    };
    let mut f = file(vec![stream("us-east-2", NOVA, 20.0), bursty], vec![]);
    f.duration_s = 3000.0;
    let s = demo_scenario(f).expect("valid");
    let mut per_stream = [0u64; 2];
    for r in Workload::new(&s) {
        per_stream[usize::from(r.stream)] += 1;
    }
    for (i, n) in per_stream.iter().enumerate() {
        let rate = *n as f64 / 3000.0;
        assert!((rate - 20.0).abs() < 2.0, "stream {i}: {rate} per second");
    }
}

#[test]
fn a_spike_without_cross_region_routing_becomes_capacity_errors() {
    let s = demo_scenario(file(
        vec![stream("us-east-1", "us.amazon.nova-lite-v1:0", 4.0)],
        vec![EventFile {
            kind: EventKind::Spike,
            region: Some("us-east-1".into()),
            at_s: 10.0,
            duration_s: Some(30.0),
            factor: Some(5.0),
            amplitude: None,
            peak_local_hour: None,
        }],
    ))
    .expect("valid");
    let bare = run(&s, Strategy::Bare);
    let crisp = run(&s, Strategy::Crisp);
    assert!(bare.capacity_errors > 20, "bare: {bare:?}");
    assert_eq!(crisp.capacity_errors, 0);
    assert!(crisp.cross_region > 0);
    assert_eq!(bare.cross_region, 0, "a bare call stays at home");
}

#[test]
fn an_outage_loses_what_ran_there_and_the_rest_moves() {
    let s = demo_scenario(file(
        vec![stream("eu-west-1", "eu.amazon.nova-lite-v1:0", 6.0)],
        vec![EventFile {
            kind: EventKind::Outage,
            region: Some("eu-west-1".into()),
            at_s: 20.0,
            duration_s: Some(20.0),
            factor: None,
            amplitude: None,
            peak_local_hour: None,
        }],
    ))
    .expect("valid");
    let crisp = run(&s, Strategy::Crisp);
    let bare = run(&s, Strategy::Bare);
    assert!(crisp.outage_errors > 0);
    assert!(
        bare.capacity_errors > 50,
        "bare had nowhere to go: {bare:?}"
    );
    assert!(
        crisp.served_share() > 0.97,
        "crisp moved the traffic: {crisp:?}"
    );
}

#[test]
fn every_mistake_is_reported_at_once() {
    let mut f = file(
        vec![
            stream("mars-1", NOVA, 1.0),
            stream("us-east-1", "eu.no-such-model", 1.0),
        ],
        vec![EventFile {
            kind: EventKind::Outage,
            region: None,
            at_s: 0.0,
            duration_s: None,
            factor: None,
            amplitude: None,
            peak_local_hour: None,
        }],
    );
    f.telemetry.loss = 2.0;
    let problems = demo_scenario(f).expect_err("invalid");
    let text = problems.join("\n");
    for needle in [
        "traffic[0].source: unknown region \"mars-1\"",
        "traffic[1].profile",
        "event[0]: a Outage event needs a region",
        "telemetry.loss",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn shipped_scenarios_load() {
    for entry in std::fs::read_dir(root().join("scenarios")).expect("scenarios/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

const SOURCES: [&str; 11] = [
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "eu-central-1",
    "eu-west-1",
    "eu-west-3",
    "eu-north-1",
    "eu-west-2",
    "ap-northeast-1",
    "ap-southeast-1",
    "ap-southeast-2",
];
const PROFILES: [&str; 5] = [
    "us.amazon.nova-lite-v1:0",
    "eu.amazon.nova-lite-v1:0",
    "apac.amazon.nova-lite-v1:0",
    "global.amazon.nova-lite-v1:0",
    "amazon.nova-lite-v1:0",
];

fn arb_event() -> impl proptest::strategy::Strategy<Value = EventFile> {
    (
        0..3usize,
        0..SOURCES.len(),
        0.0..30.0f64,
        1.0..30.0f64,
        0.0..1.0f64,
    )
        .prop_map(|(kind, region, at, dur, f)| EventFile {
            kind: [EventKind::Spike, EventKind::Outage, EventKind::Capacity][kind],
            region: Some(SOURCES[region].into()),
            at_s: at,
            duration_s: Some(dur),
            factor: Some(if kind == 0 { 1.0 + 9.0 * f } else { f }),
            amplitude: None,
            peak_local_hour: None,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Whatever the traffic and whatever happens to the fleet, no strategy sends a request
    /// outside its boundary, and every request ends exactly once.
    #[test]
    fn no_strategy_ever_crosses_a_boundary(
        streams in proptest::collection::vec((0..SOURCES.len(), 0..PROFILES.len(), 0.5..12.0f64), 1..6),
        events in proptest::collection::vec(arb_event(), 0..4),
        loss in 0.0..0.5f64,
        seed in any::<u64>(),
    ) {
        let traffic: Vec<TrafficFile> = streams
            .iter()
            .map(|&(s, p, rate)| stream(SOURCES[s], PROFILES[p], rate))
            .collect();
        let mut f = file(traffic, events);
        f.seed = seed;
        f.duration_s = 40.0;
        f.telemetry.loss = loss;
        f.telemetry.jitter_ms = 200.0;
        let s = demo_scenario(f).map_err(|p| TestCaseError::fail(p.join("; ")))?;
        for strategy in Strategy::ALL {
            let o = run(&s, strategy);
            prop_assert_eq!(o.violations, 0, "{:?}", strategy);
            prop_assert_eq!(o.offered, o.served + o.capacity_errors + o.outage_errors, "{:?}", strategy);
            // Where each source's requests ran is inside the union of its streams'
            // boundaries.
            let n = s.catalog.regions.len();
            for (src, row) in o.flows.chunks(n).enumerate() {
                for (dst, &count) in row.iter().enumerate() {
                    if count == 0 {
                        continue;
                    }
                    let allowed = s.traffic.iter().any(|t| {
                        usize::from(t.source) == src
                            && t.target.destinations.iter().any(|&d| usize::from(d) == dst)
                    });
                    prop_assert!(allowed, "{:?} served {} from {} in {}", strategy, count, src, dst);
                }
            }
        }
    }
}
