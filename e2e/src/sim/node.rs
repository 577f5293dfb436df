//! [`SimNode`]: a simulated node — its namespace on the underlay, its `Node` object and its
//! `tendril-agent` process.

use super::*;

/// A simulated node of a test: namespace on the underlay, Node object, one agent.
/// Dropping it stops the agent and removes the namespace, state and pin directories.
pub struct SimNode {
    pub name: String,
    pub address: Ipv4Addr,
    /// The node's IPv6 underlay address (its second `InternalIP`).
    pub address6: Ipv6Addr,
    pub netns: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs_root: PathBuf,
    pub metrics_port: u16,
    /// The agent's Observer API (Hubble flows) on 127.0.0.1.
    pub observer_port: u16,
    /// The node's cgroup v2 subtree (socket LB), removed on drop.
    pub cgroup: Option<PathBuf>,
    kubeconfig: PathBuf,
    agent: Option<Process>,
    /// More arguments of the agent, every time it starts.
    agent_args: Vec<String>,
    handle: NodeHandle,
}

impl SimNode {
    /// Brings node `index` up on `cluster`'s underlay (which must exist, see
    /// [`ensure_underlay`]) and starts its agent. The Node object is deleted with `env`.
    pub async fn start(env: &TestEnv, cluster: &str, subnet: u8, index: u8) -> Result<SimNode> {
        Self::start_with(env, cluster, subnet, index, &[]).await
    }

    /// [`SimNode::start`] with more arguments of the agent.
    pub async fn start_with(
        env: &TestEnv,
        cluster: &str,
        subnet: u8,
        index: u8,
        agent_args: &[String],
    ) -> Result<SimNode> {
        let name = env.unique_name(&format!("node{index}"));
        let address = node_address(subnet, index);
        let address6 = node_address6(subnet, index);
        let state_dir = std::env::temp_dir().join(format!("tendril-sim-{name}"));
        let bpffs_root = PathBuf::from("/sys/fs/bpf/tendril-sim").join(&name);
        let socket = state_dir.join("cni.sock");
        let cgroup = create_node_cgroup(&name)?;
        let mut node = SimNode {
            cgroup: cgroup.clone(),
            netns: node_netns(&name),
            address,
            address6,
            state_dir,
            socket: socket.clone(),
            bpffs_root,
            metrics_port: free_port()?,
            observer_port: free_port()?,
            kubeconfig: env.kubeconfig(),
            agent: None,
            agent_args: agent_args.to_vec(),
            handle: NodeHandle {
                name: name.clone(),
                address,
                netns: node_netns(&name),
                conflist: conflist(&socket),
                cni_bin_dir: target_bin_dir(),
                cgroup,
            },
            name,
        };
        // From here on Drop cleans up whatever was made.
        std::fs::create_dir_all(&node.state_dir)?;
        std::fs::write(
            node.state_dir.join("10-tendril.conflist"),
            serde_json::to_vec_pretty(&node.handle.conflist)?,
        )?;
        ensure_node_netns(cluster, &node.name, index, address).await?;
        add_node_address6(&node.name, address6).await?;
        env.delete_on_drop::<Node>(&node.name);
        env.delete_on_drop::<NodeNetwork>(&node.name);
        ensure_node_object_with(
            &env.client(),
            &node.name,
            &[IpAddr::V4(address), IpAddr::V6(address6)],
            &BTreeMap::new(),
        )
        .await?;
        node.start_agent()?;
        Ok(node)
    }

    /// What pods need of this node.
    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// Starts the agent (again), with the same state directory, socket and metrics port.
    pub fn start_agent(&mut self) -> Result<()> {
        let mut agent = Process::builder("tendril-agent");
        if let Some(cgroup) = &self.cgroup {
            agent = agent.arg("--socket-lb-cgroup-path").arg(cgroup);
        }
        let agent = agent
            .name(format!("tendril-agent-{}", self.name))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--node-name", &self.name])
            .arg("--node-netns")
            .arg(netns_path(&self.netns))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--cni-socket")
            .arg(&self.socket)
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .args([
                "--metrics-bind",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            .args([
                "--observer-bind",
                &format!("127.0.0.1:{}", self.observer_port),
            ])
            // Test-short: an address restored at start for an Endpoint whose pod is already
            // gone (the garbage collector lags) is released after 10 s, not 5 minutes.
            .args([
                "--ipam-resync-seconds",
                "5",
                "--ipam-leak-grace-seconds",
                "10",
            ])
            // One WireGuard interface name per node: the configuration socket
            // (/var/run/wireguard/<name>.sock) is shared by every namespace.
            .env("TENDRIL_WIREGUARD_INTERFACE", self.wireguard_interface())
            .args(&self.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("TENDRIL_SIM_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()?;
        self.agent = Some(agent);
        Ok(())
    }

    /// The newest flows the agent dropped (at most 500), as `tendrilctl observe -o json`
    /// prints them (one Hubble `GetFlowsResponse` each).
    pub async fn dropped_flows(&self) -> Result<Vec<serde_json::Value>> {
        let observer = format!("127.0.0.1:{}", self.observer_port);
        let out = tokio::process::Command::new(target_bin_dir().join("tendrilctl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["observe", "--server", &observer, "--verdict", "DROPPED"])
            .args(["--last", "500", "-o", "json"])
            .output()
            .await
            .context("running tendrilctl (build it: cargo build --workspace --bins)")?;
        anyhow::ensure!(out.status.success(), "tendrilctl observe: {out:?}");
        String::from_utf8(out.stdout)?
            .lines()
            .map(|line| Ok(serde_json::from_str(line)?))
            .collect()
    }

    /// The node's WireGuard interface (unique on the machine, see `start_agent`).
    pub fn wireguard_interface(&self) -> String {
        let hash = self.name.bytes().fold(0x811c9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x01000193)
        });
        format!("twg{hash:08x}")
    }

    /// Runs `cmd` inside the node's network namespace (and cgroup), as a process of the
    /// node's host network would.
    pub async fn exec(&self, cmd: &[&str]) -> Result<std::process::Output> {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.netns])
            .args(cmd)
            .stdin(Stdio::null());
        place_in_cgroup(&mut command, self.cgroup.as_deref());
        Ok(command.output().await?)
    }

    /// The running agent, if any.
    pub fn agent(&mut self) -> Option<&mut Process> {
        self.agent.as_mut()
    }

    /// SIGKILL, as a crash: no cleanup of the socket or anything else.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// Waits until the agent reports Ready in the node's NodeNetwork.
    pub async fn wait_ready(&self, client: &Client) -> Result<NodeNetwork> {
        wait_node_network_ready(client, &self.name, WAIT)
            .await
            .with_context(|| {
                self.agent
                    .as_ref()
                    .map(|a| a.log_tail(30))
                    .unwrap_or_default()
            })
    }

    /// `tendril_agent_ips_in_use` from the agent's metrics.
    pub async fn ips_in_use(&self) -> Result<f64> {
        fetch_metrics(self.metrics_port)
            .await?
            .value("tendril_agent_ips_in_use", &[])
            .context("tendril_agent_ips_in_use missing")
    }

    /// Waits until the agent's metrics say `n` addresses are in use.
    pub async fn wait_ips_in_use(&self, n: f64) -> Result<()> {
        eventually(WAIT, || async move {
            let v = self.ips_in_use().await?;
            anyhow::ensure!(v == n, "{v} addresses in use, waiting for {n}");
            Ok(())
        })
        .await
    }

    /// Allocation records on disk (`{state}/ipam/*.json`).
    pub fn allocation_records(&self) -> Result<Vec<PathBuf>> {
        let dir = self.state_dir.join("ipam");
        let mut out = Vec::new();
        if dir.exists() {
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "json") {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop(Duration::from_secs(10));
        }
        if let Some(cgroup) = &self.cgroup {
            remove_node_cgroup(cgroup);
        }
        delete_netns(&self.netns);
        // Both devices of a key rotation (odd and even generations).
        for suffix in ["", "b"] {
            let _ = std::fs::remove_file(format!(
                "/var/run/wireguard/{}{suffix}.sock",
                self.wireguard_interface()
            ));
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
    }
}
