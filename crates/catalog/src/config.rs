//! The configuration file format (TOML, `version = 1`) and its validation.
//!
//! Every problem is reported at once, each with its line and column, so that a user with
//! three mistakes sees three messages: a TOML syntax error stops the reading (the file
//! cannot be read further), a type error is reported for each section and each
//! `[[region]]`, `[[model]]`, ... that has one, and validation of a well-formed file
//! reports everything it finds.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::{
    AccessSettings, AuditDurability, AuditSettings, BackendSpec, Catalog, Deployment, Geography,
    InvocationLogSettings, Limits, Model, OpenAiSpec, Price, Region, RegionIx, RoutingSettings,
    SimulatedSpec, is_valid_id,
};

/// The format version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// One problem in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "line {l}, column {c}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: Spanned<u32>,
    deployment: RawDeployment,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    access: Option<RawAccess>,
    #[serde(default)]
    audit: Option<RawAudit>,
    #[serde(default, rename = "invocation_log")]
    invocation_logs: Vec<RawInvocationLog>,
    #[serde(default, rename = "region")]
    regions: Vec<RawRegion>,
    #[serde(default, rename = "geography")]
    geographies: Vec<RawGeography>,
    #[serde(default, rename = "model")]
    models: Vec<RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    name: Spanned<String>,
    #[serde(default = "default_account")]
    account: Spanned<String>,
    #[serde(default)]
    profile_store: Option<Spanned<String>>,
}

fn default_account() -> Spanned<String> {
    Spanned::new(0..0, "000000000000".to_owned())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    stale_after_ms: Option<u64>,
    max_attempts: Option<Spanned<u32>>,
    deadline_ms: Option<u64>,
    admit_timeout_ms: Option<Spanned<u64>>,
    route_factor: Option<Spanned<f64>>,
    telemetry_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInvocationLog {
    region: Spanned<String>,
    store: Spanned<String>,
    #[serde(default)]
    large_body_bytes: Option<usize>,
    /// Only text is produced by crisp's engines today.
    #[serde(default)]
    text: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: Option<String>,
    on_failure: Option<Spanned<String>>,
    seal_bytes: Option<u64>,
    seal_after_s: Option<u64>,
    store: Option<String>,
    durability: Option<Spanned<String>>,
    flush_within_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    principals: String,
    keys: String,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    guardrails: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<Spanned<usize>>,
    max_connections: Option<Spanned<usize>>,
    max_connections_per_client: Option<Spanned<usize>>,
    header_read_timeout_ms: Option<Spanned<u64>>,
    body_read_timeout_ms: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    code: Spanned<String>,
    country: Spanned<String>,
    #[serde(default)]
    city: String,
    lat: Spanned<f64>,
    lon: Spanned<f64>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default = "yes")]
    global: bool,
    client: Spanned<String>,
    peer: Spanned<String>,
    #[serde(default)]
    admin: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeography {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    countries: Vec<Spanned<String>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    #[serde(default)]
    exclude_regions: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: Spanned<String>,
    #[serde(default)]
    name: String,
    input_price_per_1k: Spanned<f64>,
    output_price_per_1k: Spanned<f64>,
    /// Fraction taken off the price for global profiles.
    #[serde(default = "default_global_discount")]
    global_discount: Spanned<f64>,
    #[serde(default, rename = "backend")]
    backends: Vec<RawBackend>,
}

fn default_global_discount() -> Spanned<f64> {
    Spanned::new(0..0, 0.10)
}

/// One backend table. Settings of every kind live side by side here (TOML spans do not
/// survive serde's tagged enums); validation checks that each setting fits the kind.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    region: Spanned<String>,
    kind: Spanned<String>,
    slots: Option<Spanned<u32>>,
    queue_limit: Option<u32>,
    prefill_tokens_per_s: Option<Spanned<f64>>,
    decode_tokens_per_s: Option<Spanned<f64>>,
    ttft_ms: Option<Spanned<f64>>,
    max_tokens: Option<Spanned<u32>>,
    context_tokens: Option<u32>,
    retry_after_ms: Option<u64>,
    time_scale: Option<Spanned<f64>>,
    base_url: Option<Spanned<String>>,
    api_key_env: Option<String>,
    upstream_model: Option<String>,
    connect_timeout_ms: Option<u64>,
    first_token_timeout_ms: Option<u64>,
    timeout_ms: Option<u64>,
    max_concurrency: Option<Spanned<u32>>,
    metrics_url: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

/// Collects problems with their positions in the source text.
struct Problems<'a> {
    src: &'a str,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: String) {
        let (line, column) = if span.is_empty() && span.start == 0 {
            (None, None)
        } else {
            let (l, c) = line_col(self.src, span.start);
            (Some(l), Some(c))
        };
        self.errors.push(ConfigError {
            line,
            column,
            message,
        });
    }
}

fn located(src: &str, span: Option<std::ops::Range<usize>>, message: &str) -> ConfigError {
    let (line, column) = match span {
        Some(span) => {
            let (l, c) = line_col(src, span.start);
            (Some(l), Some(c))
        }
        None => (None, None),
    };
    ConfigError {
        line,
        column,
        message: message.trim().to_owned(),
    }
}

/// The type errors of a file that is valid TOML, read section by section and element by
/// element: the whole-file read stops at the first, and two regions with a mistake each
/// should show both. Within a section, the key the error is in is left out and the rest
/// read again, so two mistakes of one region show as two as well. Empty when the file is
/// not valid TOML.
fn type_errors(src: &str) -> Vec<ConfigError> {
    use serde::de::IntoDeserializer;

    /// The key of `table` whose value (or name) the span `at` lies in.
    fn key_at(table: &toml_edit::InlineTable, at: &std::ops::Range<usize>) -> Option<String> {
        let within = |s: Option<std::ops::Range<usize>>| {
            s.is_some_and(|s| s.start <= at.start && at.end <= s.end)
        };
        table.iter().find_map(|(key, value)| {
            let named = table.key(key).is_some_and(|k| within(k.span()));
            (named || within(value.span())).then(|| key.to_owned())
        })
    }
    fn check<T: serde::de::DeserializeOwned>(
        src: &str,
        at: Option<std::ops::Range<usize>>,
        item: &toml_edit::Item,
        found: &mut Vec<ConfigError>,
    ) {
        let Ok(mut value) = item.clone().into_value() else {
            return;
        };
        let mut left_out: Vec<String> = Vec::new();
        loop {
            let Err(e) = T::deserialize(value.clone().into_deserializer()) else {
                return;
            };
            let culprit = e
                .span()
                .and_then(|s| value.as_inline_table().and_then(|t| key_at(t, &s)));
            // An error outside the keys that names a key left out ("missing field `lat`")
            // is that key's absence, already reported as its mistake.
            let consequence = culprit.is_none()
                && left_out
                    .iter()
                    .any(|k| e.message().contains(&format!("`{k}`")));
            if !consequence {
                // An error of the table itself (a missing field) has no span of its own.
                found.push(located(src, e.span().or(at.clone()), e.message()));
            }
            match (culprit, value.as_inline_table_mut()) {
                (Some(key), Some(table)) if !left_out.contains(&key) => {
                    table.remove(&key);
                    left_out.push(key);
                }
                _ => return,
            }
        }
    }
    fn each<T: serde::de::DeserializeOwned>(
        src: &str,
        item: &toml_edit::Item,
        found: &mut Vec<ConfigError>,
    ) {
        match item.as_array_of_tables() {
            Some(tables) => {
                for table in tables {
                    let item = toml_edit::Item::Table(table.clone());
                    check::<T>(src, table.span(), &item, found);
                }
            }
            None => check::<Vec<T>>(src, item.span(), item, found),
        }
    }

    let Ok(doc) = toml_edit::ImDocument::parse(src) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (key, item) in doc.as_table().iter() {
        let at = item.span();
        match key {
            "version" => check::<Spanned<u32>>(src, at, item, &mut found),
            "deployment" => check::<RawDeployment>(src, at, item, &mut found),
            "routing" => check::<RawRouting>(src, at, item, &mut found),
            "limits" => check::<RawLimits>(src, at, item, &mut found),
            "access" => check::<RawAccess>(src, at, item, &mut found),
            "audit" => check::<RawAudit>(src, at, item, &mut found),
            "invocation_log" => each::<RawInvocationLog>(src, item, &mut found),
            "region" => each::<RawRegion>(src, item, &mut found),
            "geography" => each::<RawGeography>(src, item, &mut found),
            "model" => each::<RawModel>(src, item, &mut found),
            // The whole-file read names it, with the sections there are.
            _ => {}
        }
    }
    found
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Parses and validates a configuration file's text.
pub fn parse_config(src: &str) -> Result<Catalog, ConfigErrors> {
    let raw: RawConfig = toml::from_str(src).map_err(|e| {
        let first = located(src, e.span(), e.message());
        let mut all = type_errors(src);
        // The whole-file read names what the sections alone cannot (a missing section).
        if !all.contains(&first) {
            all.insert(0, first);
        }
        ConfigErrors(all)
    })?;
    let mut p = Problems {
        src,
        errors: Vec::new(),
    };
    let catalog = validate(raw, &mut p);
    if p.errors.is_empty() {
        Ok(catalog)
    } else {
        Err(ConfigErrors(p.errors))
    }
}

fn validate(raw: RawConfig, p: &mut Problems<'_>) -> Catalog {
    if *raw.version.get_ref() != CONFIG_VERSION {
        p.at(
            raw.version.span(),
            format!(
                "unsupported config version {}; this build reads version {CONFIG_VERSION}",
                raw.version.get_ref()
            ),
        );
    }

    let deployment = validate_deployment(raw.deployment, p);
    let routing = validate_routing(raw.routing, p);
    let limits = validate_limits(raw.limits, p);
    let regions = validate_regions(raw.regions, p);
    let region_index: HashMap<&str, RegionIx> = regions
        .iter()
        .enumerate()
        .filter_map(|(i, r)| RegionIx::try_from(i).ok().map(|ix| (r.code.as_str(), ix)))
        .collect();
    let geographies = validate_geographies(raw.geographies, &region_index, p);
    let models = validate_models(raw.models, &region_index, p);
    let mut catalog = Catalog::new(deployment, regions, geographies, models, routing, limits);
    if let Some(a) = raw.audit {
        let d = AuditSettings::default();
        let refuse = match a.on_failure.as_ref().map(|v| v.get_ref().as_str()) {
            None | Some("refuse") => true,
            Some("serve") => false,
            Some(other) => {
                if let Some(v) = &a.on_failure {
                    p.at(
                        v.span(),
                        format!("audit.on_failure {other:?} must be \"refuse\" (no unaudited requests) or \"serve\""),
                    );
                }
                true
            }
        };
        let durability = match a.durability.as_ref().map(|v| v.get_ref().as_str()) {
            None | Some("fsync") => {
                if let Some(v) = &a.flush_within_ms {
                    p.at(
                        v.span(),
                        "audit.flush_within_ms applies only with durability = \"write\"; remove it or set durability = \"write\"".into(),
                    );
                }
                AuditDurability::Fsync
            }
            Some("write") => AuditDurability::Write {
                flush_within_ms: a
                    .flush_within_ms
                    .as_ref()
                    .map_or(100, |v| *v.get_ref())
                    .max(1),
            },
            Some(other) => {
                if let Some(v) = &a.durability {
                    p.at(
                        v.span(),
                        format!("audit.durability {other:?} must be \"fsync\" (an answer waits until its event is on disk) or \"write\" (until it is written to the log file, flushed within flush_within_ms)"),
                    );
                }
                AuditDurability::Fsync
            }
        };
        catalog.audit = AuditSettings {
            durability,
            dir: a.dir.unwrap_or(d.dir),
            refuse_on_failure: refuse,
            seal_bytes: a.seal_bytes.unwrap_or(d.seal_bytes).max(1),
            seal_after_s: a.seal_after_s.unwrap_or(d.seal_after_s).max(1),
            store: a.store,
        };
    }
    for l in raw.invocation_logs {
        if catalog.region_ix(l.region.get_ref()).is_none() {
            p.at(
                l.region.span(),
                format!(
                    "invocation_log: region {:?} is not defined",
                    l.region.get_ref()
                ),
            );
        }
        let store = l.store.get_ref();
        if !(store.starts_with("s3://") || store.starts_with("file:///")) {
            p.at(
                l.store.span(),
                format!(
                    "invocation_log: store {store:?} must be s3://bucket/prefix or file:///path"
                ),
            );
        }
        if l.text == Some(false) {
            continue;
        }
        catalog.invocation_logs.push(InvocationLogSettings {
            region: l.region.into_inner(),
            store: l.store.into_inner(),
            large_body_bytes: l.large_body_bytes.unwrap_or(100 * 1024),
        });
    }
    catalog.access = raw.access.map(|a| AccessSettings {
        principals: a.principals,
        keys: a.keys,
        policies: a.policies,
        guardrails: a.guardrails,
    });
    catalog
}

fn validate_deployment(raw: RawDeployment, p: &mut Problems<'_>) -> Deployment {
    let name = raw.name.get_ref();
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        p.at(
            raw.name.span(),
            format!("deployment name {name:?} must be lowercase letters, digits and '-'"),
        );
    }
    let account = raw.account.get_ref();
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        p.at(
            raw.account.span(),
            format!("account {account:?} must be exactly 12 digits (it appears in ARNs)"),
        );
    }
    if let Some(store) = &raw.profile_store {
        let v = store.get_ref();
        if !(v.starts_with("s3://") || v.starts_with("file:///") || v.starts_with("memory://")) {
            p.at(
                store.span(),
                format!(
                    "profile_store {v:?} must be an s3://bucket/prefix or file:///absolute/path URL"
                ),
            );
        }
    }
    Deployment {
        name: raw.name.into_inner(),
        account: raw.account.into_inner(),
        profile_store: raw.profile_store.map(Spanned::into_inner),
    }
}

fn validate_routing(raw: RawRouting, p: &mut Problems<'_>) -> RoutingSettings {
    let d = RoutingSettings::default();
    let mut s = RoutingSettings {
        stale_after_ms: raw.stale_after_ms.unwrap_or(d.stale_after_ms),
        max_attempts: raw
            .max_attempts
            .as_ref()
            .map_or(d.max_attempts, |v| *v.get_ref()),
        deadline_ms: raw.deadline_ms.unwrap_or(d.deadline_ms),
        admit_timeout_ms: raw
            .admit_timeout_ms
            .as_ref()
            .map_or(d.admit_timeout_ms, |v| *v.get_ref()),
        route_factor: raw
            .route_factor
            .as_ref()
            .map_or(d.route_factor, |v| *v.get_ref()),
        telemetry_interval_ms: raw
            .telemetry_interval_ms
            .as_ref()
            .map_or(d.telemetry_interval_ms, |v| *v.get_ref()),
    };
    if let Some(v) = &raw.max_attempts
        && *v.get_ref() == 0
    {
        p.at(v.span(), "routing.max_attempts must be at least 1".into());
        s.max_attempts = 1;
    }
    if let Some(v) = &raw.admit_timeout_ms
        && *v.get_ref() == 0
    {
        p.at(
            v.span(),
            "routing.admit_timeout_ms must be at least 1".into(),
        );
    }
    if let Some(v) = &raw.route_factor
        && !(v.get_ref().is_finite() && *v.get_ref() >= 1.0)
    {
        p.at(
            v.span(),
            "routing.route_factor must be a number >= 1.0 (routes are never shorter than great circles)".into(),
        );
    }
    if let Some(v) = &raw.telemetry_interval_ms
        && !(10..=10_000).contains(v.get_ref())
    {
        p.at(
            v.span(),
            "routing.telemetry_interval_ms must be between 10 and 10000".into(),
        );
    }
    s
}

fn validate_limits(raw: RawLimits, p: &mut Problems<'_>) -> Limits {
    let mut l = Limits::default();
    if let Some(v) = raw.max_body_bytes {
        if *v.get_ref() < 1024 {
            p.at(
                v.span(),
                "limits.max_body_bytes must be at least 1024".into(),
            );
        }
        l.max_body_bytes = v.into_inner();
    }
    if let Some(v) = raw.max_connections {
        if *v.get_ref() == 0 {
            p.at(v.span(), "limits.max_connections must be at least 1".into());
        }
        l.max_connections = v.into_inner();
    }
    if let Some(v) = raw.max_connections_per_client {
        if *v.get_ref() == 0 {
            p.at(
                v.span(),
                "limits.max_connections_per_client must be at least 1 (leave it out for no limit per client)".into(),
            );
        }
        l.max_connections_per_client = Some(v.into_inner());
    }
    let timeouts = [
        (
            raw.header_read_timeout_ms,
            "header_read_timeout_ms",
            &mut l.header_read_timeout,
        ),
        (
            raw.body_read_timeout_ms,
            "body_read_timeout_ms",
            &mut l.body_read_timeout,
        ),
        (raw.idle_timeout_ms, "idle_timeout_ms", &mut l.idle_timeout),
    ];
    for (v, name, out) in timeouts {
        let Some(v) = v else { continue };
        if !(100..=3_600_000).contains(v.get_ref()) {
            p.at(
                v.span(),
                format!("limits.{name} must be between 100 (0.1 s) and 3600000 (an hour)"),
            );
        }
        *out = Duration::from_millis(v.into_inner());
    }
    l
}

fn check_host_port(s: &Spanned<String>, what: &str, region: &str, p: &mut Problems<'_>) {
    let v = s.get_ref();
    let ok = v
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        p.at(
            s.span(),
            format!(
                "region {region}: {what} address {v:?} must be host:port, e.g. \"127.0.0.1:8080\""
            ),
        );
    }
}

fn validate_regions(raw: Vec<RawRegion>, p: &mut Problems<'_>) -> Vec<Region> {
    if raw.is_empty() {
        p.at(
            0..0,
            "no [[region]] defined: a deployment needs at least one region".into(),
        );
    }
    if raw.len() > usize::from(RegionIx::MAX) {
        p.at(
            0..0,
            format!("at most {} regions are supported", RegionIx::MAX),
        );
    }
    let mut seen = HashSet::new();
    let mut addrs: HashMap<String, String> = HashMap::new();
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        let code = r.code.get_ref().clone();
        if code.is_empty()
            || !code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            p.at(
                r.code.span(),
                format!("region code {code:?} must be lowercase letters, digits and '-', like \"eu-west-1\""),
            );
        }
        if !seen.insert(code.clone()) {
            p.at(r.code.span(), format!("region {code} is defined twice"));
        }
        let country = r.country.get_ref();
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            p.at(
                r.country.span(),
                format!("region {code}: country {country:?} must be an ISO 3166 alpha-2 code such as \"DE\""),
            );
        }
        if !(-90.0..=90.0).contains(r.lat.get_ref()) {
            p.at(
                r.lat.span(),
                format!("region {code}: latitude must be between -90 and 90"),
            );
        }
        if !(-180.0..=180.0).contains(r.lon.get_ref()) {
            p.at(
                r.lon.span(),
                format!("region {code}: longitude must be between -180 and 180"),
            );
        }
        for t in &r.tags {
            if t.get_ref().is_empty() {
                p.at(t.span(), format!("region {code}: empty tag"));
            }
        }
        check_host_port(&r.client, "client", &code, p);
        check_host_port(&r.peer, "peer", &code, p);
        if let Some(admin) = &r.admin {
            check_host_port(admin, "admin", &code, p);
        }
        for a in [Some(&r.client), Some(&r.peer), r.admin.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(other) = addrs.insert(a.get_ref().clone(), code.clone()) {
                p.at(
                    a.span(),
                    format!(
                        "region {code}: address {} is already used by region {other}",
                        a.get_ref()
                    ),
                );
            }
        }
        out.push(Region {
            code,
            country: r.country.into_inner(),
            city: r.city,
            lat: r.lat.into_inner(),
            lon: r.lon.into_inner(),
            tags: r.tags.into_iter().map(Spanned::into_inner).collect(),
            global: r.global,
            client_addr: r.client.into_inner(),
            peer_addr: r.peer.into_inner(),
            admin_addr: r.admin.map(Spanned::into_inner),
        });
    }
    out
}

fn validate_geographies(
    raw: Vec<RawGeography>,
    regions: &HashMap<&str, RegionIx>,
    p: &mut Problems<'_>,
) -> Vec<Geography> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for g in raw {
        let name = g.name.get_ref().clone();
        let well_formed = !name.is_empty()
            && name.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !well_formed {
            p.at(
                g.name.span(),
                format!("geography name {name:?} must start with a letter and use lowercase letters, digits and '-'"),
            );
        } else if name == "global" {
            p.at(
                g.name.span(),
                "\"global\" is reserved for global profiles; pick another geography name".into(),
            );
        } else if crate::profiles::split_version_suffix(&name).1.is_some() {
            p.at(
                g.name.span(),
                format!("geography name {name:?} ends like a profile version (\"-v2\"); pick another name"),
            );
        }
        if !seen.insert(name.clone()) {
            p.at(g.name.span(), format!("geography {name} is defined twice"));
        }
        if g.countries.is_empty() && g.tags.is_empty() {
            p.at(
                g.name.span(),
                format!("geography {name} has no rule: give `countries` and/or `tags` (a geography of every region is what global profiles are)"),
            );
        }
        for c in &g.countries {
            let v = c.get_ref();
            if v.len() != 2 || !v.bytes().all(|b| b.is_ascii_uppercase()) {
                p.at(
                    c.span(),
                    format!("geography {name}: country {v:?} must be an ISO 3166 alpha-2 code"),
                );
            }
        }
        for r in &g.exclude_regions {
            if !regions.contains_key(r.get_ref().as_str()) {
                p.at(
                    r.span(),
                    format!(
                        "geography {name}: excluded region {:?} is not defined",
                        r.get_ref()
                    ),
                );
            }
        }
        out.push(Geography {
            name,
            description: g.description,
            countries: g.countries.into_iter().map(Spanned::into_inner).collect(),
            tags: g.tags.into_iter().map(Spanned::into_inner).collect(),
            exclude_regions: g
                .exclude_regions
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
        });
    }
    out
}

fn check_price(v: &Spanned<f64>, what: &str, model: &str, p: &mut Problems<'_>) {
    if !(v.get_ref().is_finite() && *v.get_ref() >= 0.0) {
        p.at(
            v.span(),
            format!("model {model}: {what} must be a non-negative number of dollars"),
        );
    }
}

fn validate_models(
    raw: Vec<RawModel>,
    regions: &HashMap<&str, RegionIx>,
    p: &mut Problems<'_>,
) -> Vec<Model> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    let known = || {
        let mut v: Vec<&str> = regions.keys().copied().collect();
        v.sort_unstable();
        v.join(", ")
    };
    for m in raw {
        let id = m.id.get_ref().clone();
        if !is_valid_id(&id) {
            p.at(
                m.id.span(),
                format!(
                    "model id {id:?} must be 1-64 characters of letters, digits, '-', ':' and '.'"
                ),
            );
        }
        if id.starts_with("global.") || id.starts_with("arn:") {
            p.at(
                m.id.span(),
                format!("model id {id:?} must not look like a profile ID or an ARN"),
            );
        }
        if !seen.insert(id.clone()) {
            p.at(m.id.span(), format!("model {id} is defined twice"));
        }
        check_price(&m.input_price_per_1k, "input_price_per_1k", &id, p);
        check_price(&m.output_price_per_1k, "output_price_per_1k", &id, p);
        let discount = *m.global_discount.get_ref();
        if !(0.0..1.0).contains(&discount) {
            p.at(
                m.global_discount.span(),
                format!("model {id}: global_discount must be in [0, 1), e.g. 0.1 for 10% off"),
            );
        }
        if m.backends.is_empty() {
            p.at(
                m.id.span(),
                format!("model {id} has no [[model.backend]]: say which regions serve it"),
            );
        }
        let mut backends = Vec::with_capacity(m.backends.len());
        for b in m.backends {
            let code = b.region.get_ref();
            let Some(&ix) = regions.get(code.as_str()) else {
                p.at(
                    b.region.span(),
                    format!(
                        "model {id}: backend region {code:?} is not defined; defined regions: {}",
                        known()
                    ),
                );
                continue;
            };
            let spec = match b.kind.get_ref().as_str() {
                "simulated" => BackendSpec::Simulated(validate_simulated(&b, &id, code, p)),
                "openai" => BackendSpec::OpenAi(vec![validate_openai(&b, &id, code, p)]),
                other => {
                    p.at(
                        b.kind.span(),
                        format!("model {id} in {code}: unknown backend kind {other:?}; known kinds: simulated, openai (any OpenAI-compatible server: vLLM, SGLang, llama.cpp, Ollama, TGI or a provider's endpoint)"),
                    );
                    continue;
                }
            };
            // Several `openai` tables for one region are replicas of one pool.
            match (backends.iter_mut().find(|(r, _)| *r == ix), spec) {
                (None, spec) => backends.push((ix, spec)),
                (Some((_, BackendSpec::OpenAi(replicas))), BackendSpec::OpenAi(more)) => {
                    replicas.extend(more);
                }
                (Some(_), _) => p.at(
                    b.region.span(),
                    format!("model {id}: region {code} has two backends; several backends in one region must all be kind \"openai\" (replicas)"),
                ),
            }
        }
        backends.sort_by_key(|(r, _)| *r);
        let price = Price {
            input_per_1k: *m.input_price_per_1k.get_ref(),
            output_per_1k: *m.output_price_per_1k.get_ref(),
        };
        let global_price = Price {
            input_per_1k: price.input_per_1k * (1.0 - discount),
            output_per_1k: price.output_per_1k * (1.0 - discount),
        };
        out.push(Model {
            name: if m.name.is_empty() {
                id.clone()
            } else {
                m.name
            },
            id,
            price,
            global_price,
            backends,
        });
    }
    out
}

fn validate_openai(s: &RawBackend, model: &str, region: &str, p: &mut Problems<'_>) -> OpenAiSpec {
    let base_url = match &s.base_url {
        Some(u) => {
            let v = u.get_ref();
            if !(v.starts_with("http://") || v.starts_with("https://")) {
                p.at(
                    u.span(),
                    format!("model {model} in {region}: base_url {v:?} must start with http:// or https:// (e.g. \"http://10.0.0.5:8000/v1\")"),
                );
            }
            v.trim_end_matches('/').to_owned()
        }
        None => {
            p.at(
                s.kind.span(),
                format!("model {model} in {region}: an openai backend needs base_url, e.g. \"http://10.0.0.5:8000/v1\""),
            );
            String::new()
        }
    };
    if let Some(v) = &s.max_concurrency
        && *v.get_ref() == 0
    {
        p.at(
            v.span(),
            format!("model {model} in {region}: max_concurrency must be at least 1"),
        );
    }
    if let Some(u) = &s.metrics_url
        && !u.get_ref().starts_with("http")
    {
        p.at(
            u.span(),
            format!("model {model} in {region}: metrics_url must be an http(s) URL"),
        );
    }
    if let Some(ca) = &s.ca_file
        && !base_url.starts_with("https://")
        && !s
            .metrics_url
            .as_ref()
            .is_some_and(|u| u.get_ref().starts_with("https://"))
    {
        p.at(
            ca.span(),
            format!("model {model} in {region}: ca_file is for https:// servers, but base_url {base_url:?} is plain http; remove ca_file or use https://"),
        );
    }
    for (set, name) in [
        (s.slots.is_some(), "slots"),
        (s.decode_tokens_per_s.is_some(), "decode_tokens_per_s"),
        (s.prefill_tokens_per_s.is_some(), "prefill_tokens_per_s"),
        (s.ttft_ms.is_some(), "ttft_ms"),
        (s.time_scale.is_some(), "time_scale"),
    ] {
        if set {
            p.at(
                s.kind.span(),
                format!("model {model} in {region}: {name} is a setting of simulated backends; openai backends use max_concurrency and timeouts"),
            );
        }
    }
    OpenAiSpec {
        base_url,
        api_key_env: s.api_key_env.clone(),
        upstream_model: s.upstream_model.clone().unwrap_or_else(|| model.to_owned()),
        connect_timeout_ms: s.connect_timeout_ms.unwrap_or(2_000),
        first_token_timeout_ms: s.first_token_timeout_ms.unwrap_or(30_000),
        timeout_ms: s.timeout_ms.unwrap_or(300_000),
        max_concurrency: s.max_concurrency.as_ref().map_or(16, |v| *v.get_ref()),
        queue_limit: s.queue_limit.unwrap_or(16),
        metrics_url: s.metrics_url.as_ref().map(|u| u.get_ref().clone()),
        ca_file: s.ca_file.as_ref().map(|c| c.get_ref().clone()),
    }
}

fn validate_simulated(
    s: &RawBackend,
    model: &str,
    region: &str,
    p: &mut Problems<'_>,
) -> SimulatedSpec {
    let d = SimulatedSpec::default();
    let positive = |v: &Option<Spanned<f64>>, what: &str, p: &mut Problems<'_>| {
        if let Some(v) = v
            && !(v.get_ref().is_finite() && *v.get_ref() > 0.0)
        {
            p.at(
                v.span(),
                format!("model {model} in {region}: {what} must be a positive number"),
            );
        }
    };
    for (span, name) in [
        (s.base_url.as_ref().map(Spanned::span), "base_url"),
        (s.ca_file.as_ref().map(Spanned::span), "ca_file"),
        (s.metrics_url.as_ref().map(Spanned::span), "metrics_url"),
    ] {
        if let Some(span) = span {
            p.at(
                span,
                format!("model {model} in {region}: {name} is a setting of openai backends; a simulated backend has none"),
            );
        }
    }
    positive(&s.prefill_tokens_per_s, "prefill_tokens_per_s", p);
    positive(&s.decode_tokens_per_s, "decode_tokens_per_s", p);
    positive(&s.time_scale, "time_scale", p);
    if let Some(v) = &s.ttft_ms
        && !(v.get_ref().is_finite() && *v.get_ref() >= 0.0)
    {
        p.at(
            v.span(),
            format!("model {model} in {region}: ttft_ms must be >= 0"),
        );
    }
    for (v, what) in [(&s.slots, "slots"), (&s.max_tokens, "max_tokens")] {
        if let Some(v) = v
            && *v.get_ref() == 0
        {
            p.at(
                v.span(),
                format!("model {model} in {region}: {what} must be at least 1"),
            );
        }
    }
    let f = |v: &Option<Spanned<f64>>, dflt: f64| v.as_ref().map_or(dflt, |v| *v.get_ref());
    let u = |v: &Option<Spanned<u32>>, dflt: u32| v.as_ref().map_or(dflt, |v| *v.get_ref());
    SimulatedSpec {
        slots: u(&s.slots, d.slots),
        queue_limit: s.queue_limit.unwrap_or(d.queue_limit),
        prefill_tokens_per_s: f(&s.prefill_tokens_per_s, d.prefill_tokens_per_s),
        decode_tokens_per_s: f(&s.decode_tokens_per_s, d.decode_tokens_per_s),
        ttft_ms: f(&s.ttft_ms, d.ttft_ms),
        max_tokens: u(&s.max_tokens, d.max_tokens),
        context_tokens: s.context_tokens.unwrap_or(d.context_tokens),
        retry_after_ms: s.retry_after_ms.unwrap_or(d.retry_after_ms),
        time_scale: f(&s.time_scale, d.time_scale),
    }
}
