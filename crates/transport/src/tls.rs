//! Mutual-TLS configurations for peer links (TLS 1.3 only), loaded from PEM files and
//! reloadable without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ring::signature::Ed25519KeyPair;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::identity::RegionIdentity;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn invalid(what: impl Into<String>, message: impl ToString) -> TlsError {
    TlsError::Invalid {
        what: what.into(),
        message: message.to_string(),
    }
}

/// Where a node's CA, certificate and key live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout `crisp certs` writes: `ca.pem`, `<region>.pem`, `<region>.key`.
    pub fn in_dir(dir: &Path, region: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{region}.pem")),
            key: dir.join(format!("{region}.key")),
        }
    }

    fn read(&self) -> Result<[Vec<u8>; 3], TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ok([read(&self.ca)?, read(&self.cert)?, read(&self.key)?])
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies that a certificate was issued by the deployment CA to a region of that
/// deployment, independent of any connection. Used for receipts.
#[derive(Clone, Debug)]
pub struct CaVerifier {
    deployment: String,
    verifier: Arc<dyn ClientCertVerifier>,
    accepted: Arc<Mutex<Accepted>>,
}

/// Certificates this verifier has accepted, each with the second it was checked at.
/// Checking a chain is a function of the certificate, the roots and the time to the
/// second (webpki reads no finer), and costs a signature verification; a source node
/// checks the receipt of every forwarded answer, signed by the same few certificates
/// again and again. So an identical question is answered from here: same certificate
/// bytes, same second, same verifier (its roots never change; a new CA makes a new
/// verifier). Refusals are not kept, and so are never answered from here.
#[derive(Debug, Default)]
struct Accepted {
    entries: Vec<(u64, Vec<u8>, RegionIdentity)>,
}

impl Accepted {
    /// A few regions sign at a time; each keeps one entry per second in use.
    const MAX: usize = 32;

    fn get(&self, cert: &[u8], at: u64) -> Option<RegionIdentity> {
        self.entries
            .iter()
            .find(|(t, c, _)| *t == at && c.as_slice() == cert)
            .map(|(_, _, id)| id.clone())
    }

    fn insert(&mut self, cert: &[u8], at: u64, id: &RegionIdentity) {
        if self.entries.len() >= Self::MAX {
            // Receipts arrive in time order: the oldest second is the least likely asked
            // again.
            if let Some(oldest) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].0) {
                self.entries.swap_remove(oldest);
            }
        }
        self.entries.push((at, cert.to_vec(), id.clone()));
    }
}

impl CaVerifier {
    pub fn from_ca_pem(deployment: &str, ca_pem: &[u8]) -> Result<CaVerifier, TlsError> {
        let roots = roots(ca_pem)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| invalid("CA certificate", e))?;
        Ok(CaVerifier {
            deployment: deployment.to_owned(),
            verifier,
            accepted: Arc::default(),
        })
    }

    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// Checks the chain at `at_unix_secs` and returns the certificate's region identity.
    pub fn verify(&self, cert: &[u8], at_unix_secs: u64) -> Result<RegionIdentity, String> {
        if let Some(id) = self.accepted().get(cert, at_unix_secs) {
            return Ok(id);
        }
        let id = self.check(cert, at_unix_secs)?;
        self.accepted().insert(cert, at_unix_secs, &id);
        Ok(id)
    }

    fn accepted(&self) -> std::sync::MutexGuard<'_, Accepted> {
        // The list is valid after any panic in its short methods; keep using it.
        self.accepted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(&self, cert: &[u8], at_unix_secs: u64) -> Result<RegionIdentity, String> {
        let der = CertificateDer::from(cert.to_vec());
        self.verifier
            .verify_client_cert(
                &der,
                &[],
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(at_unix_secs)),
            )
            .map_err(|e| format!("certificate not trusted: {e}"))?;
        let id = RegionIdentity::from_cert_der(cert)
            .ok_or_else(|| "certificate has no region identity".to_owned())?;
        if id.deployment != self.deployment {
            return Err(format!(
                "certificate belongs to deployment {}, not {}",
                id.deployment, self.deployment
            ));
        }
        Ok(id)
    }
}

fn roots(ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| invalid("CA certificate", e))?;
        roots.add(cert).map_err(|e| invalid("CA certificate", e))?;
        n += 1;
    }
    if n == 0 {
        return Err(invalid("CA certificate", "no PEM certificate found"));
    }
    Ok(roots)
}

/// A node's loaded TLS material: its identity, the configs of both ends of a peer link,
/// and its signing key for receipts.
pub struct TlsMaterial {
    pub identity: RegionIdentity,
    /// For the peer listener: a client certificate from the deployment CA is required.
    pub server: Arc<ServerConfig>,
    /// For dialling peers: presents this node's certificate, trusts only the CA.
    pub client: Arc<ClientConfig>,
    pub ca: CaVerifier,
    server_verifier: Arc<WebPkiServerVerifier>,
    signer: Ed25519KeyPair,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Builds the material from PEM text, checking that the certificate chains to the CA
    /// at `now_unix_secs` and names `expected` (deployment and region).
    pub fn from_pem(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        expected: &RegionIdentity,
        now_unix_secs: u64,
    ) -> Result<TlsMaterial, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("node certificate", e))?;
        let Some(leaf) = certs.first().cloned() else {
            return Err(invalid("node certificate", "no PEM certificate found"));
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid("node key", e))?;
        let signer = Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.secret_der()).map_err(|e| {
            invalid(
                "node key",
                format!("not an Ed25519 PKCS#8 key ({e}); issue keys with `crisp certs issue`"),
            )
        })?;
        let ca = CaVerifier::from_ca_pem(&expected.deployment, ca_pem)?;
        let id = ca
            .verify(&leaf, now_unix_secs)
            .map_err(|e| invalid("node certificate", e))?;
        if id != *expected {
            return Err(invalid(
                "node certificate",
                format!("it is issued to {id}, but this node is {expected}"),
            ));
        }
        let roots = Arc::new(roots(ca_pem)?);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| invalid("CA certificate", e))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("TLS", e))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| invalid("node certificate and key", e))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        // ALPN (h2) is set by the HTTP connector that uses this config.
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("TLS", e))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(certs, key)
            .map_err(|e| invalid("node certificate and key", e))?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| invalid("CA certificate", e))?;
        Ok(TlsMaterial {
            identity: id,
            server: Arc::new(server),
            client: Arc::new(client),
            ca,
            server_verifier,
            signer,
            cert_der: leaf.to_vec(),
        })
    }

    /// Reads the three files and builds the material.
    pub fn load(
        files: &TlsFiles,
        expected: &RegionIdentity,
        now_unix_secs: u64,
    ) -> Result<TlsMaterial, TlsError> {
        let [ca, cert, key] = files.read()?;
        TlsMaterial::from_pem(&ca, &cert, &key, expected, now_unix_secs)
    }

    /// Signs `message` with the node key.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signer.sign(message).as_ref().to_vec()
    }

    /// This node's certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// When this node's certificate expires (Unix seconds).
    pub fn not_after_unix(&self) -> Option<i64> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(&self.cert_der).ok()?;
        Some(cert.validity().not_after.timestamp())
    }

    /// Whether a peer certificate is valid for `region` of this deployment now (the check
    /// a TLS client does, usable outside a handshake).
    pub fn verify_peer_server(
        &self,
        cert: &[u8],
        region: &str,
        now_unix_secs: u64,
    ) -> Result<(), String> {
        let name = ServerName::try_from(crate::identity::server_name(
            &self.identity.deployment,
            region,
        ))
        .map_err(|e| e.to_string())?;
        self.server_verifier
            .verify_server_cert(
                &CertificateDer::from(cert.to_vec()),
                &[],
                &name,
                &[],
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(now_unix_secs)),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A TLS server config for the client-facing API (no client certificates).
pub fn client_api_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("client API certificate", e))?;
    if certs.is_empty() {
        return Err(invalid(
            "client API certificate",
            "no PEM certificate found",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid("client API key", e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid("TLS", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("client API certificate and key", e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The node's current TLS material, swapped atomically when the files change.
pub struct TlsStore {
    files: Option<TlsFiles>,
    expected: RegionIdentity,
    current: ArcSwap<TlsMaterial>,
    last_read: Mutex<Option<[Vec<u8>; 3]>>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore")
            .field("files", &self.files)
            .field("identity", &self.expected)
            .finish_non_exhaustive()
    }
}

impl TlsStore {
    /// Loads the files once; [`TlsStore::reload`] picks up later changes.
    pub fn load(
        files: TlsFiles,
        expected: RegionIdentity,
        now_unix_secs: u64,
    ) -> Result<TlsStore, TlsError> {
        let bytes = files.read()?;
        let material =
            TlsMaterial::from_pem(&bytes[0], &bytes[1], &bytes[2], &expected, now_unix_secs)?;
        Ok(TlsStore {
            files: Some(files),
            expected,
            current: ArcSwap::from_pointee(material),
            last_read: Mutex::new(Some(bytes)),
        })
    }

    /// Material that never changes (generated in memory).
    pub fn fixed(material: TlsMaterial) -> TlsStore {
        TlsStore {
            files: None,
            expected: material.identity.clone(),
            current: ArcSwap::from_pointee(material),
            last_read: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Arc<TlsMaterial> {
        self.current.load_full()
    }

    pub fn identity(&self) -> &RegionIdentity {
        &self.expected
    }

    /// Re-reads the files; if they changed and are valid, swaps them in and returns true.
    /// Invalid new files leave the current material in place and return the error.
    pub fn reload(&self, now_unix_secs: u64) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let bytes = files.read()?;
        let mut last = self.last_read.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&bytes) {
            return Ok(false);
        }
        let material = TlsMaterial::from_pem(
            &bytes[0],
            &bytes[1],
            &bytes[2],
            &self.expected,
            now_unix_secs,
        )?;
        self.current.store(Arc::new(material));
        *last = Some(bytes);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_certificates_are_bounded_and_the_oldest_second_goes_first() {
        let id = RegionIdentity::new("demo", "eu-west-1");
        let mut a = Accepted::default();
        for at in 0..100 {
            a.insert(b"cert", at, &id);
            assert!(a.entries.len() <= Accepted::MAX);
        }
        assert_eq!(a.get(b"cert", 99), Some(id.clone()));
        assert_eq!(a.get(b"cert", 100 - Accepted::MAX as u64), Some(id.clone()));
        assert_eq!(a.get(b"cert", 99 - Accepted::MAX as u64), None);
        assert_eq!(a.get(b"other", 99), None);
    }
}
