//! Operating a node: metrics that move with the requests, health endpoints, reload, and
//! a graceful drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crisp_node::admin::MetricsRender;
use support::fake::{Fake, run_fake};
use support::{NOVA, REGIONS, Setup, ask, eventually, inference_region};

/// One Prometheus recorder for this test binary.
fn render() -> MetricsRender {
    static RENDER: OnceLock<MetricsRender> = OnceLock::new();
    RENDER
        .get_or_init(|| {
            let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .unwrap();
            Arc::new(move || handle.render())
        })
        .clone()
}

/// The value of the sample whose name and labels contain every `needle`, summed.
fn sample(text: &str, name: &str, needles: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn scrape(http: &reqwest::Client, admin: std::net::SocketAddr) -> String {
    http.get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_the_requests_did() {
    // us-east-1 and eu-central-1 are nodes; eu-west-1 is a fake that claims room but
    // answers 429, so an EU request from the US fails over from Dublin to Frankfurt.
    let mut f = Setup::new(&[REGIONS[0], REGIONS[2], REGIONS[3]])
        .external(&["eu-west-1"])
        .metrics(render())
        .start()
        .await;
    run_fake(&mut f, Fake::Full).await;
    let us = f.node("us-east-1").node.clone();
    let dublin = us.catalog.region_ix("eu-west-1").unwrap();
    eventually("the fake is heard", || {
        us.fleet.summary(dublin).unwrap().reachable
    })
    .await;
    let admin = f.node("us-east-1").admin_addr.unwrap();
    let before = scrape(&f.http, admin).await;

    // Served locally.
    let r = f.chat("us-east-1", ask("us.amazon.nova-lite-v1:0")).await;
    assert_eq!(inference_region(&r), "us-east-1");
    r.text().await.unwrap();
    // Forwarded, after failing over from Dublin.
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(inference_region(&r), "eu-central-1");
    r.text().await.unwrap();
    // Refused.
    let r = f.chat("us-east-1", ask("nope.model")).await;
    assert_eq!(r.status(), 404);
    // Refused in the Bedrock dialect: counted under the same outcome.
    let r = f
        .http
        .post(f.url("us-east-1", "/model/nope.model/converse"))
        .json(&serde_json::json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let after = scrape(&f.http, admin).await;
    let delta = |name: &str, needles: &[&str]| {
        sample(&after, name, needles) - sample(&before, name, needles)
    };
    let src = "source=\"us-east-1\"";
    assert_eq!(
        delta(
            "crisp_requests_total",
            &[src, "inference_region=\"us-east-1\"", "outcome=\"ok\""]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        delta(
            "crisp_requests_total",
            &[src, "inference_region=\"eu-central-1\"", "outcome=\"ok\""]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "crisp_requests_total",
            &[src, "outcome=\"model_not_found\""]
        ),
        2.0,
        "one refusal in each dialect"
    );
    assert_eq!(
        delta(
            "crisp_cross_region_requests_total",
            &[src, "inference_region=\"eu-central-1\""]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "crisp_failovers_total",
            &[src, "region=\"eu-west-1\"", "cause=\"capacity\""]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "crisp_cooldowns_total",
            &["observer=\"us-east-1\"", "region=\"eu-west-1\""]
        ),
        1.0
    );
    assert!(delta("crisp_tokens_total", &[src, "direction=\"output\""]) >= 2.0);
    assert!(delta("crisp_cost_usd_micros_total", &[src]) >= 0.0);
    assert!(sample(&after, "crisp_request_duration_seconds_count", &[src]) >= 2.0);
    assert!(sample(&after, "crisp_time_to_first_token_seconds_count", &[src]) >= 2.0);
    // The node's view of the fleet, with its age.
    assert_eq!(
        sample(
            &after,
            "crisp_region_reachable",
            &["observer=\"us-east-1\"", "region=\"eu-central-1\""]
        ),
        1.0
    );
    assert!(
        after.contains(
            "crisp_region_view_age_seconds{observer=\"us-east-1\",region=\"eu-central-1\"}"
        )
    );
    assert!(
        sample(
            &after,
            "crisp_region_cooldown_seconds",
            &["observer=\"us-east-1\"", "region=\"eu-west-1\""]
        ) > 0.0
    );
    // Bounded labels: no request IDs or free-form IDs.
    assert!(!after.contains("nope.model"));
    for line in after.lines().filter(|l| l.starts_with("crisp_")) {
        assert!(
            !line.contains("chatcmpl-") && !line.contains("request_id"),
            "{line}"
        );
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reload_endpoints_answer() {
    let f = Setup::new(&REGIONS[..2]).start().await;
    let admin = f.node("us-east-1").admin_addr.unwrap();
    let get = |path: &'static str| {
        let http = f.http.clone();
        async move {
            http.get(format!("http://{admin}{path}"))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(get("/livez").await.status(), 200);
    assert_eq!(get("/readyz").await.status(), 200);
    // No recorder was given to this federation: /metrics says so.
    let r = get("/metrics").await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no metrics recorder"));
    let r = f
        .http
        .post(format!("http://{admin}/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["certificates"]["status"], "unchanged");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_finishes_open_streams_and_refuses_new_ones() {
    let mut f = Setup::new(&REGIONS[..2]).start().await;
    // A 40-token answer at 50 tokens/s: about 0.8 s, within the 1 s grace.
    let r = f
        .chat(
            "us-east-1",
            serde_json::json!({"model": NOVA, "stream": true, "max_tokens": 40,
                "messages": [{"role": "user", "content": "drain"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let idx = f
        .nodes
        .iter()
        .position(|n| n.node.region_code() == "us-east-1")
        .unwrap();
    let node = f.nodes.remove(idx);
    let client_addr = node.client_addr;
    let shutdown = tokio::spawn(node.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;

    // New connections are refused...
    let fresh = reqwest::Client::new();
    let refused = fresh
        .post(format!("http://{client_addr}/v1/chat/completions"))
        .json(&ask(NOVA))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a draining node must not take new requests"
    );
    // ...while the open stream runs to its end.
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    shutdown.await.unwrap();
    f.stop().await;
}
