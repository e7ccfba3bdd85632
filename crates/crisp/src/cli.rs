//! Command-line interface.

use std::path::{Path, PathBuf};

use crate::observe::{LogFormat, install_metrics};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use crisp_catalog::profiles::{Lock, Plan, Profiles};
use crisp_catalog::{Catalog, parse_config};
use crisp_node::app_profiles::AppProfiles;
use crisp_node::{Listeners, Node, RunningNode, ServeOptions, unix_ms};
use crisp_transport::{RegionIdentity, TlsFiles, TlsStore};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "crisp",
    version,
    about = "Self-hosted cross-region inference: route each request to a region with headroom, inside its profile's boundary"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t,
        env = "CRISP_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP to this collector endpoint (off when unset), e.g.
    /// http://127.0.0.1:4318/v1/traces.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

impl Cli {
    /// The default log level: quiet for the demo's table, informative for a node.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Serve { .. } => "info",
            _ => "warn",
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Start a whole demo federation on loopback: 11 regions, each a real node.
    Up(crate::up::UpArgs),
    /// Run the node of one region of a real deployment.
    Serve {
        /// The deployment's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The region this node runs in (its code in the configuration).
        #[arg(long, short)]
        region: String,
        /// The profile lock file [default: crisp.lock next to the configuration].
        #[arg(long)]
        lock: Option<PathBuf>,
        /// Directory with ca.pem, <region>.pem and <region>.key (`crisp certs`)
        /// [default: certs/ next to the configuration].
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Serve the client API over HTTPS with this certificate (PEM)...
        #[arg(long, requires = "client_key")]
        client_cert: Option<PathBuf>,
        /// ...and this key (PEM).
        #[arg(long, requires = "client_cert")]
        client_key: Option<PathBuf>,
        /// Serve client connections on this many threads, each with an event loop of its
        /// own that a connection stays on, instead of on the shared work-stealing runtime
        /// (0, the default).
        #[arg(long, env = "CRISP_CLIENT_THREADS", default_value_t = 0)]
        client_threads: usize,
        /// With --client-threads: keep each client thread polling its sockets for this
        /// many microseconds after its connections last read or wrote, instead of
        /// sleeping. A lone request no longer waits for threads to wake; a core stays
        /// busy while traffic flows (0, the default, sleeps at once).
        #[arg(
            long,
            env = "CRISP_BUSY_POLL_US",
            default_value_t = 0,
            value_name = "MICROSECONDS"
        )]
        busy_poll: u64,
        /// Listen on this host (e.g. 0.0.0.0) with the ports the configuration gives the
        /// region, instead of on the configured addresses, which stay what clients and
        /// other regions connect to (a load balancer's or NAT's name).
        #[arg(long, env = "CRISP_LISTEN", value_name = "HOST")]
        listen: Option<String>,
        /// Where the node keeps what it writes: the audit log (a relative `[audit] dir` is
        /// under it), the invocation log spool and local application profiles. The
        /// configuration's directory may then be read-only [default: the configuration's
        /// directory].
        #[arg(long, env = "CRISP_DATA_DIR", value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// On SIGTERM, Ctrl-C or a reload that replaces the node: how long open requests
        /// and streams may run on after the node stops accepting. Answers still streaming
        /// then end with an error telling the client to send the request again.
        #[arg(
            long,
            env = "CRISP_DRAIN_GRACE_S",
            default_value_t = 10,
            value_name = "SECONDS"
        )]
        drain_grace: u64,
    },
    /// Create the deployment CA and issue region certificates for the backbone.
    Certs {
        #[command(subcommand)]
        command: crate::certs::CertsCommand,
    },
    /// Verify a region's audit trail, or look events up in it.
    Audit {
        #[command(subcommand)]
        command: crate::audit::AuditCommand,
    },
    /// Tokens and cost per principal, application profile, tag, profile or inference
    /// region, from audit trails.
    Usage {
        /// Audit directories (one per region whose usage counts).
        #[arg(long = "dir", required = true)]
        dirs: Vec<PathBuf>,
        /// What to group the totals by.
        #[arg(long, value_enum, default_value = "principal")]
        by: crate::audit::GroupBy,
        /// Events at or after this time (RFC 3339, e.g. 2026-11-28T10:00:00Z).
        #[arg(long, value_parser = crate::audit::parse_time)]
        since: Option<time::OffsetDateTime>,
        /// Events at or before this time (RFC 3339).
        #[arg(long, value_parser = crate::audit::parse_time)]
        until: Option<time::OffsetDateTime>,
        /// One JSON object per group instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create, list and revoke API keys and SigV4 credentials of principals.
    Keys {
        #[command(subcommand)]
        command: crate::access::KeysCommand,
    },
    /// Explain an authorization decision: which policies decided it and why.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Inspect and update inference profiles and the lock file that freezes them.
    Profiles {
        #[command(subcommand)]
        command: ProfilesCommand,
    },
    /// Simulate a whole fleet under a scenario and compare routing strategies on the same
    /// trace (deterministic; writes an HTML report with charts on request).
    Sim(crate::sim::SimArgs),
    /// Replay a scenario against running nodes (e.g. those of `crisp up`) and print the
    /// measured figures next to the simulated ones.
    Bench(crate::sim::BenchArgs),
    /// Check what `crisp serve` would read, before a node starts: the configuration
    /// (every problem at once), the lock file, the access files, the certificates and the
    /// addresses.
    Check {
        /// The deployment's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The profile lock file [default: crisp.lock next to the configuration].
        #[arg(long)]
        lock: Option<PathBuf>,
        /// The certificates directory [default: certs/ next to the configuration].
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Check this region's certificates (repeatable) [default: every region whose
        /// certificate is in the directory].
        #[arg(long, short)]
        region: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Would PRINCIPAL be allowed ACTION through PROFILE from SOURCE?
    Check {
        /// The deployment's configuration file (its [access] section names the policies).
        #[arg(long, short)]
        config: PathBuf,
        /// The principal asking (an entry of the principals file).
        #[arg(long)]
        principal: String,
        /// InvokeModel, InvokeModelWithResponseStream, GetInferenceProfile, ...
        #[arg(long, default_value = "InvokeModel")]
        action: String,
        /// The profile or model ID called.
        #[arg(long)]
        profile: String,
        /// The region the request arrives in [default: the first region].
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(Subcommand)]
enum ProfilesCommand {
    /// Show what the lock file would gain: new profiles and new versions.
    Plan {
        /// The deployment's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The profile lock file [default: crisp.lock next to the configuration].
        #[arg(long)]
        lock: Option<PathBuf>,
    },
    /// Write the lock file with the planned changes (old IDs keep their sets).
    Lock {
        /// The deployment's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The profile lock file [default: crisp.lock next to the configuration].
        #[arg(long)]
        lock: Option<PathBuf>,
    },
    /// List the profiles a client can call, with their destination regions.
    List {
        /// The deployment's configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The profile lock file [default: crisp.lock next to the configuration].
        #[arg(long)]
        lock: Option<PathBuf>,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => crate::up::run(args).await,
        Command::Serve {
            config,
            region,
            lock,
            certs,
            client_cert,
            client_key,
            client_threads,
            busy_poll,
            listen,
            data_dir,
            drain_grace,
        } => {
            let client_tls = match (client_cert, client_key) {
                (Some(c), Some(k)) => Some((c, k)),
                _ => None,
            };
            let threads = ClientThreads::new(client_threads, busy_poll)?;
            let args = ServeArgs {
                lock,
                certs,
                client_tls,
                threads,
                listen,
                data_dir,
                grace: std::time::Duration::from_secs(drain_grace),
            };
            serve(&config, &region, args).await
        }
        Command::Certs { command } => crate::certs::run(command),
        Command::Keys { command } => crate::access::run_keys(command),
        Command::Audit { command } => crate::audit::run(command).await,
        Command::Usage {
            dirs,
            by,
            since,
            until,
            json,
        } => crate::audit::usage(&dirs, by, since, until, json),
        Command::Policy {
            command:
                PolicyCommand::Check {
                    config,
                    principal,
                    action,
                    profile,
                    source,
                },
        } => {
            if crate::access::check(&config, &principal, &action, &profile, source.as_deref())? {
                Ok(())
            } else {
                std::process::exit(2)
            }
        }
        Command::Check {
            config,
            lock,
            certs,
            region,
        } => {
            crate::check::run(crate::check::CheckArgs {
                config,
                lock,
                certs,
                regions: region,
            })
            .await
        }
        Command::Profiles { command } => profiles(command),
        Command::Sim(args) => crate::sim::sim(args),
        Command::Bench(args) => crate::sim::bench(args).await,
    }
}

pub fn load_config(path: &Path) -> anyhow::Result<Catalog> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration {}", path.display()))?;
    let mut catalog =
        parse_config(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if let Some(dir) = path.parent() {
        catalog.resolve_files(dir);
    }
    Ok(catalog)
}

pub fn lock_path(config: &Path, lock: Option<PathBuf>) -> PathBuf {
    lock.unwrap_or_else(|| config.with_file_name("crisp.lock"))
}

pub fn read_lock(path: &Path) -> anyhow::Result<Option<Lock>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Lock::parse(&text)
            .map(Some)
            .with_context(|| format!("in {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes the lock whole or not at all. The temporary file is this process's own: nodes
/// started together from one directory may each write the first lock, and all write the
/// same one (it follows from the same configuration).
fn write_lock(path: &Path, lock: &Lock) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("lock.{}.tmp", std::process::id()));
    std::fs::write(&tmp, lock.to_toml())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print_plan(plan: &Plan) {
    for c in &plan.changes {
        println!("{c}");
    }
    for p in &plan.problems {
        println!("! {p}");
    }
}

fn profiles(command: ProfilesCommand) -> anyhow::Result<()> {
    match command {
        ProfilesCommand::Plan { config, lock } => {
            let catalog = load_config(&config)?;
            let path = lock_path(&config, lock);
            let current = read_lock(&path)?.unwrap_or_default();
            let plan = Plan::new(&catalog, &current);
            if plan.changes.is_empty() && plan.problems.is_empty() {
                println!("{} is up to date with the fleet", path.display());
            } else {
                print_plan(&plan);
                if plan.has_issues() {
                    println!(
                        "\nrun `crisp profiles lock --config {}` to issue these",
                        config.display()
                    );
                }
            }
            Ok(())
        }
        ProfilesCommand::Lock { config, lock } => {
            let catalog = load_config(&config)?;
            let path = lock_path(&config, lock);
            let existing = read_lock(&path)?;
            let first = existing.is_none();
            let current = existing.unwrap_or_default();
            let plan = Plan::new(&catalog, &current);
            print_plan(&plan);
            if !plan.problems.is_empty() {
                bail!("not writing {}: fix the problems above", path.display());
            }
            // A fleet with no geographic profile yet still gets its (empty) lock, so the
            // nodes find one and later regions are compared against it.
            if plan.has_issues() || first {
                write_lock(&path, &plan.apply(&current))?;
                println!("wrote {}", path.display());
            } else {
                println!("{} is up to date with the fleet", path.display());
            }
            Ok(())
        }
        ProfilesCommand::List { config, lock } => {
            let catalog = load_config(&config)?;
            let current = read_lock(&lock_path(&config, lock))?.unwrap_or_default();
            let profiles = Profiles::build(&catalog, &current);
            print_profiles(&catalog, &profiles);
            Ok(())
        }
    }
}

pub fn print_profiles(catalog: &Catalog, profiles: &Profiles) {
    let width = profiles.iter().map(|p| p.id.len()).max().unwrap_or(10);
    for p in profiles.iter() {
        let dests: Vec<&str> = p
            .destinations
            .iter()
            .map(|&r| catalog.region_code(r))
            .collect();
        let note = match &p.superseded_by {
            Some(newer) => format!("  (superseded by {newer})"),
            None => String::new(),
        };
        println!("{:width$}  [{}]{note}", p.id, dests.join(", "));
    }
}

/// How `crisp serve` runs client connections: on the shared runtime (`threads` 0) or on
/// dedicated event loops, which may busy-poll.
#[derive(Clone, Copy, Debug, PartialEq)]
struct ClientThreads {
    threads: usize,
    busy_poll: Option<std::time::Duration>,
}

impl ClientThreads {
    fn new(threads: usize, busy_poll_us: u64) -> anyhow::Result<ClientThreads> {
        if busy_poll_us > 0 && threads == 0 {
            anyhow::bail!(
                "--busy-poll (CRISP_BUSY_POLL_US) keeps dedicated client threads polling, and \
                 there are none: add --client-threads N (e.g. --client-threads 2), or drop \
                 --busy-poll"
            );
        }
        Ok(ClientThreads {
            threads,
            busy_poll: (busy_poll_us > 0).then(|| std::time::Duration::from_micros(busy_poll_us)),
        })
    }
}

/// Everything `crisp serve` needs that does not change on a configuration reload.
struct ServeSetup {
    config: PathBuf,
    region: String,
    lock: Option<PathBuf>,
    certs: Option<PathBuf>,
    client_tls: Option<Arc<rustls::ServerConfig>>,
    threads: ClientThreads,
    listen: Option<String>,
    /// Where the node writes its local data.
    data_dir: PathBuf,
    /// How long a stopping node drains.
    grace: std::time::Duration,
    metrics: crisp_node::admin::MetricsRender,
}

/// Reads and validates the configuration, lock file, certificates and access files and
/// builds the node from them; nothing is started, so a broken configuration changes
/// nothing.
/// Builds the node of a configuration; on a reload, `running` is the node serving now,
/// whose audit trail and invocation log the new node keeps writing (one writer per
/// directory: a second one would seal the file the first still appends to).
async fn build_node(setup: &ServeSetup, running: Option<&Node>) -> anyhow::Result<Node> {
    let config = setup.config.as_path();
    let region = setup.region.as_str();
    let catalog = load_config(config)?;
    let path = lock_path(config, setup.lock.clone());
    let found = read_lock(&path)?;
    if found.is_none() && setup.lock.is_some() {
        anyhow::bail!(
            "--lock {}: no such file; write it with `crisp profiles lock --config {} --lock {0}`, or leave --lock out to use (and on first start write) crisp.lock next to the configuration",
            path.display(),
            config.display()
        );
    }
    let lock = match found {
        Some(lock) => {
            let plan = Plan::new(&catalog, &lock);
            if plan.has_issues() {
                tracing::warn!(
                    "the fleet has changed since {} was written; new profiles are not issued until you run `crisp profiles lock`",
                    path.display()
                );
            }
            lock
        }
        None => {
            let plan = Plan::new(&catalog, &Lock::default());
            let lock = plan.apply(&Lock::default());
            write_lock(&path, &lock)?;
            tracing::info!(lock = %path.display(), profiles = lock.profiles.len(), "issued the first geographic profiles");
            lock
        }
    };
    let certs = setup
        .certs
        .clone()
        .unwrap_or_else(|| config.with_file_name("certs"));
    let identity = RegionIdentity::new(&catalog.deployment.name, region);
    let tls = TlsStore::load(TlsFiles::in_dir(&certs, region), identity, unix_ms() / 1000)
        .with_context(|| {
            format!(
                "the backbone needs this node's certificates in {0} (ca.pem, {region}.pem, {region}.key, issued for deployment {1}); issue them where the deployment CA's key is kept with `crisp certs issue --deployment {1} --region {region} --dir <that directory>` and copy ca.pem and the region's two files here (a new deployment starts with `crisp certs init`)",
                certs.display(),
                catalog.deployment.name
            )
        })?;
    let profile_url = match &catalog.deployment.profile_store {
        Some(url) => url.clone(),
        None => {
            let dir = setup.data_dir.join("application-profiles");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let dir = dir.canonicalize()?;
            tracing::warn!(
                dir = %dir.display(),
                "no [deployment] profile_store: application inference profiles are kept in a local directory and seen only by this node"
            );
            format!("file://{}", dir.display())
        }
    };
    let app_profiles = Arc::new(AppProfiles::from_url(&profile_url)?);
    if let Err(e) = app_profiles.refresh().await {
        tracing::warn!(error = %e, "cannot read application inference profiles yet; will retry");
    }
    let access_files = crate::access::files(config, &catalog)?;
    let tls = Arc::new(tls);
    let audit_dir = crate::audit::dir_for(&setup.data_dir, &catalog, region);
    let kept = running.and_then(|n| n.audit.clone().map(|a| (n, a)));
    let audit = match kept {
        Some((old, audit)) => {
            if old.catalog.audit != catalog.audit {
                tracing::warn!(
                    "the [audit] settings changed: they take effect when the node restarts (the running trail keeps its one writer)"
                );
            }
            audit
        }
        None => {
            let audit = crate::audit::open(&audit_dir, &catalog, region, tls.clone())?;
            tracing::info!(dir = %audit_dir.display(), "audit trail");
            audit
        }
    };
    if let Some(note) = crate::audit::shared_store_note(&catalog) {
        tracing::warn!("{note}");
    }
    let shipper = match (&catalog.audit.store, running) {
        (Some(_), Some(old)) if old.catalog.audit.store == catalog.audit.store => {
            old.audit_shipper.clone()
        }
        (Some(url), _) => Some(Arc::new(
            crisp_node::audit::Shipper::from_url(&audit_dir, url, region)
                .map_err(|e| anyhow::anyhow!("audit store: {e}"))?,
        )),
        (None, _) => None,
    };
    let mut node = Node::new(catalog, &lock, region, tls)?
        .with_app_profiles(app_profiles)
        .with_audit(audit);
    if let Some(s) = shipper {
        node = node.with_audit_shipper(s);
    }
    if let Some(settings) = node
        .catalog
        .invocation_logs
        .iter()
        .find(|l| l.region == region)
    {
        let log = match running.and_then(|n| n.invocation_log.clone().map(|l| (n, l))) {
            Some((old, log)) => {
                if !old.catalog.invocation_logs.contains(settings) {
                    tracing::warn!(
                        "the [[invocation_log]] settings changed: they take effect when the node restarts"
                    );
                }
                log
            }
            None => {
                let dir = setup.data_dir.join("invocations").join(region);
                let log = crisp_node::invocations::InvocationLog::new(
                    &dir,
                    &settings.store,
                    &node.catalog.deployment.account,
                    region,
                    settings.large_body_bytes,
                )
                .map_err(|e| anyhow::anyhow!("invocation log: {e}"))?;
                tracing::info!(store = %settings.store, "model invocation logging is on for this region");
                Arc::new(log)
            }
        };
        node = node.with_invocation_log(log);
    }
    match access_files {
        Some(files) => {
            let access =
                crisp_node::access::Access::load(files, &node.catalog, &node.profiles, node.region)
                    .map_err(|e| anyhow::anyhow!("access control: {e}"))?;
            node = node.with_access(Arc::new(access));
        }
        None => tracing::warn!(
            "no [access] section: every client may call every profile without a key; add one before exposing this node"
        ),
    }
    Ok(node)
}

/// What a reload asked for on the admin listener is answered with.
type ReloadReply = tokio::sync::oneshot::Sender<Result<&'static str, String>>;

fn start_node(
    setup: &ServeSetup,
    node: Node,
    listeners: Listeners,
    reload: tokio::sync::mpsc::Sender<ReloadReply>,
) -> anyhow::Result<RunningNode> {
    let running = RunningNode::start(
        node,
        listeners,
        ServeOptions {
            client_tls: setup.client_tls.clone(),
            metrics: Some(setup.metrics.clone()),
            on_reload: Some(Arc::new(move || {
                let reload = reload.clone();
                Box::pin(async move {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    reload
                        .send(tx)
                        .await
                        .map_err(|_| "the node is shutting down".to_owned())?;
                    rx.await
                        .map_err(|_| "the node is shutting down".to_owned())?
                })
            })),
            client_threads: setup.threads.threads,
            busy_poll: setup.threads.busy_poll,
            grace: setup.grace,
            ..ServeOptions::default()
        },
    )?;
    tracing::info!(
        region = %setup.region,
        client = %running.client_addr,
        peer = %running.peer_addr,
        admin = %running.admin_addr.map_or_else(|| "none".to_owned(), |a| a.to_string()),
        "node serving"
    );
    Ok(running)
}

/// The options of `crisp serve` beyond the configuration and the region.
struct ServeArgs {
    lock: Option<PathBuf>,
    certs: Option<PathBuf>,
    client_tls: Option<(PathBuf, PathBuf)>,
    threads: ClientThreads,
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    grace: std::time::Duration,
}

/// Files a node opens besides client connections: backend and peer connections, audit
/// and log files, listeners.
const OTHER_FILES: u64 = 1024;

/// Raises this process's soft limit on open files towards what `max_connections` client
/// connections need (as far as the hard limit allows), and says so when that is not
/// enough: a node out of file descriptors cannot accept, open backend connections or
/// write its audit trail (logged at `warn` with `warn`, else at `debug`).
pub(crate) fn open_file_limit(max_connections: usize, warn: bool) {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let need = (max_connections as u64).saturating_add(OTHER_FILES);
        let mut limit = getrlimit(Resource::Nofile);
        let Some(soft) = limit.current else { return };
        if soft >= need {
            return;
        }
        let raised = limit.maximum.map_or(need, |hard| hard.min(need));
        if raised > soft {
            limit.current = Some(raised);
            if let Err(e) = setrlimit(Resource::Nofile, limit) {
                tracing::debug!(error = %e, "cannot raise the open-file limit");
            }
        }
        let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        if now < need && !warn {
            tracing::debug!(
                open_file_limit = now,
                need,
                "open-file limit below max_connections"
            );
        } else if now < need {
            tracing::warn!(
                open_file_limit = now,
                max_connections,
                "this process may open {now} files, but [limits] max_connections = {max_connections} needs about {need}: raise the limit (ulimit -n, LimitNOFILE= for systemd, --ulimit nofile= for Docker) or lower max_connections"
            );
        } else if now > soft {
            tracing::debug!(from = soft, to = now, "raised the open-file limit");
        }
    }
    #[cfg(not(unix))]
    let _ = (max_connections, warn);
}

async fn serve(config: &Path, region: &str, args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        lock,
        certs,
        client_tls,
        threads,
        listen,
        data_dir,
        grace,
    } = args;
    let data_dir = match data_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| {
                format!(
                    "cannot create the data directory {}; give --data-dir a writable directory",
                    dir.display()
                )
            })?;
            dir
        }
        None => config.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let client_tls = match client_tls {
        Some((cert, key)) => {
            let read =
                |p: &Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
            Some(crisp_transport::tls::client_api_config(
                &read(&cert)?,
                &read(&key)?,
            )?)
        }
        None => None,
    };
    let setup = ServeSetup {
        config: config.to_path_buf(),
        region: region.to_owned(),
        lock,
        certs,
        client_tls,
        threads,
        listen,
        data_dir,
        grace,
        metrics: install_metrics()?,
    };
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadReply>(1);
    let node = build_node(&setup, None).await?;
    open_file_limit(node.catalog.limits.max_connections, true);
    for note in node.catalog.empty_geographies() {
        tracing::warn!("{note}");
    }
    let listeners = Listeners::bind_catalog(&node.catalog, region, setup.listen.as_deref()).await?;
    let mut running = start_node(&setup, node, listeners, reload_tx.clone())?;
    let mut retiring = tokio::task::JoinSet::new();

    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        #[cfg(unix)]
        let hangup = hup.recv();
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        let reply = tokio::select! {
            () = &mut shutdown => break,
            _ = hangup => {
                tracing::info!("SIGHUP: reloading");
                // Certificates and access files swap in place.
                let _ = running.node.reload();
                None
            }
            // The admin endpoint has reloaded those itself.
            Some(reply) = reload_rx.recv() => {
                tracing::info!("reload requested on the admin listener");
                Some(reply)
            }
        };
        while retiring.try_join_next().is_some() {}
        let outcome =
            reload_configuration(&setup, &mut running, reload_tx.clone(), &mut retiring).await;
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }
    // A reload asked for from now on is answered at once: the node is stopping.
    drop(reload_rx);
    tracing::info!("shutting down");
    // Nodes replaced by reloads and still draining finish too; a second signal stops
    // without waiting.
    let audit = running.node.audit.clone();
    let drained = async {
        tokio::join!(running.shutdown(), async {
            while retiring.join_next().await.is_some() {}
        });
        // What the replaced nodes wrote after the last node sealed.
        if let Some(audit) = audit
            && let Err(e) = audit.log.seal_now()
        {
            tracing::error!(error = %e, "cannot seal the audit file at stop; it is sealed at the next start");
        }
    };
    tokio::select! {
        () = drained => {}
        () = shutdown_signal() => {
            tracing::warn!("second stop signal: exiting without waiting for open answers");
        }
    }
    Ok(())
}

/// A changed configuration or lock file means a new node: built and validated in full
/// first, started on the old one's listening sockets where an address is unchanged
/// (handed over, so no connection queued meanwhile is lost), and only then is the old one
/// drained. A broken configuration changes nothing and says why.
async fn reload_configuration(
    setup: &ServeSetup,
    running: &mut RunningNode,
    reload_tx: tokio::sync::mpsc::Sender<ReloadReply>,
    retiring: &mut tokio::task::JoinSet<()>,
) -> Result<&'static str, String> {
    let refused = |e: String| {
        metrics::counter!("crisp_reload_failures_total", "what" => "configuration").increment(1);
        tracing::error!(error = %e, "new configuration refused; the node keeps the current one");
        Err(e)
    };
    // The configuration and lock first: unchanged, nothing else is rebuilt (certificates
    // and access files have been re-read in place, and answer for themselves).
    let catalog = match load_config(&setup.config) {
        Ok(c) => c,
        Err(e) => return refused(format!("{e:#}")),
    };
    let lock = match read_lock(&lock_path(&setup.config, setup.lock.clone())) {
        Ok(lock) => lock,
        Err(e) => return refused(format!("{e:#}")),
    };
    let same_profiles = |profiles: &crisp_catalog::profiles::Profiles| {
        profiles.len() == running.node.profiles.len()
            && profiles
                .iter()
                .zip(running.node.profiles.iter())
                .all(|(a, b)| a == b)
    };
    if catalog == running.node.catalog
        && lock
            .is_some_and(|l| same_profiles(&crisp_catalog::profiles::Profiles::build(&catalog, &l)))
    {
        return Ok("unchanged");
    }
    let node = match build_node(setup, Some(&running.node)).await {
        Ok(node) => node,
        Err(e) => return refused(format!("{e:#}")),
    };
    // What a running node cannot change: said in the answer, not only in the log.
    let at_restart = node.catalog.audit != running.node.catalog.audit
        || node.catalog.invocation_logs != running.node.catalog.invocation_logs;
    let listeners = match Listeners::bind_replacing(
        &node.catalog,
        &setup.region,
        setup.listen.as_deref(),
        Some(running),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => return refused(format!("cannot listen: {e}")),
    };
    match start_node(setup, node, listeners, reload_tx) {
        Ok(next) => {
            let old = std::mem::replace(running, next);
            tracing::info!("configuration reloaded; draining the previous node");
            retiring.spawn(old.retire());
            Ok(if at_restart {
                "reloaded; the [audit] and [[invocation_log]] changes apply when the node restarts"
            } else {
                "reloaded"
            })
        }
        Err(e) => refused(format!("{e:#}")),
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `n` with the noun that goes with it: "1 region", "3 regions".
pub fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn busy_polling_needs_client_threads() {
        let e = ClientThreads::new(0, 100).unwrap_err().to_string();
        assert!(e.contains("--client-threads"), "{e}");
        assert_eq!(
            ClientThreads::new(2, 100).unwrap(),
            ClientThreads {
                threads: 2,
                busy_poll: Some(std::time::Duration::from_micros(100))
            }
        );
        assert_eq!(ClientThreads::new(2, 0).unwrap().busy_poll, None);
    }
}
