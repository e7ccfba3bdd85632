//! A federation of real nodes on loopback with ephemeral ports, for integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake;

use std::time::{Duration, Instant};

use crisp_catalog::parse_config;
use crisp_catalog::profiles::{Lock, Plan};
use std::sync::Arc;

use crisp_node::{Listeners, Node, RunningNode, ServeOptions};
use crisp_transport::{Ca, RegionIdentity, TlsMaterial, TlsStore};
use time::OffsetDateTime;
use tokio::net::TcpListener;

pub const NOVA: &str = "amazon.nova-lite-v1:0";

/// (code, country, eu member, lat, lon)
pub type RegionDef = (&'static str, &'static str, bool, f64, f64);

pub const REGIONS: &[RegionDef] = &[
    ("us-east-1", "US", false, 38.9, -77.4),
    ("us-east-2", "US", false, 40.0, -83.0),
    ("eu-central-1", "DE", true, 50.1, 8.7),
    ("eu-west-1", "IE", true, 53.3, -6.3),
    ("eu-west-3", "FR", true, 48.9, 2.35),
    ("eu-west-2", "GB", false, 51.5, -0.1),
    ("ap-northeast-1", "JP", false, 35.7, 139.7),
];

/// The deployment CA of a test federation (deployment "test").
pub fn test_ca() -> Ca {
    Ca::generate("test", OffsetDateTime::now_utc(), 1).unwrap()
}

pub fn now_secs() -> u64 {
    u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap()
}

/// TLS material for `region`, issued by `ca`.
pub fn tls_for(ca: &Ca, region: &str) -> Arc<TlsStore> {
    let now = OffsetDateTime::now_utc();
    let cert = ca
        .issue_region(
            region,
            now - time::Duration::minutes(5),
            now + time::Duration::hours(1),
        )
        .unwrap();
    let material = TlsMaterial::from_pem(
        ca.cert_pem().as_bytes(),
        cert.cert_pem.as_bytes(),
        cert.key_pem.as_bytes(),
        &RegionIdentity::new(ca.deployment(), region),
        now_secs(),
    )
    .unwrap();
    Arc::new(TlsStore::fixed(material))
}

pub struct Federation {
    pub nodes: Vec<RunningNode>,
    pub http: reqwest::Client,
    pub ca: Ca,
    pub catalog: crisp_catalog::Catalog,
    /// Listeners of regions the test runs itself (fakes), by region code.
    pub external: Vec<(String, Listeners)>,
    /// Regions the mesh wait does not expect to hear.
    silent: Vec<String>,
}

/// The configuration text of a test federation, with the given addresses.
pub fn config_text(
    regions: &[RegionDef],
    addrs: &[(String, String)],
    serving: &[&str],
    backend: &str,
    routing_extra: &str,
) -> String {
    let mut s = format!(
        r#"version = 1
[deployment]
name = "test"
[routing]
stale_after_ms = 1000
telemetry_interval_ms = 50
max_attempts = 6
{routing_extra}
[limits]
max_body_bytes = 4096
body_read_timeout_ms = 500
[[geography]]
name = "us"
countries = ["US"]
[[geography]]
name = "eu"
tags = ["eu"]
"#
    );
    for ((code, country, eu, lat, lon), (client, peer)) in regions.iter().zip(addrs) {
        let tags = if *eu { "[\"eu\"]" } else { "[]" };
        s.push_str(&format!(
            "[[region]]\ncode = \"{code}\"\ncountry = \"{country}\"\nlat = {lat}\nlon = {lon}\ntags = {tags}\nclient = \"{client}\"\npeer = \"{peer}\"\n"
        ));
    }
    s.push_str(&format!(
        "[[model]]\nid = \"{NOVA}\"\ninput_price_per_1k = 0.00006\noutput_price_per_1k = 0.00024\n"
    ));
    for code in serving {
        s.push_str(&format!(
            "[[model.backend]]\nregion = \"{code}\"\nkind = \"simulated\"\n{backend}\n"
        ));
    }
    s
}

/// Engines with 2 slots and no queue, decoding 50 tokens a second, so a long answer holds
/// its slot for as long as the test wants.
pub const HOLDING_ENGINE: &str = "slots = 2\nqueue_limit = 0\ndecode_tokens_per_s = 50\nttft_ms = 5\nmax_tokens = 4000\ncontext_tokens = 100000";

type TlsFn = Box<dyn Fn(&Ca, &str) -> Arc<TlsStore>>;

/// How to build a test federation.
pub struct Setup {
    regions: Vec<RegionDef>,
    serving: Option<Vec<String>>,
    backend: String,
    routing_extra: String,
    tls: TlsFn,
    external: Vec<String>,
    silent: Vec<String>,
    metrics: Option<crisp_node::admin::MetricsRender>,
    access: Vec<(String, crisp_node::access::AccessFiles)>,
    invocation_logs: Vec<(String, std::path::PathBuf, String)>,
    audits: Vec<(String, std::path::PathBuf)>,
    app_profiles: Option<String>,
}

impl Setup {
    pub fn new(regions: &[RegionDef]) -> Setup {
        Setup {
            regions: regions.to_vec(),
            serving: None,
            backend: HOLDING_ENGINE.to_owned(),
            routing_extra: String::new(),
            tls: Box::new(tls_for),
            external: Vec::new(),
            silent: Vec::new(),
            metrics: None,
            access: Vec::new(),
            invocation_logs: Vec::new(),
            audits: Vec::new(),
            app_profiles: None,
        }
    }

    /// Application inference profiles on every node, kept in the store at `url`.
    pub fn app_profiles(mut self, url: &str) -> Setup {
        self.app_profiles = Some(url.to_owned());
        self
    }

    /// An audit trail in `dir` on one region's node.
    pub fn audit(mut self, region: &str, dir: &std::path::Path) -> Setup {
        self.audits.push((region.to_owned(), dir.to_owned()));
        self
    }

    /// Model invocation logging on one region's node: local files in `dir`, shipped to
    /// the store at `url`.
    pub fn invocation_log(mut self, region: &str, dir: &std::path::Path, url: &str) -> Setup {
        self.invocation_logs
            .push((region.to_owned(), dir.to_owned(), url.to_owned()));
        self
    }

    /// Access control on one region's node.
    pub fn access(mut self, region: &str, files: crisp_node::access::AccessFiles) -> Setup {
        self.access.push((region.to_owned(), files));
        self
    }

    /// Serve this renderer on every node's admin `/metrics`.
    pub fn metrics(mut self, render: crisp_node::admin::MetricsRender) -> Setup {
        self.metrics = Some(render);
        self
    }

    /// Only these regions run the model (default: all).
    pub fn serving(mut self, regions: &[&str]) -> Setup {
        self.serving = Some(regions.iter().map(|r| (*r).to_owned()).collect());
        self
    }

    pub fn backend(mut self, backend: &str) -> Setup {
        self.backend = backend.to_owned();
        self
    }

    /// Extra lines in the [routing] section.
    pub fn routing(mut self, extra: &str) -> Setup {
        self.routing_extra = extra.to_owned();
        self
    }

    /// How each node gets its certificates (default: issued by the federation's CA).
    pub fn tls(mut self, f: impl Fn(&Ca, &str) -> Arc<TlsStore> + 'static) -> Setup {
        self.tls = Box::new(f);
        self
    }

    /// Regions the test serves itself from the returned listeners (fake peers).
    pub fn external(mut self, regions: &[&str]) -> Setup {
        self.external = regions.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    /// Regions the others are not expected to hear before the test begins.
    pub fn silent(mut self, regions: &[&str]) -> Setup {
        self.silent = regions.iter().map(|r| (*r).to_owned()).collect();
        self
    }

    pub async fn start(self) -> Federation {
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in &self.regions {
            let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push((
                client.local_addr().unwrap().to_string(),
                peer.local_addr().unwrap().to_string(),
            ));
            let admin = Some(TcpListener::bind("127.0.0.1:0").await.unwrap());
            listeners.push(Listeners {
                client,
                peer,
                admin,
            });
        }
        let all: Vec<String> = self.regions.iter().map(|r| r.0.to_owned()).collect();
        let serving = self.serving.unwrap_or(all);
        let serving: Vec<&str> = serving.iter().map(String::as_str).collect();
        let text = config_text(
            &self.regions,
            &addrs,
            &serving,
            &self.backend,
            &self.routing_extra,
        );
        let catalog = parse_config(&text).unwrap();
        let lock = Plan::new(&catalog, &Lock::default()).apply(&Lock::default());
        let ca = test_ca();
        let mut nodes = Vec::new();
        let mut external = Vec::new();
        for ((code, ..), l) in self.regions.iter().zip(listeners) {
            if self.external.iter().any(|e| e == code) {
                external.push(((*code).to_owned(), l));
                continue;
            }
            let tls = (self.tls)(&ca, code);
            let mut node = Node::new(catalog.clone(), &lock, code, tls.clone()).unwrap();
            if let Some(url) = &self.app_profiles {
                let store = crisp_node::app_profiles::AppProfiles::from_url(url).unwrap();
                node = node.with_app_profiles(Arc::new(store));
            }
            if let Some((_, dir)) = self.audits.iter().find(|(r, _)| r == code) {
                let log = crisp_audit::AuditLog::open(
                    dir,
                    code,
                    Arc::new(crisp_node::audit::NodeSigner(tls)),
                    crisp_audit::Sealing::default(),
                )
                .unwrap();
                node = node.with_audit(Arc::new(crisp_node::audit::Audit::new(log, true)));
            }
            if let Some((_, files)) = self.access.iter().find(|(r, _)| r == code) {
                let access = crisp_node::access::Access::load(
                    files.clone(),
                    &node.catalog,
                    &node.profiles,
                    node.region,
                )
                .unwrap();
                node = node.with_access(Arc::new(access));
            }
            if let Some((_, dir, url)) = self.invocation_logs.iter().find(|(r, _, _)| r == code) {
                let log = crisp_node::invocations::InvocationLog::new(
                    dir,
                    url,
                    "000000000000",
                    code,
                    200,
                )
                .unwrap();
                node = node.with_invocation_log(Arc::new(log));
            }
            let options = ServeOptions {
                grace: Duration::from_secs(1),
                reload_interval: Duration::from_millis(100),
                metrics: self.metrics.clone(),
                ..ServeOptions::default()
            };
            nodes.push(RunningNode::start(node, l, options).unwrap());
        }
        let mut silent = self.silent;
        silent.extend(self.external.iter().cloned());
        let f = Federation {
            nodes,
            http: reqwest::Client::new(),
            ca,
            catalog,
            external,
            silent,
        };
        f.wait_for_mesh().await;
        f
    }
}

impl Federation {
    /// The standard test federation: every region a node with [`HOLDING_ENGINE`]s.
    pub async fn start() -> Federation {
        Setup::new(REGIONS).start().await
    }

    pub async fn start_with(regions: &[RegionDef], backend: &str) -> Federation {
        Setup::new(regions).backend(backend).start().await
    }

    /// Starts one node per region; only the `serving` regions run the model.
    pub async fn start_serving(
        regions: &[RegionDef],
        serving: &[&str],
        backend: &str,
    ) -> Federation {
        Setup::new(regions)
            .serving(serving)
            .backend(backend)
            .start()
            .await
    }

    pub async fn wait_for_mesh(&self) {
        let start = Instant::now();
        loop {
            let all = self
                .nodes
                .iter()
                .filter(|n| !self.silent.iter().any(|s| s == n.node.region_code()))
                .all(|n| {
                    (0..n.node.catalog.regions.len()).all(|i| {
                        let ix = u16::try_from(i).unwrap();
                        let code = n.node.catalog.region_code(ix);
                        ix == n.node.region
                            || self.silent.iter().any(|s| s == code)
                            || n.node.fleet.summary(ix).unwrap().reachable
                    })
                });
            if all {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nodes did not hear each other"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn node(&self, region: &str) -> &RunningNode {
        self.nodes
            .iter()
            .find(|n| n.node.region_code() == region)
            .unwrap()
    }

    pub fn url(&self, region: &str, path: &str) -> String {
        format!("http://{}{path}", self.node(region).client_addr)
    }

    /// Posts a chat completion to `region`'s node.
    pub async fn chat(&self, region: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(self.url(region, "/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Opens a long streaming answer that holds an engine slot until dropped; returns the
    /// response (admitted) and the region that runs it.
    pub async fn hold(&self, region: &str, model: &str) -> (reqwest::Response, String) {
        let r = self
            .chat(
                region,
                serde_json::json!({"model": model, "stream": true, "max_tokens": 3000,
                    "messages": [{"role": "user", "content": "hold this slot"}]}),
            )
            .await;
        assert_eq!(r.status(), 200, "{:?}", r.text().await);
        let at = inference_region(&r);
        (r, at)
    }

    /// Local admissions per region, to prove where work ran.
    pub fn admitted(&self) -> Vec<(String, u64)> {
        self.nodes
            .iter()
            .map(|n| (n.node.region_code().to_owned(), n.node.admitted(NOVA)))
            .collect()
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

pub fn inference_region(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-crisp-inference-region")
        .expect("x-crisp-inference-region header")
        .to_str()
        .unwrap()
        .to_owned()
}

pub fn ask(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hello"}]})
}

/// Polls until `f` holds or two seconds pass.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
