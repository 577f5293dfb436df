//! Issue 18, the tc service path over IPv6 (`bpf/lib/lb6_nat.h`), with real connections
//! from a client outside the cluster: a network namespace on the underlay bridge with an
//! IPv6 address in the nodes' underlay subnet (`fd00:250::/64`), in no node's cgroup.
//!
//! Overlay and native routing, each on two nodes with dual-stack pods, backends `web-a` (node 0) and `web-b` (node 1) serving
//! both families (`services_common`); the LBServices, over the backends' IPv6 addresses,
//! are written by the test. Checked, as `services_external` does for IPv4:
//! - NodePort with `externalTrafficPolicy: Cluster` on node 0's IPv6 address: both
//!   backends answer; the local one sees the client's address, the remote one node 0's IPv6
//!   address (SNAT, so its answers come back through node 0 to be reversed);
//! - `externalTrafficPolicy: Local` on each node's IPv6 address: only that node's backend,
//!   the client's address preserved;
//! - an IPv6 LoadBalancer IP and an IPv6 externalIP (routed to node 0 by the client) reach
//!   the backends; an IPv6 `loadBalancerSourceRanges` that excludes the client refuses it;
//! - an IPv6 NodePort without backends refuses the connection (TCP RST);
//! - a pod process outside the socket LB's cgroup reaches the IPv6 LB IP through
//!   `from_container`'s translation (answers reversed at its `to_container`), and a backend
//!   outside it reaches itself through an IPv6 ClusterIP (hairpin).
//!
//! Needs root.

mod services_common;

use anyhow::Result;
use services_common::external::{External, check_from_outside};
use services_common::*;

/// The LB IPs and externalIPs, routed to node 0 by the client.
const LB_PREFIX: &str = "2001:db8:80::/64";
const OUTSIDE: &str = "10.250.0.201";
const OUTSIDE6: &str = "fd00:250::c9";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tc_path_serves_ipv6_clients_outside_the_node_in_overlay_mode() -> Result<()> {
    scenario("services-external6", "fd00:270::/104", &[]).await
}

/// Native routing: SNATed packets to the remote backend leave by the FIB (`AF_INET6`), not
/// the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tc_path_serves_ipv6_clients_outside_the_node_in_native_mode() -> Result<()> {
    scenario(
        "services-external6-native",
        "fd00:280::/104",
        &["--routing-mode", "native"],
    )
    .await
}

async fn scenario(plane: &str, pool6: &str, agent_args: &[&str]) -> Result<()> {
    let world = World::start_dual_stack(plane, pool6, agent_args).await?;
    let addr0 = world.cluster.nodes[0].address.to_string();
    let (addr0_6, addr1_6) = (
        world.cluster.nodes[0].address6.to_string(),
        world.cluster.nodes[1].address6.to_string(),
    );
    let outside = Outside::start(&world.cluster.underlay.netns, OUTSIDE, &addr0).await?;
    outside.add_ipv6(OUTSIDE6, LB_PREFIX, &addr0_6).await?;
    let family = External {
        suffix: "6",
        etp_cluster_port: 30811,
        etp_local_port: 30812,
        empty_port: 30813,
        lb_ip: "2001:db8:80::80",
        ranged_lb_ip: "2001:db8:80::81",
        external_ip: "2001:db8:80::82",
        self_ip: "fd00:96:81::10",
        // Gives the service without backends its family.
        empty_extra_frontends: vec![frontend("ClusterIP", Some("fd00:96:81::11"), 80)],
        // The client's IPv4 address is in one of them, which admits no IPv6 client.
        excluding_ranges: serde_json::json!(["2001:db8:ffff::/48", "10.250.0.0/24"]),
        backends: (world.ip6("web-a"), world.ip6("web-b")),
        node_addresses: (addr0_6, addr1_6),
        outside_ip: OUTSIDE6.parse()?,
        client_ip: world.ip6("client"),
    };
    check_from_outside(&world, &outside, &family).await
}
