//! Model invocation logging keeps payloads in the source region only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read;
use std::path::Path;

use support::{REGIONS, Setup, eventually, inference_region};

/// Every file under `dir`, recursively, gunzipped when it is gzip.
fn contents(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(contents(&p));
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let text = if p.to_string_lossy().ends_with(".gz") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut s)
                .unwrap();
            s
        } else {
            String::from_utf8_lossy(&bytes).into_owned()
        };
        out.push((p.to_string_lossy().into_owned(), text));
    }
    out
}

/// A short chat request for the EU profile carrying `prompt`.
fn eu_request(prompt: &str) -> serde_json::Value {
    serde_json::json!({"model": "eu.amazon.nova-lite-v1:0", "max_tokens": 3,
        "messages": [{"role": "user", "content": prompt}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_stay_in_the_source_region() {
    let root = tempfile::tempdir().unwrap();
    let (us_local, us_store) = (root.path().join("us-local"), root.path().join("us-store"));
    let (eu_local, eu_store) = (root.path().join("eu-local"), root.path().join("eu-store"));
    std::fs::create_dir_all(&us_store).unwrap();
    std::fs::create_dir_all(&eu_store).unwrap();
    let url = |p: &Path| format!("file://{}/logs", p.display());
    let f = Setup::new(&[REGIONS[0], REGIONS[3]])
        .invocation_log("us-east-1", &us_local, &url(&us_store))
        .invocation_log("eu-west-1", &eu_local, &url(&eu_store))
        .start()
        .await;
    // An EU request called in the US runs in Dublin; one with a large prompt too.
    let secret = "purple-elephant-prompt-42";
    for prompt in [
        secret.to_owned(),
        format!("{secret} {}", "word ".repeat(100)),
    ] {
        let mut body = eu_request(&prompt);
        if prompt == secret {
            body["metadata"] = serde_json::json!({"team": "search", "ticket": "T-7"});
        }
        let r = f.chat("us-east-1", body).await;
        assert_eq!(inference_region(&r), "eu-west-1");
        r.text().await.unwrap();
    }
    // The same through the Responses API.
    let r = f
        .http
        .post(f.url("us-east-1", "/v1/responses"))
        .json(
            &serde_json::json!({"model": "eu.amazon.nova-lite-v1:0", "max_output_tokens": 3,
            "input": format!("{secret} via responses"), "metadata": {"api": "responses"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(inference_region(&r), "eu-west-1");
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["output"][0]["content"][0]["type"], "output_text");
    let shipped = || contents(&us_store.join("logs"));
    // Three records, and the large prompt's own object.
    let complete = || {
        let files = shipped();
        let records: usize = files
            .iter()
            .filter(|(p, _)| p.ends_with(".json.gz"))
            .map(|(_, t)| t.lines().count())
            .sum();
        records == 3
            && files
                .iter()
                .any(|(p, t)| p.ends_with(".json") && t.contains(secret))
    };
    eventually("the source's log reaches its store", complete).await;
    let files = shipped();
    let (gz_path, gz) = files.iter().find(|(p, _)| p.ends_with(".json.gz")).unwrap();
    assert!(
        gz_path.contains("AWSLogs/000000000000/BedrockModelInvocationLogs/us-east-1/"),
        "{gz_path}"
    );
    // Every record of every batch shipped.
    let records: Vec<serde_json::Value> = files
        .iter()
        .filter(|(p, _)| p.ends_with(".json.gz"))
        .flat_map(|(_, t)| t.lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(gz.lines().next().is_some());
    for record in &records {
        assert_eq!(record["schemaType"], "ModelInvocationLog");
        assert_eq!(record["region"], "us-east-1");
        assert_eq!(record["inferenceRegion"], "eu-west-1");
    }
    let chat: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["operation"] == "ChatCompletion")
        .collect();
    assert_eq!(chat.len(), 2, "{records:?}");
    // What the caller asked to be recorded with the call is the record's requestMetadata.
    let small = chat
        .iter()
        .find(|r| r["input"]["inputBodyJson"].is_object())
        .unwrap();
    assert_eq!(
        small["requestMetadata"],
        serde_json::json!({"team": "search", "ticket": "T-7"})
    );
    let responses = records
        .iter()
        .find(|r| r["operation"] == "CreateResponse")
        .unwrap();
    assert_eq!(
        responses["requestMetadata"],
        serde_json::json!({"api": "responses"})
    );
    assert!(responses["output"]["outputTokenCount"].as_u64().unwrap() <= 3);
    // The large prompt went to its own object, referenced by path.
    let large = chat
        .iter()
        .find(|r| r["input"]["inputBodyS3Path"].is_string())
        .unwrap();
    let key = large["input"]["inputBodyS3Path"].as_str().unwrap();
    assert!(
        files
            .iter()
            .any(|(p, t)| p.ends_with(key.split('/').next_back().unwrap()) && t.contains(secret))
    );

    // Dublin ran both requests and kept nothing of them.
    for dir in [&eu_local, &eu_store] {
        for (p, t) in contents(dir) {
            assert!(!t.contains(secret), "{p} holds the payload");
        }
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_delays_the_log_and_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let (local, store) = (root.path().join("local"), root.path().join("store"));
    std::fs::create_dir_all(&store).unwrap();
    // The store is down: where its objects go is a file, so every upload fails.
    std::fs::write(store.join("logs"), b"not a directory").unwrap();
    let f = Setup::new(&[REGIONS[0], REGIONS[3]])
        .invocation_log(
            "us-east-1",
            &local,
            &format!("file://{}/logs", store.display()),
        )
        .start()
        .await;
    let secrets = ["outage-prompt-1", "outage-prompt-2", "outage-prompt-3"];
    for secret in secrets {
        let r = f.chat("us-east-1", eu_request(secret)).await;
        // Requests are answered while the log cannot be shipped.
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    // The batch is packed and kept on the node's disk until the store takes it.
    let waiting = || contents(&local.join("ready"));
    eventually("the batch waits on the node's disk", || {
        let w = waiting();
        secrets.iter().all(|s| w.iter().any(|(_, t)| t.contains(s)))
    })
    .await;
    assert!(!store.join("logs").is_dir());

    // The store is back: the next flush ships everything and clears the local copy.
    std::fs::remove_file(store.join("logs")).unwrap();
    eventually("the waiting batch reaches the store", || {
        let shipped = contents(&store.join("logs"));
        secrets
            .iter()
            .all(|s| shipped.iter().any(|(_, t)| t.contains(s)))
            && waiting().is_empty()
    })
    .await;
    f.stop().await;
}
