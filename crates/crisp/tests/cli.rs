//! The `crisp` command as an operator uses it: checking a config, locking profiles, and
//! seeing a new versioned profile when a geography grows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const DEMO: &str = include_str!("../../../examples/demo.toml");

fn crisp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crisp"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("crisp-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_broken_config_lists_every_problem() {
    let dir = tmpdir("check");
    let cfg = dir.join("crisp.toml");
    let broken = DEMO
        .replacen("country = \"DE\"", "country = \"Germany\"", 1)
        .replacen("lat = 53.3", "lat = 153.3", 1)
        .replacen("region = \"eu-west-3\"", "region = \"eu-west-33\"", 1);
    std::fs::write(&cfg, broken).unwrap();
    let out = crisp(&["check", "--config", s(&cfg)]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("3 problems"), "{t}");
    assert!(
        t.contains("Germany") && t.contains("latitude") && t.contains("eu-west-33"),
        "{t}"
    );
    assert!(t.contains("line "), "{t}");

    std::fs::write(&cfg, DEMO).unwrap();
    let out = crisp(&["check", "--config", s(&cfg)]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn growing_the_eu_issues_a_new_profile_id_and_keeps_the_old_one() {
    let dir = tmpdir("lock");
    let cfg = dir.join("crisp.toml");
    let lock = dir.join("crisp.lock");
    std::fs::write(&cfg, DEMO).unwrap();

    let out = crisp(&["profiles", "lock", "--config", s(&cfg)]);
    assert!(out.status.success(), "{}", text(&out));
    let first = std::fs::read_to_string(&lock).unwrap();
    assert!(first.contains("id = \"eu.amazon.nova-lite-v1:0\""));

    // Milan joins and serves Nova Lite.
    let grown = DEMO.replacen(
        "[[model]]\nid = \"anthropic",
        "[[model.backend]]\nregion = \"eu-south-1\"\nkind = \"simulated\"\n\n[[model]]\nid = \"anthropic",
        1,
    ) + "\n[[region]]\ncode = \"eu-south-1\"\ncity = \"Milan\"\ncountry = \"IT\"\nlat = 45.5\nlon = 9.2\ntags = [\"eu\"]\nclient = \"127.0.0.1:8200\"\npeer = \"127.0.0.1:9200\"\n";
    std::fs::write(&cfg, grown).unwrap();

    let out = crisp(&["profiles", "plan", "--config", s(&cfg)]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("+ issue eu-v2.amazon.nova-lite-v1:0"), "{t}");
    assert!(t.contains("eu.amazon.nova-lite-v1:0 keeps its set"), "{t}");
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        first,
        "plan writes nothing"
    );

    let out = crisp(&["profiles", "lock", "--config", s(&cfg)]);
    assert!(out.status.success(), "{}", text(&out));
    let second = std::fs::read_to_string(&lock).unwrap();
    assert!(second.starts_with(&first[..first.find("\n[[profile]]").unwrap()]));
    assert!(second.contains("id = \"eu-v2.amazon.nova-lite-v1:0\""));

    let out = crisp(&["profiles", "list", "--config", s(&cfg)]);
    let t = text(&out);
    let old = t
        .lines()
        .find(|l| l.starts_with("eu.amazon.nova-lite-v1:0"))
        .unwrap();
    assert!(
        !old.contains("eu-south-1"),
        "the old ID never widens: {old}"
    );
    assert!(
        old.contains("superseded by eu-v2.amazon.nova-lite-v1:0"),
        "{old}"
    );
    let new = t
        .lines()
        .find(|l| l.starts_with("eu-v2.amazon.nova-lite-v1:0"))
        .unwrap();
    assert!(new.contains("eu-south-1"), "{new}");

    let out = crisp(&["profiles", "plan", "--config", s(&cfg)]);
    assert!(text(&out).contains("up to date"), "{}", text(&out));
}

#[test]
fn a_fleet_without_geographic_profiles_still_gets_its_lock() {
    let dir = tmpdir("empty-lock");
    let cfg = dir.join("crisp.toml");
    let lock = dir.join("crisp.lock");
    std::fs::write(
        &cfg,
        r#"version = 1
[deployment]
name = "solo"
[[region]]
code = "eu-west-1"
city = "Dublin"
country = "IE"
lat = 53.3
lon = -6.3
client = "127.0.0.1:8100"
peer = "127.0.0.1:9100"
[[model]]
id = "m"
input_price_per_1k = 0.001
output_price_per_1k = 0.002
[[model.backend]]
region = "eu-west-1"
kind = "simulated"
"#,
    )
    .unwrap();
    let out = crisp(&["profiles", "lock", "--config", s(&cfg)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        lock.exists(),
        "nodes started together must find the lock written, not race to write it: {}",
        text(&out)
    );
    let out = crisp(&["profiles", "lock", "--config", s(&cfg)]);
    assert!(text(&out).contains("up to date"), "{}", text(&out));
}

/// `crisp check` reads what a node would: the access files, the certificates, and
/// addresses that only collide once resolved.
#[test]
fn check_finds_what_a_node_would_trip_over() {
    let dir = tmpdir("check-all");
    let cfg = dir.join("crisp.toml");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    std::fs::copy(
        examples.join("principals.toml"),
        dir.join("principals.toml"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::copy(
        examples.join("policies/teams.cedar"),
        dir.join("policies/teams.cedar"),
    )
    .unwrap();
    let access = "\n[access]\nprincipals = \"principals.toml\"\nkeys = \"keys.toml\"\npolicies = [\"policies/teams.cedar\"]\n";
    // `access` goes before the first table the demo opens after [deployment].
    let with_access =
        |demo: &str| demo.replacen("\n[[geography]]", &format!("{access}\n[[geography]]"), 1);
    std::fs::write(&cfg, with_access(DEMO)).unwrap();
    let deployment = "demo";
    assert!(DEMO.contains(&format!("name = \"{deployment}\"")));
    let certs = dir.join("certs");
    for args in [
        vec![
            "certs",
            "init",
            "--deployment",
            deployment,
            "--dir",
            s(&certs),
        ],
        vec![
            "certs",
            "issue",
            "--deployment",
            deployment,
            "--region",
            "eu-west-1",
            "--dir",
            s(&certs),
        ],
    ] {
        assert!(crisp(&args).status.success());
    }
    let out = crisp(&["check", "--config", s(&cfg), "--region", "eu-west-1"]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("PROBLEM  [access]: cannot read") && t.contains("keys.toml"),
        "{t}"
    );
    assert!(
        crisp(&["keys", "create", "--config", s(&cfg), "--principal", "demo"])
            .status
            .success()
    );
    let out = crisp(&["check", "--config", s(&cfg), "--region", "eu-west-1"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("certificate of eu-west-1: valid"), "{t}");
    assert!(
        t.contains("[access]: principals, keys and 1 policy file load"),
        "{t}"
    );
    // A key left to a principal the principals file no longer defines is worth a note.
    let keys = std::fs::read_to_string(dir.join("keys.toml")).unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        keys.replace("principal = \"demo\"", "principal = \"ghost\""),
    )
    .unwrap();
    let t = text(&crisp(&[
        "check",
        "--config",
        s(&cfg),
        "--region",
        "eu-west-1",
    ]));
    assert!(
        t.contains("belongs to \"ghost\", which") && t.contains("denied everything"),
        "{t}"
    );

    // A broken policy, a region without its certificate, and two regions on one socket
    // written two ways.
    std::fs::write(
        dir.join("policies/teams.cedar"),
        "permit(principal, action, resource",
    )
    .unwrap();
    let eu_west_1_client = DEMO
        .lines()
        .find(|l| l.starts_with("client = \"127.0.0.1:"))
        .unwrap()
        .trim_start_matches("client = \"127.0.0.1:")
        .trim_end_matches('"')
        .to_owned();
    let clash = with_access(DEMO).replacen("client = \"127.0.0.1:", "client = \"localhost:", 1)
        + &format!(
            "\n[[region]]\ncode = \"eu-south-1\"\ncity = \"Milan\"\ncountry = \"IT\"\nlat = 45.5\nlon = 9.2\ntags = [\"eu\"]\nclient = \"127.0.0.1:{eu_west_1_client}\"\npeer = \"127.0.0.1:9200\"\n"
        );
    std::fs::write(&cfg, clash).unwrap();
    let out = crisp(&[
        "check",
        "--config",
        s(&cfg),
        "--region",
        "eu-west-1",
        "--region",
        "us-east-1",
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("3 problems"), "{t}");
    assert!(t.contains("PROBLEM  [access]"), "{t}");
    assert!(t.contains("PROBLEM  certificate of us-east-1"), "{t}");
    assert!(
        t.contains(&format!("same socket 127.0.0.1:{eu_west_1_client}")),
        "{t}"
    );
}

/// A lock file named on the command line must exist: a node does not write one there
/// (in a cluster it is mounted read-only), and `crisp check` says so too.
#[test]
fn a_named_lock_file_that_does_not_exist_is_refused() {
    let dir = tmpdir("named-lock");
    let cfg = dir.join("crisp.toml");
    std::fs::write(&cfg, DEMO).unwrap();
    let lock = dir.join("typo.lock");
    let out = crisp(&[
        "serve",
        "--config",
        s(&cfg),
        "--region",
        "eu-west-1",
        "--lock",
        s(&lock),
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("no such file") && t.contains("crisp profiles lock"),
        "{t}"
    );
    assert!(!lock.exists(), "no lock was written");
    let out = crisp(&["check", "--config", s(&cfg), "--lock", s(&lock)]);
    assert!(!out.status.success());
    assert!(text(&out).contains("PROBLEM  --lock"), "{}", text(&out));
}
