#![allow(clippy::unwrap_used, clippy::expect_used)]

use crisp_policy::{
    Action, Application, DenyReason, PolicyEngine, Principal, ProfileFacts, RegionFacts, Verdict,
};
use proptest::prelude::*;

const TEAMS: &str = include_str!("../../../examples/policies/teams.cedar");
const GUARDRAILS: &str = include_str!("../../../examples/policies/guardrails.cedar");
const NO_GLOBAL: &str = include_str!("../../../examples/policies/no-global.cedar");
const TEAM_BILLING: &str = include_str!("../../../examples/policies/team-billing.cedar");

fn region(code: &str, country: &str, eu: bool) -> RegionFacts {
    RegionFacts {
        code: code.into(),
        country: country.into(),
        jurisdictions: if eu { vec!["eu".into()] } else { vec![] },
    }
}

fn regions() -> Vec<RegionFacts> {
    vec![
        region("eu-west-1", "IE", true),
        region("eu-central-1", "DE", true),
        region("eu-west-2", "GB", false),
        region("us-east-1", "US", false),
    ]
}

fn profile(id: &str, scope: &str, dests: &[&str]) -> ProfileFacts {
    ProfileFacts {
        id: id.into(),
        scope: scope.into(),
        geography: if scope == "geographic" {
            id.split('.').next().unwrap().into()
        } else {
            String::new()
        },
        model: "m".into(),
        destinations: dests.iter().map(|d| (*d).to_owned()).collect(),
    }
}

fn profiles() -> Vec<ProfileFacts> {
    vec![
        profile("eu.m", "geographic", &["eu-central-1", "eu-west-1"]),
        profile(
            "europe.m",
            "geographic",
            &["eu-central-1", "eu-west-1", "eu-west-2"],
        ),
        profile(
            "global.m",
            "global",
            &["eu-central-1", "eu-west-1", "eu-west-2", "us-east-1"],
        ),
        profile("m", "model", &["us-east-1"]),
    ]
}

fn principals() -> Vec<Principal> {
    let p = |id: &str, team: &str, tags: &[&str]| Principal {
        id: id.into(),
        account: "000000000000".into(),
        team: team.into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    };
    vec![
        p("ops", "platform", &[]),
        p("eu-bot", "search", &["residency=eu"]),
        p("guest", "visitors", &[]),
    ]
}

fn engine(team: &[&str], guard: &[&str]) -> PolicyEngine {
    let files = |v: &[&str], n: &str| {
        v.iter()
            .enumerate()
            .map(|(i, s)| (format!("{n}{i}.cedar"), (*s).to_owned()))
            .collect::<Vec<_>>()
    };
    PolicyEngine::new(
        &files(team, "team"),
        &files(guard, "guard"),
        &principals(),
        &regions(),
        &profiles(),
    )
    .unwrap()
}

fn ask(e: &PolicyEngine, who: &str, profile_id: &str) -> Verdict {
    let p = profiles().into_iter().find(|p| p.id == profile_id).unwrap();
    e.authorize(who, Action::InvokeModel, &p, "us-east-1")
}

#[test]
fn allow_deny_and_no_permit() {
    let e = engine(&[TEAMS], &[GUARDRAILS]);
    assert!(ask(&e, "ops", "global.m").is_allowed());
    assert_eq!(
        ask(&e, "guest", "eu.m"),
        Verdict::Deny(DenyReason::NoPermit)
    );
    assert_eq!(
        ask(&e, "nobody", "eu.m"),
        Verdict::Deny(DenyReason::UnknownPrincipal)
    );
    match ask(&e, "ops", "eu.m") {
        Verdict::Allow { policies } => {
            assert!(policies.contains(&"platform-invokes-anything".to_owned()))
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn the_guardrail_beats_team_policies_and_any_forbidden_destination_denies_all() {
    let e = engine(&[TEAMS], &[GUARDRAILS]);
    // The search team's permit would allow it; the EU guardrail does not.
    assert!(ask(&e, "eu-bot", "eu.m").is_allowed());
    match ask(&e, "eu-bot", "global.m") {
        Verdict::Deny(DenyReason::Guardrail { policies }) => {
            assert_eq!(policies, ["residency-eu-profiles-only"])
        }
        v => panic!("{v:?}"),
    }
    // Without the profile-level guardrail, the per-destination one still denies the whole
    // request because London is not in the EU, and says which region.
    let per_region = GUARDRAILS.split("// The same").next().unwrap();
    let e = engine(&[TEAMS], &[per_region]);
    match ask(&e, "eu-bot", "europe.m") {
        Verdict::Deny(DenyReason::Destination { region, inner }) => {
            assert_eq!(region, "eu-west-2");
            assert!(matches!(*inner, DenyReason::Guardrail { .. }));
        }
        v => panic!("{v:?}"),
    }
}

#[test]
fn forbid_wins_over_permit_in_team_policies() {
    let forbid = r#"@id("no-us") forbid (principal, action, resource is Crisp::Model) when { context has region && context.region.country == "US" };"#;
    let e = engine(&[TEAMS, forbid], &[]);
    match ask(&e, "ops", "m") {
        Verdict::Deny(DenyReason::Destination { region, inner }) => {
            assert_eq!(region, "us-east-1");
            assert_eq!(
                *inner,
                DenyReason::Forbidden {
                    policies: vec!["no-us".into()]
                }
            );
        }
        v => panic!("{v:?}"),
    }
    // And the organisation may forbid global profiles for everyone.
    let e = engine(&[TEAMS], &[GUARDRAILS, NO_GLOBAL]);
    assert!(matches!(
        ask(&e, "ops", "global.m"),
        Verdict::Deny(DenyReason::Guardrail { .. })
    ));
}

#[test]
fn syntax_and_schema_errors_are_all_reported_with_their_place() {
    let bad_syntax = "permit (principal, action, resource)\nwhen { principal.team == };";
    let bad_schema =
        "permit (principal, action, resource is Crisp::Model)\nwhen { principal.shoeSize > 3 };";
    // Named with @id: still located in its file.
    let named = "\n@id(\"ops\")\npermit (principal in Crisp::Tem::\"ops\", action, resource);";
    let guard_permit = "permit (principal, action, resource);";
    let errs = PolicyEngine::new(
        &[
            ("a.cedar".into(), bad_syntax.into()),
            ("b.cedar".into(), bad_schema.into()),
            ("c.cedar".into(), named.into()),
        ],
        &[("g.cedar".into(), guard_permit.into())],
        &principals(),
        &regions(),
        &profiles(),
    )
    .unwrap_err();
    let text = errs.to_string();
    assert!(text.contains("a.cedar:2:"), "{text}");
    assert!(
        text.contains("b.cedar") && text.contains("shoeSize"),
        "{text}"
    );
    assert!(text.contains("guardrails may only forbid"), "{text}");
    assert!(
        text.contains("c.cedar:3:") && text.contains("Crisp::Tem"),
        "{text}"
    );
}

proptest! {
    /// Whatever the profiles, no request allowed for an EU-resident principal under the
    /// residency guardrail has a destination outside the EU.
    #[test]
    fn eu_principals_never_leave_the_eu(
        dests in proptest::collection::vec(proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..=4), 1..6),
        scopes in proptest::collection::vec(0usize..3, 6),
    ) {
        let all = regions();
        let scope_names = ["model", "geographic", "global"];
        let profiles: Vec<ProfileFacts> = dests.iter().enumerate().map(|(i, d)| ProfileFacts {
            id: format!("p{i}"),
            scope: scope_names[scopes[i]].into(),
            geography: String::new(),
            model: "m".into(),
            destinations: d.iter().map(|&r| all[r].code.clone()).collect(),
        }).collect();
        let per_region = GUARDRAILS.split("// The same").next().unwrap();
        let e = PolicyEngine::new(
            &[("t.cedar".into(), TEAMS.into())],
            &[("g.cedar".into(), per_region.into())],
            &principals(), &all, &profiles,
        ).unwrap();
        for p in &profiles {
            if e.authorize("eu-bot", Action::InvokeModel, p, "us-east-1").is_allowed() {
                for d in &p.destinations {
                    let r = all.iter().find(|r| &r.code == d).unwrap();
                    prop_assert!(r.jurisdictions.contains(&"eu".to_owned()), "{} allowed via {d}", p.id);
                }
            }
        }
    }
}

/// Policies see the application profile a call goes through: a team's billing tag can be
/// kept to that team, for calls, creation and deletion alike.
#[test]
fn application_profiles_are_visible_to_policies() {
    let e = engine(&[TEAMS], &[GUARDRAILS, TEAM_BILLING]);
    let eu = profiles().into_iter().find(|p| p.id == "eu.m").unwrap();
    let app = |id: &str, tags: &[&str]| Application {
        id: id.into(),
        name: "search-eu".into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    };
    let search = app("a1", &["team=search"]);
    let invoke = |who: &str, a: Option<&Application>| {
        e.authorize_through(who, Action::InvokeModel, &eu, "us-east-1", a)
    };
    // The search team's own profile; another team may use the same profile directly,
    // not through search's.
    assert!(invoke("eu-bot", Some(&search)).is_allowed());
    assert!(invoke("ops", None).is_allowed());
    match invoke("ops", Some(&search)) {
        Verdict::Deny(DenyReason::Guardrail { policies }) => {
            assert_eq!(policies, ["search-bills-only-search"]);
        }
        v => panic!("{v:?}"),
    }
    // Cached per profile: another application profile is decided on its own tags.
    assert!(invoke("ops", Some(&app("a2", &["team=platform"]))).is_allowed());
    assert!(!invoke("ops", Some(&search)).is_allowed());
    // Creation names a paying team, and only the platform team creates.
    let create = |who: &str, tags: &[&str]| {
        e.authorize_through(
            who,
            Action::CreateInferenceProfile,
            &eu,
            "us-east-1",
            Some(&app("", tags)),
        )
    };
    assert!(create("ops", &["team=platform"]).is_allowed());
    assert!(!create("ops", &["cost-center=7"]).is_allowed());
    assert!(!create("ops", &["team=search"]).is_allowed());
    assert!(!create("eu-bot", &["team=search"]).is_allowed());
}
