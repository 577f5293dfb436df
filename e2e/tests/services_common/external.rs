//! The tc service path seen from outside the node, one family at a time: the checks
//! `services_external` (IPv4) and `services_external6` (IPv6) share.

use std::net::IpAddr;

use anyhow::{Result, ensure};

use super::{Outside, World, backend, connect_from_netns, frontend, lb_service};

/// One family's addresses and ports for [`check_from_outside`].
pub struct External<'a> {
    /// Appended to the LBServices' names (`cluster`, `local`, …).
    pub suffix: &'a str,
    pub etp_cluster_port: u16,
    pub etp_local_port: u16,
    pub empty_port: u16,
    pub lb_ip: &'a str,
    pub ranged_lb_ip: &'a str,
    pub external_ip: &'a str,
    /// `web-a`'s service for the hairpin check.
    pub self_ip: &'a str,
    /// Frontends of the service without backends besides its NodePort (an IPv6 ClusterIP
    /// gives it its family).
    pub empty_extra_frontends: Vec<serde_json::Value>,
    /// `loadBalancerSourceRanges` that exclude the client.
    pub excluding_ranges: serde_json::Value,
    /// `web-a` and `web-b` in this family.
    pub backends: (IpAddr, IpAddr),
    /// Nodes 0 and 1 in this family.
    pub node_addresses: (String, String),
    /// The outside client in this family.
    pub outside_ip: IpAddr,
    /// The `client` pod in this family.
    pub client_ip: IpAddr,
}

/// Writes the LBServices (revisions 1–5) and checks, from `outside` and from pods outside
/// the socket LB's cgroup:
/// - NodePort with `externalTrafficPolicy: Cluster` on node 0: both backends answer; the
///   local one sees the client's address, the remote one node 0's (SNAT);
/// - `Local` on each node: only that node's backend, the client's address preserved;
/// - a LoadBalancer IP and an externalIP (routed to node 0 by the client) reach the
///   backends; source ranges that exclude the client refuse it;
/// - a NodePort without backends refuses (TCP RST);
/// - the `client` pod, outside the socket LB, reaches the LB IP through `from_container`;
/// - hairpin: `web-a`, outside the socket LB, reaches itself through its service.
pub async fn check_from_outside(world: &World, outside: &Outside, f: &External<'_>) -> Result<()> {
    let (node0, node1) = (world.node_name(0), world.node_name(1));
    let (a, b) = f.backends;
    let both = serde_json::json!([backend(a, &node0), backend(b, &node1)]);
    let name = |base: &str| format!("{base}{}", f.suffix);
    let mut empty_frontends = f.empty_extra_frontends.clone();
    empty_frontends.push(frontend("NodePort", None, f.empty_port));
    let services = [
        (
            "cluster",
            serde_json::json!({
                "frontends": [
                    frontend("NodePort", None, f.etp_cluster_port),
                    frontend("LoadBalancer", Some(f.lb_ip), 80),
                    frontend("ExternalIP", Some(f.external_ip), 80),
                ],
                "backends": both,
            }),
        ),
        (
            "local",
            serde_json::json!({
                "frontends": [frontend("NodePort", None, f.etp_local_port)],
                "backends": both,
                "externalTrafficPolicy": "Local",
            }),
        ),
        ("empty", serde_json::json!({ "frontends": empty_frontends })),
        (
            "ranged",
            serde_json::json!({
                "frontends": [frontend("LoadBalancer", Some(f.ranged_lb_ip), 80)],
                "backends": both,
                "loadBalancerSourceRanges": f.excluding_ranges,
            }),
        ),
        (
            "self",
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(f.self_ip), 80)],
                "backends": [backend(a, &node0)],
            }),
        ),
    ];
    for (revision, (base, spec)) in (1..).zip(services) {
        world.apply(lb_service(&name(base), revision, spec)).await?;
    }
    world.wait_realized(5).await?;

    let (addr0, addr1) = (&f.node_addresses.0, &f.node_addresses.1);
    let node0_ip: IpAddr = addr0.parse()?;
    // ETP Cluster on node 0: both backends; the remote one behind SNAT.
    for _ in 0..20 {
        ensure!(
            connect_from_netns(&outside.netns, addr0, f.etp_cluster_port).await?,
            "NodePort on {addr0} refused"
        );
    }
    let (direct_a, direct_b) = world.accepted(f.outside_ip);
    let (_, snat_b) = world.accepted(node0_ip);
    ensure!(
        direct_a > 0 && snat_b > 0 && direct_b == 0 && direct_a + snat_b == 20,
        "20 connects: web-a from the client {direct_a}, web-b from node 0 {snat_b}, \
         web-b from the client {direct_b}"
    );

    // ETP Local: each node's own backend, the client's address preserved.
    for (address, local_is_a) in [(addr0, true), (addr1, false)] {
        let before = world.accepted(f.outside_ip);
        for _ in 0..5 {
            ensure!(
                connect_from_netns(&outside.netns, address, f.etp_local_port).await?,
                "Local NodePort on {address} refused"
            );
        }
        let after = world.accepted(f.outside_ip);
        let delta = (after.0 - before.0, after.1 - before.1);
        let expected = if local_is_a { (5, 0) } else { (0, 5) };
        ensure!(
            delta == expected,
            "Local NodePort on {address}: {delta:?}, expected {expected:?} from the client"
        );
    }

    // LoadBalancer IP and externalIP (routed via node 0).
    for address in [f.lb_ip, f.external_ip] {
        ensure!(
            connect_from_netns(&outside.netns, address, 80).await?,
            "{address} refused"
        );
    }
    // Source ranges that exclude the client: no connection (dropped, so it times out).
    ensure!(
        connect_from_netns(&outside.netns, f.ranged_lb_ip, 80)
            .await
            .is_err(),
        "loadBalancerSourceRanges {} must refuse {}",
        f.excluding_ranges,
        f.outside_ip
    );
    // No backends: refused (RST).
    ensure!(
        !connect_from_netns(&outside.netns, addr0, f.empty_port).await?,
        "a NodePort without backends on {addr0} must refuse"
    );

    // A pod process outside the socket LB's cgroup: from_container translates.
    let client = world.pods["client"].sandbox.netns.clone();
    let before = world.accepted(f.client_ip);
    for _ in 0..10 {
        ensure!(
            connect_from_netns(&client, f.lb_ip, 80).await?,
            "pod (no cgroup) → LB IP {} refused",
            f.lb_ip
        );
    }
    let after = world.accepted(f.client_ip);
    ensure!(
        (after.0 - before.0) + (after.1 - before.1) == 10,
        "10 connections from the pod, accepted {before:?} → {after:?}"
    );
    // Hairpin: web-a, outside the socket LB, reaches itself through its service.
    let web_a = world.pods["web-a"].sandbox.netns.clone();
    ensure!(
        connect_from_netns(&web_a, f.self_ip, 80).await?,
        "hairpin (tc path) to {} refused",
        f.self_ip
    );
    Ok(())
}
