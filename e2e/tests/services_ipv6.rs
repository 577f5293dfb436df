//! Issue 18, services over IPv6: a real dual-stack Service, end to end through the socket LB.
//!
//! A dedicated plane (dual-stack service CIDRs), two simulated nodes (real operator, agents,
//! CNI; IPv4 and IPv6 underlay addresses) with a dual-stack pod pool: backends `web-a`
//! (node 0) and `web-b` (node 1) answer every TCP connection and UDP datagram with their own
//! name, on IPv4 and IPv6; `client` runs on node 0. The Service (`RequireDualStack`,
//! NodePort, TCP and UDP) gets both ClusterIPs from the apiserver and IPv4 and IPv6
//! EndpointSlices from kube-controller-manager; the operator translates them, the agents
//! program them. Checked:
//! - the LBService lists both ClusterIPs and the backends of both families, and every
//!   node's `lb6_services` holds the IPv6 ClusterIP with its two backends;
//! - pod → IPv6 ClusterIP over TCP, connected UDP (connect6) and unconnected UDP (sendmsg6,
//!   the answer shown from the frontend by recvmsg6): both backends answer, by name;
//! - pod → IPv4 ClusterIP of the same Service still reaches both backends, also from IPv6
//!   sockets connecting to it IPv4-mapped (`::ffff:10.96.x.y`, TCP and UDP);
//! - node 0's host network → the IPv6 ClusterIP: both backends answer, the remote one too;
//! - node 0's host network → the NodePort of an IPv6-only Service (backed by `web-a`) on
//!   its own IPv6 address, on node 1's and on `[::1]`;
//! - an IPv6-only Service (`ipFamilies: [IPv6]`) without endpoints refuses the connect.
//!
//! Needs root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::LBService;
use tendril_datapath::bpf::Dataplane;
use tendril_datapath::bpf::maps::Lb6Key;
use tendril_e2e::ipv6::{dual_stack_cluster, ipv6_of, labels};
use tendril_e2e::sim::{SimNode, SimPod};
use tendril_e2e::{ControlPlane, TestEnv, eventually};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The backends' port (TCP and UDP).
const BACKEND_PORT: u16 = 8080;

/// TCP and UDP servers in `pod` on [`BACKEND_PORT`], IPv4 and IPv6 (`ipv6only=0`), each
/// answering a line with the pod's name. The line is read first: a server that answered
/// without reading lost the race with the client's data now and then (socat's write to the
/// exited shell failed and it closed without relaying the answer).
fn serve_name(pod: &SimPod) -> Result<[tokio::process::Child; 2]> {
    let answer = format!("SYSTEM:read line; echo {}", pod.name);
    Ok([
        pod.spawn(&[
            "socat",
            &format!("TCP6-LISTEN:{BACKEND_PORT},fork,reuseaddr,ipv6only=0"),
            &answer,
        ])?,
        pod.spawn(&[
            "socat",
            &format!("UDP6-RECVFROM:{BACKEND_PORT},fork,reuseaddr,ipv6only=0"),
            &answer,
        ])?,
    ])
}

/// `ip` as socat writes an address (`[fd00::1]`, `10.0.0.1`).
fn socat_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// What answered one exchange to socat address `what` (`TCP:…`, `UDP:…`,
/// `UDP-SENDTO:…`): `Ok(Some(name))`, `Ok(None)` when the connect was refused.
fn answer(output: std::process::Output, what: &str) -> Result<Option<String>> {
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stdout.is_empty() {
        return Ok(Some(stdout));
    }
    if stderr.contains("Connection refused") {
        return Ok(None);
    }
    anyhow::bail!("{what}: no answer ({:?}): {stderr}", output.status)
}

/// The shell line of one socat exchange with `target` (`TCP:host:port`, …).
fn exchange(target: &str) -> String {
    // connect-timeout is not an option of an unconnected socket.
    let options = if target.starts_with("UDP-SENDTO") {
        ""
    } else {
        ",connect-timeout=3"
    };
    // -t2: after its stdin's EOF socat waits up to 2 s for the answer (0.5 s by default);
    // -d -d: what happened, for the error when nothing answers.
    format!("echo hi | timeout 10 socat -d -d -t2 -T3 - {target}{options}")
}

/// Where an exchange starts: a pod, or a node's host network.
#[derive(Clone, Copy)]
enum Client<'a> {
    Pod(&'a SimPod),
    Node(&'a SimNode),
}

/// One exchange from `from` to `ip:port` over socat `kind` (`TCP`, `UDP`, `UDP-SENDTO`).
async fn ask(from: Client<'_>, kind: &str, ip: IpAddr, port: u16) -> Result<Option<String>> {
    let target = format!("{kind}:{}:{port}", socat_host(ip));
    let cmd = ["bash", "-c", &exchange(&target)];
    let output = match from {
        Client::Pod(pod) => pod.exec(&cmd).await?,
        Client::Node(node) => node.exec(&cmd).await?,
    };
    answer(output, &target)
}

/// `n` exchanges; how often each name answered. A refused connect is an error.
async fn spread(
    from: Client<'_>,
    kind: &str,
    ip: IpAddr,
    port: u16,
    n: usize,
) -> Result<BTreeMap<String, usize>> {
    let mut names = BTreeMap::new();
    for _ in 0..n {
        let name = ask(from, kind, ip, port)
            .await?
            .with_context(|| format!("{kind} {ip}:{port} refused"))?;
        *names.entry(name).or_insert(0) += 1;
    }
    Ok(names)
}

/// Whether both backends answered `n` exchanges. Selection is random: one backend takes all
/// `n` with probability 2^(1-n), so `n` is at least 16 (1 in 32,768; 8 failed a CI run).
fn both_answered(names: &BTreeMap<String, usize>, n: usize, what: &str) -> Result<()> {
    let (a, b) = (
        names.get("web-a").copied().unwrap_or(0),
        names.get("web-b").copied().unwrap_or(0),
    );
    ensure!(
        a + b == n && a > 0 && b > 0,
        "{what}: {n} exchanges should spread over web-a and web-b, got {names:?}"
    );
    Ok(())
}

/// The Service's IPv4 and IPv6 ClusterIPs (`RequireDualStack` gives both).
fn cluster_ips(svc: &Service) -> Result<(IpAddr, IpAddr)> {
    let ips: Vec<IpAddr> = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ips.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let v4 = ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .context("no IPv4 ClusterIP")?;
    let v6 = ips
        .iter()
        .find(|ip| ip.is_ipv6())
        .context("no IPv6 ClusterIP")?;
    Ok((*v4, *v6))
}

/// Until the LBService `name` has `frontends` frontends and `backends` backends.
async fn wait_translated(
    env: &TestEnv,
    name: &str,
    frontends: usize,
    backends: usize,
) -> Result<LBService> {
    let api: Api<LBService> = env.api();
    eventually(TIMEOUT, || async {
        let lbs = api.get(name).await?;
        let (f, b) = (lbs.spec.frontends.len(), lbs.spec.backends.len());
        ensure!(
            f == frontends && b == backends,
            "LBService {name}: {f} frontends, {b} backends; waiting for {frontends}, {backends}"
        );
        Ok(lbs)
    })
    .await
}

/// Until every node's `lb6_services` holds the IPv6 frontend `[ip]:port`/TCP with `count`
/// backends: read from the pinned map itself, so it is the kernel's state the test waits for.
async fn wait_programmed6(nodes: &[SimNode], ip: IpAddr, port: u16, count: u16) -> Result<()> {
    let IpAddr::V6(v6) = ip else {
        anyhow::bail!("{ip} is not IPv6")
    };
    let key = Lb6Key {
        address: v6.octets(),
        dport: port.to_be_bytes(),
        proto: 6,
        ..Lb6Key::default()
    };
    for node in nodes {
        eventually(TIMEOUT, || async {
            let dp = Dataplane::open(&node.bpffs_root.join(&node.name))?;
            let got = dp.lb.services6()?.get(&key).map(|s| s.count);
            ensure!(
                got == Some(count),
                "{}: [{ip}]:{port} has {got:?} backends in lb6_services, waiting for {count}",
                node.name
            );
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dual_stack_services_over_the_socket_lb() -> Result<()> {
    let plane = ControlPlane::dedicated("services-ipv6").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = dual_stack_cluster(&env, 2, "fd00:260::/104", &[]).await?;
    ensure!(
        cluster.nodes.iter().all(|n| n.cgroup.is_some()),
        "no cgroup v2 on this machine: the socket LB cannot be tested"
    );
    let ns = env.namespace().to_string();
    let mut pods = BTreeMap::new();
    for (name, node, app) in [("web-a", 0, "web"), ("web-b", 1, "web"), ("client", 0, "c")] {
        let mut labels = labels(app);
        labels.insert("node".into(), node.to_string());
        let pod = SimPod::run(&client, cluster.nodes[node].handle(), &ns, name, &labels).await?;
        pod.wait_realized(&client, TIMEOUT).await?;
        pods.insert(name, pod);
    }
    let _servers = [serve_name(&pods["web-a"])?, serve_name(&pods["web-b"])?];

    let services: Api<Service> = env.api();
    let echo: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {
            "type": "NodePort", "ipFamilyPolicy": "RequireDualStack",
            "selector": {"app": "web"},
            "ports": [
                {"name": "tcp", "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"},
                {"name": "udp", "port": 53, "targetPort": BACKEND_PORT, "protocol": "UDP"},
            ],
        },
    }))?;
    let echo = services.create(&PostParams::default(), &echo).await?;
    let (cluster4, cluster6) = cluster_ips(&echo)?;
    let empty: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "empty"},
        "spec": {
            "ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"],
            "selector": {"app": "nobody"},
            "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"}],
        },
    }))?;
    let empty = services.create(&PostParams::default(), &empty).await?;
    // IPv6 only, backed by web-a alone (so the answer names it): the node's own
    // connections to a NodePort.
    let local: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "local"},
        "spec": {
            "type": "NodePort", "ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv6"],
            "selector": {"app": "web", "node": "0"},
            "ports": [{"name": "tcp", "port": 80, "targetPort": BACKEND_PORT, "protocol": "TCP"}],
        },
    }))?;
    let local = services.create(&PostParams::default(), &local).await?;
    let local_port = local
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.node_port)
        .context("no node port")?;
    let local_port = u16::try_from(local_port)?;
    let empty6: IpAddr = empty
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no ClusterIP")?
        .parse()?;
    ensure!(empty6.is_ipv6(), "the IPv6-only Service got {empty6}");

    // Per port: 2 ClusterIPs + the NodePort; per port 2 backends × 2 families.
    let lbs = wait_translated(&env, "echo", 6, 8).await?;
    let addresses: Vec<&str> = lbs
        .spec
        .frontends
        .iter()
        .filter_map(|f| f.address.as_deref())
        .collect();
    for ip in [cluster4, cluster6] {
        ensure!(
            addresses.contains(&ip.to_string().as_str()),
            "LBService frontends {addresses:?} lack {ip}"
        );
    }
    wait_translated(&env, "empty", 1, 0).await?;
    wait_translated(&env, "local", 2, 1).await?;
    wait_programmed6(&cluster.nodes, cluster6, 80, 2).await?;
    wait_programmed6(&cluster.nodes, empty6, 80, 0).await?;
    // The NodePort's wildcard entry (`::`), which every IPv6 node address uses.
    wait_programmed6(&cluster.nodes, "::".parse()?, local_port, 1).await?;

    // Pod → IPv6 ClusterIP: TCP, connected UDP, unconnected UDP.
    let cli = Client::Pod(&pods["client"]);
    both_answered(&spread(cli, "TCP", cluster6, 80, 30).await?, 30, "TCP6")?;
    both_answered(&spread(cli, "UDP", cluster6, 53, 16).await?, 16, "UDP6")?;
    // socat UDP-SENDTO takes answers from the address it sent to only: the answer came back
    // shown from the frontend (recvmsg6).
    let sendto = spread(cli, "UDP-SENDTO", cluster6, 53, 5).await?;
    ensure!(
        sendto.keys().all(|n| n == "web-a" || n == "web-b"),
        "unconnected UDP6: {sendto:?}"
    );
    // The IPv4 ClusterIP of the same Service, from IPv4 sockets and from IPv6 ones that
    // write it IPv4-mapped (connect6 hands it to the IPv4 translation).
    both_answered(&spread(cli, "TCP", cluster4, 80, 20).await?, 20, "TCP4")?;
    let IpAddr::V4(v4) = cluster4 else {
        unreachable!("an IPv4 ClusterIP")
    };
    let mapped = IpAddr::V6(v4.to_ipv6_mapped());
    both_answered(
        &spread(cli, "TCP", mapped, 80, 16).await?,
        16,
        &format!("TCP to {mapped}"),
    )?;
    both_answered(
        &spread(cli, "UDP", mapped, 53, 16).await?,
        16,
        &format!("UDP to {mapped}"),
    )?;
    println!(
        "services_ipv6: ClusterIPs {cluster4} and {cluster6}, client {}",
        ipv6_of(&pods["client"])
    );

    // Node 0's host network → the IPv6 ClusterIP: both backends, web-b on the other node
    // (the node's IPv6 leaves from its pod CIDR gateway and the answer tunnels back to it).
    let node0 = &cluster.nodes[0];
    both_answered(
        &spread(Client::Node(node0), "TCP", cluster6, 80, 20).await?,
        20,
        "node → TCP6",
    )?;

    // Node 0's host network → the IPv6-only Service's NodePort: on its own address, node
    // 1's and loopback.
    for ip in [
        IpAddr::V6(node0.address6),
        IpAddr::V6(cluster.nodes[1].address6),
        "::1".parse()?,
    ] {
        let target = format!("TCP:{}:{local_port}", socat_host(ip));
        let name = answer(
            node0.exec(&["bash", "-c", &exchange(&target)]).await?,
            &target,
        )?
        .with_context(|| format!("node → {target} refused"))?;
        ensure!(name == "web-a", "node → {target}: {name}");
    }

    // An IPv6 service without endpoints refuses.
    ensure!(
        ask(cli, "TCP", empty6, 80).await?.is_none(),
        "[{empty6}]:80 without endpoints must refuse the connect"
    );
    Ok(())
}
