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

use anyhow::Result;
use services_common::external::{External, check_from_outside};
use services_common::*;

const LB_IP: &str = "198.51.100.80";
const EMPTY_PORT: u16 = 30803;
const OUTSIDE: &str = "10.250.0.200";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tc_path_serves_clients_outside_the_node() -> Result<()> {
    let mut world = World::start("services-external").await?;
    let (addr0, addr1) = (
        world.cluster.nodes[0].address.to_string(),
        world.cluster.nodes[1].address.to_string(),
    );
    let outside = Outside::start(&world.cluster.underlay.netns, OUTSIDE, &addr0).await?;
    let family = External {
        suffix: "",
        etp_cluster_port: 30801,
        etp_local_port: 30802,
        empty_port: 30803,
        lb_ip: LB_IP,
        ranged_lb_ip: "198.51.100.81",
        external_ip: "198.51.100.82",
        self_ip: "10.96.78.10",
        empty_extra_frontends: Vec::new(),
        excluding_ranges: serde_json::json!(["192.0.2.0/24"]),
        backends: (world.ip("web-a"), world.ip("web-b")),
        node_addresses: (addr0, addr1),
        outside_ip: OUTSIDE.parse()?,
        client_ip: world.ip("client"),
    };
    check_from_outside(&world, &outside, &family).await?;

    // The client pod's connection through from_container's translation (outside the
    // socket LB) survives the agent's restart.
    let client = world.pods["client"].sandbox.netns.clone();
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
