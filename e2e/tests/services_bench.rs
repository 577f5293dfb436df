//! Issue 12 benchmark: Tendril's service load balancing against kube-proxy in iptables and
//! nftables mode, side by side in one run on this machine (each on a control plane of its
//! own, one after the other, so none loads another's).
//!
//! Each target gets one node with two backend pods (`b0`, `b1`, answering on 8080) and a
//! client pod `c0`. Services are ClusterIP services without selector, one TCP port, with one
//! EndpointSlice each written by the bench (both backends, ready, `nodeName` set, and
//! `endpoints.kubernetes.io/last-change-trigger-time` = when it was written, which is what
//! kube-proxy's network programming duration counts from).
//!
//! 1. **Programming** at 1k and 10k services (30k with `TENDRIL_SVC_BENCH_30K=1`):
//!    - `grow`: the services up to that size are applied (16 API calls in flight); the
//!      time from the first apply of the batch until the last service answers a connect
//!      from `c0` (kube-proxy) or the node reports `realizedServicesRevision` ≥ the highest
//!      LBService revision (Tendril); kube-proxy's `kubeproxy_sync_proxy_rules_duration_
//!      seconds` and `kubeproxy_network_programming_duration_seconds` over the batch (mean,
//!      and the bucket bound holding the 99th percentile);
//!    - `from scratch`: every service programmed on a node that has none — kube-proxy
//!      restarted after `nft flush ruleset` (start → first sync, and that sync's duration),
//!      Tendril a fresh node joining (node setup and registration → realized, and its
//!      agent's start → realized, the part kube-proxy's restart compares with).
//! 2. **One change** with 10k services present: 20 times a new service (Service +
//!    EndpointSlice) applied, timed from the apply to the first answered connect from
//!    `c0`; also kube-proxy's own network programming duration of that change, and for
//!    Tendril the apply → node's realized revision and `tendril_services_network_
//!    programming_duration_seconds`; p50 and p99 (nearest rank: with 20 samples p99 is the maximum).
//! 3. **Connect latency**: 2000 TCP connect + close from `c0` to 16 ClusterIPs in turn, at
//!    1, 1k and 10k services; p50 and p99.
//!
//! `TENDRIL_SVC_BENCH_TARGETS=nftables,tendril` runs only those targets.
//!
//! Prints one table with the ratios (Tendril ÷ iptables, Tendril ÷ nftables, nftables ÷
//! iptables). Tendril's column is left out, saying why, when its services datapath is not
//! there (no LBService realized on the node within a minute of the first service); no
//! figure is ever made up. Asserts nothing about speed. Needs root.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_e2e::services::Spot;
use tendril_e2e::services::kube_proxy::{KubeProxyWorld, ProxyMode};
use tendril_e2e::services::probe::{NameEcho, run_latency_process, run_wait_process};
use tendril_e2e::services::tendril::{wait_revision_realized, wait_services_realized};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimNode, SimPod};
use tendril_e2e::{ControlPlane, Metrics, TestEnv, fetch_metrics, wait_deleted};

const BACKEND_PORT: u16 = 8080;
const SERVICE_PORT: u16 = 80;
const CHANGES: usize = 20;
const CONNECTS: u32 = 2000;
const IN_FLIGHT: usize = 16;
const REALIZE_TIMEOUT: Duration = Duration::from_secs(600);
/// iptables mode at 30k services needs minutes for its first full sync.
const SCRATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// `TENDRIL_SVC_BENCH_TARGETS` (comma-separated; default all three).
fn targets() -> Vec<String> {
    std::env::var("TENDRIL_SVC_BENCH_TARGETS")
        .unwrap_or_else(|_| "iptables,nftables,tendril".into())
        .split(',')
        .map(|t| t.trim().to_string())
        .collect()
}

fn sizes() -> Vec<usize> {
    let mut s = vec![1_000, 10_000];
    if std::env::var("TENDRIL_SVC_BENCH_30K").is_ok_and(|v| v == "1") {
        s.push(30_000);
    }
    s
}

/// What one target measured; a missing figure is one the target could not give.
#[derive(Default)]
struct Figures {
    /// (what, size) → seconds or milliseconds, see the row names.
    rows: BTreeMap<(u8, String), f64>,
    skipped: Option<String>,
}

impl Figures {
    fn put(&mut self, order: u8, name: impl Into<String>, v: f64) {
        self.rows.insert((order, name.into()), v);
    }
}

/// p-th percentile by nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A histogram's state: count, sum and cumulative buckets.
#[derive(Clone, Default)]
struct Hist {
    count: f64,
    sum: f64,
    buckets: Vec<(f64, f64)>,
}

/// kube-proxy labels its figures by IP family; the bench's services are IPv4.
const V4: &[(&str, &str)] = &[("ip_family", "IPv4")];

fn hist(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Hist {
    let mut buckets: Vec<(f64, f64)> = m
        .matching(&format!("{name}_bucket"), labels)
        .filter_map(|s| {
            let le = s.labels.get("le")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, s.value))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    Hist {
        count: m.sum(&format!("{name}_count"), labels),
        sum: m.sum(&format!("{name}_sum"), labels),
        buckets,
    }
}

impl Hist {
    /// What was observed between `before` and `self`: (count, mean, bucket bound of p99).
    fn since(&self, before: &Hist) -> Option<(f64, f64, f64)> {
        let n = self.count - before.count;
        if n <= 0.0 {
            return None;
        }
        let mean = (self.sum - before.sum) / n;
        let p99 = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let prev = before
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |b| b.1);
                (*le, c - prev)
            })
            .find(|(_, c)| *c >= 0.99 * n)
            .map_or(f64::NAN, |b| b.0);
        Some((n, mean, p99))
    }
}

const SYNC: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
const NETPROG: &str = "kubeproxy_network_programming_duration_seconds";
const FULL_SYNC: &str = "kubeproxy_sync_full_proxy_rules_duration_seconds";
const TENDRIL_NETPROG: &str = "tendril_services_network_programming_duration_seconds";

fn service_object(name: &str) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "tcp", "port": SERVICE_PORT, "protocol": "TCP"}]},
    }))?)
}

fn slice_object(name: &str, backends: &[Ipv4Addr], node: &str) -> Result<EndpointSlice> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    Ok(serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-bench"),
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "bench.tendril.dev",
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now},
        },
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": BACKEND_PORT, "protocol": "TCP"}],
        "endpoints": backends.iter().map(|b| json!({
            "addresses": [b.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": node,
        })).collect::<Vec<_>>(),
    }))?)
}

/// One bench node's world, whichever the target.
struct Bench {
    env: TestEnv,
    node: String,
    backends: Vec<Ipv4Addr>,
    client: Spot,
    /// Service name → ClusterIP.
    services: BTreeMap<String, Ipv4Addr>,
    _echo: Vec<NameEcho>,
}

impl Bench {
    /// Applies services `s{from}..s{to}`, 16 in flight.
    async fn grow(&mut self, from: usize, to: usize) -> Result<()> {
        let svcs: Api<Service> = self.env.api();
        let slices: Api<EndpointSlice> = self.env.api();
        let (backends, node) = (self.backends.clone(), self.node.clone());
        let created: Vec<(String, Ipv4Addr)> =
            futures::stream::iter(from..to)
                .map(|i| {
                    let (svcs, slices, backends, node) =
                        (svcs.clone(), slices.clone(), backends.clone(), node.clone());
                    async move {
                        create_service(&svcs, &slices, &format!("s{i}"), &backends, &node).await
                    }
                })
                .buffer_unordered(IN_FLIGHT)
                .try_collect()
                .await?;
        self.services.extend(created);
        Ok(())
    }

    /// 16 ClusterIPs spread over the services present.
    fn targets(&self) -> Vec<SocketAddr> {
        let all: Vec<&Ipv4Addr> = self.services.values().collect();
        let step = (all.len() / 16).max(1);
        all.iter()
            .step_by(step)
            .take(16)
            .map(|ip| SocketAddr::new((**ip).into(), SERVICE_PORT))
            .collect()
    }

    async fn latency(&self) -> Result<(f64, f64)> {
        let mut lat: Vec<f64> = run_latency_process(&self.client, &self.targets(), CONNECTS)
            .await?
            .into_iter()
            .map(|us| us as f64 / 1000.0)
            .collect();
        lat.sort_by(f64::total_cmp);
        Ok((percentile(&lat, 50.0), percentile(&lat, 99.0)))
    }

    /// When (since the epoch) the service answered a connect from the client.
    async fn answered_at(&self, name: &str) -> Result<Duration> {
        let to = SocketAddr::new(self.services[name].into(), SERVICE_PORT);
        run_wait_process(&self.client, to, REALIZE_TIMEOUT).await
    }
}

async fn create_service(
    svcs: &Api<Service>,
    slices: &Api<EndpointSlice>,
    name: &str,
    backends: &[Ipv4Addr],
    node: &str,
) -> Result<(String, Ipv4Addr)> {
    let svc = svcs
        .create(&PostParams::default(), &service_object(name)?)
        .await
        .with_context(|| format!("creating Service {name}"))?;
    slices
        .create(&PostParams::default(), &slice_object(name, backends, node)?)
        .await
        .with_context(|| format!("creating the EndpointSlice of {name}"))?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .and_then(|ip| ip.parse().ok())
        .context("no ClusterIP")?;
    Ok((name.to_string(), ip))
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

async fn kube_proxy_target(mode: ProxyMode) -> Result<Figures> {
    let plane = ControlPlane::dedicated(&format!("svc-bench-{}", mode.as_str())).await?;
    let env = TestEnv::on(plane).await?;
    let mut world = KubeProxyWorld::start(&env, mode, 1).await?;
    let b0 = world.add_pod("b0", 0, &BTreeMap::new()).await?;
    let b1 = world.add_pod("b1", 0, &BTreeMap::new()).await?;
    let c0 = world.add_pod("c0", 0, &BTreeMap::new()).await?;
    let echo = vec![
        NameEcho::start(&b0.netns, "b0", BACKEND_PORT)?,
        NameEcho::start(&b1.netns, "b1", BACKEND_PORT)?,
    ];
    let mut bench = Bench {
        node: world.nodes[0].name.clone(),
        backends: vec![b0.ip, b1.ip],
        client: Spot::new("c0", &c0.netns),
        services: BTreeMap::new(),
        _echo: echo,
        env,
    };
    let mut f = Figures::default();
    bench.grow(0, 1).await?;
    bench.answered_at("s0").await?;
    let (p50, p99) = bench.latency().await?;
    f.put(30, "connect p50 ms @ 1", p50);
    f.put(31, "connect p99 ms @ 1", p99);
    let mut have = 1;
    for size in sizes() {
        let m0 = world.metrics(0).await?;
        let start = since_epoch();
        bench.grow(have, size).await?;
        let applied = since_epoch();
        let last = format!("s{}", size - 1);
        let at = bench.answered_at(&last).await?;
        have = size;
        let m1 = world.metrics(0).await?;
        let k = size / 1000;
        f.put(
            1,
            format!("grow {k:>2}k: apply s"),
            (applied - start).as_secs_f64(),
        );
        f.put(
            2,
            format!("grow {k:>2}k: apply→realized s"),
            (at.saturating_sub(start)).as_secs_f64(),
        );
        if let Some((n, mean, p99)) = hist(&m1, SYNC, V4).since(&hist(&m0, SYNC, V4)) {
            f.put(3, format!("grow {k:>2}k: syncs"), n);
            f.put(4, format!("grow {k:>2}k: sync mean s"), mean);
            f.put(5, format!("grow {k:>2}k: sync p99≤ s"), p99);
        }
        if let Some((_, mean, p99)) = hist(&m1, NETPROG, V4).since(&hist(&m0, NETPROG, V4)) {
            f.put(6, format!("grow {k:>2}k: netprog mean s"), mean);
            f.put(7, format!("grow {k:>2}k: netprog p99≤ s"), p99);
        }
        // From scratch: a restarted kube-proxy on a flushed node.
        let t = Instant::now();
        world.restart_proxy_from_scratch(0, &bench.env).await?;
        world.wait_synced(0, SCRATCH_TIMEOUT).await?;
        let took = t.elapsed();
        let m = world.metrics(0).await?;
        f.put(
            10,
            format!("scratch {k:>2}k: start→synced s"),
            took.as_secs_f64(),
        );
        let h = hist(&m, FULL_SYNC, V4);
        if h.count > 0.0 {
            f.put(11, format!("scratch {k:>2}k: full sync s"), h.sum / h.count);
        }
        bench.answered_at(&last).await?;
        if size == 1_000 || size == 10_000 {
            let (p50, p99) = bench.latency().await?;
            f.put(30, format!("connect p50 ms @{k:>2}k"), p50);
            f.put(31, format!("connect p99 ms @{k:>2}k"), p99);
        }
        if size == 10_000 {
            let mut packet = Vec::new();
            let mut metric = Vec::new();
            for j in 0..CHANGES {
                let m0 = world.metrics(0).await?;
                let name = format!("chg{j}");
                let start = since_epoch();
                let svcs: Api<Service> = bench.env.api();
                let slices: Api<EndpointSlice> = bench.env.api();
                let (n, ip) =
                    create_service(&svcs, &slices, &name, &bench.backends, &bench.node).await?;
                bench.services.insert(n, ip);
                let at = bench.answered_at(&name).await?;
                packet.push(at.saturating_sub(start).as_secs_f64() * 1000.0);
                // kube-proxy observes the change's duration after its sync; wait for it.
                let mut seen = None;
                for _ in 0..100 {
                    let m1 = world.metrics(0).await?;
                    if let Some((_, mean, _)) =
                        hist(&m1, NETPROG, V4).since(&hist(&m0, NETPROG, V4))
                    {
                        seen = Some(mean * 1000.0);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                metric.extend(seen);
            }
            packet.sort_by(f64::total_cmp);
            metric.sort_by(f64::total_cmp);
            f.put(
                20,
                "change @10k: apply→answered p50 ms",
                percentile(&packet, 50.0),
            );
            f.put(
                21,
                "change @10k: apply→answered p99 ms",
                percentile(&packet, 99.0),
            );
            if !metric.is_empty() {
                f.put(
                    22,
                    "change @10k: netprog metric p50 ms",
                    percentile(&metric, 50.0),
                );
                f.put(
                    23,
                    "change @10k: netprog metric p99 ms",
                    percentile(&metric, 99.0),
                );
            }
        }
    }
    world.check_running()?;
    Ok(f)
}

async fn tendril_target() -> Result<Figures> {
    let plane = ControlPlane::dedicated("svc-bench-tendril").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let config = SimClusterConfig {
        nodes: 1,
        ..SimClusterConfig::default()
    };
    let mut cluster = SimCluster::start(&env, config).await?;
    let ns = env.namespace().to_string();
    let handle = cluster.nodes[0].handle().clone();
    let b0 = SimPod::run(&client, &handle, &ns, "b0", &BTreeMap::new()).await?;
    let b1 = SimPod::run(&client, &handle, &ns, "b1", &BTreeMap::new()).await?;
    let c0 = SimPod::run(&client, &handle, &ns, "c0", &BTreeMap::new()).await?;
    let ip4 = |p: &SimPod| -> Result<Ipv4Addr> {
        p.ips
            .iter()
            .find_map(|ip| match ip {
                std::net::IpAddr::V4(v4) => Some(*v4),
                _ => None,
            })
            .context("pod without IPv4")
    };
    let echo = vec![
        NameEcho::start(&b0.sandbox.netns, "b0", BACKEND_PORT)?,
        NameEcho::start(&b1.sandbox.netns, "b1", BACKEND_PORT)?,
    ];
    let mut bench = Bench {
        node: cluster.nodes[0].name.clone(),
        backends: vec![ip4(&b0)?, ip4(&b1)?],
        client: Spot::new("c0", &c0.sandbox.netns),
        services: BTreeMap::new(),
        _echo: echo,
        env,
    };
    let mut f = Figures::default();
    bench.grow(0, 1).await?;
    if let Err(e) = wait_services_realized(&client, &ns, Some(2), Duration::from_secs(60)).await {
        f.skipped = Some(format!(
            "Tendril's services datapath is not present (no LBService realized on the node \
             within 60 s of the first service: {e:#})"
        ));
        return Ok(f);
    }
    bench.answered_at("s0").await?;
    let (p50, p99) = bench.latency().await?;
    f.put(30, "connect p50 ms @ 1", p50);
    f.put(31, "connect p99 ms @ 1", p99);
    let port = cluster.nodes[0].metrics_port;
    let mut have = 1;
    for size in sizes() {
        let m0 = fetch_metrics(port).await?;
        let start = Instant::now();
        bench.grow(have, size).await?;
        let applied = start.elapsed();
        let revision = wait_services_realized(&client, &ns, Some(2), REALIZE_TIMEOUT).await?;
        let realized = start.elapsed();
        have = size;
        let m1 = fetch_metrics(port).await?;
        let k = size / 1000;
        f.put(1, format!("grow {k:>2}k: apply s"), applied.as_secs_f64());
        f.put(
            2,
            format!("grow {k:>2}k: apply→realized s"),
            realized.as_secs_f64(),
        );
        for (order, name) in sync_metric_names(&m1) {
            if let Some((n, mean, p99)) = hist(&m1, &name, &[]).since(&hist(&m0, &name, &[])) {
                f.put(order, format!("grow {k:>2}k: syncs"), n);
                f.put(order + 1, format!("grow {k:>2}k: sync mean s"), mean);
                f.put(order + 2, format!("grow {k:>2}k: sync p99≤ s"), p99);
            }
        }
        if let Some((_, mean, p99)) =
            hist(&m1, TENDRIL_NETPROG, &[]).since(&hist(&m0, TENDRIL_NETPROG, &[]))
        {
            f.put(6, format!("grow {k:>2}k: netprog mean s"), mean);
            f.put(7, format!("grow {k:>2}k: netprog p99≤ s"), p99);
        }
        // From scratch: a fresh node joins and programs every service.
        let t = Instant::now();
        let fresh = SimNode::start(&bench.env, &cluster.underlay.cluster, 0, 1).await?;
        // The node is set up and registered and its agent spawned: what kube-proxy's
        // restart compares with starts here.
        let agent_started = Instant::now();
        fresh.wait_ready(&client).await?;
        // Nothing changed since the grow: the fresh node has to reach its revision. Only
        // NodeNetworks are polled (listing 10k LBServices per poll took seconds here).
        wait_revision_realized(&client, revision, REALIZE_TIMEOUT).await?;
        f.put(
            10,
            format!("scratch {k:>2}k: start→synced s"),
            t.elapsed().as_secs_f64(),
        );
        f.put(
            11,
            format!("scratch {k:>2}k: agent start→synced s"),
            agent_started.elapsed().as_secs_f64(),
        );
        // Gone with its objects, or the next waits would wait for it.
        let fresh_name = fresh.name.clone();
        drop(fresh);
        let nodes: Api<Node> = Api::all(client.clone());
        let networks: Api<NodeNetwork> = Api::all(client.clone());
        let _ = nodes.delete(&fresh_name, &DeleteParams::default()).await;
        let _ = networks.delete(&fresh_name, &DeleteParams::default()).await;
        wait_deleted(&networks, &fresh_name, REALIZE_TIMEOUT).await?;
        if size == 1_000 || size == 10_000 {
            let (p50, p99) = bench.latency().await?;
            f.put(30, format!("connect p50 ms @{k:>2}k"), p50);
            f.put(31, format!("connect p99 ms @{k:>2}k"), p99);
        }
        if size == 10_000 {
            let lbs: Api<LBService> = bench.env.api();
            let mut answered = Vec::new();
            let mut realized = Vec::new();
            let mut metric = Vec::new();
            for j in 0..CHANGES {
                let m0 = fetch_metrics(port).await?;
                let name = format!("chg{j}");
                let start = since_epoch();
                let svcs: Api<Service> = bench.env.api();
                let slices: Api<EndpointSlice> = bench.env.api();
                let (n, ip) =
                    create_service(&svcs, &slices, &name, &bench.backends, &bench.node).await?;
                bench.services.insert(n, ip);
                let revision = async {
                    let lb = tendril_e2e::wait_for(
                        &lbs,
                        &name,
                        |o: Option<&LBService>| o.is_some(),
                        REALIZE_TIMEOUT,
                    )
                    .await?
                    .context("LBService gone")?;
                    wait_revision_realized(&client, lb.spec.revision, REALIZE_TIMEOUT).await?;
                    Ok::<_, anyhow::Error>(since_epoch())
                };
                let (at, rev_at) = tokio::join!(bench.answered_at(&name), revision);
                answered.push(at?.saturating_sub(start).as_secs_f64() * 1000.0);
                realized.push(rev_at?.saturating_sub(start).as_secs_f64() * 1000.0);
                let m1 = fetch_metrics(port).await?;
                if let Some((_, mean, _)) =
                    hist(&m1, TENDRIL_NETPROG, &[]).since(&hist(&m0, TENDRIL_NETPROG, &[]))
                {
                    metric.push(mean * 1000.0);
                }
            }
            answered.sort_by(f64::total_cmp);
            f.put(
                20,
                "change @10k: apply→answered p50 ms",
                percentile(&answered, 50.0),
            );
            f.put(
                21,
                "change @10k: apply→answered p99 ms",
                percentile(&answered, 99.0),
            );
            realized.sort_by(f64::total_cmp);
            f.put(
                24,
                "change @10k: apply→revision realized p50 ms",
                percentile(&realized, 50.0),
            );
            f.put(
                25,
                "change @10k: apply→revision realized p99 ms",
                percentile(&realized, 99.0),
            );
            metric.sort_by(f64::total_cmp);
            if !metric.is_empty() {
                f.put(
                    22,
                    "change @10k: netprog metric p50 ms",
                    percentile(&metric, 50.0),
                );
                f.put(
                    23,
                    "change @10k: netprog metric p99 ms",
                    percentile(&metric, 99.0),
                );
            }
        }
    }
    if let Some(agent) = cluster.nodes[0].agent()
        && !agent.is_running()
    {
        bail!("the agent exited:\n{}", agent.log_tail(40));
    }
    Ok(f)
}

/// The agent's services sync-duration histogram(s): `tendril_services_*sync*_seconds`.
fn sync_metric_names(m: &Metrics) -> Vec<(u8, String)> {
    let mut names: Vec<String> = m
        .samples
        .iter()
        .filter_map(|s| s.name.strip_suffix("_count"))
        .filter(|n| {
            n.starts_with("tendril_services_") && n.contains("sync") && n.ends_with("_seconds")
        })
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names.into_iter().take(1).map(|n| (3, n)).collect()
}

fn table(cols: &[(&str, &Figures)]) -> String {
    let mut rows: Vec<&(u8, String)> = cols.iter().flat_map(|(_, f)| f.rows.keys()).collect();
    rows.sort();
    rows.dedup();
    let get = |name: &str, key: &(u8, String)| {
        cols.iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, f)| f.rows.get(key).copied())
    };
    let mut out = format!(
        "{:<38} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9}\n",
        "", "iptables", "nftables", "tendril", "nft/ipt", "tdr/ipt", "tdr/nft"
    );
    let cell = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".to_string(),
    };
    for key in rows {
        let (i, n, t) = (
            get("iptables", key),
            get("nftables", key),
            get("tendril", key),
        );
        out.push_str(&format!(
            "{:<38} {:>11} {:>11} {:>11} {:>9} {:>9} {:>9}\n",
            key.1,
            cell(i),
            cell(n),
            cell(t),
            ratio(n, i),
            ratio(t, i),
            ratio(t, n)
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_bench() -> Result<()> {
    let chosen = targets();
    let mut figures: Vec<(&str, Figures)> = Vec::new();
    for target in ["iptables", "nftables", "tendril"] {
        if !chosen.iter().any(|t| t == target) {
            continue;
        }
        let f = match target {
            "iptables" => kube_proxy_target(ProxyMode::Iptables).await?,
            "nftables" => kube_proxy_target(ProxyMode::Nftables).await?,
            _ => tendril_target().await?,
        };
        match &f.skipped {
            Some(why) => println!("{target} column skipped: {why}"),
            None => println!("── {target}\n{}", table(&[(target, &f)])),
        }
        figures.push((target, f));
    }
    let cols: Vec<(&str, &Figures)> = figures
        .iter()
        .filter(|(_, f)| f.skipped.is_none())
        .map(|(n, f)| (*n, f))
        .collect();
    println!(
        "── services benchmark (seconds or milliseconds as named; p99≤ is a histogram bucket bound)\n{}",
        table(&cols)
    );
    Ok(())
}
