//! The trail's invariant, over any run of a node's life: every recorded event is kept,
//! once and in order, and `verify` finds nothing wrong however the node stopped,
//! restarted, crashed mid-write or lost its open file, in either durability.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write as _;
use std::time::Duration;

use crisp_audit::{AuditLog, Durability, verify};
use crisp_transport::Ca;
use proptest::prelude::*;
use support::{event, request_ids, us_log, verifier};
use time::OffsetDateTime;

#[derive(Clone, Debug)]
enum Step {
    /// Record this many events, one after the other.
    Record(usize),
    /// Seal the open file as a stopping node does.
    Seal,
    /// Stop cleanly (seal) and start again.
    Restart,
    /// Stop without sealing and start again: the open file is sealed as found.
    Crash,
    /// Die while writing an event: part of its line is left in the open file.
    CrashMidWrite,
    /// Something deletes the open file while the node runs.
    DeleteOpenFile,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1..6usize).prop_map(Step::Record),
        1 => Just(Step::Seal),
        1 => Just(Step::Restart),
        1 => Just(Step::Crash),
        1 => Just(Step::CrashMidWrite),
        1 => Just(Step::DeleteOpenFile),
    ]
}

fn durability() -> impl Strategy<Value = Durability> {
    prop_oneof![
        Just(Durability::Fsync),
        Just(Durability::Write {
            flush_within: Duration::from_millis(20)
        }),
    ]
}

/// Runs the node's life in a new directory; returns it, what it recorded, and the report.
async fn live(
    steps: &[Step],
    seal_bytes: u64,
    durability: Durability,
    ca: &Ca,
) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let open = |_: ()| us_log(dir.path(), ca, seal_bytes, durability);
    let mut log: AuditLog = open(());
    let mut recorded = Vec::new();
    for step in steps {
        match step {
            Step::Record(n) => {
                for _ in 0..*n {
                    let i = recorded.len();
                    log.record(&event(i, None, "us-east-1")).await.unwrap();
                    recorded.push(format!("r{i}"));
                }
            }
            Step::Seal => log.seal_now().unwrap(),
            Step::Restart => {
                log.seal_now().unwrap();
                drop(log);
                log = open(());
            }
            Step::Crash => {
                drop(log);
                log = open(());
            }
            Step::CrashMidWrite => {
                drop(log);
                // The writer is gone once its thread let go of the trail's lock.
                let lock = std::fs::File::open(dir.path().join(".lock")).unwrap();
                lock.lock().unwrap();
                drop(lock);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("open.jsonl"))
                    .unwrap();
                f.write_all(br#"{"eventVersion":"1.0","eventId":"cut"#)
                    .unwrap();
                drop(f);
                log = open(());
            }
            Step::DeleteOpenFile => {
                let _ = std::fs::remove_file(dir.path().join("open.jsonl"));
            }
        }
    }
    log.seal_now().unwrap();
    drop(log);
    (dir, recorded)
}

async fn run(steps: Vec<Step>, seal_bytes: u64, durability: Durability, ca: &Ca) {
    let (dir, recorded) = live(&steps, seal_bytes, durability, ca).await;
    let report = verify(dir.path(), &verifier(ca), "us-east-1").unwrap();
    assert!(
        report.findings.is_empty(),
        "{steps:?}: {:?}",
        report.findings
    );
    assert_eq!(report.events, recorded.len(), "{steps:?}");
    assert_eq!(report.unsealed, 0, "{steps:?}");
    assert_eq!(request_ids(dir.path()), recorded, "{steps:?}");
}

/// One change made to a trail after the fact.
#[derive(Clone, Debug)]
enum Tamper {
    /// Change a character of an event in a sealed file.
    EditEvent,
    /// Add an event at the end of a sealed file.
    AppendEvent,
    DeleteFile,
    DeleteDigest,
    /// Swap two sealed files' contents.
    SwapFiles,
    /// Add a sealed file no digest lists.
    InsertFile,
}

fn sealed(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-"))
        })
        .collect();
    files.sort();
    files
}

/// Applies `tamper` to the `pick`th sealed file (or its digest); false if the trail has
/// nothing it applies to.
fn tamper(dir: &std::path::Path, tamper: &Tamper, pick: usize) -> bool {
    let files = sealed(dir);
    if files.is_empty() {
        return false;
    }
    let file = &files[pick % files.len()];
    match tamper {
        Tamper::EditEvent => {
            let text = std::fs::read_to_string(file).unwrap();
            std::fs::write(file, text.replacen("\"r", "\"x", 1)).unwrap();
        }
        Tamper::AppendEvent => {
            let line = serde_json::to_string(&event(999, None, "us-east-1")).unwrap();
            let mut text = std::fs::read_to_string(file).unwrap();
            text.push_str(&line);
            text.push('\n');
            std::fs::write(file, text).unwrap();
        }
        Tamper::DeleteFile => std::fs::remove_file(file).unwrap(),
        Tamper::DeleteDigest => {
            let name = file.file_name().unwrap().to_str().unwrap();
            let seq = &name["audit-".len()..name.len() - ".jsonl".len()];
            std::fs::remove_file(dir.join("digests").join(format!("digest-{seq}.json"))).unwrap();
        }
        Tamper::SwapFiles => {
            let other = &files[(pick + 1) % files.len()];
            let (a, b) = (std::fs::read(file).unwrap(), std::fs::read(other).unwrap());
            if a == b {
                return false;
            }
            std::fs::write(file, b).unwrap();
            std::fs::write(other, a).unwrap();
        }
        Tamper::InsertFile => {
            let line = serde_json::to_string(&event(999, None, "us-east-1")).unwrap();
            std::fs::write(dir.join("audit-9999999999.jsonl"), format!("{line}\n")).unwrap();
        }
    }
    true
}

fn tampering() -> impl Strategy<Value = Tamper> {
    prop_oneof![
        Just(Tamper::EditEvent),
        Just(Tamper::AppendEvent),
        Just(Tamper::DeleteFile),
        Just(Tamper::DeleteDigest),
        Just(Tamper::SwapFiles),
        Just(Tamper::InsertFile),
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn every_recorded_event_is_kept_once_and_the_trail_verifies(
        steps in proptest::collection::vec(step(), 1..10),
        seal_bytes in prop_oneof![Just(1u64), Just(700), Just(1 << 20)],
        durability in durability(),
    ) {
        let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
        runtime().block_on(run(steps, seal_bytes, durability, &ca));
    }

    /// Whatever the node's life, any one change to its sealed trail is found (only a
    /// newest digest deleted with its file leaves no trace locally: `--store` finds it).
    #[test]
    fn any_change_to_a_sealed_trail_is_found(
        steps in proptest::collection::vec(step(), 1..8),
        seal_bytes in prop_oneof![Just(1u64), Just(700)],
        durability in durability(),
        change in tampering(),
        pick in 0..16usize,
    ) {
        let ca = Ca::generate("demo", OffsetDateTime::now_utc(), 1).unwrap();
        let (dir, _) = runtime().block_on(live(&steps, seal_bytes, durability, &ca));
        if tamper(dir.path(), &change, pick) {
            let report = verify(dir.path(), &verifier(&ca), "us-east-1").unwrap();
            prop_assert!(!report.findings.is_empty(), "{steps:?} {change:?} {pick}: not found");
        }
    }
}
