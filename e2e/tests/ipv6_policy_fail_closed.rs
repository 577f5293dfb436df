//! Issue 18, first part: a node that does not enforce IPv6 policy drops IPv6 to a
//! policy-selected pod instead of letting it through (bpf/lib/ipv6.h). Nodes enforce IPv6
//! policy by default (tests/ipv6_policy_enforced.rs); this one runs its agent with
//! `--policy-ipv6 false`, the state of a node whose IPv6 policy is not ready.
//!
//! One simulated node (real operator, agent, CNI) with a dual-stack pool, pods `srv` and
//! `client`. Before any policy, IPv6 from the node to `srv` works (the path is live). Then
//! a NetworkPolicy selects `srv` and allows ingress from `client`: IPv4 from `client` still
//! passes, IPv6 to and from `srv` is dropped every time (never allowed), counted as
//! `ipv6_policy_not_enforced` and reported as dropped flows with the IPv6 addresses, while
//! `client` (selected by no policy) keeps its IPv6; NodeNetwork says `IPv6Policy=False`
//! (`FailClosed`).
//! Needs root.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::Api;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_e2e::ipv6::{
    address_of, dual_stack_cluster, ingress_only_from, ipv6_policy_condition, labels,
};
use tendril_e2e::sim::SimPod;
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics};

const TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_to_a_policy_selected_pod_is_dropped_never_allowed() -> Result<()> {
    let plane = ControlPlane::dedicated("ipv6-fail-closed").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster =
        dual_stack_cluster(&env, 1, "fd00:200::/104", &["--policy-ipv6", "false"]).await?;
    let node = &cluster.nodes[0];
    let ns = env.namespace().to_string();
    let srv = SimPod::run(&client, node.handle(), &ns, "srv", &labels("srv")).await?;
    let cli = SimPod::run(&client, node.handle(), &ns, "client", &labels("client")).await?;
    let srv_ep = srv.wait_realized(&client, TIMEOUT).await?;
    cli.wait_realized(&client, TIMEOUT).await?;
    let (srv4, srv6) = (address_of(&srv, false), address_of(&srv, true));

    // No policy yet: IPv6 from the node works, so a later failure is the policy's doing.
    let node_ping6 = || async {
        let out = node
            .exec(&["ping", "-6", "-c1", "-W3", "-n", &srv6.to_string()])
            .await?;
        anyhow::Ok(out.status.success())
    };
    eventually(TIMEOUT, || async {
        ensure!(
            node_ping6().await?,
            "no IPv6 echo from {srv6} before any policy"
        );
        Ok(())
    })
    .await?;
    ensure!(cli.ping(srv4).await?, "no IPv4 echo before any policy");
    // The node's IPv6 gateway address (the first of its IPv6 pod CIDR), for srv → node.
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let gateway6 = networks
        .get(&node.name)
        .await?
        .spec
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        .find_map(|c| match c {
            ipnet::IpNet::V6(v6) => Some(IpAddr::V6((u128::from(v6.network()) + 1).into())),
            ipnet::IpNet::V4(_) => None,
        })
        .context("the node has no IPv6 pod CIDR")?;
    ensure!(
        srv.ping(gateway6).await?,
        "srv cannot reach the node's {gateway6} before any policy"
    );

    env.apply_yaml(&ingress_only_from(
        &ns,
        "srv-from-client",
        "srv",
        "client",
        &[],
    ))
    .await?;
    // Until the node has the policy in its maps for srv.
    srv.wait_policy_realized(&client, &srv_ep, TIMEOUT).await?;

    // IPv4 from client is allowed by the policy; IPv6 is dropped, every time.
    ensure!(cli.ping(srv4).await?, "the policy allows client over IPv4");
    for attempt in 0..5 {
        ensure!(
            !node_ping6().await?,
            "IPv6 reached the policy-selected pod (attempt {attempt}): not failed closed"
        );
    }

    // Out of the selected pod too; the pod no policy selects keeps its IPv6.
    for attempt in 0..3 {
        ensure!(
            !srv.ping(gateway6).await?,
            "IPv6 left the policy-selected pod (attempt {attempt}): not failed closed"
        );
    }
    ensure!(
        cli.ping(gateway6).await?,
        "the pod no policy selects lost its IPv6"
    );

    // Reported as dropped flows, with their IPv6 addresses and the pod named.
    let flows = node.dropped_flows().await?;
    // The newest of each: the first drops may come before the agent's caches name the pod
    // (a flow is enriched once, when it happens).
    let dropped_flow = |src: IpAddr, dst: IpAddr, direction: &str| {
        flows.iter().rev().map(|f| &f["flow"]).find(|f| {
            f["IP"]["source"] == src.to_string()
                && f["IP"]["destination"] == dst.to_string()
                && f["traffic_direction"] == direction
        })
    };
    let into_srv = dropped_flow(gateway6, srv6, "INGRESS")
        .with_context(|| format!("no dropped flow {gateway6} → {srv6} in {flows:?}"))?;
    ensure!(
        into_srv["destination"]["pod_name"] == "srv"
            && into_srv["drop_reason_desc"] == "POLICY_DENIED",
        "flow {into_srv}"
    );
    let out_of_srv = dropped_flow(srv6, gateway6, "EGRESS")
        .with_context(|| format!("no dropped flow {srv6} → {gateway6} in {flows:?}"))?;
    ensure!(
        out_of_srv["source"]["pod_name"] == "srv",
        "flow {out_of_srv}"
    );

    let metrics = fetch_metrics(node.metrics_port).await?;
    let dropped = metrics.sum(
        "tendril_datapath_drops_total",
        &[("reason", "ipv6_policy_not_enforced")],
    );
    ensure!(
        dropped >= 8.0,
        "expected at least 8 IPv6 drops counted, got {dropped}"
    );

    let condition = ipv6_policy_condition(&client, &node.name).await?;
    ensure!(
        condition.status == "False" && condition.reason == "FailClosed",
        "IPv6Policy condition {condition:?}"
    );
    drop(cli);
    drop(srv);
    drop(cluster);
    Ok(())
}
