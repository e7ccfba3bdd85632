//! Region identities carried by certificates.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Who a certificate says it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RegionIdentity {
    pub deployment: String,
    pub region: String,
}

impl RegionIdentity {
    pub fn new(deployment: &str, region: &str) -> RegionIdentity {
        RegionIdentity {
            deployment: deployment.to_owned(),
            region: region.to_owned(),
        }
    }

    /// `spiffe://<deployment>/region/<code>`
    pub fn spiffe_uri(&self) -> String {
        format!("spiffe://{}/region/{}", self.deployment, self.region)
    }

    /// The DNS name TLS clients verify: `<code>.<deployment>.crisp`.
    pub fn server_name(&self) -> String {
        server_name(&self.deployment, &self.region)
    }

    /// Parses a SPIFFE URI of the form above.
    pub fn from_spiffe(uri: &str) -> Option<RegionIdentity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (deployment, path) = rest.split_once('/')?;
        let region = path.strip_prefix("region/")?;
        if deployment.is_empty() || region.is_empty() || region.contains('/') {
            return None;
        }
        Some(RegionIdentity::new(deployment, region))
    }

    /// The identity in a DER certificate (its SPIFFE URI SAN), if it has exactly one.
    pub fn from_cert_der(der: &[u8]) -> Option<RegionIdentity> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut found = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(u) => RegionIdentity::from_spiffe(u),
            _ => None,
        });
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }
}

impl fmt::Display for RegionIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_uri())
    }
}

/// The DNS name of a region's node certificate.
pub fn server_name(deployment: &str, region: &str) -> String {
    format!("{region}.{deployment}.crisp")
}
