//! `tendril-agent` against the real API server: pod CIDRs from its `NodeNetwork`,
//! allocations reconciled with the node's `Endpoint`s (a live Endpoint without a record is
//! restored, an old record without an Endpoint released), `NodeNetwork.status` written by
//! server-side apply, metrics and readiness, clean SIGTERM. The agent process runs in the
//! host namespace (to reach the API server) and configures a node namespace this test
//! creates (`--node-netns`); the plugin runs inside that namespace. Needs root.

use anyhow::{Context, Result};
use serde_json::json;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_datapath::cni::api::{self, AttachmentRef, Request, Response};
use tendril_datapath::ipam::{Attachment, Ipam, Owner};
use tendril_e2e::{Process, TestEnv, eventually, fetch_metrics, http_get};

const AGENT: &str = env!("CARGO_BIN_EXE_tendril-agent");
const PLUGIN: &str = env!("CARGO_BIN_EXE_tendril-cni");
const WAIT: Duration = Duration::from_secs(90);

struct Netns(String);

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Netns {
    fn new(prefix: &str) -> Self {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("{prefix}{}-{n}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Netns(name)
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cni_add(node: &Netns, socket: &Path, container: &str, pod: &Netns) -> serde_json::Value {
    let (ok, result) = cni(node, socket, "ADD", container, pod);
    assert!(ok, "ADD failed: {result}");
    result
}

fn cni(
    node: &Netns,
    socket: &Path,
    command: &str,
    container: &str,
    pod: &Netns,
) -> (bool, serde_json::Value) {
    let conf = json!({"cniVersion": "1.1.0", "name": "tendril", "type": "tendril-cni", "agentSocket": socket});
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.0, PLUGIN])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let result = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), result)
}

/// The agent's own bpffs pin directory, removed (maps and link pins) when dropped, so
/// test runs never leave pins under the default root.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running agent and its pin directory; fields drop in order: the process first.
struct Agent {
    process: Process,
    _pins: PinDir,
}

impl std::ops::Deref for Agent {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

fn spawn_agent(
    env: &TestEnv,
    node_name: &str,
    node: &Netns,
    state: &Path,
    port: u16,
) -> Result<Agent> {
    let pins = PinDir(std::path::PathBuf::from("/sys/fs/bpf/tendril-test").join(node_name));
    let process = Process::builder(AGENT)
        .name(format!("tendril-agent-{node_name}"))
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .args(["--node-name", node_name])
        .arg("--node-netns")
        .arg(node.path())
        .arg("--state-dir")
        .arg(state)
        .arg("--bpffs-root")
        .arg(&pins.0)
        .arg("--cni-socket")
        .arg(state.join("cni.sock"))
        .args(["--metrics-bind", &format!("127.0.0.1:{port}")])
        .args([
            "--ipam-leak-grace-seconds",
            "30",
            "--ipam-resync-seconds",
            "2",
        ])
        .env("RUST_LOG", "info")
        .spawn()?;
    Ok(Agent {
        process,
        _pins: pins,
    })
}

fn ready_condition(nn: Option<&NodeNetwork>) -> Option<(String, String)> {
    let status = nn?.status.as_ref()?;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((ready.status.clone(), ready.reason.clone()))
}

#[tokio::test]
async fn agent_serves_its_node_network_and_reconciles_with_endpoints() -> Result<()> {
    let env = TestEnv::new().await?;
    let node_name = env.unique_name("agent-node");
    let node = Netns::new("tan");
    node.ip(&["link", "set", "lo", "up"]);
    node.ip(&["link", "add", "underlay0", "type", "bridge"]);
    node.ip(&["addr", "add", "10.99.7.1/24", "dev", "underlay0"]);
    let pod = Netns::new("tap");

    // Before the agent starts: one stale record (its pod is gone), one live Endpoint whose
    // record is missing (e.g. the state directory was lost) and whose sandbox is still
    // wired (host veth + /32 route), and one Endpoint outliving its pod's DEL (nothing
    // wired): only the live one is restored.
    let state = tempfile::tempdir()?;
    {
        let (mut ipam, _) = Ipam::open(&state.path().join("ipam"))?;
        ipam.set_pools(&["10.43.7.0/24".parse()?])?;
        let owner = Owner {
            pod_namespace: Some(env.namespace().into()),
            pod_name: Some("gone".into()),
            netns: None,
        };
        let stale = ipam.allocate(&Attachment::new("stale-container", "eth0")?, owner, 0)?;
        assert_eq!(stale.ips, vec!["10.43.7.2".parse::<IpAddr>()?]);
    }
    let networks = env.cluster_api::<NodeNetwork>();
    env.delete_on_drop::<NodeNetwork>(&node_name);
    env.apply_yaml(&format!(
        "apiVersion: tendril.dev/v1alpha1\nkind: NodeNetwork\nmetadata: {{name: {node_name}}}\n\
         spec: {{podCIDRs: [10.43.7.0/24], addresses: [{{type: InternalIP, address: 10.99.7.1}}, {{type: InternalIP, address: 192.0.2.9}}]}}"
    ))
    .await?;
    env.apply_yaml(&format!(
        "apiVersion: tendril.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: live}}\n\
         spec: {{node: {node_name}, ips: [10.43.7.77], revision: 1}}"
    ))
    .await?;
    env.apply_yaml(&format!(
        "apiVersion: tendril.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: departed}}\n\
         spec: {{node: {node_name}, ips: [10.43.7.78], revision: 1}}"
    ))
    .await?;
    node.ip(&[
        "link",
        "add",
        "tdrlive0000001",
        "type",
        "veth",
        "peer",
        "name",
        "livepeer",
    ]);
    node.ip(&["link", "set", "tdrlive0000001", "up"]);
    node.ip(&["link", "set", "livepeer", "up"]);
    node.ip(&["route", "add", "10.43.7.77/32", "dev", "tdrlive0000001"]);

    let port = free_port();
    let socket = state.path().join("cni.sock");
    let mut agent = spawn_agent(&env, &node_name, &node, state.path(), port)?;

    let nn = env
        .wait_for(
            &networks,
            &node_name,
            |nn: Option<&NodeNetwork>| ready_condition(nn).is_some_and(|(s, _)| s == "True"),
            WAIT,
        )
        .await
        .with_context(|| agent.log_tail(40))?
        .context("NodeNetwork gone")?;
    let status = nn.status.clone().unwrap();
    assert_eq!(
        status.agent_version.as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let addresses: Vec<&str> = status
        .addresses
        .iter()
        .map(|a| a.address.as_str())
        .collect();
    assert_eq!(
        addresses,
        vec!["10.99.7.1"],
        "only the InternalIP configured on the node is reported"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.observed_generation, nn.metadata.generation);
    let managers: Vec<_> = nn
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "tendril-agent"),
        "{managers:?}"
    );

    // The stale record is gone, the live Endpoint's address is held, the departed one's not.
    let call = |request: Request| api::call(&socket, &request, Duration::from_secs(10));
    let status = match call(Request::Status)? {
        Response::Status(status) => status,
        other => panic!("{other:?}"),
    };
    assert!(status.ready);
    assert_eq!(status.in_use, 1, "{status:?}");
    let stale = call(Request::Check(AttachmentRef {
        container_id: "stale-container".into(),
        ifname: "eth0".into(),
    }))?;
    assert!(matches!(stale, Response::Error(_)), "{stale:?}");

    // The gateway lives in the node's namespace, not ours.
    let gateway = node.ip(&["-o", "addr", "show", "dev", "tendril_host"]);
    assert!(gateway.contains("10.43.7.1/32"), "{gateway}");

    // A pod gets an address that is neither the gateway nor the restored one, and reaches
    // its gateway.
    let result = cni_add(&node, &socket, "kube-pod-1", &pod);
    let ip = result["ips"][0]["address"].as_str().unwrap();
    assert_ne!(ip, "10.43.7.77/32");
    assert!(ip.starts_with("10.43.7."), "{ip}");
    let ping = Command::new("ip")
        .args(["netns", "exec", &pod.0, "ping", "-c1", "-W5", "10.43.7.1"])
        .status()?;
    assert!(ping.success());

    // Metrics and readiness through the harness's HTTP server.
    let metrics = eventually(WAIT, || async move {
        let m = fetch_metrics(port).await?;
        anyhow::ensure!(
            m.value("tendril_agent_ips_in_use", &[]) == Some(2.0),
            "ips_in_use not 2 yet"
        );
        Ok(m)
    })
    .await?;
    assert_eq!(
        metrics.value("tendril_agent_ip_pool_size", &[]),
        Some(253.0)
    );
    assert_eq!(
        metrics.value(
            "tendril_agent_ip_allocations_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metrics.value("tendril_agent_ip_leaks_released_total", &[]),
        Some(1.0)
    );
    // Ready once the datapath realized the node too (it converges right after IPAM).
    eventually(WAIT, || async move {
        let (code, body) = http_get(port, "/readyz").await?;
        anyhow::ensure!(code == 200, "/readyz {code}: {body}");
        Ok(())
    })
    .await?;

    // The pod CIDR is taken away: the agent stops serving and says why.
    env.apply_yaml(&format!("apiVersion: tendril.dev/v1alpha1\nkind: NodeNetwork\nmetadata: {{name: {node_name}}}\nspec: {{podCIDRs: []}}"))
        .await?;
    env.wait_for(
        &networks,
        &node_name,
        |nn: Option<&NodeNetwork>| ready_condition(nn).is_some_and(|(_, r)| r == "NoPodCIDR"),
        WAIT,
    )
    .await?;

    let exit = agent
        .stop(Duration::from_secs(30))
        .context("agent did not exit")?;
    assert!(exit.success(), "SIGTERM: {exit:?}\n{}", agent.log_tail(20));
    assert!(!socket.exists());
    Ok(())
}

/// Two simulated nodes, one agent each: every pod gets an address from its own node's
/// CIDR, both NodeNetworks report Ready, and DEL gives every address back.
#[tokio::test]
async fn two_nodes_allocate_from_their_own_cidrs() -> Result<()> {
    const PODS_PER_NODE: usize = 3;
    let env = TestEnv::new().await?;
    let networks = env.cluster_api::<NodeNetwork>();
    let mut nodes = Vec::new();
    for (i, cidr) in ["10.44.1.0/24", "10.44.2.0/24"].into_iter().enumerate() {
        let name = env.unique_name(&format!("node{i}"));
        env.delete_on_drop::<NodeNetwork>(&name);
        env.apply_yaml(&format!(
            "apiVersion: tendril.dev/v1alpha1\nkind: NodeNetwork\nmetadata: {{name: {name}}}\nspec: {{podCIDRs: [{cidr}]}}"
        ))
        .await?;
        let netns = Netns::new("tan");
        netns.ip(&["link", "set", "lo", "up"]);
        let state = tempfile::tempdir()?;
        let agent = spawn_agent(&env, &name, &netns, state.path(), free_port())?;
        nodes.push((name, cidr.parse::<ipnet::IpNet>()?, netns, state, agent));
    }
    for (name, _, _, _, agent) in &nodes {
        env.wait_for(
            &networks,
            name,
            |nn: Option<&NodeNetwork>| ready_condition(nn).is_some_and(|(s, _)| s == "True"),
            WAIT,
        )
        .await
        .with_context(|| agent.log_tail(40))?;
    }
    let mut pods = Vec::new();
    for (n, (_, cidr, netns, state, _)) in nodes.iter().enumerate() {
        let socket = state.path().join("cni.sock");
        for p in 0..PODS_PER_NODE {
            let pod = Netns::new("tap");
            let container = format!("n{n}p{p}");
            let result = cni_add(netns, &socket, &container, &pod);
            let ip: IpAddr = result["ips"][0]["address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .parse()?;
            assert!(cidr.contains(&ip), "{ip} is not from node {n}'s {cidr}");
            assert_eq!(
                result["ips"][0]["gateway"].as_str().unwrap(),
                cidr.hosts().next().unwrap().to_string()
            );
            let gw = cidr.hosts().next().unwrap().to_string();
            let ping = Command::new("ip")
                .args(["netns", "exec", &pod.0, "ping", "-c1", "-W5", &gw])
                .status()?;
            assert!(ping.success(), "pod {container} cannot reach {gw}");
            pods.push((n, container, pod));
        }
    }
    for (n, container, pod) in &pods {
        let (_, _, netns, state, _) = &nodes[*n];
        let (ok, out) = cni(netns, &state.path().join("cni.sock"), "DEL", container, pod);
        assert!(ok, "DEL {container}: {out}");
    }
    for (_, _, _, state, _) in &nodes {
        match api::call(
            &state.path().join("cni.sock"),
            &Request::Status,
            Duration::from_secs(10),
        )? {
            Response::Status(status) => assert_eq!(status.in_use, 0, "{status:?}"),
            other => panic!("{other:?}"),
        }
    }
    Ok(())
}
