//! Issue 12, the node side: the tc service path, with real connections from a client
//! outside the cluster (a network namespace on the underlay bridge, in no node's cgroup)
//! and from a pod process outside the socket LB's cgroup.
//!
//! Two nodes, backends `web-a` (node 0) and `web-b` (node 1) (`services_common`); the
//! LBServices are written by the test. Checked:
//! - NodePort with `externalTrafficPolicy: Cluster` on node 0's address: both backends
//!   answer; the local one sees the client's address, the remote one node 0's (SNAT, so its
//!   answers come back through node 0 to be reversed);
//! - `externalTrafficPolicy: Local` on each node's address: only that node's backend, with
//!   the client's address preserved;
//! - a LoadBalancer IP (routed to node 0 by the client) and an externalIP reach the
//!   backends; `loadBalancerSourceRanges` that exclude the client refuse it;
//! - a NodePort without backends refuses the connection (TCP RST);
//! - hairpin: a pod process outside the socket LB reaches itself through its service;
//! - a pod process outside the socket LB (no cgroup) reaches a ClusterIP through
//!   `from_container`'s translation, and its established connection survives the agent's
//!   restart.
//!
//! Needs root.

mod services_common;

use std::net::IpAddr;

use anyhow::{Result, ensure};
use services_common::*;
use tendril_e2e::sim::{delete_netns, ensure_netns, ip};

const ETP_CLUSTER_PORT: u16 = 30801;
const ETP_LOCAL_PORT: u16 = 30802;
const EMPTY_PORT: u16 = 30803;
const LB_IP: &str = "198.51.100.80";
const RANGED_LB_IP: &str = "198.51.100.81";
const EXTERNAL_IP: &str = "198.51.100.82";
const OUTSIDE: &str = "10.250.0.200";
const SELF_IP: &str = "10.96.78.10";

/// A host outside the cluster: a namespace on the underlay bridge, removed on drop.
struct Outside {
    netns: String,
}

impl Outside {
    async fn start(underlay: &str, gateway: &str) -> Result<Outside> {
        let netns = format!("tdrx-{}", std::process::id());
        let guard = Outside {
            netns: netns.clone(),
        };
        ensure_netns(&netns).await?;
        let peer = format!("x{}", std::process::id() % 100_000);
        ip(&[
            "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
            underlay,
        ])
        .await?;
        ip(&["-n", underlay, "link", "set", &peer, "master", "br0", "up"]).await?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{OUTSIDE}/24"),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
        // LoadBalancer IPs and externalIPs are announced by node 0 (as BGP or L2 would).
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            gateway,
        ])
        .await?;
        Ok(guard)
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        delete_netns(&self.netns);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tc_path_serves_clients_outside_the_node() -> Result<()> {
    let mut world = World::start("services-external").await?;
    let (node0, node1) = (world.node_name(0), world.node_name(1));
    let (addr0, addr1) = (
        world.cluster.nodes[0].address.to_string(),
        world.cluster.nodes[1].address.to_string(),
    );
    let (a, b) = (world.ip("web-a"), world.ip("web-b"));
    let outside = Outside::start(&world.cluster.underlay.netns, &addr0).await?;
    let outside_ip: IpAddr = OUTSIDE.parse()?;
    let node0_ip: IpAddr = addr0.parse()?;
    let both = serde_json::json!([backend(a, &node0), backend(b, &node1)]);

    world
        .apply(lb_service(
            "cluster",
            1,
            serde_json::json!({
                "frontends": [
                    frontend("NodePort", None, ETP_CLUSTER_PORT),
                    frontend("LoadBalancer", Some(LB_IP), 80),
                    frontend("ExternalIP", Some(EXTERNAL_IP), 80),
                ],
                "backends": both,
            }),
        ))
        .await?;
    world
        .apply(lb_service(
            "local",
            2,
            serde_json::json!({
                "frontends": [frontend("NodePort", None, ETP_LOCAL_PORT)],
                "backends": both,
                "externalTrafficPolicy": "Local",
            }),
        ))
        .await?;
    world
        .apply(lb_service(
            "empty",
            3,
            serde_json::json!({ "frontends": [frontend("NodePort", None, EMPTY_PORT)] }),
        ))
        .await?;
    world
        .apply(lb_service(
            "ranged",
            4,
            serde_json::json!({
                "frontends": [frontend("LoadBalancer", Some(RANGED_LB_IP), 80)],
                "backends": both,
                "loadBalancerSourceRanges": ["192.0.2.0/24"],
            }),
        ))
        .await?;
    world
        .apply(lb_service(
            "self",
            5,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(SELF_IP), 80)],
                "backends": [backend(a, &node0)],
            }),
        ))
        .await?;
    world.wait_realized(5).await?;

    // ETP Cluster on node 0: both backends; the remote one behind SNAT.
    for _ in 0..20 {
        ensure!(
            connect_from_netns(&outside.netns, &addr0, ETP_CLUSTER_PORT).await?,
            "NodePort refused"
        );
    }
    let (direct_a, direct_b) = world.accepted(outside_ip);
    let (_, snat_b) = world.accepted(node0_ip);
    ensure!(
        direct_a > 0 && snat_b > 0 && direct_b == 0 && direct_a + snat_b == 20,
        "20 connects: web-a from the client {direct_a}, web-b from node 0 {snat_b}, \
         web-b from the client {direct_b}"
    );

    // ETP Local: each node's own backend, the client's address preserved.
    for (address, local_is_a) in [(&addr0, true), (&addr1, false)] {
        let before = world.accepted(outside_ip);
        for _ in 0..5 {
            ensure!(
                connect_from_netns(&outside.netns, address, ETP_LOCAL_PORT).await?,
                "Local NodePort on {address} refused"
            );
        }
        let after = world.accepted(outside_ip);
        let delta = (after.0 - before.0, after.1 - before.1);
        let expected = if local_is_a { (5, 0) } else { (0, 5) };
        ensure!(
            delta == expected,
            "Local NodePort on {address}: {delta:?}, expected {expected:?} from the client"
        );
    }

    // LoadBalancer IP and externalIP (routed via node 0).
    for address in [LB_IP, EXTERNAL_IP] {
        ensure!(
            connect_from_netns(&outside.netns, address, 80).await?,
            "{address} refused"
        );
    }
    // Source ranges that exclude the client: no connection (dropped, so it times out).
    ensure!(
        connect_from_netns(&outside.netns, RANGED_LB_IP, 80)
            .await
            .is_err(),
        "loadBalancerSourceRanges must refuse {OUTSIDE}"
    );
    // No backends: refused (RST).
    ensure!(
        !connect_from_netns(&outside.netns, &addr0, EMPTY_PORT).await?,
        "a NodePort without backends must refuse"
    );

    // A pod process outside the socket LB's cgroup: from_container translates.
    let client = world.pods["client"].sandbox.netns.clone();
    let me = world.ip("client");
    let before = world.accepted(me);
    for _ in 0..10 {
        ensure!(
            connect_from_netns(&client, LB_IP, 80).await?,
            "pod (no cgroup) → LB IP refused"
        );
    }
    let after = world.accepted(me);
    ensure!(
        (after.0 - before.0) + (after.1 - before.1) == 10,
        "10 connections from the pod, accepted {:?} → {after:?}",
        before
    );
    // Hairpin: web-a, outside the socket LB, reaches itself through its service.
    let web_a = world.pods["web-a"].sandbox.netns.clone();
    ensure!(
        connect_from_netns(&web_a, SELF_IP, 80).await?,
        "hairpin (tc path) refused"
    );
    // Its established connection survives the agent's restart.
    let mut steady = Steady::start_in_netns(&client, LB_IP, 80)?;
    steady.wait_more_than(0).await?;
    world.cluster.nodes[0].kill_agent();
    let n = steady.echoes();
    steady.wait_more_than(n).await?;
    world.cluster.nodes[0].start_agent()?;
    world.cluster.nodes[0]
        .wait_ready(&world.env.client())
        .await?;
    world
        .apply(lb_service(
            "empty",
            6,
            serde_json::json!({ "frontends": [frontend("NodePort", None, EMPTY_PORT)] }),
        ))
        .await?;
    world.wait_realized(6).await?;
    let n = steady.echoes();
    steady.wait_more_than(n).await?;
    Ok(())
}
