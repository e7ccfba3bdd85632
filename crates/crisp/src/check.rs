//! `crisp check`: what `crisp serve` would refuse or trip over, found before a node
//! starts: the configuration, the lock file, the access files, each region's certificates
//! and addresses that two regions would share.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crisp_catalog::Catalog;
use crisp_catalog::profiles::{Lock, Plan, Profiles};
use crisp_transport::{RegionIdentity, TlsFiles, TlsMaterial};

use crate::cli::{count, load_config, lock_path, read_lock};

/// A certificate that expires sooner than this is worth a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// What `crisp check` is given.
pub struct CheckArgs {
    pub config: PathBuf,
    pub lock: Option<PathBuf>,
    pub certs: Option<PathBuf>,
    /// Check only these regions' certificates (a node's host holds only its own).
    pub regions: Vec<String>,
}

/// Problems found, each printed as it is found.
#[derive(Default)]
struct Findings {
    problems: usize,
}

impl Findings {
    fn ok(&self, what: &str) {
        println!("ok       {what}");
    }

    fn note(&self, what: &str) {
        println!("note     {what}");
    }

    fn problem(&mut self, what: &str) {
        self.problems += 1;
        println!("PROBLEM  {what}");
    }
}

/// Runs every check; an error when any found a problem.
pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    // Without a readable configuration nothing else can be checked.
    let catalog = load_config(&args.config)?;
    let mut f = Findings::default();
    f.ok(&format!(
        "{}: valid ({}, {}, {})",
        args.config.display(),
        count(catalog.regions.len(), "region", "regions"),
        count(catalog.geographies.len(), "geography", "geographies"),
        count(catalog.models.len(), "model", "models")
    ));
    if let Some(note) = crate::audit::shared_store_note(&catalog) {
        f.note(&note);
    }
    for r in &args.regions {
        if catalog.region_ix(r).is_none() {
            f.problem(&format!(
                "--region {r} is not a region of {}",
                args.config.display()
            ));
        }
    }
    let lock = check_lock(&args, &catalog, &mut f);
    check_access(&args, &catalog, &lock, &mut f);
    check_certificates(&args, &catalog, &mut f);
    check_addresses(&catalog, &mut f).await;
    if f.problems > 0 {
        anyhow::bail!(
            "{}; a node would refuse to start or fail at it",
            count(f.problems, "problem", "problems")
        );
    }
    Ok(())
}

fn check_lock(args: &CheckArgs, catalog: &Catalog, f: &mut Findings) -> Lock {
    let path = lock_path(&args.config, args.lock.clone());
    match read_lock(&path) {
        Ok(Some(lock)) => {
            let plan = Plan::new(catalog, &lock);
            if plan.has_issues() {
                f.note(&format!(
                    "{}: the fleet has changed since it was written; `crisp profiles plan` shows what `crisp profiles lock` would issue",
                    path.display()
                ));
            } else {
                f.ok(&format!(
                    "{}: {}, in step with the configuration",
                    path.display(),
                    count(lock.profiles.len(), "profile", "profiles")
                ));
            }
            lock
        }
        Ok(None) => {
            f.note(&format!(
                "{} does not exist: the first node writes it; write it yourself with `crisp profiles lock` to ship one lock to every node",
                path.display()
            ));
            Lock::default()
        }
        Err(e) => {
            f.problem(&format!("{e:#}"));
            Lock::default()
        }
    }
}

fn check_access(args: &CheckArgs, catalog: &Catalog, lock: &Lock, f: &mut Findings) {
    let files = match crate::access::files(&args.config, catalog) {
        Ok(Some(files)) => files,
        Ok(None) => {
            f.note("no [access] section: nodes serve every caller without a key");
            return;
        }
        Err(e) => return f.problem(&format!("{e:#}")),
    };
    let profiles = Profiles::build(catalog, lock);
    let region = args
        .regions
        .iter()
        .find_map(|r| catalog.region_ix(r))
        .unwrap_or(0);
    let policies = files.policies.len() + files.guardrails.len();
    match crisp_node::access::Access::load(files, catalog, &profiles, region) {
        Ok(_) => f.ok(&format!(
            "[access]: principals, keys and {} load",
            count(policies, "policy file", "policy files")
        )),
        Err(e) => f.problem(&format!("[access]: {e}")),
    }
}

fn check_certificates(args: &CheckArgs, catalog: &Catalog, f: &mut Findings) {
    let dir = args
        .certs
        .clone()
        .unwrap_or_else(|| args.config.with_file_name("certs"));
    // A node's host holds its own region's files; without --region, whichever are here.
    let regions: Vec<&str> = if args.regions.is_empty() {
        catalog
            .regions
            .iter()
            .map(|r| r.code.as_str())
            .filter(|code| dir.join(format!("{code}.pem")).exists())
            .collect()
    } else {
        args.regions.iter().map(String::as_str).collect()
    };
    if regions.is_empty() {
        f.note(&format!(
            "no region certificates in {}: each node needs ca.pem, <region>.pem and <region>.key there (`crisp certs init`, then `crisp certs issue`); give --region to check one",
            dir.display()
        ));
        return;
    }
    let now = crisp_node::unix_ms() / 1000;
    for region in regions {
        certificate(&dir, &catalog.deployment.name, region, now, f);
    }
}

fn certificate(dir: &Path, deployment: &str, region: &str, now: u64, f: &mut Findings) {
    let identity = RegionIdentity::new(deployment, region);
    match TlsMaterial::load(&TlsFiles::in_dir(dir, region), &identity, now) {
        Ok(material) => {
            let left = material
                .not_after_unix()
                .map(|t| t.saturating_sub(i64::try_from(now).unwrap_or(i64::MAX)));
            match left {
                Some(s) if s < i64::try_from(EXPIRY_WARNING.as_secs()).unwrap_or(i64::MAX) => {
                    f.note(&format!(
                        "certificate of {region}: expires in {} days; issue a new one (`crisp certs issue`) and replace the files, nodes pick them up without a restart",
                        s / 86_400
                    ));
                }
                Some(s) => f.ok(&format!(
                    "certificate of {region}: valid, for {} more days",
                    s / 86_400
                )),
                None => f.ok(&format!("certificate of {region}: valid")),
            }
        }
        Err(e) => f.problem(&format!(
            "certificate of {region} in {}: {e}",
            dir.display()
        )),
    }
}

/// Two regions whose addresses resolve to the same socket would both bind it (nodes
/// listen with SO_REUSEPORT, so a reloaded node can start beside the old one) and share
/// its connections: one region's clients would land on the other.
async fn check_addresses(catalog: &Catalog, f: &mut Findings) {
    let mut seen: BTreeMap<SocketAddr, (String, &'static str, String)> = BTreeMap::new();
    let mut clashes = 0;
    for r in &catalog.regions {
        for (role, addr) in [
            ("client", Some(&r.client_addr)),
            ("peer", Some(&r.peer_addr)),
            ("admin", r.admin_addr.as_ref()),
        ] {
            let Some(addr) = addr else { continue };
            let resolved =
                match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(addr))
                    .await
                {
                    Ok(Ok(found)) => found.collect::<Vec<_>>(),
                    _ => {
                        f.note(&format!(
                        "{} address of {} ({addr}) does not resolve here; compared as written only",
                        role, r.code
                    ));
                        continue;
                    }
                };
            for socket in resolved {
                if let Some((other, other_role, other_addr)) = seen.get(&socket) {
                    if other != &r.code || *other_role != role {
                        clashes += 1;
                        f.problem(&format!(
                            "the {role} address of {} ({addr}) and the {other_role} address of {other} ({other_addr}) are the same socket {socket}: nodes on one host would share it",
                            r.code
                        ));
                    }
                } else {
                    seen.insert(socket, (r.code.clone(), role, addr.clone()));
                }
            }
        }
    }
    if clashes == 0 {
        f.ok(&format!(
            "addresses: {} distinct",
            count(seen.len(), "socket", "sockets")
        ));
    }
}
