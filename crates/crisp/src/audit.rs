//! `crisp audit`: verify a region's trail and look events up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use crisp_audit::{AuditLog, Durability, Sealing};
use crisp_catalog::{AuditDurability, Catalog};
use crisp_node::audit::{Audit, NodeSigner};
use crisp_transport::TlsStore;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Walk the signed digest chain and check every file, event and receipt.
    Verify {
        /// The region's audit directory.
        #[arg(long, required_unless_present = "store")]
        dir: Option<PathBuf>,
        /// The region's audit object store, as in `[audit] store` (`{region}` allowed):
        /// verify the copy shipped there too, and compare where the two chains end.
        #[arg(long)]
        store: Option<String>,
        /// The deployment CA certificate (ca.pem).
        #[arg(long)]
        ca: PathBuf,
        /// The deployment name, as in the configuration's [deployment] name.
        #[arg(long)]
        deployment: String,
        /// The region whose trail this is (its key must have signed the digests).
        #[arg(long)]
        region: String,
    },
    /// Find events by time, principal, profile, call, inference region or error code.
    Lookup {
        /// The region's audit directory.
        #[arg(long)]
        dir: PathBuf,
        /// Events of this principal (the name its key signs in as).
        #[arg(long)]
        principal: Option<String>,
        /// Events of this call: `Converse`, `ChatCompletion`, `CreateInferenceProfile`, ...
        #[arg(long)]
        event_name: Option<String>,
        /// Events of this profile or model ID.
        #[arg(long)]
        profile: Option<String>,
        /// Events whose model ran in this region.
        #[arg(long)]
        inference_region: Option<String>,
        /// Events with this error: either API's code (`ThrottlingException`,
        /// `capacity_exhausted`) or the kind that is the same in both (`errorKind`).
        #[arg(long)]
        error_code: Option<String>,
        /// Events at or after this time (RFC 3339, e.g. 2026-11-28T10:00:00Z or
        /// 2026-11-28T11:00:00+01:00).
        #[arg(long, value_parser = parse_time)]
        since: Option<time::OffsetDateTime>,
        /// Events at or before this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        until: Option<time::OffsetDateTime>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Opens the audit log of a node.
pub fn open(
    dir: &Path,
    catalog: &Catalog,
    region: &str,
    tls: Arc<TlsStore>,
) -> anyhow::Result<Arc<Audit>> {
    let settings = &catalog.audit;
    let durability = match settings.durability {
        AuditDurability::Fsync => Durability::Fsync,
        AuditDurability::Write { flush_within_ms } => Durability::Write {
            flush_within: Duration::from_millis(flush_within_ms),
        },
    };
    let log = AuditLog::open_with(
        dir,
        region,
        Arc::new(NodeSigner(tls)),
        Sealing {
            max_bytes: settings.seal_bytes,
            max_age: Duration::from_secs(settings.seal_after_s),
        },
        durability,
    )
    .with_context(|| format!("cannot open the audit log in {}", dir.display()))?;
    Ok(Arc::new(Audit::new(log, settings.refuse_on_failure)))
}

/// The audit directory of `region` under a node's data directory (a relative `[audit] dir`
/// is under it; an absolute one is used as it is).
pub fn dir_for(data_dir: &Path, catalog: &Catalog, region: &str) -> PathBuf {
    data_dir.join(catalog.audit.dir.replace("{region}", region))
}

/// A warning when every region of a deployment ships its audit trail to one S3 bucket:
/// each region's trail then leaves that region.
pub fn shared_store_note(catalog: &Catalog) -> Option<String> {
    let url = catalog.audit.store.as_deref()?;
    (url.starts_with("s3://") && !url.contains("{region}") && catalog.regions.len() > 1).then(|| {
        format!(
            "every region ships its audit trail to {url}; to keep each region's trail in that region, name its bucket with {{region}} (e.g. s3://acme-audit-{{region}}/crisp)"
        )
    })
}

pub async fn run(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify {
            dir,
            store,
            ca,
            deployment,
            region,
        } => {
            let pem =
                std::fs::read(&ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let verifier = crisp_transport::tls::CaVerifier::from_ca_pem(&deployment, &pem)?;
            let mut problems = 0;
            let mut local_end = None;
            if let Some(dir) = &dir {
                let report = crisp_audit::verify(dir, &verifier, &region)
                    .with_context(|| format!("cannot read {}", dir.display()))?;
                problems += print_report(&dir.display().to_string(), &report);
                if report.unsealed > 0 {
                    println!(
                        "  {} more {} in {}, not sealed yet (their receipts are checked): a digest covers them once the node seals the file ([audit] seal_bytes / seal_after_s)",
                        report.unsealed,
                        if report.unsealed == 1 {
                            "event"
                        } else {
                            "events"
                        },
                        dir.join("open.jsonl").display()
                    );
                }
                local_end = Some(report.newest.as_ref().map(|(seq, _)| *seq));
                if report.newest.is_none() && report.unsealed == 0 && report.findings.is_empty() {
                    println!(
                        "  nothing to verify: no digest, no sealed file and no event here; if this region has served requests, its trail was removed (give --store to check the shipped copy)"
                    );
                }
                if store.is_none() && report.newest.is_some() {
                    println!(
                        "  files sealed after the newest digest and deleted with it leave no gap: give --store (the region's [audit] store) to compare with the shipped copy"
                    );
                }
            }
            if let Some(url) = &store {
                let copy = tempfile::tempdir().context("cannot create a temporary directory")?;
                let (location, objects) = download_trail(url, &region, copy.path()).await?;
                let report = crisp_audit::verify(copy.path(), &verifier, &region)
                    .context("cannot read the downloaded copy")?;
                println!("{location}: {objects} objects downloaded");
                problems += print_report(&location, &report);
                let store_end = report.newest.as_ref().map(|(seq, _)| *seq);
                if let Some(local) = local_end {
                    match (local, store_end) {
                        (local, Some(shipped)) if local.is_none_or(|l| shipped > l) => {
                            let from = local.map_or(0, |l| l + 1);
                            println!(
                                "  ! digests {from} to {shipped} are in the store but not in the local trail: removed after they were shipped"
                            );
                            problems += 1;
                        }
                        (Some(local), shipped) if shipped.is_none_or(|s| s < local) => println!(
                            "  the store is behind the local trail (it ends at digest {}, the local trail at {local}): not shipped yet, see crisp_audit_backlog",
                            shipped.map_or_else(|| "none".to_owned(), |s| s.to_string())
                        ),
                        _ => println!("  the local trail and the store end at the same digest"),
                    }
                }
            }
            if problems == 0 {
                println!(
                    "OK: the chain is intact and every answer from another region has a valid receipt"
                );
                Ok(())
            } else {
                bail!("{problems} problem(s) found")
            }
        }
        AuditCommand::Lookup {
            dir,
            principal,
            event_name,
            profile,
            inference_region,
            error_code,
            since,
            until,
            json,
        } => {
            let events = crisp_audit::events(&dir)
                .with_context(|| format!("cannot read {}", dir.display()))?;
            let keep = |e: &crisp_audit::AuditEvent<'_>| {
                let d = &e.additional_event_data;
                principal
                    .as_ref()
                    .is_none_or(|p| &e.user_identity.principal_id == p)
                    && event_name.as_ref().is_none_or(|n| &e.event_name == n)
                    && profile.as_ref().is_none_or(|p| {
                        d.profile_id.as_deref() == Some(p.as_str())
                            || e.request_parameters.model_id == p.as_str()
                    })
                    && inference_region
                        .as_ref()
                        .is_none_or(|r| d.inference_region.as_deref() == Some(r.as_str()))
                    // Either dialect's code, or the kind that is the same in both.
                    && error_code.as_ref().is_none_or(|c| {
                        e.error_code.as_deref() == Some(c.as_str())
                            || d.error_kind.as_deref() == Some(c.as_str())
                    })
                    && in_window(&e.event_time, since, until)
            };
            let matched = events.iter().filter(|e| keep(e));
            if json {
                for e in matched {
                    println!("{}", serde_json::to_string(e)?);
                }
                return Ok(());
            }
            let rows: Vec<[String; 8]> = matched
                .map(|e| {
                    let d = &e.additional_event_data;
                    // A management call ran no model: it has no tokens to show.
                    let tokens = if e.management_event {
                        "-".to_owned()
                    } else {
                        format!("{}/{}", d.input_tokens, d.output_tokens)
                    };
                    [
                        e.event_time.to_string(),
                        e.request_id.to_string(),
                        e.event_name.to_string(),
                        e.user_identity.principal_id.to_string(),
                        e.request_parameters.model_id.to_string(),
                        d.inference_region.as_deref().unwrap_or("-").to_owned(),
                        tokens,
                        e.error_code.as_deref().unwrap_or("ok").to_owned(),
                    ]
                })
                .collect();
            if !rows.is_empty() {
                print_table(
                    [
                        ("TIME", Align::Left),
                        ("REQUEST", Align::Left),
                        ("CALL", Align::Left),
                        ("PRINCIPAL", Align::Left),
                        ("PROFILE", Align::Left),
                        ("RAN IN", Align::Left),
                        ("TOKENS I/O", Align::Right),
                        ("RESULT", Align::Left),
                    ],
                    &rows,
                );
            }
            Ok(())
        }
    }
}

/// How a table column's cells line up: text to the left, numbers to the right.
#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

/// Columns as wide as their widest cell, so long IDs and ARNs do not push the rest out
/// of line.
fn print_table<const N: usize>(columns: [(&str, Align); N], rows: &[[String; N]]) {
    let heading = columns.map(|(h, _)| h);
    let mut widths = heading.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for ((cell, w), (_, align)) in cells.iter().zip(widths).zip(columns) {
            match align {
                Align::Left => out.push_str(&format!("{cell:<w$} ")),
                Align::Right => out.push_str(&format!("{cell:>w$} ")),
            }
        }
        println!("{}", out.trim_end());
    };
    line(heading);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
}

/// How `crisp usage` groups.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GroupBy {
    /// The principal that called.
    Principal,
    /// The application inference profile called through.
    Application,
    /// Each tag (key=value) of that application profile.
    Tag,
    /// The profile or model called.
    Profile,
    /// The region that ran the model.
    InferenceRegion,
}

impl GroupBy {
    /// The usage table's first column heading.
    fn heading(self) -> &'static str {
        match self {
            GroupBy::Principal => "principal",
            GroupBy::Application => "application profile",
            GroupBy::Tag => "tag",
            GroupBy::Profile => "profile",
            GroupBy::InferenceRegion => "inference region",
        }
    }
}

/// Prints what verification of one copy of a trail found; returns how many problems.
fn print_report(name: &str, report: &crisp_audit::Report) -> usize {
    println!(
        "{name}: {}, {}, {} checked",
        crate::cli::count(report.files, "sealed file", "sealed files"),
        crate::cli::count(report.events, "event", "events"),
        crate::cli::count(report.receipts, "receipt", "receipts"),
    );
    if let Some((sequence, sealed_at)) = &report.newest {
        println!(
            "  the chain ends at digest {sequence}, sealed {}",
            sealed_at.as_deref().unwrap_or("at an unrecorded time")
        );
    }
    for (file, why) in &report.hashed_as_found {
        println!(
            "  note: {file} was sealed as it was found ({why}): its digest covers it from then on, not what happened to it before"
        );
    }
    for (file, what) in &report.restored {
        println!(
            "  note: {file}: {what}; its digest signs what the node appended, so nothing was lost, but find out who removed it"
        );
    }
    for f in &report.findings {
        println!("  ! {f}");
    }
    report.findings.len()
}

/// Downloads the sealed files and digests of `region`'s trail from its object store into
/// `into`, laid out like the node's audit directory; returns where they were and how many.
async fn download_trail(url: &str, region: &str, into: &Path) -> anyhow::Result<(String, usize)> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let shipper = crisp_node::audit::Shipper::from_url(into, url, region)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let location = format!(
        "{}/{}",
        url.replace("{region}", region).trim_end_matches('/'),
        region
    );
    let prefix = object_store::path::Path::from(shipper.prefix.as_str());
    let listed: Vec<_> = shipper
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .with_context(|| format!("cannot list {location}"))?;
    std::fs::create_dir_all(into.join("digests"))?;
    let mut objects = 0;
    for meta in listed {
        let key = meta.location.as_ref();
        let Some(name) = key
            .strip_prefix(shipper.prefix.as_str())
            .map(|n| n.trim_start_matches('/'))
        else {
            continue;
        };
        let wanted = (name.starts_with("audit-") && name.ends_with(".jsonl"))
            || (name.starts_with("digests/digest-") && !name[8..].contains('/'));
        if !wanted {
            continue;
        }
        let object = shipper
            .store
            .get(&meta.location)
            .await
            .with_context(|| format!("cannot read {key}"))?;
        let bytes = object
            .bytes()
            .await
            .with_context(|| format!("cannot read {key}"))?;
        std::fs::write(into.join(name), &bytes)?;
        objects += 1;
    }
    // A file is shipped before its digest: one whose digest is not there yet is pending,
    // not inserted.
    for entry in std::fs::read_dir(into)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(seq) = name
            .strip_prefix("audit-")
            .and_then(|n| n.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if !into.join(format!("digests/digest-{seq}.json")).exists() {
            std::fs::remove_file(into.join(&name))?;
            objects -= 1;
        }
    }
    Ok((location, objects))
}

/// An RFC 3339 time from the command line, with what to write when it is not one.
pub fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).map_err(|e| {
        format!("{s:?} is not an RFC 3339 time ({e}); write it like 2026-11-28T10:00:00Z")
    })
}

/// Whether an event's time is inside [since, until], compared as instants (an event whose
/// time cannot be read is outside any window).
fn in_window(
    event_time: &str,
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
) -> bool {
    if since.is_none() && until.is_none() {
        return true;
    }
    let Ok(t) = parse_time(event_time) else {
        return false;
    };
    since.is_none_or(|s| t >= s) && until.is_none_or(|u| t <= u)
}

/// `crisp usage`: tokens and cost from audit trails.
pub fn usage(
    dirs: &[PathBuf],
    by: GroupBy,
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
    json: bool,
) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    #[derive(Default)]
    struct Row {
        requests: u64,
        input_tokens: u64,
        output_tokens: u64,
        cost_usd: f64,
    }
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    // Every event has its own ID: one seen again (a directory given twice, a trail and its
    // copy) is counted once.
    let mut seen = std::collections::HashSet::new();
    let mut repeated = 0usize;
    for dir in dirs {
        let events =
            crisp_audit::events(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for e in events {
            if !seen.insert(e.event_id.clone()) {
                repeated += 1;
                continue;
            }
            // Answers that ended early count with what they delivered; management calls
            // ran no model.
            let counts =
                !e.management_event && (e.error_code.is_none() || e.additional_event_data.partial);
            if !counts || !in_window(&e.event_time, since, until) {
                continue;
            }
            let d = &e.additional_event_data;
            let keys: Vec<String> = match by {
                GroupBy::Principal => vec![e.user_identity.principal_id.to_string()],
                GroupBy::Application => {
                    vec![d.application_profile.as_deref().unwrap_or("-").to_owned()]
                }
                GroupBy::Tag => {
                    if d.tags.is_empty() {
                        vec!["-".into()]
                    } else {
                        d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect()
                    }
                }
                GroupBy::Profile => vec![
                    d.profile_id
                        .as_deref()
                        .unwrap_or(&e.request_parameters.model_id)
                        .to_owned(),
                ],
                GroupBy::InferenceRegion => {
                    vec![d.inference_region.as_deref().unwrap_or("-").to_owned()]
                }
            };
            for k in keys {
                let r = rows.entry(k).or_default();
                r.requests += 1;
                r.input_tokens += u64::from(d.input_tokens);
                r.output_tokens += u64::from(d.output_tokens);
                r.cost_usd += d.cost_usd;
            }
        }
    }
    if json {
        for (k, r) in &rows {
            println!(
                "{}",
                serde_json::json!({"key": k, "requests": r.requests, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens, "cost_usd": r.cost_usd})
            );
        }
    } else {
        let cells: Vec<[String; 5]> = rows
            .iter()
            .map(|(k, r)| {
                [
                    k.to_string(),
                    r.requests.to_string(),
                    r.input_tokens.to_string(),
                    r.output_tokens.to_string(),
                    format!("{:.6}", r.cost_usd),
                ]
            })
            .collect();
        print_table(
            [
                (by.heading(), Align::Left),
                ("requests", Align::Right),
                ("input tok", Align::Right),
                ("output tok", Align::Right),
                ("cost USD", Align::Right),
            ],
            &cells,
        );
    }
    if repeated > 0 {
        eprintln!(
            "note: {} found more than once (the same trail given twice, or a trail and its copy) counted once",
            crate::cli::count(repeated, "event", "events")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn with_store(store: &str) -> Catalog {
        let text = include_str!("../../../deploy/examples/crisp.toml")
            .replace("s3://acme-crisp-audit-{region}/crisp", store);
        crisp_catalog::parse_config(&text).unwrap()
    }

    #[test]
    fn one_bucket_for_every_region_is_pointed_out() {
        let note = shared_store_note(&with_store("s3://acme-audit/crisp")).unwrap();
        assert!(note.contains("s3://acme-audit/crisp") && note.contains("{region}"));
        assert_eq!(
            shared_store_note(&with_store("s3://acme-audit-{region}/crisp")),
            None
        );
        assert_eq!(shared_store_note(&with_store("file:///var/audit")), None);
    }
}
