//! Keeps the agent in step with the cluster: its `NodeNetwork` (pod CIDRs) and the
//! `Endpoint`s of its node (allocation reconcile), and reports `NodeNetwork.status`
//! (the `Ready` condition, `agentVersion`, `addresses`) by server-side apply under the
//! field manager `tendril-agent`. Conditions are a list-map keyed by `type`, so the
//! nodes concern's own condition types are left alone.

use super::driver::{self, LoopTiming, NodeLoop, PassOutcome};
use super::view::{ClusterView, Wake, wake_on};
use super::{Agent, host};
use crate::cni::link;
use crate::ipam::LiveEndpoints;
use futures::TryStreamExt;
use ipnet::IpNet;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tendril_crds::common::NodeAddress;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_runtime::conditions::{self, DesiredCondition};
use tendril_runtime::{Health, apply_body, apply_status};
use tokio_util::sync::CancellationToken;

pub const FIELD_MANAGER: &str = "tendril-agent";
/// The readiness check this module registers with the harness.
pub const HEALTH_CHECK: &str = "node-network";

#[derive(Clone, Debug)]
pub struct NodeSyncConfig {
    pub node_name: String,
    /// An allocation without a live Endpoint is released only once it is this old, so an
    /// ADD whose Endpoint does not exist yet keeps its address.
    pub leak_grace: Duration,
    /// The node's network namespace when the agent runs outside it (simulated nodes).
    pub node_netns: Option<PathBuf>,
}

/// What the agent wants `NodeNetwork.status` to say.
#[derive(Clone, Debug, PartialEq)]
struct Report {
    /// The object and generation it is about: a recreated or changed NodeNetwork gets its
    /// status written again even if the condition reads the same.
    uid: Option<String>,
    generation: Option<i64>,
    ready: DesiredCondition,
    addresses: Vec<NodeAddress>,
}

/// The node sync's loop state.
struct NodeSync<'a> {
    client: Client,
    agent: &'a Arc<Agent>,
    cfg: &'a NodeSyncConfig,
    view: &'a ClusterView,
    health: &'a Health,
    endpoints_synced: Arc<AtomicBool>,
    /// The first reconcile after start restores records of live Endpoints; see
    /// `Ipam::reconcile`.
    restore: bool,
    last: Option<Report>,
}

impl NodeLoop for NodeSync<'_> {
    async fn pass(&mut self) -> PassOutcome {
        let (report, outcome) = sync_once(
            self.agent,
            self.cfg,
            self.view,
            self.endpoints_synced.load(Ordering::SeqCst),
            &mut self.restore,
        )
        .await;
        self.health.set_ready(HEALTH_CHECK, self.agent.is_ready());
        if let Some(report) = report
            && self.last.as_ref() != Some(&report)
        {
            let api: Api<NodeNetwork> = Api::all(self.client.clone());
            match write_status(
                &api,
                &self.view.node_networks.store(),
                &self.cfg.node_name,
                &report,
            )
            .await
            {
                Ok(()) => self.last = Some(report),
                Err(e) => {
                    tracing::warn!(error = %e, "writing NodeNetwork status");
                    return PassOutcome::Failed;
                }
            }
        }
        outcome
    }
}

/// Runs until `shutdown`: on every change of this node's `NodeNetwork`, once the node's
/// Endpoints are listed, every `timing.resync`, and after a failure with `timing.backoff`.
pub async fn run(
    client: Client,
    view: ClusterView,
    agent: Arc<Agent>,
    health: Health,
    cfg: NodeSyncConfig,
    timing: LoopTiming,
    shutdown: CancellationToken,
) {
    health.register(HEALTH_CHECK);
    let wake = Wake::default();
    let own = cfg.node_name.clone();
    wake_on(&view.node_networks, &wake, move |nn| {
        nn.metadata.name.as_deref() == Some(own.as_str())
    });
    let endpoints_synced = Arc::new(AtomicBool::new(false));
    let ep_ready = {
        let (store, synced, wake) = (
            view.endpoints.store(),
            endpoints_synced.clone(),
            wake.clone(),
        );
        async move {
            if tendril_runtime::store_ready(&store).await {
                synced.store(true, Ordering::SeqCst);
                wake.touch();
            }
            std::future::pending::<()>().await
        }
    };
    let mut sync = NodeSync {
        client,
        agent: &agent,
        cfg: &cfg,
        view: &view,
        health: &health,
        endpoints_synced,
        restore: true,
        last: None,
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = ep_ready => {}
        _ = driver::drive(&wake, &timing, &mut sync) => {}
    }
    health.remove(HEALTH_CHECK);
}

fn parse_cidrs(raw: &[String]) -> Result<Vec<IpNet>, String> {
    raw.iter()
        .map(|c| c.parse::<IpNet>().map_err(|e| format!("{c:?}: {e}")))
        .collect()
}

/// One pass: pod CIDRs → allocator and gateway device, Endpoints → allocation reconcile.
/// Returns the status to report (`None` while the NodeNetwork does not exist) and whether
/// the pass converged, waits for something else, or failed.
async fn sync_once(
    agent: &Arc<Agent>,
    cfg: &NodeSyncConfig,
    view: &ClusterView,
    endpoints_synced: bool,
    restore: &mut bool,
) -> (Option<Report>, PassOutcome) {
    let Some(network) = view
        .node_networks
        .store()
        .get(&ObjectRef::new(&cfg.node_name))
    else {
        agent.set_ready(false);
        return (None, PassOutcome::Waiting);
    };
    let addresses = underlay_addresses(&network, cfg.node_netns.clone()).await;
    let not_ready = |reason: &str, message: String| {
        agent.set_ready(false);
        // Waiting on another concern (pod CIDRs) or the first list is not a failure.
        let outcome = match reason {
            "NoPodCIDR" | "Reconciling" => PassOutcome::Waiting,
            _ => PassOutcome::Failed,
        };
        let report = Some(Report {
            uid: network.metadata.uid.clone(),
            generation: network.metadata.generation,
            ready: DesiredCondition::new(
                tendril_crds::common::conditions::READY,
                false,
                reason,
                message,
            ),
            addresses: addresses.clone(),
        });
        (report, outcome)
    };
    let cidrs = match parse_cidrs(&network.spec.pod_cidrs) {
        Ok(cidrs) if cidrs.is_empty() => {
            return not_ready(
                "NoPodCIDR",
                "waiting for the IP pools concern to assign pod CIDRs".into(),
            );
        }
        Ok(cidrs) => cidrs,
        Err(e) => return not_ready("InvalidPodCIDR", e),
    };
    if let Err(e) = agent.set_pod_cidrs(&cidrs) {
        return not_ready("InvalidPodCIDR", e.to_string());
    }
    let (gateways, netns) = (agent.gateways(), cfg.node_netns.clone());
    match tokio::task::spawn_blocking(move || host::ensure_gateways(netns.as_deref(), gateways))
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return not_ready("HostSetupFailed", e.to_string()),
        Err(e) => return not_ready("HostSetupFailed", e.to_string()),
    }
    if !endpoints_synced {
        return not_ready("Reconciling", "waiting for the node's Endpoints".into());
    }
    let live = LiveEndpoints {
        endpoints: view
            .endpoints
            .store()
            .state()
            .iter()
            .filter(|ep| ep.spec.node == cfg.node_name)
            .map(|ep| {
                let ips = ep
                    .spec
                    .ips
                    .iter()
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
                    .collect();
                (ep.namespace().unwrap_or_default(), ep.name_any(), ips)
            })
            .collect(),
    };
    let (grace, first) = (cfg.leak_grace.as_secs(), *restore);
    let mut live = live;
    if first {
        // Restore only what a pod sandbox still uses: an Endpoint can outlive its pod's
        // DEL until the garbage collector removes it, and restoring its address then would
        // pin it for the leak grace period.
        let netns = cfg.node_netns.clone();
        match tokio::task::spawn_blocking(move || {
            crate::cni::link::wired_pod_addresses(netns.as_deref())
        })
        .await
        {
            Ok(Ok(wired)) => {
                for (_, _, ips) in &mut live.endpoints {
                    ips.retain(|ip| wired.contains(ip));
                }
            }
            Ok(Err(e)) => return not_ready("ReconcileFailed", e.to_string()),
            Err(e) => return not_ready("ReconcileFailed", e.to_string()),
        }
    }
    let reconcile_agent = agent.clone();
    match tokio::task::spawn_blocking(move || reconcile_agent.reconcile(&live, grace, first)).await
    {
        Ok(Ok(report)) => {
            *restore = false;
            for ip in &report.restored {
                tracing::warn!(%ip, "restored the allocation of a live Endpoint that had no record");
            }
            for allocation in &report.released {
                tracing::info!(container_id = %allocation.container_id, ips = ?allocation.ips, "released a leaked allocation");
                agent.metrics.leaks_released.inc();
            }
        }
        Ok(Err(e)) => return not_ready("ReconcileFailed", e.to_string()),
        Err(e) => return not_ready("ReconcileFailed", e.to_string()),
    }
    agent.set_ready(true);
    let cidr_list = cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let report = Report {
        uid: network.metadata.uid.clone(),
        generation: network.metadata.generation,
        ready: DesiredCondition::new(
            tendril_crds::common::conditions::READY,
            true,
            "Ready",
            format!("serving pod addresses from {cidr_list}"),
        ),
        addresses,
    };
    (Some(report), PassOutcome::Converged)
}

/// The node's `InternalIP`s (from the spec) that are configured on this host: the
/// underlay addresses the agent actually uses.
async fn underlay_addresses(network: &NodeNetwork, netns: Option<PathBuf>) -> Vec<NodeAddress> {
    let wanted: Vec<NodeAddress> = network
        .spec
        .addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .cloned()
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let local = tokio::task::spawn_blocking(move || {
        link::run_in(netns.as_deref(), |handle| async move {
            let messages: Vec<_> = handle
                .address()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|source| link::LinkError::Netlink {
                    context: "listing addresses".into(),
                    source,
                })?;
            Ok(messages
                .into_iter()
                .flat_map(|m| m.attributes)
                .filter_map(|a| match a {
                    rtnetlink::packet_route::address::AddressAttribute::Address(ip) => Some(ip),
                    _ => None,
                })
                .collect::<HashSet<IpAddr>>())
        })
    })
    .await;
    match local {
        Ok(Ok(local)) => wanted
            .into_iter()
            .filter(|a| a.address.parse().is_ok_and(|ip| local.contains(&ip)))
            .collect(),
        _ => Vec::new(),
    }
}

async fn write_status(
    api: &Api<NodeNetwork>,
    store: &Store<NodeNetwork>,
    node_name: &str,
    report: &Report,
) -> Result<(), kube::Error> {
    let current = store.get(&ObjectRef::new(node_name));
    let previous = current
        .as_ref()
        .and_then(|nn| nn.status.as_ref())
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = current.as_ref().and_then(|nn| nn.metadata.generation);
    let condition = conditions::merge(
        conditions::find(&previous, &report.ready.type_),
        &report.ready,
        generation,
        k8s_openapi::jiff::Timestamp::now(),
    );
    let body = apply_body::<NodeNetwork>(
        node_name,
        None,
        json!({
            "status": {
                "conditions": [condition],
                "agentVersion": env!("CARGO_PKG_VERSION"),
                "addresses": report.addresses,
            }
        }),
    );
    apply_status(api, FIELD_MANAGER, &body).await.map(|_| ())
}
