#![allow(clippy::unwrap_used, clippy::expect_used)]

use crisp_catalog::parse_config;
use crisp_catalog::profiles::{Change, Lock, Plan, Profiles, ResolveError, Scope};

const DEMO: &str = include_str!("../../../examples/demo.toml");
const NOVA: &str = "amazon.nova-lite-v1:0";

fn codes(c: &crisp_catalog::Catalog, ixs: &[u16]) -> Vec<String> {
    let mut v: Vec<String> = ixs.iter().map(|&i| c.region_code(i).to_owned()).collect();
    v.sort();
    v
}

/// The demo catalog with one more EU region serving Nova Lite.
fn with_milan() -> String {
    DEMO.to_owned()
        + r#"
[[region]]
code = "eu-south-1"
country = "IT"
lat = 45.5
lon = 9.2
tags = ["eu"]
client = "127.0.0.1:8200"
peer = "127.0.0.1:9200"
"#
}

fn lock_for(src: &str, lock: &Lock) -> (crisp_catalog::Catalog, Plan) {
    let c = parse_config(src).unwrap();
    let plan = Plan::new(&c, lock);
    (c, plan)
}

#[test]
fn first_lock_issues_one_profile_per_geography_and_model() {
    let (c, plan) = lock_for(DEMO, &Lock::default());
    let lock = plan.apply(&Lock::default());
    let ids: Vec<&str> = lock.profiles.iter().map(|p| p.id.as_str()).collect();
    assert!(ids.contains(&"eu.amazon.nova-lite-v1:0"));
    assert!(ids.contains(&"us.amazon.nova-lite-v1:0"));
    assert!(ids.contains(&"apac.amazon.nova-lite-v1:0"));
    assert!(ids.contains(&"eu.anthropic.claude-sonnet-4-5-20250929-v1:0"));
    let profiles = Profiles::build(&c, &lock);
    let eu = profiles.get("eu.amazon.nova-lite-v1:0").unwrap();
    assert_eq!(
        codes(&c, &eu.destinations),
        ["eu-central-1", "eu-north-1", "eu-west-1", "eu-west-3"]
    );
    let global = profiles.get("global.amazon.nova-lite-v1:0").unwrap();
    assert_eq!(global.destinations.len(), 11);
    // Round trip through the file format.
    assert_eq!(Lock::parse(&lock.to_toml()).unwrap(), lock);
    // A second plan over the same fleet changes nothing.
    assert!(!Plan::new(&c, &lock).has_issues());
}

#[test]
fn adding_an_eu_region_issues_a_new_version_and_never_widens_the_old_id() {
    let (_, plan) = lock_for(DEMO, &Lock::default());
    let lock1 = plan.apply(&Lock::default());

    // Milan joins the fleet and serves Nova Lite.
    let src = with_milan()
        + "\n[[model]]\nid = \"x.placeholder-v1:0\"\ninput_price_per_1k = 0.0\noutput_price_per_1k = 0.0\n[[model.backend]]\nregion = \"eu-west-1\"\nkind = \"simulated\"\n";
    let src = src.replacen(
        "[[model]]\nid = \"anthropic",
        "[[model.backend]]\nregion = \"eu-south-1\"\nkind = \"simulated\"\n\n[[model]]\nid = \"anthropic",
        1,
    );
    let (c, plan) = lock_for(&src, &lock1);
    assert!(plan.has_issues());
    let issued: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|ch| matches!(ch, Change::Issue { profile, .. } if profile.model == NOVA))
        .collect();
    assert_eq!(issued.len(), 1, "{:?}", plan.changes);
    let Change::Issue {
        profile,
        supersedes,
        added,
        ..
    } = issued[0]
    else {
        unreachable!()
    };
    assert_eq!(profile.id, "eu-v2.amazon.nova-lite-v1:0");
    assert_eq!(supersedes.as_deref(), Some("eu.amazon.nova-lite-v1:0"));
    assert_eq!(added, &["eu-south-1"]);

    let lock2 = plan.apply(&lock1);
    let profiles = Profiles::build(&c, &lock2);
    let old = profiles.get("eu.amazon.nova-lite-v1:0").unwrap();
    assert_eq!(
        codes(&c, &old.destinations),
        ["eu-central-1", "eu-north-1", "eu-west-1", "eu-west-3"],
        "the old ID keeps its frozen set"
    );
    assert_eq!(
        old.superseded_by.as_deref(),
        Some("eu-v2.amazon.nova-lite-v1:0")
    );
    let new = profiles.get("eu-v2.amazon.nova-lite-v1:0").unwrap();
    assert_eq!(new.destinations.len(), 5);
    // Global profiles follow the fleet without a lock change.
    assert_eq!(
        profiles
            .get("global.amazon.nova-lite-v1:0")
            .unwrap()
            .destinations
            .len(),
        12
    );
    // Without applying the plan, the old lock still yields only the old set.
    let unchanged = Profiles::build(&c, &lock1);
    assert!(unchanged.get("eu-v2.amazon.nova-lite-v1:0").is_none());
    assert_eq!(
        unchanged
            .get("eu.amazon.nova-lite-v1:0")
            .unwrap()
            .destinations
            .len(),
        4
    );
}

#[test]
fn a_region_leaving_narrows_without_a_new_id() {
    let (_, plan) = lock_for(DEMO, &Lock::default());
    let lock = plan.apply(&Lock::default());
    // eu-north-1 stops serving Nova Lite.
    let src = DEMO.replacen(
        "[[model.backend]]\nregion = \"eu-north-1\"",
        "[[model.backend]]\nregion = \"eu-west-2\"\nkind = \"simulated\"\n\n[[model.backend]]\nregion = \"eu-north-1-gone\"",
        1,
    );
    // That edit references an undefined region, which the config must refuse.
    assert!(parse_config(&src).is_err());
    let src = DEMO.replacen(
        "\n[[model.backend]]\nregion = \"eu-north-1\"\nkind = \"simulated\"\nslots = 8\nqueue_limit = 8\ndecode_tokens_per_s = 50\nttft_ms = 120\nmax_tokens = 48\n",
        "\n",
        1,
    );
    let (_, plan) = lock_for(&src, &lock);
    assert!(!plan.has_issues(), "{:?}", plan.changes);
    assert!(plan.changes.iter().any(|c| matches!(c, Change::Narrowed { id, gone } if id == "eu.amazon.nova-lite-v1:0" && gone == &["eu-north-1"])));
}

#[test]
fn resolution_covers_profiles_bare_models_and_arns() {
    let (c, plan) = lock_for(DEMO, &Lock::default());
    let lock = plan.apply(&Lock::default());
    let profiles = Profiles::build(&c, &lock);
    let us_east_1 = c.region_ix("us-east-1").unwrap();
    let eu_west_2 = c.region_ix("eu-west-2").unwrap();

    let t = profiles
        .resolve(&c, "eu.amazon.nova-lite-v1:0", us_east_1)
        .unwrap();
    assert_eq!(t.scope, Scope::Geographic);
    assert!(
        !t.destinations().contains(&us_east_1),
        "an EU profile called from the US stays in the EU"
    );

    let t = profiles.resolve(&c, NOVA, us_east_1).unwrap();
    assert_eq!(t.scope, Scope::InRegion);
    assert_eq!(t.destinations(), &[us_east_1]);

    let arn = "arn:aws:bedrock:us-east-1:000000000000:inference-profile/us.amazon.nova-lite-v1:0";
    assert_eq!(
        profiles.resolve(&c, arn, us_east_1).unwrap().id(),
        "us.amazon.nova-lite-v1:0"
    );
    assert!(matches!(
        profiles.resolve(&c, &arn.replace("000000000000", "111111111111"), us_east_1),
        Err(ResolveError::ForeignAccount { .. })
    ));
    assert!(matches!(
        profiles.resolve(&c, arn, eu_west_2),
        Err(ResolveError::ForeignRegion { .. })
    ));

    // Claude is not served in London: say which profiles are.
    let err = profiles
        .resolve(&c, "anthropic.claude-sonnet-4-5-20250929-v1:0", eu_west_2)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("eu-west-2")
            && msg.contains("eu.anthropic.claude-sonnet-4-5-20250929-v1:0")
            && msg.contains("global.anthropic"),
        "{msg}"
    );

    let err = profiles
        .resolve(&c, "eu.amazon.nova-lite-v1", us_east_1)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("did you mean \"eu.amazon.nova-lite-v1:0\""),
        "{err}"
    );
    assert!(matches!(
        profiles.resolve(&c, "bad id!", us_east_1),
        Err(ResolveError::Malformed { .. })
    ));
}
