//! `crisp serve` as an operator runs it: certificates from `crisp certs`, a configuration
//! reloaded on SIGHUP and on the admin endpoint, validated before it replaces anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, out)
}

fn chat(port: u16, model: &str) -> u16 {
    http(
        port,
        "POST",
        "/v1/chat/completions",
        &format!(r#"{{"model": "{model}", "max_tokens": 2, "messages": [{{"role": "user", "content": "hi"}}]}}"#),
    )
    .0
}

fn config(client: u16, peer: u16, admin: u16, extra_model: bool) -> String {
    let mut s = format!(
        r#"version = 1
[deployment]
name = "solo"
[[geography]]
name = "eu"
tags = ["eu"]
[[region]]
code = "eu-west-1"
country = "IE"
lat = 53.3
lon = -6.3
tags = ["eu"]
client = "127.0.0.1:{client}"
peer = "127.0.0.1:{peer}"
admin = "127.0.0.1:{admin}"
[[model]]
id = "m1"
input_price_per_1k = 0.001
output_price_per_1k = 0.002
[[model.backend]]
region = "eu-west-1"
kind = "simulated"
time_scale = 0.01
"#
    );
    if extra_model {
        s.push_str("[[model]]\nid = \"m2\"\ninput_price_per_1k = 0.001\noutput_price_per_1k = 0.002\n[[model.backend]]\nregion = \"eu-west-1\"\nkind = \"simulated\"\ntime_scale = 0.01\n");
    }
    s
}

struct Node(Child);
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn crisp(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crisp"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `crisp audit verify` of eu-west-1's trail in `d/audit`.
fn verify_trail(d: &Path) -> std::process::Output {
    crisp(
        &[
            "audit",
            "verify",
            "--dir",
            "audit/eu-west-1",
            "--ca",
            "certs/ca.pem",
            "--deployment",
            "solo",
            "--region",
            "eu-west-1",
        ],
        d,
    )
}

/// A deployment CA and eu-west-1's certificate in `d/certs`.
fn issue_certs(d: &Path) {
    for args in [
        &["certs", "init", "--deployment", "solo", "--dir", "certs"][..],
        &[
            "certs",
            "issue",
            "--deployment",
            "solo",
            "--region",
            "eu-west-1",
            "--dir",
            "certs",
        ][..],
    ] {
        assert!(crisp(args, d).status.success());
    }
}

/// `crisp serve` of eu-west-1 in `d`, once it accepts connections.
fn serve(d: &Path, client: u16, env: &[(&str, String)]) -> Node {
    let child = Command::new(env!("CARGO_BIN_EXE_crisp"))
        .args(["serve", "--config", "crisp.toml", "--region", "eu-west-1"])
        .current_dir(d)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("the node serves", || {
        TcpStream::connect(("127.0.0.1", client)).is_ok()
    });
    Node(child)
}

const LONG_STORY: &str = r#"{"model": "eu.m1", "stream": true, "max_tokens": 4000, "messages": [{"role": "user", "content": "a long story"}]}"#;

/// Sends a chat completion request on a kept-alive connection.
fn post_chat(s: &mut TcpStream, body: &str) {
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
}

/// A streamed answer that runs for minutes (on the slow model), once its head arrived.
fn long_stream(client: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", client)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    post_chat(&mut s, LONG_STORY);
    let mut first = [0u8; 512];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    s
}

/// Sends the node's process a signal (`-TERM`, `-HUP`).
fn signal(node: &Node, which: &str) {
    let pid = node.0.id().to_string();
    assert!(
        Command::new("kill")
            .args([which, &pid])
            .status()
            .unwrap()
            .success()
    );
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_configuration_reloads_on_sighup_and_on_the_admin_endpoint_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let key = std::fs::metadata(d.join("certs/eu-west-1.key")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key.permissions().mode() & 0o777, 0o600, "keys are private");
    }
    let node = serve(d, client, &[]);
    assert_eq!(chat(client, "eu.m1"), 200);
    assert_eq!(chat(client, "m2"), 404);

    // A new model, picked up on SIGHUP without a restart.
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, true)).unwrap();
    assert!(
        crisp(&["profiles", "lock", "--config", "crisp.toml"], d)
            .status
            .success()
    );
    signal(&node, "-HUP");
    eventually("m2 is served", || chat(client, "m2") == 200);
    assert_eq!(chat(client, "eu.m2"), 200, "the newly locked profile too");

    // A broken configuration is refused and the node keeps serving what it had.
    std::fs::write(
        d.join("crisp.toml"),
        "version = 1\n[deployment]\nname = \"solo\"\nbogus = 1\n",
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 422, "a refused configuration is an error: {body}");
    assert!(
        body.contains(r#""configuration":{"status":"refused","error":"#) && body.contains("bogus"),
        "the answer says what was refused and why: {body}"
    );
    assert_eq!(chat(client, "m2"), 200);
    assert_eq!(chat(client, "eu.m1"), 200);
    assert_eq!(http(admin, "GET", "/readyz", "").0, 200);

    // Reloads, with a changed configuration and with the same one, keep one writer on the
    // audit trail: it still verifies, with every call in it.
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    let (status, body) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#""configuration":{"status":"reloaded"}"#),
        "{body}"
    );
    eventually("the new node serves", || chat(client, "m2") == 404);
    assert_eq!(chat(client, "eu.m1"), 200);
    let (status, body) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#""configuration":{"status":"unchanged"}"#),
        "{body}"
    );
    assert_eq!(chat(client, "eu.m1"), 200);
    // What a running node cannot change is said in the answer.
    std::fs::write(
        d.join("crisp.toml"),
        config(client, peer, admin, false)
            + "[audit]
seal_after_s = 60
",
    )
    .unwrap();
    let (status, body) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("apply when the node restarts"), "{body}");
    assert_eq!(chat(client, "eu.m1"), 200);
    drop(node);
    let out = verify_trail(d);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    let events = crisp_audit::events(&d.join("audit/eu-west-1")).unwrap();
    // eu.m1 five times, m2 at least twice, eu.m2 once (m2 was polled until served).
    assert!(events.len() >= 8, "{report}");
    let last_two = &events[events.len() - 2..];
    assert!(
        last_two
            .iter()
            .all(|e| e.request_parameters.model_id == "eu.m1" && e.error_code.is_none()),
        "the calls after the reloads are recorded: {report}"
    );
}

/// Every request a client saw complete has its audit event after `kill -9` and restart.
#[test]
fn no_completed_request_is_missing_from_the_audit_trail_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let start = || serve(d, client, &[]);
    let node = start();
    // Four clients in parallel; each remembers the request IDs it saw complete.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut done = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(("127.0.0.1", client)) else { break };
                    let body = r#"{"model": "eu.m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    if write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).is_err() {
                        break;
                    }
                    let mut out = String::new();
                    if s.read_to_string(&mut out).is_err() {
                        break;
                    }
                    // Complete = a 200 with the whole JSON body.
                    if out.starts_with("HTTP/1.1 200")
                        && out.trim_end().ends_with('}')
                        && let Some(id) = out
                            .lines()
                            .find_map(|l| l.strip_prefix("x-crisp-request-id: "))
                    {
                        done.push(id.trim().to_owned());
                    }
                }
                done
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let pid = node.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let completed: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    drop(node);
    assert!(completed.len() > 20, "the load ran: {}", completed.len());
    // Restart: the node seals what the crash left open and carries on.
    let _node = start();
    let events = crisp_audit::events(&d.join("audit/eu-west-1")).unwrap();
    let audited: std::collections::HashSet<&str> = events.iter().map(|e| &*e.request_id).collect();
    let missing: Vec<&String> = completed
        .iter()
        .filter(|id| !audited.contains(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed requests have no audit event: {missing:?}",
        missing.len(),
        completed.len()
    );
    for e in events
        .iter()
        .filter(|e| completed.iter().any(|id| *id == e.request_id))
    {
        assert_eq!(
            e.additional_event_data.inference_region.as_deref(),
            Some("eu-west-1")
        );
        assert!(
            e.additional_event_data.receipt.is_none(),
            "work done in the source region is attested by the signed digest, not a receipt"
        );
    }
    // And the trail verifies, saying that the file the crash left was sealed as found.
    let out = verify_trail(d);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("note: audit-0000000000.jsonl was sealed as it was found (left unsealed by a node that stopped without sealing it"),
        "{report}"
    );
    // Events not sealed yet are counted, not passed over in silence.
    let open = std::fs::read_to_string(d.join("audit/eu-west-1/open.jsonl")).unwrap_or_default();
    let unsealed = open.lines().filter(|l| !l.is_empty()).count();
    if unsealed > 0 {
        assert!(
            report.contains(&format!("{unsealed} more event")) && report.contains("not sealed yet"),
            "{report}"
        );
    }
}

/// Cost per principal and per application tag, from the audit trail.
#[test]
fn usage_reports_tokens_and_cost_from_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let _node = serve(d, client, &[]);
    for model in ["eu.m1", "eu.m1", "m1"] {
        assert_eq!(chat(client, model), 200);
    }
    assert_eq!(chat(client, "nope"), 404);
    let out = crisp(
        &[
            "usage",
            "--dir",
            "audit/eu-west-1",
            "--by",
            "profile",
            "--json",
        ],
        d,
    );
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let eu = rows.iter().find(|r| r["key"] == "eu.m1").unwrap();
    assert_eq!(eu["requests"], 2);
    let cost = eu["cost_usd"].as_f64().unwrap();
    let (inp, outp) = (
        eu["input_tokens"].as_f64().unwrap(),
        eu["output_tokens"].as_f64().unwrap(),
    );
    assert!(
        (cost - (inp * 0.001 + outp * 0.002) / 1000.0).abs() < 1e-12,
        "priced at the configured rates"
    );
    assert_eq!(
        rows.iter().find(|r| r["key"] == "m1").unwrap()["requests"],
        1
    );
    assert!(
        rows.iter().all(|r| r["key"] != "nope"),
        "failed calls cost nothing"
    );
    // A trail given twice is counted once, and the report says so.
    let twice = crisp(
        &[
            "usage",
            "--dir",
            "audit/eu-west-1",
            "--dir",
            "audit/eu-west-1",
            "--by",
            "profile",
            "--json",
        ],
        d,
    );
    assert_eq!(twice.stdout, out.stdout);
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("4 events found more than once"),
        "{}",
        String::from_utf8_lossy(&twice.stderr)
    );
    // Time windows compare instants, whatever the offset they are written in.
    let requests_since = |since: &str| -> u64 {
        let out = crisp(
            &[
                "usage",
                "--dir",
                "audit/eu-west-1",
                "--by",
                "profile",
                "--json",
                "--since",
                since,
            ],
            d,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["requests"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    };
    let hour_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let in_paris = hour_ago
        .to_offset(time::UtcOffset::from_hms(1, 0, 0).unwrap())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(requests_since(&in_paris), 3, "{in_paris}");
    assert_eq!(requests_since("2999-01-01T00:00:00Z"), 0);
    // The table names what it groups by, as the option is spelt in words.
    let out = crisp(
        &[
            "usage",
            "--dir",
            "audit/eu-west-1",
            "--by",
            "inference-region",
        ],
        d,
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("inference region "), "{table}");
    assert!(table.contains("eu-west-1 "), "{table}");
    let out = crisp(
        &["usage", "--dir", "audit/eu-west-1", "--since", "yesterday"],
        d,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("write it like 2026-11-28T10:00:00Z"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s3s_fs() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var_os("CRISP_S3S_FS").map(std::path::PathBuf::from),
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo/bin/s3s-fs")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "s3s-fs is not installed: scripts/test.sh installs it (cargo install s3s-fs@0.14.1 --features binary --locked)"
        );
        eprintln!("skipping: s3s-fs is not installed");
    }
    found
}

fn start_s3(bin: &Path, port: u16, data: &Path) -> Node {
    let child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "crisp",
            "--secret-key",
            "crisp-secret",
        ])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually("s3s-fs listens", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Node(child)
}

/// The invocation log records under `dir` (gzip JSON lines, searched recursively).
fn invocation_records(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(invocation_records(&p));
        } else if p.to_string_lossy().ends_with(".json.gz") {
            let mut text = String::new();
            flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap())
                .read_to_string(&mut text)
                .unwrap();
            out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
        }
    }
    out
}

/// Every path under `dir`, recursively, sorted.
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(tree(&p));
        }
        out.push(p);
    }
    out.sort();
    out
}

/// Sealed audit files, digests and invocation logs reach a real S3-compatible store (one
/// bucket per region, named from `{region}`), and a store outage only delays them: nothing
/// is lost. The node writes only in its data directory, never next to its configuration.
#[test]
fn audit_files_reach_the_object_store_and_survive_an_outage() {
    let Some(bin) = s3s_fs() else { return };
    let (conf, state, store) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (d, data) = (conf.path(), store.path());
    let state = state.path().join("node");
    std::fs::create_dir_all(data.join("audit-eu-west-1")).unwrap();
    std::fs::create_dir_all(data.join("logs-bucket")).unwrap();
    let s3_port = port();
    let mut s3 = Some(start_s3(&bin, s3_port, data));
    let (client, peer, admin) = (port(), port(), port());
    let cfg = config(client, peer, admin, false)
        + "[audit]\nseal_bytes = 1\nstore = \"s3://audit-{region}/crisp\"\n"
        + "[[invocation_log]]\nregion = \"eu-west-1\"\nstore = \"s3://logs-bucket/crisp\"\n";
    std::fs::write(d.join("crisp.toml"), cfg).unwrap();
    issue_certs(d);
    assert!(
        crisp(&["profiles", "lock", "--config", "crisp.toml"], d)
            .status
            .success()
    );
    let configured = tree(d);
    let _node = serve(
        d,
        client,
        &[
            ("CRISP_DATA_DIR", state.display().to_string()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{s3_port}")),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "crisp".into()),
            ("AWS_SECRET_ACCESS_KEY", "crisp-secret".into()),
            ("AWS_REGION", "us-east-1".into()),
        ],
    );
    let shipped = |n: usize| {
        let dir = data.join("audit-eu-west-1/crisp/eu-west-1");
        let files = std::fs::read_dir(&dir)
            .map(|r| {
                r.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("audit-"))
                    .count()
            })
            .unwrap_or(0);
        files >= n
    };
    for _ in 0..3 {
        assert_eq!(chat(client, "eu.m1"), 200);
    }
    let logged = || invocation_records(&data.join("logs-bucket"));
    let waiting = || invocation_records(&state.join("invocations/eu-west-1/ready"));
    eventually("three sealed files shipped", || shipped(3));
    eventually("three invocation records shipped", || logged().len() == 3);
    eventually("the third digest shipped", || {
        data.join("audit-eu-west-1/crisp/eu-west-1/digests/digest-0000000002.json")
            .exists()
    });

    // The store goes away; requests go on; the backlog shows on /metrics.
    drop(s3.take());
    for _ in 0..3 {
        assert_eq!(chat(client, "eu.m1"), 200);
    }
    eventually("the backlog is visible", || {
        let (_, m) = http(admin, "GET", "/metrics", "");
        m.lines()
            .any(|l| l.starts_with("crisp_audit_backlog ") && !l.ends_with(" 0"))
    });
    eventually("the invocation records wait on the node's disk", || {
        waiting().len() == 3
    });
    assert_eq!(logged().len(), 3);
    // It comes back; everything arrives.
    s3 = Some(start_s3(&bin, s3_port, data));
    eventually("all six sealed files shipped", || shipped(6));
    eventually("all six invocation records shipped", || {
        logged().len() == 6 && waiting().is_empty()
    });
    let records = logged();
    assert!(
        records
            .iter()
            .all(|r| r["region"] == "eu-west-1" && r["modelId"] == "eu.m1"),
        "{records:?}"
    );
    let local = std::fs::read_dir(state.join("audit/eu-west-1"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit-"))
        .count();
    assert!(shipped(local), "every sealed local file is in the store");
    eventually("the last digest shipped", || {
        data.join(format!(
            "audit-eu-west-1/crisp/eu-west-1/digests/digest-{:010}.json",
            local - 1
        ))
        .exists()
    });

    // The auditor checks the local trail against the shipped copy.
    let s3_env = [
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{s3_port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "crisp".into()),
        ("AWS_SECRET_ACCESS_KEY", "crisp-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
    ];
    let trail = state.join("audit/eu-west-1");
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_crisp"))
            .args(["audit", "verify", "--dir"])
            .arg(&trail)
            .args([
                "--store",
                "s3://audit-{region}/crisp",
                "--ca",
                "certs/ca.pem",
                "--deployment",
                "solo",
                "--region",
                "eu-west-1",
            ])
            .envs(s3_env.iter().map(|(k, v)| (k, v)))
            .current_dir(d)
            .output()
            .unwrap()
    };
    let out = verify();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!("{} sealed files", local))
            && report.contains("end at the same digest"),
        "{report}"
    );
    // The newest sealed file and its digest deleted locally: the chain alone still holds,
    // the shipped copy shows what is missing.
    let newest = local - 1;
    std::fs::remove_file(trail.join(format!("audit-{newest:010}.jsonl"))).unwrap();
    std::fs::remove_file(trail.join(format!("digests/digest-{newest:010}.json"))).unwrap();
    let out = verify();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(
        report.contains(&format!(
            "digests {newest} to {newest} are in the store but not in the local trail"
        )),
        "{report}"
    );
    assert!(state.join("application-profiles").is_dir());
    assert_eq!(
        tree(d),
        configured,
        "the node wrote next to its configuration"
    );
    drop(s3);
}

/// A client that leaves in the middle of a streamed answer still leaves an event: the
/// model ran, and the trail says where.
#[test]
fn a_client_that_leaves_mid_answer_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let _node = serve(d, client, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", client)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    post_chat(&mut s, LONG_STORY);
    // Some of the answer arrives, then the client leaves.
    let mut seen = Vec::new();
    while seen.windows(5).filter(|w| w == b"data:").count() < 4 {
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the answer ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(s);
    let trail = d.join("audit/eu-west-1");
    eventually("the abandoned call is in the trail", || {
        crisp_audit::events(&trail).is_ok_and(|events| {
            events.iter().any(|e| {
                e.error_code.as_deref() == Some("ClientDisconnected")
                    && e.additional_event_data.error_kind.as_deref() == Some("client_disconnected")
                    && e.additional_event_data.inference_region.as_deref() == Some("eu-west-1")
                    && e.additional_event_data.partial
                    && e.additional_event_data.output_tokens > 0
                    // The prompt was processed: its 3 tokens and 4 for the message.
                    && e.additional_event_data.input_tokens == 7
            })
        })
    });
}

/// SIGTERM drains: the admin listener says 503 on `/readyz` while open answers run on, new
/// connections are refused, and an answer still streaming when the grace period ends gets
/// an error event saying to send it again, and is audited, before the process exits.
#[test]
fn a_stopping_node_says_so_and_ends_what_outlives_its_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    // A model that streams slowly: 20 tokens a second.
    let slow = config(client, peer, admin, false).replace(
        "time_scale = 0.01\n",
        "decode_tokens_per_s = 20.0\nmax_tokens = 4000\n",
    );
    std::fs::write(d.join("crisp.toml"), slow).unwrap();
    issue_certs(d);
    let node = serve(d, client, &[("CRISP_DRAIN_GRACE_S", "2".into())]);
    assert_eq!(http(admin, "GET", "/readyz", "").0, 200);
    let mut s = long_stream(client);

    signal(&node, "-TERM");
    eventually("readyz says the node is draining", || {
        http(admin, "GET", "/readyz", "").0 == 503
    });
    let asked = Instant::now();
    let (status, body) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 503, "a draining node reloads nothing: {body}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "and says so at once"
    );
    eventually("a draining node accepts no new client", || {
        TcpStream::connect(("127.0.0.1", client)).is_err()
    });
    // The answer runs on, then ends with an error event instead of a cut connection.
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    let tail = &rest[rest.len().saturating_sub(600)..];
    assert!(
        tail.contains("stream_interrupted") && tail.contains("send the request again"),
        "{tail}"
    );
    let mut node = node;
    let status = node.0.wait().unwrap();
    assert!(status.success(), "{status}");
    let events = crisp_audit::events(&d.join("audit/eu-west-1")).unwrap();
    assert!(
        events.iter().any(|e| {
            let d = &e.additional_event_data;
            e.error_code.as_deref() == Some("stream_interrupted")
                && d.error_kind.is_some()
                && d.inference_region.as_deref() == Some("eu-west-1")
                // What it delivered in 2 s at 20 tokens a second counts.
                && d.partial
                && d.input_tokens == 7
                && (20..=80).contains(&d.output_tokens)
                && d.cost_usd > 0.0
        }),
        "the cut answer is in the trail with what it delivered: {events:?}"
    );
    // A node that stops seals what it wrote: nothing is left open to be sealed later as
    // it is found then.
    let open = std::fs::read(d.join("audit/eu-west-1/open.jsonl")).unwrap_or_default();
    assert!(open.is_empty(), "{}", String::from_utf8_lossy(&open));
    let out = verify_trail(d);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("note:"), "{report}");
}

/// Reloads that replace the node hand its sockets over: clients connecting all the while
/// are all answered, none refused or reset.
#[test]
fn a_reload_loses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let _node = serve(d, client, &[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut answered, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let once = || -> std::io::Result<String> {
                        let mut s = TcpStream::connect(("127.0.0.1", client))?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        let body = r#"{"model": "eu.m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#;
                        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())?;
                        let mut out = String::new();
                        s.read_to_string(&mut out)?;
                        Ok(out)
                    };
                    match once() {
                        Ok(out) if out.starts_with("HTTP/1.1 200") => answered += 1,
                        Ok(out) => failed.push(out.lines().next().unwrap_or("").to_owned()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (answered, failed)
            })
        })
        .collect();
    for i in 0..6 {
        std::fs::write(
            d.join("crisp.toml"),
            config(client, peer, admin, i % 2 == 0),
        )
        .unwrap();
        let (status, body) = http(admin, "POST", "/admin/reload", "");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(r#""configuration":{"status":"reloaded"}"#),
            "{body}"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for c in clients {
        let (a, failed) = c.join().unwrap();
        assert!(failed.is_empty(), "{failed:?}");
        answered += a;
    }
    assert!(answered > 20, "{answered}");
}

/// An answer still running on a node that a reload replaced ends like one on the current
/// node when the process stops: with the error event, not a reset connection.
#[test]
fn a_stop_during_a_reloads_drain_ends_the_old_nodes_answers_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    let slow = |extra| {
        config(client, peer, admin, extra).replace(
            "time_scale = 0.01\n",
            "decode_tokens_per_s = 20.0\nmax_tokens = 4000\n",
        )
    };
    std::fs::write(d.join("crisp.toml"), slow(false)).unwrap();
    issue_certs(d);
    let mut node = serve(d, client, &[("CRISP_DRAIN_GRACE_S", "3".into())]);
    let mut s = long_stream(client);
    // The stream's node is replaced: it drains, with 3 s of grace, and the process is
    // told to stop at once (before, it exited and reset the old node's answers).
    std::fs::write(d.join("crisp.toml"), slow(true)).unwrap();
    let (status, reply) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{reply}");
    signal(&node, "-TERM");
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest);
    let tail = &rest[rest.len().saturating_sub(600)..];
    assert!(
        tail.contains("stream_interrupted") && tail.contains("send the request again"),
        "{tail}"
    );
    assert!(node.0.wait().unwrap().success());
}

/// Nodes do not share sockets: a second node on a socket the first listens on (here the
/// same region from another data directory; in the field, another region's node whose
/// address is written differently) is refused, instead of splitting the clients.
#[test]
fn a_second_node_on_a_listening_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let _first = serve(d, client, &[]);
    let other = d.join("elsewhere");
    let out = Command::new(env!("CARGO_BIN_EXE_crisp"))
        .args([
            "serve",
            "--config",
            "crisp.toml",
            "--region",
            "eu-west-1",
            "--data-dir",
        ])
        .arg(&other)
        .current_dir(d)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("cannot listen on 127.0.0.1:") && err.contains("another process"),
        "{err}"
    );
    assert_eq!(chat(client, "eu.m1"), 200, "the first node serves on");
}

/// One request and its answer on a kept-alive connection, read by its Content-Length.
fn keep_alive_chat(s: &mut TcpStream) -> String {
    post_chat(
        s,
        r#"{"model": "eu.m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#,
    );
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "closed: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    head
}

/// A client that keeps its connection alive and sends its next request just as the node
/// is replaced gets its answer (with `connection: close`), not a reset.
#[test]
fn a_kept_alive_connection_gets_its_next_answer_across_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let _node = serve(d, client, &[]);
    let mut s = TcpStream::connect(("127.0.0.1", client)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(keep_alive_chat(&mut s).starts_with("HTTP/1.1 200"));
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, true)).unwrap();
    let (status, body) = http(admin, "POST", "/admin/reload", "");
    assert_eq!(status, 200, "{body}");
    let head = keep_alive_chat(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Three consecutive free ports, for a deployment whose ports keep their distances.
fn port_block() -> u16 {
    loop {
        let first = port();
        if first < u16::MAX - 2
            && (1..3).all(|i| TcpListener::bind(("127.0.0.1", first + i)).is_ok())
        {
            return first;
        }
    }
}

#[test]
fn crisp_up_runs_a_given_configuration_where_told_and_offers_no_demo_credentials() {
    let d = tempfile::tempdir().unwrap();
    // Ports 9, 10 and 11 are where the file puts them; --port moves them all.
    std::fs::write(d.path().join("crisp.toml"), config(9, 10, 11, false)).unwrap();
    let base = port_block();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crisp"))
        .args(["up", "--config", "crisp.toml", "--port", &base.to_string()])
        .current_dir(d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let node = Node(child);
    let banner = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut text = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("Ctrl-C stops every node");
            text.push_str(&line);
            text.push('\n');
            if done {
                break;
            }
        }
        text
    })
    .join()
    .unwrap();
    assert!(
        banner.contains(&format!("http://127.0.0.1:{base}")),
        "{banner}"
    );
    assert!(banner.contains(&format!(":{}", base + 1)), "{banner}");
    assert!(
        banner.contains(&format!("http://127.0.0.1:{}/metrics", base + 2)),
        "{banner}"
    );
    assert!(banner.contains("access control: none"), "{banner}");
    assert!(!banner.contains("crisp-demo"), "{banner}");
    assert!(!banner.contains("AKIA"), "{banner}");
    assert!(banner.contains(r#""model": "eu.m1""#), "{banner}");
    assert_eq!(chat(base, "eu.m1"), 200);
    let (status, metrics) = http(base + 2, "GET", "/metrics", "");
    assert_eq!(status, 200, "{metrics}");
    drop(node);
    // The trail `crisp up` keeps for a person to inspect, once this test is done with it.
    if let Some(trails) = banner
        .lines()
        .find_map(|l| l.strip_prefix("audit trails: "))
        .and_then(|t| t.strip_suffix("/<region>"))
        .filter(|t| t.contains("crisp-up-audit-"))
    {
        let _ = std::fs::remove_dir_all(trails);
    }
}

/// A small tmpfs mounted on a directory, unmounted when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` where this process may not mount (not root); CI runs as root and must.
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok || std::env::var_os("CI").is_none(),
            "CI runs as root: mounting a tmpfs must work there"
        );
        ok.then(|| SmallDisk(at.to_owned()))
    }

    /// Writes a file until the disk is full.
    fn fill(&self) -> std::path::PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![b'x'; 4096];
        while f.write_all(&block).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_audit_disk_stops_answers_until_there_is_room_and_loses_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let Some(disk) = SmallDisk::mount(&d.join("audit"), "1m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let (client, peer, admin) = (port(), port(), port());
    std::fs::write(d.join("crisp.toml"), config(client, peer, admin, false)).unwrap();
    issue_certs(d);
    let node = serve(d, client, &[]);
    let ask = || {
        http(
            client,
            "POST",
            "/v1/chat/completions",
            r#"{"model": "eu.m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#,
        )
    };
    let request_id = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("x-crisp-request-id: "))
            .unwrap()
            .trim()
            .to_owned()
    };
    let mut answered = Vec::new();
    let (status, out) = ask();
    assert_eq!(status, 200, "{out}");
    answered.push(request_id(&out));
    // The disk fills. What still fits in the log's last page is recorded and answered;
    // then nothing is answered that the trail could not record, and the caller is told
    // why and that a retry later may work.
    let filler = disk.fill();
    let mut refused = 0;
    for _ in 0..100 {
        let (status, out) = ask();
        match status {
            200 if refused == 0 => answered.push(request_id(&out)),
            503 => {
                assert!(out.contains("audit_unavailable"), "{out}");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            _ => panic!("{out}"),
        }
    }
    assert_eq!(refused, 3, "a full disk never stopped answers");
    let (_, metrics) = http(admin, "GET", "/metrics", "");
    assert!(metrics.contains("crisp_audit_failures_total"), "{metrics}");
    // Room again: the node answers without a restart.
    std::fs::remove_file(filler).unwrap();
    eventually("answers resume", || {
        http(
            client,
            "POST",
            "/v1/chat/completions",
            r#"{"model": "eu.m1", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}"#,
        )
        .0 == 200
    });
    let (status, out) = ask();
    assert_eq!(status, 200, "{out}");
    answered.push(request_id(&out));
    // Stopped, its trail holds every answered request and verifies.
    signal(&node, "-TERM");
    eventually("the node stops", || {
        TcpStream::connect(("127.0.0.1", client)).is_err()
    });
    let events = crisp_audit::events(&d.join("audit/eu-west-1")).unwrap();
    for id in &answered {
        assert!(
            events.iter().any(|e| &e.request_id == id),
            "answered request {id} is not in the trail"
        );
    }
    let out = verify_trail(d);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(node);
}
