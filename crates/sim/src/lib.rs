//! A deterministic discrete-event simulator of a whole crisp fleet.
//!
//! It answers "what happens to our traffic if ...?" at scales no test machine can run
//! live: tens of regions, millions of requests, a spike in one region, an outage at peak.
//! It drives crisp's real routing core ([`crisp_routing::route`]) and real catalog (the
//! same configuration file and lock file the nodes read), and compares crisp's router with
//! the strategies other systems use, on the same trace, in one run.
//!
//! - [`scenario`]: the scenario file and its validation.
//! - [`workload`]: the trace, generated lazily from seeded per-stream generators.
//! - [`run`]: the event loop of one strategy.
//! - [`report`]: the terminal table and the HTML report with SVG charts.

pub mod report;
pub mod run;
pub mod scenario;
pub mod workload;

use std::sync::atomic::AtomicU64;

pub use run::{Outcome, Strategy, simulate};
pub use scenario::{Scenario, ScenarioError};

/// Runs several strategies over the same scenario, on as many threads as the machine
/// has, and returns their outcomes in the order asked. `progress[i]` follows strategy
/// `i`'s simulated clock, in microseconds.
pub fn compare(
    scenario: &Scenario,
    strategies: &[Strategy],
    progress: &[AtomicU64],
) -> Vec<Outcome> {
    let threads = std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Outcome>>> = strategies
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(strategies.len()) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&strategy) = strategies.get(i) else {
                        break;
                    };
                    let fallback = AtomicU64::new(0);
                    let p = progress.get(i).unwrap_or(&fallback);
                    let outcome = simulate(scenario, strategy, p);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(outcome);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().ok().flatten())
        .collect()
}
