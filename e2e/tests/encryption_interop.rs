//! Issue 15, interoperability: the agent speaks standard WireGuard. One simulated node
//! (operator, agent) and a hand-made peer: a namespace on the underlay running Debian's
//! `wireguard-go`, configured with `wg` from the keys the cluster published, registered
//! as a Node whose "agent" (this test) publishes the wireguard-go public key. The
//! EncryptionPolicy makes it the node's peer; UDP to the overlay port from the node to
//! the peer goes through the agent's userspace device: the peer's socket receives the
//! marker, `wg show` on the peer shows a handshake with the node's key, and a capture on
//! the node's uplink sees only WireGuard between the two and never the marker.
//!
//! Needs root. Run `cargo build -p tendril-controllers -p tendril-datapath --bins` first.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{EncryptionPolicy, NodeNetwork};
use tendril_e2e::encryption::{Capture, WIREGUARD_PORT};
use tendril_e2e::services::{NetnsSet, netns_prefix, sweep_stale};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, join_bridge};
use tendril_e2e::{ControlPlane, TestEnv, eventually, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);
const PEER_IP: &str = "10.250.0.201";
const MARKER: &str = "TENDRIL-INTEROP-MARKER-51c2";

/// A process in a namespace, stopped with SIGTERM (so wireguard-go removes its socket).
struct Running(Child);

impl Running {
    fn start(netns: &str, cmd: &[&str], stdout: Stdio) -> Result<Running> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(cmd)
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        Ok(Running(child))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A directory of the test's files (the peer's private key, what it received), removed on
/// drop.
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!("tendril-interop-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sh(netns: &str, script: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "bash", "-c", script])
        .output()?;
    ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_device_handshakes_with_wireguard_go() -> Result<()> {
    let plane = ControlPlane::dedicated("encryption-interop").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 1,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    let node = &cluster.nodes[0];

    // The hand-made peer: its namespace on the underlay, wireguard-go, a key from `wg`.
    sweep_stale();
    let mut set = NetnsSet::default();
    let peer_ns = format!("{}-wgpeer", netns_prefix());
    set.add(&peer_ns).await?;
    let veth = format!("wp{}", std::process::id() % 100_000);
    join_bridge(&cluster.underlay.netns, &peer_ns, &veth, PEER_IP.parse()?).await?;
    let dir = ScratchDir::new()?;
    let key_file = dir.0.join("private");
    let private = sh(&peer_ns, "wg genkey")?;
    std::fs::write(&key_file, format!("{private}\n"))?;
    let public = sh(&peer_ns, &format!("wg pubkey < {}", key_file.display()))?;
    let interface = format!("wgp{}", std::process::id() % 100_000);
    let _wireguard_go =
        Running::start(&peer_ns, &["wireguard-go", "-f", &interface], Stdio::null())?;
    eventually(Duration::from_secs(10), || async {
        sh(&peer_ns, &format!("wg show {interface}")).map(|_| ())
    })
    .await?;

    // Its Node, and its key published as an agent would.
    let peer_node = env.unique_name("wgpeer");
    env.delete_on_drop::<Node>(&peer_node);
    env.delete_on_drop::<NodeNetwork>(&peer_node);
    let nodes: Api<Node> = Api::all(client.clone());
    let obj: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": peer_node},
    }))?;
    nodes.create(&PostParams::default(), &obj).await?;
    nodes
        .patch_status(
            &peer_node,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"addresses": [
                {"type": "InternalIP", "address": PEER_IP}]}})),
        )
        .await?;
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    wait_for(
        &networks,
        &peer_node,
        |o: Option<&NodeNetwork>| o.is_some_and(|nn| !nn.spec.addresses.is_empty()),
        TIMEOUT,
    )
    .await?;
    networks
        .patch_status(
            &peer_node,
            &PatchParams::apply("test-wireguard-go").force(),
            &Patch::Apply(json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
                "metadata": {"name": peer_node},
                "status": {"encryption": {"wireguardImplementation": "userspace",
                    "publicKey": public, "keyEpoch": 1, "ready": true}},
            })),
        )
        .await?;

    let policies: Api<EncryptionPolicy> = Api::all(client.clone());
    let name = env.unique_name("interop");
    env.delete_on_drop::<EncryptionPolicy>(&name);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": name}, "spec": {"mode": "WireGuard"},
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    let nn = wait_for(
        &networks,
        &node.name,
        |o: Option<&NodeNetwork>| {
            o.and_then(|nn| nn.status.as_ref()?.encryption.as_ref())
                .is_some_and(|e| e.ready && e.peers == Some(1))
        },
        TIMEOUT,
    )
    .await?
    .context("node")?;
    let node_key = nn
        .status
        .and_then(|s| s.encryption)
        .and_then(|e| e.public_key)
        .context("node key")?;

    // The peer configured by hand from what the cluster published.
    sh(
        &peer_ns,
        &format!(
            "wg set {interface} private-key {} listen-port {WIREGUARD_PORT} peer {node_key} \
             endpoint {}:{WIREGUARD_PORT} allowed-ips {}/32 && ip link set {interface} up",
            key_file.display(),
            node.address,
            node.address
        ),
    )?;
    let received = dir.0.join("received");
    let _listener = Running::start(
        &peer_ns,
        &["socat", "-u", "UDP-RECV:8472", "-"],
        Stdio::from(std::fs::File::create(&received)?),
    )?;

    // On the node's uplink: everything the node sends to or receives from the peer.
    let capture = Capture::start(&node.netns, "eth0")?;
    eventually(TIMEOUT, || async {
        node.exec(&[
            "bash",
            "-c",
            &format!("echo {MARKER} | socat -u - UDP:{PEER_IP}:8472"),
        ])
        .await?;
        let got = std::fs::read_to_string(&received)?;
        ensure!(got.contains(MARKER), "the peer received nothing yet");
        Ok(())
    })
    .await?;
    // A few more datagrams inside the capture (the first may have beaten the listener).
    for _ in 0..3 {
        node.exec(&[
            "bash",
            "-c",
            &format!("echo {MARKER} | socat -u - UDP:{PEER_IP}:8472"),
        ])
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let nodes_ips: Vec<Ipv4Addr> = vec![node.address, PEER_IP.parse()?];
    let seen = capture.finish(&nodes_ips, MARKER.as_bytes())?;
    println!("underlay between the node and wireguard-go: {seen:?}");
    ensure!(seen.marker == 0, "marker in clear: {seen:?}");
    ensure!(
        seen.wireguard > 0 && seen.other.is_empty() && seen.vxlan == 0,
        "{seen:?}"
    );
    let show = sh(&peer_ns, &format!("wg show {interface}"))?;
    println!("wg show on the wireguard-go peer:\n{show}");
    ensure!(show.contains(&format!("peer: {node_key}")), "{show}");
    ensure!(show.contains("latest handshake"), "{show}");
    Ok(())
}
