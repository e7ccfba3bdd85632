//! Audit append throughput: many concurrent requests each waiting for their event to be
//! recorded, with either durability (fsync group commit, or written and flushed later).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use crisp_audit::{
    AdditionalEventData, AuditEvent, AuditLog, Durability, RequestParameters, Sealing, Signer,
    UserIdentity,
};
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

/// An event as a completed in-region chat completion writes it.
fn event() -> AuditEvent<'static> {
    AuditEvent {
        event_version: "1.0".into(),
        event_id: "7a0c3f0e-9d53-4a53-a3c6-2f51b8cf1d2e".into(),
        event_time: "2026-11-29T06:00:00.123456Z".into(),
        event_source: "crisp".into(),
        event_name: "ChatCompletion".into(),
        aws_region: "eu-central-1".into(),
        user_identity: UserIdentity {
            kind: "Principal".into(),
            principal_id: "team-search".into(),
            account_id: "123456789012".into(),
            access_key_id: "k-3f2a9c1b7d4e".into(),
        },
        source_ip_address: "10.0.3.17".into(),
        user_agent: "OpenAI/Python 1.99.0".into(),
        request_id: "0123456789abcdef0123456789abcdef".into(),
        request_parameters: RequestParameters {
            model_id: "eu.amazon.nova-lite-v1:0".into(),
        },
        additional_event_data: AdditionalEventData {
            inference_region: Some("eu-central-1".into()),
            profile_id: Some("eu.amazon.nova-lite-v1:0".into()),
            input_tokens: 42,
            output_tokens: 128,
            cost_usd: 0.000_12,
            ..AdditionalEventData::default()
        },
        ..AuditEvent::default()
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let event = event();
    let mut group = c.benchmark_group("audit");
    group.bench_function("encode one event (JSON line)", |b| {
        b.iter(|| serde_json::to_vec(std::hint::black_box(&event)).unwrap())
    });
    let durabilities = [
        ("fsync", Durability::Fsync),
        (
            "write",
            Durability::Write {
                flush_within: Duration::from_millis(100),
            },
        ),
    ];
    for (name, durability) in durabilities {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with(
            dir.path(),
            "r",
            Arc::new(NoKey),
            Sealing {
                max_bytes: 64 << 20,
                max_age: Duration::from_secs(3600),
            },
            durability,
        )
        .unwrap();
        for concurrency in [1usize, 64] {
            group.throughput(Throughput::Elements(concurrency as u64));
            group.bench_function(format!("append ({name}), {concurrency} concurrent"), |b| {
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
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
