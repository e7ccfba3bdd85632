//! `crisp keys` and `crisp policy`: managing credentials and explaining decisions.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use crisp_catalog::Catalog;
use crisp_catalog::profiles::Profiles;
use crisp_node::access::{Access, AccessFiles};
use crisp_policy::keys::{KeyStore, SigV4Credential, parse_principals};
use crisp_policy::{Action, DenyReason, Verdict};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key (or, with --sigv4, an access key ID and secret) for a principal.
    /// The key is printed once and stored only as a hash.
    Create {
        /// The deployment's configuration file (its [access] section names the files).
        #[arg(long, short)]
        config: PathBuf,
        /// The principal the key signs in as (an entry of the principals file).
        #[arg(long)]
        principal: String,
        /// Create SigV4 credentials for the Bedrock API instead of a bearer key.
        #[arg(long)]
        sigv4: bool,
    },
    /// List keys (IDs, principals, state; never the keys).
    List {
        /// The deployment's configuration file (its [access] section names the files).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Revoke a key by its ID (k-...) or a SigV4 access key ID.
    Revoke {
        /// The deployment's configuration file (its [access] section names the files).
        #[arg(long, short)]
        config: PathBuf,
        /// The key's ID (k-...) or access key ID (AKIA...), as `crisp keys list` shows.
        id: String,
    },
}

/// The access files of a configuration, as absolute paths.
pub fn files(config: &Path, catalog: &Catalog) -> anyhow::Result<Option<AccessFiles>> {
    let Some(a) = &catalog.access else {
        return Ok(None);
    };
    let base = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let abs = |p: &str| base.join(p);
    Ok(Some(AccessFiles {
        principals: abs(&a.principals),
        keys: abs(&a.keys),
        policies: a.policies.iter().map(|p| abs(p)).collect(),
        guardrails: a.guardrails.iter().map(|p| abs(p)).collect(),
    }))
}

fn random_bytes() -> Vec<u8> {
    let mut v = uuid::Uuid::new_v4().as_bytes().to_vec();
    v.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    v
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn read_store(path: &Path) -> anyhow::Result<KeyStore> {
    match std::fs::read_to_string(path) {
        Ok(t) => KeyStore::parse(&t).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyStore::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn write_store(path: &Path, store: &KeyStore) -> anyhow::Result<()> {
    crate::certs::write_private(path, &store.to_toml())
}

pub fn run_keys(command: KeysCommand) -> anyhow::Result<()> {
    let (config, catalog) = match &command {
        KeysCommand::Create { config, .. }
        | KeysCommand::List { config }
        | KeysCommand::Revoke { config, .. } => (config.clone(), crate::cli::load_config(config)?),
    };
    let Some(files) = files(&config, &catalog)? else {
        bail!(
            "{} has no [access] section: add one naming the principals, keys and policy files",
            config.display()
        );
    };
    let mut store = read_store(&files.keys)?;
    match command {
        KeysCommand::Create {
            principal, sigv4, ..
        } => {
            let text = std::fs::read_to_string(&files.principals)
                .with_context(|| format!("cannot read {}", files.principals.display()))?;
            let principals = parse_principals(&text).map_err(|e| anyhow::anyhow!(e.join("; ")))?;
            if !principals.iter().any(|p| p.id == principal) {
                bail!(
                    "principal {principal:?} is not defined in {}",
                    files.principals.display()
                );
            }
            if sigv4 {
                let r = random_bytes();
                let akid = format!("AKIA{}", hex::encode_upper(&r[..8]));
                let secret = hex::encode(&r[8..]);
                store.sigv4.push(SigV4Credential {
                    access_key_id: akid.clone(),
                    secret: secret.clone(),
                    principal: principal.clone(),
                    revoked: false,
                });
                write_store(&files.keys, &store)?;
                // The secret alone on stdout (for pipes and files), the note on stderr.
                println!("aws_access_key_id = {akid}\naws_secret_access_key = {secret}");
                eprintln!("(for principal {principal}; store it now)");
            } else {
                let (entry, key) = store.create(&principal, &random_bytes(), &now());
                write_store(&files.keys, &store)?;
                println!("{key}");
                eprintln!(
                    "(key {} for principal {principal}; shown once, stored only as a hash)",
                    entry.id
                );
            }
        }
        KeysCommand::List { .. } => {
            for k in &store.keys {
                println!(
                    "{:<16} {:<20} {:<26} {}",
                    k.id,
                    k.principal,
                    k.created,
                    if k.revoked { "revoked" } else { "active" }
                );
            }
            for c in &store.sigv4 {
                println!(
                    "{:<16} {:<20} {:<26} {}",
                    c.access_key_id,
                    c.principal,
                    "sigv4",
                    if c.revoked { "revoked" } else { "active" }
                );
            }
        }
        KeysCommand::Revoke { id, .. } => {
            if !store.revoke(&id) {
                bail!("no key {id:?}; `crisp keys list` shows them");
            }
            write_store(&files.keys, &store)?;
            println!("revoked {id}; nodes pick this up within seconds");
        }
    }
    Ok(())
}

fn explain(reason: &DenyReason) -> String {
    match reason {
        DenyReason::Guardrail { policies } => format!("guardrail {}", policies.join(", ")),
        DenyReason::Forbidden { policies } => format!("forbidden by {}", policies.join(", ")),
        DenyReason::NoPermit => "no policy permits it".into(),
        DenyReason::UnknownPrincipal => "unknown principal".into(),
        DenyReason::Destination { region, inner } => {
            format!("destination region {region}: {}", explain(inner))
        }
    }
}

/// `crisp policy check`
pub fn check(
    config: &Path,
    principal: &str,
    action: &str,
    profile: &str,
    source: Option<&str>,
) -> anyhow::Result<bool> {
    let catalog = crate::cli::load_config(config)?;
    let Some(files) = files(config, &catalog)? else {
        bail!("{} has no [access] section", config.display());
    };
    let lock = crate::cli::read_lock(&crate::cli::lock_path(config, None))?.unwrap_or_default();
    let profiles = Profiles::build(&catalog, &lock);
    let source = source.map_or_else(
        || {
            catalog
                .regions
                .first()
                .map(|r| r.code.clone())
                .unwrap_or_default()
        },
        str::to_owned,
    );
    let Some(ix) = catalog.region_ix(&source) else {
        bail!("unknown source region {source}");
    };
    let action: Action = action.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let target = profiles.resolve(&catalog, profile, ix)?;
    let id = target.id().to_owned();
    let dests: Vec<&str> = target
        .destinations()
        .iter()
        .map(|&r| catalog.region_code(r))
        .collect();
    let access = Access::load(files, &catalog, &profiles, ix).map_err(|e| anyhow::anyhow!(e))?;
    let verdict = access.snapshot().authorize(principal, action, &id, &source);
    println!(
        "principal {principal}, action {}, profile {id} from {source}",
        action.name()
    );
    println!("destinations: [{}]", dests.join(", "));
    match verdict {
        Verdict::Allow { policies } => {
            println!("ALLOW by {}", policies.join(", "));
            Ok(true)
        }
        Verdict::Deny(reason) => {
            println!("DENY: {}", explain(&reason));
            println!("(clients are told: {})", reason.category());
            Ok(false)
        }
    }
}
