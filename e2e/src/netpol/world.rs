//! The topology of Kubernetes' own netpol e2e on simulated nodes: namespaces x, y, z
//! (unique-suffixed names, labelled `ns=x` …), pods a, b, c in each (labelled `pod=a` …),
//! spread over three nodes so that pairs are both same-node and cross-node, each serving
//! TCP and UDP on ports 80 and 81 (named container ports `serve-80-tcp`, `serve-81-tcp`,
//! `serve-80-udp`, `serve-81-udp`).
//!
//! [`World::wait_policy`] waits (polling, never sleeping as synchronization) until every
//! pod's Endpoint reports `status.realizedPolicyRevision` equal to its identity's
//! `ResolvedPolicy.spec.revision` and that ResolvedPolicy's `sources` are exactly the
//! policies the model says select the pod.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tendril_crds::v1alpha1::{
    ClusterNetworkPolicy, Endpoint, NetworkPolicy, NodeNetwork, ResolvedPolicy,
};

use super::model::{self, NamedPort, Protocol, SourceKind, SourceRef};
use super::probe::{self, PortProto, Servers};
use crate::TestEnv;
use crate::sim::{SimCluster, SimClusterConfig, SimPod};

/// Namespace and pod letters of the upstream topology.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// Ports every pod serves, TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];

const WAIT: Duration = Duration::from_secs(120);

/// The named container port of `port`/`protocol`.
pub fn port_name(port: u16, protocol: Protocol) -> String {
    format!("serve-{port}-{}", protocol.as_str().to_ascii_lowercase())
}

/// A policy object of any of the three kinds.
#[derive(Clone, Debug)]
pub enum PolicyObject {
    Kubernetes(K8sNetworkPolicy),
    Namespaced(NetworkPolicy),
    Cluster(ClusterNetworkPolicy),
}

impl PolicyObject {
    pub fn source(&self) -> SourceRef {
        let (kind, namespace, name) = match self {
            PolicyObject::Kubernetes(p) => (SourceKind::Kubernetes, p.namespace(), p.name_any()),
            PolicyObject::Namespaced(p) => (SourceKind::Namespaced, p.namespace(), p.name_any()),
            PolicyObject::Cluster(p) => (SourceKind::Cluster, None, p.name_any()),
        };
        SourceRef {
            kind,
            namespace,
            name,
        }
    }
}

/// The model's input for a set of policy objects.
pub fn policies(objects: &[PolicyObject]) -> model::Policies {
    let mut out = model::Policies::default();
    for o in objects {
        match o {
            PolicyObject::Kubernetes(p) => out.kubernetes.push(p.clone()),
            PolicyObject::Namespaced(p) => out.namespaced.push(p.clone()),
            PolicyObject::Cluster(p) => out.cluster.push(p.clone()),
        }
    }
    out
}

/// Three nodes, nine pods in three namespaces, servers running.
pub struct World {
    // Field order is drop order: servers, then pods (sandboxes), then nodes and operator.
    _servers: Vec<Servers>,
    pub pods: Vec<SimPod>,
    pub cluster: SimCluster,
    /// Real names of namespaces x, y, z.
    pub namespaces: Vec<String>,
    /// The model's view of the pods (same order as `pods`).
    pub model: model::Cluster,
    /// Each node's pod CIDR (same order as `cluster.nodes`).
    pub node_cidrs: Vec<IpNet>,
    client: Client,
}

impl World {
    /// Starts the nodes (operator and agents) on `env`'s plane, which should be dedicated,
    /// creates the namespaces and pods, starts the servers, and waits until every Endpoint
    /// is realized.
    pub async fn start(env: &TestEnv) -> Result<World> {
        let client = env.client();
        let cluster = SimCluster::start(
            env,
            SimClusterConfig {
                nodes: 3,
                ..SimClusterConfig::default()
            },
        )
        .await?;
        let ns_api: Api<Namespace> = Api::all(client.clone());
        let mut namespaces = Vec::new();
        let mut model_namespaces = Vec::new();
        for letter in NAMESPACES {
            let name = env.unique_name(letter);
            env.delete_on_drop::<Namespace>(&name);
            let ns: Namespace = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"ns": letter}},
            }))?;
            let created = ns_api.create(&PostParams::default(), &ns).await?;
            let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
            crate::wait_for(
                &sa,
                "default",
                |o: Option<&ServiceAccount>| o.is_some(),
                WAIT,
            )
            .await?;
            model_namespaces.push(model::Namespace {
                name: name.clone(),
                labels: created.labels().clone(),
            });
            namespaces.push(name);
        }
        let named_ports: Vec<NamedPort> = PORTS
            .iter()
            .flat_map(|&port| {
                [Protocol::Tcp, Protocol::Udp].map(|protocol| NamedPort {
                    name: port_name(port, protocol),
                    port,
                    protocol,
                })
            })
            .collect();
        let mut specs = Vec::new();
        for (n, ns) in namespaces.iter().enumerate() {
            for (p, pod) in PODS.iter().enumerate() {
                let node = &cluster.nodes[(n + p) % cluster.nodes.len()];
                let ports: Vec<serde_json::Value> = named_ports
                    .iter()
                    .map(|np| {
                        json!({"name": np.name, "containerPort": np.port,
                               "protocol": np.protocol.as_str()})
                    })
                    .collect();
                let obj: Pod = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                    "spec": {
                        "nodeName": node.name,
                        "terminationGracePeriodSeconds": 0,
                        "containers": [{"name": "server", "image": "registry.k8s.io/agnhost:2.53",
                                        "ports": ports}],
                    },
                }))?;
                specs.push((ns.clone(), obj, node.handle().clone()));
            }
        }
        let created = futures::stream::iter(specs.into_iter().map(|(ns, obj, handle)| {
            let client = client.clone();
            async move {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let started = Instant::now();
                let pod = api
                    .create(&PostParams::default(), &obj)
                    .await
                    .with_context(|| format!("creating Pod {ns}/{}", obj.name_any()))?;
                SimPod::start(&client, &handle, &pod, started).await
            }
        }))
        .buffered(9)
        .collect::<Vec<Result<SimPod>>>()
        .await;
        let pods = created.into_iter().collect::<Result<Vec<_>>>()?;
        let mut servers = Vec::new();
        for pod in &pods {
            servers.push(Servers::start(&pod.sandbox.netns, &PORTS)?);
        }
        let node_api: Api<NodeNetwork> = Api::all(client.clone());
        let mut node_cidrs = Vec::new();
        for node in &cluster.nodes {
            let nn = node_api.get(&node.name).await?;
            let cidr = nn
                .spec
                .pod_cidrs
                .iter()
                .find_map(|c| c.parse::<IpNet>().ok().filter(|n| n.addr().is_ipv4()))
                .with_context(|| format!("node {} has no IPv4 pod CIDR", node.name))?;
            node_cidrs.push(cidr);
        }
        let model = model::Cluster {
            namespaces: model_namespaces,
            pods: pods
                .iter()
                .map(|p| model::Pod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    labels: [("pod".to_string(), p.name.clone())].into(),
                    ip: p.ips[0],
                    node: p.node.clone(),
                    named_ports: named_ports.clone(),
                    service_account: Some("default".into()),
                })
                .collect(),
        };
        let world = World {
            _servers: servers,
            pods,
            cluster,
            namespaces,
            model,
            node_cidrs,
            client,
        };
        world.wait_endpoints().await?;
        Ok(world)
    }

    /// Short names (`x/a`) in pod order, for tables.
    pub fn short_names(&self) -> Vec<String> {
        (0..self.pods.len())
            .map(|i| format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3]))
            .collect()
    }

    /// Index of pod `pod` (letter) in namespace `ns` (letter).
    pub fn index(&self, ns: &str, pod: &str) -> usize {
        let n = NAMESPACES
            .iter()
            .position(|x| *x == ns)
            .expect("namespace letter");
        let p = PODS.iter().position(|x| *x == pod).expect("pod letter");
        n * 3 + p
    }

    /// Real name of namespace `letter`.
    pub fn ns(&self, letter: &str) -> &str {
        &self.namespaces[NAMESPACES
            .iter()
            .position(|x| *x == letter)
            .expect("namespace letter")]
    }

    /// IP of pod `ns/pod` (letters).
    pub fn ip(&self, ns: &str, pod: &str) -> IpAddr {
        self.pods[self.index(ns, pod)].ips[0]
    }

    /// Index of the node pod `ns/pod` runs on.
    pub fn node_of(&self, ns: &str, pod: &str) -> usize {
        let pod = &self.pods[self.index(ns, pod)];
        self.cluster
            .nodes
            .iter()
            .position(|n| n.name == pod.node)
            .expect("pod's node")
    }

    /// The probe endpoints in pod order.
    pub fn endpoints(&self) -> Vec<probe::Endpoint> {
        self.short_names()
            .into_iter()
            .zip(&self.pods)
            .map(|(name, p)| probe::Endpoint {
                name,
                netns: p.sandbox.netns.clone(),
                ip: p.ips[0],
            })
            .collect()
    }

    /// Every port/protocol the truth table probes.
    pub fn keys(&self) -> Vec<PortProto> {
        PORTS
            .iter()
            .flat_map(|&port| {
                [Protocol::Tcp, Protocol::Udp].map(|protocol| PortProto { port, protocol })
            })
            .collect()
    }

    async fn wait_endpoints(&self) -> Result<()> {
        let started = Instant::now();
        loop {
            let eps = self.endpoint_objects().await?;
            let waiting: Vec<String> = self
                .pods
                .iter()
                .zip(&eps)
                .filter(|(_, ep)| {
                    !ep.as_ref().is_some_and(|ep| {
                        ep.spec.identity.is_some()
                            && ep
                                .status
                                .as_ref()
                                .is_some_and(|s| s.realized_revision == Some(ep.spec.revision))
                    })
                })
                .map(|(p, _)| format!("{}/{}", p.namespace, p.name))
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            if started.elapsed() > WAIT {
                bail!("Endpoints never realized: {waiting:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn endpoint_objects(&self) -> Result<Vec<Option<Endpoint>>> {
        let mut by_key = BTreeMap::new();
        for ns in &self.namespaces {
            let api: Api<Endpoint> = Api::namespaced(self.client.clone(), ns);
            for ep in api.list(&ListParams::default()).await? {
                by_key.insert((ns.clone(), ep.name_any()), ep);
            }
        }
        Ok(self
            .pods
            .iter()
            .map(|p| by_key.remove(&(p.namespace.clone(), p.name.clone())))
            .collect())
    }

    /// Waits until every pod's policy is realized with exactly `expected[i]` as the sources
    /// of its identity's ResolvedPolicy. Returns how long it took; the error lists the pods
    /// still waiting and what they show.
    pub async fn wait_policy(
        &self,
        expected: &[BTreeSet<SourceRef>],
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        let rp_api: Api<ResolvedPolicy> = Api::all(self.client.clone());
        loop {
            let eps = self.endpoint_objects().await?;
            let rps: BTreeMap<i64, ResolvedPolicy> = rp_api
                .list(&ListParams::default())
                .await?
                .into_iter()
                .map(|rp| (rp.spec.identity, rp))
                .collect();
            let mut waiting = Vec::new();
            for ((pod, ep), want) in self.pods.iter().zip(&eps).zip(expected) {
                let who = format!("{}/{}", pod.namespace, pod.name);
                let Some(ep) = ep else {
                    waiting.push(format!("{who}: no Endpoint"));
                    continue;
                };
                let Some(id) = ep.spec.identity else {
                    waiting.push(format!("{who}: no identity"));
                    continue;
                };
                let Some(rp) = rps.get(&id) else {
                    waiting.push(format!("{who}: no ResolvedPolicy {id}"));
                    continue;
                };
                let got: BTreeSet<SourceRef> = rp
                    .spec
                    .sources
                    .iter()
                    .filter_map(|s| {
                        let kind = match s.kind.as_str() {
                            "KubernetesNetworkPolicy" => SourceKind::Kubernetes,
                            "NetworkPolicy" => SourceKind::Namespaced,
                            "ClusterNetworkPolicy" => SourceKind::Cluster,
                            _ => return None,
                        };
                        Some(SourceRef {
                            kind,
                            namespace: s.namespace.clone(),
                            name: s.name.clone(),
                        })
                    })
                    .collect();
                if got != *want {
                    waiting.push(format!(
                        "{who}: ResolvedPolicy {id} rev {} sources {:?}, expected {:?}",
                        rp.spec.revision,
                        got.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        want.iter().map(ToString::to_string).collect::<Vec<_>>()
                    ));
                    continue;
                }
                let realized = ep.status.as_ref().and_then(|s| s.realized_policy_revision);
                if realized != Some(rp.spec.revision) {
                    waiting.push(format!(
                        "{who}: realizedPolicyRevision {realized:?}, ResolvedPolicy {id} revision {}",
                        rp.spec.revision
                    ));
                }
            }
            if waiting.is_empty() {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!(
                    "policy not realized after {timeout:?}:\n  {}",
                    waiting.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates the objects (cluster-scoped ones are also registered with `env` for
    /// deletion should the test fail).
    pub async fn apply(&self, env: &TestEnv, objects: &[PolicyObject]) -> Result<()> {
        let pp = PostParams::default();
        for o in objects {
            match o {
                PolicyObject::Kubernetes(p) => {
                    let api: Api<K8sNetworkPolicy> =
                        Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
                    api.create(&pp, p).await.map(drop)
                }
                PolicyObject::Namespaced(p) => {
                    let api: Api<NetworkPolicy> =
                        Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
                    api.create(&pp, p).await.map(drop)
                }
                PolicyObject::Cluster(p) => {
                    env.delete_on_drop::<ClusterNetworkPolicy>(&p.name_any());
                    let api: Api<ClusterNetworkPolicy> = Api::all(self.client.clone());
                    api.create(&pp, p).await.map(drop)
                }
            }
            .with_context(|| format!("creating {}", o.source()))?;
        }
        Ok(())
    }

    /// Deletes the objects.
    pub async fn delete(&self, objects: &[PolicyObject]) -> Result<()> {
        let dp = DeleteParams::default();
        for o in objects {
            let source = o.source();
            let ns = source.namespace.clone().unwrap_or_default();
            let result = match o {
                PolicyObject::Kubernetes(_) => {
                    let api: Api<K8sNetworkPolicy> = Api::namespaced(self.client.clone(), &ns);
                    api.delete(&source.name, &dp).await.map(drop)
                }
                PolicyObject::Namespaced(_) => {
                    let api: Api<NetworkPolicy> = Api::namespaced(self.client.clone(), &ns);
                    api.delete(&source.name, &dp).await.map(drop)
                }
                PolicyObject::Cluster(_) => {
                    let api: Api<ClusterNetworkPolicy> = Api::all(self.client.clone());
                    api.delete(&source.name, &dp).await.map(drop)
                }
            };
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {source}")),
            }
        }
        Ok(())
    }
}
