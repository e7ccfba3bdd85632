//! The backbone under attack and faults: wrong CA, expired and foreign certificates,
//! plaintext on the peer port, forged receipts, hung peers, certificate rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crisp_node::backbone::client::PeerClient;
use crisp_node::backbone::wire;
use crisp_transport::{Ca, TlsFiles, TlsStore};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::atomic::Ordering;
use support::fake::{Fake, LATE_ENDS_FINISHED, with_fake};
use support::{NOVA, REGIONS, Setup, ask, eventually, inference_region, now_secs, tls_for};
use time::OffsetDateTime;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_foreign_ca_is_never_reachable_nor_chosen() {
    // eu-west-3's certificate comes from another CA of the same deployment name.
    let rogue = support::test_ca();
    let f = Setup::new(REGIONS)
        .tls(move |ca, region| {
            if region == "eu-west-3" {
                tls_for(&rogue, region)
            } else {
                tls_for(ca, region)
            }
        })
        .silent(&["eu-west-3"])
        .start()
        .await;
    let src = &f.node("eu-central-1").node;
    let ix = src.catalog.region_ix("eu-west-3").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!src.fleet.summary(ix).unwrap().reachable);
    // And the rogue hears no one either.
    let rogue_node = &f.node("eu-west-3").node;
    let us = rogue_node.catalog.region_ix("us-east-1").unwrap();
    assert!(!rogue_node.fleet.summary(us).unwrap().reachable);

    // Fill the rest of the EU: the profile refuses rather than use the unauthenticated one.
    let mut held = Vec::new();
    for region in ["eu-central-1", "eu-west-1"] {
        for _ in 0..2 {
            held.push(f.hold(region, NOVA).await.0);
        }
    }
    let r = f
        .chat("eu-central-1", ask("eu.amazon.nova-lite-v1:0"))
        .await;
    assert_eq!(r.status(), 429);
    let msg = r.text().await.unwrap();
    assert!(msg.contains("eu-west-3 (unreachable)"), "{msg}");
    assert_eq!(rogue_node.admitted(NOVA), 0);
    f.stop().await;
}

/// A raw TLS client presenting `cert_pem`/`key_pem` to `addr`; returns whether the
/// server accepted it (a request could be exchanged).
async fn raw_handshake(
    ca: &Ca,
    addr: std::net::SocketAddr,
    cert_pem: &str,
    key_pem: &str,
    server: &str,
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(format!("{server}.test.crisp")).unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // In TLS 1.3 the server judges the client certificate after the client's handshake
    // ends; the refusal arrives as an alert on the first read.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err("closed".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_future_and_foreign_client_certificates_are_refused() {
    let f = Setup::new(&REGIONS[..2]).start().await;
    let target = f.node("us-east-2").peer_addr;
    let now = OffsetDateTime::now_utc();
    let issue = |ca: &Ca, from: OffsetDateTime, to: OffsetDateTime| {
        ca.issue_region("us-east-1", from, to).unwrap()
    };

    let good = issue(
        &f.ca,
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    raw_handshake(&f.ca, target, &good.cert_pem, &good.key_pem, "us-east-2")
        .await
        .unwrap();

    let expired = issue(
        &f.ca,
        now - time::Duration::days(2),
        now - time::Duration::days(1),
    );
    let e = raw_handshake(
        &f.ca,
        target,
        &expired.cert_pem,
        &expired.key_pem,
        "us-east-2",
    )
    .await
    .unwrap_err();
    assert!(
        e.to_lowercase().contains("expired") || e.contains("alert"),
        "{e}"
    );

    let future = issue(
        &f.ca,
        now + time::Duration::days(1),
        now + time::Duration::days(2),
    );
    assert!(
        raw_handshake(
            &f.ca,
            target,
            &future.cert_pem,
            &future.key_pem,
            "us-east-2"
        )
        .await
        .is_err()
    );

    let other = support::test_ca();
    let foreign = issue(
        &other,
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    assert!(
        raw_handshake(
            &f.ca,
            target,
            &foreign.cert_pem,
            &foreign.key_pem,
            "us-east-2"
        )
        .await
        .is_err()
    );

    // Dialling the wrong region's name fails on the client side: us-east-2's certificate
    // does not say eu-west-1.
    let e = raw_handshake(&f.ca, target, &good.cert_pem, &good.key_pem, "eu-west-1")
        .await
        .unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // A plaintext client on the peer port gets nothing, and the node carries on.
    let plain = f
        .http
        .get(format!("http://{target}/crisp/peer/v1/telemetry"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    let r = f.chat("us-east-1", ask("us.amazon.nova-lite-v1:0")).await;
    assert_eq!(r.status(), 200);
    f.stop().await;
}

fn forward(request_id: &str, source: &str, profile: &str) -> wire::GenerateRequest {
    wire::GenerateRequest {
        request_id: request_id.into(),
        source_region: source.into(),
        profile: profile.into(),
        model: NOVA.into(),
        messages: vec![wire::PeerMessage {
            role: "user".into(),
            content: "hi".into(),
        }],
        max_tokens: Some(3),
        temperature: None,
        top_p: None,
        top_k: None,
        min_p: None,
        repetition_penalty: None,
        seed: None,
        presence_penalty: None,
        frequency_penalty: None,
        stop: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaks_only_for_its_own_region_and_only_inside_the_boundary() {
    let f = Setup::new(REGIONS).start().await;
    let frankfurt = f
        .catalog
        .region(f.catalog.region_ix("eu-central-1").unwrap())
        .unwrap()
        .peer_addr
        .clone();
    // eu-west-1 authenticates as itself but claims to forward for us-east-1.
    let client = PeerClient::new(
        tls_for(&f.ca, "eu-west-1"),
        [(frankfurt.clone(), "eu-central-1".to_owned())],
    );
    let err = client
        .generate(
            &frankfurt,
            "eu-central-1",
            &forward("x1", "us-east-1", "eu.amazon.nova-lite-v1:0"),
            Arc::default(),
        )
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("certificate is spiffe://test/region/eu-west-1"),
        "{err}"
    );

    // Honest about its source, it may use Frankfurt for the EU profile and gets a receipt...
    let slot = Arc::default();
    let mut stream = client
        .generate(
            &frankfurt,
            "eu-central-1",
            &forward("x2", "eu-west-1", "eu.amazon.nova-lite-v1:0"),
            Arc::clone(&slot),
        )
        .await
        .unwrap();
    use futures::StreamExt;
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
    let receipt = slot
        .get()
        .unwrap()
        .verify(&tls_for(&f.ca, "us-east-1").current().ca)
        .unwrap();
    assert_eq!(receipt.inference_region, "eu-central-1");
    assert_eq!(receipt.request_id, "x2");

    // ...but not for a bare model ID (this region only) nor the US profile.
    for profile in [NOVA, "us.amazon.nova-lite-v1:0"] {
        let err = client
            .generate(
                &frankfurt,
                "eu-central-1",
                &forward("x3", "eu-west-1", profile),
                Arc::default(),
            )
            .await
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("not in the destination set"),
            "{profile}: {err}"
        );
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_a_valid_receipt_are_not_trusted() {
    // Control: an honest fake passes (Dublin is nearer to us-east-1 than Frankfurt).
    let f = with_fake(Fake::Honest).await;
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(inference_region(&r), "eu-west-1");
    f.stop().await;

    for mode in [Fake::NoReceipt, Fake::Tampered, Fake::SignedByAnotherRegion] {
        let f = with_fake(mode).await;
        let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
        assert_eq!(r.status(), 502, "{mode:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("processing receipt"), "{mode:?}: {msg}");
        // Streaming: the answer ends in an error event, not a normal finish.
        let r = f
            .chat(
                "us-east-1",
                serde_json::json!({"model": "eu.amazon.nova-lite-v1:0", "stream": true,
                    "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        let text = r.text().await.unwrap();
        assert!(
            text.contains("stream_interrupted") && !text.contains("[DONE]"),
            "{mode:?}: {text}"
        );
        f.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_answer_is_read_to_the_end_of_its_stream() {
    // A stream dropped before its end is reset; enough resets (1,024) and h2 closes the
    // whole link, failing every request in flight on it. So the source reads each answer
    // to its end, even when the destination ends the stream a little after the receipt.
    let f = with_fake(Fake::LateEnd).await;
    let before = LATE_ENDS_FINISHED.load(Ordering::SeqCst);
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(inference_region(&r), "eu-west-1");
    eventually("the destination ended the stream", || {
        LATE_ENDS_FINISHED.load(Ordering::SeqCst) > before
    })
    .await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_hangs_is_skipped_after_the_admission_timeout() {
    let f = with_fake(Fake::Hang).await;
    let start = Instant::now();
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    let took = start.elapsed();
    assert_eq!(r.status(), 200);
    assert_eq!(inference_region(&r), "eu-central-1");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The hung region is now cooling down: the next request goes straight to Frankfurt.
    let start = Instant::now();
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(inference_region(&r), "eu-central-1");
    assert!(start.elapsed() < Duration::from_millis(300));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_are_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let ca_holder: Arc<std::sync::Mutex<Option<Ca>>> = Arc::default();
    let write = |ca: &Ca, days: i64| {
        let now = OffsetDateTime::now_utc();
        let c = ca
            .issue_region(
                "eu-west-1",
                now - time::Duration::minutes(1),
                now + time::Duration::days(days),
            )
            .unwrap();
        std::fs::write(path.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(path.join("eu-west-1.pem"), &c.cert_pem).unwrap();
        std::fs::write(path.join("eu-west-1.key"), &c.key_pem).unwrap();
    };
    let holder = ca_holder.clone();
    let files = TlsFiles::in_dir(&path, "eu-west-1");
    let f = Setup::new(&[REGIONS[0], REGIONS[3]])
        .tls(move |ca, region| {
            if region == "eu-west-1" {
                let now = OffsetDateTime::now_utc();
                let c = ca
                    .issue_region(
                        region,
                        now - time::Duration::minutes(1),
                        now + time::Duration::days(1),
                    )
                    .unwrap();
                std::fs::write(files.ca.clone(), ca.cert_pem()).unwrap();
                std::fs::write(files.cert.clone(), &c.cert_pem).unwrap();
                std::fs::write(files.key.clone(), &c.key_pem).unwrap();
                *holder.lock().unwrap() =
                    Some(Ca::load("test", ca.cert_pem(), &ca.key_pem()).unwrap());
                Arc::new(
                    TlsStore::load(
                        files.clone(),
                        crisp_transport::RegionIdentity::new("test", region),
                        now_secs(),
                    )
                    .unwrap(),
                )
            } else {
                tls_for(ca, region)
            }
        })
        .start()
        .await;
    let dublin = f
        .catalog
        .region(f.catalog.region_ix("eu-west-1").unwrap())
        .unwrap()
        .peer_addr
        .clone();
    let source = tls_for(&f.ca, "us-east-1");
    let receipt_cert = |client: PeerClient, id: &'static str| {
        let dublin = dublin.clone();
        async move {
            let slot: crisp_node::pipeline::ReceiptSlot = Arc::default();
            let mut s = client
                .generate(
                    &dublin,
                    "eu-west-1",
                    &forward(id, "us-east-1", "eu.amazon.nova-lite-v1:0"),
                    slot.clone(),
                )
                .await
                .unwrap();
            use futures::StreamExt;
            while s.next().await.is_some() {}
            slot.get().unwrap().certificate.clone()
        }
    };
    let before = receipt_cert(
        PeerClient::new(source.clone(), [(dublin.clone(), "eu-west-1".into())]),
        "r1",
    )
    .await;

    let ca = ca_holder.lock().unwrap().take().unwrap();
    write(&ca, 2);
    let dublin_node = f.node("eu-west-1").node.clone();
    let old = dublin_node.tls.current().cert_der().to_vec();
    eventually("the node reloads its certificate", || {
        dublin_node.tls.current().cert_der() != old.as_slice()
    })
    .await;
    let after = receipt_cert(
        PeerClient::new(source, [(dublin.clone(), "eu-west-1".into())]),
        "r2",
    )
    .await;
    assert_ne!(
        before, after,
        "receipts are signed with the rotated certificate"
    );

    // A broken replacement is refused and the node keeps serving with what it has.
    std::fs::write(path.join("eu-west-1.key"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = f.chat("us-east-1", ask("eu.amazon.nova-lite-v1:0")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(inference_region(&r), "eu-west-1");
    f.stop().await;
}

/// A forwarded answer that breaks off at the destination (here its node ends the
/// answers still streaming as it stops) comes with a receipt for what it produced, so the
/// source's event of it is proven, and verifies, like a completed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_answer_that_breaks_off_is_proven_up_to_where_it_ended() {
    use futures::StreamExt;
    let trail = tempfile::tempdir().unwrap();
    let f = Setup::new(REGIONS)
        .serving(&["eu-west-1"])
        .audit("us-east-1", trail.path())
        .start()
        .await;
    let (r, at) = f.hold("us-east-1", "eu.amazon.nova-lite-v1:0").await;
    assert_eq!(at, "eu-west-1");
    let mut body = r.bytes_stream();
    let mut seen = Vec::new();
    while seen.windows(5).filter(|w| w == b"data:").count() < 3 {
        seen.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    f.node("eu-west-1").node.cut_streams();
    while let Some(chunk) = body.next().await {
        seen.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("stream_interrupted") && !text.contains("[DONE]"),
        "{text}"
    );
    let mut events = Vec::new();
    eventually("the broken answer is in the trail", || {
        events = crisp_audit::events(trail.path()).unwrap();
        events.iter().any(|e| e.error_code.is_some())
    })
    .await;
    let event = events.iter().find(|e| e.error_code.is_some()).unwrap();
    let data = &event.additional_event_data;
    assert!(data.partial, "{event:?}");
    assert_eq!(event.error_code.as_deref(), Some("stream_interrupted"));
    assert_eq!(data.error_kind.as_deref(), Some("upstream_error"));
    assert!(data.input_tokens > 0 && data.output_tokens > 0, "{event:?}");
    let receipt = data
        .receipt
        .as_ref()
        .expect("a receipt for what it produced");
    let ca =
        crisp_transport::tls::CaVerifier::from_ca_pem("test", f.ca.cert_pem().as_bytes()).unwrap();
    let attested = receipt.verify(&ca).unwrap();
    assert_eq!(attested.inference_region, "eu-west-1");
    assert_eq!(
        (attested.input_tokens, attested.output_tokens),
        (data.input_tokens, data.output_tokens)
    );
    let report = crisp_audit::verify(trail.path(), &ca, "us-east-1").unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.receipts, 1);
    f.stop().await;
}
