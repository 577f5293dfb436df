//! Issue 12, the node side: services translated by the socket LB, with real connections.
//!
//! One dedicated plane, two simulated nodes (real operator, agents, CNI), each node's agent
//! attached to the node's own cgroup (`<cgroup2>/tendril-sim/<node>`); every client process
//! runs in its pod's (or node's) netns and in that cgroup. Backends `web-a` (node 0) and
//! `web-b` (node 1) run echo servers; `client` runs on node 0.
//!
//! The LBServices are written directly by the test (the operator's services concern is not
//! merged yet; when it is, these objects have no Service behind them, see the report), and
//! every change is followed until each node reports `realizedServicesRevision` >= its
//! revision. Checked:
//! - pod → ClusterIP reaches both the same-node and the other-node backend;
//! - node → ClusterIP (a process of the node's host network) is translated too;
//! - a service without backends refuses the connect (ECONNREFUSED), a NodePort answers on
//!   the node's address and on loopback from the node;
//! - ClientIP affinity keeps one client on one backend;
//! - established connections survive a backend removal (and new ones never go to the
//!   removed backend once realized) and an agent restart (SIGKILL) under traffic;
//! - `NodeNetwork` reports `SocketLB=True` and the agent's metrics count the services;
//! - policy is judged on the backend after translation: an egress policy allowing only
//!   web-a passes a service backed by web-a and drops one backed by web-b.
//!
//! Needs root.

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
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics};
use tokio::io::{AsyncBufReadExt, BufReader};

const TIMEOUT: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;
const CLUSTER_IP: &str = "10.96.77.10";
const EMPTY_IP: &str = "10.96.77.11";
const AFFINITY_IP: &str = "10.96.77.12";
const NODE_PORT: u16 = 30777;

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// One TCP connect (and a line echoed) from a process in `pod`'s netns and cgroup. Ok(true):
/// echoed; Ok(false): refused; the error otherwise.
async fn connect(pod: &SimPod, ip: &str, port: u16) -> Result<bool> {
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

/// A long-lived connection: one line echoed every 200 ms; counts the echoes.
struct Steady {
    child: tokio::process::Child,
    echoes: Arc<AtomicU64>,
}

impl Steady {
    fn start(pod: &SimPod, ip: &str, port: u16) -> Result<Steady> {
        let script = format!(
            "exec 3<>/dev/tcp/{ip}/{port} || exit 3; i=0; while true; do echo $i >&3; \
             read -t 5 line <&3 || exit 1; echo \"$line\"; i=$((i+1)); sleep 0.2; done"
        );
        let mut child = pod.spawn(&["bash", "-c", &script])?;
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

    fn echoes(&self) -> u64 {
        self.echoes.load(Ordering::Relaxed)
    }

    /// Still connected: running, and echoing after `since` echoes.
    async fn wait_more_than(&mut self, since: u64) -> Result<()> {
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

fn lb_service(name: &str, revision: i64, spec: serde_json::Value) -> serde_json::Value {
    let mut spec = spec;
    spec["revision"] = revision.into();
    serde_json::json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "LBService",
        "metadata": { "name": name },
        "spec": spec,
    })
}

fn backend(ip: IpAddr, node: &str) -> serde_json::Value {
    serde_json::json!({
        "portName": "echo", "address": ip.to_string(), "port": PORT, "protocol": "TCP",
        "nodeName": node,
    })
}

fn frontend(type_: &str, address: Option<&str>, port: u16) -> serde_json::Value {
    let mut f =
        serde_json::json!({ "name": "echo", "type": type_, "port": port, "protocol": "TCP" });
    if let Some(a) = address {
        f["address"] = a.into();
    }
    f
}

struct World {
    env: TestEnv,
    servers: BTreeMap<&'static str, EchoServer>,
    pods: BTreeMap<&'static str, SimPod>,
    cluster: SimCluster,
}

impl World {
    async fn apply(&self, body: serde_json::Value) -> Result<()> {
        let api: Api<LBService> = Api::namespaced(self.env.client(), self.env.namespace());
        let name = body["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(
            &name,
            &PatchParams::apply("services-socket-lb-test").force(),
            &Patch::Apply(body),
        )
        .await?;
        Ok(())
    }

    /// Until every node realizes LBService revision `revision`.
    async fn wait_realized(&self, revision: i64) -> Result<()> {
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

    fn ip(&self, pod: &str) -> IpAddr {
        self.pods[pod].ips[0]
    }

    /// Connections accepted by each backend from `peer`.
    fn accepted(&self, peer: IpAddr) -> (u64, u64) {
        (
            self.servers["web-a"].tcp_accepted(peer),
            self.servers["web-b"].tcp_accepted(peer),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socket_lb_translates_service_connections() -> Result<()> {
    let plane = ControlPlane::dedicated("services-socket-lb").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
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
        servers.insert(name, EchoServer::start(&pods[name].sandbox.netns, PORT)?);
    }
    let world = World {
        env,
        servers,
        pods,
        cluster,
    };
    let (node0, node1) = (
        world.cluster.nodes[0].name.clone(),
        world.cluster.nodes[1].name.clone(),
    );
    let (a, b, me) = (world.ip("web-a"), world.ip("web-b"), world.ip("client"));

    // Revision 1: a ClusterIP + NodePort service over both backends, one without backends,
    // one with affinity.
    world
        .apply(lb_service(
            "echo",
            1,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(CLUSTER_IP), 80), frontend("NodePort", None, NODE_PORT)],
                "backends": [backend(a, &node0), backend(b, &node1)],
            }),
        ))
        .await?;
    world
        .apply(lb_service(
            "empty",
            2,
            serde_json::json!({ "frontends": [frontend("ClusterIP", Some(EMPTY_IP), 80)] }),
        ))
        .await?;
    world
        .apply(lb_service(
            "sticky",
            3,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(AFFINITY_IP), 80)],
                "backends": [backend(a, &node0), backend(b, &node1)],
                "sessionAffinity": { "clientIP": { "timeoutSeconds": 300 } },
            }),
        ))
        .await?;
    world.wait_realized(3).await?;

    // The node reports its socket LB.
    let api: Api<NodeNetwork> = Api::all(world.env.client());
    for node in &world.cluster.nodes {
        let nn = api.get(&node.name).await?;
        let conditions = nn.status.map(|s| s.conditions).unwrap_or_default();
        let socket_lb = conditions.iter().find(|c| c.type_ == "SocketLB");
        ensure!(
            socket_lb.is_some_and(|c| c.status == "True"),
            "{}: SocketLB condition {socket_lb:?}",
            node.name
        );
        let metrics = fetch_metrics(node.metrics_port).await?;
        ensure!(
            metrics.value("tendril_services_socket_lb_enabled", &[]) == Some(1.0),
            "socket LB metric"
        );
        ensure!(
            metrics.value("tendril_services_programmed", &[]) == Some(3.0),
            "services programmed: {:?}",
            metrics.value("tendril_services_programmed", &[])
        );
    }

    // Pod → ClusterIP: both backends (same node and other node) answer.
    let client = &world.pods["client"];
    for _ in 0..30 {
        ensure!(connect(client, CLUSTER_IP, 80).await?, "ClusterIP refused");
    }
    let (to_a, to_b) = world.accepted(me);
    ensure!(
        to_a + to_b == 30 && to_a > 0 && to_b > 0,
        "30 connects spread over both backends: web-a {to_a}, web-b {to_b}"
    );

    // Node → ClusterIP and NodePort (node address and loopback), from node 0's host network.
    let node = &world.cluster.nodes[0];
    for target in [
        (CLUSTER_IP.to_string(), 80),
        (node.address.to_string(), NODE_PORT),
        ("127.0.0.1".to_string(), NODE_PORT),
        (world.cluster.nodes[1].address.to_string(), NODE_PORT),
    ] {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && echo hi >&3 && read -t 5 l <&3 && [ \"$l\" = hi ]",
            target.0, target.1
        );
        let out = node.exec(&["timeout", "10", "bash", "-c", &script]).await?;
        ensure!(
            out.status.success(),
            "node → {}:{}: {}",
            target.0,
            target.1,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // No backends: refused at connect.
    ensure!(
        !connect(client, EMPTY_IP, 80).await?,
        "a service without backends must refuse"
    );

    // Affinity: one client, one backend.
    let before = world.accepted(me);
    for _ in 0..10 {
        ensure!(
            connect(client, AFFINITY_IP, 80).await?,
            "affinity service refused"
        );
    }
    let after = world.accepted(me);
    let (da, db) = (after.0 - before.0, after.1 - before.1);
    ensure!(
        (da, db) == (10, 0) || (da, db) == (0, 10),
        "affinity: web-a {da}, web-b {db}"
    );

    // Steady connections, then web-b removed: every one keeps echoing, and no new
    // connection reaches web-b once realized.
    let mut steady = Vec::new();
    for _ in 0..6 {
        steady.push(Steady::start(client, CLUSTER_IP, 80)?);
    }
    for s in &mut steady {
        s.wait_more_than(0).await?;
    }
    world
        .apply(lb_service(
            "echo",
            4,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(CLUSTER_IP), 80), frontend("NodePort", None, NODE_PORT)],
                "backends": [backend(a, &node0)],
            }),
        ))
        .await?;
    world.wait_realized(4).await?;
    let before = world.accepted(me);
    for _ in 0..20 {
        ensure!(connect(client, CLUSTER_IP, 80).await?, "ClusterIP refused");
    }
    let after = world.accepted(me);
    ensure!(
        after.1 == before.1 && after.0 == before.0 + 20,
        "after web-b's removal: web-a +{}, web-b +{}",
        after.0 - before.0,
        after.1 - before.1
    );
    for s in &mut steady {
        let n = s.echoes();
        s.wait_more_than(n).await?;
    }

    // Agent restart (SIGKILL) under traffic: established connections keep echoing, new ones
    // keep being translated, while it is down and after.
    let mut world = world;
    let echoes: Vec<u64> = steady.iter().map(Steady::echoes).collect();
    world.cluster.nodes[0].kill_agent();
    for (s, n) in steady.iter_mut().zip(&echoes) {
        s.wait_more_than(*n).await?;
    }
    ensure!(
        connect(&world.pods["client"], CLUSTER_IP, 80).await?,
        "ClusterIP while the agent is down"
    );
    world.cluster.nodes[0].start_agent()?;
    world.cluster.nodes[0]
        .wait_ready(&world.env.client())
        .await?;
    world
        .apply(lb_service(
            "echo",
            5,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(CLUSTER_IP), 80), frontend("NodePort", None, NODE_PORT)],
                "backends": [backend(a, &node0), backend(b, &node1)],
            }),
        ))
        .await?;
    world.wait_realized(5).await?;
    let echoes: Vec<u64> = steady.iter().map(Steady::echoes).collect();
    for (s, n) in steady.iter_mut().zip(&echoes) {
        s.wait_more_than(*n).await?;
    }
    let before = world.accepted(me);
    for _ in 0..20 {
        ensure!(
            connect(&world.pods["client"], CLUSTER_IP, 80).await?,
            "ClusterIP after the restart"
        );
    }
    let after = world.accepted(me);
    ensure!(
        after.1 > before.1 && after.0 > before.0,
        "web-b back after the restart: web-a +{}, web-b +{}",
        after.0 - before.0,
        after.1 - before.1
    );
    drop(steady);

    // Policy is judged on the backend: an egress policy of `client` that allows only
    // web-a lets connections through a service whose backend is web-a and drops those
    // translated to web-b (the service addresses appear in no policy).
    let ns = world.env.namespace().to_string();
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: only-web-a, namespace: {ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n\
             \x20 egress:\n  - to: [{{podSelector: {{matchLabels: {{app: web-a}}}}}}]\n\
             \x20   ports: [{{protocol: TCP, port: {PORT}}}]\n"
        ))
        .await?;
    for (name, revision, ip, target, node_name) in [
        ("to-a", 6, "10.96.77.20", a, &node0),
        ("to-b", 7, "10.96.77.21", b, &node1),
    ] {
        world
            .apply(lb_service(
                name,
                revision,
                serde_json::json!({
                    "frontends": [frontend("ClusterIP", Some(ip), 80)],
                    "backends": [backend(target, node_name)],
                }),
            ))
            .await?;
    }
    world.wait_realized(7).await?;
    let client = &world.pods["client"];
    eventually(TIMEOUT, || async {
        let script = "exec 3<>/dev/tcp/10.96.77.21/80";
        let denied = !client
            .exec(&["timeout", "3", "bash", "-c", script])
            .await?
            .status
            .success();
        ensure!(denied, "web-b is still reachable through its service");
        Ok(())
    })
    .await?;
    ensure!(
        connect(client, "10.96.77.20", 80).await?,
        "web-a must stay reachable through its service"
    );
    Ok(())
}
