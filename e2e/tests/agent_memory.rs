//! Benchmark: what one remote endpoint costs an agent (and the operator) in memory.
//!
//! One simulated node (real operator and agent). N `Endpoint`s of pods on other nodes are
//! written to the API (remote endpoints: each one an entry of the agent's caches and of its
//! node's `ipcache`). RSS of both processes is read from `/proc/<pid>/status` before, and
//! after the agent's `ipcache` map holds all N (so its caches hold them too); the figure is
//! the difference over N, printed for N = 1,000 and 4,000 (the growth between them is the
//! per-endpoint cost without start-up effects). The same for services: N LBServices (a
//! ClusterIP with two remote backends each) realized by the node. Asserts nothing about
//! memory.
//! Run with `hack/bench.sh memory`; needs root.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use ipnet::IpNet;
use kube::api::{Api, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{Endpoint, EndpointSpec, LBService, NodeNetwork};
use tendril_datapath::bpf::Dataplane;
use tendril_e2e::sim::{SimCluster, SimClusterConfig, ensure_node_object};
use tendril_e2e::{ControlPlane, TestEnv, eventually};

const TIMEOUT: Duration = Duration::from_secs(300);
const SIZES: [usize; 2] = [1000, 4000];
/// The node the remote endpoints live on: a `Node` object only (its address is the tunnel
/// endpoint of their ipcache entries; nothing is ever sent there).
const REMOTE_NODE: &str = "bench-remote";

/// Resident set size of `pid`, in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// The `i`-th remote endpoint's address: 10.201.0.0/16, outside the test's pod pool (10.200.0.0/16).
fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn remote_endpoint(i: usize) -> Endpoint {
    Endpoint::new(
        &format!("remote-{i}"),
        EndpointSpec {
            node: REMOTE_NODE.into(),
            ips: vec![address(i).to_string()],
            security_labels: BTreeMap::from([
                ("k8s:app".to_string(), format!("app{}", i % 50)),
                (
                    "k8s:io.kubernetes.pod.namespace".to_string(),
                    "bench".to_string(),
                ),
            ]),
            identity: Some(60_000 + (i % 50) as i64),
            service_account: "default".into(),
            revision: 1,
            ..Default::default()
        },
    )
}

/// RSS of the agent and the operator after each size of `sizes`: objects `0..n` created
/// (16 in flight) by `create`, then `realized(n)` waited for, then 3 s for allocator caches
/// to settle the same way at every size.
async fn rss_by_size<C, CF, R, RF>(
    sizes: &[usize],
    pids: (u32, u32),
    create: C,
    realized: R,
) -> Result<Vec<(usize, u64, u64)>>
where
    C: Fn(usize) -> CF,
    CF: std::future::Future<Output = Result<()>>,
    R: Fn(usize) -> RF,
    RF: std::future::Future<Output = Result<()>>,
{
    let mut created = 0;
    let mut rows = Vec::new();
    for &n in sizes {
        futures::stream::iter(created..n)
            .map(&create)
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        created = n;
        eventually(TIMEOUT, || realized(n)).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        rows.push((n, rss(pids.0)?, rss(pids.1)?));
    }
    Ok(rows)
}

/// The table of [`rss_by_size`]'s rows, each size's cost per object over the previous size.
fn print_rss_table(what: &str, baseline: (u64, u64), rows: &[(usize, u64, u64)]) {
    println!("| {what}s | agent RSS | agent bytes/{what} | operator RSS | operator bytes/{what} |");
    println!("|---|---|---|---|---|");
    let mut previous = (0usize, baseline.0, baseline.1);
    for (n, agent, operator) in rows {
        let dn = (*n - previous.0) as f64;
        println!(
            "| {n} | {:.1} MiB | {:.0} | {:.1} MiB | {:.0} |",
            *agent as f64 / 1048576.0,
            (*agent as f64 - previous.1 as f64) / dn,
            *operator as f64 / 1048576.0,
            (*operator as f64 - previous.2 as f64) / dn,
        );
        previous = (*n, *agent, *operator);
    }
}

/// A dedicated plane (the extra Node must not reach other tests' agents), the remote Node,
/// one simulated node; idle RSS of (agent, operator) once its caches synced.
async fn one_node(plane: &str) -> Result<(TestEnv, SimCluster, (u32, u32), (u64, u64))> {
    let plane = ControlPlane::dedicated(plane).await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    ensure_node_object(
        &client,
        REMOTE_NODE,
        Ipv4Addr::new(10, 250, 99, 10),
        &BTreeMap::new(),
    )
    .await?;
    let mut cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 1,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    cluster.nodes[0].wait_ready(&client).await?;
    let pids = (
        cluster.nodes[0].agent().context("agent")?.pid(),
        cluster.operator.pid(),
    );
    // Idle first: caches synced, maps written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = (rss(pids.0)?, rss(pids.1)?);
    println!(
        "baseline: agent RSS {:.1} MiB, operator RSS {:.1} MiB",
        baseline.0 as f64 / 1048576.0,
        baseline.1 as f64 / 1048576.0
    );
    Ok((env, cluster, pids, baseline))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_rss_per_remote_endpoint() -> Result<()> {
    let (env, cluster, pids, baseline) = one_node("agent-memory").await?;
    let pin_dir = cluster.nodes[0].bpffs_root.join(&cluster.nodes[0].name);
    let api: Api<Endpoint> = Api::namespaced(env.client(), env.namespace());
    let rows = rss_by_size(
        &SIZES,
        pids,
        |i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &remote_endpoint(i))
                    .await?;
                Ok(())
            }
        },
        |n| {
            let dir = pin_dir.clone();
            async move {
                let ipcache = Dataplane::open(&dir)?.ipcache.by_prefix()?;
                let present = (0..n)
                    .filter(|i| ipcache.contains_key(&IpNet::from(IpAddr::V4(address(*i)))))
                    .count();
                ensure!(
                    present == n,
                    "{present}/{n} remote endpoints in the ipcache"
                );
                Ok(())
            }
        },
    )
    .await?;
    print_rss_table("endpoint", baseline, &rows);
    drop(cluster);
    Ok(())
}

/// The `i`-th service: ClusterIP 10.96.128.0/17 + i, port 80, two backends on the remote
/// node (its own two: each service's backends are entries of their own).
fn remote_service(i: usize) -> LBService {
    let cluster_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 128, 0)) + i as u32);
    let backend = |j: usize| {
        json!({
            "portName": "web", "address": address(2 * i + j).to_string(), "port": 8080,
            "protocol": "TCP", "nodeName": REMOTE_NODE,
        })
    };
    serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "LBService",
        "metadata": { "name": format!("svc-{i}") },
        "spec": {
            "revision": i + 1,
            "frontends": [{ "name": "web", "type": "ClusterIP", "address": cluster_ip.to_string(), "port": 80, "protocol": "TCP" }],
            "backends": [backend(0), backend(1)],
        },
    }))
    .expect("an LBService")
}

/// The agent's memory per service: hand-written LBServices (as the services concern writes
/// them; it leaves hand-written ones alone), each a ClusterIP with two backends, until the
/// node realizes the highest revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_rss_per_service() -> Result<()> {
    let (env, cluster, pids, baseline) = one_node("agent-memory-services").await?;
    let node = cluster.nodes[0].name.clone();
    let api: Api<LBService> = Api::namespaced(env.client(), env.namespace());
    let networks: Api<NodeNetwork> = Api::all(env.client());
    let rows = rss_by_size(
        &SIZES,
        pids,
        |i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &remote_service(i))
                    .await?;
                Ok(())
            }
        },
        |n| {
            let (networks, node) = (networks.clone(), node.clone());
            async move {
                let realized = networks
                    .get(&node)
                    .await?
                    .status
                    .and_then(|s| s.realized_services_revision);
                ensure!(
                    realized >= Some(n as i64),
                    "services revision {realized:?} realized, waiting for {n}"
                );
                Ok(())
            }
        },
    )
    .await?;
    print_rss_table("service", baseline, &rows);
    drop(cluster);
    Ok(())
}
