//! Pod churn on two simulated nodes: the real operator, two real agents, the real plugin.
//!
//! Two phases, 1,000 then 500 pods, created and deleted concurrently (16 kubelet
//! operations at a time, about 64 pods alive, per-node CIDRs of 125 addresses so addresses
//! are reused): the second phase SIGKILLs one agent half-way and restarts it (while it is
//! down the plugin answers "try again later", code 11, and the simulated kubelet retries).
//! For each phase: no address is held by two pods at once (every pod's holding interval,
//! from ADD's result to the start of its teardown, is recorded and checked for overlaps
//! per address), no address is leaked (both agents end with nothing in use, in metrics
//! and on disk), and the phase's identities are exactly its distinct label sets.
//! Printed, not asserted: pod created → `Endpoint` with identity latency (p50/p99),
//! identity allocation rate, operations per second. Needs root.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use rand::Rng;
use tendril_crds::v1alpha1::{Endpoint, Identity};
use tendril_e2e::sim::{
    NodeHandle, SimCluster, SimClusterConfig, SimNode, SimPod, try_again_answers,
};
use tendril_e2e::{ControlPlane, TestEnv, eventually};

const CONCURRENCY: usize = 16;
const LIVE: usize = 64;
const LABEL_SETS: usize = 25;
const TIMEOUT: Duration = Duration::from_secs(120);

/// One pod's hold on its address.
#[derive(Debug, Clone)]
struct Hold {
    pod: String,
    ip: IpAddr,
    /// ADD had returned the address.
    from: Instant,
    /// Teardown had not started yet.
    until: Instant,
}

#[derive(Default)]
struct Phase {
    holds: Mutex<Vec<Hold>>,
    /// Pod created → Endpoint with identity seen; pod Running → the same.
    latency_created: Mutex<Vec<Duration>>,
    latency_running: Mutex<Vec<Duration>>,
    retries: AtomicU32,
    done: AtomicUsize,
}

/// First time each Endpoint of the namespace was seen with an identity, and when each
/// identity id was first seen; `tick` changes on every event.
struct EndpointWatch {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    identities: Arc<Mutex<HashMap<i64, Instant>>>,
    tick: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl EndpointWatch {
    fn start(client: &Client, namespace: &str) -> Self {
        let api: Api<Endpoint> = Api::namespaced(client.clone(), namespace);
        let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let identities: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
        let (tx, tick) = tokio::sync::watch::channel(0u64);
        let (s, ids) = (seen.clone(), identities.clone());
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(ep)) = stream.try_next().await {
                if let Some(id) = ep.spec.identity {
                    let now = Instant::now();
                    let name = ep.metadata.name.clone().unwrap_or_default();
                    s.lock().unwrap().entry(name).or_insert(now);
                    ids.lock().unwrap().entry(id).or_insert(now);
                    tx.send_modify(|n| *n += 1);
                }
            }
        });
        EndpointWatch {
            seen,
            identities,
            tick,
            task,
        }
    }

    async fn wait(&self, name: &str) -> Result<Instant> {
        let mut tick = self.tick.clone();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            tick.borrow_and_update();
            if let Some(t) = self.seen.lock().unwrap().get(name) {
                return Ok(*t);
            }
            tokio::time::timeout_at(deadline, tick.changed())
                .await
                .with_context(|| format!("no Endpoint with identity for {name}"))??;
        }
    }
}

impl Drop for EndpointWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Every address is held by at most one pod at any moment.
fn check_no_double_allocation(holds: &[Hold]) -> Result<usize> {
    let mut by_ip: BTreeMap<IpAddr, Vec<&Hold>> = BTreeMap::new();
    for h in holds {
        by_ip.entry(h.ip).or_default().push(h);
    }
    let mut reused = 0;
    for (ip, hs) in &mut by_ip {
        hs.sort_by_key(|h| h.from);
        reused += hs.len() - 1;
        for pair in hs.windows(2) {
            ensure!(
                pair[0].until <= pair[1].from,
                "{ip} handed to {} while {} still held it",
                pair[1].pod,
                pair[0].pod
            );
        }
    }
    Ok(reused)
}

async fn delete_pod(
    client: &Client,
    handles: &[NodeHandle],
    pod: SimPod,
    phase: &Phase,
) -> Result<()> {
    let node = handles
        .iter()
        .find(|h| h.name == pod.node)
        .context("pod's node")?
        .clone();
    let hold = Hold {
        pod: pod.name.clone(),
        ip: pod.ips[0],
        from: pod.added_at,
        until: Instant::now(),
    };
    phase.holds.lock().unwrap().push(hold);
    let retries = pod.delete(client, &node).await?;
    phase.retries.fetch_add(retries, Ordering::Relaxed);
    Ok(())
}

/// Runs one phase in `env`'s namespace; `kill` SIGKILLs node 0's agent when half the pods
/// have been created and restarts it once kubelet retries have met the dead agent 16 times.
async fn churn(
    env: &TestEnv,
    nodes: &mut [SimNode],
    pods: usize,
    kill: bool,
    label: &str,
) -> Result<()> {
    let client = env.client();
    let ns = env.namespace().to_string();
    let handles: Vec<NodeHandle> = nodes.iter().map(|n| n.handle().clone()).collect();
    let watch = EndpointWatch::start(&client, &ns);
    let phase = Phase::default();
    let live: Mutex<Vec<SimPod>> = Mutex::default();
    let start = Instant::now();

    let jobs = futures::stream::iter(0..pods)
        .map(|i| {
            let (client, ns, handles, phase, live, watch) =
                (&client, &ns, &handles, &phase, &live, &watch);
            async move {
                let node = &handles[i % handles.len()];
                let hash: u32 = rand::rng().random();
                let labels = BTreeMap::from([
                    ("app".to_string(), format!("churn-{}", i % LABEL_SETS)),
                    ("pod-template-hash".to_string(), format!("{hash:08x}")),
                ]);
                let name = format!("churn-{i}");
                let pod = SimPod::run(client, node, ns, &name, &labels).await?;
                phase.retries.fetch_add(pod.retries, Ordering::Relaxed);
                let seen = watch.wait(&name).await?;
                phase
                    .latency_created
                    .lock()
                    .unwrap()
                    .push(seen.saturating_duration_since(pod.created_at));
                phase
                    .latency_running
                    .lock()
                    .unwrap()
                    .push(seen.saturating_duration_since(pod.running_at));
                let victim = {
                    let mut live = live.lock().unwrap();
                    live.push(pod);
                    if live.len() > LIVE {
                        let k = rand::rng().random_range(0..live.len());
                        Some(live.swap_remove(k))
                    } else {
                        None
                    }
                };
                if let Some(victim) = victim {
                    delete_pod(client, handles, victim, phase).await?;
                }
                phase.done.fetch_add(1, Ordering::Relaxed);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>();

    let (node0, _) = nodes.split_at_mut(1);
    let node0 = &mut node0[0];
    let killer = async {
        if !kill {
            return anyhow::Ok(None);
        }
        eventually(TIMEOUT, || async {
            ensure!(
                phase.done.load(Ordering::Relaxed) >= pods / 2,
                "not half-way yet"
            );
            Ok(())
        })
        .await?;
        let before = try_again_answers();
        node0.kill_agent();
        let killed = Instant::now();
        // Restart once the dead agent has turned kubelets away (code 11) a few times.
        eventually(TIMEOUT, || async {
            ensure!(try_again_answers() >= before + 16, "not enough retries yet");
            Ok(())
        })
        .await?;
        node0.start_agent()?;
        Ok(Some(killed.elapsed()))
    };
    let (jobs, down) = tokio::join!(jobs, killer);
    jobs?;
    let down = down?;
    let created = start.elapsed();

    // Delete whatever is still alive.
    let rest: Vec<SimPod> = std::mem::take(&mut *live.lock().unwrap());
    futures::stream::iter(rest)
        .map(|pod| delete_pod(&client, &handles, pod, &phase))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let total = start.elapsed();

    // The operator removes the Endpoints of deleted pods.
    let endpoints: Api<Endpoint> = Api::namespaced(client.clone(), &ns);
    eventually(TIMEOUT, || async {
        let n = endpoints.list(&Default::default()).await?.items.len();
        ensure!(n == 0, "{n} Endpoints left");
        Ok(())
    })
    .await?;
    let endpoints_gone = start.elapsed();

    // No address held twice; none leaked.
    let holds = phase.holds.lock().unwrap().clone();
    assert_eq!(holds.len(), pods, "every pod was deleted once");
    let reused = check_no_double_allocation(&holds)?;
    assert!(
        reused > 0,
        "addresses were never reused: the check saw no contention"
    );
    for node in nodes.iter() {
        node.wait_ips_in_use(0.0).await?;
        let left = node.allocation_records()?;
        assert!(left.is_empty(), "{}: records left {left:?}", node.name);
    }

    // Identities: exactly the phase's label sets.
    let identities: Vec<Identity> = Api::<Identity>::all(client.clone())
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|i| {
            i.spec
                .security_labels
                .get("k8s:io.kubernetes.pod.namespace")
                .is_some_and(|n| *n == ns)
        })
        .collect();
    assert_eq!(
        identities.len(),
        LABEL_SETS,
        "identities of this namespace: {:?}",
        identities
            .iter()
            .map(|i| &i.spec.security_labels)
            .collect::<Vec<_>>()
    );
    let first_ids: Vec<Instant> = watch.identities.lock().unwrap().values().copied().collect();
    let last_new = first_ids.iter().max().map(|t| t.duration_since(start));

    let mut created_lat = phase.latency_created.lock().unwrap().clone();
    let mut running_lat = phase.latency_running.lock().unwrap().clone();
    created_lat.sort();
    running_lat.sort();
    println!(
        "BENCH churn {label}: {pods} pods on {} nodes, {CONCURRENCY} concurrent, ~{LIVE} alive; created in {created:.1?}, \
         all deleted after {total:.1?} ({:.1} pods/s created+deleted), last Endpoint gone after {endpoints_gone:.1?}; {reused} address reuses checked, no overlap; \
         {} CNI try-again answers retried{}",
        nodes.len(),
        pods as f64 / total.as_secs_f64(),
        phase.retries.load(Ordering::Relaxed),
        down.map(|d| format!(", agent down for {d:.1?}"))
            .unwrap_or_default(),
    );
    println!(
        "BENCH churn {label}: pod created -> Endpoint with identity p50 {:.0?} p99 {:.0?} max {:.0?}; \
         pod Running -> Endpoint with identity p50 {:.0?} p99 {:.0?}; {LABEL_SETS} identities, last allocated {:.1?} into the phase ({:.1}/s)",
        pct(&created_lat, 0.5),
        pct(&created_lat, 0.99),
        created_lat.last().copied().unwrap_or_default(),
        pct(&running_lat, 0.5),
        pct(&running_lat, 0.99),
        last_new.unwrap_or_default(),
        LABEL_SETS as f64 / last_new.unwrap_or(Duration::from_secs(1)).as_secs_f64(),
    );
    if kill {
        ensure!(down.is_some(), "the agent was not killed");
    }
    Ok(())
}

#[tokio::test]
async fn churn_pods_without_double_allocation_or_leak_also_across_an_agent_crash() -> Result<()> {
    let plane = ControlPlane::dedicated("pods-churn").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let mut cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            mask_size: 25,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    churn(&env, &mut cluster.nodes, 1000, false, "steady").await?;

    let env2 = TestEnv::on(plane.clone()).await?;
    churn(
        &env2,
        &mut cluster.nodes,
        500,
        true,
        "agent SIGKILLed and restarted",
    )
    .await?;
    if !cluster.operator.is_running() {
        bail!("the operator died");
    }
    Ok(())
}
