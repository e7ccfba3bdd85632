//! `route` and `route_into` on a 30-region fleet: a geographic profile of 8 European
//! regions and a global profile over all 30.

use std::hint::black_box;

use crisp_routing::{
    Decision, Load, Query, RegionIx, RegionView, RouterConfig, Scope, Topology, route, route_into,
};
use criterion::{Criterion, criterion_group, criterion_main};

/// (name, latitude, longitude, relative price)
const REGIONS: [(&str, f64, f64, f32); 30] = [
    ("us-east-1", 38.9, -77.4, 1.0),
    ("us-east-2", 40.0, -83.0, 1.0),
    ("us-west-1", 37.4, -121.9, 1.1),
    ("us-west-2", 45.6, -121.2, 1.0),
    ("ca-central-1", 45.5, -73.6, 1.05),
    ("ca-west-1", 51.0, -114.1, 1.1),
    ("mx-central-1", 20.6, -100.4, 1.15),
    ("sa-east-1", -23.5, -46.6, 1.4),
    ("eu-west-1", 53.3, -6.3, 1.05),
    ("eu-west-2", 51.5, -0.1, 1.1),
    ("eu-west-3", 48.9, 2.35, 1.1),
    ("eu-central-1", 50.1, 8.7, 1.1),
    ("eu-central-2", 47.4, 8.5, 1.2),
    ("eu-north-1", 59.3, 18.1, 1.0),
    ("eu-south-1", 45.5, 9.2, 1.15),
    ("eu-south-2", 41.6, -0.9, 1.1),
    ("il-central-1", 32.1, 34.8, 1.25),
    ("me-south-1", 26.1, 50.6, 1.25),
    ("me-central-1", 24.5, 54.4, 1.25),
    ("af-south-1", -33.9, 18.4, 1.3),
    ("ap-south-1", 19.1, 72.9, 0.95),
    ("ap-south-2", 17.4, 78.5, 0.95),
    ("ap-southeast-1", 1.35, 103.8, 1.1),
    ("ap-southeast-2", -33.9, 151.2, 1.2),
    ("ap-southeast-3", -6.2, 106.8, 1.1),
    ("ap-southeast-4", -37.8, 145.0, 1.2),
    ("ap-east-1", 22.3, 114.2, 1.2),
    ("ap-northeast-1", 35.7, 139.7, 1.15),
    ("ap-northeast-2", 37.6, 127.0, 1.1),
    ("ap-northeast-3", 34.7, 135.5, 1.15),
];

const NOW: u64 = 5_000_000;

fn topology() -> Topology {
    let coords: Vec<(f64, f64)> = REGIONS.iter().map(|r| (r.1, r.2)).collect();
    let price = REGIONS.iter().map(|r| r.3).collect();
    match Topology::from_coordinates(&coords, 1.4, price) {
        Ok(t) => t,
        Err(e) => panic!("bench topology: {e}"),
    }
}

/// A mix of idle, busy, queueing, full, stale, cooling, unreachable and non-serving regions.
fn fleet() -> Vec<RegionView> {
    (0..REGIONS.len())
        .map(|i| {
            let slots = 8 + (i as u32 % 5) * 4;
            let running = match i % 6 {
                0 | 1 => slots / 4 + i as u32 % 3,
                2 | 3 => slots - 1,
                _ => slots,
            };
            RegionView {
                reachable: i != 17,
                observed_at_ms: if i % 7 == 3 { NOW - 4_000 } else { NOW - 200 },
                load: (i != 21).then_some(Load {
                    slots,
                    running,
                    queue_limit: 16,
                    waiting: if i % 6 == 5 { 16 } else { i as u32 % 9 },
                }),
                cooldown_until_ms: if i % 11 == 4 { NOW + 2_000 } else { 0 },
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let topo = topology();
    let fleet = fleet();
    let cfg = RouterConfig::default();
    let index = |name: &str| -> RegionIx {
        REGIONS
            .iter()
            .position(|r| r.0 == name)
            .and_then(|i| RegionIx::try_from(i).ok())
            .unwrap_or(RegionIx::MAX)
    };
    let eu: Vec<RegionIx> = [
        "eu-west-1",
        "eu-west-2",
        "eu-west-3",
        "eu-central-1",
        "eu-central-2",
        "eu-north-1",
        "eu-south-1",
        "eu-south-2",
    ]
    .into_iter()
    .map(index)
    .collect();
    let all: Vec<RegionIx> = (0..REGIONS.len() as RegionIx).collect();

    let geographic = Query {
        source: index("eu-west-3"),
        destinations: &eu,
        scope: Scope::Geographic,
        now_ms: NOW,
    };
    let global = Query {
        source: index("us-east-1"),
        destinations: &all,
        scope: Scope::Global,
        now_ms: NOW,
    };

    for (name, q) in [("geographic_8", &geographic), ("global_30", &global)] {
        c.bench_function(&format!("route/{name}"), |b| {
            b.iter(|| route(black_box(q), black_box(&fleet), &topo, &cfg))
        });
        let mut out = Decision::default();
        c.bench_function(&format!("route_into/{name}"), |b| {
            b.iter(|| {
                route_into(black_box(q), black_box(&fleet), &topo, &cfg, &mut out);
                black_box(&out);
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
