//! The node pass: the agent's view of the cluster → desired state → diff against the kernel.
//!
//! - Input: the agent's one set of caches ([`ClusterView`]): every `NodeNetwork` (remote pod
//!   CIDRs and node addresses → routes, ipcache), every `Endpoint` (local ones → `endpoints`
//!   map and attached programs, all → ipcache), every `ResolvedPolicy` (the local endpoints'
//!   identities' ones → policy maps), every `Identity` (a change triggers a pass) and the
//!   `kubernetes` Service's `EndpointSlice` (the kube-apiserver's addresses → ipcache).
//!   [`index::desired`] turns a snapshot into the desired state of the node.
//! - A pass runs the [`steps`] in order, each `desired → apply → report` into the [`Pass`]:
//!   routing (netlink: VXLAN device, ip_forward, routes, host veths), the policy maps (so a
//!   pod's policy is in before its `endpoints` entry and programs), the endpoint maps
//!   (`endpoints`, `ipcache`, `node_config`), the programs (last: a pod's entry is in the
//!   map before its programs can see it). Then [`report`] writes what the pass achieved:
//!   the `Realized` condition is a pure function of the pass's report.
//! - Nothing is converged before every watch has completed its initial list, so a restarting
//!   agent never removes (prunes) what is still valid nor writes from a partial view; maps
//!   and programs stay pinned and attached while it is down, so traffic keeps flowing.
//! - Passes run on every change (debounced), periodically (resync) and, after a failure,
//!   with the configured backoff ([`crate::agent::driver`]). A full map is an error:
//!   `tendril_bpf_map_operations_total{outcome="full"}`, `Realized=False` with reason
//!   `MapFull`, and an error log.
//! - Status, by server-side apply under its own field manager `tendril-agent-datapath` (the
//!   node sync owns the rest of `NodeNetwork.status` as `tendril-agent`):
//!   `NodeNetwork.status.realizedRevision` (the generation realized) and condition
//!   `Realized`; on each local `Endpoint`, `status.realizedRevision` (its `spec.revision`)
//!   and `Realized` once its addresses are in the map and its veth has the programs, and
//!   `status.realizedPolicyRevision`: the revision of its identity's `ResolvedPolicy` whose
//!   entries are in the maps.
//! - Beside the passes: the `events` ring buffer is read into metrics and the flow log
//!   ([`events`]), conntrack is garbage-collected, and map fill is sampled periodically.
//!
//! A new concern on the node is one module implementing [`Step`] and one line in [`steps`].

pub mod egress;
pub mod endpoint_maps;
pub mod events;
pub mod index;
pub mod kernel;
pub mod metrics;
pub mod policy;
pub mod policy_maps;
pub mod programs;
pub mod report;
pub mod routing;
pub mod services;

use super::driver::{self, LoopTiming, NodeLoop, PassOutcome};
use super::view::{ClusterView, Wake};
use crate::bpf::{AnyKey, Dataplane, DataplaneError, LoadError, MapSizes, Programs, Report};
use crate::config::{PolicyEnforcementConfig, RoutingMode, ServicesConfig};
use futures::future::BoxFuture;
use index::Desired;
use kernel::{AttachOutcome, Attacher, NetlinkOutcome};
use kube::Client;
use kube::runtime::reflector::ObjectRef;
use metrics::DatapathMetrics;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tendril_runtime::Health;
use tokio_util::sync::CancellationToken;

pub use policy_maps::{PolicyRealization, implementation_delay, realize_policy};
pub use tendril_crds::facts::annotations::POLICY_CHANGED_AT;

pub const FIELD_MANAGER: &str = "tendril-agent-datapath";
/// The readiness check this module registers with the harness.
pub const HEALTH_CHECK: &str = "datapath";
/// How often the programs' counters and the maps' fill are read into metrics.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// The steps of a pass, in order. Each sees what the earlier ones did ([`Pass`]).
pub fn steps() -> Vec<Box<dyn AnyStep>> {
    vec![
        Box::new(routing::Routing),
        // Before the endpoint maps: a new pod is never reachable before its policy is in.
        Box::new(policy_maps::PolicyMaps::default()),
        Box::new(endpoint_maps::EndpointMaps),
        // After the endpoint maps (the socket LB reads the ipcache for NodePorts on node
        // addresses); the Maglev table builder plugs in here once merged.
        Box::new(services::Services::new(Some(
            crate::services::maglev::lookup_table,
        ))),
        // After the endpoint maps and services: the egress maps read the node's address
        // and exempt every service frontend.
        Box::new(egress::Egress::default()),
        // Last: a pod's entry is in the maps before its programs can see it.
        Box::new(programs::AttachPrograms),
    ]
}

/// One concern's share of a pass: reads the desired state (and what earlier steps did)
/// from `pass`, converges its part of the kernel, and records the outcome in `pass`.
/// An `Err` ends the pass: nothing after it runs and the node reports the failure.
pub trait Step: Send {
    /// For logs.
    const NAME: &'static str;

    fn run(
        &mut self,
        node: &NodeContext,
        pass: &mut Pass,
    ) -> impl Future<Output = Result<(), StepFailure>> + Send;
}

/// A [`Step`] behind a pointer, so the pass can hold a list of different steps.
pub trait AnyStep: Send {
    fn name(&self) -> &'static str;

    fn run<'a>(
        &'a mut self,
        node: &'a NodeContext,
        pass: &'a mut Pass,
    ) -> BoxFuture<'a, Result<(), StepFailure>>;
}

impl<S: Step> AnyStep for S {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn run<'a>(
        &'a mut self,
        node: &'a NodeContext,
        pass: &'a mut Pass,
    ) -> BoxFuture<'a, Result<(), StepFailure>> {
        Box::pin(Step::run(self, node, pass))
    }
}

/// A step that could not run at all: the `Realized=False` reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFailure {
    pub reason: &'static str,
    pub message: String,
}

impl StepFailure {
    pub fn new(reason: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            reason,
            message: message.to_string(),
        }
    }
}

/// Which part of the node a converged map belongs to (the `Realized` condition reports
/// policy maps separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapGroup {
    Forwarding,
    Policy,
    Services,
}

/// One map a step converged.
#[derive(Debug)]
pub struct MapOutcome {
    pub map: &'static str,
    pub group: MapGroup,
    pub report: Report<AnyKey>,
}

/// What one pass knows: the desired state, then what each step did.
#[derive(Debug, Default)]
pub struct Pass {
    pub desired: Desired,
    /// Set by the routing step.
    pub netlink: NetlinkOutcome,
    /// Set by the programs step.
    pub attached: AttachOutcome,
    /// Every map converged in this pass.
    pub maps: Vec<MapOutcome>,
    /// `node_config` could not be written.
    pub node_config_error: Option<String>,
    /// Local endpoint → the `ResolvedPolicy` revision of its identity now in the maps.
    pub policy_realized: std::collections::BTreeMap<index::EndpointRef, i64>,
    /// Set by the services step.
    pub services: services::ServicesOutcome,
}

/// What every step of this node's passes shares.
pub struct NodeContext {
    pub client: Client,
    pub cfg: PassConfig,
    pub metrics: DatapathMetrics,
    pub view: ClusterView,
    pub dataplane: Arc<Mutex<Dataplane>>,
    pub attacher: Arc<Mutex<Attacher>>,
    /// The network namespaces of the node's pods (recorded by the CNI plugin's ADD).
    pub pod_netns: PodNetns,
}

/// Where the pass learns the node's pods' network namespace paths.
pub type PodNetns = Arc<dyn Fn() -> Vec<PathBuf> + Send + Sync>;

/// What the pass shares with the rest of the agent: the flow log it feeds (`/flows`) and
/// the pods' network namespaces the CNI server recorded (socket LB).
pub struct AgentLinks {
    pub flows: events::FlowLog,
    /// Where datapath events go to become Hubble flows (`crate::flows`), if enabled.
    pub hubble: Option<crate::flows::pipeline::FlowSink>,
    pub pod_netns: PodNetns,
}

impl NodeContext {
    /// Runs `f` on the dataplane in a blocking task (map syscalls block).
    pub async fn with_dataplane<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Dataplane) -> T + Send + 'static,
    ) -> Result<T, StepFailure> {
        let dataplane = self.dataplane.clone();
        tokio::task::spawn_blocking(move || {
            let mut dp = dataplane.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut dp)
        })
        .await
        .map_err(|e| StepFailure::new("MapReadFailed", e))
    }
}

#[derive(Clone, Debug)]
pub struct PassConfig {
    pub node_name: String,
    /// The node's network namespace when the agent runs outside it (simulated nodes).
    pub node_netns: Option<PathBuf>,
    /// The node's bpffs pin directory (maps, and `links/`).
    pub pin_dir: PathBuf,
    pub routing_mode: RoutingMode,
    pub tunnel_device: String,
    pub tunnel_port: u16,
    pub map_sizes: MapSizes,
    pub timing: LoopTiming,
    /// `policy` in agent.yaml.
    pub policy: PolicyEnforcementConfig,
    /// `services` in agent.yaml.
    pub services: ServicesConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] LoadError),
    #[error("opening the pinned maps: {0}")]
    Maps(#[from] DataplaneError),
    #[error("loader task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Loads the programs (reusing pinned maps and links), then runs passes until `shutdown`;
/// the datapath's flow events go to `flows`.
pub async fn run(
    client: Client,
    view: ClusterView,
    metrics: DatapathMetrics,
    health: Health,
    cfg: PassConfig,
    agent: AgentLinks,
    shutdown: CancellationToken,
) -> Result<(), PassError> {
    let AgentLinks {
        flows,
        hubble,
        pod_netns,
    } = agent;
    health.register(HEALTH_CHECK);
    let (dir, sizes) = (cfg.pin_dir.clone(), cfg.map_sizes);
    let (programs, dataplane) = tokio::task::spawn_blocking(move || {
        let programs = Programs::load(&dir, &sizes)?;
        let dataplane = Dataplane::open(&dir)?;
        Ok::<_, PassError>((programs, dataplane))
    })
    .await??;
    tracing::info!(pin_dir = %cfg.pin_dir.display(), mode = ?cfg.routing_mode, "eBPF programs loaded");

    let wake = Wake::default();
    view.wake_on_any_change(&wake);
    let synced = Arc::new(AtomicBool::new(false));
    let initial_lists = {
        let (view, synced, wake) = (view.clone(), synced.clone(), wake.clone());
        async move {
            view.synced().await;
            synced.store(true, Ordering::SeqCst);
            wake.touch();
            std::future::pending::<()>().await
        }
    };

    let dataplane = Arc::new(Mutex::new(dataplane));
    let event_reader = {
        let reader = events::run(
            dataplane.clone(),
            metrics.clone(),
            flows,
            hubble,
            cfg.policy.events.denied_log_per_second,
            shutdown.clone(),
        );
        // Without events the datapath still enforces: the passes go on.
        async move {
            reader.await;
            std::future::pending::<()>().await
        }
    };
    let conntrack_gc = events::conntrack_gc(
        dataplane.clone(),
        metrics.clone(),
        Duration::from_secs(cfg.policy.conntrack_gc_seconds),
        shutdown.clone(),
    );
    let timing = cfg.timing.clone();
    let node = NodeContext {
        client,
        cfg,
        metrics,
        view,
        dataplane,
        attacher: Arc::new(Mutex::new(Attacher::new(programs))),
        pod_netns,
    };
    let map_sampler = async {
        let mut tick = tokio::time::interval(METRICS_INTERVAL);
        let mut egress_nat = egress::NatWatch::default();
        loop {
            tick.tick().await;
            report::observe_maps(&node).await;
            egress_nat.observe(&node).await;
        }
    };
    let mut passes = NodePass {
        node: &node,
        steps: steps(),
        synced,
        health: health.clone(),
        report: report::Reporter::default(),
        maps_observed: None,
        maps_read: None,
        statuses: None,
        statuses_written: Default::default(),
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = initial_lists => {}
        _ = event_reader => {}
        _ = conntrack_gc => {}
        _ = map_sampler => {}
        _ = driver::drive(&wake, &timing, &mut passes) => {}
    }
    health.remove(HEALTH_CHECK);
    Ok(())
}

/// The node's passes: the steps, run in order over one snapshot of the view.
struct NodePass<'a> {
    node: &'a NodeContext,
    steps: Vec<Box<dyn AnyStep>>,
    /// Every initial list completed.
    synced: Arc<AtomicBool>,
    health: Health,
    report: report::Reporter,
    /// When a pass last read the maps' fill into metrics.
    maps_observed: Option<std::time::Instant>,
    /// When the converged maps were last read back from the kernel (see
    /// [`Dataplane::forget_known`]): once per resync period and after a failed pass.
    maps_read: Option<std::time::Instant>,
    /// The last pass's Endpoint status writes, if still running.
    statuses: Option<tokio::task::JoinHandle<()>>,
    statuses_written: report::WrittenStatuses,
}

impl Drop for NodePass<'_> {
    fn drop(&mut self) {
        if let Some(statuses) = self.statuses.take() {
            statuses.abort();
        }
    }
}

/// A pass reads the maps' fill at most this often.
const MAPS_OBSERVED_IN_PASS: Duration = Duration::from_secs(1);

impl NodeLoop for NodePass<'_> {
    async fn pass(&mut self) -> PassOutcome {
        let outcome = self.run_pass().await;
        self.health
            .set_ready(HEALTH_CHECK, outcome == PassOutcome::Converged);
        outcome
    }

    fn realized(&mut self, delay: Duration) {
        self.node
            .metrics
            .realize_seconds
            .observe(delay.as_secs_f64());
    }

    fn due(&self) -> Option<tokio::time::Instant> {
        self.report.deferred_until()
    }
}

impl NodePass<'_> {
    #[tracing::instrument(skip(self), fields(node = %self.node.cfg.node_name))]
    async fn run_pass(&mut self) -> PassOutcome {
        if !self.synced.load(Ordering::SeqCst) {
            // A partial view (e.g. NodeNetworks listed, Endpoints not yet) would write a
            // node config without the node's address, or nothing but stale-kept entries:
            // the kernel keeps what the last run left until the view is complete.
            return PassOutcome::Waiting;
        }
        let node = self.node;
        if self
            .maps_read
            .is_none_or(|at| at.elapsed() >= node.cfg.timing.resync)
            && node.with_dataplane(Dataplane::forget_known).await.is_ok()
        {
            self.maps_read = Some(std::time::Instant::now());
        }
        let view = &node.view;
        let desired = index::desired(
            &node.cfg.node_name,
            node.cfg.routing_mode,
            view.node_networks.store().state().iter().map(AsRef::as_ref),
            view.endpoints.store().state().iter().map(AsRef::as_ref),
            view.apiserver.store().state().iter().map(AsRef::as_ref),
        );
        let own = view
            .node_networks
            .store()
            .get(&ObjectRef::new(&node.cfg.node_name));
        let mut pass = Pass {
            desired,
            ..Pass::default()
        };
        let pass_started = std::time::Instant::now();
        let mut took: Vec<(&'static str, f64)> = Vec::with_capacity(self.steps.len() + 2);
        for step in &mut self.steps {
            let step_started = std::time::Instant::now();
            let result = step.run(node, &mut pass).await;
            took.push((step.name(), step_started.elapsed().as_secs_f64() * 1e3));
            if let Err(failure) = result {
                tracing::warn!(step = step.name(), reason = failure.reason, error = %failure.message, "pass failed");
                self.maps_read = None;
                self.report
                    .node_status(node, own.as_deref(), &pass, Some(failure))
                    .await;
                return PassOutcome::Failed;
            }
        }
        // The Endpoint statuses are written while the next pass may already converge the
        // maps (a burst of policy changes is not held up by the API's round trips), each
        // pass's writes after the previous pass's.
        let states = report::endpoint_states(&pass);
        let writer = report::EndpointStatusWriter::of(node, &self.statuses_written);
        let previous = self.statuses.take();
        self.statuses = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            writer.write(&states).await;
        }));
        let t = std::time::Instant::now();
        let realized = self
            .report
            .node_status(node, own.as_deref(), &pass, None)
            .await;
        took.push(("node status", t.elapsed().as_secs_f64() * 1e3));
        // After the statuses, at most once a second: reading every map's fill costs a read
        // of each entry (tens of ms at 10,000 rules), and the sampler reads it every 5 s.
        if self
            .maps_observed
            .is_none_or(|at| at.elapsed() >= MAPS_OBSERVED_IN_PASS)
        {
            let t = std::time::Instant::now();
            report::observe_maps(node).await;
            self.maps_observed = Some(std::time::Instant::now());
            took.push(("observe maps", t.elapsed().as_secs_f64() * 1e3));
        }
        tracing::debug!(
            total_ms = pass_started.elapsed().as_secs_f64() * 1e3,
            steps = ?took,
            "pass timing"
        );
        if realized {
            PassOutcome::Converged
        } else {
            self.maps_read = None;
            PassOutcome::Failed
        }
    }
}
