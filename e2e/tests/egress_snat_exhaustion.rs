//! Issue 14: a full egress SNAT table is a metric and an Event, not silent drops.
//!
//! Two simulated nodes whose agents run with `bpfMapSizes.egressNat: 8` (four connections);
//! node 1 is the only gateway. A pod on node 0 opens four long-lived connections to the
//! outside through it; a fifth cannot be SNATed: it fails, the established four keep
//! flowing (nothing is evicted), the gateway counts
//! `tendril_datapath_drops_total{reason="egress_snat_failed"}`, reports
//! `tendril_egress_nat_entries` 8, and publishes a Warning Event `EgressSNATFailed` on its
//! NodeNetwork.
//!
//! Needs root. Run `cargo build -p tendril-controllers -p tendril-datapath --bins` first.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{EgressGatewayPolicy, EgressRoute};
use tendril_e2e::services::{NetnsSet, netns_prefix, sweep_stale};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod, ip, join_bridge};
use tendril_e2e::traffic::{EchoServer, TcpFlow};
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;
const SERVER: &str = "203.0.113.10";
const OUTSIDE: &str = "10.250.0.201";
const EGRESS_IP: &str = "10.250.0.241";

/// A host outside the cluster on the underlay bridge (`kp-…`, removed on drop, swept after
/// a killed run) holding the server addresses.
async fn outside(underlay: &str) -> Result<(NetnsSet, String)> {
    sweep_stale();
    let mut set = NetnsSet::default();
    let netns = format!("{}-outside", netns_prefix());
    set.add(&netns).await?;
    let peer = format!("xs{}", std::process::id() % 100_000);
    join_bridge(underlay, &netns, &peer, OUTSIDE.parse()?).await?;
    for server in [SERVER] {
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

/// Removes the agent configuration file on drop.
struct ConfigFile(std::path::PathBuf);

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_snat_table_refuses_new_connections_loudly() -> Result<()> {
    // The agents read TENDRIL_CONFIG (the operator gets --config and ignores it). This test
    // binary runs this one test only, so the variable reaches exactly its agents.
    let config = ConfigFile(
        std::env::temp_dir().join(format!("tendril-egress-snat-{}.yaml", std::process::id())),
    );
    std::fs::write(&config.0, "bpfMapSizes:\n  egressNat: 8\n")?;
    // SAFETY: set before any other thread of this test reads the environment.
    unsafe { std::env::set_var("TENDRIL_CONFIG", &config.0) };

    let plane = ControlPlane::dedicated("egress-snat").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let (outside, outside_netns) = outside(&cluster.underlay.netns).await?;
    let _server = EchoServer::start(&outside_netns, PORT)?;
    let gateway = cluster.nodes[1].name.clone();
    let nodes: Api<Node> = Api::all(client.clone());
    let label = env.unique_name("gw");
    nodes
        .patch(
            &gateway,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"egress-gateway": label}}})),
        )
        .await?;
    ip(&[
        "-n",
        &cluster.nodes[1].netns,
        "route",
        "replace",
        "203.0.113.0/24",
        "via",
        OUTSIDE,
    ])
    .await?;
    let pod = SimPod::run(
        &client,
        cluster.nodes[0].handle(),
        &ns,
        "client",
        &BTreeMap::from([("app".to_string(), "client".to_string())]),
    )
    .await?;
    pod.wait_realized(&client, TIMEOUT).await?;

    let name = env.unique_name("egp");
    env.delete_on_drop::<EgressGatewayPolicy>(&name);
    let policies: Api<EgressGatewayPolicy> = Api::all(client.clone());
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "EgressGatewayPolicy",
                "metadata": {"name": name},
                "spec": {
                    "selectors": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                    "destinationCIDRs": ["203.0.113.0/24"],
                    "egressGateway": {"nodeSelector": {"matchLabels": {"egress-gateway": label}},
                                      "egressIP": EGRESS_IP},
                },
            }))?,
        )
        .await?;
    let routes: Api<EgressRoute> = Api::all(client.clone());
    wait_for(
        &routes,
        &name,
        |o: Option<&EgressRoute>| {
            o.is_some_and(|r| r.spec.gateway_node.is_some() && r.spec.source_ips.len() == 1)
        },
        TIMEOUT,
    )
    .await?
    .context("route")?;

    // Programmed on both nodes (the agents set these gauges when their step converged).
    let (worker_port, gw_port) = (cluster.nodes[0].metrics_port, cluster.nodes[1].metrics_port);
    eventually(TIMEOUT, || async move {
        let worker = fetch_metrics(worker_port).await?;
        let gw = fetch_metrics(gw_port).await?;
        ensure!(
            worker.value("tendril_egress_policy_entries", &[]) == Some(1.0)
                && gw.value("tendril_egress_gateway_routes", &[]) == Some(1.0),
            "egress not programmed yet"
        );
        Ok(())
    })
    .await?;

    // Four connections fill the table.
    let to = SocketAddr::new(SERVER.parse()?, PORT);
    let mut flows = Vec::new();
    for _ in 0..4 {
        flows.push(TcpFlow::start(
            &pod.sandbox.netns,
            to,
            Duration::from_millis(100),
        )?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        flows.iter().all(|f| f.log().echoed() > 0),
        "the connections within the table's room did not all work"
    );
    let entries = || async move {
        Ok::<_, anyhow::Error>(
            fetch_metrics(gw_port)
                .await?
                .value("tendril_egress_nat_entries", &[])
                .unwrap_or(0.0),
        )
    };
    eventually(Duration::from_secs(15), || async {
        let n = entries().await?;
        ensure!(n == 8.0, "egress_nat holds {n} entries, not 8");
        Ok(())
    })
    .await?;

    // The fifth cannot be SNATed.
    let fifth = TcpFlow::start(&pod.sandbox.netns, to, Duration::from_millis(100));
    let refused = match fifth {
        Err(_) => true,
        Ok(flow) => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            flow.log().echoed() == 0
        }
    };
    ensure!(refused, "a fifth connection got through a full table");
    let checked_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        flows.iter().all(|f| f.log().echoes_after(checked_at) > 0),
        "an established connection stopped when the table was full"
    );
    let drops = eventually(Duration::from_secs(15), || async {
        let d = fetch_metrics(gw_port).await?.sum(
            "tendril_datapath_drops_total",
            &[("reason", "egress_snat_failed")],
        );
        ensure!(d > 0.0, "no egress_snat_failed drop counted");
        Ok(d)
    })
    .await?;
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let note = eventually(Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await?;
        list.items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("EgressSNATFailed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                        == Some(gateway.as_str())
            })
            .and_then(|e| e.note.clone())
            .context("no EgressSNATFailed Event on the gateway's NodeNetwork")
    })
    .await?;
    println!("full table: {drops} packets refused; Event: {note}");
    for flow in flows {
        flow.finish()?;
    }
    drop(outside);
    Ok(())
}
