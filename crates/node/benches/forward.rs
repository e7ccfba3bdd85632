//! What a forwarded request costs beyond the network: two nodes on loopback with instant
//! engines, the same request answered locally by the source and forwarded over the mTLS
//! backbone to the other node; p50/p99 of the whole HTTP request as a client sees it.
//!
//! `cargo bench -p crisp-node --bench forward` (release build; prints a table).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::{REGIONS, Setup};

const INSTANT: &str = "slots = 4096\nqueue_limit = 4096\nttft_ms = 0\ndecode_tokens_per_s = 1000000\ntime_scale = 0.000001\nmax_tokens = 4";

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(
    f: &support::Federation,
    model: &str,
    n: usize,
    concurrency: usize,
) -> (Vec<Duration>, f64) {
    let body = serde_json::json!({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let url = f.url("us-east-1", "/v1/chat/completions");
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (http, url, body) = (f.http.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n / concurrency);
            for _ in 0..n / concurrency {
                let t = Instant::now();
                let r = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rps = all.len() as f64 / start.elapsed().as_secs_f64();
    (all, rps)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // us-east-1 serves the model itself (bare ID) and forwards the EU profile to Dublin.
        let f = Setup::new(&[REGIONS[0], REGIONS[3]])
            .backend(INSTANT)
            .start()
            .await;
        // Warm up connections on both paths.
        run(&f, "amazon.nova-lite-v1:0", 200, 4).await;
        run(&f, "eu.amazon.nova-lite-v1:0", 200, 4).await;
        println!("| path | concurrency | p50 | p99 | requests/s |");
        println!("|---|---|---|---|---|");
        for concurrency in [1usize, 16] {
            let n = if concurrency == 1 { 2000 } else { 8000 };
            let mut rows = Vec::new();
            for (name, model) in [
                ("local (bare model ID)", "amazon.nova-lite-v1:0"),
                ("forwarded over mTLS", "eu.amazon.nova-lite-v1:0"),
            ] {
                let (mut lat, rps) = run(&f, model, n, concurrency).await;
                let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
                println!(
                    "| {name} | {concurrency} | {:.0} µs | {:.0} µs | {:.0} |",
                    p50.as_secs_f64() * 1e6,
                    p99.as_secs_f64() * 1e6,
                    rps
                );
                rows.push((p50, p99));
            }
            let (l, fw) = (rows[0], rows[1]);
            println!(
                "| forwarding adds | {concurrency} | {:.0} µs | {:.0} µs | |",
                (fw.0.as_secs_f64() - l.0.as_secs_f64()) * 1e6,
                (fw.1.as_secs_f64() - l.1.as_secs_f64()) * 1e6
            );
        }
        f.stop().await;
    });
}
