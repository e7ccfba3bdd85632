//! Issuing the deployment CA and region certificates (`crisp certs ...`).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::RegionIdentity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA files are not a usable CA certificate and key: {0}")]
    BadCa(String),
    #[error("{0:?} is not a valid {1}: use lowercase letters, digits and '-'")]
    BadName(String, &'static str),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A deployment CA able to issue region certificates.
pub struct Ca {
    deployment: String,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn check_name(s: &str, what: &'static str) -> Result<(), CertError> {
    let ok = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CertError::BadName(s.to_owned(), what))
    }
}

impl Ca {
    /// Creates a new CA for a deployment, valid from `now` for `days`.
    pub fn generate(deployment: &str, now: OffsetDateTime, days: i64) -> Result<Ca, CertError> {
        check_name(deployment, "deployment name")?;
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("crisp {deployment} deployment CA"),
        );
        dn.push(DnType::OrganizationName, format!("crisp/{deployment}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(days);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            deployment: deployment.to_owned(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`Ca::generate`] (its certificate and key PEM).
    pub fn load(deployment: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        check_name(deployment, "deployment name")?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::BadCa(e.to_string()))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CertError::BadCa(e.to_string()))?;
        Ok(Ca {
            deployment: deployment.to_owned(),
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// Issues the certificate of a region's node, valid in `[not_before, not_after)`.
    /// Usable both as a TLS server and client certificate.
    pub fn issue_region(
        &self,
        region: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CertError> {
        check_name(region, "region code")?;
        let identity = RegionIdentity::new(&self.deployment, region);
        let key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::new(vec![identity.server_name()])?;
        params
            .subject_alt_names
            .push(SanType::URI(identity.spiffe_uri().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("crisp {region}"));
        dn.push(
            DnType::OrganizationName,
            format!("crisp/{}", self.deployment),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
