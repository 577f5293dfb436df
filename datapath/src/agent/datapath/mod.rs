//! The node datapath reconciler: watches → index → diff against the kernel.
//!
//! - Watches: every `NodeNetwork` (remote pod CIDRs and node addresses → routes, ipcache),
//!   every `Endpoint` (local ones → `endpoints` map and attached programs, all → ipcache),
//!   every `ResolvedPolicy` (the local endpoints' identities' ones → policy maps), every
//!   `Identity` (a change triggers a pass) and the `kubernetes` Service's `EndpointSlice`
//!   (the kube-apiserver's addresses → ipcache, [`watch_apiserver`]). The reflector stores
//!   are the index;
//!   [`index::desired`] and [`policy::translate`] turn a snapshot into the desired state.
//! - A pass ([`Reconciler::pass`]) converges netlink first ([`kernel`]: VXLAN device,
//!   ip_forward, routes, host veths), then the policy maps (`policy`, `policy_cidrs`,
//!   `policy_state`, in the order of [`realize_policy`]), so a pod's policy
//!   is in before its `endpoints` entry and its programs; then `endpoints`, `ipcache`,
//!   `node_config` by diff ([`crate::bpf::Dataplane`]), then the programs, then reports.
//!   Nothing is converged before every watch
//!   has completed its initial list, so a restarting agent never removes (prunes) what is
//!   still valid nor writes from a partial view; maps and programs stay pinned and
//!   attached while it is down, so traffic keeps flowing.
//! - Passes run on every change (debounced), periodically (resync) and, after a failure,
//!   with backoff. A full map is an error: `tendril_bpf_map_operations_total{outcome="full"}`,
//!   `Realized=False` with reason `MapFull`, and an error log.
//! - Status, by server-side apply under its own field manager `tendril-agent-datapath`
//!   (the node sync owns the rest of `NodeNetwork.status` as `tendril-agent`):
//!   `NodeNetwork.status.realizedRevision` (the generation realized) and condition
//!   `Realized`; on each local `Endpoint`, `status.realizedRevision` (its `spec.revision`)
//!   and `Realized` once its addresses are in the map and its veth has the programs, and
//!   `status.realizedPolicyRevision`: the revision of its identity's `ResolvedPolicy`
//!   whose entries are in the maps.
//! - Beside the passes: the `events` ring buffer is read into metrics and the flow log
//!   ([`events`]), and conntrack is garbage-collected periodically.

pub mod events;
pub mod index;
pub mod kernel;
pub mod metrics;
pub mod policy;

use crate::bpf::maps::{
    EndpointInfo, EndpointKey, IpcacheKey, NODE_F_POLICY_AUDIT, NODE_F_TUNNEL, NodeConfig,
};
use crate::bpf::{
    Dataplane, DataplaneError, Failure, LoadError, MapSizes, PolicyItem, Programs, Report,
};
use futures::StreamExt;
use index::{Desired, EndpointRef};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kernel::{Attacher, NetlinkOutcome, NetlinkPlan, TunnelPlan};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use metrics::DatapathMetrics;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_runtime::conditions::{self, DesiredCondition, REALIZED};
use crate::config::RoutingMode;
use tendril_runtime::{Health, apply_body, apply_status};
use tendril_crds::v1alpha1::{Endpoint, Identity, NamedPort, NodeNetwork, ResolvedPolicy};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub const FIELD_MANAGER: &str = "tendril-agent-datapath";
/// The readiness check this module registers with the harness.
pub const HEALTH_CHECK: &str = "datapath";
/// How often the programs' counters and the maps' fill are read into metrics.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    pub node_name: String,
    /// The node's network namespace when the agent runs outside it (simulated nodes).
    pub node_netns: Option<PathBuf>,
    /// The node's bpffs pin directory (maps, and `links/`).
    pub pin_dir: PathBuf,
    pub routing_mode: RoutingMode,
    pub tunnel_device: String,
    pub tunnel_port: u16,
    pub map_sizes: MapSizes,
    pub resync: Duration,
    pub debounce: Duration,
    pub policy: PolicyOptions,
}

/// Network policy enforcement settings (`policy` in agent.yaml).
#[derive(Clone, Debug)]
pub struct PolicyOptions {
    /// `NODE_F_POLICY_AUDIT`: would-be drops are reported and pass.
    pub audit_mode: bool,
    pub conntrack_gc: Duration,
    pub denied_log_per_second: u32,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        Self {
            audit_mode: false,
            conntrack_gc: Duration::from_secs(30),
            denied_log_per_second: 10,
        }
    }
}

/// The annotation of a `ResolvedPolicy` with when the operator saw the change behind its
/// revision (RFC 3339, UTC).
pub use tendril_crds::facts::annotations::POLICY_CHANGED_AT;

/// Seconds from the change behind `policy`'s revision ([`POLICY_CHANGED_AT`]) to `now`;
/// `None` without a readable annotation. A clock skewed behind the operator's gives 0.
pub fn implementation_delay(
    policy: &ResolvedPolicy,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<f64> {
    let at: k8s_openapi::jiff::Timestamp = policy
        .metadata
        .annotations
        .as_ref()?
        .get(POLICY_CHANGED_AT)?
        .parse()
        .ok()?;
    Some(now.duration_since(at).as_secs_f64().max(0.0))
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] LoadError),
    #[error("opening the pinned maps: {0}")]
    Maps(#[from] DataplaneError),
    #[error("loader task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A local endpoint's state after a pass, for its status.
#[derive(Clone, Debug)]
struct EndpointState {
    key: EndpointRef,
    revision: i64,
    /// The `ResolvedPolicy` revision now in the maps for it.
    policy_revision: Option<i64>,
    /// Addresses in the map and programs on its veth.
    wired: bool,
    /// A map write for it failed.
    failed: bool,
}

/// What one pass achieved.
#[derive(Clone, Debug, PartialEq)]
struct NodeReport {
    uid: Option<String>,
    realized_revision: Option<i64>,
    condition: DesiredCondition,
}

/// What [`realize_policy`] did.
#[derive(Debug)]
pub struct PolicyRealization {
    pub wanted: policy::DesiredPolicy,
    pub cidrs: Report<IpcacheKey>,
    pub policy: Report<PolicyItem>,
    /// The translation equalled what the last convergence wrote: the maps were not read.
    pub skipped: bool,
}

/// Translates the local endpoints' policies and converges the policy maps, pruning (call
/// it only with complete caches), in one [`crate::bpf::maps::PolicyMaps::converge_with_cidrs`]:
/// it owns the order that keeps every packet judged by the old policy, the new one or (a
/// new connection, briefly) their union, and re-judges established connections only
/// against the complete new policy. Blocking.
///
/// With `last`, what a previous call converged without failure: an identical translation
/// skips the maps (a pass triggered by an unrelated change costs no map reads).
pub fn realize_policy(
    dp: &mut Dataplane,
    subjects: &[policy::PolicySubject<'_>],
    cluster_ports: &policy::ClusterNamedPorts,
    last: Option<&policy::DesiredPolicy>,
) -> Result<PolicyRealization, DataplaneError> {
    let current_cidrs = dp.policy.cidrs()?;
    let wanted = policy::translate(subjects, cluster_ports, &current_cidrs);
    if last == Some(&wanted) {
        return Ok(PolicyRealization {
            wanted,
            cidrs: Report::default(),
            policy: Report::default(),
            skipped: true,
        });
    }
    let (cidrs, policy) =
        dp.policy
            .converge_with_cidrs(&wanted.cidrs, &wanted.entries, &wanted.states, true)?;
    Ok(PolicyRealization {
        wanted,
        cidrs,
        policy,
        skipped: false,
    })
}

/// Loads the programs (reusing pinned maps and links), then reconciles until `shutdown`;
/// the datapath's flow events go to `flows`.
pub async fn run(
    client: Client,
    metrics: DatapathMetrics,
    health: Health,
    cfg: DatapathConfig,
    flows: events::FlowLog,
    shutdown: CancellationToken,
) -> Result<(), DatapathError> {
    health.register(HEALTH_CHECK);
    let (dir, sizes) = (cfg.pin_dir.clone(), cfg.map_sizes);
    let (programs, dataplane) = tokio::task::spawn_blocking(move || {
        let programs = Programs::load(&dir, &sizes)?;
        let dataplane = Dataplane::open(&dir)?;
        Ok::<_, DatapathError>((programs, dataplane))
    })
    .await??;
    tracing::info!(pin_dir = %cfg.pin_dir.display(), mode = ?cfg.routing_mode, "eBPF programs loaded");

    let changed = Arc::new(Notify::new());
    let since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let touched = {
        let (changed, since) = (changed.clone(), since.clone());
        move || {
            since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(Instant::now);
            changed.notify_one();
        }
    };
    let (nn_store, nn_watch) = watch::<NodeNetwork>(Api::all(client.clone()), touched.clone());
    let (ep_store, ep_watch) = watch::<Endpoint>(Api::all(client.clone()), touched.clone());
    let (id_store, id_watch) = watch::<Identity>(Api::all(client.clone()), touched.clone());
    let (rp_store, rp_watch) = watch::<ResolvedPolicy>(Api::all(client.clone()), touched.clone());
    let (as_store, as_forbidden, as_watch) = watch_apiserver(client.clone(), touched);
    let synced = Arc::new(AtomicBool::new(false));
    let initial_lists = {
        let (synced, changed) = (synced.clone(), changed.clone());
        let (nn, ep, id, rp, apiserver) = (
            nn_store.clone(),
            ep_store.clone(),
            id_store.clone(),
            rp_store.clone(),
            as_store.clone(),
        );
        async move {
            // A forbidden list of the apiserver's slices does not hold the datapath back.
            let apiserver = async {
                tokio::select! {
                    ready = apiserver.wait_until_ready() => ready.is_ok(),
                    _ = as_forbidden.notified() => true,
                }
            };
            let all = futures::future::join5(
                nn.wait_until_ready(),
                ep.wait_until_ready(),
                id.wait_until_ready(),
                rp.wait_until_ready(),
                apiserver,
            )
            .await;
            if all.0.is_ok() && all.1.is_ok() && all.2.is_ok() && all.3.is_ok() && all.4 {
                synced.store(true, Ordering::SeqCst);
                changed.notify_one();
            }
            std::future::pending::<()>().await;
        }
    };

    let dataplane = Arc::new(Mutex::new(dataplane));
    let event_reader = {
        let reader = events::run(
            dataplane.clone(),
            metrics.clone(),
            flows,
            cfg.policy.denied_log_per_second,
            shutdown.clone(),
        );
        // Without events the datapath still enforces: the reconciler goes on.
        async move {
            reader.await;
            std::future::pending::<()>().await
        }
    };
    let conntrack_gc = events::conntrack_gc(
        dataplane.clone(),
        metrics.clone(),
        cfg.policy.conntrack_gc,
        shutdown.clone(),
    );
    let mut reconciler = Reconciler {
        client,
        cfg,
        metrics,
        attacher: Arc::new(Mutex::new(Attacher::new(programs))),
        dataplane,
        nn_store,
        ep_store,
        rp_store,
        as_store,
        last_report: None,
        last_realized: None,
        announced: false,
        held_policies: BTreeMap::new(),
        delay_observed: BTreeSet::new(),
        policy_applied: None,
    };
    let reconcile_loop = async {
        let mut failures: u32 = 0;
        let mut metrics_tick = tokio::time::interval(METRICS_INTERVAL);
        loop {
            let started = since.lock().unwrap_or_else(|p| p.into_inner()).take();
            let realized = reconciler.pass(synced.load(Ordering::SeqCst)).await;
            health.set_ready(HEALTH_CHECK, realized);
            match (realized, started) {
                (true, Some(at)) => reconciler
                    .metrics
                    .realize_seconds
                    .observe(at.elapsed().as_secs_f64()),
                // Not converged: the change is still pending, keep its start.
                (false, Some(at)) => {
                    since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(at);
                }
                _ => {}
            }
            failures = if realized { 0 } else { failures + 1 };
            let wait = if realized {
                reconciler.cfg.resync
            } else {
                // Not converged (waiting for initial lists, or a failure): retry soon.
                Duration::from_millis(200 * 2u64.pow(failures.min(7))).min(reconciler.cfg.resync)
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = changed.notified() => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = metrics_tick.tick() => reconciler.observe_maps().await,
                }
            }
            // Coalesce a burst of changes into one pass.
            tokio::time::sleep(reconciler.cfg.debounce).await;
        }
    };

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = nn_watch => {}
        _ = ep_watch => {}
        _ = id_watch => {}
        _ = rp_watch => {}
        _ = as_watch => {}
        _ = initial_lists => {}
        _ = event_reader => {}
        _ = conntrack_gc => {}
        _ = reconcile_loop => {}
    }
    health.remove(HEALTH_CHECK);
    Ok(())
}

/// A reflector on `api` whose every event calls `touched`; objects that fail to
/// deserialize end up as watch errors, logged, never stalling the others.
fn watch<K>(
    api: Api<K>,
    touched: impl Fn() + Send + Clone + 'static,
) -> (Store<K>, impl std::future::Future<Output = ()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .for_each(move |event| {
            match event {
                Ok(_) => touched(),
                Err(e) => tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watch"),
            }
            futures::future::ready(())
        });
    (store, stream)
}

/// The EndpointSlices of the `kubernetes` Service in `default`: the kube-apiserver's own
/// addresses (entity `kube-apiserver`, identity 7, [`index::desired`]), watched like
/// [`watch`]. Selected by name too (`metadata.name=kubernetes`, the slice the apiserver
/// writes), so RBAC can grant exactly that name: kustomize's `namespace` would move a Role
/// for `default` into Tendril's namespace.
///
/// Forbidden (403, RBAC without that rule) does not block the datapath: the returned
/// `Notify` is notified, so the initial-list gate passes without these addresses (the
/// entity then matches no address, as without this watch) and an error says what is
/// missing; the watch keeps retrying with backoff and fills the store once it is allowed.
fn watch_apiserver(
    client: Client,
    touched: impl Fn() + Send + Clone + 'static,
) -> (
    Store<EndpointSlice>,
    Arc<Notify>,
    impl std::future::Future<Output = ()>,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, "default");
    let config = watcher::Config::default()
        .labels("kubernetes.io/service-name=kubernetes")
        .fields("metadata.name=kubernetes");
    let forbidden = Arc::new(Notify::new());
    let (store, writer) = reflector::store();
    let stream = {
        let forbidden = forbidden.clone();
        let mut denied = false;
        reflector::reflector(writer, watcher(api, config))
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(_) => {
                        if std::mem::take(&mut denied) {
                            tracing::info!("kube-apiserver EndpointSlices readable again");
                        }
                        touched();
                    }
                    Err(
                        watcher::Error::InitialListFailed(kube::Error::Api(status))
                        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
                        | watcher::Error::WatchFailed(kube::Error::Api(status))
                        | watcher::Error::WatchError(status),
                    ) if status.is_forbidden() => {
                        if !std::mem::replace(&mut denied, true) {
                            tracing::error!(
                                error = %status.message,
                                "forbidden to list/watch EndpointSlice default/kubernetes: the \
                                 entity kube-apiserver matches no address until the agent's \
                                 ClusterRole allows it (deploy/kustomize/base/agent-rbac.yaml); \
                                 retrying"
                            );
                            forbidden.notify_one();
                        }
                    }
                    Err(e) => tracing::warn!(kind = "EndpointSlice", error = %e, "watch"),
                }
                futures::future::ready(())
            })
    };
    (store, forbidden, stream)
}

struct Reconciler {
    client: Client,
    cfg: DatapathConfig,
    metrics: DatapathMetrics,
    attacher: Arc<Mutex<Attacher>>,
    dataplane: Arc<Mutex<Dataplane>>,
    nn_store: Store<NodeNetwork>,
    ep_store: Store<Endpoint>,
    rp_store: Store<ResolvedPolicy>,
    /// The kube-apiserver's EndpointSlices ([`watch_apiserver`]).
    as_store: Store<EndpointSlice>,
    last_report: Option<NodeReport>,
    /// The last generation realized (so a failing pass keeps reporting it).
    last_realized: Option<i64>,
    announced: bool,
    /// The policy last realized per local endpoint: kept while the endpoint's (new)
    /// identity has no `ResolvedPolicy` yet, so a realized endpoint never falls back to
    /// no policy at all in between.
    held_policies: BTreeMap<EndpointRef, Arc<ResolvedPolicy>>,
    /// (identity, revision) whose implementation delay was observed.
    delay_observed: BTreeSet<(u32, i64)>,
    /// The policy translation last converged without failure, and when.
    policy_applied: Option<(Arc<policy::DesiredPolicy>, Instant)>,
}

/// The policy side of a pass.
#[derive(Debug, Default)]
struct PolicyOutcome {
    cidrs: Report<IpcacheKey>,
    policy: Report<PolicyItem>,
    /// Endpoint → the `ResolvedPolicy` revision of its identity now in the maps (only
    /// when everything converged).
    realized: BTreeMap<EndpointRef, i64>,
    /// Endpoint → the policy used (its identity's, or the held one).
    used: BTreeMap<EndpointRef, Arc<ResolvedPolicy>>,
    entries: usize,
    endpoints: usize,
    /// What the maps now hold, when known (converged without failure, or unchanged).
    applied: Option<Arc<policy::DesiredPolicy>>,
}

impl PolicyOutcome {
    fn failures(&self) -> impl Iterator<Item = &Failure<dyn std::fmt::Display>> {
        self.cidrs.failures().chain(self.policy.failures())
    }
}

/// The maps' side of a pass.
struct MapsOutcome {
    endpoints: Report<EndpointKey>,
    ipcache: Report<IpcacheKey>,
    node_config_error: Option<String>,
}

impl Reconciler {
    /// One convergence; returns whether the kernel realizes the whole desired state
    /// (which needs every initial list).
    #[tracing::instrument(skip(self), fields(node = %self.cfg.node_name))]
    async fn pass(&mut self, synced: bool) -> bool {
        if !synced {
            // A partial view (e.g. NodeNetworks listed, Endpoints not yet) would write a
            // node config without the node's address, or nothing but stale-kept entries:
            // the kernel keeps what the last run left until the view is complete.
            return false;
        }
        let networks = self.nn_store.state();
        let endpoints = self.ep_store.state();
        let apiserver = self.as_store.state();
        let desired = index::desired(
            &self.cfg.node_name,
            self.cfg.routing_mode,
            networks.iter().map(AsRef::as_ref),
            endpoints.iter().map(AsRef::as_ref),
            apiserver.iter().map(AsRef::as_ref),
        );
        let own = self.nn_store.get(&ObjectRef::new(&self.cfg.node_name));
        if self.last_realized.is_none() {
            self.last_realized = own
                .as_ref()
                .and_then(|nn| nn.status.as_ref())
                .and_then(|s| s.realized_revision);
        }

        let plan = NetlinkPlan {
            node_ip: desired.node_ip,
            tunnel: (self.cfg.routing_mode == RoutingMode::Overlay).then_some(TunnelPlan {
                port: self.cfg.tunnel_port,
            }),
            tunnel_device: self.cfg.tunnel_device.clone(),
            routes: desired.routes.clone(),
            local_ips: desired.local.iter().flat_map(|e| e.ips.clone()).collect(),
            prune: true,
        };
        let netns = self.cfg.node_netns.clone();
        let netlink = tokio::task::spawn_blocking(move || kernel::converge(netns, plan)).await;
        let netlink = match netlink {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "netlink convergence failed");
                self.report(own.as_deref(), false, "NetlinkFailed", e.to_string())
                    .await;
                return false;
            }
            Err(e) => {
                self.report(own.as_deref(), false, "NetlinkFailed", e.to_string())
                    .await;
                return false;
            }
        };
        for error in &netlink.errors {
            tracing::warn!(%error, "datapath");
        }
        if netlink.routes_added + netlink.routes_deleted > 0 {
            tracing::info!(
                routes_added = netlink.routes_added,
                routes_deleted = netlink.routes_deleted,
                "routes converged"
            );
        }

        // Policy before the endpoints map and the programs: a new pod is never reachable
        // through the datapath before its policy is in.
        let policy = match self.converge_policy(&desired).await {
            Ok(policy) => policy,
            Err(e) => {
                tracing::warn!(error = %e, "policy map convergence failed");
                self.report(own.as_deref(), false, "MapReadFailed", e).await;
                return false;
            }
        };

        let maps = match self.converge_maps(&desired, &netlink, true).await {
            Ok(maps) => maps,
            Err(e) => {
                tracing::warn!(error = %e, "map convergence failed");
                self.report(own.as_deref(), false, "MapReadFailed", e).await;
                return false;
            }
        };
        self.observe_maps().await;

        // Programs last: a pod's entry is in the map before its programs can see it.
        let (netns, pin_dir, attacher) = (
            self.cfg.node_netns.clone(),
            self.cfg.pin_dir.clone(),
            self.attacher.clone(),
        );
        let (hooks, present) = (netlink.hooks.clone(), netlink.present.clone());
        let attached = tokio::task::spawn_blocking(move || {
            kernel::attach(netns, pin_dir, hooks, present, true, attacher)
        })
        .await;
        let attached = match attached {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                self.report(own.as_deref(), false, "AttachFailed", e.to_string())
                    .await;
                return false;
            }
            Err(e) => {
                self.report(own.as_deref(), false, "AttachFailed", e.to_string())
                    .await;
                return false;
            }
        };
        for error in &attached.errors {
            tracing::warn!(%error, "attaching programs");
        }
        if attached.links_pruned > 0 {
            tracing::info!(
                links_pruned = attached.links_pruned,
                "link pins of vanished interfaces removed"
            );
        }

        let failed_ips: BTreeSet<IpAddr> = maps
            .endpoints
            .failed
            .iter()
            .filter_map(|f| f.key.ip())
            .collect();
        let mut endpoint_states = Vec::new();
        for ep in &desired.local {
            let wired = ep.ips.iter().all(|ip| {
                netlink
                    .wiring
                    .get(ip)
                    .is_some_and(|w| attached.attached.contains(&w.ifindex))
            });
            let failed = ep.ips.iter().any(|ip| failed_ips.contains(ip));
            endpoint_states.push(EndpointState {
                key: ep.key.clone(),
                revision: ep.revision,
                policy_revision: policy.realized.get(&ep.key).copied(),
                wired,
                failed,
            });
        }
        // Before the statuses: it tells a revision realized by an earlier process (already
        // reported) from one this pass realized.
        self.observe_policy_delay(&desired, &policy);
        self.write_endpoint_statuses(&endpoint_states).await;

        let policy_failed = policy.failures().count();
        let full = maps.endpoints.map_full()
            || maps.ipcache.map_full()
            || policy.cidrs.map_full()
            || policy.policy.map_full();
        let (realized, reason, message) = if full {
            for f in maps
                .endpoints
                .failures()
                .chain(maps.ipcache.failures())
                .chain(policy.failures())
            {
                tracing::error!(key = %f.key, op = %f.op, error = %f.error, "BPF map write failed");
            }
            (
                false,
                "MapFull",
                "a BPF map is full (see tendril_bpf_map_pressure)".to_string(),
            )
        } else if !maps.endpoints.is_converged() || !maps.ipcache.is_converged() {
            for f in maps.endpoints.failures().chain(maps.ipcache.failures()) {
                tracing::warn!(key = %f.key, op = %f.op, error = %f.error, "BPF map write failed");
            }
            (
                false,
                "MapWriteFailed",
                format!(
                    "{} map writes failed",
                    maps.endpoints.failed.len() + maps.ipcache.failed.len()
                ),
            )
        } else if policy_failed > 0 {
            for f in policy.failures() {
                tracing::warn!(key = %f.key, op = %f.op, error = %f.error, "policy map write failed");
            }
            (
                false,
                "MapWriteFailed",
                format!("{policy_failed} policy map writes failed"),
            )
        } else if let Some(e) = maps.node_config_error {
            (false, "MapWriteFailed", e)
        } else if !netlink.errors.is_empty() {
            (false, "NetlinkFailed", netlink.errors.join("; "))
        } else if !attached.errors.is_empty() {
            (false, "AttachFailed", attached.errors.join("; "))
        } else if desired.generation.is_none() {
            (
                false,
                "NoNodeNetwork",
                "the node's NodeNetwork does not exist".into(),
            )
        } else {
            // Counts stay out of the condition: it is rewritten only when it changes.
            (
                true,
                "Realized",
                format!(
                    "the kernel realizes generation {}",
                    desired.generation.unwrap_or_default()
                ),
            )
        };
        let wired = endpoint_states.iter().filter(|s| s.wired).count();
        tracing::debug!(
            policy_entries = policy.entries,
            policy_endpoints = policy.endpoints,
            ipcache = desired.ipcache.len(),
            routes = desired.routes.len(),
            wired,
            local = desired.local.len(),
            pending = desired.pending.len(),
            realized,
            "pass done"
        );
        if realized {
            self.last_realized = desired.generation;
            if !self.announced {
                // Once per process: tests and operators wait for this after a restart.
                tracing::info!(generation = ?desired.generation, "datapath realized");
                self.announced = true;
            }
        }
        self.report(own.as_deref(), realized, reason, message).await;
        realized
    }

    /// The policy each local endpoint gets: its identity's `ResolvedPolicy`, else the one
    /// held from its last realization (its identity changed and the new one's policy is
    /// not written yet), else none.
    fn policies_of(&self, desired: &Desired) -> BTreeMap<EndpointRef, Arc<ResolvedPolicy>> {
        let mut out = BTreeMap::new();
        for ep in &desired.local {
            let current = self.rp_store.get(&ObjectRef::new(&ep.identity.to_string()));
            if let Some(policy) = current.or_else(|| self.held_policies.get(&ep.key).cloned()) {
                out.insert(ep.key.clone(), policy);
            }
        }
        out
    }

    /// Translates the local endpoints' policies and converges `policy_cidrs`, then `policy`
    /// and `policy_state`.
    async fn converge_policy(&mut self, desired: &Desired) -> Result<PolicyOutcome, String> {
        let used = self.policies_of(desired);
        // Egress named ports resolve against every endpoint of the cluster.
        let all = self.ep_store.state();
        let cluster_ports = policy::ClusterNamedPorts::from_endpoints(
            all.iter().map(|e| e.spec.named_ports.as_slice()),
        );
        let subjects: Vec<(EndpointRef, u16, u32, Vec<NamedPort>)> = desired
            .local
            .iter()
            .map(|ep| {
                (
                    ep.key.clone(),
                    ep.endpoint_id,
                    ep.identity,
                    ep.named_ports.clone(),
                )
            })
            .collect();
        let (dataplane, metrics) = (self.dataplane.clone(), self.metrics.clone());
        let used_for_task = used.clone();
        // Within a resync period, an unchanged translation is not converged again.
        let last = self
            .policy_applied
            .as_ref()
            .filter(|(_, at)| at.elapsed() < self.cfg.resync)
            .map(|(applied, _)| applied.clone());
        let mut outcome = tokio::task::spawn_blocking(move || {
            let mut dp = dataplane.lock().unwrap_or_else(|p| p.into_inner());
            let policy_subjects: Vec<policy::PolicySubject<'_>> = subjects
                .iter()
                .map(|(key, endpoint_id, _, named_ports)| policy::PolicySubject {
                    endpoint_id: *endpoint_id,
                    policy: used_for_task.get(key).map(|p| &p.spec),
                    named_ports,
                })
                .collect();
            let PolicyRealization {
                wanted,
                cidrs,
                policy: entries,
                skipped,
            } = realize_policy(&mut dp, &policy_subjects, &cluster_ports, last.as_deref())
                .map_err(|e| e.to_string())?;
            // Once per process: it is a property of the datapath, not news.
            static IPV6_LOGGED: AtomicBool = AtomicBool::new(false);
            if wanted.skipped_ipv6 > 0 && !IPV6_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    prefixes = wanted.skipped_ipv6,
                    "IPv6 policy CIDRs are skipped: the datapath enforces IPv4 only"
                );
            }
            if !skipped {
                for problem in &wanted.problems {
                    tracing::warn!(%problem, "policy entry left out");
                }
            }
            metrics.observe_converge(crate::bpf::maps::POLICY_CIDRS, &cidrs);
            metrics.observe_converge(crate::bpf::maps::POLICY, &entries);
            for (map, r) in [
                ("policy_cidrs", cidrs.counts()),
                ("policy", entries.counts()),
            ] {
                if r.added + r.updated + r.deleted > 0 {
                    tracing::info!(
                        map,
                        added = r.added,
                        updated = r.updated,
                        deleted = r.deleted,
                        "map converged"
                    );
                }
            }
            let converged = cidrs.is_converged() && entries.is_converged();
            let mut realized = BTreeMap::new();
            if converged {
                for (key, endpoint_id, identity, _) in &subjects {
                    let Some(policy) = used_for_task.get(key) else {
                        continue;
                    };
                    // Reported only for the endpoint's own identity's policy.
                    if i64::from(*identity) == policy.spec.identity
                        && wanted.revisions.contains_key(endpoint_id)
                    {
                        realized.insert(key.clone(), policy.spec.revision);
                    }
                }
            }
            let (entries_len, endpoints) = (wanted.entries.len(), wanted.states.len());
            let applied = if converged && !skipped {
                Some(Arc::new(wanted))
            } else if skipped {
                last
            } else {
                None
            };
            Ok::<_, String>(PolicyOutcome {
                cidrs,
                policy: entries,
                realized,
                used: BTreeMap::new(),
                entries: entries_len,
                endpoints,
                applied,
            })
        })
        .await
        .map_err(|e| e.to_string())??;
        match outcome.applied.take() {
            // Skipped: the clock of the last real convergence keeps running.
            Some(applied)
                if self
                    .policy_applied
                    .as_ref()
                    .is_some_and(|(a, _)| Arc::ptr_eq(a, &applied)) => {}
            Some(applied) => self.policy_applied = Some((applied, Instant::now())),
            None => self.policy_applied = None,
        }
        self.metrics
            .policy_endpoints
            .set(i64::try_from(outcome.endpoints).unwrap_or(i64::MAX));
        // Local endpoints whose identity's current ResolvedPolicy revision is not in yet.
        let unrealized = desired
            .local
            .iter()
            .filter(|ep| {
                self.rp_store
                    .get(&ObjectRef::new(&ep.identity.to_string()))
                    .is_some_and(|p| outcome.realized.get(&ep.key) != Some(&p.spec.revision))
            })
            .count();
        self.metrics.set_unrealized("ResolvedPolicy", unrealized);
        if outcome.failures().next().is_none() {
            self.held_policies = used.clone();
        } else {
            // Keep what was held, add what is new: a failed pass proves nothing was removed.
            for (key, policy) in &used {
                self.held_policies.insert(key.clone(), policy.clone());
            }
            let local: BTreeSet<&EndpointRef> = desired.local.iter().map(|e| &e.key).collect();
            self.held_policies.retain(|key, _| local.contains(key));
        }
        outcome.used = used;
        Ok(outcome)
    }

    /// `tendril_policy_implementation_delay_seconds`, once per (identity, revision) newly
    /// realized on this node. A revision some endpoint already reported before this process
    /// started is not observed again (its delay is unknown, not the agent's uptime).
    fn observe_policy_delay(&mut self, desired: &Desired, outcome: &PolicyOutcome) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut current = BTreeSet::new();
        for ep in &desired.local {
            let Some(revision) = outcome.realized.get(&ep.key).copied() else {
                continue;
            };
            let id = (ep.identity, revision);
            current.insert(id);
            if !self.delay_observed.insert(id) {
                continue;
            }
            let reported_before = desired.local.iter().any(|other| {
                other.identity == ep.identity
                    && self
                        .ep_store
                        .get(&ObjectRef::new(&other.key.name).within(&other.key.namespace))
                        .and_then(|e| e.status.as_ref().and_then(|s| s.realized_policy_revision))
                        == Some(revision)
            });
            if reported_before {
                continue;
            }
            if let Some(delay) = outcome
                .used
                .get(&ep.key)
                .and_then(|p| implementation_delay(p, now))
            {
                self.metrics.policy_implementation_delay.observe(delay);
            }
        }
        // Bounded by what is local now.
        self.delay_observed.retain(|id| current.contains(id));
    }

    async fn converge_maps(
        &self,
        desired: &Desired,
        netlink: &NetlinkOutcome,
        prune: bool,
    ) -> Result<MapsOutcome, String> {
        let mut endpoints: BTreeMap<IpAddr, EndpointInfo> = BTreeMap::new();
        for ep in &desired.local {
            for ip in &ep.ips {
                // A pod whose veth is not wired yet is left out (pending), not guessed.
                let Some(w) = netlink.wiring.get(ip) else {
                    continue;
                };
                endpoints.insert(
                    *ip,
                    EndpointInfo {
                        ifindex: w.ifindex,
                        identity: ep.identity,
                        endpoint_id: ep.endpoint_id,
                        flags: 0,
                        mac: w.pod_mac,
                        node_mac: w.host_mac,
                    },
                );
            }
        }
        let ipcache = desired.ipcache.clone();
        let node_config = NodeConfig {
            tunnel_ifindex: netlink.tunnel_ifindex.unwrap_or(0),
            node_ipv4: desired.node_ip.map_or([0; 4], |ip| ip.octets()),
            flags: if netlink.tunnel_ifindex.is_some() {
                NODE_F_TUNNEL
            } else {
                0
            } | if self.cfg.policy.audit_mode {
                NODE_F_POLICY_AUDIT
            } else {
                0
            },
            pad: 0,
        };
        let dataplane = self.dataplane.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let mut dp = dataplane.lock().unwrap_or_else(|p| p.into_inner());
            let endpoints = dp
                .endpoints
                .converge(&endpoints, prune)
                .map_err(|e| e.to_string())?;
            metrics.observe_converge(crate::bpf::maps::ENDPOINTS, &endpoints);
            let ipcache = dp
                .ipcache
                .converge(&ipcache, prune)
                .map_err(|e| e.to_string())?;
            metrics.observe_converge(crate::bpf::maps::IPCACHE, &ipcache);
            let node_config_error = dp
                .node_config
                .set(&node_config)
                .err()
                .map(|e| e.to_string());
            for (map, r) in [
                ("endpoints", endpoints.counts()),
                ("ipcache", ipcache.counts()),
            ] {
                if r.added + r.updated + r.deleted > 0 {
                    tracing::info!(
                        map,
                        added = r.added,
                        updated = r.updated,
                        deleted = r.deleted,
                        stale_kept = r.stale_kept,
                        "map converged"
                    );
                }
            }
            Ok(MapsOutcome {
                endpoints,
                ipcache,
                node_config_error,
            })
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Map fill and the programs' per-reason counters into metrics.
    async fn observe_maps(&self) {
        let (dataplane, metrics) = (self.dataplane.clone(), self.metrics.clone());
        let _ = tokio::task::spawn_blocking(move || {
            let dp = dataplane.lock().unwrap_or_else(|p| p.into_inner());
            match dp.pressure() {
                Ok(p) => metrics.observe_pressure(&p),
                Err(e) => tracing::warn!(error = %e, "reading map pressure"),
            }
            match dp.metrics.samples() {
                Ok(samples) => metrics.observe_samples(&samples),
                Err(e) => tracing::warn!(error = %e, "reading the metrics map"),
            }
        })
        .await;
    }

    /// `NodeNetwork.status.realizedRevision` and `Realized`, when they change.
    async fn report(
        &mut self,
        own: Option<&NodeNetwork>,
        realized: bool,
        reason: &str,
        message: String,
    ) {
        let Some(own) = own else { return };
        let lagging = !realized || self.last_realized != own.metadata.generation;
        self.metrics
            .set_unrealized("NodeNetwork", usize::from(lagging));
        let report = NodeReport {
            uid: own.metadata.uid.clone(),
            realized_revision: self.last_realized,
            condition: DesiredCondition::new(REALIZED, realized, reason, message),
        };
        if self.last_report.as_ref() == Some(&report) {
            return;
        }
        let previous = own
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let condition = conditions::merge(
            conditions::find(&previous, REALIZED),
            &report.condition,
            own.metadata.generation,
            k8s_openapi::jiff::Timestamp::now(),
        );
        let mut status = json!({ "conditions": [condition] });
        if let Some(revision) = report.realized_revision {
            status["realizedRevision"] = json!(revision);
        }
        let body =
            apply_body::<NodeNetwork>(&self.cfg.node_name, None, json!({ "status": status }));
        let api: Api<NodeNetwork> = Api::all(self.client.clone());
        match apply_status(&api, FIELD_MANAGER, &body).await {
            Ok(_) => {
                tracing::info!(realized, reason, revision = ?report.realized_revision, "NodeNetwork status");
                self.last_report = Some(report);
            }
            Err(e) => tracing::warn!(error = %e, "writing NodeNetwork status"),
        }
    }

    /// Writes `Endpoint.status` of local endpoints whose realized state differs from what
    /// the object says: realized → `realizedRevision` + `Realized=True`; a failed map
    /// write → `Realized=False` (the last realized revision is kept). Pending endpoints
    /// (veth not there yet) are not written.
    async fn write_endpoint_statuses(&self, states: &[EndpointState]) {
        let unrealized = states.iter().filter(|s| s.failed || !s.wired).count();
        self.metrics.set_unrealized("Endpoint", unrealized);
        for state in states {
            let (key, revision, wired, failed) =
                (&state.key, &state.revision, &state.wired, &state.failed);
            let Some(current) = self
                .ep_store
                .get(&ObjectRef::new(&key.name).within(&key.namespace))
            else {
                continue;
            };
            let status = current.status.clone().unwrap_or_default();
            let previous = conditions::find(&status.conditions, REALIZED);
            let desired = if *failed {
                DesiredCondition::new(REALIZED, false, "MapWriteFailed", "a BPF map write failed")
            } else if *wired {
                DesiredCondition::new(
                    REALIZED,
                    true,
                    "Realized",
                    format!(
                        "revision {revision} is in the datapath of {}",
                        self.cfg.node_name
                    ),
                )
            } else {
                continue;
            };
            let realized_revision = if desired.status {
                Some(*revision)
            } else {
                status.realized_revision
            };
            // Written only when the policy's entries are in; otherwise the last one stays.
            let realized_policy_revision = state
                .policy_revision
                .filter(|_| desired.status)
                .or(status.realized_policy_revision);
            let up_to_date = status.realized_revision == realized_revision
                && status.realized_policy_revision == realized_policy_revision
                && previous.is_some_and(|c| {
                    c.status
                        == if desired.status {
                            conditions::TRUE
                        } else {
                            conditions::FALSE
                        }
                        && c.reason == desired.reason
                        && c.observed_generation == current.metadata.generation
                });
            if up_to_date {
                continue;
            }
            let condition = conditions::merge(
                previous,
                &desired,
                current.metadata.generation,
                k8s_openapi::jiff::Timestamp::now(),
            );
            let mut fields = json!({ "conditions": [condition] });
            if let Some(revision) = realized_revision {
                fields["realizedRevision"] = json!(revision);
            }
            if let Some(revision) = realized_policy_revision {
                fields["realizedPolicyRevision"] = json!(revision);
            }
            let body = apply_body::<Endpoint>(
                &key.name,
                Some(&key.namespace),
                json!({ "status": fields }),
            );
            let api: Api<Endpoint> = Api::namespaced(self.client.clone(), &key.namespace);
            match apply_status(&api, FIELD_MANAGER, &body).await {
                Ok(_) => tracing::debug!(endpoint = %key, revision, "Endpoint realized"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(endpoint = %key, error = %e, "writing Endpoint status"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::ResolvedPolicySpec;

    #[test]
    fn implementation_delay_runs_from_the_annotation() {
        let mut policy = ResolvedPolicy::new("300", ResolvedPolicySpec::default());
        let now: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:05.750000Z".parse().unwrap();
        assert_eq!(implementation_delay(&policy, now), None);
        policy.metadata.annotations = Some(
            [(
                POLICY_CHANGED_AT.to_string(),
                "2026-01-02T03:04:05.250000Z".to_string(),
            )]
            .into(),
        );
        assert_eq!(implementation_delay(&policy, now), Some(0.5));
        let earlier: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:00Z".parse().unwrap();
        assert_eq!(implementation_delay(&policy, earlier), Some(0.0));
        policy
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(POLICY_CHANGED_AT.into(), "yesterday".into());
        assert_eq!(implementation_delay(&policy, now), None);
    }
}
