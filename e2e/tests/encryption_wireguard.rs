//! Issue 15, end to end: transparent WireGuard encryption between two simulated nodes
//! (operator, agents, pods wired by tendril-cni), on a kernel without WireGuard or ESP: the
//! agents run the embedded userspace device. Both routing modes share one scene
//! ([`tendril_e2e::encryption::Scene`]).
//!
//! Overlay, checked:
//! - baseline: before any policy, a marker sent pod to pod over TCP and UDP is seen in
//!   clear on the underlay (the capture would catch it);
//! - an `EncryptionPolicy` selecting both nodes becomes Ready with 2 encrypted nodes; each
//!   NodeNetwork reports the userspace implementation, a public key, IPsec unsupported with
//!   the kernel's reason; the private key file is 0600 and is not in the API;
//! - the same marker traffic then crosses the underlay only as UDP to the WireGuard ports:
//!   zero VXLAN packets, zero occurrences of the marker, nothing else between the nodes;
//! - MTU: a pod made while encryption is on gets the published pod MTU; a DF ping of that
//!   size crosses, one byte more is refused locally; a bulk TCP echo crosses with no IP
//!   fragment on the underlay;
//! - `wg show` in the node's namespace lists the peer (the other node's key) with a
//!   handshake: the agent speaks the standard configuration protocol;
//! - three two-phase key rotations (the policy's rotation-request annotation) under a TCP
//!   stream and a 20 ms UDP echo loop: no TCP message and no UDP datagram lost; the
//!   figures per rotation are printed;
//! - the agent restarts under traffic: same key, the connection keeps flowing; then the
//!   device process is killed, and then stopped (a device that never answers): the agent
//!   replaces it each time and the connection goes on;
//! - an IPsec policy: where every node's kernel has ESP, the marker traffic crosses only as
//!   ESP between the node addresses; on a kernel without (this one), Ready=False, reason
//!   Unsupported, naming the nodes.
//!
//! Native routing (`--routing-mode native`, dual-stack pods): in clear the pods' IPv4 and
//! IPv6 packets cross the underlay between pod addresses; encrypted, only WireGuard between
//! node addresses, zero markers, no IPv6 TCP or UDP, and the MTU check as above.
//!
//! Needs root. Run `cargo build -p tendril-controllers -p tendril-datapath --bins` first.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{EncryptionPolicy, NodeNetwork};
use tendril_e2e::encryption::{PORT, Routing, Scene, TIMEOUT, ensure_sealed, policy_ready};
use tendril_e2e::sim::SimNode;
use tendril_e2e::traffic::{TcpFlow, UdpFlow};
use tendril_e2e::{eventually, wait_for};

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

/// Sends `signal` to the agent's device processes of the interfaces named `prefix`*; how
/// many.
fn signal_device_processes(prefix: &str, signal: &str) -> Result<usize> {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.get(1) == Some(&&b"wireguard-device"[..])
            && args
                .get(2)
                .is_some_and(|a| a.starts_with(prefix.as_bytes()))
        {
            let pid = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let status = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid])
                .status()?;
            ensure!(status.success(), "kill -{signal} {pid}");
            killed += 1;
        }
    }
    Ok(killed)
}

/// Waits until `tcp` is echoed again past a second after `since` (`what` happened then).
async fn flowing_again(tcp: &TcpFlow, since: Instant, what: &str) -> Result<()> {
    eventually(TIMEOUT, || async {
        ensure!(
            tcp.log().echoes_after(since + Duration::from_secs(1)) > 0,
            "no echo after {what}"
        );
        Ok(())
    })
    .await
}

fn public_key(nn: &NodeNetwork) -> Option<String> {
    nn.status.as_ref()?.encryption.as_ref()?.public_key.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pod_traffic_between_nodes_crosses_the_underlay_only_encrypted() -> Result<()> {
    let mut scene = Scene::start("encryption-wireguard", Routing::Overlay).await?;
    let client = scene.env.client();
    let (pod, server_ip) = (&scene.client, scene.server_ip);

    // Baseline: in clear, the capture sees the marker.
    let clear = scene.capture_round_trips(1).await?;
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
    let applied = Instant::now();
    let name = scene.encrypt().await?;
    let ready = policy_ready(&policies, &name, 2).await?;
    println!(
        "policy applied -> Ready on both nodes: {:?}",
        applied.elapsed()
    );
    let status = ready.status.clone().unwrap_or_default();
    ensure!(status.nodes.iter().all(|n| n.ready), "{:?}", status.nodes);
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let mut keys = Vec::new();
    let mut esp_everywhere = true;
    for node in &scene.cluster.nodes {
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
        let esp = enc
            .ipsec_supported
            .context("the agent reports IPsec support")?;
        esp_everywhere &= esp;
        println!(
            "{}: IPsec supported: {esp} {:?}",
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
    let metrics = tendril_e2e::fetch_metrics(scene.cluster.nodes[0].metrics_port).await?;
    ensure!(
        metrics.sum(
            "tendril_encryption_wireguard_implementation",
            &[("implementation", "userspace")]
        ) == 1.0,
        "implementation metric"
    );

    // Encrypted: only WireGuard between the nodes, never the marker.
    let sealed = scene.capture_round_trips(3).await?;
    println!("encrypted: {sealed:?}");
    ensure_sealed(&sealed, 6)?;

    // MTU: a full-size packet of a pod made now crosses without fragmentation.
    let (pod_mtu, seen) = scene.check_mtu().await?;
    println!(
        "MTU: pod {pod_mtu}; DF ping of {pod_mtu} ok, {} refused; bulk TCP: {seen:?}",
        pod_mtu + 1
    );

    // `wg show` against the agent's device.
    let show = wg_show(&scene.cluster.nodes[0]).await?;
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
    let mut rotation_starts = Vec::new();
    for round in 1..=3 {
        let at = Instant::now();
        rotation_starts.push(at);
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
        for node in &scene.cluster.nodes {
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
    let before = public_key(&networks.get(&scene.cluster.nodes[0].name).await?);
    scene.cluster.nodes[0].kill_agent();
    let killed = Instant::now();
    scene.cluster.nodes[0].start_agent()?;
    scene.cluster.nodes[0].wait_ready(&client).await?;
    flowing_again(&tcp, killed, "the restart").await?;
    println!(
        "agent restart: TCP flowing again {:?} after the kill",
        killed.elapsed()
    );
    let after = public_key(&networks.get(&scene.cluster.nodes[0].name).await?);
    ensure!(before == after, "the restart kept the key");

    // A device that dies (boringtun can panic; see datapath/src/encryption/device.rs) is
    // replaced by the agent, and the connection goes on.
    let interface = scene.cluster.nodes[0].wireguard_interface();
    let crashed = signal_device_processes(&interface, "KILL")?;
    ensure!(crashed > 0, "no WireGuard device process of node 0 found");
    let killed = Instant::now();
    flowing_again(&tcp, killed, "the device process was killed").await?;
    println!(
        "device process killed ({crashed}): TCP flowing again {:?} after the kill",
        killed.elapsed()
    );
    // One that hangs (what the boringtun panic left: a process that never answers) is
    // found out by the agent's next configuration read, killed and replaced.
    let hung = signal_device_processes(&interface, "STOP")?;
    ensure!(hung > 0, "no WireGuard device process of node 0 found");
    let stopped = Instant::now();
    flowing_again(&tcp, stopped, "the device process was stopped").await?;
    println!(
        "device process stopped ({hung}): TCP flowing again {:?} after SIGSTOP",
        stopped.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tcp_retransmits = tcp.retransmits();
    let tcp_log = tcp.finish()?;
    let udp_log = udp.finish()?;
    let late = Duration::from_millis(500);
    let tcp_stats = tcp_log.stats(started, end, late);
    let udp_rotations = udp_log.stats(started, rotated, late);
    let mut windows = vec![(
        "before the rotations".to_string(),
        started,
        rotation_starts[0],
    )];
    for (i, at) in rotation_starts.iter().enumerate() {
        let until = rotation_starts.get(i + 1).copied().unwrap_or(rotated);
        windows.push((format!("rotation {}", i + 1), *at, until));
    }
    windows.push(("3 rotations".into(), started, rotated));
    windows.push(("agent restart, device killed and hung".into(), rotated, end));
    for (what, from, to) in windows {
        println!(
            "{what}: TCP {} | UDP {}",
            tcp_log.stats(from, to, late),
            udp_log.stats(from, to, late)
        );
    }
    println!("TCP retransmits over both: {tcp_retransmits}");
    ensure!(tcp_stats.lost == 0, "TCP messages not echoed: {tcp_stats}");
    // Two-phase rotation: every node knows every next key before anyone switches.
    ensure!(
        udp_rotations.lost == 0,
        "UDP datagrams lost across the rotations: {udp_rotations}"
    );

    // IPsec: on a kernel with ESP, the same marker traffic crosses only as ESP between the
    // node addresses; on this one, Unsupported with each node's reason.
    policies.delete(&name, &Default::default()).await?;
    let ipsec = scene.env.unique_name("ipsec");
    scene.env.delete_on_drop::<EncryptionPolicy>(&ipsec);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": ipsec},
        "spec": {"mode": "IPsec"},
    }))?;
    ipsec_keys_namespace(&scene).await?;
    policies.create(&PostParams::default(), &policy).await?;
    if esp_everywhere {
        policy_ready(&policies, &ipsec, 2).await?;
        let seen = scene.capture_round_trips(10).await?;
        println!("IPsec on this kernel: {seen:?}");
        ensure!(
            seen.esp >= 20 && seen.marker == 0 && seen.vxlan == 0 && seen.wireguard == 0,
            "the round trips went as ESP only: {seen:?}"
        );
        return Ok(());
    }
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
    for node in &scene.cluster.nodes {
        ensure!(cond.message.contains(&node.name), "{}", cond.message);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn native_routing_pod_traffic_crosses_the_underlay_only_encrypted() -> Result<()> {
    let scene = Scene::start("encryption-native", Routing::Native).await?;
    let clear = scene.capture_round_trips(1).await?;
    println!("native, clear text baseline: {clear:?}");
    ensure!(
        clear.marker >= 2 && clear.vxlan == 0 && clear.not_between_nodes > 0,
        "native routing in clear: pod to pod on the underlay, the marker visible: {clear:?}"
    );
    ensure!(
        clear.ipv6_transport > 0,
        "the IPv6 baseline crosses the underlay in clear (the capture would see it): {clear:?}"
    );
    let applied = Instant::now();
    scene.encrypt().await?;
    println!(
        "native: policy applied -> encrypted round trip: {:?}",
        applied.elapsed()
    );
    let sealed = scene.capture_round_trips(3).await?;
    println!("native, encrypted: {sealed:?}");
    ensure_sealed(&sealed, 6)?;
    let (pod_mtu, seen) = scene.check_mtu().await?;
    println!(
        "native MTU: pod {pod_mtu}; DF ping of {pod_mtu} ok, {} refused; bulk TCP: {seen:?}",
        pod_mtu + 1
    );
    Ok(())
}

/// The namespace of the IPsec key Secrets the operator makes (the test world has no
/// install that would create it).
async fn ipsec_keys_namespace(scene: &Scene) -> Result<()> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(scene.env.client());
    let ns = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tendril-ipsec-keys"},
    }))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}
