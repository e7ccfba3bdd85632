//! Inference profiles: derived from the catalog and the lock file.
//!
//! - `global.<model>`: every region that serves the model and joins global profiles. It
//!   follows the fleet: a region added to the config is in it at once.
//! - `<geo>.<model>`: a geographic profile. Its destination set is frozen in the lock file
//!   when first issued. When the fleet changes so that the geography gains a region for the
//!   model, the old ID keeps its set and a new ID `<geo>-v<N>.<model>` is issued with the
//!   new one. An ID never gains a region. (A region that stops serving simply stops being
//!   chosen: narrowing never crosses a boundary.)
//! - a bare model ID: the source region only.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use serde::Deserialize;

pub use crisp_routing::Scope;

use crate::{Catalog, Model, RegionIx, is_valid_id};

/// The lock file format version this build reads and writes.
pub const LOCK_VERSION: u32 = 1;

/// The profile ID for version `version` of geography `geo`'s profile of `model`.
pub fn profile_id(geo: &str, version: u32, model: &str) -> String {
    if version <= 1 {
        format!("{geo}.{model}")
    } else {
        format!("{geo}-v{version}.{model}")
    }
}

/// Splits a profile scope such as `eu-v2` into (`eu`, Some(2)); `eu` gives (`eu`, None).
pub fn split_version_suffix(scope: &str) -> (&str, Option<u32>) {
    if let Some((base, v)) = scope.rsplit_once("-v")
        && !base.is_empty()
        && !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = v.parse::<u32>()
    {
        return (base, Some(n));
    }
    (scope, None)
}

/// One frozen geographic profile, as recorded in the lock file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedProfile {
    pub id: String,
    pub geography: String,
    pub model: String,
    pub version: u32,
    /// Region codes, sorted.
    pub destinations: Vec<String>,
}

/// The lock file: every geographic profile ever issued, with its frozen destination set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    pub profiles: Vec<LockedProfile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLock {
    version: u32,
    #[serde(default, rename = "profile")]
    profiles: Vec<LockedProfile>,
}

/// A lock file that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("the lock file is not valid: {0}")]
    Syntax(String),
    #[error("lock file version {0} is not supported; this build reads version {LOCK_VERSION}")]
    Version(u32),
    #[error("the lock file lists profile {0} twice")]
    Duplicate(String),
    #[error(
        "the lock file entry {id} does not match its geography, version and model (expected ID {expected})"
    )]
    Inconsistent { id: String, expected: String },
}

impl Lock {
    /// Parses a lock file's text.
    pub fn parse(src: &str) -> Result<Lock, LockError> {
        let raw: RawLock = toml::from_str(src).map_err(|e| LockError::Syntax(e.to_string()))?;
        if raw.version != LOCK_VERSION {
            return Err(LockError::Version(raw.version));
        }
        let mut seen = BTreeSet::new();
        for p in &raw.profiles {
            if !seen.insert(p.id.as_str()) {
                return Err(LockError::Duplicate(p.id.clone()));
            }
            let expected = profile_id(&p.geography, p.version, &p.model);
            if expected != p.id {
                return Err(LockError::Inconsistent {
                    id: p.id.clone(),
                    expected,
                });
            }
        }
        let mut lock = Lock {
            profiles: raw.profiles,
        };
        lock.normalise();
        Ok(lock)
    }

    fn normalise(&mut self) {
        for p in &mut self.profiles {
            p.destinations.sort();
            p.destinations.dedup();
        }
        self.profiles.sort_by(|a, b| {
            (&a.geography, &a.model, a.version).cmp(&(&b.geography, &b.model, b.version))
        });
    }

    /// The lock file's text: deterministic, so that changes diff cleanly.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# crisp.lock: the frozen destination sets of geographic inference profiles.\n\
             # Written by `crisp profiles lock`; review changes like code. A profile ID here\n\
             # never gains a region: when a geography grows, a new versioned ID is issued.\n",
        );
        out.push_str(&format!("version = {LOCK_VERSION}\n"));
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        for p in &self.profiles {
            out.push_str("\n[[profile]]\n");
            out.push_str(&format!("id = {}\n", q(&p.id)));
            out.push_str(&format!("geography = {}\n", q(&p.geography)));
            out.push_str(&format!("model = {}\n", q(&p.model)));
            out.push_str(&format!("version = {}\n", p.version));
            let dests: Vec<String> = p.destinations.iter().map(|d| q(d)).collect();
            out.push_str(&format!("destinations = [{}]\n", dests.join(", ")));
        }
        out
    }

    fn latest(&self, geography: &str, model: &str) -> Option<&LockedProfile> {
        self.profiles
            .iter()
            .filter(|p| p.geography == geography && p.model == model)
            .max_by_key(|p| p.version)
    }
}

/// One difference between the fleet and the lock file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A profile to issue: the first for its geography and model, or a new version.
    Issue {
        profile: LockedProfile,
        /// The ID this one follows, which keeps its own set.
        supersedes: Option<String>,
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// Regions of a frozen set no longer serve the model. Nothing to issue: the profile
    /// keeps working with the rest, and never widens.
    Narrowed { id: String, gone: Vec<String> },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Issue {
                profile,
                supersedes: None,
                ..
            } => write!(
                f,
                "+ issue {} -> [{}]",
                profile.id,
                profile.destinations.join(", ")
            ),
            Change::Issue {
                profile,
                supersedes: Some(old),
                added,
                removed,
            } => {
                write!(
                    f,
                    "+ issue {} -> [{}]\n    {old} keeps its set; new set adds [{}]",
                    profile.id,
                    profile.destinations.join(", "),
                    added.join(", ")
                )?;
                if !removed.is_empty() {
                    write!(f, " and drops [{}]", removed.join(", "))?;
                }
                Ok(())
            }
            Change::Narrowed { id, gone } => write!(
                f,
                "  note: {id}: [{}] no longer serve the model; the profile keeps the rest",
                gone.join(", ")
            ),
        }
    }
}

/// What `crisp profiles lock` would do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub changes: Vec<Change>,
    /// Profiles that cannot be issued (e.g. the ID would be too long).
    pub problems: Vec<String>,
}

impl Plan {
    /// Compares the fleet with the lock file.
    pub fn new(catalog: &Catalog, lock: &Lock) -> Plan {
        let mut plan = Plan::default();
        for geo in &catalog.geographies {
            for model in &catalog.models {
                let set: Vec<String> = {
                    let mut v: Vec<String> = model
                        .regions()
                        .filter_map(|r| catalog.region(r))
                        .filter(|r| geo.contains(r))
                        .map(|r| r.code.clone())
                        .collect();
                    v.sort();
                    v
                };
                if set.is_empty() {
                    continue;
                }
                let latest = lock.latest(&geo.name, &model.id);
                let (version, supersedes, added, removed) = match latest {
                    None => (1, None, set.clone(), Vec::new()),
                    Some(old) => {
                        let added: Vec<String> = set
                            .iter()
                            .filter(|r| !old.destinations.contains(r))
                            .cloned()
                            .collect();
                        let removed: Vec<String> = old
                            .destinations
                            .iter()
                            .filter(|r| !set.contains(r))
                            .cloned()
                            .collect();
                        if added.is_empty() {
                            if !removed.is_empty() {
                                plan.changes.push(Change::Narrowed {
                                    id: old.id.clone(),
                                    gone: removed,
                                });
                            }
                            continue;
                        }
                        (
                            old.version.saturating_add(1),
                            Some(old.id.clone()),
                            added,
                            removed,
                        )
                    }
                };
                let id = profile_id(&geo.name, version, &model.id);
                if !is_valid_id(&id) {
                    plan.problems.push(format!(
                        "cannot issue {id}: profile IDs are at most 64 characters of letters, digits, '-', ':' and '.'; shorten the model ID or geography name"
                    ));
                    continue;
                }
                plan.changes.push(Change::Issue {
                    profile: LockedProfile {
                        id,
                        geography: geo.name.clone(),
                        model: model.id.clone(),
                        version,
                        destinations: set,
                    },
                    supersedes,
                    added,
                    removed,
                });
            }
        }
        plan
    }

    /// Whether the lock file must change.
    pub fn has_issues(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c, Change::Issue { .. }))
    }

    /// The lock file after this plan: old entries untouched, new ones added.
    pub fn apply(&self, lock: &Lock) -> Lock {
        let mut next = lock.clone();
        for c in &self.changes {
            if let Change::Issue { profile, .. } = c {
                next.profiles.push(profile.clone());
            }
        }
        next.normalise();
        next
    }
}

/// What kind of profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileKind {
    Global,
    Geographic { geography: String, version: u32 },
}

/// A usable inference profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub id: String,
    pub kind: ProfileKind,
    pub model: String,
    /// The boundary: sorted region indices.
    pub destinations: Vec<RegionIx>,
    /// Locked region codes that this catalog no longer defines.
    pub missing: Vec<String>,
    /// The newer version of this geographic profile, if one was issued.
    pub superseded_by: Option<String>,
}

impl Profile {
    pub fn scope(&self) -> Scope {
        match self.kind {
            ProfileKind::Global => Scope::Global,
            ProfileKind::Geographic { .. } => Scope::Geographic,
        }
    }

    /// `global`, `eu`, `eu-v2`, ...
    pub fn scope_label(&self) -> &str {
        self.id.split_once('.').map_or("", |(s, _)| s)
    }
}

/// Every profile of a deployment, from one catalog and one lock file.
#[derive(Clone, Debug, Default)]
pub struct Profiles {
    list: Vec<Profile>,
    by_id: HashMap<String, usize>,
}

/// Where a request may run.
#[derive(Clone, Debug, PartialEq)]
pub struct Target<'a> {
    /// The profile, or `None` for a bare model ID.
    pub profile: Option<&'a Profile>,
    pub model: &'a Model,
    pub scope: Scope,
    destinations: Destinations<'a>,
}

#[derive(Clone, Debug, PartialEq)]
enum Destinations<'a> {
    Profile(&'a [RegionIx]),
    Source(RegionIx),
}

impl Target<'_> {
    /// The boundary of this request.
    pub fn destinations(&self) -> &[RegionIx] {
        match &self.destinations {
            Destinations::Profile(d) => d,
            Destinations::Source(r) => std::slice::from_ref(r),
        }
    }

    /// The profile ID, or the model ID for a bare model.
    pub fn id(&self) -> &str {
        self.profile
            .map_or(self.model.id.as_str(), |p| p.id.as_str())
    }
}

/// Why a requested model or profile cannot be used from this region.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "{requested:?} is not a valid model or inference profile ID: IDs are 1-64 characters of letters, digits, '-', ':' and '.', like \"eu.amazon.nova-lite-v1:0\""
    )]
    Malformed { requested: String },
    #[error(
        "the model or inference profile {requested:?} does not exist in this deployment{}; GET /v1/models or ListInferenceProfiles lists what you can call",
        suggestion.as_ref().map(|s| format!(" (did you mean {s:?}?)")).unwrap_or_default()
    )]
    Unknown {
        requested: String,
        suggestion: Option<String>,
    },
    #[error(
        "invocation of model ID {model} isn't supported in source region {source_region}: no engine serves it here. Retry with the ID of an inference profile that contains this model{}",
        if profiles.is_empty() { String::new() } else { format!(": {}", profiles.join(", ")) }
    )]
    NotServedHere {
        model: String,
        source_region: String,
        profiles: Vec<String>,
    },
    #[error(
        "the ARN {arn:?} belongs to account {account}, but this deployment's account is {expected}"
    )]
    ForeignAccount {
        arn: String,
        account: String,
        expected: String,
    },
    #[error(
        "the ARN {arn:?} names region {region}, but this node serves region {source_region}; call that region's endpoint or use this region's ARN"
    )]
    ForeignRegion {
        arn: String,
        region: String,
        source_region: String,
    },
}

impl Profiles {
    /// Builds the profiles of a deployment: the global ones from the catalog, the
    /// geographic ones from the lock file (only those; pending changes are not applied).
    pub fn build(catalog: &Catalog, lock: &Lock) -> Profiles {
        let mut list = Vec::new();
        for model in &catalog.models {
            let destinations: Vec<RegionIx> = model
                .regions()
                .filter(|&r| catalog.region(r).is_some_and(|r| r.global))
                .collect();
            if destinations.is_empty() {
                continue;
            }
            list.push(Profile {
                id: format!("global.{}", model.id),
                kind: ProfileKind::Global,
                model: model.id.clone(),
                destinations,
                missing: Vec::new(),
                superseded_by: None,
            });
        }
        for locked in &lock.profiles {
            if catalog.model(&locked.model).is_none() {
                continue;
            }
            let mut destinations = Vec::with_capacity(locked.destinations.len());
            let mut missing = Vec::new();
            for code in &locked.destinations {
                match catalog.region_ix(code) {
                    Some(ix) => destinations.push(ix),
                    None => missing.push(code.clone()),
                }
            }
            destinations.sort_unstable();
            let superseded_by = lock
                .latest(&locked.geography, &locked.model)
                .filter(|l| l.version > locked.version)
                .map(|l| l.id.clone());
            list.push(Profile {
                id: locked.id.clone(),
                kind: ProfileKind::Geographic {
                    geography: locked.geography.clone(),
                    version: locked.version,
                },
                model: locked.model.clone(),
                destinations,
                missing,
                superseded_by,
            });
        }
        let by_id = list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        Profiles { list, by_id }
    }

    pub fn get(&self, id: &str) -> Option<&Profile> {
        self.by_id.get(id).and_then(|&i| self.list.get(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Profiles of a model whose boundary can be called from anywhere, newest first within
    /// a geography.
    pub fn of_model<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Profile> + 'a {
        self.list
            .iter()
            .filter(move |p| p.model == model && p.superseded_by.is_none())
    }

    /// Resolves what a client asked for (model ID, profile ID, or profile / model ARN)
    /// into the boundary of the request, for a request arriving in `source`.
    pub fn resolve<'a>(
        &'a self,
        catalog: &'a Catalog,
        requested: &str,
        source: RegionIx,
    ) -> Result<Target<'a>, ResolveError> {
        let id = match requested.strip_prefix("arn:") {
            Some(_) => parse_arn(catalog, requested, source)?,
            None => requested,
        };
        if !is_valid_id(id) {
            return Err(ResolveError::Malformed {
                requested: requested.to_owned(),
            });
        }
        if let Some(profile) = self.get(id)
            && let Some(model) = catalog.model(&profile.model)
        {
            return Ok(Target {
                profile: Some(profile),
                model,
                scope: profile.scope(),
                destinations: Destinations::Profile(&profile.destinations),
            });
        }
        if let Some(model) = catalog.model(id) {
            if model.serves(source) {
                return Ok(Target {
                    profile: None,
                    model,
                    scope: Scope::InRegion,
                    destinations: Destinations::Source(source),
                });
            }
            return Err(ResolveError::NotServedHere {
                model: model.id.clone(),
                source_region: catalog.region_code(source).to_owned(),
                profiles: self.of_model(&model.id).map(|p| p.id.clone()).collect(),
            });
        }
        Err(ResolveError::Unknown {
            requested: requested.to_owned(),
            suggestion: self.suggest(catalog, id),
        })
    }

    /// The closest known ID, for typos such as `eu.amazon.nova-lite-v1` or a stale prefix.
    fn suggest(&self, catalog: &Catalog, id: &str) -> Option<String> {
        let candidates = self
            .list
            .iter()
            .map(|p| p.id.as_str())
            .chain(catalog.models.iter().map(|m| m.id.as_str()));
        let mut best: Option<(usize, &str)> = None;
        for c in candidates {
            // A truncated ID (a missing version suffix) is the commonest slip.
            if id.len() >= 4 && c.starts_with(id) {
                let d = c.len() - id.len();
                if best.is_none_or(|(bd, _)| d < bd) {
                    best = Some((d, c));
                }
                continue;
            }
            let d = strsim::levenshtein(id, c);
            if d <= 3.max(id.len() / 8) && best.is_none_or(|(bd, _)| d < bd) {
                best = Some((d, c));
            }
        }
        best.map(|(_, c)| c.to_owned())
    }
}

/// Accepts `arn:aws:bedrock:<region>:<account>:inference-profile/<id>` and
/// `arn:aws:bedrock:<region>::foundation-model/<model>` (region may be empty for global
/// model ARNs), returning the ID inside.
fn parse_arn<'r>(
    catalog: &Catalog,
    arn: &'r str,
    source: RegionIx,
) -> Result<&'r str, ResolveError> {
    let (region, account, rest) = split_arn(arn)?;
    let id = if let Some(id) = rest.strip_prefix("inference-profile/") {
        check_account(catalog, arn, account)?;
        id
    } else if let Some(id) = rest.strip_prefix("foundation-model/") {
        id
    } else {
        return Err(ResolveError::Malformed {
            requested: arn.to_owned(),
        });
    };
    check_region(catalog, arn, region, source)?;
    Ok(id)
}

/// The opaque ID in an application inference profile's ARN
/// (`arn:aws:bedrock:<region>:<account>:application-inference-profile/<id>`), which must
/// name this deployment's account. Any region's ARN will do: application profiles are
/// shared by every region of the deployment.
pub fn application_profile_id<'r>(
    catalog: &Catalog,
    arn: &'r str,
) -> Result<&'r str, ResolveError> {
    let (_, account, rest) = split_arn(arn)?;
    let id = rest
        .strip_prefix("application-inference-profile/")
        .ok_or_else(|| ResolveError::Malformed {
            requested: arn.to_owned(),
        })?;
    check_account(catalog, arn, account)?;
    Ok(id)
}

/// `arn:<partition>:bedrock:<region>:<account>:<rest>` as (region, account, rest).
fn split_arn(arn: &str) -> Result<(&str, &str, &str), ResolveError> {
    let mut parts = arn.splitn(6, ':');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (
            Some("arn"),
            Some(_partition),
            Some("bedrock"),
            Some(region),
            Some(account),
            Some(rest),
        ) => Ok((region, account, rest)),
        _ => Err(ResolveError::Malformed {
            requested: arn.to_owned(),
        }),
    }
}

fn check_account(catalog: &Catalog, arn: &str, account: &str) -> Result<(), ResolveError> {
    if account == catalog.deployment.account {
        return Ok(());
    }
    Err(ResolveError::ForeignAccount {
        arn: arn.to_owned(),
        account: account.to_owned(),
        expected: catalog.deployment.account.clone(),
    })
}

fn check_region(
    catalog: &Catalog,
    arn: &str,
    region: &str,
    source: RegionIx,
) -> Result<(), ResolveError> {
    let source_code = catalog.region_code(source);
    if region.is_empty() || region == source_code {
        return Ok(());
    }
    Err(ResolveError::ForeignRegion {
        arn: arn.to_owned(),
        region: region.to_owned(),
        source_region: source_code.to_owned(),
    })
}

/// The ARN of a system-defined profile as seen from `source`.
pub fn profile_arn(catalog: &Catalog, source: RegionIx, id: &str) -> String {
    format!(
        "arn:aws:bedrock:{}:{}:inference-profile/{id}",
        catalog.region_code(source),
        catalog.deployment.account
    )
}
