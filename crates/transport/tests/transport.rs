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

mod accepted_chains {
    use super::*;
    use crisp_transport::tls::CaVerifier;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    struct World {
        ca_pem: String,
        /// DER of: a valid region certificate, one that expired, one not yet valid, one
        /// from another CA of the same name, one from another deployment.
        certs: Vec<Vec<u8>>,
        start: u64,
    }

    fn der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    fn world() -> &'static World {
        static W: OnceLock<World> = OnceLock::new();
        W.get_or_init(|| {
            let t = now();
            let ca = Ca::generate("demo", t - Duration::days(10), 365).unwrap();
            let other = Ca::generate("demo", t - Duration::days(10), 365).unwrap();
            let elsewhere = Ca::generate("prod", t - Duration::days(10), 365).unwrap();
            let issue = |ca: &Ca, region: &str, from: Duration, to: Duration| {
                der(&ca.issue_region(region, t + from, t + to).unwrap().cert_pem)
            };
            World {
                ca_pem: ca.cert_pem().to_owned(),
                certs: vec![
                    issue(&ca, "eu-west-1", -Duration::days(1), Duration::days(1)),
                    issue(&ca, "us-east-1", -Duration::days(3), -Duration::days(2)),
                    issue(&ca, "eu-central-1", Duration::days(2), Duration::days(3)),
                    issue(&other, "eu-west-1", -Duration::days(1), Duration::days(1)),
                    issue(
                        &elsewhere,
                        "eu-west-1",
                        -Duration::days(1),
                        Duration::days(1),
                    ),
                ],
                start: secs(t - Duration::days(4)),
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A verifier that remembers what it accepted answers every question, in any
        /// order, exactly as a verifier that has never seen the certificate before.
        #[test]
        fn remembering_changes_no_answer(
            asks in proptest::collection::vec((0usize..5, 0u64..8 * 86_400), 1..40)
        ) {
            let w = world();
            let remembering = CaVerifier::from_ca_pem("demo", w.ca_pem.as_bytes()).unwrap();
            for (cert, offset) in asks {
                let at = w.start + offset;
                let fresh = CaVerifier::from_ca_pem("demo", w.ca_pem.as_bytes()).unwrap();
                prop_assert_eq!(
                    remembering.verify(&w.certs[cert], at),
                    fresh.verify(&w.certs[cert], at)
                );
                // Asked again at once: the remembered answer.
                prop_assert_eq!(
                    remembering.verify(&w.certs[cert], at),
                    fresh.verify(&w.certs[cert], at)
                );
            }
        }
    }

    #[test]
    fn each_kind_of_certificate_gets_its_answer() {
        let w = world();
        let v = CaVerifier::from_ca_pem("demo", w.ca_pem.as_bytes()).unwrap();
        let at = w.start + 4 * 86_400;
        for _ in 0..2 {
            assert_eq!(
                v.verify(&w.certs[0], at).unwrap(),
                RegionIdentity::new("demo", "eu-west-1")
            );
            for (i, why) in [
                (1, "expired"),
                (2, "not valid yet"),
                (3, "not trusted"),
                (4, "not trusted"),
            ] {
                let e = v.verify(&w.certs[i], at).unwrap_err().to_lowercase();
                assert!(
                    e.contains(why) || e.contains(&why.replace(' ', "")),
                    "{i}: {e}"
                );
            }
        }
    }
}
