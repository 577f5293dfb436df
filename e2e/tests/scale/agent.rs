//! The node side at scale: one real agent (a simulated node) among the kwok nodes. It
//! watches every remote Endpoint and every LBService of the cluster like an agent of a real
//! node would, and runs one pod of the first namespace (so that namespace's Services and
//! NetworkPolicy select something local: policy and service maps of a busy node).
//!
//! Measured: the agent's RSS before the pods, after every remote endpoint is in its
//! `ipcache` (per remote endpoint), after every Service is programmed (per service); CPU
//! and bytes received (its watches, almost all of it) per churned pod; BPF map occupancy
//! (`tendril_bpf_map_pressure`).

use super::*;
use tendril_e2e::sim::{SimNode, SimPod, Underlay};
use tendril_e2e::{TestEnv, eventually};

/// The PodIPPool of the simulated node: clear of the kwok nodes' `podCIDR`s (10.128.0.0/9).
const POOL: &str = "apiVersion: tendril.dev/v1alpha1\nkind: PodIPPool\nmetadata: {name: default}\n\
                    spec: {ipv4: {cidrs: [\"10.64.0.0/10\"], maskSize: 24}}";
/// How long the agent may take to take in what the apiserver holds.
const AGENT_TIMEOUT: Duration = Duration::from_secs(900);

/// The simulated node and what it runs; dropped (node, then underlay) with the size.
pub(super) struct ScaleAgent {
    pub pod: Option<SimPod>,
    pub node: SimNode,
    _underlay: Underlay,
    _config: ScratchFile,
    pub env: TestEnv,
    pub pid: u32,
    pub port: u16,
}

/// What the agent measured, for the report.
#[derive(Default, Debug)]
pub(super) struct AgentFigures {
    pub rss_start_mib: f64,
    pub rss_endpoints_mib: f64,
    pub rss_services_mib: f64,
    pub rss_churn_mib: f64,
    pub endpoints_secs: f64,
    pub services_secs: f64,
    pub churn_cpu_cores: f64,
    pub churn_received_bytes: f64,
    pub map_pressure: BTreeMap<String, f64>,
}

impl ScaleAgent {
    pub async fn start(plane: &Arc<ControlPlane>, tag: &str, size: &Size) -> Result<ScaleAgent> {
        let env = TestEnv::on(plane.clone()).await?;
        env.apply_yaml(POOL).await?;
        let cluster = format!("{tag}-{}", std::process::id() % 10_000);
        let config =
            ScratchFile(std::env::temp_dir().join(format!("tendril-{cluster}-agent.yaml")));
        std::fs::write(&config.0, lb_map_sizes(size))?;
        let underlay = Underlay::new(&cluster).await?;
        let args = ["--config".to_string(), config.0.display().to_string()];
        let mut node = SimNode::start_with(&env, &cluster, 0, 0, &args).await?;
        node.wait_ready(&env.client()).await?;
        let pid = node.agent().context("agent not running")?.pid();
        let port = node.metrics_port;
        Ok(ScaleAgent {
            pod: None,
            node,
            _underlay: underlay,
            _config: config,
            env,
            pid,
            port,
        })
    }

    /// A pod of namespace `ns` with `labels`, on the simulated node.
    pub async fn run_pod(&mut self, ns: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let pod = SimPod::run(
            &self.env.client(),
            self.node.handle(),
            ns,
            "local-0",
            labels,
        )
        .await?;
        self.pod = Some(pod);
        Ok(())
    }

    pub fn rss_mib(&self) -> f64 {
        rss_mib(self.pid).0
    }

    /// Bytes received on the agent's open TCP connections (`ss`: tcp_info's
    /// `bytes_received`), its watches of the apiserver almost all of it. (`/proc/<pid>/io`
    /// does not count socket reads made with `recv`, which is how std and tokio read.)
    pub async fn received_bytes(&self) -> Result<f64> {
        let out = tokio::process::Command::new("ss")
            .args(["-tinpH"])
            .output()
            .await
            .context("running ss")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let owner = format!("pid={},", self.pid);
        let mut total = 0.0;
        let mut mine = false;
        for line in text.lines() {
            if !line.starts_with(char::is_whitespace) {
                mine = line.contains(&owner);
                continue;
            }
            if mine {
                total += line
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("bytes_received:"))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
        Ok(total)
    }

    /// `tendril_bpf_map_pressure` per map.
    pub async fn map_pressure(&self) -> Result<BTreeMap<String, f64>> {
        let m = fetch_metrics(self.port).await?;
        Ok(m.matching("tendril_bpf_map_pressure", &[])
            .filter_map(|s| Some((s.labels.get("map")?.clone(), s.value)))
            .collect())
    }

    /// Waits until the agent's `ipcache` holds at least `entries` entries of `capacity`.
    pub async fn wait_ipcache(&self, entries: usize, capacity: usize) -> Result<()> {
        eventually(AGENT_TIMEOUT, || async {
            let p = self.map_pressure().await?;
            let have = p.get("ipcache").copied().unwrap_or(0.0) * capacity as f64;
            ensure!(
                have.round() as usize >= entries,
                "agent ipcache holds {have:.0} of {entries} remote endpoints"
            );
            Ok(())
        })
        .await?;
        // (Node addresses count too: go on until it stops growing.)
        let mut last = -1.0;
        loop {
            let now = self
                .map_pressure()
                .await?
                .get("ipcache")
                .copied()
                .unwrap_or(0.0);
            if now == last {
                return Ok(());
            }
            last = now;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits until the agent programs at least `services` Services.
    pub async fn wait_services(&self, services: usize) -> Result<()> {
        eventually(AGENT_TIMEOUT, || async {
            let m = fetch_metrics(self.port).await?;
            let have = m.sum("tendril_services_programmed", &[]);
            ensure!(
                have as usize >= services,
                "agent programs {have} of {services} Services"
            );
            Ok(())
        })
        .await
    }
}

/// The agent's services maps sized for the run as `config/agent.yaml` says an operator
/// sizes them (the defaults, Cilium's, hold ~3,100 Services of 20 backends and 65,536
/// distinct backends): a quarter of headroom, rounded up to a power of two.
fn lb_map_sizes(size: &Size) -> String {
    let sized = |entries: usize| (entries + entries / 4).next_power_of_two().max(65_536);
    let backends_per_service = PODS_PER_NAMESPACE / APPS_PER_NAMESPACE;
    format!(
        "bpfMapSizes:\n  lbServices: {}\n  lbBackends: {}\n",
        sized(size.services * (backends_per_service + 1)),
        sized(size.pods),
    )
}

/// The report's rows of the agent.
pub(super) fn agent_rows(
    a: &AgentFigures,
    size: &Size,
    churn_pods: usize,
) -> Vec<(String, f64, String)> {
    let per = |mib: f64, n: usize| mib * 1024.0 / n.max(1) as f64;
    let mut r = vec![
        (
            "agent RSS before pods (MiB)".into(),
            a.rss_start_mib,
            String::new(),
        ),
        (
            "agent RSS after create (MiB)".into(),
            a.rss_services_mib,
            String::new(),
        ),
        (
            "agent RSS per remote endpoint (KiB)".into(),
            per(a.rss_endpoints_mib - a.rss_start_mib, size.pods),
            "≤ 2".into(),
        ),
        (
            "agent RSS per service (KiB)".into(),
            per(a.rss_services_mib - a.rss_endpoints_mib, size.services),
            String::new(),
        ),
        (
            "agent: last pod created → all in ipcache (s)".into(),
            a.endpoints_secs,
            String::new(),
        ),
        (
            "agent: last Service created → all programmed (s)".into(),
            a.services_secs,
            String::new(),
        ),
        (
            "agent RSS after churn (MiB)".into(),
            a.rss_churn_mib,
            String::new(),
        ),
        (
            "agent CPU during churn (cores)".into(),
            a.churn_cpu_cores,
            String::new(),
        ),
        (
            "agent bytes received per churned pod (KiB)".into(),
            a.churn_received_bytes / 1024.0 / churn_pods.max(1) as f64,
            String::new(),
        ),
    ];
    for (map, p) in &a.map_pressure {
        if *p > 0.0 {
            r.push((
                format!("agent {map} map occupancy (%)"),
                p * 100.0,
                String::new(),
            ));
        }
    }
    r
}
