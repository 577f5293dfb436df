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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::Api;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics};

const TIMEOUT: Duration = Duration::from_secs(120);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

fn ipv6_of(pod: &SimPod) -> IpAddr {
    *pod.ips
        .iter()
        .find(|ip| ip.is_ipv6())
        .expect("a dual-stack pod")
}

/// Whether a TCP connection from `pod` to `[dst]:TCP_PORT` gets the server's greeting.
async fn tcp6(pod: &SimPod, dst: IpAddr) -> Result<bool> {
    let out = pod
        .exec(&[
            "socat",
            "-T2",
            "-",
            &format!("TCP6:[{dst}]:{TCP_PORT},connect-timeout=2"),
        ])
        .await?;
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("tendril"))
}

/// Whether a UDP datagram from `pod` to `[dst]:UDP_PORT` is answered.
async fn udp6(pod: &SimPod, dst: IpAddr) -> Result<bool> {
    let out = pod
        .exec(&[
            "sh",
            "-c",
            &format!("echo hi | socat -T2 - UDP6:[{dst}]:{UDP_PORT}"),
        ])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("tendril"))
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_between_pods_is_judged_by_policy() -> Result<()> {
    let plane = ControlPlane::dedicated("ipv6-policy").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 1,
            pool_ipv6: Some(("fd00:210::/104".into(), 112)),
            ..SimClusterConfig::default()
        },
    )
    .await?;
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
    let _tcp_server = srv.spawn(&[
        "socat",
        &format!("TCP6-LISTEN:{TCP_PORT},fork,reuseaddr,ipv6only=1"),
        "SYSTEM:echo tendril",
    ])?;
    let _udp_server = srv.spawn(&[
        "socat",
        &format!("UDP6-RECVFROM:{UDP_PORT},fork,reuseaddr,ipv6only=1"),
        "SYSTEM:echo tendril",
    ])?;

    // No policy yet: pod-to-pod IPv6 works for everyone, in every protocol.
    eventually(TIMEOUT, || async {
        ensure!(cli.ping(srv6).await?, "no ICMPv6 echo client → {srv6}");
        ensure!(tcp6(&cli, srv6).await?, "no TCP client → {srv6}");
        ensure!(udp6(&cli, srv6).await?, "no UDP client → {srv6}");
        ensure!(tcp6(&intruder, srv6).await?, "no TCP intruder → {srv6}");
        ensure!(srv.ping(cli6).await?, "no ICMPv6 echo srv → {cli6}");
        Ok(())
    })
    .await?;

    env.apply_yaml(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: srv-from-client, namespace: {ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: srv}}}}\n  policyTypes: [Ingress]\n  \
         ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: client}}}}\n    \
         ports:\n    - {{protocol: TCP, port: {TCP_PORT}}}\n    - {{protocol: UDP, port: {UDP_PORT}}}\n"
    ))
    .await?;
    srv.wait_policy_realized(&client, &srv_ep, TIMEOUT).await?;

    // The policy decides for IPv6 as for IPv4.
    ensure!(
        tcp6(&cli, srv6).await?,
        "the policy allows client TCP over IPv6"
    );
    ensure!(
        udp6(&cli, srv6).await?,
        "the policy allows client UDP over IPv6"
    );
    for attempt in 0..3 {
        ensure!(
            !tcp6(&intruder, srv6).await?,
            "intruder reached srv over TCP/IPv6 (attempt {attempt})"
        );
        ensure!(
            !udp6(&intruder, srv6).await?,
            "intruder reached srv over UDP/IPv6 (attempt {attempt})"
        );
    }
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
    let flows = eventually(Duration::from_secs(30), || async {
        let flows = node.dropped_flows().await?;
        let found = flows.iter().rev().map(|f| f["flow"].clone()).find(|f| {
            f["IP"]["source"] == intruder6.to_string()
                && f["IP"]["destination"] == srv6.to_string()
                && f["traffic_direction"] == "INGRESS"
                && f["destination"]["pod_name"] == "srv"
        });
        found.with_context(|| format!("no dropped flow {intruder6} → {srv6} in {flows:?}"))
    })
    .await?;
    ensure!(flows["drop_reason_desc"] == "POLICY_DENIED", "flow {flows}");

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

    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let nn = networks.get(&node.name).await?;
    let condition = nn
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "IPv6Policy"))
        .cloned()
        .context("no IPv6Policy condition on the NodeNetwork")?;
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
