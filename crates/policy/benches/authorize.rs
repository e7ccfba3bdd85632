//! Authorization per request, with 100 team policies and the EU guardrails, for a
//! geographic profile with 4 destinations (5 Cedar evaluations, guardrails and team each).
#![allow(clippy::unwrap_used)]

use crisp_policy::{Action, PolicyEngine, Principal, ProfileFacts, RegionFacts};
use criterion::{Criterion, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let regions: Vec<RegionFacts> = (0..30)
        .map(|i| RegionFacts {
            code: format!("r{i}"),
            country: if i < 10 { "DE".into() } else { "US".into() },
            jurisdictions: if i < 10 { vec!["eu".into()] } else { vec![] },
        })
        .collect();
    let profiles = vec![ProfileFacts {
        id: "eu.m".into(),
        scope: "geographic".into(),
        geography: "eu".into(),
        model: "m".into(),
        destinations: (0..4).map(|i| format!("r{i}")).collect(),
    }];
    let principals: Vec<Principal> = (0..100)
        .map(|i| Principal {
            id: format!("p{i}"),
            account: "000000000000".into(),
            team: format!("team{}", i % 10),
            tags: if i % 2 == 0 {
                vec!["residency=eu".into()]
            } else {
                vec![]
            },
        })
        .collect();
    let mut team = String::new();
    for i in 0..100 {
        team.push_str(&format!(
            "@id(\"t{i}\") permit (principal in Crisp::Team::\"team{}\", action in [Crisp::Action::\"InvokeModel\"], resource) when {{ context.sourceRegion != \"nowhere-{i}\" }};\n",
            i % 10
        ));
    }
    let guard = include_str!("../../../examples/policies/guardrails.cedar");
    let engine = PolicyEngine::new(
        &[("team.cedar".into(), team)],
        &[("guardrails.cedar".into(), guard.into())],
        &principals,
        &regions,
        &profiles,
    )
    .unwrap();
    assert!(
        engine
            .authorize("p2", Action::InvokeModel, &profiles[0], "r0")
            .is_allowed()
    );
    c.bench_function("authorize/100 policies, 4 destinations, evaluated", |b| {
        b.iter(|| engine.authorize_uncached("p2", Action::InvokeModel, &profiles[0], "r0", None))
    });
    c.bench_function(
        "authorize/100 policies, 4 destinations, per request (cached)",
        |b| b.iter(|| engine.authorize("p2", Action::InvokeModel, &profiles[0], "r0")),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
