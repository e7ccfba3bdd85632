//! Access control at the node: the current principals, keys and policies, loaded from
//! files, swapped atomically on reload, and the checks the APIs and the pipeline call.
//! A broken file keeps the last good set.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use crisp_catalog::Catalog;
use crisp_catalog::profiles::{ProfileKind, Profiles};
use crisp_policy::keys::{KeyError, KeyIndex, KeyStore, parse_principals};
use crisp_policy::{Action, PolicyEngine, ProfileFacts, RegionFacts, Verdict};

/// The files access control is read from (absolute paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessFiles {
    pub principals: PathBuf,
    pub keys: PathBuf,
    pub policies: Vec<PathBuf>,
    pub guardrails: Vec<PathBuf>,
}

impl AccessFiles {
    fn read_all(&self) -> Result<Vec<(PathBuf, String)>, String> {
        std::iter::once(&self.principals)
            .chain(std::iter::once(&self.keys))
            .chain(&self.policies)
            .chain(&self.guardrails)
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|t| (p.clone(), t))
                    .map_err(|e| {
                        let hint = if p == &self.keys && e.kind() == std::io::ErrorKind::NotFound {
                            "; `crisp keys create --config <the configuration> --principal <id>` creates it with a principal's first key"
                        } else {
                            ""
                        };
                        format!("cannot read {}: {e}{hint}", p.display())
                    })
            })
            .collect()
    }
}

/// One consistent set of principals, keys and policies.
pub struct AccessSnapshot {
    pub engine: PolicyEngine,
    pub keys: KeyIndex,
    /// The facts policies see for each profile ID and, for bare models, model ID.
    facts: HashMap<String, ProfileFacts>,
}

/// Access control of a node.
pub struct Access {
    files: AccessFiles,
    current: ArcSwap<AccessSnapshot>,
    last: Mutex<Vec<(PathBuf, String)>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("files", &self.files)
            .finish()
    }
}

fn scope(kind: &ProfileKind) -> &'static str {
    match kind {
        ProfileKind::Global => "global",
        ProfileKind::Geographic { .. } => "geographic",
    }
}

/// The facts of every profile and of each model served in `source`.
pub fn profile_facts(catalog: &Catalog, profiles: &Profiles, source: u16) -> Vec<ProfileFacts> {
    let codes = |d: &[u16]| {
        d.iter()
            .map(|&r| catalog.region_code(r).to_owned())
            .collect()
    };
    let mut out: Vec<ProfileFacts> = profiles
        .iter()
        .map(|p| ProfileFacts {
            id: p.id.clone(),
            scope: scope(&p.kind).into(),
            geography: match &p.kind {
                ProfileKind::Geographic { geography, .. } => geography.clone(),
                ProfileKind::Global => String::new(),
            },
            model: p.model.clone(),
            destinations: codes(&p.destinations),
        })
        .collect();
    for m in &catalog.models {
        if m.serves(source) {
            out.push(ProfileFacts {
                id: m.id.clone(),
                scope: "model".into(),
                geography: String::new(),
                model: m.id.clone(),
                destinations: vec![catalog.region_code(source).to_owned()],
            });
        }
    }
    out
}

/// Regions as the policies see them: EU membership comes from the `eu` tag.
pub fn region_facts(catalog: &Catalog) -> Vec<RegionFacts> {
    catalog
        .regions
        .iter()
        .map(|r| RegionFacts {
            code: r.code.clone(),
            country: r.country.clone(),
            jurisdictions: r.tags.clone(),
        })
        .collect()
}

fn build(
    texts: &[(PathBuf, String)],
    files: &AccessFiles,
    catalog: &Catalog,
    profiles: &Profiles,
    source: u16,
) -> Result<AccessSnapshot, String> {
    let text = |p: &PathBuf| {
        texts
            .iter()
            .find(|(q, _)| q == p)
            .map(|(_, t)| t.as_str())
            .unwrap_or("")
    };
    let principals = parse_principals(text(&files.principals))
        .map_err(|e| format!("{}: {}", files.principals.display(), e.join("; ")))?;
    let keys =
        KeyStore::parse(text(&files.keys)).map_err(|e| format!("{}: {e}", files.keys.display()))?;
    let named = |paths: &[PathBuf]| -> Vec<(String, String)> {
        paths
            .iter()
            .map(|p| (p.display().to_string(), text(p).to_owned()))
            .collect()
    };
    let facts = profile_facts(catalog, profiles, source);
    // Policies may name profiles that do not exist (a typo, or an ID from another
    // deployment): they can never match, which is worth saying.
    for path in files.policies.iter().chain(&files.guardrails) {
        for id in referenced_profiles(text(path)) {
            if !facts.iter().any(|f| f.id == id) {
                tracing::warn!(file = %path.display(), profile = %id, "a policy names an inference profile this deployment does not have; it will never match");
            }
        }
    }
    let engine = PolicyEngine::new(
        &named(&files.policies),
        &named(&files.guardrails),
        &principals,
        &region_facts(catalog),
        &facts,
    )
    .map_err(|e| e.to_string())?;
    Ok(AccessSnapshot {
        engine,
        keys: keys.index(),
        facts: facts.into_iter().map(|f| (f.id.clone(), f)).collect(),
    })
}

/// Everything wrong with a set of access files (problems a node would refuse them for),
/// and what is only worth a note, all at once: what `crisp check` reports.
pub fn lint(
    files: &AccessFiles,
    catalog: &Catalog,
    profiles: &Profiles,
    source: u16,
) -> (Vec<String>, Vec<String>) {
    let (mut problems, mut notes) = (Vec::new(), Vec::new());
    let read = |p: &PathBuf, problems: &mut Vec<String>| match std::fs::read_to_string(p) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(format!("cannot read {}: {e}", p.display()));
            None
        }
    };
    let principals = read(&files.principals, &mut problems).and_then(|t| {
        parse_principals(&t)
            .map_err(|e| {
                for e in e {
                    problems.push(format!("{}: {e}", files.principals.display()));
                }
            })
            .ok()
    });
    let keys = read(&files.keys, &mut problems).and_then(|t| {
        KeyStore::parse(&t)
            .map_err(|e| problems.push(format!("{}: {e}", files.keys.display())))
            .ok()
    });
    if let (Some(principals), Some(keys)) = (&principals, &keys) {
        let unknown = keys
            .keys
            .iter()
            .filter(|k| !k.revoked)
            .map(|k| (k.id.as_str(), k.principal.as_str()))
            .chain(
                keys.sigv4
                    .iter()
                    .filter(|c| !c.revoked)
                    .map(|c| (c.access_key_id.as_str(), c.principal.as_str())),
            )
            .filter(|(_, p)| !principals.iter().any(|q| q.id == *p));
        for (key, principal) in unknown {
            notes.push(format!(
                "{}: key {key} belongs to {principal:?}, which {} does not define: its callers are denied everything",
                files.keys.display(),
                files.principals.display()
            ));
        }
    }
    let policies: Vec<(String, String)> = files
        .policies
        .iter()
        .filter_map(|p| read(p, &mut problems).map(|t| (p.display().to_string(), t)))
        .collect();
    let guardrails: Vec<(String, String)> = files
        .guardrails
        .iter()
        .filter_map(|p| read(p, &mut problems).map(|t| (p.display().to_string(), t)))
        .collect();
    if !policies
        .iter()
        .any(|(_, t)| t.lines().any(|l| l.trim_start().starts_with("permit")))
    {
        notes.push(
            "the team policies permit nothing: every caller is denied every profile (no permit means deny)"
                .to_owned(),
        );
    }
    let facts = profile_facts(catalog, profiles, source);
    for (path, text) in policies.iter().chain(&guardrails) {
        for id in referenced_profiles(text) {
            if !facts.iter().any(|f| f.id == id) {
                notes.push(format!(
                    "{path}: names the inference profile {id}, which this deployment does not have: that policy never matches"
                ));
            }
        }
    }
    // Policies are checked even when the principals are broken (against none).
    if let Err(e) = PolicyEngine::new(
        &policies,
        &guardrails,
        principals.as_deref().unwrap_or(&[]),
        &region_facts(catalog),
        &facts,
    ) {
        problems.push(e.to_string());
    }
    (problems, notes)
}

/// The profile IDs a policy text names literally (`InferenceProfile::"..."`).
pub fn referenced_profiles(text: &str) -> Vec<String> {
    const MARK: &str = "InferenceProfile::\"";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(MARK) {
        rest = &rest[i + MARK.len()..];
        if let Some(end) = rest.find('"') {
            out.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    out
}

impl Access {
    /// Loads the files; every problem in them is reported.
    pub fn load(
        files: AccessFiles,
        catalog: &Catalog,
        profiles: &Profiles,
        source: u16,
    ) -> Result<Access, String> {
        let texts = files.read_all()?;
        let snapshot = build(&texts, &files, catalog, profiles, source)?;
        Ok(Access {
            files,
            current: ArcSwap::from_pointee(snapshot),
            last: Mutex::new(texts),
        })
    }

    pub fn snapshot(&self) -> Arc<AccessSnapshot> {
        self.current.load_full()
    }

    /// Re-reads the files; swaps in a new set if they changed and are valid.
    pub fn reload(
        &self,
        catalog: &Catalog,
        profiles: &Profiles,
        source: u16,
    ) -> Result<bool, String> {
        let texts = self.files.read_all()?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == texts {
            return Ok(false);
        }
        let snapshot = build(&texts, &self.files, catalog, profiles, source)?;
        self.current.store(Arc::new(snapshot));
        *last = texts;
        Ok(true)
    }
}

impl AccessSnapshot {
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<crisp_policy::keys::Caller, KeyError> {
        self.keys.authenticate(authorization)
    }

    /// Authorizes a request through `id` (a profile ID, or a model ID for a bare model).
    pub fn authorize(&self, principal: &str, action: Action, id: &str, source: &str) -> Verdict {
        self.authorize_through(principal, action, id, source, None)
    }

    /// Authorizes a request through `id` by way of an application inference profile
    /// (policies see it as `context.application`).
    pub fn authorize_through(
        &self,
        principal: &str,
        action: Action,
        id: &str,
        source: &str,
        application: Option<&crisp_policy::Application>,
    ) -> Verdict {
        match self.facts.get(id) {
            Some(f) => self
                .engine
                .authorize_through(principal, action, f, source, application),
            None => Verdict::Deny(crisp_policy::DenyReason::NoPermit),
        }
    }

    /// The SigV4 credential of an access key ID, revoked or not.
    pub fn sigv4(&self, access_key_id: &str) -> Option<&crisp_policy::keys::SigV4Key> {
        self.keys.sigv4(access_key_id)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_literal_profile_references() {
        let text = r#"permit(principal, action, resource == Crisp::InferenceProfile::"eu.m") ; forbid(principal, action, resource in [Crisp::InferenceProfile::"typo.m"]);"#;
        assert_eq!(super::referenced_profiles(text), ["eu.m", "typo.m"]);
    }
}
