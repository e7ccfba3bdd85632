#![allow(clippy::unwrap_used, clippy::expect_used)]

use crisp_transport::receipt::{Receipt, ReceiptError, SignedReceipt};
use crisp_transport::{Ca, RegionIdentity, TlsFiles, TlsMaterial, TlsStore};
use time::{Duration, OffsetDateTime};

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn secs(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp()).unwrap()
}

fn material(ca: &Ca, region: &str) -> TlsMaterial {
    let cert = ca
        .issue_region(
            region,
            now() - Duration::hours(1),
            now() + Duration::days(30),
        )
        .unwrap();
    TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        &RegionIdentity::new(ca.deployment(), region),
        secs(now()),
    )
    .unwrap()
}

fn receipt(region: &str) -> Receipt {
    Receipt {
        request_id: "r1".into(),
        profile: "eu.amazon.nova-lite-v1:0".into(),
        model: "amazon.nova-lite-v1:0".into(),
        source_region: "us-east-1".into(),
        inference_region: region.into(),
        input_tokens: 10,
        output_tokens: 20,
        issued_at_ms: secs(now()) * 1000,
    }
}

#[test]
fn a_region_certificate_names_its_region() {
    let ca = Ca::generate("demo", now(), 365).unwrap();
    let m = material(&ca, "eu-west-1");
    assert_eq!(m.identity, RegionIdentity::new("demo", "eu-west-1"));
    assert_eq!(
        RegionIdentity::from_cert_der(m.cert_der())
            .unwrap()
            .spiffe_uri(),
        "spiffe://demo/region/eu-west-1"
    );
    m.verify_peer_server(m.cert_der(), "eu-west-1", secs(now()))
        .unwrap();
    assert!(
        m.verify_peer_server(m.cert_der(), "us-east-1", secs(now()))
            .is_err()
    );
}

#[test]
fn material_is_refused_for_the_wrong_region_ca_or_time() {
    let ca = Ca::generate("demo", now(), 365).unwrap();
    let other = Ca::generate("demo", now(), 365).unwrap();
    let cert = ca
        .issue_region(
            "eu-west-1",
            now() - Duration::hours(1),
            now() + Duration::days(1),
        )
        .unwrap();
    let load = |ca_pem: &str, region: &str, at: OffsetDateTime| {
        TlsMaterial::from_pem(
            ca_pem.as_bytes(),
            cert.cert_pem.as_bytes(),
            cert.key_pem.as_bytes(),
            &RegionIdentity::new("demo", region),
            secs(at),
        )
    };
    let e = load(ca.cert_pem(), "us-east-1", now())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("issued to spiffe://demo/region/eu-west-1"),
        "{e}"
    );
    let e = load(other.cert_pem(), "eu-west-1", now())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not trusted"), "{e}");
    let e = load(ca.cert_pem(), "eu-west-1", now() + Duration::days(3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not trusted") && e.to_lowercase().contains("expired"),
        "{e}"
    );
    let e = load(ca.cert_pem(), "eu-west-1", now() - Duration::days(3))
        .unwrap_err()
        .to_string();
    assert!(
        e.to_lowercase().contains("not valid yet") || e.to_lowercase().contains("notvalidyet"),
        "{e}"
    );
}

#[test]
fn a_loaded_ca_issues_certificates_the_old_ones_trust() {
    let ca = Ca::generate("demo", now(), 365).unwrap();
    let reloaded = Ca::load("demo", ca.cert_pem(), &ca.key_pem()).unwrap();
    let a = material(&ca, "eu-west-1");
    let b = material(&reloaded, "us-east-1");
    let signed = SignedReceipt::sign(&b, &receipt("us-east-1"));
    assert_eq!(signed.verify(&a.ca).unwrap().inference_region, "us-east-1");
}

#[test]
fn receipts_verify_and_forgeries_do_not() {
    let ca = Ca::generate("demo", now(), 365).unwrap();
    let eu = material(&ca, "eu-west-1");
    let us = material(&ca, "us-east-1");
    let source = material(&ca, "ap-northeast-1");

    let signed = SignedReceipt::sign(&eu, &receipt("eu-west-1"));
    assert_eq!(signed.verify(&source.ca).unwrap(), receipt("eu-west-1"));

    // A US node claiming an EU inference region.
    let lie = SignedReceipt::sign(&us, &receipt("eu-west-1"));
    assert!(matches!(
        lie.verify(&source.ca),
        Err(ReceiptError::WrongRegion { .. })
    ));

    // Tampering with the signed contents.
    let mut tampered = signed.clone();
    tampered.payload = tampered
        .payload
        .replace("\"output_tokens\":20", "\"output_tokens\":2");
    assert_eq!(tampered.verify(&source.ca), Err(ReceiptError::BadSignature));

    // Another deployment's CA.
    let rogue = Ca::generate("demo", now(), 365).unwrap();
    let forged = SignedReceipt::sign(&material(&rogue, "eu-west-1"), &receipt("eu-west-1"));
    assert!(matches!(
        forged.verify(&source.ca),
        Err(ReceiptError::Untrusted(_))
    ));

    // Garbage.
    let mut bad = signed;
    bad.signature = "!!".into();
    assert!(matches!(
        bad.verify(&source.ca),
        Err(ReceiptError::Malformed(_))
    ));
}

#[test]
fn the_store_reloads_changed_files_and_keeps_the_old_on_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("demo", now(), 365).unwrap();
    let write = |cert: &crisp_transport::IssuedCert| {
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("eu-west-1.pem"), &cert.cert_pem).unwrap();
        std::fs::write(dir.path().join("eu-west-1.key"), &cert.key_pem).unwrap();
    };
    let first = ca
        .issue_region(
            "eu-west-1",
            now() - Duration::hours(1),
            now() + Duration::days(1),
        )
        .unwrap();
    write(&first);
    let store = TlsStore::load(
        TlsFiles::in_dir(dir.path(), "eu-west-1"),
        RegionIdentity::new("demo", "eu-west-1"),
        secs(now()),
    )
    .unwrap();
    let before = store.current();
    assert!(!store.reload(secs(now())).unwrap(), "unchanged files");

    let second = ca
        .issue_region(
            "eu-west-1",
            now() - Duration::hours(1),
            now() + Duration::days(2),
        )
        .unwrap();
    write(&second);
    assert!(store.reload(secs(now())).unwrap());
    assert_ne!(store.current().cert_der(), before.cert_der());

    // A broken key file keeps the current material.
    std::fs::write(dir.path().join("eu-west-1.key"), "not a key").unwrap();
    let current = store.current();
    assert!(store.reload(secs(now())).is_err());
    assert_eq!(store.current().cert_der(), current.cert_der());
}
