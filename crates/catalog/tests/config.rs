#![allow(clippy::unwrap_used, clippy::expect_used)]

use crisp_catalog::parse_config;

const DEMO: &str = include_str!("../../../examples/demo.toml");

#[test]
fn the_demo_config_is_valid() {
    let c = parse_config(DEMO).unwrap();
    assert_eq!(c.regions.len(), 11);
    let london = c.region(c.region_ix("eu-west-2").unwrap()).unwrap();
    assert!(
        !c.geography("eu").unwrap().contains(london),
        "London is not in the EU"
    );
    let nova = c.model("amazon.nova-lite-v1:0").unwrap();
    assert_eq!(nova.backends.len(), 11);
    assert!(nova.global_price.input_per_1k < nova.price.input_per_1k);
}

#[test]
fn every_problem_is_reported_at_once_with_its_line() {
    let src = r#"
version = 1
[deployment]
name = "Bad Name"
account = "123"

[[geography]]
name = "eu"

[[region]]
code = "eu-west-1"
country = "ireland"
lat = 120.0
lon = -6.3
client = "127.0.0.1:8080"
peer = "127.0.0.1:8080"

[[model]]
id = "m1"
input_price_per_1k = -1.0
output_price_per_1k = 0.1

[[model.backend]]
region = "eu-west-9"
kind = "simulated"

[[model.backend]]
region = "eu-west-1"
kind = "gpu"
"#;
    let errs = parse_config(src).unwrap_err();
    let text = errs.to_string();
    let expected = [
        "deployment name",
        "12 digits",
        "geography eu has no rule",
        "ISO 3166",
        "latitude",
        "already used by region eu-west-1",
        "input_price_per_1k",
        "\"eu-west-9\" is not defined",
        "unknown backend kind \"gpu\"; known kinds: simulated, openai (any OpenAI-compatible server: vLLM",
    ];
    for e in expected {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    assert_eq!(errs.0.len(), expected.len(), "{text}");
    // Positions point at the offending value.
    let lat = errs
        .0
        .iter()
        .find(|e| e.message.contains("latitude"))
        .unwrap();
    assert_eq!(lat.line, Some(13));
    assert_eq!(lat.column, Some(7));
}

#[test]
fn unknown_fields_and_syntax_errors_name_their_place() {
    let src = "version = 1\n[deployment]\nname = \"d\"\ncolour = \"blue\"\n";
    let errs = parse_config(src).unwrap_err();
    assert_eq!(errs.0.len(), 1);
    assert!(errs.0[0].message.contains("colour"), "{errs}");
    assert_eq!(errs.0[0].line, Some(4));

    let errs = parse_config("version = \n").unwrap_err();
    assert_eq!(errs.0[0].line, Some(1), "{errs}");
}

#[test]
fn type_errors_in_several_sections_are_all_reported() {
    // Two regions and the routing section each with a value of the wrong type.
    let src = DEMO
        .replacen("lat = 38.9", "lat = \"38.9\"", 1)
        .replacen("lon = 8.7", "lon = true", 1)
        .replacen("max_attempts = 4 ", "max_attempts = \"three\" ", 1)
        // and a second mistake in the region that has one already.
        .replacen("lat = 50.1", "lat = [50.1]", 1);
    let errs = parse_config(&src).unwrap_err();
    assert_eq!(errs.0.len(), 4, "{errs}");
    let line_of = |needle: &str| src.lines().position(|l| l == needle).unwrap() + 1;
    for (line, what) in [
        (12, "string \"three\""),
        (line_of("lat = \"38.9\""), "string \"38.9\""),
        (line_of("lon = true"), "boolean `true`"),
        (line_of("lat = [50.1]"), "sequence"),
    ] {
        assert!(
            errs.0
                .iter()
                .any(|e| e.line == Some(line) && e.message.contains(what)),
            "line {line} {what}: {errs}"
        );
    }
}

#[test]
fn a_missing_field_is_reported_beside_a_wrong_one_but_not_for_a_wrong_one() {
    // A required field of the wrong type is one mistake, not also a missing field.
    let wrong = DEMO.replacen("lat = 50.1", "lat = \"50.1\"", 1);
    let errs = parse_config(&wrong).unwrap_err().to_string();
    assert!(errs.contains("string \"50.1\""), "{errs}");
    assert!(!errs.contains("missing field `lat`"), "{errs}");
    // A field missing from the same region is another.
    let also = wrong.replacen("country = \"DE\"\n", "", 1);
    let errs = parse_config(&also).unwrap_err();
    assert_eq!(errs.0.len(), 2, "{errs}");
    let text = errs.to_string();
    assert!(text.contains("missing field `country`"), "{text}");
    assert!(text.contains("string \"50.1\""), "{text}");
}

#[test]
fn a_newer_config_version_is_refused() {
    let src = DEMO.replacen("version = 1", "version = 7", 1);
    let errs = parse_config(&src).unwrap_err();
    assert!(errs.to_string().contains("unsupported config version 7"));
}

#[test]
fn audit_durability_is_fsync_unless_write_is_asked_for() {
    use crisp_catalog::AuditDurability;
    // A table after the demo's last one.
    let at_end = |audit: &str| format!("{DEMO}\n{audit}\n");
    let c = parse_config(DEMO).unwrap();
    assert_eq!(c.audit.durability, AuditDurability::Fsync);
    let c = parse_config(&at_end("[audit]\ndurability = \"write\"")).unwrap();
    assert_eq!(
        c.audit.durability,
        AuditDurability::Write {
            flush_within_ms: 100
        }
    );
    let c = parse_config(&at_end(
        "[audit]\ndurability = \"write\"\nflush_within_ms = 20",
    ))
    .unwrap();
    assert_eq!(
        c.audit.durability,
        AuditDurability::Write {
            flush_within_ms: 20
        }
    );
    let e = parse_config(&at_end("[audit]\ndurability = \"lazy\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("audit.durability \"lazy\" must be \"fsync\""),
        "{e}"
    );
    let e = parse_config(&at_end("[audit]\nflush_within_ms = 20"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("only with durability = \"write\""), "{e}");
}

#[test]
fn a_private_ca_is_for_https_backends_and_resolves_next_to_the_configuration() {
    let with_backend = |backend: &str| {
        format!(
            "version = 1\n[deployment]\nname = \"d\"\n[[region]]\ncode = \"eu-west-1\"\ncountry = \"IE\"\nlat = 53.3\nlon = -6.3\nclient = \"127.0.0.1:8080\"\npeer = \"127.0.0.1:9080\"\n[[model]]\nid = \"m\"\ninput_price_per_1k = 0.1\noutput_price_per_1k = 0.1\n[[model.backend]]\nregion = \"eu-west-1\"\n{backend}"
        )
    };
    let mut c = parse_config(&with_backend(
        "kind = \"openai\"\nbase_url = \"https://10.0.0.5:8443/v1\"\nca_file = \"pki/ca.pem\"\n",
    ))
    .unwrap();
    c.resolve_files(std::path::Path::new("/etc/crisp"));
    let model = c.model("m").unwrap();
    let Some(crisp_catalog::BackendSpec::OpenAi(replicas)) = model.backends.first().map(|b| &b.1)
    else {
        panic!("an openai backend")
    };
    assert_eq!(
        replicas[0].ca_file.as_deref(),
        Some("/etc/crisp/pki/ca.pem")
    );

    let errs = parse_config(&with_backend(
        "kind = \"openai\"\nbase_url = \"http://10.0.0.5:8000/v1\"\nca_file = \"ca.pem\"\n",
    ))
    .unwrap_err();
    assert!(
        errs.to_string().contains("ca_file is for https:// servers"),
        "{errs}"
    );
    let errs = parse_config(&with_backend(
        "kind = \"simulated\"\nbase_url = \"http://10.0.0.5:8000/v1\"\n",
    ))
    .unwrap_err();
    assert!(
        errs.to_string()
            .contains("base_url is a setting of openai backends"),
        "{errs}"
    );
}

#[test]
fn client_connection_limits_default_and_are_checked() {
    use std::time::Duration;
    let with = |extra: &str| {
        DEMO.replace(
            "max_body_bytes = 1048576",
            &format!("max_body_bytes = 1048576\n{extra}"),
        )
    };
    let l = parse_config(DEMO).unwrap().limits;
    assert_eq!(l.max_connections, 10_000);
    assert_eq!(l.header_read_timeout, Duration::from_secs(30));
    assert_eq!(l.body_read_timeout, Duration::from_secs(30));
    assert_eq!(l.idle_timeout, Duration::from_secs(120));
    assert_eq!(l.max_connections_per_client, None);
    let l = parse_config(&with("max_connections_per_client = 64"))
        .unwrap()
        .limits;
    assert_eq!(l.max_connections_per_client, Some(64));
    let l = parse_config(&with(
        "max_connections = 50\nheader_read_timeout_ms = 5000\nbody_read_timeout_ms = 7000\nidle_timeout_ms = 60000",
    ))
    .unwrap()
    .limits;
    assert_eq!(l.max_connections, 50);
    assert_eq!(l.header_read_timeout, Duration::from_secs(5));
    assert_eq!(l.body_read_timeout, Duration::from_secs(7));
    assert_eq!(l.idle_timeout, Duration::from_secs(60));
    let e = parse_config(&with(
        "max_connections = 0\nbody_read_timeout_ms = 0\nmax_connections_per_client = 0",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("limits.max_connections must be at least 1"),
        "{e}"
    );
    assert!(
        e.contains("limits.body_read_timeout_ms must be between 100 (0.1 s) and 3600000"),
        "{e}"
    );
    assert!(
        e.contains("limits.max_connections_per_client must be at least 1"),
        "{e}"
    );
}

#[test]
fn a_geography_that_matches_no_region_is_named() {
    assert!(parse_config(DEMO).unwrap().empty_geographies().is_empty());
    let config = format!("{DEMO}\n[[geography]]\nname = \"britain\"\ncountries = [\"UK\"]\n");
    let empty = parse_config(&config).unwrap().empty_geographies();
    assert_eq!(empty.len(), 1, "{empty:?}");
    assert!(
        empty[0].starts_with("geography britain matches no region (countries [\"UK\"])"),
        "{empty:?}"
    );
    assert!(empty[0].contains("\"GB\" not \"UK\""), "{empty:?}");
}
