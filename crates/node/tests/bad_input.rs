//! Bad input gets the right status and an OpenAI-shaped error that says what to do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Federation, NOVA};

async fn error_of(r: reqwest::Response) -> (u16, serde_json::Value) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap();
    for field in ["message", "type", "code"] {
        assert!(body["error"][field].is_string(), "{body}");
    }
    (status, body["error"].clone())
}

/// The message of the 400 a chat completion request gets.
async fn refused(f: &Federation, body: serde_json::Value) -> String {
    let (s, e) = error_of(f.chat("us-east-1", body).await).await;
    assert_eq!(s, 400, "{e}");
    e["message"].as_str().unwrap().to_owned()
}

async fn post_raw(f: &Federation, body: &'static str) -> reqwest::Response {
    f.http
        .post(f.url("us-east-1", "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_explained() {
    let f = Federation::start().await;

    let (s, e) = error_of(post_raw(&f, "{\"model\": \"x\", ").await).await;
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("not a valid chat completion request")
    );

    let (s, e) = error_of(post_raw(&f, "{\"model\": \"eu.amazon.nova-lite-v1:0\"}").await).await;
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("missing field `messages`"),
        "{e}"
    );

    let (s, e) = error_of(post_raw(&f, "[]").await).await;
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("it is not a JSON object"),
        "{e}"
    );
    let (s, e) = error_of(
        post_raw(&f, "{\"model\": \"eu.amazon.nova-lite-v1:0\", \"messages\": [{\"role\": \"user\", \"content\": 5}]}").await,
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("a string, or a list of parts"),
        "{e}"
    );

    let (s, e) = error_of(post_raw(&f, "{\"model\": 7, \"messages\": []}").await).await;
    assert_eq!(s, 400);
    assert!(
        e["message"].as_str().unwrap().contains("invalid type"),
        "{e}"
    );

    let (s, e) = error_of(
        post_raw(&f, "{\"model\": \"eu.amazon.nova-lite-v1:0\", \"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}").await,
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        e["message"].as_str().unwrap().contains("messages[0].role"),
        "{e}"
    );

    // Features crisp does not carry to engines are refused, never silently dropped.
    for (feature, value) in [
        (
            "tools",
            serde_json::json!([{"type": "function", "function": {"name": "lookup"}}]),
        ),
        (
            "response_format",
            serde_json::json!({"type": "json_object"}),
        ),
        ("logprobs", serde_json::json!(true)),
        ("logit_bias", serde_json::json!({"1734": -100})),
        ("web_search_options", serde_json::json!({})),
        ("modalities", serde_json::json!(["text", "audio"])),
    ] {
        let mut body = support::ask(&format!("eu.{NOVA}"));
        body[feature] = value;
        let (s, e) = error_of(f.chat("us-east-1", body).await).await;
        assert_eq!(s, 400, "{feature}");
        let message = e["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{feature}` is not supported"))
                && message.contains("nothing was run"),
            "{e}"
        );
    }
    // So are fields crisp does not know: a misspelt one is named with the one meant,
    // rather than ignored (the answer would not be what was asked for).
    let mut body = support::ask(&format!("eu.{NOVA}"));
    body["max_token"] = serde_json::json!(5);
    let message = refused(&f, body).await;
    assert!(
        message.contains("unknown field `max_token`; did you mean `max_tokens`?")
            && message.contains("nothing was run"),
        "{message}"
    );
    // Inside a message's parts too; an image part is named as what it is.
    for (part, says) in [
        (
            serde_json::json!({"type": "text", "text": "hi", "colour": "red"}),
            "unknown field `messages[0].content[0].colour`",
        ),
        (
            serde_json::json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}),
            "messages[0].content[0] has type \"image_url\"; only \"text\" parts are supported",
        ),
    ] {
        let mut body = support::ask(&format!("eu.{NOVA}"));
        body["messages"] = serde_json::json!([{"role": "user", "content": [part]}]);
        let message = refused(&f, body).await;
        assert!(message.contains(says), "{message}");
    }
    // A history with tool calls would reach the model without them.
    let mut body = support::ask(&format!("eu.{NOVA}"));
    body["messages"] = serde_json::json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]);
    let message = refused(&f, body).await;
    assert!(
        message.contains("messages[1].tool_calls is not supported"),
        "{message}"
    );
    for (field, value) in [
        ("store", serde_json::json!(true)),
        ("service_tier", serde_json::json!("flex")),
        ("reasoning_effort", serde_json::json!("high")),
    ] {
        let mut body = support::ask(&format!("eu.{NOVA}"));
        body[field] = value;
        let message = refused(&f, body).await;
        assert!(
            message.contains(&format!("`{field}` is not supported")),
            "{message}"
        );
    }
    // Their "off" values, as SDKs send them, and the sampling settings crisp carries.
    let mut body = support::ask(&format!("eu.{NOVA}"));
    for (k, v) in [
        ("tools", serde_json::Value::Null),
        ("logprobs", serde_json::json!(false)),
        ("response_format", serde_json::json!({"type": "text"})),
        ("top_p", serde_json::json!(0.9)),
        ("top_k", serde_json::json!(40)),
        ("min_p", serde_json::json!(0.05)),
        ("repetition_penalty", serde_json::json!(1.1)),
        ("seed", serde_json::json!(7)),
        ("presence_penalty", serde_json::json!(0.5)),
        ("logit_bias", serde_json::json!({})),
        ("metadata", serde_json::json!({"team": "search"})),
        ("modalities", serde_json::json!(["text"])),
        ("store", serde_json::json!(false)),
        ("service_tier", serde_json::json!("auto")),
        ("user", serde_json::json!("user-1234")),
        ("parallel_tool_calls", serde_json::json!(true)),
        (
            "messages",
            serde_json::json!([{"role": "user", "name": "ana", "content": "hi"}, {"role": "assistant", "content": "hello", "tool_calls": [], "refusal": null}, {"role": "user", "content": "bye"}]),
        ),
    ] {
        body[k] = v;
    }
    assert_eq!(f.chat("us-east-1", body).await.status(), 200);
    for (field, value, says) in [
        (
            "top_p",
            serde_json::json!(0),
            "`top_p` must be greater than 0",
        ),
        (
            "temperature",
            serde_json::json!(2.5),
            "`temperature` must be between 0 and 2",
        ),
        (
            "frequency_penalty",
            serde_json::json!(3),
            "`frequency_penalty` must be between -2 and 2",
        ),
        (
            "min_p",
            serde_json::json!(1.5),
            "`min_p` must be between 0 and 1",
        ),
        (
            "repeat_penalty",
            serde_json::json!(0),
            "`repetition_penalty` must be greater than 0",
        ),
    ] {
        let mut body = support::ask(&format!("eu.{NOVA}"));
        body[field] = value;
        let message = refused(&f, body).await;
        assert!(message.contains(says), "{message}");
    }

    // A prompt the model refuses, run in another region: the refusal comes back over the
    // backbone as the model's, said once.
    let mut body = support::ask(&format!("eu.{NOVA}"));
    body["max_tokens"] = serde_json::json!(10_000_000);
    let r = f.chat("us-east-1", body).await;
    let (s, e) = error_of(r).await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["code"], "model_rejected");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("context limit"), "{e}");
    assert_eq!(message.matches("reject").count(), 1, "{e}");

    // Unknown profile: 404 with a suggestion.
    let (s, e) = error_of(
        f.chat("us-east-1", support::ask("eu.amazon.nova-lite"))
            .await,
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    assert!(
        e["message"].as_str().unwrap().contains("did you mean"),
        "{e}"
    );

    // Oversized body (the test federation's limit is 4096 bytes).
    let big = "x".repeat(5000);
    let r = f
        .chat(
            "us-east-1",
            serde_json::json!({"model": NOVA, "messages": [{"role": "user", "content": big}]}),
        )
        .await;
    let (s, e) = error_of(r).await;
    assert_eq!(s, 413);
    assert!(e["message"].as_str().unwrap().contains("4096"), "{e}");

    // A streamed (chunked) oversized body, without Content-Length, is refused too.
    let chunks = futures::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1000]))),
    );
    let r = f
        .http
        .post(f.url("us-east-1", "/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // Unknown paths say what exists.
    let r = f
        .http
        .get(f.url("us-east-1", "/v2/nothing"))
        .send()
        .await
        .unwrap();
    let (s, e) = error_of(r).await;
    assert_eq!(s, 404);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("/v1/chat/completions")
    );

    // The Responses API explains its own bad requests.
    for (body, says) in [
        (
            serde_json::json!({"model": format!("eu.{NOVA}")}),
            "missing field `input`",
        ),
        (
            serde_json::json!({"model": format!("eu.{NOVA}"), "input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}),
            "only messages are supported",
        ),
        (
            serde_json::json!({"model": format!("eu.{NOVA}"), "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
            "only \"input_text\" parts",
        ),
        (
            serde_json::json!({"model": format!("eu.{NOVA}"), "input": [{"role": "user", "content": [{"type": "input_text", "text": "x", "colour": "red"}]}]}),
            "unknown field `input[0].content[0].colour`",
        ),
        (
            serde_json::json!({"model": format!("eu.{NOVA}"), "input": [{"role": "user", "contents": "x"}]}),
            "unknown field `input[0].contents`; did you mean `content`?",
        ),
        (
            serde_json::json!({"model": format!("eu.{NOVA}"), "input": "x", "background": true}),
            "`background` is not supported",
        ),
        (
            serde_json::json!({"model": format!("eu.{NOVA}"), "input": "x", "temperature": 3}),
            "`temperature` must be between 0 and 2",
        ),
    ] {
        let r = f
            .http
            .post(f.url("us-east-1", "/v1/responses"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let (s, e) = error_of(r).await;
        assert_eq!(s, 400, "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{body}: {e}");
    }
    // A field given twice in an input item is refused, not read as either; an earlier
    // answer's message item, sent back with its `id` and `status`, is a message.
    for (body, status) in [
        (
            format!(
                r#"{{"model": "eu.{NOVA}", "input": [{{"role": "user", "content": "x", "content": "y"}}]}}"#
            ),
            400,
        ),
        (
            format!(
                r#"{{"model": "eu.{NOVA}", "input": [{{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant", "content": [{{"type": "output_text", "text": "hi", "annotations": []}}]}}, {{"role": "user", "content": "more"}}]}}"#
            ),
            200,
        ),
    ] {
        let r = f
            .http
            .post(f.url("us-east-1", "/v1/responses"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
        if status == 400 {
            let (_, e) = error_of(r).await;
            assert!(
                e["message"]
                    .as_str()
                    .unwrap()
                    .contains("duplicate field `content`"),
                "{e}"
            );
        }
    }

    // A known path with the wrong method says which one it takes.
    let r = f
        .http
        .get(f.url("us-east-1", "/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "POST");
    // Like every answer, it carries a request ID to quote.
    assert!(r.headers().contains_key("x-crisp-request-id"));
    let (s, e) = error_of(r).await;
    assert_eq!(s, 405);
    assert_eq!(e["code"], "method_not_allowed");
    assert!(
        e["message"].as_str().unwrap().contains("send it with POST"),
        "{e}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_model_not_served_here_names_the_profiles_that_serve_it() {
    // London runs no engine for Nova Lite in this federation.
    let serving: Vec<&str> = support::REGIONS
        .iter()
        .map(|r| r.0)
        .filter(|c| *c != "eu-west-2")
        .collect();
    let f = Federation::start_serving(support::REGIONS, &serving, "slots = 2").await;
    let (s, e) = error_of(f.chat("eu-west-2", support::ask(NOVA)).await).await;
    assert_eq!(s, 400);
    assert_eq!(e["code"], "model_not_served_in_region");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("eu-west-2"), "{msg}");
    for profile in [
        "global.amazon.nova-lite-v1:0",
        "eu.amazon.nova-lite-v1:0",
        "us.amazon.nova-lite-v1:0",
    ] {
        assert!(msg.contains(profile), "{msg} should name {profile}");
    }
    // The profiles it names do work from London.
    let r = f
        .chat("eu-west-2", support::ask("eu.amazon.nova-lite-v1:0"))
        .await;
    assert_eq!(r.status(), 200);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_and_fleet_view_describe_the_deployment() {
    let f = Federation::start().await;
    let models: serde_json::Value = f
        .http
        .get(f.url("eu-west-2", "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "global.amazon.nova-lite-v1:0",
        "eu.amazon.nova-lite-v1:0",
        "us.amazon.nova-lite-v1:0",
        NOVA,
    ] {
        assert!(ids.contains(&id), "{ids:?}");
    }
    let eu = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "eu.amazon.nova-lite-v1:0")
        .unwrap();
    assert_eq!(
        eu["crisp"]["destinations"],
        serde_json::json!(["eu-central-1", "eu-west-1", "eu-west-3"])
    );

    let fleet: serde_json::Value = f
        .http
        .get(f.url("eu-west-2", "/crisp/v1/fleet"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet["region"], "eu-west-2");
    let regions = fleet["regions"].as_array().unwrap();
    assert_eq!(regions.len(), support::REGIONS.len());
    for r in regions {
        assert_eq!(r["reachable"], true, "{r}");
        assert!(r["age_ms"].as_u64().unwrap() < 1000, "{r}");
        assert_eq!(r["models"][0]["slots"], 2);
    }
    let london = regions.iter().find(|r| r["code"] == "eu-west-2").unwrap();
    assert_eq!(
        london["geographies"],
        serde_json::json!([]),
        "London is not in the EU"
    );

    let health: serde_json::Value = f
        .http
        .get(f.url("eu-west-2", "/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    f.stop().await;
}

/// Sends a request head promising 200 bytes of body, then only 10 of them; returns what
/// the node answers before it closes the connection.
async fn stalled_body(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"model\": "
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut answer),
    )
    .await
    .expect("a request whose body stopped was not answered")
    .unwrap();
    String::from_utf8(answer).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_arriving_is_refused_with_408() {
    let f = Federation::start().await;
    let addr = f.node("us-east-1").client_addr;
    // The test configuration waits 500 ms for the next byte of a body.
    let started = std::time::Instant::now();
    let openai = stalled_body(addr, "/v1/chat/completions").await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(450));
    assert!(openai.starts_with("HTTP/1.1 408"), "{openai}");
    assert!(openai.contains("\"code\":\"request_timeout\""), "{openai}");
    assert!(openai.contains("body_read_timeout_ms"), "{openai}");

    let bedrock = stalled_body(addr, "/model/eu.amazon.nova-lite-v1%3A0/converse").await;
    assert!(bedrock.starts_with("HTTP/1.1 408"), "{bedrock}");
    assert!(bedrock.contains("ValidationException"), "{bedrock}");
    assert!(
        bedrock.contains("no byte of the request body arrived for 500 ms"),
        "{bedrock}"
    );

    // The node still serves.
    let r = f
        .chat(
            "us-east-1",
            serde_json::json!({"model": NOVA, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    f.stop().await;
}
