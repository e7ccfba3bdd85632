//! Signed receipts on the cross-region path: the destination signs one per forwarded
//! answer, the source verifies it (the signer's certificate chain, then the signature).
#![allow(clippy::unwrap_used)]

use crisp_transport::receipt::{Receipt, SignedReceipt};
use crisp_transport::tls::CaVerifier;
use crisp_transport::{Ca, RegionIdentity, TlsMaterial};
use criterion::{Criterion, criterion_group, criterion_main};
use time::{Duration, OffsetDateTime};

fn receipts(c: &mut Criterion) {
    let now = OffsetDateTime::now_utc();
    let at = u64::try_from(now.unix_timestamp()).unwrap();
    let ca = Ca::generate("bench", now - Duration::hours(1), 365).unwrap();
    let cert = ca
        .issue_region(
            "eu-west-1",
            now - Duration::hours(1),
            now + Duration::days(30),
        )
        .unwrap();
    let destination = TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        &RegionIdentity::new("bench", "eu-west-1"),
        at,
    )
    .unwrap();
    let receipt = Receipt {
        request_id: "0123456789abcdef0123456789abcdef".into(),
        profile: "global.bench".into(),
        model: "bench".into(),
        source_region: "eu-central-1".into(),
        inference_region: "eu-west-1".into(),
        input_tokens: 9,
        output_tokens: 5,
        issued_at_ms: at * 1000,
    };
    let signed = SignedReceipt::sign(&destination, &receipt);
    let verifier = || CaVerifier::from_ca_pem("bench", ca.cert_pem().as_bytes()).unwrap();

    let mut g = c.benchmark_group("receipt");
    g.bench_function("sign (destination)", |b| {
        b.iter(|| SignedReceipt::sign(&destination, &receipt));
    });
    // What every forwarded answer cost the source before the verifier remembered the
    // certificates it had accepted: the chain checked each time.
    g.bench_function(
        "verify, chain checked (source, first receipt of a second)",
        |b| {
            b.iter_batched(
                verifier,
                |v| signed.verify(&v).unwrap(),
                criterion::BatchSize::SmallInput,
            );
        },
    );
    let remembering = verifier();
    g.bench_function("verify, chain remembered (source, the others)", |b| {
        b.iter(|| signed.verify(&remembering).unwrap());
    });
    g.finish();
}

criterion_group!(benches, receipts);
criterion_main!(benches);
