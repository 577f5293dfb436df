//! Helpers shared by the services_* tests: a two-node cluster with echo-server backends
//! `web-a` (node 0) and `web-b` (node 1) and a `client` pod on node 0, LBServices written
//! directly (server-side apply, no Service behind them: the services concern leaves a
//! hand-written LBService alone and the agents program it as written, so each test controls
//! states and flags exactly; the Service → LBService path is operator_services' and
//! services_conformance's), waits on
//! `NodeNetwork.status.realizedServicesRevision`, and connections made by bash's /dev/tcp
//! from processes in a pod's or node's namespace (and its node's cgroup).

#![allow(dead_code)]

pub mod external;
mod outside;
#[allow(unused_imports, reason = "not every test uses it")]
pub use outside::Outside;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::{Api, Patch, PatchParams};
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::traffic::EchoServer;
use tendril_e2e::{ControlPlane, TestEnv, eventually};
use tokio::io::{AsyncBufReadExt, BufReader};

pub const TIMEOUT: Duration = Duration::from_secs(120);
pub const PORT: u16 = 8080;
pub const CLUSTER_IP: &str = "10.96.77.10";
pub const EMPTY_IP: &str = "10.96.77.11";
pub const AFFINITY_IP: &str = "10.96.77.12";
pub const NODE_PORT: u16 = 30777;

pub fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// One TCP connect (and a line echoed) from a process in `pod`'s netns and cgroup. Ok(true):
/// echoed; Ok(false): refused; the error otherwise.
pub async fn connect(pod: &SimPod, ip: &str, port: u16) -> Result<bool> {
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} || exit 3; echo hello >&3; read -t 5 line <&3 && [ \"$line\" = hello ]"
    );
    let out = pod.exec(&["timeout", "10", "bash", "-c", &script]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(true);
    }
    if stderr.contains("Connection refused") {
        return Ok(false);
    }
    anyhow::bail!("connect to {ip}:{port}: {:?} {stderr}", out.status)
}

/// One UDP exchange over a connected socket (connect4 translates it) from `pod`: a
/// datagram sent and its echo received.
pub async fn udp_exchange(pod: &SimPod, ip: &str, port: u16) -> Result<bool> {
    // `head` reads the datagram whole (bash's `read` takes one byte, and UDP drops the rest).
    let script = format!(
        "exec 3<>/dev/udp/{ip}/{port} || exit 3; echo hello >&3; \
         line=$(timeout 3 head -n1 <&3); [ \"$line\" = hello ]"
    );
    Ok(pod
        .exec(&["timeout", "10", "bash", "-c", &script])
        .await?
        .status
        .success())
}

/// One UDP exchange over an unconnected socket (sendmsg4 translates the datagram,
/// recvmsg4 shows the answer as coming from the frontend): `socat UDP-SENDTO` accepts
/// answers from the address it sent to only.
pub async fn udp_sendto_exchange(pod: &SimPod, ip: &str, port: u16) -> Result<bool> {
    let script = format!("echo hello | timeout 5 socat -T3 - UDP-SENDTO:{ip}:{port}");
    let out = pod.exec(&["bash", "-c", &script]).await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "hello")
}

/// A long-lived connection: one line echoed every 200 ms; counts the echoes.
pub struct Steady {
    child: tokio::process::Child,
    echoes: Arc<AtomicU64>,
}

impl Steady {
    /// From a process in `pod`'s namespace and its node's cgroup (the socket LB).
    pub fn start(pod: &SimPod, ip: &str, port: u16) -> Result<Steady> {
        Self::from_child(pod.spawn(&["bash", "-c", &Self::script(ip, port)])?)
    }

    /// From a process in network namespace `netns`, in no node's cgroup.
    pub fn start_in_netns(netns: &str, ip: &str, port: u16) -> Result<Steady> {
        let child = tokio::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "bash",
                "-c",
                &Self::script(ip, port),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Self::from_child(child)
    }

    fn script(ip: &str, port: u16) -> String {
        format!(
            "exec 3<>/dev/tcp/{ip}/{port} || exit 3; i=0; while true; do echo $i >&3; \
             read -t 5 line <&3 || exit 1; echo \"$line\"; i=$((i+1)); sleep 0.2; done"
        )
    }

    fn from_child(mut child: tokio::process::Child) -> Result<Steady> {
        let echoes = Arc::new(AtomicU64::new(0));
        let stdout = child.stdout.take().context("stdout")?;
        let counter = echoes.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(_)) = lines.next_line().await {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Steady { child, echoes })
    }

    pub fn echoes(&self) -> u64 {
        self.echoes.load(Ordering::Relaxed)
    }

    /// Still connected: running, and echoing after `since` echoes.
    pub async fn wait_more_than(&mut self, since: u64) -> Result<()> {
        eventually(Duration::from_secs(10), || async {
            ensure!(
                self.echoes() > since + 3,
                "{} echoes, waiting",
                self.echoes()
            );
            Ok(())
        })
        .await?;
        ensure!(
            self.child.try_wait()?.is_none(),
            "the connection's process exited"
        );
        Ok(())
    }
}

/// An LBService body; `tendril.dev/service-changed-at` is now, as the services concern
/// stamps it (the agents' network-programming histogram starts there).
pub fn lb_service(name: &str, revision: i64, spec: serde_json::Value) -> serde_json::Value {
    let mut spec = spec;
    spec["revision"] = revision.into();
    serde_json::json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "LBService",
        "metadata": {
            "name": name,
            "annotations": {
                tendril_crds::facts::annotations::SERVICE_CHANGED_AT:
                    k8s_openapi::jiff::Timestamp::now().to_string(),
            },
        },
        "spec": spec,
    })
}

pub fn backend(ip: IpAddr, node: &str) -> serde_json::Value {
    serde_json::json!({
        "portName": "echo", "address": ip.to_string(), "port": PORT, "protocol": "TCP",
        "nodeName": node,
    })
}

pub fn frontend(type_: &str, address: Option<&str>, port: u16) -> serde_json::Value {
    let mut f =
        serde_json::json!({ "name": "echo", "type": type_, "port": port, "protocol": "TCP" });
    if let Some(a) = address {
        f["address"] = a.into();
    }
    f
}

/// The cluster, its pods and the backends' echo servers.
pub struct World {
    pub env: TestEnv,
    pub servers: BTreeMap<&'static str, EchoServer>,
    pub pods: BTreeMap<&'static str, SimPod>,
    pub cluster: SimCluster,
}

impl World {
    /// A dedicated plane, two nodes, `web-a`/`web-b` serving on [`PORT`], `client` on node 0.
    pub async fn start(plane: &str) -> Result<World> {
        Self::start_with(plane, SimClusterConfig::default()).await
    }

    /// [`World::start`] with dual-stack pods (`pool6` beside the IPv4 pool, a /112 per node),
    /// the backends serving both families; `agent_args` as in [`SimClusterConfig`].
    pub async fn start_dual_stack(plane: &str, pool6: &str, agent_args: &[&str]) -> Result<World> {
        let config = SimClusterConfig {
            pool_ipv6: Some((pool6.into(), 112)),
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            ..SimClusterConfig::default()
        };
        Self::start_with(plane, config).await
    }

    async fn start_with(plane: &str, config: SimClusterConfig) -> Result<World> {
        let dual_stack = config.pool_ipv6.is_some();
        let plane = ControlPlane::dedicated(plane).await?;
        let env = TestEnv::on(plane).await?;
        let client = env.client();
        let cluster = SimCluster::start(&env, config).await?;
        ensure!(
            cluster.nodes.iter().all(|n| n.cgroup.is_some()),
            "no cgroup v2 on this machine: the socket LB cannot be tested"
        );
        let ns = env.namespace().to_string();
        let mut pods = BTreeMap::new();
        for (name, node) in [("web-a", 0usize), ("web-b", 1), ("client", 0)] {
            let pod = SimPod::run(
                &client,
                cluster.nodes[node].handle(),
                &ns,
                name,
                &labels(name),
            )
            .await?;
            pod.wait_realized(&client, TIMEOUT).await?;
            pods.insert(name, pod);
        }
        let mut servers = BTreeMap::new();
        for name in ["web-a", "web-b"] {
            let netns = &pods[name].sandbox.netns;
            let server = if dual_stack {
                EchoServer::start_dual_stack(netns, PORT)?
            } else {
                EchoServer::start(netns, PORT)?
            };
            servers.insert(name, server);
        }
        Ok(World {
            env,
            servers,
            pods,
            cluster,
        })
    }

    pub async fn apply(&self, body: serde_json::Value) -> Result<()> {
        let api: Api<LBService> = Api::namespaced(self.env.client(), self.env.namespace());
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(
            &name,
            &PatchParams::apply("services-e2e-test").force(),
            &Patch::Apply(body),
        )
        .await?;
        Ok(())
    }

    /// Until every node realizes LBService revision `revision`.
    pub async fn wait_realized(&self, revision: i64) -> Result<()> {
        let api: Api<NodeNetwork> = Api::all(self.env.client());
        for node in &self.cluster.nodes {
            eventually(TIMEOUT, || async {
                let nn = api.get(&node.name).await?;
                let realized = nn.status.and_then(|s| s.realized_services_revision);
                ensure!(
                    realized >= Some(revision),
                    "{} realizes services revision {realized:?}, waiting for {revision}",
                    node.name
                );
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    pub fn ip(&self, pod: &str) -> IpAddr {
        self.pods[pod].ips[0]
    }

    /// The pod's IPv6 address (a [`World::start_dual_stack`] world).
    pub fn ip6(&self, pod: &str) -> IpAddr {
        *self.pods[pod]
            .ips
            .iter()
            .find(|ip| ip.is_ipv6())
            .expect("a dual-stack pod")
    }

    pub fn node_name(&self, index: usize) -> String {
        self.cluster.nodes[index].name.clone()
    }

    /// Connections accepted by each backend from `peer`.
    pub fn accepted(&self, peer: IpAddr) -> (u64, u64) {
        (
            self.servers["web-a"].tcp_accepted(peer),
            self.servers["web-b"].tcp_accepted(peer),
        )
    }
}

/// One TCP connect from a process in network namespace `netns` outside any node's cgroup
/// (a client outside the cluster, or a pod process the socket LB does not cover).
pub async fn connect_from_netns(netns: &str, ip: &str, port: u16) -> Result<bool> {
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} || exit 3; echo hello >&3; read -t 5 line <&3 && [ \"$line\" = hello ]"
    );
    let out = tokio::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "timeout", "10", "bash", "-c", &script,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Ok(true);
    }
    if stderr.contains("Connection refused") {
        return Ok(false);
    }
    anyhow::bail!(
        "connect from {netns} to {ip}:{port}: {:?} {stderr}",
        out.status
    )
}
