//! Real nodes on loopback: saturation, failover inside the boundary, spill-over of global
//! profiles, and what clients see when there is no room.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Federation, NOVA, ask, eventually, inference_region};

const EU: [&str; 3] = ["eu-central-1", "eu-west-1", "eu-west-3"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_fails_over_inside_the_boundary_and_never_outside() {
    let f = Federation::start().await;

    // Fill eu-central-1's two slots with bare-model requests (this region only).
    let mut held = Vec::new();
    for _ in 0..2 {
        let (r, at) = f.hold("eu-central-1", NOVA).await;
        assert_eq!(at, "eu-central-1");
        held.push(r);
    }

    // The bare model ID has no failover: 429, and the message says what was tried.
    let r = f.chat("eu-central-1", ask(NOVA)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "capacity_exhausted");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("eu-central-1 (at capacity)"), "{msg}");
    assert!(
        msg.contains("inference profile"),
        "bare IDs are told to use a profile: {msg}"
    );

    // The EU profile from the same region is served elsewhere in the EU.
    let r = f
        .chat("eu-central-1", ask("eu.amazon.nova-lite-v1:0"))
        .await;
    assert_eq!(r.status(), 200);
    let at = inference_region(&r);
    assert!(at == "eu-west-1" || at == "eu-west-3", "served in {at}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    // Now fill the rest of the EU as well.
    for region in ["eu-west-1", "eu-west-3"] {
        for _ in 0..2 {
            held.push(f.hold(region, NOVA).await.0);
        }
    }
    let before = f.admitted();

    // From inside and from outside the EU, the EU profile now gets 429, and no region
    // outside the EU processed anything.
    for source in ["eu-central-1", "us-east-1", "eu-west-2"] {
        let r = f.chat(source, ask("eu.amazon.nova-lite-v1:0")).await;
        assert_eq!(r.status(), 429, "from {source}");
        assert!(r.headers().get("x-crisp-inference-region").is_none());
        let body: serde_json::Value = r.json().await.unwrap();
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("boundary"), "{msg}");
        for eu in EU {
            assert!(msg.contains(eu), "{msg} should name {eu}");
        }
        assert!(!msg.contains("us-east-1 ("), "{msg}");
    }
    assert_eq!(
        f.admitted(),
        before,
        "nothing ran anywhere while the EU was full"
    );

    // A global profile spills across geographies.
    let r = f
        .chat("eu-central-1", ask("global.amazon.nova-lite-v1:0"))
        .await;
    assert_eq!(r.status(), 200);
    let at = inference_region(&r);
    assert!(!EU.contains(&at.as_str()), "global request served in {at}");

    // Capacity returns when the held streams go away (clients disconnect).
    drop(held);
    let node = &f.node("eu-central-1").node;
    eventually("eu-central-1 slots freed", || {
        node.backend(NOVA).unwrap().load().running == 0
    })
    .await;
    let r = f.chat("eu-central-1", ask(NOVA)).await;
    assert_eq!(r.status(), 200);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_region_is_preferred_and_streams_cross_regions() {
    let f = Federation::start().await;

    // A profile containing the source region runs there when it has room.
    let r = f.chat("eu-west-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(inference_region(&r), "eu-west-1");

    // An EU profile called in the US runs in the EU, streamed over the backbone.
    let r = f
        .chat(
            "us-east-1",
            serde_json::json!({"model": "eu.amazon.nova-lite-v1:0", "stream": true, "max_tokens": 6,
                "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let at = inference_region(&r);
    assert!(EU.contains(&at.as_str()), "served in {at}");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<serde_json::Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(text.trim_end().ends_with("data: [DONE]"));
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    let usage = events.iter().find(|e| e.get("usage").is_some()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert_eq!(content.split_whitespace().count(), 6);

    // The same answer as a local, non-streaming call to that region.
    let local: serde_json::Value = f
        .chat(
            &at,
            serde_json::json!({"model": NOVA, "max_tokens": 6,
            "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(local["choices"][0]["message"]["content"], content.as_str());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_the_remote_slot_at_once() {
    let f = Federation::start().await;
    let (r, at) = f.hold("us-east-1", "eu.amazon.nova-lite-v1:0").await;
    assert!(EU.contains(&at.as_str()));
    let remote = &f.node(&at).node;
    assert_eq!(remote.backend(NOVA).unwrap().load().running, 1);
    drop(r);
    eventually("the destination's slot is freed", || {
        remote.backend(NOVA).unwrap().load().running == 0
    })
    .await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_region_is_routed_around() {
    let mut f = Federation::start().await;
    // eu-west-1 goes away entirely.
    let gone = f
        .nodes
        .iter()
        .position(|n| n.node.region_code() == "eu-west-1")
        .unwrap();
    f.nodes.remove(gone).shutdown().await;
    let src = &f.node("eu-central-1").node;
    let ix = src.catalog.region_ix("eu-west-1").unwrap();
    eventually("eu-west-1 seen as unreachable", || {
        !src.fleet.summary(ix).unwrap().reachable
    })
    .await;
    // Fill the source; the profile still answers, from eu-west-3.
    let _held = [
        f.hold("eu-central-1", NOVA).await,
        f.hold("eu-central-1", NOVA).await,
    ];
    let r = f
        .chat("eu-central-1", ask("eu.amazon.nova-lite-v1:0"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(inference_region(&r), "eu-west-3");
    f.stop().await;
}
