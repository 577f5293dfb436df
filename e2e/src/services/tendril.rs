//! Tendril's world for the conformance matrix: the simulated cluster
//! ([`crate::sim::SimCluster`]: operator, one agent per node, pods wired by `tendril-cni`)
//! with the matrix topology, and no kube-proxy anywhere. Services reach the nodes as
//! `LBService`s written by the operator's services concern; each agent reports the highest
//! revision its maps realize in `NodeNetwork.status.realizedServicesRevision`, which is
//! what [`World::wait_programmed`] waits on.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use kube::api::{Api, ListParams};
use tendril_crds::v1alpha1::{LBService, NodeNetwork};

use super::{
    NetnsSet, Spot, World, add_external_client, add_node_default_route, matrix, netns_prefix,
};
use crate::TestEnv;
use crate::sim::{SimCluster, SimClusterConfig, SimPod};

/// How long to wait for LBServices and their realization before probing anyway.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(90);

/// See the module docs. Give it a dedicated plane: the operator writes every NodeNetwork.
pub struct TendrilWorld {
    // Drop order: outside clients, pods, then the cluster (agents, nodes, underlay).
    _externals: NetnsSet,
    external_ns: Vec<String>,
    pods: BTreeMap<String, SimPod>,
    pub cluster: SimCluster,
    client: kube::Client,
    namespace: String,
}

impl TendrilWorld {
    pub async fn conformance(env: &TestEnv) -> Result<TendrilWorld> {
        super::sweep_stale();
        let cluster = SimCluster::start(env, SimClusterConfig::default()).await?;
        let client = env.client();
        let mut pods = BTreeMap::new();
        for (pod, node) in matrix::topology_pods() {
            let sim = SimPod::run(
                &client,
                cluster.nodes[node].handle(),
                env.namespace(),
                pod,
                &matrix::pod_labels(pod),
            )
            .await?;
            pods.insert(pod.to_string(), sim);
        }
        for node in &cluster.nodes {
            add_node_default_route(&node.netns).await?;
        }
        let prefix = netns_prefix();
        let mut externals = NetnsSet::default();
        let mut external_ns = Vec::new();
        for i in 0..2u8 {
            let name = format!("{prefix}-x{i}");
            add_external_client(
                &mut externals,
                &cluster.underlay.netns,
                &name,
                i,
                cluster.nodes[i as usize].address,
            )
            .await?;
            external_ns.push(name);
        }
        Ok(TendrilWorld {
            _externals: externals,
            external_ns,
            pods,
            cluster,
            client,
            namespace: env.namespace().to_string(),
        })
    }
}

impl World for TendrilWorld {
    fn name(&self) -> String {
        "tendril".into()
    }
    fn kube(&self) -> kube::Client {
        self.client.clone()
    }
    fn namespace(&self) -> String {
        self.namespace.clone()
    }
    fn node_address(&self, i: usize) -> Ipv4Addr {
        self.cluster.nodes[i].address
    }
    fn pod_spot(&self, pod: &str) -> Spot {
        let p = &self.pods[pod];
        let node = self
            .cluster
            .nodes
            .iter()
            .position(|n| n.name == p.node)
            .unwrap_or(0);
        let mut spot = Spot::new(format!("pod@n{node}"), &p.sandbox.netns);
        spot.cgroup = node_cgroup(&p.node);
        spot
    }
    fn host_spot(&self, i: usize) -> Spot {
        let node = &self.cluster.nodes[i];
        let mut spot = Spot::new(format!("host@n{i}"), &node.netns);
        spot.cgroup = node_cgroup(&node.name);
        spot
    }
    fn external_spot(&self, i: usize) -> Spot {
        Spot::new(format!("ext@n{i}"), &self.external_ns[i])
    }
    fn address_owners(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("n{i}"), n.netns.clone()))
            .collect();
        out.extend(
            self.pods
                .iter()
                .map(|(name, p)| (name.clone(), p.sandbox.netns.clone())),
        );
        out.extend(
            self.external_ns
                .iter()
                .enumerate()
                .map(|(i, ns)| (format!("x{i}"), ns.clone())),
        );
        out
    }
    async fn wait_programmed(&self) -> Result<()> {
        wait_services_realized(&self.client, &self.namespace, None, PROGRAMMED_TIMEOUT)
            .await
            .map(|_| ())
    }
}

/// The node's cgroup v2 directory, `<cgroup2 mount>/tendril-sim/<node>`, if the simulation
/// made one: socket-level load balancing hooks cgroups, so a client process of the node or
/// its pods must run there (the probe joins it before opening a socket). Without one (no
/// socket LB in the sim) clients run where the test runs.
fn node_cgroup(node: &str) -> Option<PathBuf> {
    let dir = crate::sim::sim_cgroup_root()?.join(node);
    dir.is_dir().then_some(dir)
}

/// Waits until every node's `NodeNetwork.status.realizedServicesRevision` is at least the
/// highest `spec.revision` of the LBServices in `namespace` once there is one per Service
/// there (with `backends_each`, one carrying that many backends); returns that revision. Fails with what was seen when it does not happen in
/// `timeout`. Counting is by metadata-only lists every 500 ms (cheap at 10k objects); the
/// revision wait polls only the NodeNetworks.
pub async fn wait_services_realized(
    client: &kube::Client,
    namespace: &str,
    backends_each: Option<usize>,
    timeout: Duration,
) -> Result<i64> {
    let lbs: Api<LBService> = Api::namespaced(client.clone(), namespace);
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), namespace);
    let start = std::time::Instant::now();
    let lp = ListParams::default();
    loop {
        let want = services.list_metadata(&lp).await?.items.len();
        // With `backends_each`, an LBService counts once it carries them: the operator
        // writes a Service's LBService before its EndpointSlice arrives, without backends.
        let mut have = lbs.list_metadata(&lp).await?.items.len();
        if let Some(n) = backends_each.filter(|_| want > 0 && have >= want) {
            have = lbs
                .list(&lp)
                .await?
                .items
                .iter()
                .filter(|l| l.spec.backends.len() == n)
                .count();
        }
        if want > 0 && have >= want {
            break;
        }
        if start.elapsed() > timeout {
            bail!(
                "services not realized within {timeout:?}: {have} LBServices for {want} Services"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let max = lbs
        .list(&lp)
        .await?
        .items
        .iter()
        .map(|l| l.spec.revision)
        .max()
        .unwrap_or(0);
    wait_revision_realized(client, max, timeout.saturating_sub(start.elapsed())).await?;
    Ok(max)
}

/// Waits until every node's `NodeNetwork.status.realizedServicesRevision` is at least
/// `revision` (revisions are one cluster-wide sequence, so that node realizes every
/// LBService change up to it).
pub async fn wait_revision_realized(
    client: &kube::Client,
    revision: i64,
    timeout: Duration,
) -> Result<()> {
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let start = std::time::Instant::now();
    loop {
        let realized: Vec<(String, Option<i64>)> = networks
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .map(|n| {
                (
                    kube::ResourceExt::name_any(n),
                    n.status.as_ref().and_then(|s| s.realized_services_revision),
                )
            })
            .collect();
        if !realized.is_empty()
            && realized
                .iter()
                .all(|(_, r)| r.is_some_and(|r| r >= revision))
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "LBService revision {revision} not realized on every node within {timeout:?}: \
                 nodes realize {realized:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
