//! `crisp up`: a whole federation in one process, each region a real node on its own
//! loopback ports, talking over the same backbone code as a real deployment.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use crisp_catalog::profiles::{Lock, Plan, Profiles};
use crisp_catalog::{BackendSpec, Catalog, parse_config};
use std::sync::Arc;

use crate::observe::install_metrics;
use crisp_node::access::{Access, AccessFiles};
use crisp_node::app_profiles::AppProfiles;
use crisp_node::{Listeners, Node, RunningNode, ServeOptions, bind, unix_ms};
use crisp_policy::keys::{ApiKey, KeyStore, SigV4Credential, hash_key};
use crisp_transport::{RegionIdentity, TlsFiles, TlsStore};

/// The embedded demo federation.
pub const DEMO_CONFIG: &str = include_str!("../../../examples/demo.toml");
const DEMO_BASE_PORT: u16 = 8080;
/// Demo SigV4 credentials for the Bedrock API: well known, loopback only.
pub const DEMO_ACCESS_KEY: &str = "AKIACRISPDEMO0000001";
pub const DEMO_SECRET_KEY: &str = "crisp-demo-secret-loopback-only";
/// Demo API keys (well known, loopback only): the platform team, and an EU-resident team
/// under the residency guardrail.
pub const DEMO_API_KEY: &str = "crisp-demo-key-loopback-only";
pub const EU_API_KEY: &str = "crisp-eu-search-key-loopback-only";

/// Writes the demo's principals, keys and policies into `dir`.
fn demo_access(dir: &std::path::Path) -> anyhow::Result<AccessFiles> {
    let files = AccessFiles {
        principals: dir.join("principals.toml"),
        keys: dir.join("keys.toml"),
        policies: vec![dir.join("teams.cedar")],
        guardrails: vec![dir.join("guardrails.cedar")],
    };
    std::fs::write(
        &files.principals,
        include_str!("../../../examples/principals.toml"),
    )?;
    std::fs::write(
        &files.policies[0],
        include_str!("../../../examples/policies/teams.cedar"),
    )?;
    std::fs::write(
        &files.guardrails[0],
        include_str!("../../../examples/policies/guardrails.cedar"),
    )?;
    let key = |id: &str, principal: &str, plain: &str| ApiKey {
        id: id.into(),
        principal: principal.into(),
        sha256: hash_key(plain),
        created: "demo".into(),
        revoked: false,
    };
    let store = KeyStore {
        keys: vec![
            key("k-demo", "demo", DEMO_API_KEY),
            key("k-eu-search", "eu-search", EU_API_KEY),
        ],
        sigv4: vec![
            SigV4Credential {
                access_key_id: DEMO_ACCESS_KEY.into(),
                secret: DEMO_SECRET_KEY.into(),
                principal: "demo".into(),
                revoked: false,
            },
            SigV4Credential {
                access_key_id: "AKIACRISPEUSEARCH001".into(),
                secret: "crisp-eu-search-secret-loopback-only".into(),
                principal: "eu-search".into(),
                revoked: false,
            },
        ],
    };
    crate::access::write_store(&files.keys, &store)?;
    Ok(files)
}

#[derive(Args)]
pub struct UpArgs {
    /// Client port of the first region; every other port (clients, peers, admin) keeps
    /// its distance to it [default: 8080, or the configuration's own ports].
    #[arg(long)]
    port: Option<u16>,
    /// Run every region of this configuration instead of the embedded demo.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn shift(addr: &str, offset: i32) -> anyhow::Result<String> {
    let (host, port) = addr.rsplit_once(':').context("address without a port")?;
    let port: i32 = port.parse().context("bad port")?;
    let moved = u16::try_from(port + offset)
        .ok()
        .filter(|p| *p > 0)
        .with_context(|| format!("--port moves {addr} outside 1..65535"))?;
    Ok(format!("{host}:{moved}"))
}

fn load(args: &UpArgs) -> anyhow::Result<Catalog> {
    let (text, name) = match &args.config {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (DEMO_CONFIG.to_owned(), "the embedded demo".to_owned()),
    };
    let mut catalog = parse_config(&text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if let Some(dir) = args.config.as_deref().and_then(std::path::Path::parent) {
        catalog.resolve_files(dir);
    }
    let first = catalog
        .regions
        .first()
        .and_then(|r| r.client_addr.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .unwrap_or(DEMO_BASE_PORT);
    let offset = args
        .port
        .map_or(0, |port| i32::from(port) - i32::from(first));
    if offset != 0 {
        for r in &mut catalog.regions {
            r.client_addr = shift(&r.client_addr, offset)?;
            r.peer_addr = shift(&r.peer_addr, offset)?;
            if let Some(a) = &r.admin_addr {
                r.admin_addr = Some(shift(a, offset)?);
            }
        }
    }
    Ok(catalog)
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let metrics = install_metrics()?;
    let catalog = load(&args)?;
    // Every region's node runs in this process; a demo does not need them all, so a
    // lower limit is not worth a warning.
    crate::cli::open_file_limit(
        catalog
            .limits
            .max_connections
            .saturating_mul(catalog.regions.len()),
        false,
    );
    let lock = Plan::new(&catalog, &Lock::default()).apply(&Lock::default());

    // Bind everything first, so a busy port fails before any node starts.
    let mut listeners = Vec::with_capacity(catalog.regions.len());
    for r in &catalog.regions {
        let client = bind("client", &r.client_addr).await;
        let peer = bind("peer", &r.peer_addr).await;
        let admin = match &r.admin_addr {
            Some(a) => bind("admin", a).await.map(Some),
            None => Ok(None),
        };
        match (client, peer, admin) {
            (Ok(client), Ok(peer), Ok(admin)) => listeners.push(Listeners {
                client,
                peer,
                admin,
            }),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                bail!(
                    "{e}\nhint: another `crisp up` may be running; use `crisp up --port N` to move every port"
                )
            }
        }
    }
    // A throwaway deployment CA, so the demo's backbone is real mutual TLS.
    let certs = tempfile::Builder::new()
        .prefix("crisp-up-certs-")
        .tempdir()?;
    let ca = crate::certs::init(&catalog.deployment.name, certs.path(), 1)?;
    // One store of application profiles shared by every node, as a bucket would be.
    let profile_dir = tempfile::Builder::new()
        .prefix("crisp-up-profiles-")
        .tempdir()?;
    let profile_url = match &catalog.deployment.profile_store {
        Some(url) => url.clone(),
        None => format!("file://{}", profile_dir.path().display()),
    };
    let access_dir = tempfile::Builder::new()
        .prefix("crisp-up-access-")
        .tempdir()?;
    // Each region's audit trail, and the CA to verify it with, outlive this process so
    // they can be inspected after Ctrl-C.
    let audit_root = tempfile::Builder::new()
        .prefix("crisp-up-audit-")
        .tempdir()?
        .keep();
    std::fs::copy(certs.path().join("ca.pem"), audit_root.join("ca.pem"))?;
    // The embedded demo runs with its demo principals; a given configuration with its own
    // [access] section, or open when it has none.
    let access_files = match &args.config {
        None => Some(demo_access(access_dir.path())?),
        Some(path) => crate::access::files(path, &catalog)?,
    };
    let mut nodes = Vec::with_capacity(listeners.len());
    for (r, l) in catalog.regions.iter().zip(listeners) {
        let app_profiles = Arc::new(AppProfiles::from_url(&profile_url)?);
        crate::certs::issue(&ca, &r.code, certs.path(), 1)?;
        let tls = Arc::new(TlsStore::load(
            TlsFiles::in_dir(certs.path(), &r.code),
            RegionIdentity::new(&catalog.deployment.name, &r.code),
            unix_ms() / 1000,
        )?);
        let audit = crate::audit::open(&audit_root.join(&r.code), &catalog, &r.code, tls.clone())?;
        let node = Node::new(catalog.clone(), &lock, &r.code, tls)?
            .with_app_profiles(app_profiles)
            .with_audit(audit);
        let node = match &access_files {
            Some(files) => {
                let access =
                    Access::load(files.clone(), &node.catalog, &node.profiles, node.region)
                        .map_err(|e| anyhow::anyhow!("access control: {e}"))?;
                node.with_access(Arc::new(access))
            }
            None => node,
        };
        let options = ServeOptions {
            grace: Duration::from_secs(5),
            metrics: Some(metrics.clone()),
            ..ServeOptions::default()
        };
        nodes.push(RunningNode::start(node, l, options)?);
    }
    wait_for_mesh(&nodes).await;
    let callers = match (&args.config, &access_files) {
        (None, _) => Callers::Demo,
        (Some(_), Some(files)) => Callers::Keys(files.keys.clone()),
        (Some(_), None) => Callers::Open,
    };
    print_banner(&catalog, &lock, &audit_root, &callers);

    crate::cli::shutdown_signal().await;
    eprintln!("\nshutting down {} nodes...", nodes.len());
    futures::future::join_all(nodes.into_iter().map(|n| n.shutdown())).await;
    eprintln!("stopped");
    Ok(())
}

/// Waits (briefly) until every node hears every other, so the first request routes well.
async fn wait_for_mesh(nodes: &[RunningNode]) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let all = nodes.iter().all(|n| {
            (0..n.node.catalog.regions.len()).all(|i| {
                let ix = u16::try_from(i).unwrap_or(u16::MAX);
                ix == n.node.region || n.node.fleet.summary(ix).is_some_and(|s| s.reachable)
            })
        });
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Who may call the nodes `crisp up` runs, for its banner.
enum Callers {
    /// The embedded demo's well-known keys and SigV4 credentials.
    Demo,
    /// The keys of the configuration's `[access]` section, in this file.
    Keys(PathBuf),
    /// A configuration without `[access]`: anyone.
    Open,
}

fn print_banner(catalog: &Catalog, lock: &Lock, audit_root: &std::path::Path, callers: &Callers) {
    let profiles = Profiles::build(catalog, lock);
    println!(
        "crisp: {} regions up on loopback (deployment {:?}), linked by mutual TLS\n",
        catalog.regions.len(),
        catalog.deployment.name
    );
    println!(
        "  {:<16} {:<20} {:<6} {:<22} {:<10} capacity (slots+queue per model)",
        "region", "city", "geo", "endpoint", "peer"
    );
    for (i, r) in catalog.regions.iter().enumerate() {
        let ix = u16::try_from(i).unwrap_or(u16::MAX);
        let geos = catalog.geographies_of(ix).join(",");
        let capacity: Vec<String> = catalog
            .models
            .iter()
            .filter_map(|m| {
                let short = m.id.split(['.', '-']).nth(1).unwrap_or(&m.id);
                Some(match m.backend(ix)? {
                    BackendSpec::Simulated(s) => format!("{short} {}+{}", s.slots, s.queue_limit),
                    BackendSpec::OpenAi(r) => format!(
                        "{short} {}x{}",
                        r.len(),
                        r.first().map_or(0, |x| x.max_concurrency)
                    ),
                })
            })
            .collect();
        let peer_port = r.peer_addr.rsplit_once(':').map_or("", |(_, p)| p);
        println!(
            "  {:<16} {:<20} {:<6} http://{:<15} :{:<9} {}",
            r.code,
            r.city,
            if geos.is_empty() { "-" } else { &geos },
            r.client_addr,
            peer_port,
            capacity.join(", ")
        );
    }
    println!("\nprofiles:");
    crate::cli::print_profiles(catalog, &profiles);
    let first = catalog
        .regions
        .first()
        .map_or("127.0.0.1:8080", |r| r.client_addr.as_str());
    let region = catalog.regions.first().map_or("?", |r| r.code.as_str());
    match callers {
        Callers::Demo => print_demo_calls(first, region),
        Callers::Keys(_) | Callers::Open => {
            // A profile of this configuration that is not superseded, geographic first.
            let example = profiles
                .iter()
                .filter(|p| p.superseded_by.is_none())
                .min_by_key(|p| p.id.starts_with("global."))
                .map_or("<profile>", |p| p.id.as_str());
            let auth = match callers {
                Callers::Keys(keys) => {
                    println!(
                        "\naccess control: the keys in {} (`crisp keys create` issues one); set CRISP_API_KEY to one",
                        keys.display()
                    );
                    " -H \"authorization: Bearer $CRISP_API_KEY\""
                }
                _ => {
                    println!(
                        "\naccess control: none (the configuration has no [access] section): any caller on loopback may call"
                    );
                    ""
                }
            };
            println!(
                r#"
try it (the answer's x-crisp-inference-region header says where it ran):

  curl -si http://{first}/v1/chat/completions -H 'content-type: application/json'{auth} \
    -d '{{"model": "{example}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  curl -s http://{first}/crisp/v1/fleet{auth}   # this node's view of every region"#
            );
        }
    }
    println!(
        r#"{metrics}

audit trails: {audit}/<region>
  crisp audit lookup --dir {audit}/{region}
  crisp audit verify --dir {audit}/{region} --ca {audit}/ca.pem --deployment {deployment} --region {region}

Ctrl-C stops every node."#,
        audit = audit_root.display(),
        deployment = catalog.deployment.name,
        metrics = match catalog
            .regions
            .first()
            .and_then(|r| r.admin_addr.as_deref())
        {
            Some(admin) => format!(
                "  curl -s http://{admin}/metrics          # Prometheus metrics (every node of this process)"
            ),
            None => "  (no metrics: give the first region an `admin` address to serve /metrics)"
                .to_owned(),
        },
    );
}

/// The embedded demo's credentials and calls that use them.
fn print_demo_calls(first: &str, region: &str) {
    println!(
        r#"
API keys (loopback only): {demo_key} (team platform)
                          {eu_key} (team search, residency=eu: EU profiles only)
SigV4 for boto3: {akid} / {secret}

try it (an EU profile called in {region}; the answer says where it ran):

  curl -si http://{first}/v1/chat/completions -H 'content-type: application/json' \
    -H 'authorization: Bearer {demo_key}' \
    -d '{{"model": "eu.amazon.nova-lite-v1:0", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  python3 -c '
from openai import OpenAI
client = OpenAI(base_url="http://{first}/v1", api_key="{demo_key}")
raw = client.chat.completions.with_raw_response.create(
    model="eu.amazon.nova-lite-v1:0", messages=[{{"role": "user", "content": "Hello"}}])
print(raw.headers["x-crisp-inference-region"], raw.parse().choices[0].message.content)'

  python3 -c '
import boto3
rt = boto3.client("bedrock-runtime", endpoint_url="http://{first}", region_name="{region}",
                  aws_access_key_id="{akid}", aws_secret_access_key="{secret}")
r = rt.converse(modelId="eu.amazon.nova-lite-v1:0", messages=[{{"role": "user", "content": [{{"text": "Hello"}}]}}])
print(r["ResponseMetadata"]["HTTPHeaders"]["x-crisp-inference-region"], r["output"]["message"]["content"][0]["text"])'

  curl -s http://{first}/crisp/v1/fleet -H 'authorization: Bearer {demo_key}'   # this node's view of every region
  curl -s http://{first}/v1/models -H 'authorization: Bearer {demo_key}'        # what this key may call"#,
        akid = DEMO_ACCESS_KEY,
        demo_key = DEMO_API_KEY,
        eu_key = EU_API_KEY,
        secret = DEMO_SECRET_KEY,
    );
}
