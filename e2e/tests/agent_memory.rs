//! Benchmark: what one remote endpoint costs an agent (and the operator) in memory.
//!
//! One simulated node (real operator and agent). N `Endpoint`s of pods on other nodes are
//! written to the API (remote endpoints: each one an entry of the agent's caches and of its
//! node's `ipcache`). RSS of both processes is read from `/proc/<pid>/status` before, and
//! after the agent's `ipcache` map holds all N (so its caches hold them too); the figure is
//! the difference over N, printed for N = 1,000 and 4,000 (the growth between them is the
//! per-endpoint cost without start-up effects). Asserts nothing about memory.
//! Run with `hack/bench.sh memory`; needs root.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use ipnet::IpNet;
use kube::api::{Api, PostParams};
use tendril_crds::v1alpha1::{Endpoint, EndpointSpec};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_rss_per_remote_endpoint() -> Result<()> {
    // A plane of its own: the extra Node must not reach other tests' agents.
    let plane = ControlPlane::dedicated("agent-memory").await?;
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
    let pin_dir = cluster.nodes[0].bpffs_root.join(&cluster.nodes[0].name);
    let agent_pid = cluster.nodes[0].agent().context("agent")?.pid();
    let operator_pid = cluster.operator.pid();
    let api: Api<Endpoint> = Api::namespaced(client.clone(), env.namespace());

    // Idle first: caches synced, maps written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (agent0, operator0) = (rss(agent_pid)?, rss(operator_pid)?);
    println!(
        "baseline: agent RSS {:.1} MiB, operator RSS {:.1} MiB",
        agent0 as f64 / 1048576.0,
        operator0 as f64 / 1048576.0
    );
    let mut created = 0;
    let mut rows = Vec::new();
    for n in SIZES {
        futures::stream::iter(created..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &remote_endpoint(i))
                        .await
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        created = n;
        let dir = pin_dir.clone();
        eventually(TIMEOUT, || {
            let dir = dir.clone();
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
        })
        .await?;
        // Let allocator caches settle the same way at every size.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (agent, operator) = (rss(agent_pid)?, rss(operator_pid)?);
        rows.push((n, agent, operator));
    }
    println!(
        "| endpoints | agent RSS | agent bytes/endpoint | operator RSS | operator bytes/endpoint |"
    );
    println!("|---|---|---|---|---|");
    let mut previous = (0usize, agent0, operator0);
    for (n, agent, operator) in &rows {
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
    Ok(())
}
