//! `crisp sim` (the fleet simulator) and `crisp bench` (a scenario replayed, scaled down,
//! against real nodes, next to what the simulator predicts for the same run).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use crisp_sim::report::{self, RunCost};
use crisp_sim::workload::Workload;
use crisp_sim::{Outcome, Scenario, Strategy};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct SimArgs {
    /// The scenario file (see scenarios/).
    scenario: PathBuf,
    /// Strategies to compare, comma-separated [default: all]: bare-model, round-robin,
    /// random, least-outstanding, crisp, oracle.
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// Override the scenario's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Multiply every arrival rate (capacity planning: 1.3 = 30% more traffic).
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Override how long arrivals last, in seconds.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Write the HTML report with charts here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Write the table as Markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write each chart as its own SVG file into this directory.
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Print the results as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn load(
    path: &std::path::Path,
    seed: Option<u64>,
    rate_scale: f64,
    duration_s: Option<f64>,
) -> anyhow::Result<Scenario> {
    let mut scenario = Scenario::load(path)?;
    if let Some(s) = seed {
        scenario.seed = s;
    }
    if !(rate_scale.is_finite() && rate_scale >= 0.0) {
        bail!("--rate-scale must be 0 or more");
    }
    scenario.scale_rates(rate_scale);
    if let Some(d) = duration_s {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration-s must be a positive number of seconds");
        }
        scenario.bucket_s *= d / scenario.duration_s;
        scenario.duration_s = d;
    }
    Ok(scenario)
}

fn strategies(names: &[String]) -> anyhow::Result<Vec<Strategy>> {
    if names.is_empty() {
        return Ok(Strategy::ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            Strategy::parse(n.trim()).with_context(|| {
                format!(
                    "unknown strategy {n:?}; choose from {}",
                    Strategy::ALL.map(Strategy::name).join(", ")
                )
            })
        })
        .collect()
}

/// Peak resident memory of this process, in MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs the strategies with a progress bar per strategy (on a terminal).
fn run_with_progress(scenario: &Scenario, strategies: &[Strategy]) -> Vec<Outcome> {
    let progress: Vec<AtomicU64> = strategies.iter().map(|_| AtomicU64::new(0)).collect();
    let total_us = (scenario.duration_s * 1e6) as u64;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>18} [{bar:40}] {percent:>3}% {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let handles: Vec<ProgressBar> = strategies
        .iter()
        .map(|s| {
            let b = bars.add(ProgressBar::new(total_us.max(1)));
            b.set_style(style.clone());
            b.set_prefix(s.name());
            b
        })
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for (b, p) in handles.iter().zip(&progress) {
                    b.set_position(p.load(std::sync::atomic::Ordering::Relaxed).min(total_us));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let outcomes = crisp_sim::compare(scenario, strategies, &progress);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = watcher.join();
        for b in &handles {
            b.finish();
        }
        let _ = bars.clear();
        outcomes
    })
}

fn outcome_json(o: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "strategy": o.strategy.name(),
        "offered": o.offered,
        "served": o.served,
        "served_share": o.served_share(),
        "capacity_errors": o.capacity_errors,
        "outage_errors": o.outage_errors,
        "refusals": o.refusals,
        "cross_region_share": o.cross_share(),
        "ttft_ms": {"p50": o.ttft_ms(0.5), "p95": o.ttft_ms(0.95), "p99": o.ttft_ms(0.99)},
        "e2e_ms": {"p50": o.e2e_ms(0.5), "p95": o.e2e_ms(0.95), "p99": o.e2e_ms(0.99)},
        "cost_usd": o.cost_usd,
        "violations": o.violations,
        "events": o.events,
    })
}

fn check_boundary(outcomes: &[Outcome]) -> anyhow::Result<()> {
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| o.violations > 0)
        .map(|o| format!("{}: {} attempts", o.strategy.name(), o.violations))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        bail!(
            "BOUNDARY VIOLATED: requests were sent outside their profile's destination set ({}); the results are void",
            bad.join(", ")
        )
    }
}

pub fn sim(args: SimArgs) -> anyhow::Result<()> {
    let scenario = load(&args.scenario, args.seed, args.rate_scale, args.duration_s)?;
    let strategies = strategies(&args.strategies)?;
    if !args.json {
        eprintln!(
            "simulating {:?}: {} regions, {} traffic streams, ~{:.0} requests per strategy, {} strategies",
            scenario.name,
            scenario.catalog.regions.len(),
            scenario.traffic.len(),
            scenario.expected_requests(),
            strategies.len()
        );
    }
    let started = Instant::now();
    let outcomes = run_with_progress(&scenario, &strategies);
    let cost = RunCost {
        wall_s: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_rss_mib(),
    };
    if args.json {
        let v = serde_json::json!({
            "scenario": scenario.name,
            "seed": scenario.seed,
            "wall_s": cost.wall_s,
            "peak_rss_mib": cost.peak_rss_mib,
            "outcomes": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        print!("{}", report::table(&outcomes));
        println!(
            "simulated in {:.1} s{}",
            cost.wall_s,
            cost.peak_rss_mib
                .map(|m| format!(", peak memory {m:.0} MiB"))
                .unwrap_or_default()
        );
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report::markdown(&outcomes))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(dir) = &args.charts {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for c in report::charts(&scenario, &outcomes).map_err(anyhow::Error::msg)? {
            let path = dir.join(format!("{}.svg", c.name));
            std::fs::write(&path, c.svg)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    if let Some(path) = &args.html {
        let page = report::html(&scenario, &outcomes, cost).map_err(anyhow::Error::msg)?;
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
        if !args.json {
            println!("report: {}", path.display());
        }
    }
    check_boundary(&outcomes)
}

#[derive(Args)]
pub struct BenchArgs {
    /// The scenario to replay; its fleet must be the one running (e.g. examples/demo.toml
    /// for `crisp up`).
    scenario: PathBuf,
    /// Multiply every arrival rate (scale a big scenario down to what the machine runs).
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Replay only this many seconds of the scenario.
    #[arg(long)]
    duration_s: Option<f64>,
    /// The port `crisp up --port` was given: every client address of the fleet moves by
    /// (port - the first region's port).
    #[arg(long)]
    port: Option<u16>,
    /// API key for the nodes.
    #[arg(long, env = "CRISP_API_KEY", default_value = crate::up::DEMO_API_KEY)]
    api_key: String,
    /// Seed of the replayed trace [default: the scenario's]; the same seed sends the
    /// same requests at the same times.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// What the client saw of one request.
#[derive(Clone, Debug, Default)]
struct Seen {
    status: u16,
    region: Option<String>,
    ttft: Option<Duration>,
    total: Option<Duration>,
    error: Option<String>,
}

struct Live {
    offered: u64,
    served: u64,
    capacity_errors: u64,
    other_errors: BTreeMap<String, u64>,
    cross_region: u64,
    ttft_ms: Vec<f64>,
    e2e_ms: Vec<f64>,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn send(client: reqwest::Client, url: String, key: String, body: serde_json::Value) -> Seen {
    let started = Instant::now();
    let resp = client.post(&url).bearer_auth(key).json(&body).send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return Seen {
                error: Some(format!("connection: {e}")),
                ..Seen::default()
            };
        }
    };
    let status = resp.status().as_u16();
    let region = resp
        .headers()
        .get("x-crisp-inference-region")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        return Seen {
            status,
            region,
            error: Some(text.chars().take(200).collect()),
            ..Seen::default()
        };
    }
    let mut ttft = None;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return Seen {
                status,
                region,
                error: Some("stream broke".into()),
                ..Seen::default()
            };
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        // Whole SSE lines only; the first one carrying generated text is the first token.
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            if ttft.is_none()
                && let Some(data) = line.trim().strip_prefix("data:")
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(data.trim())
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            {
                ttft = Some(started.elapsed());
            }
        }
    }
    Seen {
        status,
        region,
        ttft,
        total: Some(started.elapsed()),
        error: None,
    }
}

async fn replay(scenario: &Scenario, port: Option<u16>, key: &str) -> anyhow::Result<Live> {
    let catalog = &scenario.catalog;
    let first_port = catalog
        .regions
        .first()
        .and_then(|r| r.client_addr.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<i64>().ok())
        .unwrap_or(8080);
    let shift = port.map_or(0, |p| i64::from(p) - first_port);
    let mut urls = Vec::new();
    for r in &catalog.regions {
        let (host, p) = r
            .client_addr
            .rsplit_once(':')
            .with_context(|| format!("{}: client address has no port", r.code))?;
        let p: i64 = p.parse().context("client port")?;
        urls.push(format!("http://{host}:{}/v1/chat/completions", p + shift));
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .context("http client")?;
    let requests: Vec<_> = Workload::new(scenario).collect();
    // Every source region's node must answer before the clock starts.
    let mut sources: Vec<usize> = scenario
        .traffic
        .iter()
        .map(|t| usize::from(t.source))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    for &s in &sources {
        let url = urls[s].replace("/chat/completions", "/models");
        let ok = client
            .get(&url)
            .bearer_auth(key)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            bail!(
                "the node of {} does not answer at {url}: start the fleet first (`crisp up{}`), or pass the --port it runs on, and check the API key",
                catalog.regions[s].code,
                port.map(|p| format!(" --port {p}")).unwrap_or_default()
            );
        }
    }
    eprintln!(
        "replaying {} requests over {:.0} s against {} regions",
        requests.len(),
        scenario.duration_s,
        catalog.regions.len()
    );
    let bar = ProgressBar::new(requests.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>18} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix("live");
    let bar = Arc::new(bar);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for req in &requests {
        let traffic = &scenario.traffic[usize::from(req.stream)];
        let source = usize::from(traffic.source);
        let words = req.prompt_tokens.saturating_sub(4).max(1);
        let prompt = vec!["tok"; words as usize].join(" ");
        let body = serde_json::json!({
            "model": traffic.target.id,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": req.max_tokens,
            "stream": true,
        });
        tokio::time::sleep_until(start + Duration::from_micros(req.at_us)).await;
        let (client, url, key, bar) = (
            client.clone(),
            urls[source].clone(),
            key.to_owned(),
            bar.clone(),
        );
        let code = catalog.regions[source].code.clone();
        tasks.push(tokio::spawn(async move {
            let seen = send(client, url, key, body).await;
            bar.inc(1);
            (code, seen)
        }));
    }
    let mut live = Live {
        offered: requests.len() as u64,
        served: 0,
        capacity_errors: 0,
        other_errors: BTreeMap::new(),
        cross_region: 0,
        ttft_ms: Vec::new(),
        e2e_ms: Vec::new(),
    };
    for t in tasks {
        let (source, seen) = t.await.context("a request task failed")?;
        match (seen.status, &seen.error) {
            (200, None) => {
                live.served += 1;
                if seen.region.as_deref().is_some_and(|r| r != source) {
                    live.cross_region += 1;
                }
                if let Some(t) = seen.ttft {
                    live.ttft_ms.push(t.as_secs_f64() * 1000.0);
                }
                if let Some(t) = seen.total {
                    live.e2e_ms.push(t.as_secs_f64() * 1000.0);
                }
            }
            (429, _) => live.capacity_errors += 1,
            (status, e) => {
                let what = format!(
                    "{status}: {}",
                    e.as_deref()
                        .unwrap_or("")
                        .chars()
                        .take(80)
                        .collect::<String>()
                );
                *live.other_errors.entry(what).or_default() += 1;
            }
        }
    }
    bar.finish_and_clear();
    live.ttft_ms.sort_by(f64::total_cmp);
    live.e2e_ms.sort_by(f64::total_cmp);
    Ok(live)
}

pub async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let mut scenario = load(&args.scenario, args.seed, args.rate_scale, args.duration_s)?;
    // The nodes run on one machine: no distance between them, though the router still
    // weighs the distance the coordinates give, as the live nodes do.
    scenario.network_scale = 0.0;
    let live = replay(&scenario, args.port, &args.api_key).await?;
    let predicted = {
        let s = scenario.clone();
        tokio::task::spawn_blocking(move || {
            let p = AtomicU64::new(0);
            crisp_sim::simulate(&s, Strategy::Crisp, &p)
        })
        .await
        .context("the simulation failed")?
    };
    let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let rows: Vec<(&str, &str, f64, f64, &str)> = vec![
        (
            "served",
            "served",
            100.0 * share(live.served, live.offered),
            100.0 * predicted.served_share(),
            "%",
        ),
        (
            "capacity errors",
            "capacity_errors",
            100.0 * share(live.capacity_errors, live.offered),
            100.0 * share(predicted.capacity_errors, predicted.offered),
            "%",
        ),
        (
            "served cross-region",
            "cross_region",
            100.0 * share(live.cross_region, live.served),
            100.0 * predicted.cross_share(),
            "%",
        ),
        (
            "TTFT p50",
            "ttft_p50_ms",
            quantile(&live.ttft_ms, 0.5),
            predicted.ttft_ms(0.5),
            "ms",
        ),
        (
            "TTFT p95",
            "ttft_p95_ms",
            quantile(&live.ttft_ms, 0.95),
            predicted.ttft_ms(0.95),
            "ms",
        ),
        (
            "end-to-end p50",
            "e2e_p50_ms",
            quantile(&live.e2e_ms, 0.5),
            predicted.e2e_ms(0.5),
            "ms",
        ),
        (
            "end-to-end p95",
            "e2e_p95_ms",
            quantile(&live.e2e_ms, 0.95),
            predicted.e2e_ms(0.95),
            "ms",
        ),
    ];
    let other: u64 = live.other_errors.values().sum();
    if args.json {
        let v = serde_json::json!({
            "scenario": scenario.name,
            "offered": live.offered,
            "other_errors": live.other_errors,
            "measured": rows.iter().map(|r| (r.1, r.2)).collect::<BTreeMap<_, _>>(),
            "simulated": rows.iter().map(|r| (r.1, r.3)).collect::<BTreeMap<_, _>>(),
            "simulated_offered": predicted.offered,
        });
        println!("{v}");
    } else {
        println!(
            "{:<22} {:>12} {:>12} {:>10}",
            "", "measured", "simulated", "difference"
        );
        for (name, _, m, s, unit) in &rows {
            println!(
                "{name:<22} {:>10.1}{unit:<2} {:>10.1}{unit:<2} {:>+9.1}{unit}",
                m,
                s,
                m - s
            );
        }
        println!(
            "{} requests offered live, {} simulated",
            live.offered, predicted.offered
        );
        for (what, n) in &live.other_errors {
            println!("  {n} requests failed otherwise: {what}");
        }
    }
    if other > 0 && other * 10 > live.offered {
        bail!(
            "{other} of {} requests failed for reasons other than capacity: are the nodes of this fleet running (crisp up), and is the API key right?",
            live.offered
        );
    }
    Ok(())
}
