//! Audit append throughput with fsync group commit: many concurrent requests each waiting
//! for their event to be durable.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use crisp_audit::{AuditEvent, AuditLog, Sealing, Signer};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

struct NoKey;
impl Signer for NoKey {
    fn sign(&self, _: &[u8]) -> Vec<u8> {
        vec![0; 64]
    }
    fn certificate_der(&self) -> Vec<u8> {
        Vec::new()
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(
        dir.path(),
        "r",
        Arc::new(NoKey),
        Sealing {
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(3600),
        },
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let event = AuditEvent {
        event_version: "1.0".into(),
        event_name: "ChatCompletion".into(),
        request_id: "0123456789abcdef0123456789abcdef".into(),
        ..AuditEvent::default()
    };
    let mut group = c.benchmark_group("audit");
    for concurrency in [1usize, 64] {
        group.throughput(Throughput::Elements(concurrency as u64));
        group.bench_function(format!("durable append, {concurrency} concurrent"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let tasks: Vec<_> = (0..concurrency)
                        .map(|_| {
                            let log = log.clone();
                            let event = event.clone();
                            tokio::spawn(async move { log.record(&event).await.unwrap() })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
