//! The fleet catalog and the inference profiles derived from it.
//!
//! A [`Catalog`] is the validated form of the one configuration file: regions with their
//! country, coordinates and jurisdiction tags, geographies as rules over those attributes,
//! and models with the regions that serve them. [`profiles`] derives the inference profiles
//! from it and from the lock file that freezes geographic destination sets.
//!
//! This crate is pure: it parses strings and returns values. It reads no file, opens no
//! socket and reads no clock; callers do that and hand the text in.

use std::collections::HashMap;
use std::time::Duration;

pub use crisp_routing::RegionIx;

mod config;
pub mod profiles;

pub use config::{ConfigError, ConfigErrors, parse_config};

/// The deployment the nodes belong to; names ARNs and (later) certificate identities.
#[derive(Clone, Debug, PartialEq)]
pub struct Deployment {
    pub name: String,
    /// Twelve digits, used in ARNs the way an AWS account ID is.
    pub account: String,
    /// Where application inference profiles live, shared by every node (`s3://...` or
    /// `file://...`); `None` lets each node choose a local directory.
    pub profile_store: Option<String>,
}

/// One region of the fleet, and the node that runs in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub code: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    pub city: String,
    pub lat: f64,
    pub lon: f64,
    /// Jurisdiction tags such as `eu`; geographies select on them.
    pub tags: Vec<String>,
    /// Whether the region joins global profiles (commercial regions do).
    pub global: bool,
    /// Where clients reach this region's node (`host:port`).
    pub client_addr: String,
    /// Where other nodes reach this region's node (`host:port`).
    pub peer_addr: String,
    /// Where operators reach the node's metrics, health and reload endpoints (`host:port`).
    pub admin_addr: Option<String>,
}

impl Region {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// A named set of regions, given as a rule over region attributes, so that the set can be
/// recomputed when the fleet changes (and the profile lock can tell what changed).
#[derive(Clone, Debug, PartialEq)]
pub struct Geography {
    pub name: String,
    pub description: String,
    /// A region matches if its country is one of these (empty = any country).
    pub countries: Vec<String>,
    /// A region matches only if it has all of these tags.
    pub tags: Vec<String>,
    /// Regions never in this geography, whatever their attributes.
    pub exclude_regions: Vec<String>,
}

impl Geography {
    pub fn contains(&self, region: &Region) -> bool {
        (self.countries.is_empty() || self.countries.contains(&region.country))
            && self.tags.iter().all(|t| region.has_tag(t))
            && !self.exclude_regions.contains(&region.code)
    }
}

/// Price of a model per 1,000 tokens, in US dollars.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

impl Price {
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input_per_1k + output_tokens as f64 * self.output_per_1k)
            / 1000.0
    }
}

/// How a region runs a model.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendSpec {
    /// The simulated engine: a stand-in for a GPU model server with realistic timing.
    Simulated(SimulatedSpec),
    /// OpenAI-compatible servers (vLLM, SGLang, llama.cpp, TGI, Ollama, a provider
    /// endpoint): one or more replicas of the model in the region.
    OpenAi(Vec<OpenAiSpec>),
}

/// One OpenAI-compatible server.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenAiSpec {
    /// Up to `/v1`, e.g. `http://10.0.0.5:8000/v1`.
    pub base_url: String,
    /// The environment variable holding the API key (the key itself never sits in the
    /// configuration).
    pub api_key_env: Option<String>,
    /// The model name the server knows.
    pub upstream_model: String,
    pub connect_timeout_ms: u64,
    pub first_token_timeout_ms: u64,
    pub timeout_ms: u64,
    /// Sequences the server runs at once.
    pub max_concurrency: u32,
    pub queue_limit: u32,
    /// The server's Prometheus metrics (vLLM, SGLang and llama.cpp's server export them).
    pub metrics_url: Option<String>,
    /// PEM certificates (a private CA) trusted for this server's `https://` URLs besides
    /// the public roots; relative to the configuration until [`Catalog::resolve_files`].
    pub ca_file: Option<String>,
}

/// Parameters of a simulated engine (see `crisp-engine`).
#[derive(Clone, Debug, PartialEq)]
pub struct SimulatedSpec {
    pub slots: u32,
    pub queue_limit: u32,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ttft_ms: f64,
    pub max_tokens: u32,
    pub context_tokens: u32,
    pub retry_after_ms: u64,
    /// 1.0 = real time; smaller runs faster (tests).
    pub time_scale: f64,
}

impl Default for SimulatedSpec {
    fn default() -> Self {
        SimulatedSpec {
            slots: 8,
            queue_limit: 16,
            prefill_tokens_per_s: 4000.0,
            decode_tokens_per_s: 40.0,
            ttft_ms: 80.0,
            max_tokens: 64,
            context_tokens: 8192,
            retry_after_ms: 1000,
            time_scale: 1.0,
        }
    }
}

/// A model and where it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub id: String,
    pub name: String,
    /// Price in-region and through geographic profiles.
    pub price: Price,
    /// Price through global profiles (cheaper: the router may use any region).
    pub global_price: Price,
    /// One backend per serving region, sorted by region index.
    pub backends: Vec<(RegionIx, BackendSpec)>,
}

impl Model {
    pub fn serves(&self, region: RegionIx) -> bool {
        self.backends.iter().any(|(r, _)| *r == region)
    }

    pub fn backend(&self, region: RegionIx) -> Option<&BackendSpec> {
        self.backends
            .iter()
            .find(|(r, _)| *r == region)
            .map(|(_, b)| b)
    }

    pub fn regions(&self) -> impl Iterator<Item = RegionIx> + '_ {
        self.backends.iter().map(|(r, _)| *r)
    }
}

/// Routing knobs of the deployment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoutingSettings {
    /// A region's load view older than this counts as unknown, not as headroom.
    pub stale_after_ms: u64,
    /// At most this many regions are tried for one request.
    pub max_attempts: u32,
    /// A request gives up failing over after this long.
    pub deadline_ms: u64,
    /// One region gets this long to admit a request before the next is tried (a peer
    /// that hangs must not eat the whole deadline).
    pub admit_timeout_ms: u64,
    /// Real network routes are longer than great circles by this factor.
    pub route_factor: f64,
    /// How often a node pushes its load to its peers.
    pub telemetry_interval_ms: u64,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        RoutingSettings {
            stale_after_ms: 1500,
            max_attempts: 4,
            deadline_ms: 30_000,
            admit_timeout_ms: 2_000,
            route_factor: 1.6,
            telemetry_interval_ms: 100,
        }
    }
}

/// Where access control lives; paths as written in the config (relative to it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AccessSettings {
    pub principals: String,
    pub keys: String,
    pub policies: Vec<String>,
    pub guardrails: Vec<String>,
}

/// The source region's audit trail.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditSettings {
    /// Directory of the local durable log (relative to the node's data directory, by
    /// default the configuration's); `{region}` is replaced by the node's region.
    pub dir: String,
    /// Refuse new requests when events cannot be written (rather than serve unaudited).
    pub refuse_on_failure: bool,
    pub seal_bytes: u64,
    pub seal_after_s: u64,
    /// Where sealed files are shipped (`s3://bucket/prefix` or `file:///path`); `{region}`
    /// is replaced by the node's region (e.g. one bucket per region) and the region is
    /// appended to the prefix.
    pub store: Option<String>,
    /// When an answer may complete: once its event is on disk, or once it is written.
    pub durability: AuditDurability,
}

/// `[audit] durability`: what an answer waits for before it completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuditDurability {
    /// `"fsync"`: its event is on disk (survives a crash of the machine).
    #[default]
    Fsync,
    /// `"write"`: its event is written to the log file (survives a crash of crisp) and
    /// flushed to disk within `flush_within_ms`.
    Write { flush_within_ms: u64 },
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            dir: "audit/{region}".into(),
            refuse_on_failure: true,
            seal_bytes: 8 << 20,
            seal_after_s: 300,
            store: None,
            durability: AuditDurability::Fsync,
        }
    }
}

/// Model invocation logging (payloads) for one source region: off unless configured.
#[derive(Clone, Debug, PartialEq)]
pub struct InvocationLogSettings {
    pub region: String,
    /// `s3://bucket/prefix` or `file:///path`, in the region itself.
    pub store: String,
    /// Bodies larger than this are stored as their own object and referenced by path.
    pub large_body_bytes: usize,
}

/// Limits on client input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Client connections open at once; more wait in the listen queue until one closes.
    pub max_connections: usize,
    /// Client connections one address may hold open at once; more are closed as they
    /// arrive. `None` (the default): no limit of its own, as behind a load balancer,
    /// whose few addresses carry every client.
    pub max_connections_per_client: Option<usize>,
    /// How long a client may take to send a request head, and a kept-alive HTTP/1
    /// connection may wait for its next one.
    pub header_read_timeout: Duration,
    /// How long a request body may go without a byte arriving.
    pub body_read_timeout: Duration,
    /// How long a client connection may go without starting a request before it is
    /// closed (HTTP/2: GOAWAY; open requests finish first).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_connections: 10_000,
            max_connections_per_client: None,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// The validated configuration: everything a node knows about the fleet.
#[derive(Clone, Debug, PartialEq)]
pub struct Catalog {
    pub deployment: Deployment,
    /// Indexed by [`RegionIx`].
    pub regions: Vec<Region>,
    pub geographies: Vec<Geography>,
    pub models: Vec<Model>,
    pub routing: RoutingSettings,
    pub limits: Limits,
    /// `None`: no authentication or authorization (say so loudly at start).
    pub access: Option<AccessSettings>,
    pub audit: AuditSettings,
    pub invocation_logs: Vec<InvocationLogSettings>,
    region_index: HashMap<String, RegionIx>,
    model_index: HashMap<String, usize>,
}

impl Catalog {
    /// Makes the files the configuration names by relative path (backends' `ca_file`)
    /// relative to `base`, the configuration's directory.
    pub fn resolve_files(&mut self, base: &std::path::Path) {
        for model in &mut self.models {
            for (_, spec) in &mut model.backends {
                let BackendSpec::OpenAi(replicas) = spec else {
                    continue;
                };
                for r in replicas {
                    if let Some(ca) = &mut r.ca_file {
                        *ca = base.join(&*ca).to_string_lossy().into_owned();
                    }
                }
            }
        }
    }

    fn new(
        deployment: Deployment,
        regions: Vec<Region>,
        geographies: Vec<Geography>,
        models: Vec<Model>,
        routing: RoutingSettings,
        limits: Limits,
    ) -> Catalog {
        let region_index = regions
            .iter()
            .enumerate()
            .filter_map(|(i, r)| RegionIx::try_from(i).ok().map(|ix| (r.code.clone(), ix)))
            .collect();
        let model_index = models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.clone(), i))
            .collect();
        Catalog {
            deployment,
            regions,
            geographies,
            models,
            routing,
            limits,
            access: None,
            audit: AuditSettings::default(),
            invocation_logs: Vec::new(),
            region_index,
            model_index,
        }
    }

    pub fn region_ix(&self, code: &str) -> Option<RegionIx> {
        self.region_index.get(code).copied()
    }

    pub fn region(&self, ix: RegionIx) -> Option<&Region> {
        self.regions.get(usize::from(ix))
    }

    /// The region's code, or `"?"` for an index outside the table.
    pub fn region_code(&self, ix: RegionIx) -> &str {
        self.region(ix).map_or("?", |r| r.code.as_str())
    }

    pub fn model(&self, id: &str) -> Option<&Model> {
        self.model_index.get(id).and_then(|&i| self.models.get(i))
    }

    /// The model's position in [`Catalog::models`].
    pub fn model_ix(&self, id: &str) -> Option<usize> {
        self.model_index.get(id).copied()
    }

    pub fn geography(&self, name: &str) -> Option<&Geography> {
        self.geographies.iter().find(|g| g.name == name)
    }

    /// What to say about each geography no region belongs to: it has no profiles, which
    /// may be planned (its regions are not deployed yet) or a mistake (a country code
    /// like "UK" for "GB", a misspelled tag).
    pub fn empty_geographies(&self) -> Vec<String> {
        self.geographies
            .iter()
            .filter(|g| !self.regions.iter().any(|r| g.contains(r)))
            .map(|g| {
                let mut rule = Vec::new();
                if !g.countries.is_empty() {
                    rule.push(format!("countries {:?}", g.countries));
                }
                if !g.tags.is_empty() {
                    rule.push(format!("tags {:?}", g.tags));
                }
                format!(
                    "geography {} matches no region ({}), so it has no profiles until one of its regions is added; if one should match, check the country codes (ISO 3166 alpha-2, e.g. \"GB\" not \"UK\") and the regions' tags",
                    g.name,
                    rule.join(" and ")
                )
            })
            .collect()
    }

    /// The geographies a region belongs to, by name.
    pub fn geographies_of(&self, ix: RegionIx) -> Vec<&str> {
        match self.region(ix) {
            Some(region) => self
                .geographies
                .iter()
                .filter(|g| g.contains(region))
                .map(|g| g.name.as_str())
                .collect(),
            None => Vec::new(),
        }
    }

    /// The routing topology: round trips from great-circle distance over fibre times the
    /// route factor.
    pub fn topology(&self) -> crisp_routing::Topology {
        let coords: Vec<(f64, f64)> = self.regions.iter().map(|r| (r.lat, r.lon)).collect();
        crisp_routing::Topology::from_coordinates(
            &coords,
            self.routing.route_factor,
            vec![1.0; coords.len()],
        )
        .unwrap_or_else(|_| crisp_routing::Topology::uniform(coords.len()))
    }
}

/// Whether `s` is a valid model or profile identifier: `[a-zA-Z0-9-:.]+`, 1 to 64 chars.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b':' || b == b'.')
}
