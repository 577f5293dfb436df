//! [`SimCluster`]: an underlay with several simulated nodes, for tests and `tendril-sim`.

use super::*;

/// Settings of a [`SimCluster`].
#[derive(Clone, Debug)]
pub struct SimClusterConfig {
    pub nodes: u8,
    /// The default PodIPPool's IPv4 CIDR and per-node mask size.
    pub pool_cidr: String,
    pub mask_size: u8,
    /// An IPv6 CIDR and per-node mask size for the pool too: dual-stack pods.
    pub pool_ipv6: Option<(String, u8)>,
    /// `identities.gcGracePeriodSeconds` of the operator.
    pub identity_grace_seconds: u64,
    /// More arguments of every agent (e.g. `--routing-mode native`).
    pub agent_args: Vec<String>,
}

impl Default for SimClusterConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            pool_cidr: "10.200.0.0/16".into(),
            mask_size: 24,
            pool_ipv6: None,
            identity_grace_seconds: 900,
            agent_args: Vec::new(),
        }
    }
}

/// N simulated nodes with their agents, the operator (a [`Process`]) and a default
/// `PodIPPool`, on `env`'s plane. The operator's ipam concern writes every NodeNetwork of
/// the plane, so give a cluster a [`crate::ControlPlane::dedicated`] plane.
pub struct SimCluster {
    // Field order is drop order: nodes (agents, namespaces) before the underlay.
    pub nodes: Vec<SimNode>,
    pub operator: Process,
    pub operator_port: u16,
    pub underlay: Underlay,
    config_path: PathBuf,
    kubeconfig: PathBuf,
}

impl SimCluster {
    pub async fn start(env: &TestEnv, config: SimClusterConfig) -> Result<SimCluster> {
        sweep_stale_netns();
        sweep_stale_cgroups();
        let client = env.client();
        let cluster = format!(
            "{}-{}",
            std::process::id(),
            rand::rng().random_range(0..9999)
        );
        let underlay = Underlay::new(&cluster).await?;
        let pool = format!(
            "apiVersion: tendril.dev/v1alpha1\nkind: PodIPPool\nmetadata: {{name: default}}\n\
             spec: {{ipv4: {{cidrs: [\"{}\"], maskSize: {}}}{}}}",
            config.pool_cidr,
            config.mask_size,
            config
                .pool_ipv6
                .as_ref()
                .map(|(cidr, mask)| format!(", ipv6: {{cidrs: [\"{cidr}\"], maskSize: {mask}}}"))
                .unwrap_or_default()
        );
        env.apply_yaml(&pool).await?;
        env.delete_on_drop::<tendril_crds::v1alpha1::PodIPPool>("default");
        let config_path =
            std::env::temp_dir().join(format!("{}.yaml", env.unique_name("sim-operator")));
        std::fs::write(
            &config_path,
            format!(
                "identities:\n  gcGracePeriodSeconds: {}\n",
                config.identity_grace_seconds
            ),
        )?;
        let operator_port = free_port()?;
        let kubeconfig = env.kubeconfig();
        let operator = start_operator(&kubeconfig, &config_path, operator_port).await?;
        let mut nodes = Vec::new();
        for i in 0..config.nodes {
            nodes.push(SimNode::start_with(env, &cluster, 0, i, &config.agent_args).await?);
        }
        for node in &nodes {
            node.wait_ready(&client).await?;
        }
        Ok(SimCluster {
            nodes,
            operator,
            operator_port,
            underlay,
            config_path,
            kubeconfig,
        })
    }

    /// Kills the operator (SIGKILL: no graceful shutdown, as a crash or an evicted pod).
    pub fn kill_operator(&mut self) {
        self.operator.kill();
    }

    /// Starts a new operator process (same configuration and metrics port) and waits
    /// until its caches synced.
    pub async fn start_operator(&mut self) -> Result<()> {
        self.operator =
            start_operator(&self.kubeconfig, &self.config_path, self.operator_port).await?;
        Ok(())
    }
}

async fn start_operator(kubeconfig: &Path, config: &Path, metrics_port: u16) -> Result<Process> {
    let mut operator = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--config")
        .arg(config)
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .env(
            "RUST_LOG",
            std::env::var("TENDRIL_SIM_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .spawn()?;
    operator.wait_for_log("caches synced", WAIT).await?;
    Ok(operator)
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}
