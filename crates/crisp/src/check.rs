//! `crisp check`: what `crisp serve` would refuse or trip over, found before a node
//! starts: the configuration, the lock file, the access files, each region's certificates
//! and addresses that two regions would share.

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
        say("ok      ", what);
    }

    fn note(&self, what: &str) {
        say("note    ", what);
    }

    fn problem(&mut self, what: &str) {
        self.problems += 1;
        say("PROBLEM ", what);
    }
}

/// One line of the report; a reader that stopped reading (`| head`) is no error.
fn say(kind: &str, what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{kind} {what}");
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
    for note in catalog.empty_geographies() {
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
        Ok(None) if args.lock.is_some() => {
            f.problem(&format!(
                "--lock {}: no such file (`crisp profiles lock --lock {0}` writes it)",
                path.display()
            ));
            Lock::default()
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
    // The access files are often secrets, provided only where a node runs: without
    // --region, missing ones are noted; on a node's host (--region) they must be there.
    let missing: Vec<String> = std::iter::once(&files.principals)
        .chain([&files.keys])
        .chain(&files.policies)
        .chain(&files.guardrails)
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() && args.regions.is_empty() {
        f.note(&format!(
            "[access]: {} not here ({}); nodes read them where they run: check there with --region",
            count(missing.len(), "file", "files"),
            missing.join(", ")
        ));
        return;
    }
    let profiles = Profiles::build(catalog, lock);
    let region = args
        .regions
        .iter()
        .find_map(|r| catalog.region_ix(r))
        .unwrap_or(0);
    let policies = files.policies.len() + files.guardrails.len();
    let (problems, notes) = crisp_node::access::lint(&files, catalog, &profiles, region);
    for p in &problems {
        f.problem(&format!("[access]: {p}"));
    }
    for n in &notes {
        f.note(&format!("[access]: {n}"));
    }
    if problems.is_empty() {
        f.ok(&format!(
            "[access]: principals, keys and {} load",
            count(policies, "policy file", "policy files")
        ));
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

/// Two regions whose addresses resolve to the same socket cannot both run on one host:
/// the second node would be refused when it binds. Found here, before either starts. A
/// wildcard address (`0.0.0.0:P`) takes port P on every interface, so it clashes with any
/// other address on that port; names that do not resolve here are compared as written.
async fn check_addresses(catalog: &Catalog, f: &mut Findings) {
    // Every configured address: (region, role, as written, what it resolved to).
    let mut all: Vec<(&str, &'static str, &str, Vec<SocketAddr>)> = Vec::new();
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
                    Ok(Ok(found)) => found.collect(),
                    _ => Vec::new(),
                };
            all.push((&r.code, role, addr, resolved));
        }
    }
    let unresolved: Vec<&str> = all.iter().filter(|a| a.3.is_empty()).map(|a| a.2).collect();
    if !unresolved.is_empty() {
        f.note(&format!(
            "{} do not resolve here ({}); they are compared as written",
            count(unresolved.len(), "address", "addresses"),
            unresolved.join(", ")
        ));
    }
    let mut clashes = 0;
    for (i, a) in all.iter().enumerate() {
        for b in &all[..i] {
            let same = if a.3.is_empty() || b.3.is_empty() {
                a.2.eq_ignore_ascii_case(b.2).then(|| a.2.to_owned())
            } else {
                a.3.iter()
                    .find_map(|x| b.3.iter().find(|y| overlap(x, y)).map(|y| (x, y)))
                    .map(|(x, y)| {
                        if x == y {
                            x.to_string()
                        } else {
                            format!("{x} and {y}")
                        }
                    })
            };
            if let Some(socket) = same {
                clashes += 1;
                f.problem(&format!(
                    "the {} address of {} ({}) and the {} address of {} ({}) are the same socket {socket}: nodes on one host cannot both listen there",
                    a.1, a.0, a.2, b.1, b.0, b.2
                ));
            }
        }
    }
    if clashes == 0 {
        f.ok(&format!(
            "addresses: {} distinct",
            count(all.len(), "address", "addresses")
        ));
    }
}

/// Whether binding both would clash: the same socket, or the same port where one is a
/// wildcard of the other's family (`[::]` is dual-stack on Linux: IPv4 too).
fn overlap(a: &SocketAddr, b: &SocketAddr) -> bool {
    let covers =
        |w: &SocketAddr, x: &SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || x.is_ipv4());
    a == b || (a.port() == b.port() && (covers(a, b) || covers(b, a)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_clashes_with_every_address_on_its_port() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlap(&at("127.0.0.1:8080"), &at("127.0.0.1:8080")));
        assert!(overlap(&at("0.0.0.0:8080"), &at("127.0.0.1:8080")));
        assert!(overlap(&at("10.0.0.7:8080"), &at("0.0.0.0:8080")));
        assert!(!overlap(&at("0.0.0.0:8080"), &at("127.0.0.1:8081")));
        assert!(!overlap(&at("127.0.0.1:8080"), &at("127.0.0.2:8080")));
        assert!(
            overlap(&at("[::]:8080"), &at("127.0.0.1:8080")),
            "dual stack"
        );
        assert!(!overlap(&at("0.0.0.0:8080"), &at("[::1]:8080")));
    }
}
