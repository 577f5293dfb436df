//! Issue 15, end to end: transparent WireGuard encryption between two simulated nodes
//! (operator, agents, pods wired by tendril-cni, overlay routing), on a kernel without
//! WireGuard or ESP: the agents run the embedded userspace device.
//!
//! Checked:
//! - baseline: before any policy, a marker sent pod to pod over TCP and UDP is seen in
//!   clear on the underlay (the capture would catch it);
//! - an `EncryptionPolicy` selecting both nodes becomes Ready with 2 encrypted nodes; each
//!   NodeNetwork reports the userspace implementation, a public key, IPsec unsupported with
//!   the kernel's reason; the private key file is 0600 and is not in the API;
//! - the same marker traffic then crosses the underlay only as UDP to the WireGuard port:
//!   zero VXLAN packets, zero occurrences of the marker, nothing else between the nodes;
//! - `wg show` in the node's namespace lists the peer (the other node's key) with a
//!   handshake: the agent speaks the standard configuration protocol;
//! - three key rotations (the policy's rotation-request annotation) under a TCP stream and
//!   a UDP echo loop: the TCP connection survives every one (no reset, every message
//!   echoed), UDP loss and the longest silence are printed;
//! - the agent restarts under traffic: same key, the connection keeps flowing;
//! - an IPsec policy on this kernel: Ready=False, reason Unsupported, naming the nodes.
//!
//! Needs root. Run `cargo build -p tendril-controllers -p tendril-datapath --bins` first.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{EncryptionPolicy, NodeNetwork};
use tendril_e2e::encryption::{Capture, WIREGUARD_PORT};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimNode, SimPod};
use tendril_e2e::traffic::{EchoServer, TcpFlow, UdpFlow};
use tendril_e2e::{ControlPlane, TestEnv, eventually, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;
const MARKER: &str = "TENDRIL-CLEARTEXT-MARKER-7f3a";

/// TCP (one line echoed) and UDP (one datagram echoed, through socat: bash reads a UDP
/// socket a byte per datagram) carrying the marker, from `pod` to `to`; whether both round
/// trips worked.
async fn marker_round_trips(pod: &SimPod, to: IpAddr) -> Result<bool> {
    let script = format!(
        "exec 3<>/dev/tcp/{to}/{PORT} || exit 3; echo {MARKER}-tcp >&3; \
         read -t 2 line <&3 && [ \"$line\" = {MARKER}-tcp ] || exit 4; \
         [ \"$(echo {MARKER}-udp | socat -t 2 - UDP:{to}:{PORT})\" = {MARKER}-udp ]"
    );
    let out = pod.exec(&["timeout", "5", "bash", "-c", &script]).await?;
    if !out.status.success() {
        eprintln!(
            "marker round trip to {to}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.status.success())
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

fn node_ips(cluster: &SimCluster) -> Vec<Ipv4Addr> {
    cluster.nodes.iter().map(|n| n.address).collect()
}

async fn policy_ready(
    api: &Api<EncryptionPolicy>,
    name: &str,
    nodes: i64,
) -> Result<EncryptionPolicy> {
    wait_for(
        api,
        name,
        |o: Option<&EncryptionPolicy>| {
            o.and_then(|p| p.status.as_ref()).is_some_and(|s| {
                s.encrypted_nodes == Some(nodes)
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        },
        TIMEOUT,
    )
    .await?
    .context("policy gone")
}

async fn wg_show(node: &SimNode) -> Result<String> {
    let out = node
        .exec(&["wg", "show", &node.wireguard_interface()])
        .await
        .context("running wg (Debian package wireguard-tools)")?;
    ensure!(
        out.status.success(),
        "wg show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn public_key(nn: &NodeNetwork) -> Option<String> {
    nn.status.as_ref()?.encryption.as_ref()?.public_key.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pod_traffic_between_nodes_crosses_the_underlay_only_encrypted() -> Result<()> {
    let plane = ControlPlane::dedicated("encryption-wireguard").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let mut cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let underlay = cluster.underlay.netns.clone();
    let nodes = node_ips(&cluster);

    let server = SimPod::run(
        &client,
        cluster.nodes[1].handle(),
        &ns,
        "server",
        &labels("server"),
    )
    .await?;
    let pod = SimPod::run(
        &client,
        cluster.nodes[0].handle(),
        &ns,
        "client",
        &labels("client"),
    )
    .await?;
    server.wait_realized(&client, TIMEOUT).await?;
    pod.wait_realized(&client, TIMEOUT).await?;
    let _echo = EchoServer::start(&server.sandbox.netns, PORT)?;
    let server_ip = server.ips[0];

    // Baseline: in clear, the capture sees the marker.
    eventually(TIMEOUT, || async {
        ensure!(
            marker_round_trips(&pod, server_ip).await?,
            "no round trip yet"
        );
        Ok(())
    })
    .await?;
    let capture = Capture::start(&underlay, "br0")?;
    ensure!(
        marker_round_trips(&pod, server_ip).await?,
        "clear round trip"
    );
    let clear = capture.finish(&nodes, MARKER.as_bytes())?;
    println!("clear text baseline: {clear:?}");
    ensure!(
        clear.marker >= 2,
        "the capture must see the marker in clear: {clear:?}"
    );
    ensure!(
        clear.vxlan > 0,
        "clear traffic is VXLAN between the nodes: {clear:?}"
    );

    // Encrypt.
    let policies: Api<EncryptionPolicy> = Api::all(client.clone());
    let name = env.unique_name("wg");
    env.delete_on_drop::<EncryptionPolicy>(&name);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": name},
        "spec": {"mode": "WireGuard", "keyRotationIntervalSeconds": 86400,
                 "wireguard": {"listenPort": WIREGUARD_PORT}},
    }))?;
    let applied = Instant::now();
    policies.create(&PostParams::default(), &policy).await?;
    let ready = policy_ready(&policies, &name, 2).await?;
    println!(
        "policy applied -> Ready on both nodes: {:?}",
        applied.elapsed()
    );
    let status = ready.status.clone().unwrap_or_default();
    ensure!(status.nodes.iter().all(|n| n.ready), "{:?}", status.nodes);

    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let mut keys = Vec::new();
    for node in &cluster.nodes {
        let nn = networks.get(&node.name).await?;
        let enc = nn
            .status
            .as_ref()
            .and_then(|s| s.encryption.clone())
            .context("status.encryption")?;
        ensure!(
            enc.wireguard_implementation.as_deref() == Some("userspace"),
            "{enc:?}"
        );
        ensure!(
            enc.ipsec_supported == Some(false),
            "this kernel has no ESP: {enc:?}"
        );
        println!(
            "{}: IPsec unsupported: {:?}",
            node.name, enc.ipsec_unsupported_reason
        );
        let key = enc.public_key.clone().context("public key")?;
        let file = node.state_dir.join("wireguard/private-key.json");
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{} has mode {mode:o}", file.display());
        let text = std::fs::read_to_string(&file)?;
        let private: serde_json::Value = serde_json::from_str(&text)?;
        let private = private["privateKey"]
            .as_str()
            .context("privateKey")?
            .to_string();
        let everything = serde_json::to_string(&nn)?;
        ensure!(
            !everything.contains(&private),
            "the private key reached the API"
        );
        let spec = nn.spec.encryption.clone().context("spec.encryption")?;
        ensure!(
            spec.peers.len() == 1 && spec.peers[0].public_key.is_some(),
            "{spec:?}"
        );
        keys.push(key);
    }
    let metrics = tendril_e2e::fetch_metrics(cluster.nodes[0].metrics_port).await?;
    ensure!(
        metrics.sum(
            "tendril_encryption_wireguard_implementation",
            &[("implementation", "userspace")]
        ) == 1.0,
        "implementation metric"
    );

    // Encrypted: only WireGuard between the nodes, never the marker.
    eventually(TIMEOUT, || async {
        ensure!(
            marker_round_trips(&pod, server_ip).await?,
            "no encrypted round trip yet"
        );
        Ok(())
    })
    .await?;
    let capture = Capture::start(&underlay, "br0")?;
    for _ in 0..3 {
        ensure!(
            marker_round_trips(&pod, server_ip).await?,
            "encrypted round trip"
        );
    }
    let sealed = capture.finish(&nodes, MARKER.as_bytes())?;
    println!("encrypted: {sealed:?}");
    ensure!(
        sealed.marker == 0,
        "marker seen on the underlay: {sealed:?}"
    );
    ensure!(
        sealed.vxlan == 0,
        "VXLAN in clear on the underlay: {sealed:?}"
    );
    ensure!(
        sealed.other.is_empty(),
        "other traffic between the nodes: {sealed:?}"
    );
    ensure!(
        sealed.wireguard >= 6,
        "the round trips went as WireGuard: {sealed:?}"
    );

    // `wg show` against the agent's device.
    let show = wg_show(&cluster.nodes[0]).await?;
    println!("wg show on node 0:\n{show}");
    ensure!(
        show.contains(&format!("peer: {}", keys[1])),
        "peer listed: {show}"
    );
    ensure!(show.contains("latest handshake"), "handshake: {show}");

    // Three rotations under a TCP stream and a UDP echo loop.
    let to = SocketAddr::new(server_ip, PORT);
    let tcp = TcpFlow::start(&pod.sandbox.netns, to, Duration::from_millis(20))?;
    let udp = UdpFlow::start(&pod.sandbox.netns, to, Duration::from_millis(20))?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut previous = keys.clone();
    for round in 1..=3 {
        let at = Instant::now();
        policies
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {
                    "tendril.dev/rotation-request": format!("r{round}")}}})),
            )
            .await?;
        let epoch = 1 + round;
        wait_for(
            &policies,
            &name,
            |o: Option<&EncryptionPolicy>| {
                o.and_then(|p| p.status.as_ref()).is_some_and(|s| {
                    s.key_epoch == Some(epoch)
                        && s.encrypted_nodes == Some(2)
                        && s.conditions
                            .iter()
                            .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            },
            TIMEOUT,
        )
        .await?;
        let mut now = Vec::new();
        for node in &cluster.nodes {
            now.push(public_key(&networks.get(&node.name).await?).context("key")?);
        }
        ensure!(
            now.iter().zip(&previous).all(|(a, b)| a != b),
            "every key changed"
        );
        println!(
            "rotation {round}: every node at generation {epoch} after {:?}",
            at.elapsed()
        );
        previous = now;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    // Agent restart under traffic: the key and the flows survive.
    let rotated = Instant::now();
    let before = public_key(&networks.get(&cluster.nodes[0].name).await?);
    cluster.nodes[0].kill_agent();
    let killed = Instant::now();
    cluster.nodes[0].start_agent()?;
    cluster.nodes[0].wait_ready(&client).await?;
    eventually(TIMEOUT, || async {
        ensure!(
            tcp.log().echoes_after(killed + Duration::from_secs(1)) > 0,
            "no echo after the restart"
        );
        Ok(())
    })
    .await?;
    println!(
        "agent restart: TCP flowing again {:?} after the kill",
        killed.elapsed()
    );
    let after = public_key(&networks.get(&cluster.nodes[0].name).await?);
    ensure!(before == after, "the restart kept the key");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tcp_retransmits = tcp.retransmits();
    let tcp_log = tcp.finish()?;
    let udp_log = udp.finish()?;
    let late = Duration::from_millis(500);
    let tcp_stats = tcp_log.stats(started, end, late);
    for (what, from, to) in [
        ("3 rotations", started, rotated),
        ("agent restart", rotated, end),
    ] {
        println!(
            "{what}: TCP {} | UDP {}",
            tcp_log.stats(from, to, late),
            udp_log.stats(from, to, late)
        );
    }
    println!("TCP retransmits over both: {tcp_retransmits}");
    ensure!(tcp_stats.lost == 0, "TCP messages not echoed: {tcp_stats}");

    // IPsec on this kernel: Unsupported, with each node's reason.
    policies.delete(&name, &Default::default()).await?;
    let ipsec = env.unique_name("ipsec");
    env.delete_on_drop::<EncryptionPolicy>(&ipsec);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": ipsec},
        "spec": {"mode": "IPsec"},
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    let p = wait_for(
        &policies,
        &ipsec,
        |o: Option<&EncryptionPolicy>| {
            o.and_then(|p| p.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.reason == "Unsupported")
            })
        },
        TIMEOUT,
    )
    .await?
    .context("policy")?;
    let cond = p
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    println!("IPsec: {}: {}", cond.reason, cond.message);
    ensure!(cond.status == "False");
    for node in &cluster.nodes {
        ensure!(cond.message.contains(&node.name), "{}", cond.message);
    }
    Ok(())
}
