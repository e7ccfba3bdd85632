//! Signed processing receipts: the destination's signed statement of where a request ran,
//! verifiable later by anyone holding the deployment CA certificate.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::tls::{CaVerifier, TlsMaterial};

/// What the destination attests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub request_id: String,
    /// The profile or model ID the request came through.
    pub profile: String,
    pub model: String,
    pub source_region: String,
    pub inference_region: String,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// When the destination finished, in Unix milliseconds.
    pub issued_at_ms: u64,
}

/// A receipt with its signature and the signer's certificate. Stability promise: this is
/// what audit records keep.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The receipt as the exact JSON bytes that were signed.
    pub payload: String,
    /// Ed25519 signature over `payload`, base64.
    pub signature: String,
    /// The signer's certificate, DER in base64.
    pub certificate: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("malformed receipt: {0}")]
    Malformed(String),
    #[error("receipt signer not trusted: {0}")]
    Untrusted(String),
    #[error("receipt claims region {claimed} but is signed by region {signer}")]
    WrongRegion { claimed: String, signer: String },
    #[error("receipt signature does not match its contents")]
    BadSignature,
}

impl SignedReceipt {
    /// Signs a receipt with this node's key.
    pub fn sign(material: &TlsMaterial, receipt: &Receipt) -> SignedReceipt {
        let payload = serde_json::to_string(receipt).unwrap_or_default();
        let signature = material.sign(payload.as_bytes());
        SignedReceipt {
            payload,
            signature: B64.encode(signature),
            certificate: B64.encode(material.cert_der()),
        }
    }

    /// Checks the signer's certificate against the CA (at the receipt's own time, so old
    /// receipts stay verifiable after rotation), that the signer is the region the receipt
    /// names, and the signature. Returns the receipt.
    pub fn verify(&self, ca: &CaVerifier) -> Result<Receipt, ReceiptError> {
        let receipt: Receipt = serde_json::from_str(&self.payload)
            .map_err(|e| ReceiptError::Malformed(e.to_string()))?;
        let cert = B64
            .decode(&self.certificate)
            .map_err(|e| ReceiptError::Malformed(format!("certificate: {e}")))?;
        let signature = B64
            .decode(&self.signature)
            .map_err(|e| ReceiptError::Malformed(format!("signature: {e}")))?;
        let signer = ca
            .verify(&cert, receipt.issued_at_ms / 1000)
            .map_err(ReceiptError::Untrusted)?;
        if signer.region != receipt.inference_region {
            return Err(ReceiptError::WrongRegion {
                claimed: receipt.inference_region,
                signer: signer.region,
            });
        }
        verify_signature(&cert, self.payload.as_bytes(), &signature).map_err(|e| {
            if e.starts_with("certificate") {
                ReceiptError::Malformed(e)
            } else {
                ReceiptError::BadSignature
            }
        })?;
        Ok(receipt)
    }
}

/// Checks an Ed25519 signature made with the key of a DER certificate (whose trust the
/// caller has established).
pub fn verify_signature(cert: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
    let (_, parsed) = X509Certificate::from_der(cert).map_err(|e| format!("certificate: {e}"))?;
    let key = parsed.public_key().subject_public_key.data.to_vec();
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, signature)
        .map_err(|_| "signature does not match".to_owned())
}
