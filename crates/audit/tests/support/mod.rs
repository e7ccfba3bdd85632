//! What the audit trail's tests share: a CA, a region's node key, events and logs.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::sync::Arc;
use std::time::Duration;

use crisp_audit::{
    AdditionalEventData, AuditEvent, AuditLog, Durability, RequestParameters, Sealing, Signer,
};
use crisp_transport::receipt::{Receipt, SignedReceipt};
use crisp_transport::{Ca, RegionIdentity, TlsMaterial};
use time::OffsetDateTime;

pub struct NodeKey(pub TlsMaterial);

impl Signer for NodeKey {
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.0.sign(message)
    }
    fn certificate_der(&self) -> Vec<u8> {
        self.0.cert_der().to_vec()
    }
}

pub fn material(ca: &Ca, region: &str) -> TlsMaterial {
    let now = OffsetDateTime::now_utc();
    let c = ca
        .issue_region(
            region,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        )
        .unwrap();
    TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        c.cert_pem.as_bytes(),
        c.key_pem.as_bytes(),
        &RegionIdentity::new("demo", region),
        u64::try_from(now.unix_timestamp()).unwrap(),
    )
    .unwrap()
}

pub fn event(i: usize, receipt: Option<SignedReceipt>, region: &str) -> AuditEvent<'static> {
    AuditEvent {
        event_version: "1.0".into(),
        event_id: format!("e{i}").into(),
        request_id: format!("r{i}").into(),
        event_name: "ChatCompletion".into(),
        aws_region: "us-east-1".into(),
        request_parameters: RequestParameters {
            model_id: "eu.m".into(),
        },
        additional_event_data: AdditionalEventData {
            inference_region: Some(region.to_owned().into()),
            receipt,
            // What `receipt` attests.
            input_tokens: 1,
            output_tokens: 2,
            ..AdditionalEventData::default()
        },
        ..AuditEvent::default()
    }
}

pub fn receipt(m: &TlsMaterial, i: usize, region: &str) -> SignedReceipt {
    SignedReceipt::sign(
        m,
        &Receipt {
            request_id: format!("r{i}"),
            profile: "eu.m".into(),
            model: "m".into(),
            source_region: "us-east-1".into(),
            inference_region: region.into(),
            input_tokens: 1,
            output_tokens: 2,
            issued_at_ms: u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap() * 1000,
        },
    )
}

/// A us-east-1 log in `dir` sealing files once they reach `max_bytes`.
pub fn us_log(dir: &std::path::Path, ca: &Ca, max_bytes: u64, durability: Durability) -> AuditLog {
    AuditLog::open_with(
        dir,
        "us-east-1",
        Arc::new(NodeKey(material(ca, "us-east-1"))),
        Sealing {
            max_bytes,
            max_age: Duration::from_secs(3600),
        },
        durability,
    )
    .unwrap()
}

pub fn verifier(ca: &Ca) -> crisp_transport::tls::CaVerifier {
    crisp_transport::tls::CaVerifier::from_ca_pem("demo", ca.cert_pem().as_bytes()).unwrap()
}

pub fn request_ids(dir: &std::path::Path) -> Vec<String> {
    crisp_audit::events(dir)
        .unwrap()
        .into_iter()
        .map(|e| e.request_id.into_owned())
        .collect()
}
