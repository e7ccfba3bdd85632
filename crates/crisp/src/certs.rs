//! `crisp certs`: the deployment CA and region certificates on disk.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use crisp_transport::Ca;
use time::{Duration, OffsetDateTime};

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Create the deployment CA (ca.pem, ca.key) in DIR.
    Init {
        /// The deployment name, as in the configuration's [deployment] name.
        #[arg(long)]
        deployment: String,
        /// The certificates directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(i64).range(1..))]
        days: i64,
    },
    /// Issue a region's node certificate (<region>.pem, <region>.key) from the CA in DIR.
    Issue {
        /// The deployment name, as given to `crisp certs init`.
        #[arg(long)]
        deployment: String,
        /// The region code the certificate names (as in the configuration).
        #[arg(long)]
        region: String,
        /// The certificates directory.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i64).range(1..))]
        days: i64,
    },
}

/// Writes a file readable only by its owner (keys).
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(contents.as_bytes())?;
    Ok(())
}

fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates a CA in `dir`.
pub fn init(deployment: &str, dir: &Path, days: i64) -> anyhow::Result<Ca> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ca = Ca::generate(deployment, OffsetDateTime::now_utc(), days)?;
    write_public(&dir.join("ca.pem"), ca.cert_pem())?;
    write_private(&dir.join("ca.key"), &ca.key_pem())?;
    Ok(ca)
}

/// Issues `region`'s certificate from the CA in `dir` (or `ca` when given).
pub fn issue(ca: &Ca, region: &str, dir: &Path, days: i64) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let cert = ca.issue_region(
        region,
        now - Duration::minutes(5),
        now + Duration::days(days),
    )?;
    write_public(&dir.join(format!("{region}.pem")), &cert.cert_pem)?;
    write_private(&dir.join(format!("{region}.key")), &cert.key_pem)?;
    Ok(())
}

pub fn run(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            deployment,
            dir,
            days,
        } => {
            if dir.join("ca.key").exists() || dir.join("ca.pem").exists() {
                bail!(
                    "{} already holds a CA; remove it first if you really mean to replace it (every node certificate would have to be reissued)",
                    dir.display()
                );
            }
            init(&deployment, &dir, days)?;
            println!(
                "created the {deployment} deployment CA: {0}/ca.pem (share with every node) and {0}/ca.key (keep it secret)",
                dir.display()
            );
            Ok(())
        }
        CertsCommand::Issue {
            deployment,
            region,
            dir,
            days,
        } => {
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name)).with_context(|| {
                    format!(
                        "cannot read {}; create the CA first with `crisp certs init --dir {}`",
                        dir.join(name).display(),
                        dir.display()
                    )
                })
            };
            let ca = Ca::load(&deployment, &read("ca.pem")?, &read("ca.key")?)?;
            issue(&ca, &region, &dir, days)?;
            println!(
                "issued {region}: {0}/{region}.pem and {0}/{region}.key (identity spiffe://{deployment}/region/{region})",
                dir.display()
            );
            Ok(())
        }
    }
}
