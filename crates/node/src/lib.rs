//! The regional node: the process that runs in one region, takes inference requests from
//! clients (its region is their source region), routes each one inside its profile's
//! boundary, runs it on its own engines or forwards it to a peer, and streams the answer
//! back.
//!
//! The request's journey is the module tree: [`api`] (wire formats in, errors out) →
//! [`pipeline`] (resolve, route, fail over) → the local engine or [`backbone`] (forward to
//! a peer). [`fleet`] holds the load view the router reads. Decisions themselves live in
//! `crisp-routing` and `crisp-catalog`; this crate only does I/O around them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crisp_catalog::profiles::{Lock, Profiles};
use crisp_catalog::{BackendSpec, Catalog, RegionIx};
use crisp_engine::Backend;
use crisp_engine::openai::{OpenAiBackend, OpenAiConfig};
use crisp_engine::pool::Pool;
use crisp_engine::sim::{SimConfig, SimEngine};
use crisp_routing::{RouterConfig, Topology};
use crisp_transport::{Receipt, RegionIdentity, SignedReceipt, TlsStore};
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub mod access;
pub mod admin;
pub mod api;
pub mod app_profiles;
pub mod audit;
pub mod backbone;
mod drain;
pub mod error;
pub mod fleet;
pub mod invocations;
pub mod observe;
pub mod pipeline;
pub mod serve;
pub mod trace;

use backbone::client::PeerClient;
use backbone::wire::{LoadReport, ModelLoad};
use fleet::FleetView;

/// Everything a node knows and shares between requests.
pub struct Node {
    pub catalog: Catalog,
    pub profiles: Profiles,
    pub topology: Topology,
    pub router: RouterConfig,
    /// This node's region.
    pub region: RegionIx,
    /// Indexed by the catalog's model index; `None` where this region does not serve it.
    backends: Vec<Option<Arc<dyn Backend>>>,
    pub fleet: FleetView,
    pub peers: PeerClient,
    /// This node's certificates: its identity on the backbone and its receipt key.
    pub tls: Arc<TlsStore>,
    /// Generations admitted by this region's engines, per model index.
    admitted: Vec<AtomicU64>,
    /// This region's audit trail; `None` keeps none.
    pub audit: Option<Arc<audit::Audit>>,
    /// Payload logging of this source region, when configured.
    pub invocation_log: Option<Arc<invocations::InvocationLog>>,
    /// Where sealed audit files are shipped; `None` keeps them only locally.
    pub audit_shipper: Option<Arc<audit::Shipper>>,
    /// Principals, keys and policies; `None` runs without authentication.
    pub access: Option<Arc<access::Access>>,
    /// Application inference profiles of the deployment, when a store is configured.
    pub app_profiles: Option<Arc<app_profiles::AppProfiles>>,
    /// SigV4 credentials for the Bedrock API; `None` runs it without authentication.
    sigv4: Option<api::bedrock::sigv4::SigV4Keys>,
    /// Turns true when the node begins to shut down; endless streams end on it.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Turns true when the drain grace period is over: answers still streaming end with
    /// an error instead of a cut connection.
    cut: tokio::sync::watch::Sender<bool>,
    /// This region's code, for messages that outlive a borrow of the node.
    code: Arc<str>,
    /// Why files re-read in place were last refused, so each refusal is logged once.
    refused: Refusals,
    /// Metric handles of admitted requests.
    served: observe::ServedCache,
}

/// Why a node cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("region {0:?} is not defined in the configuration")]
    UnknownRegion(String),
    #[error(
        "the certificates are for {have}, but this node is {want}; issue them with `crisp certs issue --region <code>`"
    )]
    Identity { have: String, want: String },
    #[error("{0}")]
    Backend(String),
    #[error("{0}")]
    Address(String),
    #[error(
        "cannot listen on {addr} ({what}): {source}; is another process using it (a node of another region configured on the same socket, e.g. localhost:P and 127.0.0.1:P)? `crisp check` compares the configuration's addresses"
    )]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

impl Node {
    /// Builds the node of `region` and its engines. `tls` must name this region of this
    /// deployment.
    pub fn new(
        catalog: Catalog,
        lock: &Lock,
        region: &str,
        tls: Arc<TlsStore>,
    ) -> Result<Node, StartError> {
        let ix = catalog
            .region_ix(region)
            .ok_or_else(|| StartError::UnknownRegion(region.to_owned()))?;
        let expected = RegionIdentity::new(&catalog.deployment.name, region);
        if *tls.identity() != expected {
            return Err(StartError::Identity {
                have: tls.identity().to_string(),
                want: expected.to_string(),
            });
        }
        let peers = PeerClient::new(
            tls.clone(),
            catalog
                .regions
                .iter()
                .filter(|r| r.code != region)
                .map(|r| (r.peer_addr.clone(), r.code.clone())),
        );
        let profiles = Profiles::build(&catalog, lock);
        let topology = catalog.topology();
        let router = RouterConfig {
            stale_after_ms: catalog.routing.stale_after_ms,
            ..RouterConfig::default()
        };
        let mut backends = Vec::with_capacity(catalog.models.len());
        for m in &catalog.models {
            backends.push(match m.backend(ix) {
                None => None,
                Some(spec) => Some(build_backend(&m.id, region, spec)?),
            });
        }
        let fleet = FleetView::new(catalog.regions.len(), catalog.models.len());
        let admitted = catalog.models.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Node {
            catalog,
            profiles,
            topology,
            router,
            region: ix,
            backends,
            fleet,
            peers,
            tls,
            admitted,
            sigv4: None,
            app_profiles: None,
            access: None,
            audit: None,
            audit_shipper: None,
            invocation_log: None,
            stopping: tokio::sync::watch::Sender::new(false),
            cut: tokio::sync::watch::Sender::new(false),
            code: region.into(),
            refused: Refusals::default(),
            served: observe::ServedCache::default(),
        })
    }

    pub fn region_code(&self) -> &str {
        self.catalog.region_code(self.region)
    }

    /// Whether `principal` may do `action` on the profile (or model) `id`: always when the
    /// node runs without access control, never for a caller nobody authenticated.
    pub fn permits(&self, principal: Option<&str>, action: crisp_policy::Action, id: &str) -> bool {
        self.verdict(principal, action, id, None).is_allowed()
    }

    /// The policies' decision on `principal` doing `action` on `id` (by way of an
    /// application inference profile, when given), with the reason of a denial.
    pub fn verdict(
        &self,
        principal: Option<&str>,
        action: crisp_policy::Action,
        id: &str,
        application: Option<&crisp_policy::Application>,
    ) -> crisp_policy::Verdict {
        let Some(access) = &self.access else {
            return crisp_policy::Verdict::Allow {
                policies: Vec::new(),
            };
        };
        let Some(principal) = principal else {
            return crisp_policy::Verdict::Deny(crisp_policy::DenyReason::UnknownPrincipal);
        };
        access
            .snapshot()
            .authorize_through(principal, action, id, self.region_code(), application)
    }

    /// Records every call in this audit log before completing it.
    pub fn with_audit(mut self, audit: Arc<audit::Audit>) -> Node {
        self.audit = Some(audit);
        self
    }

    /// Logs full request and response bodies of calls arriving here.
    pub fn with_invocation_log(mut self, log: Arc<invocations::InvocationLog>) -> Node {
        self.invocation_log = Some(log);
        self
    }

    /// Ships sealed audit files to the region's object store.
    pub fn with_audit_shipper(mut self, shipper: Arc<audit::Shipper>) -> Node {
        self.audit_shipper = Some(shipper);
        self
    }

    /// Requires authentication and authorization with this access control.
    pub fn with_access(mut self, access: Arc<access::Access>) -> Node {
        self.access = Some(access);
        self
    }

    /// Serves application inference profiles from this store.
    pub fn with_app_profiles(mut self, store: Arc<app_profiles::AppProfiles>) -> Node {
        self.app_profiles = Some(store);
        self
    }

    /// Requires SigV4 signatures from these credentials on the Bedrock API.
    pub fn with_sigv4(mut self, keys: api::bedrock::sigv4::SigV4Keys) -> Node {
        self.sigv4 = Some(keys);
        self
    }

    pub fn sigv4_keys(&self) -> Option<&api::bedrock::sigv4::SigV4Keys> {
        self.sigv4.as_ref()
    }

    pub fn deployment(&self) -> &str {
        &self.catalog.deployment.name
    }

    /// Signs the receipt of a generation this region's engine completed.
    pub fn sign_receipt(&self, facts: &ReceiptFacts, usage: crisp_engine::Usage) -> SignedReceipt {
        let receipt = Receipt {
            request_id: facts.request_id.clone(),
            profile: facts.profile.clone(),
            model: facts.model.clone(),
            source_region: facts.source_region.clone(),
            inference_region: self.region_code().to_owned(),
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            issued_at_ms: unix_ms(),
        };
        SignedReceipt::sign(&self.tls.current(), &receipt)
    }

    /// This region's engine for a model.
    pub fn backend(&self, model: &str) -> Option<&Arc<dyn Backend>> {
        let ix = self.catalog.model_ix(model)?;
        self.backends.get(ix)?.as_ref()
    }

    pub(crate) fn backend_at(&self, model_ix: usize) -> Option<&Arc<dyn Backend>> {
        self.backends.get(model_ix)?.as_ref()
    }

    /// Whether the node has begun to shut down.
    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Re-reads what can change without a restart (today: certificates), validating
    /// before swapping; on error the current set stays.
    pub fn reload(&self) -> ReloadReport {
        let certificates = match self.tls.reload(unix_ms() / 1000) {
            Ok(true) => {
                self.refused.accepted("certificates");
                tracing::info!("certificates reloaded");
                Ok("reloaded")
            }
            Ok(false) => {
                self.refused.accepted("certificates");
                Ok("unchanged")
            }
            Err(e) => {
                let e = e.to_string();
                metrics::counter!("crisp_reload_failures_total", "what" => "certificates")
                    .increment(1);
                self.refused.refused("certificates", &e);
                Err(e)
            }
        };
        let access = match &self.access {
            None => Ok("not configured"),
            Some(a) => match a.reload(&self.catalog, &self.profiles, self.region) {
                Ok(true) => {
                    self.refused.accepted("access");
                    tracing::info!("principals, keys and policies reloaded");
                    Ok("reloaded")
                }
                Ok(false) => {
                    self.refused.accepted("access");
                    Ok("unchanged")
                }
                Err(e) => {
                    metrics::counter!("crisp_reload_failures_total", "what" => "access")
                        .increment(1);
                    self.refused.refused("access", &e);
                    Err(e)
                }
            },
        };
        ReloadReport {
            certificates,
            access,
            configuration: None,
        }
    }

    /// Ends the answers still streaming, each with an error that says the node stopped;
    /// what a drain does when its grace period is over.
    pub fn cut_streams(&self) {
        let _ = self.cut.send(true);
    }

    /// An admitted answer that [`Node::cut_streams`] can end.
    pub(crate) fn until_cut(&self, stream: crisp_engine::ChunkStream) -> crisp_engine::ChunkStream {
        drain::until_cut(stream, self.cut.subscribe(), self.code.clone())
    }

    /// Resolves when the node begins to shut down.
    pub async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub(crate) fn count_admission(&self, model: &str) {
        if let Some(c) = self
            .catalog
            .model_ix(model)
            .and_then(|i| self.admitted.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Generations this region's engines admitted for a model (local and forwarded).
    pub fn admitted(&self, model: &str) -> u64 {
        self.catalog
            .model_ix(model)
            .and_then(|i| self.admitted.get(i))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// This region's load, as pushed to peers.
    pub fn load_report(&self) -> LoadReport {
        LoadReport {
            region: self.region_code().to_owned(),
            models: self
                .catalog
                .models
                .iter()
                .zip(&self.backends)
                .filter_map(|(m, b)| {
                    let l = b.as_ref()?.load();
                    Some(ModelLoad {
                        model: m.id.clone(),
                        slots: l.slots,
                        running: l.running,
                        queue_limit: l.queue_limit,
                        waiting: l.waiting,
                    })
                })
                .collect(),
        }
    }
}

/// The result of a reload, per kind of material.
#[derive(Clone, Debug)]
pub struct ReloadReport {
    pub certificates: Result<&'static str, String>,
    pub access: Result<&'static str, String>,
    /// The configuration and lock file, which the process reloads (not the node).
    pub configuration: Option<Result<&'static str, String>>,
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        self.certificates.is_ok()
            && self.access.is_ok()
            && self.configuration.as_ref().is_none_or(Result::is_ok)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let one = |r: &Result<&'static str, String>| match r {
            Ok(s) => serde_json::json!({"status": s}),
            Err(e) => serde_json::json!({"status": "refused", "error": e}),
        };
        let mut json = serde_json::json!({"certificates": one(&self.certificates), "access": one(&self.access)});
        if let Some(c) = &self.configuration {
            json["configuration"] = one(c);
        }
        json
    }
}

/// The last refusal of each kind of file re-read in place (certificates every 10 s,
/// access files every 2 s): logged when it first happens or changes, and its end too,
/// instead of at every look.
#[derive(Default)]
struct Refusals(std::sync::Mutex<Vec<(&'static str, String)>>);

impl Refusals {
    fn refused(&self, what: &'static str, why: &str) {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.iter().any(|(w, before)| *w == what && before == why) {
            return;
        }
        last.retain(|(w, _)| *w != what);
        last.push((what, why.to_owned()));
        tracing::warn!(what, error = %why, "new files refused; keeping the current ones");
    }

    fn accepted(&self, what: &'static str) {
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = last.iter().position(|(w, _)| *w == what) {
            last.swap_remove(i);
            tracing::info!(what, "the files are accepted again");
        }
    }
}

/// What a receipt states besides the region and the tokens.
#[derive(Clone, Debug)]
pub struct ReceiptFacts {
    pub request_id: String,
    pub profile: String,
    pub model: String,
    pub source_region: String,
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How a node serves, beyond its catalog.
#[derive(Clone)]
pub struct ServeOptions {
    /// How long open requests may run on at shutdown.
    pub grace: Duration,
    /// TLS for the client API; `None` serves it in the clear.
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// How often certificate files are checked for rotation.
    pub reload_interval: Duration,
    /// Renders `/metrics` on the admin listener.
    pub metrics: Option<admin::MetricsRender>,
    /// Called by `POST /admin/reload` after the node's own reload, so the process can
    /// reload its configuration too; what it answers is part of the reply.
    pub on_reload: Option<admin::ConfigReload>,
    /// Threads serving client connections, each with a single-threaded runtime of its
    /// own; 0 (the default) serves them on the runtime that starts the node, which
    /// answered a lone request faster where it was measured (docs/performance.md).
    pub client_threads: usize,
    /// With client threads: how long each keeps polling its sockets after its
    /// connections last read or wrote, instead of sleeping. Shortens a lone request by
    /// the time a thread takes to wake, for a core kept busy while traffic flows.
    pub busy_poll: Option<Duration>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            grace: Duration::from_secs(10),
            client_tls: None,
            reload_interval: Duration::from_secs(10),
            metrics: None,
            on_reload: None,
            client_threads: 0,
            busy_poll: None,
        }
    }
}

/// The engine(s) of one model in this region.
fn build_backend(
    model: &str,
    region: &str,
    spec: &BackendSpec,
) -> Result<Arc<dyn Backend>, StartError> {
    Ok(match spec {
        BackendSpec::Simulated(s) => Arc::new(SimEngine::new(
            model,
            region,
            SimConfig {
                slots: s.slots,
                queue_limit: s.queue_limit,
                prefill_tokens_per_s: s.prefill_tokens_per_s,
                decode_tokens_per_s: s.decode_tokens_per_s,
                base_ttft_ms: s.ttft_ms,
                default_max_tokens: s.max_tokens,
                retry_after: Duration::from_millis(s.retry_after_ms),
                time_scale: s.time_scale,
                context_tokens: s.context_tokens,
            },
        )),
        BackendSpec::OpenAi(replicas) => {
            let mut built: Vec<Box<dyn Backend>> = Vec::with_capacity(replicas.len());
            for r in replicas {
                let api_key = match &r.api_key_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        StartError::Backend(format!(
                            "model {model}: the API key variable {var} for {} is not set",
                            r.base_url
                        ))
                    })?),
                    None => None,
                };
                let ca_pem = match &r.ca_file {
                    Some(path) => Some(std::fs::read(path).map_err(|e| {
                        StartError::Backend(format!(
                            "model {model}: cannot read the CA file {path} for {}: {e}",
                            r.base_url
                        ))
                    })?),
                    None => None,
                };
                let backend = OpenAiBackend::new(OpenAiConfig {
                    base_url: r.base_url.clone(),
                    api_key,
                    upstream_model: r.upstream_model.clone(),
                    connect_timeout: Duration::from_millis(r.connect_timeout_ms),
                    first_token_timeout: Duration::from_millis(r.first_token_timeout_ms),
                    total_timeout: Duration::from_millis(r.timeout_ms),
                    max_concurrency: r.max_concurrency,
                    queue_limit: r.queue_limit,
                    metrics_url: r.metrics_url.clone(),
                    default_retry_after: Duration::from_secs(1),
                    ca_pem,
                })
                .map_err(|e| StartError::Backend(format!("model {model}: {e}")))?;
                // Engines' own load signals, read once a second.
                let _ = backend.spawn_scraper(Duration::from_secs(1));
                built.push(Box::new(backend));
            }
            if built.len() == 1 {
                match built.pop() {
                    Some(one) => Arc::from(one),
                    None => return Err(StartError::Backend(format!("model {model}: no replica"))),
                }
            } else {
                let pool = Arc::new(Pool::new(built));
                // Active health checks, so a dead replica leaves the region's capacity
                // even when no request has hit it.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let weak = Arc::downgrade(&pool);
                    rt.spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_secs(5));
                        loop {
                            tick.tick().await;
                            let Some(pool) = weak.upgrade() else { return };
                            pool.check_health().await;
                        }
                    });
                }
                pool
            }
        }
    })
}

/// Listeners for a node; bind them first to learn ephemeral ports.
pub struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
    /// Metrics, health and reload; optional.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the catalog gives the region; with `listen`, that host with
    /// the configured ports instead (see [`listen_addr`]).
    pub async fn bind_catalog(
        catalog: &Catalog,
        region: &str,
        listen: Option<&str>,
    ) -> Result<Listeners, StartError> {
        Self::bind_replacing(catalog, region, listen, None).await
    }

    /// Like [`Listeners::bind_catalog`], for a node that replaces `running` on a reload:
    /// where the region's address is unchanged it listens on the running node's own
    /// socket rather than a new one beside it. Connections the kernel queues while the
    /// old node stops accepting then wait for the new one instead of being reset when the
    /// old socket closes.
    pub async fn bind_replacing(
        catalog: &Catalog,
        region: &str,
        listen: Option<&str>,
        running: Option<&RunningNode>,
    ) -> Result<Listeners, StartError> {
        let r = catalog
            .region_ix(region)
            .and_then(|ix| catalog.region(ix))
            .ok_or_else(|| StartError::UnknownRegion(region.to_owned()))?;
        let one = |what: &'static str, configured: &str| {
            let addr = match listen {
                Some(host) => listen_addr(what, configured, host),
                None => Ok(configured.to_owned()),
            };
            async move {
                let addr = addr?;
                let at = resolve(what, &addr).await?;
                match running.and_then(|n| n.socket(at)) {
                    Some(socket) => Ok(socket),
                    None => bind_at(what, &addr, at),
                }
            }
        };
        let admin = match &r.admin_addr {
            Some(addr) => Some(one("admin", addr).await?),
            None => None,
        };
        Ok(Listeners {
            client: one("client", &r.client_addr).await?,
            peer: one("peer", &r.peer_addr).await?,
            admin,
        })
    }
}

/// A listening socket a node serves on, kept so a node that replaces it can serve on the
/// same socket.
struct KeptSocket {
    at: SocketAddr,
    #[cfg(unix)]
    socket: std::os::fd::OwnedFd,
}

impl KeptSocket {
    fn of(listener: &TcpListener) -> Option<KeptSocket> {
        let at = listener.local_addr().ok()?;
        #[cfg(unix)]
        {
            use std::os::fd::AsFd;
            let socket = listener.as_fd().try_clone_to_owned().ok()?;
            Some(KeptSocket { at, socket })
        }
        #[cfg(not(unix))]
        {
            let _ = at;
            None
        }
    }

    /// Another handle on the same listening socket.
    fn listener(&self) -> Option<TcpListener> {
        #[cfg(unix)]
        {
            let std = std::net::TcpListener::from(self.socket.try_clone().ok()?);
            std.set_nonblocking(true).ok()?;
            TcpListener::from_std(std).ok()
        }
        #[cfg(not(unix))]
        None
    }
}

/// The address to bind for a configured address when the node listens on `host`: the
/// configured port on `host`. The configured address stays what clients and other
/// regions connect to (a load balancer's or a NAT's name), `host` is where this machine
/// accepts them (`0.0.0.0`, `::`, one interface's address).
fn listen_addr(what: &'static str, configured: &str, host: &str) -> Result<String, StartError> {
    let port = configured
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| {
            StartError::Address(format!(
                "the {what} address {configured:?} has no port; write it as host:port"
            ))
        })?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ipv6 = host.parse::<std::net::Ipv6Addr>().is_ok();
    if host.is_empty() || (host.contains(':') && !ipv6) {
        return Err(StartError::Address(format!(
            "--listen {host:?} is not a host: give one without a port (e.g. 0.0.0.0 or ::); \
             the ports come from the configuration"
        )));
    }
    Ok(if ipv6 {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// Binds a listener. Without `SO_REUSEPORT`: a socket another process (another region's
/// node, or a second node of this one) listens on is refused rather than shared, which
/// would split its clients between them. A reload hands its own sockets over instead
/// ([`Listeners::bind_replacing`]).
pub async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, StartError> {
    let resolved = resolve(what, addr).await?;
    bind_at(what, addr, resolved)
}

async fn resolve(what: &'static str, addr: &str) -> Result<SocketAddr, StartError> {
    let err = |source| StartError::Bind {
        what,
        addr: addr.to_owned(),
        source,
    };
    tokio::net::lookup_host(addr)
        .await
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("the address resolves to nothing")))
}

fn bind_at(what: &'static str, addr: &str, at: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind {
        what,
        addr: addr.to_owned(),
        source,
    };
    let socket = if at.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    // Only for connections of a previous process still in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(at).map_err(err)?;
    socket.listen(1024).map_err(err)
}

/// A node that is serving.
pub struct RunningNode {
    pub node: Arc<Node>,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The admin listener, which outlives the others on a shutdown (its `/readyz` says
    /// 503 while they drain); closed by `admin_stop`.
    admin: Option<tokio::task::JoinHandle<()>>,
    admin_stop: tokio::sync::watch::Sender<bool>,
    grace: Duration,
    /// Its listening sockets, for a node that replaces it; let go when it stops.
    kept: Vec<KeptSocket>,
}

impl RunningNode {
    /// Starts serving clients and peers (mutual TLS), subscribes to every peer's telemetry
    /// and watches the certificate files for rotation.
    pub fn start(
        node: Node,
        listeners: Listeners,
        options: ServeOptions,
    ) -> std::io::Result<RunningNode> {
        let grace = options.grace;
        let node = Arc::new(node);
        let kept = [Some(&listeners.client), Some(&listeners.peer)]
            .into_iter()
            .chain([listeners.admin.as_ref()])
            .flatten()
            .filter_map(KeptSocket::of)
            .collect();
        let client_addr = listeners.client.local_addr()?;
        let peer_addr = listeners.peer.local_addr()?;
        let shutdown = node.stopping.clone();
        let rx = shutdown.subscribe();
        let mut tasks = JoinSet::new();

        let admin_addr = match &listeners.admin {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let admin_stop = tokio::sync::watch::Sender::new(false);
        let admin = listeners.admin.map(|admin| {
            tokio::spawn(serve::serve(
                admin,
                admin::router(
                    node.clone(),
                    options.metrics.clone(),
                    options.on_reload.clone(),
                ),
                serve::Security::Plain,
                admin_stop.subscribe(),
                grace,
                None,
                serve::ConnectionLimits::admin(),
            ))
        });
        if let Some(log) = node.invocation_log.clone() {
            let mut stop = rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        // The last flush comes once the drain is over (`stop`).
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    log.flush().await;
                }
            });
        }
        if let Some(shipper) = node.audit_shipper.clone() {
            let mut stop = rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    shipper.ship_once().await;
                }
            });
        }
        if node.access.is_some() {
            let watched = node.clone();
            let mut stop = rx.clone();
            tasks.spawn(async move {
                // Keys and policies change more often than certificates: look every 2 s.
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let _ = watched.reload();
                }
            });
        }
        if let Some(store) = node.app_profiles.clone() {
            let mut stop = rx.clone();
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    if let Err(e) = store.refresh().await {
                        tracing::warn!(error = %e, "cannot refresh application inference profiles");
                    }
                }
            });
        }
        let client_security = match options.client_tls {
            Some(config) => serve::Security::Tls(config),
            None => serve::Security::Plain,
        };
        let workers = match options.client_threads {
            0 => None,
            n => Some(Arc::new(serve::Workers::start(
                n,
                "crisp-client",
                options.busy_poll,
            )?)),
        };
        tasks.spawn(serve::serve(
            listeners.client,
            api::router(node.clone()),
            client_security,
            rx.clone(),
            grace,
            workers,
            serve::ConnectionLimits::client(&node.catalog.limits),
        ));
        tasks.spawn(serve::serve(
            listeners.peer,
            backbone::server::router(node.clone()),
            serve::Security::Mutual(node.tls.clone()),
            rx.clone(),
            grace,
            None,
            serve::ConnectionLimits::peer(),
        ));
        let watched = node.clone();
        let mut stop = rx.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(options.reload_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                watched.reload();
            }
        });

        for (i, region) in node.catalog.regions.iter().enumerate() {
            let Ok(ix) = RegionIx::try_from(i) else {
                continue;
            };
            if ix == node.region {
                continue;
            }
            let node = node.clone();
            let addr = region.peer_addr.clone();
            let mut stop = rx.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = subscribe(node, ix, addr) => {}
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
        Ok(RunningNode {
            node,
            client_addr,
            peer_addr,
            admin_addr,
            shutdown,
            tasks,
            admin,
            admin_stop,
            grace,
            kept,
        })
    }

    /// Another handle on the socket this node listens on at `at`.
    fn socket(&self, at: SocketAddr) -> Option<TcpListener> {
        self.kept
            .iter()
            .find(|k| k.at == at)
            .and_then(KeptSocket::listener)
    }

    /// Stops accepting clients and peers, lets open requests finish within the grace
    /// period given at start, ends the answers still streaming then with an error that
    /// says so, and waits for everything to end. The admin listener serves until the
    /// end, its `/readyz` answering 503, so a load balancer sees the node leave.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.drain(true).await;
    }

    /// Like [`RunningNode::shutdown`], for a node replaced by a reload: it stops
    /// accepting now, before the returned future runs, and its admin listener closes at
    /// once, since the new node answers on the same port.
    pub fn retire(self) -> impl std::future::Future<Output = ()> + Send {
        let _ = self.shutdown.send(true);
        let _ = self.admin_stop.send(true);
        // Its audit trail goes on with the node that replaces it.
        self.drain(false)
    }

    async fn drain(mut self, last: bool) {
        // A node that stops for good must not keep its sockets open: clients would queue
        // on them unanswered instead of being refused.
        self.kept.clear();
        let node = self.node.clone();
        let grace = self.grace;
        let cut = tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            node.cut_streams();
        });
        while self.tasks.join_next().await.is_some() {}
        cut.abort();
        // A last attempt once every answer has ended, so a clean stop leaves nothing of
        // the drained requests behind.
        if let Some(log) = &self.node.invocation_log {
            log.flush().await;
        }
        if last
            && let Some(audit) = &self.node.audit
            && let Err(e) = audit.log.seal_now()
        {
            tracing::error!(error = %e, "cannot seal the audit file at stop; it is sealed at the next start");
        }
        if let Some(shipper) = &self.node.audit_shipper {
            shipper.ship_once().await;
        }
        let _ = self.admin_stop.send(true);
        if let Some(admin) = self.admin.take() {
            let _ = admin.await;
        }
    }
}

/// Follows one peer's telemetry for as long as the node runs. A broken or silent stream
/// makes the peer unreachable until it speaks again. Each change is logged once: a peer
/// lost at warn, a peer back (or first reached) at info, and a peer not reached since the
/// node started at warn after [`PEER_PATIENCE`] (peers of a fleet start together).
async fn subscribe(node: Arc<Node>, region: RegionIx, addr: String) {
    let silence = Duration::from_millis(
        node.catalog
            .routing
            .stale_after_ms
            .max(node.catalog.routing.telemetry_interval_ms * 3),
    );
    let code = node.catalog.region_code(region).to_owned();
    let mut health = PeerHealth::new(tokio::time::Instant::now());
    let mut backoff = Duration::from_millis(50);
    loop {
        let why = match node.peers.telemetry(&addr).await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    match tokio::time::timeout(silence, stream.next()).await {
                        Ok(Some(Ok(report))) => {
                            backoff = Duration::from_millis(50);
                            node.fleet.apply_report(&node.catalog, region, &report);
                            if health.reached() {
                                tracing::info!(peer = %code, addr = %addr, "peer reachable");
                            }
                        }
                        Ok(Some(Err(e))) => break format!("its telemetry stream broke: {e}"),
                        Ok(None) => break "it closed its telemetry stream".to_owned(),
                        Err(_) => {
                            break format!(
                                "its telemetry stream was silent for {} ms",
                                silence.as_millis()
                            );
                        }
                    }
                }
            }
            Err(e) => format!("no telemetry: {e}"),
        };
        node.fleet.set_reachable(region, false);
        match health.lost(tokio::time::Instant::now()) {
            Some(Lost::Now) => {
                tracing::warn!(peer = %code, addr = %addr, why = %why, "peer unreachable; requests go to other regions of their profiles until it is back");
            }
            Some(Lost::SinceStart) => {
                tracing::warn!(peer = %code, addr = %addr, why = %why, "peer not reached since this node started; check that it runs and that its peer address and certificates are right");
            }
            None => tracing::debug!(peer = %code, why = %why, "peer still unreachable"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// How long a peer may stay unreached after start before it is worth a warning.
const PEER_PATIENCE: Duration = Duration::from_secs(10);

/// What has been said about one peer, so each change is logged once.
struct PeerHealth {
    started: tokio::time::Instant,
    /// `None` until first reached.
    up: Option<bool>,
    warned_at_start: bool,
}

enum Lost {
    /// It was reachable and is not any more.
    Now,
    /// It has not been reached since the node started, for [`PEER_PATIENCE`].
    SinceStart,
}

impl PeerHealth {
    fn new(started: tokio::time::Instant) -> PeerHealth {
        PeerHealth {
            started,
            up: None,
            warned_at_start: false,
        }
    }

    /// It spoke; true when that is news.
    fn reached(&mut self) -> bool {
        self.up.replace(true) != Some(true)
    }

    /// It is unreachable; what to say about it, if anything.
    fn lost(&mut self, now: tokio::time::Instant) -> Option<Lost> {
        match self.up {
            Some(true) => {
                self.up = Some(false);
                Some(Lost::Now)
            }
            None if !self.warned_at_start && now - self.started >= PEER_PATIENCE => {
                self.warned_at_start = true;
                Some(Lost::SinceStart)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_change_of_a_peers_health_is_said_once() {
        let t0 = tokio::time::Instant::now();
        let mut h = PeerHealth::new(t0);
        // Peers start together: early misses are not news...
        assert!(h.lost(t0 + Duration::from_secs(1)).is_none());
        // ...a peer that never came is, once.
        assert!(matches!(h.lost(t0 + PEER_PATIENCE), Some(Lost::SinceStart)));
        assert!(h.lost(t0 + PEER_PATIENCE * 2).is_none());
        assert!(h.reached());
        assert!(!h.reached());
        assert!(matches!(h.lost(t0 + PEER_PATIENCE * 3), Some(Lost::Now)));
        assert!(h.lost(t0 + PEER_PATIENCE * 3).is_none());
        assert!(h.reached());
    }

    #[test]
    fn listening_on_a_host_keeps_the_configured_port() {
        let at = |configured, host| listen_addr("peer", configured, host).unwrap();
        assert_eq!(
            at("peer.eu-west-1.example.net:9080", "0.0.0.0"),
            "0.0.0.0:9080"
        );
        assert_eq!(at("10.0.0.7:8080", "::"), "[::]:8080");
        assert_eq!(at("[2001:db8::1]:8443", "[::1]"), "[::1]:8443");
        let e = listen_addr("client", "api.example.net", "0.0.0.0").unwrap_err();
        assert!(e.to_string().contains("has no port"), "{e}");
        let e = listen_addr("client", "api.example.net:8080", "0.0.0.0:8080").unwrap_err();
        assert!(e.to_string().contains("without a port"), "{e}");
    }

    #[tokio::test]
    async fn a_node_listening_on_a_host_never_resolves_its_advertised_names() {
        // Free ports, released again for the node to bind.
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (a, b) = (free(), free());
        let (client, peer) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        drop((a, b));
        let catalog = crisp_catalog::parse_config(&format!(
            r#"
version = 1
[deployment]
name = "test"
[[region]]
code = "eu-west-1"
city = "Dublin"
country = "IE"
lat = 53.3
lon = -6.3
client = "api.eu-west-1.crisp.invalid:{client}"
peer = "peer.eu-west-1.crisp.invalid:{peer}"
"#
        ))
        .unwrap();
        // The configured names (`.invalid` never resolves) are only advertised.
        let l = Listeners::bind_catalog(&catalog, "eu-west-1", Some("127.0.0.1"))
            .await
            .unwrap();
        assert_eq!(
            l.client.local_addr().unwrap().to_string(),
            format!("127.0.0.1:{client}")
        );
        assert_eq!(
            l.peer.local_addr().unwrap().to_string(),
            format!("127.0.0.1:{peer}")
        );
    }
}
