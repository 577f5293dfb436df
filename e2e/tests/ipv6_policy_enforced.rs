//! Issue 18, second part: IPv6 is judged by the same policy as IPv4, with real packets.
//!
//! One simulated node (real operator, agent, CNI) with a dual-stack pool and pods `srv`
//! (TCP and UDP servers on IPv6), `client` and `intruder`. Before any policy, pod-to-pod
//! IPv6 works both ways over TCP, UDP and ICMPv6 (the agent forwards IPv6; the stack routes
//! the pods' /128s). Then a NetworkPolicy lets only `client` into `srv`, on TCP 8080 and
//! UDP 5353: over IPv6 `client` still connects on both, `intruder` is dropped on both and
//! the drop is a dropped flow with the IPv6 addresses (`tendrilctl observe`), ICMPv6 echo to
//! `srv` (no port rule allows it) is dropped while `srv`'s own echo out gets its replies
//! back (conntrack), the node's own IPv6 (the host, like kubelet probes) still gets in, and
//! NodeNetwork says `IPv6Policy=True` (`Enforced`).
//! Overlay and native routing across nodes are not covered here (pod-to-pod within a
//! node). Needs root.

use std::time::Duration;

use anyhow::{Result, ensure};
use tendril_e2e::ipv6::{
    allow_only_client_into_srv, dropped_ingress_flow, dual_stack_cluster,
    expect_only_client_served, ipv6_of, ipv6_policy_condition, labels, serve6, wait_reachable6,
};
use tendril_e2e::sim::SimPod;
use tendril_e2e::{ControlPlane, TestEnv, fetch_metrics};

const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_between_pods_is_judged_by_policy() -> Result<()> {
    let plane = ControlPlane::dedicated("ipv6-policy").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = dual_stack_cluster(&env, 1, "fd00:210::/104", &[]).await?;
    let node = &cluster.nodes[0];
    let ns = env.namespace().to_string();
    let srv = SimPod::run(&client, node.handle(), &ns, "srv", &labels("srv")).await?;
    let cli = SimPod::run(&client, node.handle(), &ns, "client", &labels("client")).await?;
    let intruder = SimPod::run(&client, node.handle(), &ns, "intruder", &labels("x")).await?;
    let srv_ep = srv.wait_realized(&client, TIMEOUT).await?;
    cli.wait_realized(&client, TIMEOUT).await?;
    intruder.wait_realized(&client, TIMEOUT).await?;
    let (srv6, cli6, intruder6) = (ipv6_of(&srv), ipv6_of(&cli), ipv6_of(&intruder));

    // Servers inside srv, on IPv6 only (killed when dropped).
    let _servers = serve6(&srv)?;

    // No policy yet: pod-to-pod IPv6 works for everyone, in every protocol.
    wait_reachable6(&cli, &srv, srv6, cli6, TIMEOUT).await?;
    wait_reachable6(&intruder, &srv, srv6, intruder6, TIMEOUT).await?;

    allow_only_client_into_srv(&env, &srv, &srv_ep, TIMEOUT).await?;
    // The policy decides for IPv6 as for IPv4.
    expect_only_client_served(&cli, &intruder, srv6).await?;
    ensure!(
        !cli.ping(srv6).await?,
        "ICMPv6 echo into srv passed: no rule allows it"
    );
    // The node's own IPv6 (kubelet probes) is the host, which is always allowed in.
    let node_ping6 = node
        .exec(&["ping", "-6", "-c1", "-W3", "-n", &srv6.to_string()])
        .await?;
    ensure!(
        node_ping6.status.success(),
        "the node's IPv6 echo to srv was dropped: {node_ping6:?}"
    );
    // srv's egress is not restricted: its echo out and the replies (conntrack) pass.
    ensure!(srv.ping(cli6).await?, "srv's own ICMPv6 echo got no reply");

    // Reported as dropped flows, with their IPv6 addresses and the pod named.
    let flow = dropped_ingress_flow(node, intruder6, srv6).await?;
    ensure!(
        flow["drop_reason_desc"] == "POLICY_DENIED" && flow["destination"]["pod_name"] == "srv",
        "flow {flow}"
    );

    let metrics = fetch_metrics(node.metrics_port).await?;
    let dropped = metrics.sum(
        "tendril_datapath_drops_total",
        &[("reason", "policy_denied")],
    );
    ensure!(
        dropped >= 6.0,
        "expected at least 6 IPv6 policy drops counted, got {dropped}"
    );
    let fail_closed = metrics.sum(
        "tendril_datapath_drops_total",
        &[("reason", "ipv6_policy_not_enforced")],
    );
    ensure!(
        fail_closed == 0.0,
        "{fail_closed} fail-closed drops on an enforcing node"
    );

    let condition = ipv6_policy_condition(&client, &node.name).await?;
    ensure!(
        condition.status == "True" && condition.reason == "Enforced",
        "IPv6Policy condition {condition:?}"
    );
    drop(intruder);
    drop(cli);
    drop(srv);
    drop(cluster);
    Ok(())
}
