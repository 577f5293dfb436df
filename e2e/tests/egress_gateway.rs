//! Issue 14, end to end: egress gateways on a simulated three-node cluster (operator,
//! agents, pods wired by tendril-cni), real TCP connections.
//!
//! Node 0 is a worker; nodes 1 and 2 carry the gateway label. An "external" namespace on
//! the underlay bridge holds 203.0.113.10 and 203.0.113.200 and runs an echo server that
//! counts accepted connections by source address; only the gateway candidates route
//! 203.0.113.0/24 to it, so the worker's pods reach it only through a gateway. The
//! EgressGatewayPolicy selects `app=client` pods, destinations 203.0.113.0/24 minus
//! 203.0.113.128/25, egress IP 10.250.0.240. Checked:
//! - a selected pod on the worker, and one on each gateway candidate (the gateway's own
//!   pods too), are seen with the egress IP, never with their own address;
//! - an unselected pod on the worker is not (no route: its connection fails), nor is a
//!   selected pod's connection to the excluded 203.0.113.200;
//! - egress policy is judged before the redirect: a deny-all egress NetworkPolicy on the
//!   clients stops them at their node (a policy drop there), nothing gets out;
//! - the egress IP sits on the gateway's uplink only; the agents count the packets they
//!   steered and SNATed;
//! - the gateway's agent restarts under an established connection, which keeps flowing;
//! - failover: while a client on the worker opens a connection every 100 ms, the gateway
//!   is marked NotReady and its uplink goes down; new connections leave through the other
//!   gateway, the time without a successful connection is printed, and no connection is
//!   ever seen with a pod address.
//!
//! Needs root. Run `cargo build -p tendril-controllers -p tendril-datapath --bins` first.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{EgressGatewayPolicy, EgressRoute};
use tendril_e2e::services::{NetnsSet, netns_prefix, sweep_stale};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod, ip, join_bridge};
use tendril_e2e::traffic::{EchoServer, TcpFlow};
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;
const SERVER: &str = "203.0.113.10";
const EXCLUDED_SERVER: &str = "203.0.113.200";
const OUTSIDE: &str = "10.250.0.200";
const EGRESS_IP: &str = "10.250.0.240";

/// A host outside the cluster on the underlay bridge (`kp-…`, removed on drop, swept after
/// a killed run) holding the server addresses.
async fn outside(underlay: &str) -> Result<(NetnsSet, String)> {
    sweep_stale();
    let mut set = NetnsSet::default();
    let netns = format!("{}-outside", netns_prefix());
    set.add(&netns).await?;
    let peer = format!("xe{}", std::process::id() % 100_000);
    join_bridge(underlay, &netns, &peer, OUTSIDE.parse()?).await?;
    for server in [SERVER, EXCLUDED_SERVER] {
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{server}/32"),
            "dev",
            "lo",
        ])
        .await?;
    }
    Ok((set, netns))
}

/// One TCP connection with a line echoed, from `pod`, within 3 s: whether it worked.
async fn connects(pod: &SimPod, to: &str) -> Result<bool> {
    let script = format!(
        "exec 3<>/dev/tcp/{to}/{PORT} || exit 3; echo hello >&3; read -t 2 line <&3 && [ \"$line\" = hello ]"
    );
    let out = pod.exec(&["timeout", "3", "bash", "-c", &script]).await?;
    Ok(out.status.success())
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

async fn set_gateway_label(nodes: &Api<Node>, node: &str, value: Option<&str>) -> Result<()> {
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"egress-gateway": value}}})),
        )
        .await?;
    Ok(())
}

async fn set_not_ready(nodes: &Api<Node>, node: &str) -> Result<()> {
    nodes
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": "False",
                "reason": "NodeDown", "lastHeartbeatTime": "2026-01-01T00:00:01Z",
                "lastTransitionTime": "2026-01-01T00:00:01Z"}]}}),
            ),
        )
        .await?;
    Ok(())
}

/// The IPv4 addresses on `dev` in namespace `netns`.
async fn addresses(netns: &str, dev: &str) -> Result<Vec<String>> {
    let out = ip(&["-n", netns, "-4", "-o", "addr", "show", "dev", dev]).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
        .collect())
}

async fn agent_counter(port: u16, reason: &str) -> Result<f64> {
    let m = fetch_metrics(port).await?;
    Ok(m.sum("tendril_datapath_packets_total", &[("reason", reason)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selected_pods_leave_through_the_gateway_with_the_egress_ip() -> Result<()> {
    let plane = ControlPlane::dedicated("egress-gateway").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let mut cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 3,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    let (outside, outside_netns) = outside(&cluster.underlay.netns).await?;
    let server = EchoServer::start(&outside_netns, PORT)?;
    let nodes: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let gw_label = env.unique_name("gw");
    for (i, node) in cluster.nodes.iter().enumerate().skip(1) {
        set_gateway_label(&nodes, &names[i], Some(&gw_label)).await?;
        // Only the gateway candidates reach the outside network.
        ip(&[
            "-n",
            &node.netns,
            "route",
            "replace",
            "203.0.113.0/24",
            "via",
            OUTSIDE,
        ])
        .await?;
    }

    let mut pods: BTreeMap<&str, SimPod> = BTreeMap::new();
    for (name, node, app) in [
        ("client-0", 0usize, "client"),
        ("client-1", 1, "client"),
        ("client-2", 2, "client"),
        ("other-0", 0, "other"),
    ] {
        let pod = SimPod::run(
            &client,
            cluster.nodes[node].handle(),
            &ns,
            name,
            &labels(app),
        )
        .await?;
        pod.wait_realized(&client, TIMEOUT).await?;
        pods.insert(name, pod);
    }
    let pod_ips: Vec<IpAddr> = pods.values().flat_map(|p| p.ips.clone()).collect();

    let policies: Api<EgressGatewayPolicy> = Api::all(client.clone());
    let routes: Api<EgressRoute> = Api::all(client.clone());
    let name = env.unique_name("egp");
    env.delete_on_drop::<EgressGatewayPolicy>(&name);
    let policy: EgressGatewayPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": name},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "client"}}}],
            "destinationCIDRs": ["203.0.113.0/24"],
            "excludedCIDRs": ["203.0.113.128/25"],
            "egressGateway": {"nodeSelector": {"matchLabels": {"egress-gateway": gw_label}},
                              "egressIP": EGRESS_IP},
        },
    }))?;
    let applied_at = Instant::now();
    policies.create(&PostParams::default(), &policy).await?;
    let route = wait_for(
        &routes,
        &name,
        |o: Option<&EgressRoute>| {
            o.is_some_and(|r| r.spec.source_ips.len() == 3 && r.spec.gateway_node.is_some())
        },
        TIMEOUT,
    )
    .await?
    .context("route")?;
    let gateway = route.spec.gateway_node.clone().unwrap();
    let gw_index = names
        .iter()
        .position(|n| *n == gateway)
        .context("gateway node")?;
    let standby = if gw_index == 1 { 2 } else { 1 };
    println!("gateway {gateway} (node {gw_index}), standby node {standby}");

    // The first connection through the gateway: policy applied → programmed everywhere.
    let client0 = &pods["client-0"];
    eventually(TIMEOUT, || async {
        ensure!(
            connects(client0, SERVER).await?,
            "client-0 cannot reach {SERVER} yet"
        );
        Ok(())
    })
    .await?;
    println!(
        "policy applied -> first connection through the gateway: {:?}",
        applied_at.elapsed()
    );
    let egress_ip: IpAddr = EGRESS_IP.parse()?;
    for pod in ["client-0", "client-1", "client-2"] {
        let before = server.tcp_accepted(egress_ip);
        ensure!(connects(&pods[pod], SERVER).await?, "{pod} did not connect");
        ensure!(
            server.tcp_accepted(egress_ip) == before + 1,
            "{pod}'s connection not seen from the egress IP"
        );
    }
    // Not selected, or an excluded destination: never through the gateway.
    let before = server.tcp_accepted(egress_ip);
    ensure!(
        !connects(&pods["other-0"], SERVER).await?,
        "other-0 reached the outside"
    );
    ensure!(
        !connects(client0, EXCLUDED_SERVER).await?,
        "client-0 reached the excluded destination"
    );
    ensure!(
        server.tcp_accepted(egress_ip) == before,
        "egress IP used for unselected traffic"
    );

    // Egress policy is judged before the redirect: a NetworkPolicy denying the clients'
    // egress stops them at their own node (counted as a policy drop there), and nothing
    // reaches the outside through the gateway.
    let netpols: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let deny: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "clients-no-egress"},
        "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"]},
    }))?;
    let worker_port = cluster.nodes[0].metrics_port;
    let policy_drops = |port: u16| async move {
        Ok::<_, anyhow::Error>(fetch_metrics(port).await?.sum(
            "tendril_datapath_drops_total",
            &[("reason", "policy_denied")],
        ))
    };
    let drops_before = policy_drops(worker_port).await?;
    netpols.create(&PostParams::default(), &deny).await?;
    let before = server.tcp_accepted(egress_ip);
    eventually(TIMEOUT, || async {
        ensure!(!connects(client0, SERVER).await?, "client-0 still connects");
        Ok(())
    })
    .await?;
    let denied_at = server.tcp_accepted(egress_ip);
    ensure!(
        !connects(client0, SERVER).await?,
        "client-0 connected under a deny-all egress policy"
    );
    ensure!(
        server.tcp_accepted(egress_ip) == denied_at,
        "a denied connection reached the outside"
    );
    eventually(Duration::from_secs(15), || async {
        let drops = policy_drops(worker_port).await?;
        ensure!(
            drops > drops_before,
            "no policy drop counted on the worker ({drops})"
        );
        Ok(())
    })
    .await?;
    println!(
        "deny-all egress policy: connections stopped at the source ({} got through while it was being programmed)",
        denied_at - before
    );
    netpols
        .delete("clients-no-egress", &Default::default())
        .await?;
    eventually(TIMEOUT, || async {
        ensure!(
            connects(client0, SERVER).await?,
            "client-0 cannot connect again"
        );
        Ok(())
    })
    .await?;

    // The egress IP is on the gateway's uplink only.
    ensure!(
        addresses(&cluster.nodes[gw_index].netns, "eth0")
            .await?
            .contains(&EGRESS_IP.to_string()),
        "egress IP not on the gateway's eth0"
    );
    for i in [0, standby] {
        ensure!(
            !addresses(&cluster.nodes[i].netns, "eth0")
                .await?
                .contains(&EGRESS_IP.to_string()),
            "egress IP on node {i}"
        );
    }
    let (worker_port, gw_port) = (
        cluster.nodes[0].metrics_port,
        cluster.nodes[gw_index].metrics_port,
    );
    let (redirected, snat) = eventually(Duration::from_secs(15), || async move {
        let redirected = agent_counter(worker_port, "egress_redirect").await?;
        let snat = agent_counter(gw_port, "egress_snat").await?;
        ensure!(
            redirected > 0.0 && snat > 0.0,
            "redirected {redirected}, SNATed {snat}"
        );
        Ok((redirected, snat))
    })
    .await?;
    println!("worker packets redirected: {redirected}; gateway packets SNATed: {snat}");
    let gw_metrics = fetch_metrics(cluster.nodes[gw_index].metrics_port).await?;
    ensure!(gw_metrics.value("tendril_egress_gateway_routes", &[]) == Some(1.0));
    println!(
        "gateway SNAT table entries: {:?}",
        gw_metrics.value("tendril_egress_nat_entries", &[])
    );

    // The gateway's agent restarts under an established connection: it keeps flowing
    // (maps, the SNAT table and the egress IP stay while the agent is away, and the new
    // agent converges to the same state).
    let flow = TcpFlow::start(
        &client0.sandbox.netns,
        SocketAddr::new(SERVER.parse()?, PORT),
        Duration::from_millis(50),
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[gw_index].kill_agent();
    let restarted_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[gw_index].start_agent()?;
    cluster.nodes[gw_index].wait_ready(&client).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Messages sent in the last moments are still on their way: out of the window.
    let window_end = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = flow.finish()?;
    let stats = log.stats(restarted_at, window_end, Duration::from_millis(500));
    println!("gateway agent restart under an established connection: {stats:?}");
    ensure!(
        stats.lost == 0 && stats.echoed > 10 && log.error().is_none(),
        "the connection through the gateway did not survive its agent's restart: {stats:?} {:?}",
        log.error()
    );
    ensure!(
        addresses(&cluster.nodes[gw_index].netns, "eth0")
            .await?
            .contains(&EGRESS_IP.to_string()),
        "the restarted agent dropped the egress IP"
    );

    // Failover under a client loop.
    // (when the connection started, when it ended, whether it worked)
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Instant, bool)>();
    let loop_pod = client0.sandbox.netns.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A new connection every 100 ms, each on its own (a lost SYN is retransmitted after
    // 1 s and must not hold the next attempts back).
    let looper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (tx, loop_pod) = (tx.clone(), loop_pod.clone());
                tokio::spawn(async move {
                    let script = format!(
                        "exec 3<>/dev/tcp/{SERVER}/{PORT} || exit 3; echo hello >&3; read -t 1 line <&3 && [ \"$line\" = hello ]"
                    );
                    let started = Instant::now();
                    let ok = tokio::process::Command::new("ip")
                        .args([
                            "netns", "exec", &loop_pod, "timeout", "3", "bash", "-c", &script,
                        ])
                        .stdin(std::process::Stdio::null())
                        .output()
                        .await
                        .is_ok_and(|o| o.status.success());
                    let _ = tx.send((started, Instant::now(), ok));
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The node dies (its uplink goes down), then its kubelet's NotReady arrives.
    ip(&[
        "-n",
        &cluster.nodes[gw_index].netns,
        "link",
        "set",
        "eth0",
        "down",
    ])
    .await?;
    let failed_at = Instant::now();
    set_not_ready(&nodes, &gateway).await?;
    let new_gateway = names[standby].clone();
    let switched = wait_for(
        &routes,
        &name,
        move |o: Option<&EgressRoute>| {
            o.is_some_and(|r| r.spec.gateway_node.as_deref() == Some(new_gateway.as_str()))
        },
        TIMEOUT,
    )
    .await?;
    ensure!(switched.is_some());
    println!(
        "failover: route moved to {} after {:?}",
        names[standby],
        failed_at.elapsed()
    );
    // Until a connection started after the failure succeeds (through the standby).
    let mut outcomes = Vec::new();
    let recovered = tokio::time::timeout(TIMEOUT, async {
        while let Some((started, ended, ok)) = rx.recv().await {
            outcomes.push((started, ended, ok));
            // Through the new gateway at once: no SYN retransmission.
            if ok && started > failed_at && ended - started < Duration::from_millis(500) {
                return Some((started, ended));
            }
        }
        None
    })
    .await
    .context("no connection succeeded after the failover")?
    .context("client loop ended")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    looper.await?;
    // The attempts still running end within their 3 s timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    while let Ok(o) = rx.try_recv() {
        outcomes.push(o);
    }
    let failures = outcomes
        .iter()
        .filter(|(started, _, ok)| *started > failed_at && !ok)
        .count();
    let last_before = outcomes
        .iter()
        .filter(|(started, _, ok)| *ok && *started < failed_at)
        .map(|(_, ended, _)| *ended)
        .max();
    println!(
        "failover: new connections go through at once again {:?} after the failure (that connection completed {:?} after it); {failures} attempts started after the failure failed; {} attempts in all; the last one started before the failure completed {:?} after it",
        recovered.0 - failed_at,
        recovered.1 - failed_at,
        outcomes.len(),
        last_before.map(|e| e.saturating_duration_since(failed_at)),
    );
    ensure!(
        addresses(&cluster.nodes[standby].netns, "eth0")
            .await?
            .contains(&EGRESS_IP.to_string()),
        "egress IP not on the new gateway"
    );
    for ip in &pod_ips {
        ensure!(
            server.tcp_accepted(*ip) == 0,
            "a connection was seen from pod address {ip}"
        );
    }
    // The agents read the programs' counters every 5 s.
    let standby_port = cluster.nodes[standby].metrics_port;
    eventually(Duration::from_secs(15), || async move {
        let snat = agent_counter(standby_port, "egress_snat").await?;
        ensure!(snat > 0.0, "the new gateway SNATed nothing");
        Ok(())
    })
    .await?;
    drop(server);
    drop(outside);
    Ok(())
}
