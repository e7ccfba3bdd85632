#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use crisp_audit::{AuditLog, Durability, Finding, Sealing, verify};
use crisp_transport::{Ca, RegionIdentity, TlsMaterial};
use support::{NodeKey, event, material, receipt, request_ids, us_log, verifier};
use time::OffsetDateTime;

/// A trail of 3 sealed files of 4 events each, every event with an EU receipt.
async fn trail(dir: &std::path::Path, ca: &Ca) {
    let dublin = material(ca, "eu-west-1");
    let log = AuditLog::open(
        dir,
        "us-east-1",
        Arc::new(NodeKey(material(ca, "us-east-1"))),
        Sealing {
            max_bytes: 1,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap();
    for i in 0..12 {
        log.record(&event(
            i,
            Some(receipt(&dublin, i, "eu-west-1")),
            "eu-west-1",
        ))
        .await
        .unwrap();
    }
    // Sealing is asynchronous to the writes it follows.
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("audit-"))
        .collect();
    v.sort();
    v
}

async fn setup() -> (tempfile::TempDir, Ca, crisp_transport::tls::CaVerifier) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    trail(dir.path(), &ca).await;
    let verifier =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    (dir, ca, verifier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intact_trail_verifies_with_every_receipt() {
    let (dir, _ca, v) = setup().await;
    let report = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.events, 12);
    assert_eq!(report.receipts, 12);
    assert!(report.files >= 3);
    assert_eq!(report.unsealed, 0);
    // Where the chain ends, and when that digest was sealed (signed with it).
    let (newest, sealed_at) = report.newest.clone().unwrap();
    assert_eq!(newest, report.files as u64 - 1);
    let sealed_at = OffsetDateTime::parse(
        &sealed_at.unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!((OffsetDateTime::now_utc() - sealed_at).whole_seconds() < 60);
    // The wrong region's key would not do.
    let report = verify(dir.path(), &v, "eu-west-1").unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::BadSignature { .. }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_is_detected() {
    // An edited byte.
    let (dir, _ca, v) = setup().await;
    let f = dir.path().join(&files(dir.path())[1]);
    let mut bytes = std::fs::read(&f).unwrap();
    let pos = bytes.iter().position(|&b| b == b'1').unwrap();
    bytes[pos] = b'9';
    std::fs::write(&f, bytes).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(
        r.findings
            .iter()
            .any(|x| matches!(x, Finding::ModifiedFile { .. })),
        "{:?}",
        r.findings
    );

    // A deleted file.
    let (dir, _ca, v) = setup().await;
    std::fs::remove_file(dir.path().join(&files(dir.path())[0])).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(
        r.findings
            .iter()
            .any(|x| matches!(x, Finding::MissingFile { .. })),
        "{:?}",
        r.findings
    );

    // Two files swapped.
    let (dir, _ca, v) = setup().await;
    let fs = files(dir.path());
    let (a, b) = (dir.path().join(&fs[0]), dir.path().join(&fs[1]));
    let tmp = dir.path().join("tmp");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert_eq!(
        r.findings
            .iter()
            .filter(|x| matches!(x, Finding::ModifiedFile { .. }))
            .count(),
        2,
        "{:?}",
        r.findings
    );

    // An inserted file, and a deleted digest.
    let (dir, _ca, v) = setup().await;
    std::fs::write(dir.path().join("audit-0000000099.jsonl"), "{}\n").unwrap();
    std::fs::remove_file(dir.path().join("digests/digest-0000000001.json")).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(
        r.findings
            .iter()
            .any(|x| matches!(x, Finding::UnlistedFile { .. })),
        "{:?}",
        r.findings
    );
    assert!(
        r.findings
            .iter()
            .any(|x| matches!(x, Finding::MissingDigest { sequence: 1 })),
        "{:?}",
        r.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_receipt_is_detected_even_in_a_correctly_sealed_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let us = material(&ca, "us-east-1");
    let log = AuditLog::open(
        dir.path(),
        "us-east-1",
        Arc::new(NodeKey(material(&ca, "us-east-1"))),
        Sealing {
            max_bytes: 1,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap();
    // The source claims eu-west-1, but the receipt was signed by a US node.
    log.record(&event(0, Some(receipt(&us, 0, "eu-west-1")), "eu-west-1"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(
        r.findings
            .iter()
            .any(|x| matches!(x, Finding::BadReceipt { .. })),
        "{:?}",
        r.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_event_is_on_disk_when_record_returns_and_the_chain_continues_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let key = || Arc::new(NodeKey(material(&ca, "us-east-1")));
    let log = AuditLog::open(dir.path(), "us-east-1", key(), Sealing::default()).unwrap();
    log.record(&event(1, None, "us-east-1")).await.unwrap();
    let text = std::fs::read_to_string(dir.path().join("open.jsonl")).unwrap();
    assert!(text.contains("\"requestID\":\"r1\""));
    assert!(!text.contains("content"), "no prompt text in audit events");
    drop(log);
    // A restart seals what the previous run left open and carries the chain on.
    let log = AuditLog::open(
        dir.path(),
        "us-east-1",
        key(),
        Sealing {
            max_bytes: 1,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap();
    log.record(&event(2, None, "us-east-1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.events, 2);
    assert_eq!(crisp_audit::events(dir.path()).unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_answers_from_other_regions_need_a_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let log = us_log(dir.path(), &ca, 1, Durability::Fsync);
    // Run here: the signed digest attests it. Run elsewhere without a receipt: unproven.
    log.record(&event(0, None, "us-east-1")).await.unwrap();
    log.record(&event(1, None, "eu-west-1")).await.unwrap();
    // A failed call that got as far as another region keeps no receipt either.
    let mut failed = event(2, None, "eu-west-1");
    failed.error_code = Some("stream_interrupted".into());
    log.record(&failed).await.unwrap();
    // Only sealed files are verified; sealing follows the writes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(log);
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let report = verify(dir.path(), &v, "us-east-1").unwrap();
    assert_eq!(report.events, 3);
    let missing: Vec<&str> = report
        .findings
        .iter()
        .filter_map(|f| match f {
            Finding::BadReceipt {
                request_id, why, ..
            } => {
                assert!(why.contains("carries no receipt"), "{why}");
                Some(request_id.as_str())
            }
            _ => None,
        })
        .collect();
    assert_eq!(missing, ["r1"], "{:?}", report.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_write_durability_events_are_in_the_file_when_recorded_and_sealed_intact() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let write = Durability::Write {
        flush_within: Duration::from_millis(20),
    };
    let log = us_log(dir.path(), &ca, 400, write);
    for i in 0..10 {
        log.record(&event(i, None, "us-east-1")).await.unwrap();
        // Recorded means written: readable from the files at once.
        let ids: Vec<String> = crisp_audit::events(dir.path())
            .unwrap()
            .into_iter()
            .map(|e| e.request_id.into_owned())
            .collect();
        assert!(ids.contains(&format!("r{i}")), "{ids:?}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(log);
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let report = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    // Sealed by the log's thread once the file passed its size.
    assert_eq!(report.events, 10);
}

/// With `"write"`, the events that one thread's tasks record while the first of them
/// yields are written together; each `record` resolves only once its event is in the
/// file, and a batch whose first task goes away before writing it is written for the
/// others.
#[tokio::test(flavor = "current_thread")]
async fn with_write_durability_one_threads_events_are_written_together() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let write = Durability::Write {
        flush_within: Duration::from_millis(20),
    };
    let log = us_log(dir.path(), &ca, 1 << 20, write);
    let mut cx = Context::from_waker(Waker::noop());
    let events: Vec<_> = (0..4).map(|i| event(i, None, "us-east-1")).collect();

    let mut first = Box::pin(log.record(&events[0]));
    let mut second = Box::pin(log.record(&events[1]));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert!(second.as_mut().poll(&mut cx).is_pending());
    assert!(
        request_ids(dir.path()).is_empty(),
        "written before its batch"
    );
    assert!(matches!(first.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    assert_eq!(request_ids(dir.path()), ["r0", "r1"]);
    assert!(matches!(second.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));

    let mut first = Box::pin(log.record(&events[2]));
    let mut second = Box::pin(log.record(&events[3]));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    assert!(second.as_mut().poll(&mut cx).is_pending());
    drop(first);
    assert_eq!(request_ids(dir.path()), ["r0", "r1", "r2", "r3"]);
    assert!(matches!(second.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));

    drop(second);
    log.seal_now().unwrap();
    let report = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.events, 4);
}

/// With `"write"`, events recorded at once by many tasks on several threads, with seals
/// between them, are each in the trail exactly once when their `record` resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_write_durability_concurrent_events_are_each_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let write = Durability::Write {
        flush_within: Duration::from_millis(5),
    };
    // Small files, and waves of events with pauses between them: the log's thread seals
    // while events are being written.
    let log = us_log(dir.path(), &ca, 4096, write);
    let mut tasks = Vec::new();
    for wave in 0..8 {
        tasks.extend((wave * 50..(wave + 1) * 50).map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                log.record(&event(i, None, "us-east-1")).await?;
                Ok::<_, crisp_audit::AuditError>(i)
            })
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap().unwrap());
    }
    let mut ids = request_ids(dir.path());
    ids.sort();
    let mut expected: Vec<String> = done.iter().map(|i| format!("r{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    log.seal_now().unwrap();
    let report = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.events, 400);
    assert!(report.files > 1, "sealed along the way: {}", report.files);
}

/// A trail outlives its region's certificate: each digest is checked against the time it
/// was sealed (signed with it), not the time of verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_verifies_after_its_certificate_expired() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let now = OffsetDateTime::now_utc();
    let short = ca
        .issue_region(
            "us-east-1",
            now - time::Duration::hours(1),
            now + time::Duration::seconds(3),
        )
        .unwrap();
    let material = TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        short.cert_pem.as_bytes(),
        short.key_pem.as_bytes(),
        &RegionIdentity::new("demo", "us-east-1"),
        u64::try_from(now.unix_timestamp()).unwrap(),
    )
    .unwrap();
    let log = AuditLog::open(
        dir.path(),
        "us-east-1",
        Arc::new(NodeKey(material)),
        Sealing {
            max_bytes: 1,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap();
    log.record(&event(0, None, "us-east-1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(log);
    // The certificate has expired by the time the auditor looks.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let report = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.events, 1);
}

/// A crash after a file was sealed (renamed) but before its digest was written: the next
/// start writes the missing digest instead of sealing over the file, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_sealing_and_the_digest_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let key = || Arc::new(NodeKey(material(&ca, "us-east-1")));
    let sealing = Sealing {
        max_bytes: 1,
        max_age: Duration::from_secs(3600),
    };
    let log = AuditLog::open(dir.path(), "us-east-1", key(), sealing).unwrap();
    for i in 0..2 {
        log.record(&event(i, None, "us-east-1")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(log);
    // The second file's digest never made it to disk.
    std::fs::remove_file(dir.path().join("digests/digest-0000000001.json")).unwrap();
    let log = AuditLog::open(dir.path(), "us-east-1", key(), sealing).unwrap();
    log.record(&event(2, None, "us-east-1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.events, 3);
    let mut ids: Vec<String> = crisp_audit::events(dir.path())
        .unwrap()
        .into_iter()
        .map(|e| e.request_id.into_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1", "r2"]);
}

/// One writer per trail: a second node on the same directory is refused, not allowed to
/// seal the file the first one appends to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_on_a_trail_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let key = || Arc::new(NodeKey(material(&ca, "us-east-1")));
    let first = AuditLog::open(dir.path(), "us-east-1", key(), Sealing::default()).unwrap();
    first.record(&event(0, None, "us-east-1")).await.unwrap();
    let err = match AuditLog::open(dir.path(), "us-east-1", key(), Sealing::default()) {
        Ok(_) => panic!("a second writer is refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("already written by another node"), "{err}");
    first.record(&event(1, None, "us-east-1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_billed_beyond_what_the_receipt_attests_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let dublin = material(&ca, "eu-west-1");
    let log = us_log(dir.path(), &ca, 1, Durability::Fsync);
    let mut inflated = event(0, Some(receipt(&dublin, 0, "eu-west-1")), "eu-west-1");
    inflated.additional_event_data.output_tokens = 2000;
    log.record(&inflated).await.unwrap();
    log.record(&event(
        1,
        Some(receipt(&dublin, 1, "eu-west-1")),
        "eu-west-1",
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let v =
        crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    let found: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("r0")
            && found[0]
                .contains("attests 1 input and 2 output tokens, the event records 1 and 2000"),
        "{found:?}"
    );
}

/// The seal signs the bytes the node wrote, not what the open file holds when it is
/// sealed: an edit made while the file was open is found, whichever durability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_of_the_open_file_before_its_seal_is_not_signed() {
    for durability in [
        Durability::Fsync,
        Durability::Write {
            flush_within: Duration::from_millis(20),
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
        let log = us_log(dir.path(), &ca, 1 << 20, durability);
        log.record(&event(0, None, "us-east-1")).await.unwrap();
        log.record(&event(1, None, "us-east-1")).await.unwrap();
        let open = dir.path().join("open.jsonl");
        let text = std::fs::read_to_string(&open).unwrap();
        std::fs::write(&open, text.replace("\"r0\"", "\"r7\"")).unwrap();
        log.seal_now().unwrap();
        let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
        assert!(
            matches!(r.findings.as_slice(), [Finding::ModifiedFile { file }] if file == "audit-0000000000.jsonl"),
            "{durability:?}: {:?}",
            r.findings
        );
        assert!(r.hashed_as_found.is_empty());
        // Untouched, the same steps verify.
        let dir = tempfile::tempdir().unwrap();
        let log = us_log(dir.path(), &ca, 1 << 20, durability);
        log.record(&event(0, None, "us-east-1")).await.unwrap();
        log.seal_now().unwrap();
        log.seal_now().unwrap();
        let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        assert_eq!((r.files, r.events), (1, 1));
    }
}

/// A file a node left open (it stopped without sealing) can only be hashed as it is found
/// at the next start: its digest says so, and verification passes that on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_left_open_is_sealed_as_found_and_its_digest_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(0, None, "us-east-1")).await.unwrap();
    drop(log);
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(1, None, "us-east-1")).await.unwrap();
    log.seal_now().unwrap();
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.events, 2);
    assert_eq!(r.hashed_as_found.len(), 1, "{:?}", r.hashed_as_found);
    let (file, why) = &r.hashed_as_found[0];
    assert_eq!(file, "audit-0000000000.jsonl");
    assert!(why.contains("stopped without sealing"), "{why}");
}

/// Receipts are checked in the open file too, before any seal covers it; a line still
/// being appended is not mistaken for a broken event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_in_the_open_file_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let us = material(&ca, "us-east-1");
    let dublin = material(&ca, "eu-west-1");
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(
        0,
        Some(receipt(&dublin, 0, "eu-west-1")),
        "eu-west-1",
    ))
    .await
    .unwrap();
    // Signed by a US node for a claim of eu-west-1.
    log.record(&event(1, Some(receipt(&us, 1, "eu-west-1")), "eu-west-1"))
        .await
        .unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("open.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"eventVersion\":\"1.").unwrap();
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert_eq!((r.unsealed, r.receipts, r.events), (2, 2, 0));
    let found: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert!(
        matches!(found.as_slice(), [f] if f.starts_with("open.jsonl: request r1: receipt not valid")),
        "{found:?}"
    );
}

/// Each finding names the digest at fault: a deleted digest is missing (not a break of
/// the one before it); a changed one breaks the link of the digest after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_findings_name_the_digest_at_fault() {
    let (dir, _ca, v) = setup().await;
    std::fs::remove_file(dir.path().join("digests/digest-0000000005.json")).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    let found: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "digest 5: missing (deleted)",
            "audit-0000000005.jsonl: not listed in any digest (inserted)"
        ]
    );

    let (dir, _ca, v) = setup().await;
    let digest = dir.path().join("digests/digest-0000000005.json");
    let mut text = std::fs::read(&digest).unwrap();
    text.push(b'\n');
    std::fs::write(&digest, text).unwrap();
    let r = verify(dir.path(), &v, "us-east-1").unwrap();
    assert!(
        matches!(r.findings.as_slice(), [Finding::RewrittenDigest { digest }] if digest == "digest-0000000005.json"),
        "{:?}",
        r.findings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_taken_from_another_request_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let dublin = material(&ca, "eu-west-1");
    let log = us_log(dir.path(), &ca, 1, Durability::Fsync);
    log.record(&event(
        1,
        Some(receipt(&dublin, 0, "eu-west-1")),
        "eu-west-1",
    ))
    .await
    .unwrap();
    log.seal_now().unwrap();
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    let found: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "audit-0000000000.jsonl: request r1: receipt not valid (the receipt is for request r0, not this one)"
        ]
    );
}

/// A node killed while it appended an event leaves part of it: that event was never
/// recorded, so the next start cuts it off, and the digest says so, instead of sealing
/// an unreadable line that would fail verification forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_event_left_by_a_crash_is_cut_off_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(0, None, "us-east-1")).await.unwrap();
    drop(log);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("open.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"eventVersion\":\"1.0\",\"ev").unwrap();
    drop(f);
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(1, None, "us-east-1")).await.unwrap();
    log.seal_now().unwrap();
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.events, 2);
    // Only the file the crash left is sealed as found; the next one signs what was written.
    assert_eq!(r.hashed_as_found.len(), 1, "{:?}", r.hashed_as_found);
    assert!(
        r.hashed_as_found[0]
            .1
            .contains("the 25 bytes of the event it was writing"),
        "{:?}",
        r.hashed_as_found
    );

    // Nothing but a half-written event: nothing to seal, and the next file is not marked.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("open.jsonl"), b"{\"eventVer").unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(2, None, "us-east-1")).await.unwrap();
    log.seal_now().unwrap();
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!((r.events, r.hashed_as_found.len()), (1, 0));
}

/// A node that stopped cleanly sealed everything it wrote: events found in the open file
/// at the next start were written by something else, and verification says so. A write
/// after the stop's seal (a replaced node still draining) is the node's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_while_the_node_was_stopped_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(0, None, "us-east-1")).await.unwrap();
    log.seal_now().unwrap();
    drop(log);
    let forged = serde_json::to_string(&event(9, None, "us-east-1")).unwrap();
    std::fs::write(dir.path().join("open.jsonl"), format!("{forged}\n")).unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.seal_now().unwrap();
    drop(log);
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    let found: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "audit-0000000001.jsonl: its events were written while the node was stopped, after it had sealed everything it wrote (inserted)"
        ]
    );

    // Written after the stop's seal by the node itself, then left open: only a note.
    let dir = tempfile::tempdir().unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.seal_now().unwrap();
    log.record(&event(1, None, "us-east-1")).await.unwrap();
    drop(log);
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(2, None, "us-east-1")).await.unwrap();
    log.seal_now().unwrap();
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!((r.events, r.hashed_as_found.len()), (2, 1));
}

/// Deleting the open file while its node runs loses nothing: the node still holds it
/// open, reads back what it appended, and seals that under the next name, with a digest
/// that signs what it wrote and says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_open_file_is_restored_from_the_nodes_handle() {
    for durability in [
        Durability::Fsync,
        Durability::Write {
            flush_within: Duration::from_millis(20),
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
        let log = us_log(dir.path(), &ca, 1 << 20, durability);
        log.record(&event(0, None, "us-east-1")).await.unwrap();
        log.record(&event(1, None, "us-east-1")).await.unwrap();
        std::fs::remove_file(dir.path().join("open.jsonl")).unwrap();
        // Written to the deleted file: the next flush finds it gone.
        log.record(&event(2, None, "us-east-1")).await.unwrap();
        // Without a write, the log's thread finds it within its tick.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            dir.path().join("audit-0000000000.jsonl").exists(),
            "{durability:?}"
        );
        assert_eq!(
            request_ids(dir.path()),
            ["r0", "r1", "r2"],
            "{durability:?}"
        );
        log.record(&event(3, None, "us-east-1")).await.unwrap();
        log.seal_now().unwrap();
        let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
        assert!(r.findings.is_empty(), "{durability:?}: {:?}", r.findings);
        assert_eq!((r.files, r.events), (2, 4), "{durability:?}");
        let [(file, what)] = r.restored.as_slice() else {
            panic!("{durability:?}: {:?}", r.restored)
        };
        assert_eq!(file, "audit-0000000000.jsonl");
        assert!(what.contains("open.jsonl was deleted"), "{what}");
    }
}

/// A file put in place of the open file is moved aside and reported; it is neither sealed
/// as the node's nor billed, and the node's own events are all kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_open_file_is_moved_aside_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
    let log = us_log(dir.path(), &ca, 1 << 20, Durability::Fsync);
    log.record(&event(0, None, "us-east-1")).await.unwrap();
    let forged = serde_json::to_string(&event(9, None, "us-east-1")).unwrap();
    let staged = dir.path().join("staged");
    std::fs::write(&staged, format!("{forged}\n")).unwrap();
    std::fs::rename(&staged, dir.path().join("open.jsonl")).unwrap();
    log.record(&event(1, None, "us-east-1")).await.unwrap();
    log.record(&event(2, None, "us-east-1")).await.unwrap();
    log.seal_now().unwrap();
    assert_eq!(request_ids(dir.path()), ["r0", "r1", "r2"]);
    let r = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
    assert_eq!(r.events, 3);
    let found: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "replaced-0000000000.jsonl: was put in place of open.jsonl while the node wrote it (inserted); the node moved it aside and sealed its own events under their digest"
        ]
    );
    assert_eq!(r.restored.len(), 1, "{:?}", r.restored);
    assert!(
        r.restored[0].1.contains("replaced by another file"),
        "{:?}",
        r.restored
    );
}
