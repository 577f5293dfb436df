//! IPv6 between simulated pods (issue 18): a dual-stack [`SimCluster`], the pods'
//! addresses of a family, TCP/UDP servers and probes over IPv6 inside a pod, the
//! NetworkPolicy the IPv6 tests apply and the node's `IPv6Policy` condition.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Context, Result};
use kube::Client;
use kube::api::Api;
use tendril_crds::common::Condition;
use tendril_crds::v1alpha1::NodeNetwork;

use crate::TestEnv;
use crate::sim::{SimCluster, SimClusterConfig, SimPod};

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
