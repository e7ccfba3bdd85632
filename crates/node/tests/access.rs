//! Access control on real nodes: keys, guardrails, revocation and reload without a
//! restart, and a broken policy file that keeps the last good set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use crisp_node::access::AccessFiles;
use crisp_policy::keys::KeyStore;
use support::{NOVA, REGIONS, Setup, ask, eventually};

const TEAMS: &str = include_str!("../../../examples/policies/teams.cedar");
const GUARDRAILS: &str = include_str!("../../../examples/policies/guardrails.cedar");
const PRINCIPALS: &str = include_str!("../../../examples/principals.toml");
const TEAM_BILLING: &str = include_str!("../../../examples/policies/team-billing.cedar");

struct Keys {
    demo: String,
    eu: String,
    demo_id: String,
}

fn write_files(dir: &std::path::Path) -> (AccessFiles, Keys) {
    let files = AccessFiles {
        principals: dir.join("principals.toml"),
        keys: dir.join("keys.toml"),
        policies: vec![dir.join("teams.cedar")],
        guardrails: vec![dir.join("guardrails.cedar")],
    };
    std::fs::write(&files.principals, PRINCIPALS).unwrap();
    std::fs::write(&files.policies[0], TEAMS).unwrap();
    std::fs::write(&files.guardrails[0], GUARDRAILS).unwrap();
    let mut store = KeyStore::default();
    let (demo_entry, demo) = store.create("demo", &[1; 16], "t");
    let (_, eu) = store.create("eu-search", &[2; 16], "t");
    std::fs::write(&files.keys, store.to_toml()).unwrap();
    (
        files,
        Keys {
            demo,
            eu,
            demo_id: demo_entry.id,
        },
    )
}

async fn call(
    f: &support::Federation,
    region: &str,
    key: Option<&str>,
    model: &str,
) -> (u16, serde_json::Value) {
    let mut r = f
        .http
        .post(f.url(region, "/v1/chat/completions"))
        .json(&ask(model));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_guardrails_revocation_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (files, keys) = write_files(dir.path());
    let files2 = files.clone();
    let trail = dir.path().join("audit");
    let f = Setup::new(REGIONS)
        .access("eu-central-1", files2)
        .audit("eu-central-1", &trail)
        .start()
        .await;
    let (s, e) = call(&f, "eu-central-1", None, "eu.amazon.nova-lite-v1:0").await;
    assert_eq!(s, 401);
    assert_eq!(e["error"]["code"], "invalid_api_key");
    let (s, _) = call(
        &f,
        "eu-central-1",
        Some("crisp-nope"),
        "eu.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 401);
    let (s, _) = call(
        &f,
        "eu-central-1",
        Some(&keys.demo),
        "global.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(
        &f,
        "eu-central-1",
        Some(&keys.eu),
        "eu.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 200);
    let (s, e) = call(
        &f,
        "eu-central-1",
        Some(&keys.eu),
        "global.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 403);
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("global.amazon.nova-lite-v1:0") && msg.contains("guardrail"),
        "{msg}"
    );
    assert!(
        !msg.contains("forbid ("),
        "no policy text in client errors: {msg}"
    );
    // It says what the caller may use instead.
    assert!(
        msg.contains("For this model you may call eu.amazon.nova-lite-v1:0"),
        "{msg}"
    );
    assert!(!msg.contains("us.amazon"), "{msg}");
    // The bare model in Frankfurt is inside the EU: allowed.
    let (s, _) = call(&f, "eu-central-1", Some(&keys.eu), NOVA).await;
    assert_eq!(s, 200);
    // A body refused as invalid is audited with the model it named; a refused caller
    // is not, because crisp reads no body from a caller it has not signed in.
    for path in ["/v1/chat/completions", "/v1/responses"] {
        let mut body = ask("eu.amazon.nova-lite-v1:0");
        body["max_token"] = 3.into();
        let r = f
            .http
            .post(f.url("eu-central-1", path))
            .bearer_auth(&keys.eu)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
    }
    let invalid: Vec<String> = crisp_audit::events(&trail)
        .unwrap()
        .into_iter()
        .filter(|e| e.error_code.as_deref() == Some("invalid_request"))
        .map(|e| e.request_parameters.model_id.into_owned())
        .collect();
    assert_eq!(
        invalid,
        ["eu.amazon.nova-lite-v1:0", "eu.amazon.nova-lite-v1:0"]
    );

    // Revoking a key takes effect without a restart.
    let mut store = KeyStore::parse(&std::fs::read_to_string(&files.keys).unwrap()).unwrap();
    assert!(store.revoke(&keys.demo_id));
    std::fs::write(&files.keys, store.to_toml()).unwrap();
    let node = f.node("eu-central-1").node.clone();
    assert_eq!(node.reload().access, Ok("reloaded"));
    let (s, e) = call(
        &f,
        "eu-central-1",
        Some(&keys.demo),
        "eu.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 401);
    assert!(e["error"]["message"].as_str().unwrap().contains("revoked"));
    // The trail names the key each refused caller presented, when it is known: a revoked
    // key's ID, nothing for a key the deployment never issued.
    let refused: Vec<(String, String)> = crisp_audit::events(&trail)
        .unwrap()
        .into_iter()
        .filter(|e| e.error_code.as_deref() == Some("invalid_api_key"))
        .map(|e| {
            (
                e.user_identity.kind.into_owned(),
                e.user_identity.access_key_id.into_owned(),
            )
        })
        .collect();
    let anonymous = |id: &str| ("Anonymous".to_owned(), id.to_owned());
    assert_eq!(
        refused,
        [anonymous(""), anonymous(""), anonymous(&keys.demo_id)]
    );

    // A broken policy file is refused; the last good set keeps serving.
    std::fs::write(
        &files.policies[0],
        "permit (principal, action, resource) when { nonsense };",
    )
    .unwrap();
    assert!(node.reload().access.is_err());
    let (s, _) = call(
        &f,
        "eu-central-1",
        Some(&keys.eu),
        "eu.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 200);
    // Fixing it is picked up by the node's own poll.
    std::fs::write(&files.policies[0], "").unwrap();
    eventually("the empty policy set is loaded", || {
        node.reload().access.is_ok()
    })
    .await;
    let (s, e) = call(
        &f,
        "eu-central-1",
        Some(&keys.eu),
        "eu.amazon.nova-lite-v1:0",
    )
    .await;
    assert_eq!(s, 403, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no policy permits it")
    );
    f.stop().await;
}

async fn get(f: &support::Federation, path: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut r = f.http.get(f.url("eu-central-1", path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// The model list, a model's entry and the fleet view need a key when the node has access
/// control, and the list shows each caller what the policies let it see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_need_a_key_and_show_each_caller_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (files, keys) = write_files(dir.path());
    let f = Setup::new(REGIONS)
        .access("eu-central-1", files)
        .start()
        .await;
    for path in [
        "/v1/models",
        "/v1/models/eu.amazon.nova-lite-v1:0",
        "/crisp/v1/fleet",
    ] {
        let (s, e) = get(&f, path, None).await;
        assert_eq!(s, 401, "{path}: {e}");
        assert_eq!(e["error"]["code"], "invalid_api_key", "{path}");
        let (s, _) = get(&f, path, Some("crisp-nope")).await;
        assert_eq!(s, 401, "{path}");
    }
    let ids = |list: &serde_json::Value| -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (s, all) = get(&f, "/v1/models", Some(&keys.demo)).await;
    assert_eq!(s, 200);
    let all = ids(&all);
    assert!(
        all.contains(&"global.amazon.nova-lite-v1:0".to_owned()),
        "{all:?}"
    );
    // The EU-resident team's guardrail hides what would take it outside the EU.
    let (s, eu) = get(&f, "/v1/models", Some(&keys.eu)).await;
    assert_eq!(s, 200);
    let eu = ids(&eu);
    assert!(
        eu.contains(&"eu.amazon.nova-lite-v1:0".to_owned()),
        "{eu:?}"
    );
    assert!(!eu.iter().any(|id| id.starts_with("global.")), "{eu:?}");
    assert!(eu.len() < all.len());

    let (s, m) = get(&f, "/v1/models/eu.amazon.nova-lite-v1:0", Some(&keys.eu)).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["id"], "eu.amazon.nova-lite-v1:0");
    assert_eq!(m["crisp"]["kind"], "geographic_profile");
    let (s, e) = get(
        &f,
        "/v1/models/global.amazon.nova-lite-v1:0",
        Some(&keys.eu),
    )
    .await;
    assert_eq!(s, 403, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("guardrail"),
        "{e}"
    );
    let (s, e) = get(&f, "/v1/models/eu.nope", Some(&keys.demo)).await;
    assert_eq!(s, 404, "{e}");
    assert_eq!(e["error"]["code"], "model_not_found");

    let (s, fleet) = get(&f, "/crisp/v1/fleet", Some(&keys.eu)).await;
    assert_eq!(s, 200);
    assert_eq!(fleet["region"], "eu-central-1");
    f.stop().await;
}

/// Policies see the application profile a call goes through: with the team-billing
/// guardrails, a profile tagged `team=search` is the search team's to create, call, read
/// and delete; others may still call the profile it copies directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_profiles_are_authorized_by_their_tags() {
    let dir = tempfile::tempdir().unwrap();
    let (mut files, keys) = write_files(dir.path());
    let billing = dir.path().join("team-billing.cedar");
    std::fs::write(&billing, TEAM_BILLING).unwrap();
    files.guardrails.push(billing);
    let search_creates = dir.path().join("search-creates.cedar");
    std::fs::write(
        &search_creates,
        r#"permit (principal in Crisp::Team::"search", action == Crisp::Action::"CreateInferenceProfile", resource);"#,
    )
    .unwrap();
    files.policies.push(search_creates);
    let store = tempfile::tempdir().unwrap();
    let f = Setup::new(REGIONS)
        .access("eu-central-1", files)
        .app_profiles(&format!("file://{}", store.path().display()))
        .start()
        .await;
    let create = |key: &str, name: &str, team: &str| {
        f.http
            .post(f.url("eu-central-1", "/inference-profiles"))
            .bearer_auth(key)
            .json(&serde_json::json!({
                "inferenceProfileName": name,
                "modelSource": {"copyFrom": "eu.amazon.nova-lite-v1:0"},
                "tags": [{"key": "team", "value": team}],
            }))
            .send()
    };
    // The platform team may create profiles, but not one billed to search.
    let r = create(&keys.demo, "search-eu", "search").await.unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("CreateInferenceProfile"),
        "{body}"
    );
    let r = create(&keys.demo, "platform-eu", "platform").await.unwrap();
    assert_eq!(r.status(), 201);
    let r = create(&keys.eu, "search-eu", "search").await.unwrap();
    assert_eq!(r.status(), 201);
    let arn: serde_json::Value = r.json().await.unwrap();
    let arn = arn["inferenceProfileArn"].as_str().unwrap().to_owned();
    let encoded: String = url::form_urlencoded::byte_serialize(arn.as_bytes()).collect();
    let converse = |key: &str, model: &str| {
        f.http
            .post(f.url("eu-central-1", &format!("/model/{model}/converse")))
            .bearer_auth(key)
            .json(&serde_json::json!({
                "messages": [{"role": "user", "content": [{"text": "hi"}]}],
                "inferenceConfig": {"maxTokens": 2},
            }))
            .send()
    };
    assert_eq!(converse(&keys.eu, &encoded).await.unwrap().status(), 200);
    let r = converse(&keys.demo, &encoded).await.unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("guardrail"),
        "{body}"
    );
    // The profile it copies stays open to the platform team.
    assert_eq!(
        converse(&keys.demo, "eu.amazon.nova-lite-v1:0")
            .await
            .unwrap()
            .status(),
        200
    );
    // Reading and deleting follow the same tags.
    let get = |key: &str| {
        f.http
            .get(f.url("eu-central-1", &format!("/inference-profiles/{encoded}")))
            .bearer_auth(key)
            .send()
    };
    assert_eq!(get(&keys.demo).await.unwrap().status(), 403);
    assert_eq!(get(&keys.eu).await.unwrap().status(), 200);
    let listed: serde_json::Value = f
        .http
        .get(f.url("eu-central-1", "/inference-profiles?type=APPLICATION"))
        .bearer_auth(&keys.demo)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["inferenceProfileSummaries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["inferenceProfileName"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["platform-eu"]);
    let delete = f
        .http
        .delete(f.url("eu-central-1", &format!("/inference-profiles/{encoded}")))
        .bearer_auth(&keys.demo)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 403);
    f.stop().await;
}

/// A Converse call to `region`'s node, signed with SigV4 by `akid` and `secret`.
async fn signed_converse(
    f: &support::Federation,
    region: &str,
    akid: &str,
    secret: &str,
) -> (u16, serde_json::Value) {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;
    let url = f.url(region, "/model/eu.amazon.nova-lite-v1%3A0/converse");
    let body = br#"{"messages":[{"role":"user","content":[{"text":"Hi"}]}],"inferenceConfig":{"maxTokens":8}}"#;
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let identity = aws_credential_types::Credentials::from_keys(akid, secret, None).into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("bedrock")
        .time(std::time::SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let headers = [
        ("host", host.as_str()),
        ("content-type", "application/json"),
    ];
    let signable = SignableRequest::new(
        "POST",
        url.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .unwrap();
    let (instructions, _) = sign(signable, &params).unwrap().into_parts();
    let mut r = f
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in instructions.headers() {
        r = r.header(k, v);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A revoked SigV4 key is refused as revoked, but only to a caller that signs with its
/// secret; the trail names the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_sigv4_key_is_refused_as_revoked() {
    const AKID: &str = "AKIATESTREVOKED00001";
    const SECRET: &str = "test-secret-revoked";
    let dir = tempfile::tempdir().unwrap();
    let (files, _) = write_files(dir.path());
    let mut store = KeyStore::parse(&std::fs::read_to_string(&files.keys).unwrap()).unwrap();
    store.sigv4.push(crisp_policy::keys::SigV4Credential {
        access_key_id: AKID.into(),
        secret: SECRET.into(),
        principal: "demo".into(),
        revoked: false,
    });
    std::fs::write(&files.keys, store.to_toml()).unwrap();
    let trail = dir.path().join("audit");
    let f = Setup::new(REGIONS)
        .access("eu-central-1", files.clone())
        .audit("eu-central-1", &trail)
        .start()
        .await;
    let (s, body) = signed_converse(&f, "eu-central-1", AKID, SECRET).await;
    assert_eq!(s, 200, "{body}");

    assert!(store.revoke(AKID));
    std::fs::write(&files.keys, store.to_toml()).unwrap();
    assert_eq!(f.node("eu-central-1").node.reload().access, Ok("reloaded"));
    let (s, body) = signed_converse(&f, "eu-central-1", AKID, SECRET).await;
    assert_eq!(s, 403, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("access key {AKID} was revoked")),
        "{msg}"
    );
    // Without the secret, nothing is learnt of the key.
    let (s, body) = signed_converse(&f, "eu-central-1", AKID, "guess").await;
    assert_eq!(s, 403, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("does not match") && !msg.contains("revoked"),
        "{msg}"
    );
    let refused: Vec<(String, String)> = crisp_audit::events(&trail)
        .unwrap()
        .into_iter()
        .filter(|e| e.error_code.is_some())
        .map(|e| {
            (
                e.user_identity.kind.into_owned(),
                e.user_identity.access_key_id.into_owned(),
            )
        })
        .collect();
    let anonymous = ("Anonymous".to_owned(), AKID.to_owned());
    assert_eq!(refused, [anonymous.clone(), anonymous]);
    f.stop().await;
}
