//! IPv6 between simulated pods (issue 18): a dual-stack [`SimCluster`], the pods'
//! addresses of a family, TCP/UDP servers and probes over IPv6 inside a pod, the
//! NetworkPolicy the IPv6 tests apply and the node's `IPv6Policy` condition.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::Client;
use kube::api::Api;
use tendril_crds::common::Condition;
use tendril_crds::v1alpha1::{Endpoint, NodeNetwork};

use crate::sim::{SimCluster, SimClusterConfig, SimNode, SimPod};
use crate::{TestEnv, eventually};

/// The port of [`serve6`]'s TCP server.
pub const TCP_PORT: u16 = 8080;
/// The port of [`serve6`]'s UDP server.
pub const UDP_PORT: u16 = 5353;

/// `app: {app}`.
pub fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// The pod's address of the family (`v6`: IPv6); panics on a single-stack pod, which a
/// dual-stack cluster never makes.
pub fn address_of(pod: &SimPod, v6: bool) -> IpAddr {
    *pod.ips
        .iter()
        .find(|ip| ip.is_ipv6() == v6)
        .expect("a dual-stack pod")
}

/// The pod's IPv6 address.
pub fn ipv6_of(pod: &SimPod) -> IpAddr {
    address_of(pod, true)
}

/// A [`SimCluster`] of `nodes` whose pods get an IPv6 address from `pool_ipv6` (a /112 per
/// node) beside their IPv4 one; `agent_args` as in [`SimClusterConfig`].
pub async fn dual_stack_cluster(
    env: &TestEnv,
    nodes: u8,
    pool_ipv6: &str,
    agent_args: &[&str],
) -> Result<SimCluster> {
    SimCluster::start(
        env,
        SimClusterConfig {
            nodes,
            pool_ipv6: Some((pool_ipv6.into(), 112)),
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
            ..SimClusterConfig::default()
        },
    )
    .await
}

/// TCP and UDP servers inside `pod` on IPv6 only ([`TCP_PORT`], [`UDP_PORT`]), answering
/// `tendril`; killed when the returned children are dropped.
pub fn serve6(pod: &SimPod) -> Result<[tokio::process::Child; 2]> {
    Ok([
        pod.spawn(&[
            "socat",
            &format!("TCP6-LISTEN:{TCP_PORT},fork,reuseaddr,ipv6only=1"),
            "SYSTEM:echo tendril",
        ])?,
        pod.spawn(&[
            "socat",
            &format!("UDP6-RECVFROM:{UDP_PORT},fork,reuseaddr,ipv6only=1"),
            "SYSTEM:echo tendril",
        ])?,
    ])
}

/// Whether a TCP connection from `pod` to `[dst]:TCP_PORT` gets the server's greeting.
pub async fn tcp6(pod: &SimPod, dst: IpAddr) -> Result<bool> {
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
pub async fn udp6(pod: &SimPod, dst: IpAddr) -> Result<bool> {
    let out = pod
        .exec(&[
            "sh",
            "-c",
            &format!("echo hi | socat -T2 - UDP6:[{dst}]:{UDP_PORT}"),
        ])
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).contains("tendril"))
}

/// A NetworkPolicy `{name}` in `namespace` selecting `app: {target}` and allowing ingress
/// only from `app: {from}`, on `ports` (`(protocol, port)`; none: every port).
pub fn ingress_only_from(
    namespace: &str,
    name: &str,
    target: &str,
    from: &str,
    ports: &[(&str, u16)],
) -> String {
    let ports = if ports.is_empty() {
        String::new()
    } else {
        let list: String = ports
            .iter()
            .map(|(protocol, port)| format!("    - {{protocol: {protocol}, port: {port}}}\n"))
            .collect();
        format!("    ports:\n{list}")
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: {target}}}}}\n  policyTypes: [Ingress]\n  \
         ingress:\n  - from:\n    - podSelector: {{matchLabels: {{app: {from}}}}}\n{ports}"
    )
}

/// The node's `IPv6Policy` condition (its agent writes it into the NodeNetwork status).
pub async fn ipv6_policy_condition(client: &Client, node: &str) -> Result<Condition> {
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    networks
        .get(node)
        .await?
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "IPv6Policy"))
        .context("no IPv6Policy condition on the NodeNetwork")
}

/// Waits until `from` gets echo, TCP and UDP answers from `srv` ([`serve6`] running there)
/// at `dst` over IPv6, and `srv` gets an echo answer from `from` at `from6`.
pub async fn wait_reachable6(
    from: &SimPod,
    srv: &SimPod,
    dst: IpAddr,
    from6: IpAddr,
    timeout: Duration,
) -> Result<()> {
    let name = &from.name;
    eventually(timeout, || async {
        ensure!(from.ping(dst).await?, "no ICMPv6 echo {name} → {dst}");
        ensure!(tcp6(from, dst).await?, "no TCP {name} → {dst}");
        ensure!(udp6(from, dst).await?, "no UDP {name} → {dst}");
        ensure!(
            srv.ping(from6).await?,
            "no ICMPv6 echo {} → {from6}",
            srv.name
        );
        Ok(())
    })
    .await
}

/// Applies the policy that lets only `app: client` into `app: srv`, on [`TCP_PORT`] and
/// [`UDP_PORT`], and waits until `srv`'s node has it in its maps.
pub async fn allow_only_client_into_srv(
    env: &TestEnv,
    srv: &SimPod,
    srv_endpoint: &Endpoint,
    timeout: Duration,
) -> Result<()> {
    env.apply_yaml(&ingress_only_from(
        env.namespace(),
        "srv-from-client",
        "srv",
        "client",
        &[("TCP", TCP_PORT), ("UDP", UDP_PORT)],
    ))
    .await?;
    srv.wait_policy_realized(&env.client(), srv_endpoint, timeout)
        .await
}

/// Under [`allow_only_client_into_srv`]: `client` still gets TCP and UDP answers at `dst`
/// over IPv6 (within 15 s of tries), `intruder` never does (three tries each).
pub async fn expect_only_client_served(
    client: &SimPod,
    intruder: &SimPod,
    dst: IpAddr,
) -> Result<()> {
    // A probe's answer may miss its 2 s timeout on a loaded machine: what the policy
    // allows gets a few tries; what it denies must fail every one.
    eventually(Duration::from_secs(15), || async {
        ensure!(
            tcp6(client, dst).await?,
            "the policy allows client TCP over IPv6 to {dst}"
        );
        ensure!(
            udp6(client, dst).await?,
            "the policy allows client UDP over IPv6 to {dst}"
        );
        Ok(())
    })
    .await?;
    for attempt in 0..3 {
        ensure!(
            !tcp6(intruder, dst).await?,
            "intruder reached {dst} over TCP/IPv6 (attempt {attempt})"
        );
        ensure!(
            !udp6(intruder, dst).await?,
            "intruder reached {dst} over UDP/IPv6 (attempt {attempt})"
        );
    }
    Ok(())
}

/// The newest flow `node` dropped from `src` to `dst` at ingress into a local pod, waited
/// for (a flow is reported a moment after its packet).
pub async fn dropped_ingress_flow(
    node: &SimNode,
    src: IpAddr,
    dst: IpAddr,
) -> Result<serde_json::Value> {
    eventually(Duration::from_secs(30), || async {
        let flows = node.dropped_flows().await?;
        let found = flows.iter().rev().map(|f| f["flow"].clone()).find(|f| {
            f["IP"]["source"] == src.to_string()
                && f["IP"]["destination"] == dst.to_string()
                && f["traffic_direction"] == "INGRESS"
        });
        found.with_context(|| format!("no dropped flow {src} → {dst} in {flows:?}"))
    })
    .await
}
