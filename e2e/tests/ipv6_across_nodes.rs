//! Issue 18, third part: pod-to-pod IPv6 across nodes, in overlay and in native routing.
//!
//! Per mode, a dedicated plane and two simulated nodes (real operator, agents, CNI; each
//! node has an IPv4 and an IPv6 underlay address, both InternalIPs) with a dual-stack pool:
//! `srv` (TCP and UDP servers on IPv6) on node 0, `client` and `intruder` on node 1.
//! - Each node publishes its IPv6 underlay address in its NodeNetwork (spec, from the Node,
//!   and status, as an address its agent uses).
//! - The agents route the peer's IPv6 pod CIDR: into the VXLAN device in overlay (IPv6
//!   inside the IPv4 underlay; the device has no IPv6 address of its own), via the peer's IPv6 address in native routing (Linux has no
//!   IPv6 route via an IPv4 next hop).
//! - Before any policy, TCP, UDP and ICMPv6 over IPv6 work across the nodes both ways; in
//!   overlay the packets really go through the tunnel (`forward_tunnel` grows).
//! - Echo round trip across the nodes, IPv4 next to IPv6 (printed).
//! - A NetworkPolicy lets only `client` into `srv` (TCP and UDP ports): `client` still
//!   connects over IPv6, `intruder` is dropped on both and the drop on `srv`'s node is a
//!   dropped flow whose source identity is `intruder`'s own (from the VNI in overlay, from
//!   the ipcache in native routing), not remote-node or world.
//!
//! Needs root.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::Api;
use tendril_crds::common::NodeAddress;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_e2e::ipv6::{
    address_of, allow_only_client_into_srv, dropped_ingress_flow, dual_stack_cluster,
    expect_only_client_served, ipv6_of, labels, serve6, wait_reachable6,
};
use tendril_e2e::sim::{SimNode, SimPod};
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The reserved identities a pod's traffic must not be taken for.
const IDENTITY_WORLD: u64 = 2;
const IDENTITY_REMOTE_NODE: u64 = 6;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Overlay,
    Native,
}

/// The agent's routes of `family` (`-4`/`-6`), as `ip route` prints them.
async fn tendril_routes(node: &SimNode, family: &str) -> Result<String> {
    let out = node
        .exec(&["ip", family, "route", "show", "proto", "201"])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The mean round trip of 20 echoes from `pod` to `dst`, in milliseconds.
async fn mean_rtt_ms(pod: &SimPod, dst: IpAddr) -> Result<f64> {
    let out = pod
        .exec(&["ping", "-c20", "-i0.05", "-W2", "-n", &dst.to_string()])
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = 0.051/0.072/0.130/0.017 ms
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .with_context(|| format!("no summary from ping {dst}: {text}"))?;
    let avg = line
        .split('=')
        .nth(1)
        .and_then(|v| v.trim().split('/').nth(1))
        .with_context(|| format!("unparsable: {line}"))?;
    Ok(avg.parse()?)
}

async fn forward_tunnel(node: &SimNode) -> Result<f64> {
    Ok(fetch_metrics(node.metrics_port).await?.sum(
        "tendril_datapath_packets_total",
        &[("reason", "forward_tunnel")],
    ))
}

async fn across_nodes(mode: Mode) -> Result<()> {
    let (plane_name, pool, args): (_, _, &[&str]) = match mode {
        Mode::Overlay => ("ipv6-nodes-overlay", "fd00:220::/104", &[]),
        Mode::Native => (
            "ipv6-nodes-native",
            "fd00:230::/104",
            &["--routing-mode", "native"],
        ),
    };
    let plane = ControlPlane::dedicated(plane_name).await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = dual_stack_cluster(&env, 2, pool, args).await?;
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let ns = env.namespace().to_string();
    let srv = SimPod::run(&client, node0.handle(), &ns, "srv", &labels("srv")).await?;
    let cli = SimPod::run(&client, node1.handle(), &ns, "client", &labels("client")).await?;
    let intruder = SimPod::run(&client, node1.handle(), &ns, "intruder", &labels("x")).await?;
    let srv_ep = srv.wait_realized(&client, TIMEOUT).await?;
    cli.wait_realized(&client, TIMEOUT).await?;
    let intruder_ep = intruder.wait_realized(&client, TIMEOUT).await?;
    let intruder_identity = intruder_ep
        .spec
        .identity
        .context("intruder has no identity")?;
    let (srv6, cli6, intruder6) = (ipv6_of(&srv), ipv6_of(&cli), ipv6_of(&intruder));
    let _servers = serve6(&srv)?;

    // Node 0 publishes its IPv6 underlay address: its Node's InternalIP in the spec, and as
    // an address its agent uses in the status.
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    eventually(TIMEOUT, || async {
        let nn = networks.get(&node0.name).await?;
        let address6 = node0.address6.to_string();
        let has = |addresses: &[NodeAddress]| {
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == address6)
        };
        ensure!(has(&nn.spec.addresses), "spec: {:?}", nn.spec.addresses);
        let status = nn.status.map(|s| s.addresses).unwrap_or_default();
        ensure!(has(&status), "status: {status:?}");
        Ok(())
    })
    .await?;

    // The peer's IPv6 pod CIDR is routed the mode's way.
    let srv_cidr = ipnet::Ipv6Net::new(
        match srv6 {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!("an IPv6 address"),
        },
        112,
    )?
    .trunc();
    eventually(TIMEOUT, || async {
        let routes = tendril_routes(node1, "-6").await?;
        let route = routes
            .lines()
            .find(|l| l.starts_with(&srv_cidr.to_string()))
            .with_context(|| format!("no route to {srv_cidr} on node 1: {routes}"))?;
        match mode {
            Mode::Overlay => ensure!(route.contains("dev tendril_vxlan"), "{route}"),
            Mode::Native => ensure!(
                route.contains(&format!("via {}", node0.address6)),
                "{route}: not via node 0's IPv6 address"
            ),
        }
        Ok(())
    })
    .await?;

    // The tunnel device carries IPv6 without an address of its own (no ND or MLD of its own).
    if mode == Mode::Overlay {
        let out = node1
            .exec(&["ip", "-6", "addr", "show", "dev", "tendril_vxlan"])
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && !text.contains("inet6"),
            "tendril_vxlan: {text}"
        );
    }

    // No policy yet: IPv6 across the nodes works both ways, in every protocol.
    let tunnelled_before = forward_tunnel(node1).await?;
    wait_reachable6(&cli, &srv, srv6, cli6, TIMEOUT).await?;
    wait_reachable6(&intruder, &srv, srv6, intruder6, TIMEOUT).await?;
    // The agent samples the programs' counters: wait for them to show the packets.
    if mode == Mode::Overlay {
        eventually(Duration::from_secs(30), || async {
            let tunnelled = forward_tunnel(node1).await? - tunnelled_before;
            ensure!(
                tunnelled > 0.0,
                "IPv6 across the nodes did not go through the tunnel"
            );
            Ok(())
        })
        .await?;
    }

    // The node itself reaches a remote pod over IPv6 (its source is its IPv6 gateway, which
    // the peer must tunnel back to in overlay) and the pod reaches the node's gateway.
    eventually(TIMEOUT, || async {
        let out = node1
            .exec(&["ping", "-6", "-c1", "-W2", "-n", &srv6.to_string()])
            .await?;
        ensure!(
            out.status.success(),
            "{mode:?}: node 1 → {srv6}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(())
    })
    .await?;

    let rtt4 = mean_rtt_ms(&cli, address_of(&srv, false)).await?;
    let rtt6 = mean_rtt_ms(&cli, srv6).await?;
    println!("{mode:?}: echo round trip across nodes, IPv4 {rtt4:.3} ms, IPv6 {rtt6:.3} ms");

    allow_only_client_into_srv(&env, &srv, &srv_ep, TIMEOUT).await?;
    expect_only_client_served(&cli, &intruder, srv6)
        .await
        .with_context(|| format!("{mode:?}, across nodes"))?;

    // Dropped on srv's node, judged by the intruder's own identity.
    let flow = dropped_ingress_flow(node0, intruder6, srv6).await?;
    let source_identity = flow["source"]["identity"].as_u64().unwrap_or_default();
    ensure!(
        source_identity != IDENTITY_WORLD && source_identity != IDENTITY_REMOTE_NODE,
        "{mode:?}: the intruder was taken for identity {source_identity}: {flow}"
    );
    ensure!(
        i64::try_from(source_identity)? == intruder_identity,
        "{mode:?}: source identity {source_identity}, intruder's is {intruder_identity}: {flow}"
    );
    ensure!(
        flow["drop_reason_desc"] == "POLICY_DENIED" && flow["destination"]["pod_name"] == "srv",
        "{mode:?}: flow {flow}"
    );
    println!("{mode:?}: dropped flow {intruder6} → {srv6}, source identity {source_identity}");
    drop(intruder);
    drop(cli);
    drop(srv);
    drop(cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_between_pods_of_two_nodes_in_overlay_and_native_routing() -> Result<()> {
    // One mode after the other: two clusters at once would double the load on the machine.
    across_nodes(Mode::Overlay).await?;
    across_nodes(Mode::Native).await
}
