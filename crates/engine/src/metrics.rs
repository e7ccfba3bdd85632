//! Load signals from model servers' Prometheus `/metrics`: the running and waiting
//! request counts of vLLM, SGLang and llama.cpp's server, and vLLM's KV-cache usage.

/// What an engine says about its load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineMetrics {
    pub running: u32,
    pub waiting: u32,
    /// Fraction of the KV cache in use, when the engine reports it.
    pub kv_cache_usage: Option<f64>,
}

const RUNNING: &[&str] = &[
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
];
const WAITING: &[&str] = &[
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "llamacpp:requests_deferred",
];
const KV_CACHE: &[&str] = &["vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"];

impl EngineMetrics {
    /// Reads the Prometheus text format; series of the same name (several models or
    /// ranks) are summed; unknown lines are ignored.
    pub fn parse(text: &str) -> EngineMetrics {
        let mut running = 0.0;
        let mut waiting = 0.0;
        let mut kv: Option<f64> = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            // The value follows the labels; a timestamp may follow the value.
            let after_labels = match line[name_end..].find('}') {
                Some(i) if line[name_end..].starts_with('{') => &line[name_end + i + 1..],
                _ => &line[name_end..],
            };
            let Some(value) = after_labels
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
            else {
                continue;
            };
            if RUNNING.contains(&name) {
                running += value;
            } else if WAITING.contains(&name) {
                waiting += value;
            } else if KV_CACHE.contains(&name) {
                kv = Some(kv.map_or(value, |k: f64| k.max(value)));
            }
        }
        let to_u32 = |v: f64| v.round().min(f64::from(u32::MAX)) as u32;
        EngineMetrics {
            running: to_u32(running),
            waiting: to_u32(waiting),
            kv_cache_usage: kv,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_vllm_metrics_page() {
        let m = EngineMetrics::parse(include_str!("../tests/fixtures/vllm-metrics.txt"));
        assert_eq!(m.running, 7);
        assert_eq!(m.waiting, 3);
        assert_eq!(m.kv_cache_usage, Some(0.42));
    }

    #[test]
    fn reads_sglang_and_llamacpp_names_and_ignores_garbage() {
        let text = "# HELP x\nsglang:num_running_reqs{model_name=\"m\"} 2\nsglang:num_queue_reqs{model_name=\"m\"} 5 1700000000\nllamacpp:requests_processing 1\nllamacpp:requests_deferred NaN\nnonsense\n";
        let m = EngineMetrics::parse(text);
        assert_eq!((m.running, m.waiting), (3, 5));
        assert_eq!(EngineMetrics::parse(""), EngineMetrics::default());
    }
}
