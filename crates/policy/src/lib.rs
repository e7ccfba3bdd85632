//! Who may use which inference profile.
//!
//! Authorization is Cedar (the `cedar-policy` crate): a schema for crisp's domain
//! ([`SCHEMA`]), team policies, and an organisation's **guardrails** — a separate policy
//! set whose `forbid`s no team policy can override. A request through a profile is
//! allowed only if the principal may use the profile AND may invoke the model in **every**
//! destination region of that profile; one forbidden destination denies the whole request
//! (it is never silently narrowed). Explicit `forbid` wins; no `permit` means deny.
//!
//! Also here: the principal and API-key file formats (keys are kept only as SHA-256
//! hashes). The crate is pure: callers pass file text in and get decisions out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, Policy, PolicyId, PolicySet, Request,
    Schema, ValidationMode, Validator,
};
use serde_json::{Value, json};

pub mod keys;

/// The Cedar schema of crisp's domain. Policies are validated against it at load.
pub const SCHEMA: &str = r#"
namespace Crisp {
  entity Team;
  entity Principal in [Team] = {
    account: String,
    team: String,
    "tags": Set<String>,
  };
  entity Region = {
    country: String,
    jurisdictions: Set<String>,
  };
  entity Model;
  type Application = {
    id: String,
    name: String,
    tags: Set<String>,
  };
  entity InferenceProfile = {
    scope: String,
    geography: String,
    model: String,
    destinations: Set<Region>,
    destinationCountries: Set<String>,
    sharedJurisdictions: Set<String>,
  };
  action InvokeModel, InvokeModelWithResponseStream appliesTo {
    principal: [Principal],
    resource: [InferenceProfile, Model],
    context: {
      sourceRegion: String,
      region?: Region,
      profile?: InferenceProfile,
      application?: Application,
    },
  };
  action ListInferenceProfiles, GetInferenceProfile, CreateInferenceProfile, DeleteInferenceProfile appliesTo {
    principal: [Principal],
    resource: [InferenceProfile],
    context: { sourceRegion: String, application?: Application },
  };
}
"#;

/// The actions policies speak about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    InvokeModel,
    InvokeModelWithResponseStream,
    ListInferenceProfiles,
    GetInferenceProfile,
    CreateInferenceProfile,
    DeleteInferenceProfile,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::InvokeModel => "InvokeModel",
            Action::InvokeModelWithResponseStream => "InvokeModelWithResponseStream",
            Action::ListInferenceProfiles => "ListInferenceProfiles",
            Action::GetInferenceProfile => "GetInferenceProfile",
            Action::CreateInferenceProfile => "CreateInferenceProfile",
            Action::DeleteInferenceProfile => "DeleteInferenceProfile",
        }
    }

    pub fn is_invoke(self) -> bool {
        matches!(
            self,
            Action::InvokeModel | Action::InvokeModelWithResponseStream
        )
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Action::InvokeModel,
            Action::InvokeModelWithResponseStream,
            Action::ListInferenceProfiles,
            Action::GetInferenceProfile,
            Action::CreateInferenceProfile,
            Action::DeleteInferenceProfile,
        ]
        .into_iter()
        .find(|a| a.name() == s)
        .ok_or_else(|| format!("unknown action {s:?}"))
    }
}

/// A principal as the policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub account: String,
    pub team: String,
    /// `key=value` strings, e.g. `residency=eu`.
    pub tags: Vec<String>,
}

/// A region as the policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionFacts {
    pub code: String,
    pub country: String,
    pub jurisdictions: Vec<String>,
}

/// A profile (or a bare model, scope `model`) as the policies see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileFacts {
    pub id: String,
    /// `model`, `geographic` or `global`.
    pub scope: String,
    pub geography: String,
    pub model: String,
    /// Region codes.
    pub destinations: Vec<String>,
}

/// An application inference profile a call goes through (or, for
/// `CreateInferenceProfile`, the one it would create, with an empty `id`): policies see it
/// as `context.application`, so they can say who may use (or create, or delete) a
/// profile by its tags, e.g. that only the search team may bill to `team=search`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Application {
    pub id: String,
    pub name: String,
    /// `key=value` strings, like principals' tags.
    pub tags: Vec<String>,
}

impl Application {
    fn context(&self) -> Value {
        json!({"id": self.id, "name": self.name, "tags": self.tags})
    }
}

/// A policy problem, with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Every problem found in the policy files.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} problem(s) in the policies:", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

fn diagnostic_errors(
    file: &str,
    src: &str,
    d: &dyn miette::Diagnostic,
    message: String,
) -> PolicyError {
    let offset = d.labels().and_then(|mut l| l.next()).map(|l| l.offset());
    let (line, column) = match offset {
        Some(o) => {
            let (l, c) = line_col(src, o);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    PolicyError {
        file: file.to_owned(),
        line,
        column,
        message,
    }
}

/// Parses the policies of one file, naming each `<file>#<n>` (or its `@id("...")`).
/// Each policy's ID is recorded in `origins` with its file, for errors found later.
fn parse_file(
    file: &str,
    src: &str,
    into: &mut PolicySet,
    origins: &mut BTreeMap<String, String>,
    errors: &mut Vec<PolicyError>,
) {
    let parsed = match PolicySet::from_str(src) {
        Ok(p) => p,
        Err(e) => {
            for err in e.iter() {
                errors.push(diagnostic_errors(file, src, err, err.to_string()));
            }
            return;
        }
    };
    for (n, policy) in parsed.policies().enumerate() {
        let id = policy
            .annotation("id")
            .map_or_else(|| format!("{file}#{n}"), str::to_owned);
        origins.insert(id.clone(), file.to_owned());
        if let Err(e) = into.add(policy.new_id(PolicyId::new(id.clone()))) {
            errors.push(PolicyError {
                file: file.to_owned(),
                line: None,
                column: None,
                message: format!("policy {id}: {e}"),
            });
        }
    }
}

/// What decided a denial, in categories a client may be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DenyReason {
    UnknownPrincipal,
    /// An organisation guardrail forbids it.
    Guardrail {
        policies: Vec<String>,
    },
    /// A team policy forbids it.
    Forbidden {
        policies: Vec<String>,
    },
    /// No policy permits it.
    NoPermit,
    /// The principal may not use the model in this destination region of the profile.
    Destination {
        region: String,
        inner: Box<DenyReason>,
    },
}

impl DenyReason {
    /// A category safe to show a client (no policy text).
    pub fn category(&self) -> String {
        match self {
            DenyReason::UnknownPrincipal => "the principal is not known".into(),
            DenyReason::Guardrail { .. } => "an organisation guardrail forbids it".into(),
            DenyReason::Forbidden { .. } => "a policy forbids it".into(),
            DenyReason::NoPermit => "no policy permits it".into(),
            DenyReason::Destination { region, inner } => {
                format!(
                    "destination region {region} is not allowed ({})",
                    inner.category()
                )
            }
        }
    }

    /// Short bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::UnknownPrincipal => "unknown_principal",
            DenyReason::Guardrail { .. } => "guardrail",
            DenyReason::Forbidden { .. } => "forbid",
            DenyReason::NoPermit => "no_permit",
            DenyReason::Destination { .. } => "destination",
        }
    }
}

/// An authorization decision with what decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow { policies: Vec<String> },
    Deny(DenyReason),
}

impl Verdict {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

const IMPLICIT_PERMIT: &str = "crisp-guardrails-default-permit";

/// Validated policies and the entities they speak about, for one catalog and principal
/// set. Rebuilt whole on reload.
pub struct PolicyEngine {
    team: PolicySet,
    guardrails: PolicySet,
    entities: Entities,
    principals: HashSet<String>,
    authorizer: Authorizer,
    /// Decisions depend only on the principal, action, profile and source region while
    /// this engine lives (entities and policies are fixed), so each is computed once.
    cache: std::sync::RwLock<HashMap<CacheKey, Verdict>>,
}

/// Principal, action, profile, source region, and the application profile's ID (empty
/// without one).
type CacheKey = (String, Action, String, String, String);

/// A cache key's parts, from a stored key or from a request's borrowed text, so that a
/// request looks its decision up without copying them. Both hash and compare as the
/// same tuple of `&str`s (a `String` hashes as its `str`).
trait KeyParts {
    fn parts(&self) -> (&str, Action, &str, &str, &str);
}

impl KeyParts for CacheKey {
    fn parts(&self) -> (&str, Action, &str, &str, &str) {
        (&self.0, self.1, &self.2, &self.3, &self.4)
    }
}

impl KeyParts for (&str, Action, &str, &str, &str) {
    fn parts(&self) -> (&str, Action, &str, &str, &str) {
        *self
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for CacheKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// Entries kept before the cache is cleared (a bound against unbounded principal or
/// profile churn; configured fleets stay far below it).
const CACHE_LIMIT: usize = 100_000;

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("team_policies", &self.team.policies().count())
            .field("guardrails", &self.guardrails.policies().count())
            .finish()
    }
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    EntityUid::from_str(&format!("Crisp::{kind}::{}", Value::String(id.to_owned())))
        .map_err(|e| e.to_string())
}

impl PolicyEngine {
    /// Builds the engine. `team_files` and `guardrail_files` are `(name, text)` pairs;
    /// every syntax and schema error of every file is reported at once.
    pub fn new(
        team_files: &[(String, String)],
        guardrail_files: &[(String, String)],
        principals: &[Principal],
        regions: &[RegionFacts],
        profiles: &[ProfileFacts],
    ) -> Result<PolicyEngine, PolicyErrors> {
        let schema = Schema::from_cedarschema_str(SCHEMA)
            .map(|(s, _)| s)
            .map_err(|e| {
                PolicyErrors(vec![PolicyError {
                    file: "<schema>".into(),
                    line: None,
                    column: None,
                    message: e.to_string(),
                }])
            })?;
        let mut errors = Vec::new();
        let mut origins = BTreeMap::new();
        let mut team = PolicySet::new();
        for (file, src) in team_files {
            parse_file(file, src, &mut team, &mut origins, &mut errors);
        }
        let mut guardrails = PolicySet::new();
        for (file, src) in guardrail_files {
            parse_file(file, src, &mut guardrails, &mut origins, &mut errors);
        }
        for p in guardrails.policies() {
            if p.effect() == cedar_policy::Effect::Permit {
                errors.push(PolicyError {
                    file: "guardrails".into(),
                    line: None,
                    column: None,
                    message: format!(
                        "guardrail {} is a permit; guardrails may only forbid (permits belong in team policies)",
                        p.id()
                    ),
                });
            }
        }
        let validator = Validator::new(schema.clone());
        let sources: BTreeMap<&str, &str> = team_files
            .iter()
            .chain(guardrail_files)
            .map(|(f, s)| (f.as_str(), s.as_str()))
            .collect();
        for set in [&team, &guardrails] {
            let result = validator.validate(set, ValidationMode::Strict);
            for e in result.validation_errors() {
                let id = e.policy_id().to_string();
                // The file the policy came from (an `@id` names no file).
                let file = origins
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| id.split('#').next().unwrap_or(&id).to_owned());
                let src = sources.get(file.as_str()).copied().unwrap_or("");
                errors.push(diagnostic_errors(
                    &file,
                    src,
                    e,
                    format!("policy {id}: {e}"),
                ));
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        if let Ok(p) = Policy::parse(
            Some(PolicyId::new(IMPLICIT_PERMIT)),
            "permit(principal, action, resource);",
        ) {
            let _ = guardrails.add(p);
        }
        let entities = build_entities(&schema, principals, regions, profiles).map_err(|e| {
            PolicyErrors(vec![PolicyError {
                file: "<entities>".into(),
                line: None,
                column: None,
                message: e,
            }])
        })?;
        Ok(PolicyEngine {
            team,
            guardrails,
            entities,
            principals: principals.iter().map(|p| p.id.clone()).collect(),
            authorizer: Authorizer::new(),
            cache: std::sync::RwLock::new(HashMap::new()),
        })
    }

    pub fn team_policy_count(&self) -> usize {
        self.team.policies().count()
    }

    fn ask(
        &self,
        set: &PolicySet,
        principal: &EntityUid,
        action: Action,
        resource: &EntityUid,
        context: Value,
    ) -> Result<(Decision, Vec<String>), String> {
        let action_uid = uid("Action", action.name())?;
        // The contexts are built here, to the schema; validating each again per request
        // would cost more than the evaluation.
        let context = Context::from_json_value(context, None).map_err(|e| e.to_string())?;
        let request = Request::new(
            principal.clone(),
            action_uid,
            resource.clone(),
            context,
            None,
        )
        .map_err(|e| e.to_string())?;
        let response = self.authorizer.is_authorized(&request, set, &self.entities);
        let reasons = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .filter(|id| id != IMPLICIT_PERMIT)
            .collect();
        Ok((response.decision(), reasons))
    }

    /// Guardrails first (only their forbids count), then team policies.
    fn check(
        &self,
        principal: &EntityUid,
        action: Action,
        resource: &EntityUid,
        context: Value,
    ) -> Result<Result<Vec<String>, DenyReason>, String> {
        let (d, policies) = self.ask(
            &self.guardrails,
            principal,
            action,
            resource,
            context.clone(),
        )?;
        if d == Decision::Deny {
            return Ok(Err(DenyReason::Guardrail { policies }));
        }
        let (d, policies) = self.ask(&self.team, principal, action, resource, context)?;
        Ok(match d {
            Decision::Allow => Ok(policies),
            Decision::Deny if policies.is_empty() => Err(DenyReason::NoPermit),
            Decision::Deny => Err(DenyReason::Forbidden { policies }),
        })
    }

    /// May `principal` do `action` through `profile` (already resolved, with its
    /// destination set), from `source_region`?
    pub fn authorize(
        &self,
        principal: &str,
        action: Action,
        profile: &ProfileFacts,
        source_region: &str,
    ) -> Verdict {
        self.authorize_through(principal, action, profile, source_region, None)
    }

    /// [`PolicyEngine::authorize`] for a call through an application inference profile
    /// (`application`), which policies see as `context.application`.
    pub fn authorize_through(
        &self,
        principal: &str,
        action: Action,
        profile: &ProfileFacts,
        source_region: &str,
        application: Option<&Application>,
    ) -> Verdict {
        // An application profile's tags are fixed for its ID; one not created yet has none.
        if application.is_some_and(|a| a.id.is_empty()) {
            return self.authorize_uncached(principal, action, profile, source_region, application);
        }
        let parts = (
            principal,
            action,
            profile.id.as_str(),
            source_region,
            application.map_or("", |a| a.id.as_str()),
        );
        let cached = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(&parts as &dyn KeyParts).cloned());
        if let Some(v) = cached {
            return v;
        }
        let verdict =
            self.authorize_uncached(principal, action, profile, source_region, application);
        if let Ok(mut c) = self.cache.write() {
            if c.len() >= CACHE_LIMIT {
                c.clear();
            }
            let key = (
                parts.0.to_owned(),
                action,
                parts.2.to_owned(),
                parts.3.to_owned(),
                parts.4.to_owned(),
            );
            c.insert(key, verdict.clone());
        }
        verdict
    }

    /// The decision computed afresh (what [`PolicyEngine::authorize_through`] caches).
    pub fn authorize_uncached(
        &self,
        principal: &str,
        action: Action,
        profile: &ProfileFacts,
        source_region: &str,
        application: Option<&Application>,
    ) -> Verdict {
        match self.authorize_inner(principal, action, profile, source_region, application) {
            Ok(v) => v,
            // A request the schema cannot express is denied, never allowed.
            Err(_) => Verdict::Deny(DenyReason::NoPermit),
        }
    }

    fn authorize_inner(
        &self,
        principal: &str,
        action: Action,
        profile: &ProfileFacts,
        source_region: &str,
        application: Option<&Application>,
    ) -> Result<Verdict, String> {
        if !self.principals.contains(principal) {
            return Ok(Verdict::Deny(DenyReason::UnknownPrincipal));
        }
        let p = uid("Principal", principal)?;
        let resource = uid("InferenceProfile", &profile.id)?;
        let with_application = |mut context: Value| {
            if let (Some(a), Some(fields)) = (application, context.as_object_mut()) {
                fields.insert("application".into(), a.context());
            }
            context
        };
        let mut allowed = match self.check(
            &p,
            action,
            &resource,
            with_application(json!({"sourceRegion": source_region})),
        )? {
            Ok(policies) => policies,
            Err(reason) => return Ok(Verdict::Deny(reason)),
        };
        if action.is_invoke() {
            let model = uid("Model", &profile.model)?;
            for region in &profile.destinations {
                let context = with_application(json!({
                    "sourceRegion": source_region,
                    "region": {"__entity": {"type": "Crisp::Region", "id": region}},
                    "profile": {"__entity": {"type": "Crisp::InferenceProfile", "id": profile.id}},
                }));
                match self.check(&p, action, &model, context)? {
                    Ok(policies) => allowed.extend(policies),
                    Err(inner) => {
                        return Ok(Verdict::Deny(DenyReason::Destination {
                            region: region.clone(),
                            inner: Box::new(inner),
                        }));
                    }
                }
            }
        }
        allowed.sort();
        allowed.dedup();
        Ok(Verdict::Allow { policies: allowed })
    }
}

fn build_entities(
    schema: &Schema,
    principals: &[Principal],
    regions: &[RegionFacts],
    profiles: &[ProfileFacts],
) -> Result<Entities, String> {
    let mut out = Vec::new();
    let mut teams: HashSet<&str> = HashSet::new();
    for p in principals {
        teams.insert(&p.team);
        out.push(json!({
            "uid": {"type": "Crisp::Principal", "id": p.id},
            "attrs": {"account": p.account, "team": p.team, "tags": p.tags},
            "parents": [{"type": "Crisp::Team", "id": p.team}],
        }));
    }
    for t in teams {
        out.push(json!({"uid": {"type": "Crisp::Team", "id": t}, "attrs": {}, "parents": []}));
    }
    let by_code: HashMap<&str, &RegionFacts> =
        regions.iter().map(|r| (r.code.as_str(), r)).collect();
    for r in regions {
        out.push(json!({
            "uid": {"type": "Crisp::Region", "id": r.code},
            "attrs": {"country": r.country, "jurisdictions": r.jurisdictions},
            "parents": [],
        }));
    }
    let mut models: HashSet<&str> = HashSet::new();
    for p in profiles {
        models.insert(&p.model);
        let dests: Vec<&RegionFacts> = p
            .destinations
            .iter()
            .filter_map(|d| by_code.get(d.as_str()).copied())
            .collect();
        let mut countries: Vec<&str> = dests.iter().map(|r| r.country.as_str()).collect();
        countries.sort_unstable();
        countries.dedup();
        let shared: Vec<&str> = match dests.split_first() {
            Some((first, rest)) => first
                .jurisdictions
                .iter()
                .map(String::as_str)
                .filter(|j| rest.iter().all(|r| r.jurisdictions.iter().any(|x| x == j)))
                .collect(),
            None => Vec::new(),
        };
        out.push(json!({
            "uid": {"type": "Crisp::InferenceProfile", "id": p.id},
            "attrs": {
                "scope": p.scope,
                "geography": p.geography,
                "model": p.model,
                "destinations": p.destinations.iter().map(|d| json!({"__entity": {"type": "Crisp::Region", "id": d}})).collect::<Vec<_>>(),
                "destinationCountries": countries,
                "sharedJurisdictions": shared,
            },
            "parents": [],
        }));
    }
    for m in models {
        out.push(json!({"uid": {"type": "Crisp::Model", "id": m}, "attrs": {}, "parents": []}));
    }
    Entities::from_json_value(Value::Array(out), Some(schema)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn owned(p: (&str, Action, &str, &str, &str)) -> CacheKey {
        (p.0.into(), p.1, p.2.into(), p.3.into(), p.4.into())
    }

    proptest! {
        /// A decision stored under its owned key is found by the request's borrowed
        /// parts, and only by them.
        #[test]
        fn cached_decisions_are_found_by_borrowed_parts(
            principal in ".{0,12}", profile in ".{0,12}", region in ".{0,8}",
            application in ".{0,8}", other in ".{0,12}",
        ) {
            let parts = (principal.as_str(), Action::InvokeModel, profile.as_str(), region.as_str(), application.as_str());
            let mut cache: HashMap<CacheKey, u8> = HashMap::new();
            cache.insert(owned(parts), 1);
            prop_assert_eq!(cache.get(&parts as &dyn KeyParts), Some(&1));
            let moved = (parts.0, Action::InvokeModel, parts.2, parts.3, other.as_str());
            prop_assert_eq!(cache.contains_key(&moved as &dyn KeyParts), other == application);
            let action = (parts.0, Action::InvokeModelWithResponseStream, parts.2, parts.3, parts.4);
            prop_assert_eq!(cache.get(&action as &dyn KeyParts), None);
        }
    }
}
