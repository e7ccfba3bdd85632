//! The backbone's security, and only that: the deployment CA, region certificates whose
//! identity names their region, the mutual-TLS configurations of peer links, and signed
//! processing receipts.
//!
//! A region's identity is the URI SAN `spiffe://<deployment>/region/<code>` of its
//! certificate, plus a DNS SAN `<code>.<deployment>.crisp` that TLS clients verify (so a
//! certificate for another region fails the handshake). Keys are Ed25519.
//!
//! Nothing here knows HTTP, routing or the catalog.

pub mod certs;
pub mod identity;
pub mod receipt;
pub mod tls;

pub use certs::{Ca, CertError, IssuedCert};
pub use identity::RegionIdentity;
pub use receipt::{Receipt, ReceiptError, SignedReceipt};
pub use tls::{TlsError, TlsFiles, TlsMaterial, TlsStore};
