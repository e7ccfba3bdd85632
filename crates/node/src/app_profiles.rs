//! Application inference profiles: user-created copies of a model or a system profile,
//! with tags, for tracking cost per team or application. They route exactly like the
//! profile they copy.
//!
//! They live in an object store shared by the whole deployment (a local directory for the
//! embedded default, an S3 bucket in production), one JSON object per profile name.
//! Creation uses a conditional put, so two nodes racing to create the same name cannot
//! both win; every node re-lists the store periodically, so a profile created through one
//! node is usable through all of them.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// An application profile as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppProfile {
    /// Opaque, as in the managed service's ARNs.
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The model or system profile ID it copies.
    pub copy_from: String,
    /// For a copy of a model (not of a system profile): the region it was created in,
    /// the only one it runs in, as a foundation model's ARN names one region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub tags: Vec<(String, String)>,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default)]
    pub client_request_token: Option<String>,
}

impl AppProfile {
    /// The profile as policies see it (`context.application`).
    pub fn policy_facts(&self) -> crisp_policy::Application {
        crisp_policy::Application {
            id: self.id.clone(),
            name: self.name.clone(),
            tags: policy_tags(&self.tags),
        }
    }
}

/// Tags as policies see them: `key=value` strings, like principals' tags.
pub fn policy_tags(tags: &[(String, String)]) -> Vec<String> {
    tags.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppProfileError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "an application inference profile named {0:?} already exists; pick another name or delete it first"
    )]
    Conflict(String),
    #[error("application inference profile {0:?} does not exist")]
    NotFound(String),
    #[error("the profile store is unavailable: {0}; retry later")]
    Store(String),
}

/// What a create call asks for.
#[derive(Clone, Debug)]
pub struct NewAppProfile {
    pub name: String,
    pub description: String,
    pub copy_from: String,
    /// See [`AppProfile::region`].
    pub region: Option<String>,
    pub tags: Vec<(String, String)>,
    pub client_request_token: Option<String>,
}

fn valid_name(name: &str) -> bool {
    // ([0-9a-zA-Z][ _-]?)+ , 1-64 characters.
    let mut prev_sep = true;
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| {
            let ok = c.is_ascii_alphanumeric() || (!prev_sep && matches!(c, ' ' | '_' | '-'));
            prev_sep = !c.is_ascii_alphanumeric();
            ok
        })
}

impl NewAppProfile {
    /// Checks names, lengths and tags the way the managed service does.
    pub fn validate(&self) -> Result<(), AppProfileError> {
        if !valid_name(&self.name) {
            return Err(AppProfileError::Invalid(format!(
                "inferenceProfileName {:?} must be 1-64 letters and digits, single spaces, '_' or '-' between them",
                self.name
            )));
        }
        if self.description.chars().count() > 200 {
            return Err(AppProfileError::Invalid(
                "description must be at most 200 characters".into(),
            ));
        }
        if self.tags.len() > 200 {
            return Err(AppProfileError::Invalid("at most 200 tags".into()));
        }
        for (k, v) in &self.tags {
            if k.is_empty() || k.chars().count() > 128 || v.chars().count() > 256 {
                return Err(AppProfileError::Invalid(format!(
                    "tag {k:?}: keys are 1-128 characters, values at most 256"
                )));
            }
        }
        if let Some(t) = &self.client_request_token
            && (t.is_empty() || t.len() > 256)
        {
            return Err(AppProfileError::Invalid(
                "clientRequestToken must be 1-256 characters".into(),
            ));
        }
        Ok(())
    }
}

/// The deployment's application profiles, as this node last saw them.
pub struct AppProfiles {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    current: ArcSwap<HashMap<String, AppProfile>>,
}

impl std::fmt::Debug for AppProfiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppProfiles")
            .field("prefix", &self.prefix)
            .field("count", &self.current.load().len())
            .finish()
    }
}

fn store_err(e: object_store::Error) -> AppProfileError {
    AppProfileError::Store(e.to_string())
}

impl AppProfiles {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> AppProfiles {
        AppProfiles {
            store,
            prefix: Path::from(prefix),
            current: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// A store from a URL: `file:///path` or `s3://bucket/prefix` (S3 settings from the
    /// usual `AWS_*` environment variables, including `AWS_ENDPOINT` for S3-compatible
    /// stores).
    pub fn from_url(url: &str) -> Result<AppProfiles, AppProfileError> {
        let parsed = url::Url::parse(url)
            .map_err(|e| AppProfileError::Invalid(format!("profile store URL {url:?}: {e}")))?;
        let opts: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let (store, prefix) = object_store::parse_url_opts(&parsed, opts).map_err(store_err)?;
        Ok(AppProfiles::new(Arc::from(store), prefix.as_ref()))
    }

    fn path(&self, name: &str) -> Path {
        self.prefix.clone().join(format!("{name}.json"))
    }

    /// Re-reads every profile from the store.
    pub async fn refresh(&self) -> Result<usize, AppProfileError> {
        let listed: Vec<_> = self
            .store
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(store_err)?;
        let mut next = HashMap::with_capacity(listed.len());
        for meta in listed {
            let bytes = match self.store.get(&meta.location).await {
                Ok(r) => r.bytes().await.map_err(store_err)?,
                // Deleted between list and get.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(store_err(e)),
            };
            match serde_json::from_slice::<AppProfile>(&bytes) {
                Ok(p) => {
                    next.insert(p.id.clone(), p);
                }
                Err(e) => {
                    tracing::warn!(object = %meta.location, error = %e, "unreadable application profile skipped")
                }
            }
        }
        let n = next.len();
        self.current.store(Arc::new(next));
        Ok(n)
    }

    pub fn get(&self, id: &str) -> Option<AppProfile> {
        self.current.load().get(id).cloned()
    }

    pub fn list(&self) -> Vec<AppProfile> {
        let mut v: Vec<AppProfile> = self.current.load().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Creates a profile; the same name with the same client request token returns the
    /// existing one (idempotent retries).
    pub async fn create(
        &self,
        new: NewAppProfile,
        now_rfc3339: &str,
    ) -> Result<AppProfile, AppProfileError> {
        new.validate()?;
        let path = self.path(&new.name);
        let mut h = Sha256::new();
        h.update(new.name.as_bytes());
        h.update(now_rfc3339.as_bytes());
        h.update(uuid::Uuid::new_v4().as_bytes());
        let id = hex::encode(&h.finalize()[..6]);
        let profile = AppProfile {
            id,
            name: new.name.clone(),
            description: new.description,
            copy_from: new.copy_from,
            region: new.region,
            tags: new.tags,
            created_at: now_rfc3339.to_owned(),
            client_request_token: new.client_request_token,
        };
        let body =
            serde_json::to_vec(&profile).map_err(|e| AppProfileError::Store(e.to_string()))?;
        let put = self
            .store
            .put_opts(
                &path,
                PutPayload::from(body),
                PutOptions {
                    mode: PutMode::Create,
                    ..PutOptions::default()
                },
            )
            .await;
        match put {
            Ok(_) => {
                let mut map = (**self.current.load()).clone();
                map.insert(profile.id.clone(), profile.clone());
                self.current.store(Arc::new(map));
                Ok(profile)
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                let existing: AppProfile = self
                    .store
                    .get(&path)
                    .await
                    .map_err(store_err)?
                    .bytes()
                    .await
                    .map_err(store_err)
                    .and_then(|b| {
                        serde_json::from_slice(&b)
                            .map_err(|e| AppProfileError::Store(e.to_string()))
                    })?;
                if existing.client_request_token.is_some()
                    && existing.client_request_token == profile.client_request_token
                    && existing.copy_from == profile.copy_from
                {
                    Ok(existing)
                } else {
                    Err(AppProfileError::Conflict(profile.name))
                }
            }
            Err(e) => Err(store_err(e)),
        }
    }

    /// Deletes a profile by ID.
    pub async fn delete(&self, id: &str) -> Result<(), AppProfileError> {
        let Some(p) = self.get(id) else {
            return Err(AppProfileError::NotFound(id.to_owned()));
        };
        self.store
            .delete(&self.path(&p.name))
            .await
            .map_err(store_err)?;
        let mut map = (**self.current.load()).clone();
        map.remove(id);
        self.current.store(Arc::new(map));
        Ok(())
    }
}

/// The opaque ID inside an application-profile ARN, or the string itself.
pub fn app_profile_id(requested: &str) -> &str {
    requested
        .rsplit_once(":application-inference-profile/")
        .map_or(requested, |(_, id)| id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn new(name: &str, token: Option<&str>) -> NewAppProfile {
        NewAppProfile {
            name: name.into(),
            description: String::new(),
            copy_from: "eu.amazon.nova-lite-v1:0".into(),
            region: None,
            tags: vec![("team".into(), "search".into())],
            client_request_token: token.map(str::to_owned),
        }
    }

    #[tokio::test]
    async fn create_is_idempotent_by_token_and_names_are_unique() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let a = AppProfiles::new(store.clone(), "profiles");
        let b = AppProfiles::new(store, "profiles");
        let p = a
            .create(new("search-team", Some("t1")), "2026-11-28T00:00:00Z")
            .await
            .unwrap();
        // The same request retried, through another node: the same profile.
        let again = b
            .create(new("search-team", Some("t1")), "2026-11-28T00:00:01Z")
            .await
            .unwrap();
        assert_eq!(again, p);
        // A different request for the same name: conflict.
        let err = b
            .create(new("search-team", Some("t2")), "2026-11-28T00:00:02Z")
            .await
            .unwrap_err();
        assert!(matches!(err, AppProfileError::Conflict(_)));
        // The other node sees it after a refresh, and deletion works from there.
        assert!(b.get(&p.id).is_none());
        assert_eq!(b.refresh().await.unwrap(), 1);
        assert_eq!(
            b.get(&p.id).unwrap().tags,
            vec![("team".to_owned(), "search".to_owned())]
        );
        b.delete(&p.id).await.unwrap();
        assert_eq!(a.refresh().await.unwrap(), 0);
        assert!(matches!(
            a.delete(&p.id).await,
            Err(AppProfileError::NotFound(_))
        ));
    }

    #[test]
    fn names_tags_and_tokens_are_checked() {
        assert!(new("ok name-1_x", None).validate().is_ok());
        for bad in ["", "-lead", "double  space", &"x".repeat(65), "émoji"] {
            assert!(new(bad, None).validate().is_err(), "{bad:?}");
        }
        let mut n = new("ok", None);
        n.tags = vec![("k".repeat(129), "v".into())];
        assert!(n.validate().is_err());
        n.tags = vec![];
        n.description = "d".repeat(201);
        assert!(n.validate().is_err());
        assert_eq!(
            app_profile_id(
                "arn:aws:bedrock:us-east-1:000000000000:application-inference-profile/abc123"
            ),
            "abc123"
        );
    }
}
