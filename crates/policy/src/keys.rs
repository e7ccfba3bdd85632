//! Principals and their credentials, as files an operator reviews and `crisp keys` edits.
//!
//! API keys (`Authorization: Bearer ...`) are kept only as SHA-256 hashes: a key is shown
//! once, at creation. SigV4 secrets must be kept as they are (the signature is an HMAC
//! over them), so the key file is written readable by its owner only.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Principal;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalFile {
    #[serde(default, rename = "principal")]
    principals: Vec<RawPrincipal>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    id: String,
    #[serde(default = "default_account")]
    account: String,
    team: String,
    #[serde(default)]
    tags: Vec<String>,
}

fn default_account() -> String {
    "000000000000".into()
}

/// Parses a principals file; every problem is reported.
pub fn parse_principals(src: &str) -> Result<Vec<Principal>, Vec<String>> {
    let file: PrincipalFile = toml::from_str(src).map_err(|e| vec![e.to_string()])?;
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for p in &file.principals {
        if p.id.is_empty()
            || !p
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            errors.push(format!(
                "principal id {:?} must be letters, digits, '-', '_', '.' or '@'",
                p.id
            ));
        }
        if !seen.insert(p.id.clone()) {
            errors.push(format!("principal {} is defined twice", p.id));
        }
        for t in &p.tags {
            if !t.contains('=') {
                errors.push(format!(
                    "principal {}: tag {t:?} must be key=value, e.g. \"residency=eu\"",
                    p.id
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(file
        .principals
        .into_iter()
        .map(|p| Principal {
            id: p.id,
            account: p.account,
            team: p.team,
            tags: p.tags,
        })
        .collect())
}

/// One API key, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Short public handle, for listing and revoking.
    pub id: String,
    pub principal: String,
    pub sha256: String,
    pub created: String,
    #[serde(default)]
    pub revoked: bool,
}

/// One SigV4 credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigV4Credential {
    pub access_key_id: String,
    pub secret: String,
    pub principal: String,
    #[serde(default)]
    pub revoked: bool,
}

impl std::fmt::Debug for SigV4Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigV4Credential")
            .field("access_key_id", &self.access_key_id)
            .field("principal", &self.principal)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

/// The key file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyStore {
    #[serde(default, rename = "key")]
    pub keys: Vec<ApiKey>,
    #[serde(default, rename = "sigv4")]
    pub sigv4: Vec<SigV4Credential>,
}

/// Why a bearer key was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no API key: send `Authorization: Bearer <key>` with a key from `crisp keys create`")]
    Missing,
    #[error("the Authorization header is not `Bearer <key>`")]
    Malformed,
    #[error(
        "the API key is not known to this deployment; check for typos or create one with `crisp keys create`"
    )]
    Unknown,
    #[error("the API key {0} was revoked; ask an administrator for a new one")]
    Revoked(String),
}

impl KeyError {
    /// The ID of the key that was presented, when it is known: a revoked key's.
    pub fn key_id(&self) -> Option<&str> {
        match self {
            KeyError::Revoked(id) => Some(id),
            _ => None,
        }
    }
}

/// SHA-256 of a key, hex.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl KeyStore {
    pub fn parse(src: &str) -> Result<KeyStore, String> {
        toml::from_str(src).map_err(|e| e.to_string())
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# crisp API keys (SHA-256 hashes) and SigV4 credentials. Written by `crisp keys`.\n# Keep this file readable by the node's user only.\n{body}"
        )
    }

    /// Adds a key for `principal`; returns the plaintext key, to be shown once.
    /// `random` must be fresh secret randomness (at least 16 bytes).
    pub fn create(&mut self, principal: &str, random: &[u8], now: &str) -> (ApiKey, String) {
        let secret = hex::encode(random);
        let plaintext = format!("crisp-{secret}");
        let hash = hash_key(&plaintext);
        let key = ApiKey {
            id: format!("k-{}", &hash[..12]),
            principal: principal.to_owned(),
            sha256: hash,
            created: now.to_owned(),
            revoked: false,
        };
        self.keys.push(key.clone());
        (key, plaintext)
    }

    /// Revokes by key ID or SigV4 access key ID; false if there is no such key.
    pub fn revoke(&mut self, id: &str) -> bool {
        let mut found = false;
        for k in self.keys.iter_mut().filter(|k| k.id == id) {
            k.revoked = true;
            found = true;
        }
        for c in self.sigv4.iter_mut().filter(|c| c.access_key_id == id) {
            c.revoked = true;
            found = true;
        }
        found
    }

    /// An index for request-time lookups.
    pub fn index(&self) -> KeyIndex {
        KeyIndex {
            by_hash: self
                .keys
                .iter()
                .map(|k| {
                    (
                        k.sha256.clone(),
                        (
                            Caller {
                                principal: k.principal.as_str().into(),
                                key_id: k.id.as_str().into(),
                            },
                            k.revoked,
                        ),
                    )
                })
                .collect(),
            sigv4: self
                .sigv4
                .iter()
                .map(|c| {
                    (
                        c.access_key_id.clone(),
                        SigV4Key {
                            secret: c.secret.clone(),
                            principal: c.principal.clone(),
                            revoked: c.revoked,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Who a credential belongs to, and which credential it was (an API key's ID or a SigV4
/// access key ID): what an audit event's `userIdentity` records. Shared text: the index
/// hands out a copy per request without allocating.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub principal: Arc<str>,
    pub key_id: Arc<str>,
}

/// A SigV4 credential, as looked up by its access key ID.
#[derive(Clone, PartialEq, Eq)]
pub struct SigV4Key {
    pub secret: String,
    pub principal: String,
    /// A revoked key's signatures are still checked, so that only its holder learns
    /// that it was revoked.
    pub revoked: bool,
}

/// Request-time lookups of credentials.
#[derive(Clone, Default)]
pub struct KeyIndex {
    /// Key hash → its caller, and whether the key is revoked.
    by_hash: HashMap<String, (Caller, bool)>,
    /// Access key ID → its credential, revoked ones included.
    sigv4: HashMap<String, SigV4Key>,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("api_keys", &self.by_hash.len())
            .field("sigv4", &self.sigv4.len())
            .finish()
    }
}

impl KeyIndex {
    /// The caller of an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, KeyError> {
        let value = authorization.ok_or(KeyError::Missing)?;
        // The scheme is case-insensitive (RFC 9110 section 11.1).
        let key = value
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim())
            .filter(|k| !k.is_empty())
            .ok_or(KeyError::Malformed)?;
        match self.by_hash.get(&hash_key(key)) {
            None => Err(KeyError::Unknown),
            Some((caller, true)) => Err(KeyError::Revoked(caller.key_id.to_string())),
            Some((caller, false)) => Ok(caller.clone()),
        }
    }

    /// The SigV4 credential of an access key ID, revoked or not.
    pub fn sigv4(&self, access_key_id: &str) -> Option<&SigV4Key> {
        self.sigv4.get(access_key_id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_hashed_shown_once_and_revocable() {
        let mut store = KeyStore::default();
        let (entry, key) = store.create("alice", &[7u8; 16], "2026-11-28T00:00:00Z");
        let text = store.to_toml();
        assert!(!text.contains(&key), "the key itself is never stored");
        let store = KeyStore::parse(&text).unwrap();
        let idx = store.index();
        assert_eq!(
            idx.authenticate(Some(&format!("Bearer {key}"))).unwrap(),
            Caller {
                principal: "alice".into(),
                key_id: entry.id.as_str().into(),
            }
        );
        // The scheme in any case, as RFC 9110 has it.
        assert_eq!(
            idx.authenticate(Some(&format!("bearer {key}")))
                .unwrap()
                .key_id,
            entry.id.as_str().into()
        );
        assert_eq!(idx.authenticate(None), Err(KeyError::Missing));
        assert_eq!(idx.authenticate(Some("Basic x")), Err(KeyError::Malformed));
        assert_eq!(idx.authenticate(Some("Bearer ")), Err(KeyError::Malformed));
        assert_eq!(idx.authenticate(Some("Bearer")), Err(KeyError::Malformed));
        assert_eq!(
            idx.authenticate(Some("Bearer crisp-nope")),
            Err(KeyError::Unknown)
        );
        let mut store = store;
        assert!(store.revoke(&entry.id));
        assert_eq!(
            store.index().authenticate(Some(&format!("Bearer {key}"))),
            Err(KeyError::Revoked(entry.id))
        );
    }

    #[test]
    fn principal_files_report_every_problem() {
        let errs = parse_principals(
            "[[principal]]\nid = \"a b\"\nteam = \"t\"\ntags = [\"eu\"]\n[[principal]]\nid = \"a b\"\nteam = \"t\"\n",
        )
        .unwrap_err();
        assert_eq!(errs.len(), 4, "{errs:?}");
    }
}
