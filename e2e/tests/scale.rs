//! Issue 17 benchmark: the operator at cluster scale, on a dedicated real control plane
//! with kwok faking the nodes and the kubelets.
//!
//! Full size is 1,000 nodes, 100,000 pods in 1,000 namespaces, 10,000 Services and 1,000
//! NetworkPolicies; `TENDRIL_SCALE_FRACTIONS` (default `0.1`, e.g. `0.1,0.3`) picks the
//! fractions of it to run, each on a fresh plane. Per fraction:
//! - kwok (built by `hack/control-plane-build.sh`) manages the Nodes labelled
//!   `type=kwok`: the Stages below make each Node Ready with the InternalIP of an
//!   annotation, and each Pod Running with an IP from its Node's `spec.podCIDR` (one /24
//!   per node), and finish deletions as a kubelet would;
//! - the operator runs as in production (the profile of this test, release under
//!   `hack/bench.sh scale`), leader election off, `identities.gcGracePeriodSeconds: 30`;
//! - the harness creates Nodes, Namespaces (with a `team` label), then Pods at
//!   `TENDRIL_SCALE_RATE` creates/s (default 100): 100 per namespace, 5 apps per namespace
//!   (so 5% of pods are distinct identities), each pod labelled `app`, `tier`, `version`
//!   and its app's `pod-template-hash` (one ReplicaSet per app, as in a Deployment;
//!   filtered out of identities; before session 17 the hash was per pod), then 10
//!   Services per namespace (selecting the apps) and 1 NetworkPolicy per namespace;
//! - it waits until every pod has an `Endpoint` with an identity and every `LBService` its
//!   first status (the create phase), then
//!   replaces 10% of the pods per minute for `TENDRIL_SCALE_CHURN_SECS` (default 120): each
//!   replacement deletes the oldest pod and creates one of the same app (the churn phase);
//! - allocation burst and GC probe: 1,000 pods with label sets of their own are created as
//!   fast as the apiserver takes them; new identities per second is 1,000 over the time from
//!   the first create to the last of their `Endpoint`s with identity (bounded by pod
//!   creation and kwok, so a lower bound of the allocator's rate). Then they are deleted;
//!   the time from the deletion until the last of those `Identity` objects is gone, less
//!   the grace period, is the GC lag.
//!
//! Measured: operator RSS (end and peak) and CPU (cores, from /proc) per phase; reconcile
//! time per concern (`controller_runtime_reconcile_time_seconds`, mean and p99 from the
//! buckets) and the highest `workqueue_depth` seen; pod created → its `Endpoint` carries an
//! identity (p50/p99, seen on a watch of all Endpoints; includes kwok's status write);
//! identity allocations per second while the pods are created; ResolvedPolicy count and
//! bytes (JSON as listed); apiserver writes (`apiserver_request_total` from the
//! apiserver's own /metrics, verbs POST/PUT/PATCH/DELETE/APPLY) per pod created during the
//! churn, split into Tendril's objects (group tendril.dev) and everything else.
//!
//! Prints a table per fraction and, with more than one, the ratio of each figure between
//! the largest and the smallest, as markdown. Asserts nothing about speed. Not part of the
//! suite: `hack/bench.sh scale [FRACTIONS]`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tendril_crds::v1alpha1::{Endpoint, Identity, LBService, ResolvedPolicy};
use tendril_e2e::{ControlPlane, Metrics, Process, fetch_metrics, free_port, k8s_bin_dir};

#[path = "scale/agent.rs"]
mod agent;
#[path = "scale/measure.rs"]
mod measure;
#[path = "scale/objects.rs"]
mod objects;
use agent::*;
use measure::*;
use objects::*;

/// Creates `objects` through `api_of`, at most `rate` per second (0: as fast as
/// `CONCURRENCY` requests in flight allow); calls `created` with each index as it is sent.
async fn create_paced<K, F>(
    objects: Vec<Value>,
    rate: f64,
    api_of: F,
    created: impl Fn(usize) + Clone,
) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(&Value) -> Api<K>,
{
    let start = tokio::time::Instant::now();
    futures::stream::iter(objects.into_iter().enumerate())
        .map(|(i, obj)| {
            let api = api_of(&obj);
            let created = created.clone();
            async move {
                if rate > 0.0 {
                    tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                }
                created(i);
                let obj: K = serde_json::from_value(obj)?;
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                    Err(e) => Err(anyhow::Error::from(e)),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

// ------------------------------------------------------------------ measuring

#[derive(Default, Debug)]
struct Phase {
    secs: f64,
    cpu_cores: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    queue_depth_peak: f64,
    ep_p50: f64,
    ep_p99: f64,
    ep_max: f64,
    reconciles: BTreeMap<String, (f64, f64, f64)>,
    writes: BTreeMap<(String, String), f64>,
}

#[derive(Default, Debug)]
struct Figures {
    size: Option<Size>,
    create: Phase,
    churn: Phase,
    churn_pods: usize,
    identities: usize,
    identity_alloc_per_s: f64,
    burst_alloc_per_s: f64,
    resolved_policies: usize,
    resolved_policy_bytes: usize,
    gc_lag_s: f64,
    /// Probe identities still not collected when the GC wait gave up (then `gc_lag_s` is a
    /// lower bound).
    gc_left: usize,
    /// The simulated node's agent, unless `TENDRIL_SCALE_AGENT=0`.
    agent: Option<AgentFigures>,
}

struct PhaseStart {
    at: Instant,
    cpu: f64,
    metrics: Metrics,
    writes: BTreeMap<(String, String), f64>,
}

async fn phase_start(
    plane: &ControlPlane,
    pid: u32,
    port: u16,
    peaks: &Arc<Mutex<Peaks>>,
) -> Result<PhaseStart> {
    *peaks.lock().unwrap() = Peaks::default();
    Ok(PhaseStart {
        at: Instant::now(),
        cpu: cpu_seconds(pid),
        metrics: fetch_metrics(port).await?,
        writes: apiserver_writes(plane).await?,
    })
}

async fn phase_end(
    start: PhaseStart,
    plane: &ControlPlane,
    pid: u32,
    port: u16,
    peaks: &Arc<Mutex<Peaks>>,
    lat: &Arc<Mutex<Latencies>>,
    pods: &[String],
) -> Result<Phase> {
    let secs = start.at.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - start.cpu;
    let metrics = fetch_metrics(port).await?;
    let (rss, peak) = rss_mib(pid);
    let (ep_p50, ep_p99, ep_max, _) = lat.lock().unwrap().of(pods);
    // Read before the awaits below: a guard in the struct literal would live across them.
    let queue_depth_peak = peaks.lock().unwrap().queue_depth;
    let writes = writes_delta(&start.writes, &apiserver_writes(plane).await?);
    Ok(Phase {
        secs,
        cpu_cores: cpu / secs,
        rss_mib: rss,
        peak_rss_mib: peak,
        queue_depth_peak,
        ep_p50,
        ep_p99,
        ep_max,
        reconciles: reconcile_times(&start.metrics, &metrics),
        writes,
    })
}

/// Waits until every pod in `keys` has an Endpoint with an identity.
async fn settle(lat: &Arc<Mutex<Latencies>>, keys: &[String]) -> Result<()> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let missing = lat.lock().unwrap().of(keys).3;
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{missing} pods still without an Endpoint with identity");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Waits until `services` LBServices show a `Realized` condition (their first status).
async fn first_statuses(client: &kube::Client, services: usize) -> Result<()> {
    let api: Api<LBService> = Api::all(client.clone());
    tendril_e2e::eventually(SETTLE_TIMEOUT, || async {
        let shown = api
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|lb| {
                lb.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Realized"))
            })
            .count();
        ensure!(
            shown >= services,
            "{shown}/{services} LBServices show a Realized condition"
        );
        Ok(())
    })
    .await
}

async fn run_size(size: Size, rate: f64, churn_secs: u64) -> Result<Figures> {
    let tag = format!("scale-{}", (size.fraction * 100.0).round());
    let plane = ControlPlane::dedicated(&tag).await?;
    let client = plane.client().await?;

    let kwok_config = ScratchFile(
        std::env::temp_dir().join(format!("tendril-{tag}-kwok-{}.yaml", std::process::id())),
    );
    std::fs::write(&kwok_config.0, KWOK_CONFIG)?;
    let _kwok = Process::builder(k8s_bin_dir().join("kwok"))
        .name("kwok")
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .arg("--config")
        .arg(&kwok_config.0)
        .arg(format!(
            "--manage-nodes-with-label-selector={}={}",
            NODE_LABEL.0, NODE_LABEL.1
        ))
        // No Lease heartbeats: kubelets' renewals are not what is measured here.
        .arg("--node-lease-duration-seconds=0")
        .arg("--v=WARN")
        .spawn()?;

    let op_config = ScratchFile(std::env::temp_dir().join(format!(
        "tendril-{tag}-operator-{}.yaml",
        std::process::id()
    )));
    std::fs::write(
        &op_config.0,
        format!("identities:\n  gcGracePeriodSeconds: {GC_GRACE_SECS}\n"),
    )?;
    let port = free_port()?;
    let operator = Process::builder("tendril-operator")
        .arg("--config")
        .arg(&op_config.0)
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "warn")
        .spawn()?;
    let pid = operator.pid();
    tendril_e2e::eventually(Duration::from_secs(120), || fetch_metrics(port)).await?;
    let mut agent = match std::env::var("TENDRIL_SCALE_AGENT").as_deref() {
        Ok("0") => None,
        _ => Some(ScaleAgent::start(&plane, &tag, &size).await?),
    };
    let mut agent_figures = AgentFigures::default();

    let lat = Arc::new(Mutex::new(Latencies::default()));
    let _watch = AbortOnDrop(tokio::spawn(watch_endpoints(
        Api::all(client.clone()),
        lat.clone(),
    )));
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let _sampler = AbortOnDrop(tokio::spawn(sample_peaks(port, peaks.clone())));

    // ---- create
    let start = phase_start(&plane, pid, port, &peaks).await?;
    let nodes_api: Api<Node> = Api::all(client.clone());
    create_paced(
        (0..size.nodes).map(node).collect(),
        0.0,
        |_| nodes_api.clone(),
        |_| {},
    )
    .await
    .context("creating nodes")?;
    let ns_api: Api<Namespace> = Api::all(client.clone());
    create_paced(
        (0..size.namespaces).map(namespace).collect(),
        0.0,
        |_| ns_api.clone(),
        |_| {},
    )
    .await
    .context("creating namespaces")?;
    // The ServiceAccount admission plugin rejects pods until their namespace's `default`
    // ServiceAccount exists (the controller-manager creates them).
    let sas: Api<ServiceAccount> = Api::all(client.clone());
    tendril_e2e::eventually(Duration::from_secs(300), || async {
        let n = sas
            .list_metadata(&ListParams::default().fields("metadata.name=default"))
            .await?
            .items
            .iter()
            .filter(|s| {
                s.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|n| n.starts_with("scale-"))
            })
            .count();
        ensure!(
            n >= size.namespaces,
            "{n}/{} default ServiceAccounts",
            size.namespaces
        );
        Ok(())
    })
    .await?;
    if let Some(a) = agent.as_mut() {
        let labels = BTreeMap::from([
            ("app".to_string(), "app0".to_string()),
            ("tier".to_string(), "web".to_string()),
            ("version".to_string(), "v1".to_string()),
        ]);
        a.run_pod(&namespace_name(0), &labels).await?;
        agent_figures.rss_start_mib = a.rss_mib();
    }
    let mut live: VecDeque<(usize, usize, String)> = VecDeque::new();
    let mut objects = Vec::new();
    let mut keys = Vec::new();
    for i in 0..size.pods {
        let n = i / PODS_PER_NAMESPACE;
        let app = i % APPS_PER_NAMESPACE;
        let obj = pod(n, app, i, i % size.nodes);
        let key = format!(
            "{}/{}",
            namespace_name(n),
            obj["metadata"]["name"].as_str().unwrap()
        );
        live.push_back((n, app, key.clone()));
        keys.push(key);
        objects.push(obj);
    }
    let created_at = |lat: Arc<Mutex<Latencies>>, keys: Arc<Vec<String>>| {
        move |i: usize| {
            lat.lock()
                .unwrap()
                .created
                .insert(keys[i].clone(), Instant::now());
        }
    };
    let pods_api = |obj: &Value| -> Api<Pod> {
        Api::namespaced(
            client.clone(),
            obj["metadata"]["namespace"].as_str().unwrap_or("default"),
        )
    };
    let shared_keys = Arc::new(keys.clone());
    let alloc_start_metrics = fetch_metrics(port).await?;
    let alloc_started = Instant::now();
    create_paced(
        objects,
        rate,
        pods_api,
        created_at(lat.clone(), shared_keys),
    )
    .await
    .context("creating pods")?;
    if let Some(a) = &agent {
        // Every remote endpoint in the node's ipcache (services wait for this: the agent's
        // memory per endpoint is read before any Service exists).
        let t = Instant::now();
        a.wait_ipcache(
            size.pods,
            tendril_datapath::bpf::maps::IPCACHE_MAX_ENTRIES as usize,
        )
        .await?;
        agent_figures.endpoints_secs = t.elapsed().as_secs_f64();
        agent_figures.rss_endpoints_mib = a.rss_mib();
    }
    let svc_objects: Vec<Value> = (0..size.namespaces)
        .flat_map(|n| (0..SERVICES_PER_NAMESPACE).map(move |s| service(n, s)))
        .collect();
    create_paced(
        svc_objects,
        rate,
        |o| {
            Api::<Service>::namespaced(client.clone(), o["metadata"]["namespace"].as_str().unwrap())
        },
        |_| {},
    )
    .await
    .context("creating services")?;
    if let Some(a) = &agent {
        let t = Instant::now();
        a.wait_services(size.services).await?;
        agent_figures.services_secs = t.elapsed().as_secs_f64();
        agent_figures.rss_services_mib = a.rss_mib();
    }
    let np_objects: Vec<Value> = (0..size.namespaces)
        .flat_map(|n| (0..POLICIES_PER_NAMESPACE).map(move |p| policy(n, p)))
        .collect();
    create_paced(
        np_objects,
        rate,
        |o| {
            Api::<NetworkPolicy>::namespaced(
                client.clone(),
                o["metadata"]["namespace"].as_str().unwrap(),
            )
        },
        |_| {},
    )
    .await
    .context("creating network policies")?;
    settle(&lat, &keys).await?;
    // Each LBService's first status is written one `realizeDeadlineMillis` after it (the
    // kwok nodes never realize): part of creating it, not of the churn.
    first_statuses(&client, size.services).await?;
    let alloc_m = fetch_metrics(port).await?;
    let allocated = alloc_m.sum("tendril_identity_allocations_total", &[])
        - alloc_start_metrics.sum("tendril_identity_allocations_total", &[]);
    // Identities are allocated as the pods come: the rate over the pod-creation phase is
    // bounded by the creation rate (a pod's first label set comes with its first pod).
    let identity_alloc_per_s = allocated / alloc_started.elapsed().as_secs_f64();
    let create = phase_end(start, &plane, pid, port, &peaks, &lat, &keys).await?;
    eprintln!(
        "{tag}: create phase done in {:.0}s ({} pods)",
        create.secs, size.pods
    );

    // ---- churn: 10% of the pods per minute
    let churn_rate = size.pods as f64 * 0.10 / 60.0;
    let churn_n = (churn_rate * churn_secs as f64).round() as usize;
    let start = phase_start(&plane, pid, port, &peaks).await?;
    let agent_churn_start = match &agent {
        Some(a) => Some((cpu_seconds(a.pid), a.received_bytes().await?)),
        None => None,
    };
    let mut replacements = Vec::new();
    let mut churn_keys = Vec::new();
    let mut deletions = Vec::new();
    for k in 0..churn_n {
        let (n, app, old) = live.pop_front().context("no pod left to churn")?;
        let serial = size.pods + k;
        let obj = pod(n, app, serial, serial % size.nodes);
        let key = format!(
            "{}/{}",
            namespace_name(n),
            obj["metadata"]["name"].as_str().unwrap()
        );
        live.push_back((n, app, key.clone()));
        churn_keys.push(key);
        deletions.push(old);
        replacements.push(obj);
    }
    let deleter = {
        let client = client.clone();
        async move {
            let t0 = tokio::time::Instant::now();
            futures::stream::iter(deletions.into_iter().enumerate())
                .map(|(i, key)| {
                    let client = client.clone();
                    async move {
                        tokio::time::sleep_until(
                            t0 + Duration::from_secs_f64(i as f64 / churn_rate),
                        )
                        .await;
                        let (ns, name) = key.split_once('/').unwrap();
                        match Api::<Pod>::namespaced(client, ns)
                            .delete(name, &DeleteParams::default())
                            .await
                        {
                            Ok(_) => Ok(()),
                            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                            Err(e) => Err(anyhow::Error::from(e)),
                        }
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await
        }
    };
    let creator = create_paced(
        replacements,
        churn_rate,
        pods_api,
        created_at(lat.clone(), Arc::new(churn_keys.clone())),
    );
    let (d, c) = tokio::join!(deleter, creator);
    d.context("churn: deleting pods")?;
    c.context("churn: creating pods")?;
    settle(&lat, &churn_keys).await?;
    let churn = phase_end(start, &plane, pid, port, &peaks, &lat, &churn_keys).await?;
    if let (Some(a), Some((cpu, read))) = (&agent, agent_churn_start) {
        agent_figures.churn_cpu_cores = (cpu_seconds(a.pid) - cpu) / churn.secs;
        agent_figures.churn_received_bytes = a.received_bytes().await? - read;
        agent_figures.rss_churn_mib = a.rss_mib();
        agent_figures.map_pressure = a.map_pressure().await?;
    }
    eprintln!(
        "{tag}: churn phase done in {:.0}s ({churn_n} pods replaced)",
        churn.secs
    );

    // ---- what the policy concern wrote
    let rps: Api<ResolvedPolicy> = Api::all(client.clone());
    let list = rps.list(&ListParams::default()).await?;
    let resolved_policy_bytes = list
        .items
        .iter()
        .map(|r| serde_json::to_vec(r).map_or(0, |v| v.len()))
        .sum();
    let identities: Api<Identity> = Api::all(client.clone());
    let identity_count = identities
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();

    // ---- GC probe: label sets of their own, used once, then gone
    let probe_ns = namespace_name(0);
    let probe_pods: Vec<Value> = (0..GC_PROBE_PODS)
        .map(|k| {
            let mut p = pod(0, 0, 10_000_000 + k, k % size.nodes);
            p["metadata"]["name"] = format!("gc-probe-{k}").into();
            p["metadata"]["labels"]["app"] = format!("gc-probe-{k}").into();
            p
        })
        .collect();
    let probe_keys: Vec<String> = (0..GC_PROBE_PODS)
        .map(|k| format!("{probe_ns}/gc-probe-{k}"))
        .collect();
    let burst_started = Instant::now();
    create_paced(
        probe_pods,
        0.0,
        pods_api,
        created_at(lat.clone(), Arc::new(probe_keys.clone())),
    )
    .await?;
    settle(&lat, &probe_keys).await?;
    let burst_done = {
        let lat = lat.lock().unwrap();
        probe_keys
            .iter()
            .filter_map(|k| lat.endpoint.get(k).copied())
            .max()
            .unwrap_or_else(Instant::now)
    };
    let burst_alloc_per_s =
        GC_PROBE_PODS as f64 / burst_done.duration_since(burst_started).as_secs_f64();
    let eps: Api<Endpoint> = Api::namespaced(client.clone(), &probe_ns);
    let probe_ids: Vec<i64> = eps
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|e| {
            e.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("gc-probe-"))
        })
        .filter_map(|e| e.spec.identity)
        .collect();
    let probe_api: Api<Pod> = Api::namespaced(client.clone(), &probe_ns);
    futures::stream::iter(0..GC_PROBE_PODS)
        .map(|k| {
            let api = probe_api.clone();
            async move {
                api.delete(&format!("gc-probe-{k}"), &DeleteParams::default())
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let deleted_at = Instant::now();
    let gc_deadline = deleted_at + Duration::from_secs(GC_GRACE_SECS + 600);
    let probe_ids: std::collections::HashSet<i64> = probe_ids.into_iter().collect();
    // Past the deadline the lag is reported as a lower bound with what is left: the
    // figures of the size are still worth printing.
    let gc_left = loop {
        let left = identities
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|i| i.metadata.name.as_deref()?.parse::<i64>().ok())
            .filter(|id| probe_ids.contains(id))
            .count();
        if left == 0 || Instant::now() >= gc_deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let gc_lag_s = deleted_at.elapsed().as_secs_f64() - GC_GRACE_SECS as f64;

    Ok(Figures {
        size: Some(size),
        create,
        churn,
        churn_pods: churn_n,
        identities: identity_count,
        identity_alloc_per_s,
        burst_alloc_per_s,
        resolved_policies: list.items.len(),
        resolved_policy_bytes,
        gc_lag_s,
        gc_left,
        agent: agent.map(|_| agent_figures),
    })
}

// ------------------------------------------------------------------ report

/// Tendril's writes (group tendril.dev) and all writes, per pod created in the phase.
fn writes_per_pod(p: &Phase, pods: usize) -> (f64, f64) {
    let tendril: f64 = p
        .writes
        .iter()
        .filter(|((g, _), _)| g == "tendril.dev")
        .map(|(_, v)| v)
        .sum();
    let all: f64 = p.writes.values().sum();
    (tendril / pods as f64, all / pods as f64)
}

fn rows(f: &Figures) -> Vec<(String, f64, String)> {
    let (t_w, all_w) = writes_per_pod(&f.churn, f.churn_pods);
    let mut r = vec![
        (
            "operator RSS after create (MiB)".into(),
            f.create.rss_mib,
            "< 300 at 100%".into(),
        ),
        (
            "operator peak RSS (MiB)".into(),
            f.churn.peak_rss_mib,
            String::new(),
        ),
        (
            "operator RSS after churn (MiB)".into(),
            f.churn.rss_mib,
            String::new(),
        ),
        (
            "operator CPU while creating (cores)".into(),
            f.create.cpu_cores,
            String::new(),
        ),
        (
            "operator CPU during churn (cores)".into(),
            f.churn.cpu_cores,
            "< 1".into(),
        ),
        ("create phase (s)".into(), f.create.secs, String::new()),
        (
            "pod → Endpoint+identity p50, create (s)".into(),
            f.create.ep_p50,
            String::new(),
        ),
        (
            "pod → Endpoint+identity p99, create (s)".into(),
            f.create.ep_p99,
            String::new(),
        ),
        (
            "pod → Endpoint+identity p50, churn (s)".into(),
            f.churn.ep_p50,
            String::new(),
        ),
        (
            "pod → Endpoint+identity p99, churn (s)".into(),
            f.churn.ep_p99,
            "< 2".into(),
        ),
        (
            "pod → Endpoint+identity max, churn (s)".into(),
            f.churn.ep_max,
            String::new(),
        ),
        ("identities".into(), f.identities as f64, String::new()),
        (
            "identity allocations/s while pods are created (paced)".into(),
            f.identity_alloc_per_s,
            String::new(),
        ),
        (
            "new label sets/s, burst of 1,000 (pod create → Endpoint)".into(),
            f.burst_alloc_per_s,
            "≥ 1000".into(),
        ),
        (
            "identity GC lag beyond grace (s)".into(),
            f.gc_lag_s,
            String::new(),
        ),
        (
            "probe identities left at the GC deadline (lag is then a lower bound)".into(),
            f.gc_left as f64,
            String::new(),
        ),
        (
            "ResolvedPolicies".into(),
            f.resolved_policies as f64,
            String::new(),
        ),
        (
            "ResolvedPolicy bytes (KiB)".into(),
            f.resolved_policy_bytes as f64 / 1024.0,
            String::new(),
        ),
        (
            "Tendril apiserver writes per churned pod".into(),
            t_w,
            "≤ 3".into(),
        ),
        (
            "all apiserver writes per churned pod".into(),
            all_w,
            String::new(),
        ),
        (
            "peak workqueue depth, create".into(),
            f.create.queue_depth_peak,
            String::new(),
        ),
        (
            "peak workqueue depth, churn".into(),
            f.churn.queue_depth_peak,
            String::new(),
        ),
    ];
    if let (Some(a), Some(size)) = (&f.agent, &f.size) {
        r.extend(agent_rows(a, size, f.churn_pods));
    }
    for (phase, p) in [("create", &f.create), ("churn", &f.churn)] {
        for (c, (count, mean, p99)) in &p.reconciles {
            r.push((format!("{c} reconciles, {phase}"), *count, String::new()));
            r.push((
                format!("{c} reconcile mean ms, {phase}"),
                mean * 1e3,
                String::new(),
            ));
            r.push((
                format!("{c} reconcile p99 ≤ ms, {phase}"),
                p99 * 1e3,
                String::new(),
            ));
        }
    }
    r
}

fn print_report(figures: &[Figures], rate: f64, churn_secs: u64) {
    let sizes: Vec<Size> = figures.iter().filter_map(|f| f.size).collect();
    println!(
        "\n### Scale run: {} pods/s creation, {churn_secs}s churn at 10%/min\n",
        rate
    );
    println!("| size | nodes | namespaces | pods | services | NetworkPolicies |");
    println!("|---|---:|---:|---:|---:|---:|");
    for s in &sizes {
        println!(
            "| {:.0}% | {} | {} | {} | {} | {} |",
            s.fraction * 100.0,
            s.nodes,
            s.namespaces,
            s.pods,
            s.services,
            s.policies
        );
    }
    let tables: Vec<Vec<(String, f64, String)>> = figures.iter().map(rows).collect();
    let mut header = "| figure |".to_string();
    let mut rule = "|---|".to_string();
    for s in &sizes {
        header += &format!(" {:.0}% |", s.fraction * 100.0);
        rule += "---:|";
    }
    if sizes.len() > 1 {
        header += " ratio last/first | size ratio |";
        rule += "---:|---:|";
    }
    header += " goal |";
    rule += "---|";
    println!("\n{header}\n{rule}");
    let size_ratio = sizes.last().map_or(1.0, |l| l.pods as f64) / sizes[0].pods as f64;
    // Rows keyed by name (a concern may show up in one size only).
    let mut names: Vec<String> = Vec::new();
    for t in &tables {
        for (n, _, _) in t {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    for name in names {
        let vals: Vec<Option<(f64, String)>> = tables
            .iter()
            .map(|t| {
                t.iter()
                    .find(|(n, _, _)| *n == name)
                    .map(|(_, v, g)| (*v, g.clone()))
            })
            .collect();
        let goal = vals
            .iter()
            .flatten()
            .map(|(_, g)| g.clone())
            .next()
            .unwrap_or_default();
        let mut line = format!("| {name} |");
        for v in &vals {
            match v {
                Some((v, _)) if v.abs() >= 100.0 => line += &format!(" {v:.0} |"),
                Some((v, _)) => line += &format!(" {v:.3} |"),
                None => line += " – |",
            }
        }
        if sizes.len() > 1 {
            match (
                vals.first().cloned().flatten(),
                vals.last().cloned().flatten(),
            ) {
                (Some((a, _)), Some((b, _))) if a != 0.0 => {
                    line += &format!(" {:.2} | {size_ratio:.1} |", b / a)
                }
                _ => line += " – | – |",
            }
        }
        line += &format!(" {goal} |");
        println!("{line}");
    }
    for f in figures {
        let s = f.size.unwrap();
        println!(
            "\napiserver writes by resource during the churn at {:.0}% ({} pods replaced):\n",
            s.fraction * 100.0,
            f.churn_pods
        );
        println!("| group | resource | writes | per churned pod |\n|---|---|---:|---:|");
        for ((g, r), v) in &f.churn.writes {
            println!(
                "| {} | {r} | {v:.0} | {:.2} |",
                if g.is_empty() { "core" } else { g },
                v / f.churn_pods as f64
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_at_scale() -> Result<()> {
    let fractions: Vec<f64> = std::env::var("TENDRIL_SCALE_FRACTIONS")
        .unwrap_or_else(|_| "0.1".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("TENDRIL_SCALE_FRACTIONS: comma-separated fractions of full size, e.g. 0.1,0.3")?;
    let rate: f64 = env_or("TENDRIL_SCALE_RATE", 100.0)?;
    let churn_secs: u64 = env_or("TENDRIL_SCALE_CHURN_SECS", 120)?;
    let mut figures = Vec::new();
    for f in fractions {
        ensure!(f > 0.0 && f <= 1.0, "fraction {f} is not in (0, 1]");
        let fig = run_size(Size::of(f), rate, churn_secs).await?;
        // Each size's table as soon as it is measured (a later size may not finish).
        print_report(std::slice::from_ref(&fig), rate, churn_secs);
        figures.push(fig);
    }
    if figures.len() > 1 {
        print_report(&figures, rate, churn_secs);
    }
    Ok(())
}
