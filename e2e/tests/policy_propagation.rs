//! Issue 6 benchmark: policy propagation, applied → realized on every node.
//!
//! Three simulated nodes (real operator, agents, CNI), three pods per node: `b{node}{k}`
//! labelled `role: bench, app: bench{k}`, so three subject identities, each with one
//! endpoint on every node. One Kubernetes `NetworkPolicy` selects `role: bench`; a **rule**
//! is one entry of its `spec.ingress`: one peer (`podSelector app: bench0`, one identity) ×
//! one TCP port (every other port from 20000 on, so no two rules merge into a range), i.e.
//! one (peer identity, port) allow in each subject's `ResolvedPolicy` and one policy-map
//! entry per subject endpoint (3 per node per rule). The table shows both counts, so a
//! resolver that merged rules would show.
//!
//! For 10, 1,000 and 10,000 rules: the policy is switched to that size (printed as "first
//! apply"), then changed repeatedly, each change sliding the port window by one (one rule
//! out, one in: the typical edit of a large policy). Each change is timed from the moment
//! the server-side apply call returned to:
//! - operator: every subject's `ResolvedPolicy` names the new `metadata.generation` of the
//!   policy in `spec.sources` (first seen on a watch);
//! - enforced: every subject endpoint's entry in its node's `policy_state` map holds at
//!   least that `ResolvedPolicy`'s `spec.revision` (the agent writes it after the policy
//!   entries, so from then on the kernel judges by the new policy; polled each millisecond);
//! - reported: every subject endpoint reports `status.realizedPolicyRevision` >= that
//!   revision (first seen on a watch): enforced plus the agent's status write.
//!
//! Watches record when each state was first seen; nothing sleeps. Prints a table (p50 and
//! p99 by nearest rank; with 20 samples p99 is the maximum); asserts nothing about speed.
//! A limit hit on the way (object size, `maxItems`, map size) fails the run with the
//! server's or the agent's own words.
//!
//! Where the time goes: with `TENDRIL_SIM_RUST_LOG=info,tendril_controllers::policy=debug,
//! tendril_datapath::agent::driver=debug,tendril_datapath::agent::pass=debug` the operator
//! logs each resolve (`read_ms`, `resolve_ms`) and ResolvedPolicy write (`body_ms`,
//! `apply_ms`), and each agent its passes (`waited_ms` since the change, `translate_ms`,
//! `converge_ms`, per-step times), in the test's log directory.
//! Needs root.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tendril_crds::v1alpha1::{Endpoint, ResolvedPolicy};
use tendril_datapath::agent::pass::index::endpoint_id;
use tendril_datapath::bpf::Dataplane;
use tendril_datapath::bpf::maps::PolicyMaps;
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::{ControlPlane, FIELD_MANAGER, TestEnv, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);
const POLICY: &str = "bench";
/// First port of the rule window.
const BASE_PORT: u32 = 20000;
/// (rules, changes measured).
const SIZES: [(u32, usize); 3] = [(10, 20), (1_000, 20), (10_000, 10)];

/// What the watches saw, with the time each state was first seen.
#[derive(Default)]
struct Seen {
    /// Identity → (first seen, generation of the bench policy in `sources`, revision).
    resolved: BTreeMap<i64, Vec<(Instant, i64, i64)>>,
    /// Endpoint name → (first seen, realized policy revision).
    realized: BTreeMap<String, Vec<(Instant, i64)>>,
    /// Endpoint name → (first seen, revision in its node's `policy_state` map): the
    /// moment the kernel enforces the policy, before the agent reports it.
    enforced: BTreeMap<String, Vec<(Instant, i64)>>,
    /// Identity → latest `ResolvedPolicy` size as JSON (bytes), ingress ports it lists and
    /// status conditions.
    resolved_info: BTreeMap<i64, (usize, usize, String)>,
    /// Endpoint name → latest status conditions.
    endpoint_info: BTreeMap<String, String>,
}

impl Seen {
    /// When every identity's `ResolvedPolicy` first named `generation` (or later), with the
    /// revision it had then.
    fn resolved_at(
        &self,
        identities: &[i64],
        generation: i64,
    ) -> Option<(Instant, BTreeMap<i64, i64>)> {
        let mut latest = None::<Instant>;
        let mut revisions = BTreeMap::new();
        for id in identities {
            let (at, _, revision) = self
                .resolved
                .get(id)?
                .iter()
                .find(|(_, g, _)| *g >= generation)?;
            latest = Some(latest.map_or(*at, |l| l.max(*at)));
            revisions.insert(*id, *revision);
        }
        Some((latest?, revisions))
    }

    /// When every endpoint's `history` (reported or enforced) first reached at least its
    /// identity's revision.
    fn reached_at(
        history: &BTreeMap<String, Vec<(Instant, i64)>>,
        endpoints: &[(String, i64)],
        revisions: &BTreeMap<i64, i64>,
    ) -> Option<Instant> {
        let mut latest = None::<Instant>;
        for (name, identity) in endpoints {
            let want = revisions.get(identity)?;
            let (at, _) = history.get(name)?.iter().find(|(_, r)| r >= want)?;
            latest = Some(latest.map_or(*at, |l| l.max(*at)));
        }
        latest
    }
}

/// Pushes `revision` onto `name`'s history unless it is the latest already.
fn record(
    history: &mut BTreeMap<String, Vec<(Instant, i64)>>,
    name: &str,
    at: Instant,
    revision: i64,
) {
    let h = history.entry(name.to_string()).or_default();
    if h.last().is_none_or(|(_, r)| *r != revision) {
        h.push((at, revision));
    }
}

/// Polls every node's `policy_state` map each millisecond into `seen.enforced`: per
/// endpoint (pod name, node's pin directory, endpoint id), the revision its maps hold.
/// Stops when `stop` is set.
fn spawn_enforcement_poller(
    endpoints: Vec<(String, PathBuf, u16)>,
    seen: Arc<Mutex<Seen>>,
    tick: Arc<tokio::sync::watch::Sender<u64>>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let mut dirs: Vec<PathBuf> = endpoints.iter().map(|(_, d, _)| d.clone()).collect();
    dirs.dedup();
    let maps = dirs
        .iter()
        .map(|d| Ok((d.clone(), PolicyMaps::open(d)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let states: BTreeMap<&PathBuf, _> = maps
                .iter()
                .filter_map(|(d, m)| m.states().ok().map(|s| (d, s)))
                .collect();
            let now = Instant::now();
            let mut changed = false;
            {
                let mut seen = seen.lock().expect("seen lock");
                for (name, dir, id) in &endpoints {
                    let Some(state) = states.get(dir).and_then(|s| s.get(id)) else {
                        continue;
                    };
                    let before = seen.enforced.get(name).map(Vec::len);
                    record(&mut seen.enforced, name, now, i64::from(state.revision));
                    changed |= seen.enforced.get(name).map(Vec::len) != before;
                }
            }
            if changed {
                tick.send_modify(|n| *n += 1);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }))
}

fn conditions_text(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> String {
    conditions
        .iter()
        .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Follows ResolvedPolicies and the namespace's Endpoints into `seen`, ticking `tick`.
fn spawn_watches(
    client: &Client,
    namespace: &str,
    seen: Arc<Mutex<Seen>>,
    tick: Arc<tokio::sync::watch::Sender<u64>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let policies: Api<ResolvedPolicy> = Api::all(client.clone());
    let (s, t, ns) = (seen.clone(), tick.clone(), namespace.to_string());
    let resolved = tokio::spawn(async move {
        let mut stream = watcher(policies, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(item) = stream.next().await {
            let Ok(rp) = item else { continue };
            let now = Instant::now();
            let generation = rp
                .spec
                .sources
                .iter()
                .find(|src| {
                    src.kind == tendril_crds::v1alpha1::PolicySourceKind::KubernetesNetworkPolicy
                        && src.name == POLICY
                        && src.namespace.as_deref() == Some(&ns)
                })
                .and_then(|src| src.generation);
            let size = serde_json::to_vec(&rp).map(|v| v.len()).unwrap_or(0);
            let conditions = rp
                .status
                .as_ref()
                .map(|st| conditions_text(&st.conditions))
                .unwrap_or_default();
            let mut seen = s.lock().expect("seen lock");
            let ports = rp.spec.ingress.iter().map(|r| r.ports.len()).sum();
            seen.resolved_info
                .insert(rp.spec.identity, (size, ports, conditions));
            if let Some(g) = generation {
                let history = seen.resolved.entry(rp.spec.identity).or_default();
                if history
                    .last()
                    .is_none_or(|(_, lg, lr)| (*lg, *lr) != (g, rp.spec.revision))
                {
                    history.push((now, g, rp.spec.revision));
                }
            }
            drop(seen);
            t.send_modify(|n| *n += 1);
        }
    });
    let endpoints: Api<Endpoint> = Api::namespaced(client.clone(), namespace);
    let (s, t) = (seen, tick);
    let realized = tokio::spawn(async move {
        let mut stream = watcher(endpoints, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(item) = stream.next().await {
            let Ok(ep) = item else { continue };
            let now = Instant::now();
            let mut seen = s.lock().expect("seen lock");
            let status = ep.status.as_ref();
            seen.endpoint_info.insert(
                ep.name_any(),
                status
                    .map(|st| conditions_text(&st.conditions))
                    .unwrap_or_default(),
            );
            if let Some(r) = status.and_then(|st| st.realized_policy_revision) {
                record(&mut seen.realized, &ep.name_any(), now, r);
            }
            drop(seen);
            t.send_modify(|n| *n += 1);
        }
    });
    vec![resolved, realized]
}

/// The policy with `rules` rules, rule `i` on port `BASE_PORT + 2 * (offset + i)`: every
/// other port, so the resolver cannot merge neighbouring rules into one port range (it
/// does: 10,000 consecutive ports are one `port..endPort` entry and a dozen map entries).
fn policy(namespace: &str, offset: u32, rules: u32) -> K8sNetworkPolicy {
    let ingress: Vec<serde_json::Value> = (offset..offset + rules)
        .map(|i| BASE_PORT + 2 * i)
        .map(|port| {
            serde_json::json!({
                "from": [{"podSelector": {"matchLabels": {"app": "bench0"}}}],
                "ports": [{"protocol": "TCP", "port": port}],
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": POLICY, "namespace": namespace},
        "spec": {"podSelector": {"matchLabels": {"role": "bench"}}, "policyTypes": ["Ingress"], "ingress": ingress},
    }))
    .expect("a valid NetworkPolicy")
}

/// One measured change.
struct Sample {
    call: Duration,
    operator: Duration,
    enforced: Duration,
    realized: Duration,
}

struct Bench {
    client: Client,
    namespace: String,
    identities: Vec<i64>,
    endpoints: Vec<(String, i64)>,
    seen: Arc<Mutex<Seen>>,
    tick: tokio::sync::watch::Receiver<u64>,
}

impl Bench {
    /// Applies the policy and follows it until realized everywhere.
    async fn change(&mut self, offset: u32, rules: u32) -> Result<Sample> {
        let api: Api<K8sNetworkPolicy> = Api::namespaced(self.client.clone(), &self.namespace);
        let obj = policy(&self.namespace, offset, rules);
        let started = Instant::now();
        let applied = api
            .patch(
                POLICY,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .with_context(|| {
                format!(
                    "applying a NetworkPolicy of {rules} rules ({} bytes as JSON)",
                    serde_json::to_vec(&obj).map(|v| v.len()).unwrap_or(0)
                )
            })?;
        let returned = Instant::now();
        let generation = applied.metadata.generation.context("no generation")?;
        let deadline = returned + TIMEOUT;
        loop {
            let done = {
                let seen = self.seen.lock().expect("seen lock");
                seen.resolved_at(&self.identities, generation)
                    .and_then(|(resolved, revisions)| {
                        let enforced =
                            Seen::reached_at(&seen.enforced, &self.endpoints, &revisions)?;
                        let realized =
                            Seen::reached_at(&seen.realized, &self.endpoints, &revisions)?;
                        Some((resolved, enforced, realized))
                    })
            };
            if let Some((resolved, enforced, realized)) = done {
                return Ok(Sample {
                    call: returned - started,
                    operator: resolved.saturating_duration_since(returned),
                    enforced: enforced.saturating_duration_since(returned),
                    realized: realized.saturating_duration_since(returned),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || tokio::time::timeout(left, self.tick.changed())
                    .await
                    .is_err()
            {
                bail!(
                    "{rules} rules (generation {generation}) not realized within {TIMEOUT:?}:\n{}",
                    self.diagnosis()
                );
            }
        }
    }

    /// The latest state seen, for a timeout message.
    fn diagnosis(&self) -> String {
        let seen = self.seen.lock().expect("seen lock");
        let mut out = String::new();
        for id in &self.identities {
            let _ = writeln!(
                out,
                "  ResolvedPolicy {id}: history {:?}, latest {:?}",
                seen.resolved
                    .get(id)
                    .map(|h| h.iter().map(|(_, g, r)| (*g, *r)).collect::<Vec<_>>()),
                seen.resolved_info.get(id)
            );
        }
        for (name, _) in &self.endpoints {
            let _ = writeln!(
                out,
                "  Endpoint {name}: realized {:?}, enforced {:?}, conditions {:?}",
                seen.realized
                    .get(name)
                    .map(|h| h.iter().map(|(_, r)| *r).collect::<Vec<_>>()),
                seen.enforced
                    .get(name)
                    .map(|h| h.iter().map(|(_, r)| *r).collect::<Vec<_>>()),
                seen.endpoint_info.get(name)
            );
        }
        out
    }
}

/// Nearest-rank percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn p50_p99(mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{:>9.1?} {:>9.1?}",
        percentile(&v, 50.0),
        percentile(&v, 99.0)
    )
}

#[tokio::test]
async fn propagation_10_1k_10k_rules() -> Result<()> {
    let plane = ControlPlane::dedicated("policy-propagation").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 3,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    let ns = env.namespace().to_string();
    let mut pods = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        for k in 0..3 {
            let labels = BTreeMap::from([
                ("role".to_string(), "bench".to_string()),
                ("app".to_string(), format!("bench{k}")),
            ]);
            pods.push(
                SimPod::run(&client, node.handle(), &ns, &format!("b{n}{k}"), &labels).await?,
            );
        }
    }
    let endpoints_api: Api<Endpoint> = Api::namespaced(client.clone(), &ns);
    let mut endpoints = Vec::new();
    for pod in &pods {
        let ep = wait_for(
            &endpoints_api,
            &pod.name,
            |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.identity.is_some()),
            TIMEOUT,
        )
        .await?
        .context("Endpoint gone")?;
        endpoints.push((pod.name.clone(), ep.spec.identity.context("identity")?));
    }
    let mut identities: Vec<i64> = endpoints.iter().map(|(_, id)| *id).collect();
    identities.sort();
    identities.dedup();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let (tick_tx, tick) = tokio::sync::watch::channel(0);
    let tick_tx = Arc::new(tick_tx);
    let watches = spawn_watches(&client, &ns, seen.clone(), tick_tx.clone());
    let stop_poller = Arc::new(AtomicBool::new(false));
    let poller = spawn_enforcement_poller(
        pods.iter()
            .map(|pod| {
                let node = cluster
                    .nodes
                    .iter()
                    .find(|n| n.name == pod.node)
                    .context("the pod's node")?;
                let ip = pod.ips.first().context("the pod's address")?;
                Ok((
                    pod.name.clone(),
                    node.bpffs_root.join(&node.name),
                    endpoint_id(*ip),
                ))
            })
            .collect::<Result<_>>()?,
        seen.clone(),
        tick_tx,
        stop_poller.clone(),
    )?;
    let mut bench = Bench {
        client: client.clone(),
        namespace: ns.clone(),
        identities: identities.clone(),
        endpoints,
        seen,
        tick,
    };

    let started = Instant::now();
    let mut table = String::new();
    writeln!(
        table,
        "policy propagation: 3 nodes, {} endpoints, {} subject identities; rule = one NetworkPolicy ingress rule \
         (1 peer podSelector x 1 TCP port) = 1 policy-map entry per subject endpoint",
        pods.len(),
        identities.len()
    )?;
    writeln!(
        table,
        "{:>6} {:>7} {:>10} {:>10} {:>8} {:>11} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>9} {:>9} | {:>10}",
        "rules",
        "changes",
        "NP bytes",
        "RP bytes",
        "RP ports",
        "map entries",
        "call p50",
        "p99",
        "oper p50",
        "p99",
        "enfd p50",
        "p99",
        "rprt p50",
        "p99",
        "first apply"
    )?;
    for (rules, changes) in SIZES {
        let first = bench.change(0, rules).await?;
        let mut samples = Vec::new();
        for c in 1..=changes as u32 {
            samples.push(bench.change(c, rules).await?);
        }
        let np_bytes = serde_json::to_vec(&policy(&ns, 0, rules))?.len();
        let (rp_bytes, rp_ports) = {
            let seen = bench.seen.lock().expect("seen lock");
            identities
                .iter()
                .filter_map(|id| seen.resolved_info.get(id).map(|(b, p, _)| (*b, *p)))
                .max()
                .unwrap_or_default()
        };
        // Policy-map entries of node 0 (all its endpoints; the host allow included).
        let node = &cluster.nodes[0];
        let entries = Dataplane::open(&node.bpffs_root.join(&node.name))?
            .policy
            .entries()?
            .len();
        // Not about speed: a run where the rules did not arrive as rules measures nothing.
        ensure!(
            rp_ports >= rules as usize && entries >= 3 * rules as usize,
            "{rules} rules became {rp_ports} ResolvedPolicy ports and {entries} map entries"
        );
        writeln!(
            table,
            "{rules:>6} {changes:>7} {np_bytes:>10} {rp_bytes:>10} {rp_ports:>8} {entries:>11} | {} | {} | {} | {} | {:>10.1?}",
            p50_p99(samples.iter().map(|s| s.call).collect()),
            p50_p99(samples.iter().map(|s| s.operator).collect()),
            p50_p99(samples.iter().map(|s| s.enforced).collect()),
            p50_p99(samples.iter().map(|s| s.realized).collect()),
            first.enforced,
        )?;
        println!("{rules} rules done after {:.1?}", started.elapsed());
    }
    writeln!(
        table,
        "(call = server-side apply round trip; from the call's return: oper = every ResolvedPolicy names the new \
         generation; enfd (enforced) = every endpoint's policy_state map entry holds its new revision (polled each ms); \
         rprt (reported) = every endpoint reports realizedPolicyRevision >= its revision; \
         first apply = enforced after the switch from the previous size; measured in {:.1?})",
        started.elapsed()
    )?;
    println!("{table}");
    for w in watches {
        w.abort();
    }
    stop_poller.store(true, Ordering::Relaxed);
    let _ = poller.join();
    drop(pods);
    drop(cluster);
    Ok(())
}
