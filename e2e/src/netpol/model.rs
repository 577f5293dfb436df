//! An independent model of network policy, evaluated directly at the pod level.
//!
//! Written from the Kubernetes `networking.k8s.io/v1` NetworkPolicy specification and
//! POLICY_SPEC §1 (Tendril `NetworkPolicy` / `ClusterNetworkPolicy`), without looking at the
//! production resolver: selectors are matched against pods and namespaces, ipBlocks and
//! CIDRs against pod addresses, named ports against the pods' container ports. There are no
//! identities here; that is the point — the production path goes through identities,
//! `ResolvedPolicy` and map entries, and the tests compare the two.
//!
//! Decisions per enforcement point ([`Model::verdict`]): a matching Tendril deny rule wins;
//! else a matching allow rule allows; else the subject's default for the direction (deny if
//! any valid policy selecting it isolates it in that direction). A connection is allowed
//! ([`Model::allowed`]) when the sender's egress and the receiver's ingress both allow it.
//! Traffic from a pod to itself never leaves the pod (loopback); callers decide about it.
//!
//! Tendril selectors see the labels Cilium-style identities carry: pod labels as
//! `k8s:<key>`, `k8s:io.kubernetes.pod.namespace`, the namespace's labels as
//! `k8s:io.tendril.k8s.namespace.labels.<key>` and `k8s:io.kubernetes.pod.serviceaccount`.
//! The identity label filter (which drops e.g. `pod-template-hash`) is not modelled: use
//! plain label keys.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy as K8sNetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tendril_crds::v1alpha1::{
    CidrRule, ClusterNetworkPolicy, ClusterNetworkPolicySpec, NetworkPolicy, NetworkPolicySpec,
    PortRule,
};

/// Label key → value.
pub type Labels = BTreeMap<String, String>;

/// The label the apiserver puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
const TENDRIL_POD_NAMESPACE: &str = "k8s:io.kubernetes.pod.namespace";
const TENDRIL_NAMESPACE_LABELS: &str = "k8s:io.tendril.k8s.namespace.labels.";
const TENDRIL_SERVICE_ACCOUNT: &str = "k8s:io.kubernetes.pod.serviceaccount";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

/// A named container port of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A pod as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ip: IpAddr,
    pub node: String,
    pub named_ports: Vec<NamedPort>,
    pub service_account: Option<String>,
}

impl Pod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A namespace and its labels (`kubernetes.io/metadata.name` is added if missing, as the
/// apiserver does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// Every pod and namespace of the cluster.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
}

impl Cluster {
    /// The labels of namespace `name` (with `kubernetes.io/metadata.name`).
    pub fn namespace_labels(&self, name: &str) -> Labels {
        let mut labels = self
            .namespaces
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        labels
    }

    /// The label set Tendril selectors match (see the module documentation).
    pub fn tendril_labels(&self, pod: &Pod) -> Labels {
        let mut out: Labels = pod
            .labels
            .iter()
            .map(|(k, v)| (format!("k8s:{k}"), v.clone()))
            .collect();
        for (k, v) in self.namespace_labels(&pod.namespace) {
            out.insert(format!("{TENDRIL_NAMESPACE_LABELS}{k}"), v);
        }
        out.insert(TENDRIL_POD_NAMESPACE.into(), pod.namespace.clone());
        if let Some(sa) = &pod.service_account {
            out.insert(TENDRIL_SERVICE_ACCOUNT.into(), sa.clone());
        }
        out
    }
}

/// Every policy object of the cluster.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub kubernetes: Vec<K8sNetworkPolicy>,
    pub namespaced: Vec<NetworkPolicy>,
    pub cluster: Vec<ClusterNetworkPolicy>,
}

/// Which kind of object a policy is, as `ResolvedPolicy.spec.sources[].kind` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    Kubernetes,
    Namespaced,
    Cluster,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Kubernetes => "KubernetesNetworkPolicy",
            SourceKind::Namespaced => "NetworkPolicy",
            SourceKind::Cluster => "ClusterNetworkPolicy",
        }
    }
}

/// A policy by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRef {
    pub kind: SourceKind,
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind.as_str(), self.name),
            None => write!(f, "{} {}", self.kind.as_str(), self.name),
        }
    }
}

/// Why the model leaves a policy out (the production side reports a reason too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

fn invalid<T>(reason: &'static str, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        reason,
        message: message.into(),
    })
}

// ---------------------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated label selector (keys already in the form the labels they match use).
#[derive(Clone, Debug)]
struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    fn compile(sel: &LabelSelector, key: impl Fn(&str) -> String) -> Result<Selector, Invalid> {
        let mut requirements = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.push(Requirement::In(key(k), BTreeSet::from([v.clone()])));
        }
        for e in sel.match_expressions.iter().flatten() {
            let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
            let k = key(&e.key);
            let r = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return invalid(
                        "InvalidSelector",
                        format!("operator {} of key {} needs values", e.operator, e.key),
                    );
                }
                "In" => Requirement::In(k, values),
                "NotIn" => Requirement::NotIn(k, values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return invalid(
                        "InvalidSelector",
                        format!("operator {} of key {} takes no values", e.operator, e.key),
                    );
                }
                "Exists" => Requirement::Exists(k),
                "DoesNotExist" => Requirement::DoesNotExist(k),
                other => {
                    return invalid(
                        "InvalidSelector",
                        format!("unknown selector operator {other}"),
                    );
                }
            };
            requirements.push(r);
        }
        Ok(Selector { requirements })
    }

    fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| match r {
            Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k == key,
        })
    }
}

/// Tendril selector keys: no `<source>:` prefix means `k8s:`, `any:` means `k8s:`.
fn tendril_key(key: &str) -> String {
    match key.split_once(':') {
        None => format!("k8s:{key}"),
        Some(("any", rest)) => format!("k8s:{rest}"),
        Some(_) => key.to_string(),
    }
}

fn k8s_selector(sel: Option<&LabelSelector>) -> Result<Selector, Invalid> {
    match sel {
        Some(sel) => Selector::compile(sel, str::to_string),
        None => Ok(Selector {
            requirements: Vec::new(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// Compiled policies

#[derive(Clone, Debug)]
struct CidrMatch {
    net: IpNet,
    except: Vec<IpNet>,
}

impl CidrMatch {
    fn compile(cidr: &str, except: &[String]) -> Result<CidrMatch, Invalid> {
        let net: IpNet = cidr
            .parse()
            .or_else(|_| invalid("InvalidCIDR", format!("{cidr:?} is not a CIDR")))?;
        let mut out = Vec::new();
        for e in except {
            let e: IpNet = e
                .parse()
                .or_else(|_| invalid("InvalidCIDR", format!("except {e:?} is not a CIDR")))?;
            if !net.contains(&e) {
                return invalid("InvalidCIDR", format!("except {e} lies outside {net}"));
            }
            out.push(e);
        }
        Ok(CidrMatch {
            net: net.trunc(),
            except: out,
        })
    }

    fn matches(&self, ip: IpAddr) -> bool {
        self.net.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

#[derive(Clone, Debug)]
enum Peer {
    /// Kubernetes peer with selectors: pods in `namespace` (podSelector only) or in the
    /// namespaces `namespaces` selects, whose labels `pods` selects.
    K8sPods {
        namespace: Option<String>,
        namespaces: Option<Selector>,
        pods: Option<Selector>,
    },
    /// Tendril endpoint selector, limited to `namespace` when set.
    Endpoints {
        namespace: Option<String>,
        selector: Selector,
    },
    /// `cluster` and `all` cover pods; the other entities never name a pod.
    Entity {
        covers_pods: bool,
    },
    Cidr(CidrMatch),
}

#[derive(Clone, Debug)]
enum PortMatch {
    Range {
        protocol: Option<Protocol>,
        first: u16,
        last: u16,
    },
    Named {
        protocol: Option<Protocol>,
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny,
}

#[derive(Clone, Debug)]
struct Rule {
    direction: Direction,
    verdict: Verdict,
    /// `None`: every peer.
    peers: Option<Vec<Peer>>,
    /// `None`: every port and protocol.
    ports: Option<Vec<PortMatch>>,
}

#[derive(Clone, Debug)]
struct Compiled {
    source: SourceRef,
    /// Subjects: pods of `namespace` (when set) matching `selector` (against pod labels for
    /// Kubernetes policies, the Tendril label set otherwise).
    namespace: Option<String>,
    selector: Selector,
    tendril: bool,
    default_deny_ingress: bool,
    default_deny_egress: bool,
    rules: Vec<Rule>,
}

fn k8s_peer(peer: &NetworkPolicyPeer, policy_ns: &str) -> Result<Peer, Invalid> {
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(IPBlock { cidr, except }), None, None) => Ok(Peer::Cidr(CidrMatch::compile(
            cidr,
            except.as_deref().unwrap_or_default(),
        )?)),
        (Some(_), _, _) => invalid(
            "InvalidSelector",
            "ipBlock cannot be combined with selectors",
        ),
        (None, None, None) => invalid("InvalidSelector", "a peer needs a selector or ipBlock"),
        (None, ns, pods) => Ok(Peer::K8sPods {
            namespace: ns.is_none().then(|| policy_ns.to_string()),
            namespaces: ns.as_ref().map(|s| k8s_selector(Some(s))).transpose()?,
            pods: pods.as_ref().map(|s| k8s_selector(Some(s))).transpose()?,
        }),
    }
}

fn k8s_port(port: &NetworkPolicyPort) -> Result<PortMatch, Invalid> {
    let protocol = match port.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => Protocol::parse(p).map_or_else(
            || invalid("InvalidPort", format!("unknown protocol {p}")),
            Ok,
        )?,
    };
    match (&port.port, port.end_port) {
        (None, None) => Ok(PortMatch::Range {
            protocol: Some(protocol),
            first: 0,
            last: u16::MAX,
        }),
        (None, Some(_)) => invalid("InvalidPort", "endPort without port"),
        (Some(IntOrString::String(name)), None) => Ok(PortMatch::Named {
            protocol: Some(protocol),
            name: name.clone(),
        }),
        (Some(IntOrString::String(name)), Some(_)) => {
            invalid("InvalidPort", format!("named port {name} with endPort"))
        }
        (Some(IntOrString::Int(p)), end) => numeric_range(Some(protocol), i64::from(*p), end),
    }
}

fn numeric_range(
    protocol: Option<Protocol>,
    port: i64,
    end: Option<i32>,
) -> Result<PortMatch, Invalid> {
    let last = end.map_or(port, i64::from);
    if !(1..=65535).contains(&port) || !(port..=65535).contains(&last) {
        return invalid("InvalidPort", format!("bad port range {port}-{last}"));
    }
    Ok(PortMatch::Range {
        protocol,
        first: port as u16,
        last: last as u16,
    })
}

fn compile_k8s(np: &K8sNetworkPolicy) -> Result<Compiled, Invalid> {
    let ns = np.namespace().unwrap_or_default();
    let spec = np.spec.clone().unwrap_or_default();
    let ingress = spec.ingress.unwrap_or_default();
    let egress = spec.egress.unwrap_or_default();
    let types: Vec<String> = match spec.policy_types {
        Some(t) => t,
        None => {
            let mut t = vec!["Ingress".to_string()];
            if !egress.is_empty() {
                t.push("Egress".into());
            }
            t
        }
    };
    let has_ingress = types.iter().any(|t| t == "Ingress");
    let has_egress = types.iter().any(|t| t == "Egress");
    let mut rules = Vec::new();
    let mut push = |direction, peers: Option<&Vec<NetworkPolicyPeer>>, ports| {
        let peers = match peers {
            Some(p) if !p.is_empty() => Some(
                p.iter()
                    .map(|p| k8s_peer(p, &ns))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            _ => None,
        };
        let ports = match ports {
            Some(p) if !Vec::is_empty(p) => Some(
                p.iter()
                    .map(k8s_port)
                    .collect::<Result<Vec<_>, Invalid>>()?,
            ),
            _ => None,
        };
        rules.push(Rule {
            direction,
            verdict: Verdict::Allow,
            peers,
            ports,
        });
        Ok::<(), Invalid>(())
    };
    // Rules of a direction missing from policyTypes take no part (but are still validated,
    // as the apiserver does).
    for r in &ingress {
        push(Direction::Ingress, r.from.as_ref(), r.ports.as_ref())?;
    }
    for r in &egress {
        push(Direction::Egress, r.to.as_ref(), r.ports.as_ref())?;
    }
    let n_ingress = ingress.len();
    let rules = rules
        .into_iter()
        .enumerate()
        .filter(|(i, _)| {
            if *i < n_ingress {
                has_ingress
            } else {
                has_egress
            }
        })
        .map(|(_, r)| r)
        .collect();
    Ok(Compiled {
        source: SourceRef {
            kind: SourceKind::Kubernetes,
            namespace: Some(ns.clone()),
            name: np.name_any(),
        },
        namespace: Some(ns),
        selector: k8s_selector(spec.pod_selector.as_ref())?,
        tendril: false,
        default_deny_ingress: has_ingress,
        default_deny_egress: has_egress,
        rules,
    })
}

/// The peer fields of a Tendril rule, direction-neutral.
struct TendrilPeers<'a> {
    endpoints: &'a [LabelSelector],
    entities: &'a [String],
    cidrs: &'a [String],
    cidr_sets: &'a [CidrRule],
    to_ports: &'a [PortRule],
}

fn tendril_rule(
    direction: Direction,
    verdict: Verdict,
    r: TendrilPeers<'_>,
    policy_ns: Option<&str>,
) -> Result<Rule, Invalid> {
    let mut peers = Vec::new();
    for sel in r.endpoints {
        let selector = Selector::compile(sel, tendril_key)?;
        let namespace = match policy_ns {
            Some(ns) if !selector.mentions(TENDRIL_POD_NAMESPACE) => Some(ns.to_string()),
            _ => None,
        };
        peers.push(Peer::Endpoints {
            namespace,
            selector,
        });
    }
    for e in r.entities {
        let covers_pods = match e.as_str() {
            "cluster" | "all" => true,
            "host" | "remote-node" | "world" | "kube-apiserver" | "health" | "init" | "ingress"
            | "unmanaged" => false,
            other => return invalid("InvalidSelector", format!("unknown entity {other}")),
        };
        peers.push(Peer::Entity { covers_pods });
    }
    for c in r.cidrs {
        peers.push(Peer::Cidr(CidrMatch::compile(c, &[])?));
    }
    for c in r.cidr_sets {
        peers.push(Peer::Cidr(CidrMatch::compile(&c.cidr, &c.except)?));
    }
    let no_peer_fields = r.endpoints.is_empty()
        && r.entities.is_empty()
        && r.cidrs.is_empty()
        && r.cidr_sets.is_empty();
    let mut ports = Vec::new();
    for pp in r.to_ports.iter().flat_map(|p| &p.ports) {
        let protocol = match pp.protocol.as_str() {
            "ANY" | "" => None,
            p => Some(Protocol::parse(p).map_or_else(
                || invalid("InvalidPort", format!("unknown protocol {p}")),
                Ok,
            )?),
        };
        let numeric = pp.port.parse::<i64>().ok();
        ports.push(match (numeric, pp.end_port) {
            (Some(0), None) => PortMatch::Range {
                protocol,
                first: 0,
                last: u16::MAX,
            },
            (Some(p), end) => numeric_range(protocol, p, end)?,
            (None, Some(_)) => {
                return invalid(
                    "InvalidPort",
                    format!("named port {} with endPort", pp.port),
                );
            }
            (None, None) => PortMatch::Named {
                protocol,
                name: pp.port.clone(),
            },
        });
    }
    Ok(Rule {
        direction,
        verdict,
        peers: (!no_peer_fields).then_some(peers),
        ports: (!ports.is_empty()).then_some(ports),
    })
}

fn compile_tendril(
    source: SourceRef,
    spec: &NetworkPolicySpec,
    namespace: Option<&str>,
) -> Result<Compiled, Invalid> {
    if spec.node_selector.is_some() {
        return invalid(
            "Unsupported",
            "nodeSelector (host policies) is not supported",
        );
    }
    let Some(endpoint_selector) = &spec.endpoint_selector else {
        return invalid("InvalidSelector", "endpointSelector is required");
    };
    let mut rules = Vec::new();
    for (verdict, list) in [
        (Verdict::Allow, &spec.ingress),
        (Verdict::Deny, &spec.ingress_deny),
    ] {
        for r in list {
            rules.push(tendril_rule(
                Direction::Ingress,
                verdict,
                TendrilPeers {
                    endpoints: &r.from_endpoints,
                    entities: &r.from_entities,
                    cidrs: &r.from_cidr,
                    cidr_sets: &r.from_cidr_set,
                    to_ports: &r.to_ports,
                },
                namespace,
            )?);
        }
    }
    for (verdict, list) in [
        (Verdict::Allow, &spec.egress),
        (Verdict::Deny, &spec.egress_deny),
    ] {
        for r in list {
            rules.push(tendril_rule(
                Direction::Egress,
                verdict,
                TendrilPeers {
                    endpoints: &r.to_endpoints,
                    entities: &r.to_entities,
                    cidrs: &r.to_cidr,
                    cidr_sets: &r.to_cidr_set,
                    to_ports: &r.to_ports,
                },
                namespace,
            )?);
        }
    }
    let switches = spec.enable_default_deny.clone().unwrap_or_default();
    let has_ingress = !spec.ingress.is_empty() || !spec.ingress_deny.is_empty();
    let has_egress = !spec.egress.is_empty() || !spec.egress_deny.is_empty();
    Ok(Compiled {
        source,
        namespace: namespace.map(str::to_string),
        selector: Selector::compile(endpoint_selector, tendril_key)?,
        tendril: true,
        default_deny_ingress: switches.ingress.unwrap_or(has_ingress),
        default_deny_egress: switches.egress.unwrap_or(has_egress),
        rules,
    })
}

/// The two Tendril kinds share their spec shape; the model reads both through one type.
fn cluster_spec_as_namespaced(spec: &ClusterNetworkPolicySpec) -> NetworkPolicySpec {
    NetworkPolicySpec {
        description: spec.description.clone(),
        endpoint_selector: spec.endpoint_selector.clone(),
        node_selector: spec.node_selector.clone(),
        ingress: spec.ingress.clone(),
        ingress_deny: spec.ingress_deny.clone(),
        egress: spec.egress.clone(),
        egress_deny: spec.egress_deny.clone(),
        enable_default_deny: spec.enable_default_deny.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// The model

/// Policies compiled against a cluster; answers reachability questions.
pub struct Model<'a> {
    cluster: &'a Cluster,
    policies: Vec<Compiled>,
    invalid: Vec<(SourceRef, Invalid)>,
    tendril_labels: Vec<Labels>,
}

impl<'a> Model<'a> {
    pub fn new(cluster: &'a Cluster, policies: &Policies) -> Model<'a> {
        let mut compiled = Vec::new();
        let mut bad = Vec::new();
        let mut add = |source: SourceRef, r: Result<Compiled, Invalid>| match r {
            Ok(c) => compiled.push(c),
            Err(e) => bad.push((source, e)),
        };
        for np in &policies.kubernetes {
            let source = SourceRef {
                kind: SourceKind::Kubernetes,
                namespace: np.namespace(),
                name: np.name_any(),
            };
            add(source, compile_k8s(np));
        }
        for np in &policies.namespaced {
            let source = SourceRef {
                kind: SourceKind::Namespaced,
                namespace: np.namespace(),
                name: np.name_any(),
            };
            let ns = np.namespace().unwrap_or_default();
            add(source.clone(), compile_tendril(source, &np.spec, Some(&ns)));
        }
        for np in &policies.cluster {
            let source = SourceRef {
                kind: SourceKind::Cluster,
                namespace: None,
                name: np.name_any(),
            };
            add(
                source.clone(),
                compile_tendril(source, &cluster_spec_as_namespaced(&np.spec), None),
            );
        }
        Model {
            cluster,
            policies: compiled,
            invalid: bad,
            tendril_labels: cluster
                .pods
                .iter()
                .map(|p| cluster.tendril_labels(p))
                .collect(),
        }
    }

    /// Policies the model leaves out, with the reason.
    pub fn invalid(&self) -> &[(SourceRef, Invalid)] {
        &self.invalid
    }

    fn pod(&self, i: usize) -> &Pod {
        &self.cluster.pods[i]
    }

    fn selects(&self, c: &Compiled, subject: usize) -> bool {
        let pod = self.pod(subject);
        if c.namespace.as_ref().is_some_and(|ns| *ns != pod.namespace) {
            return false;
        }
        if c.tendril {
            c.selector.matches(&self.tendril_labels[subject])
        } else {
            c.selector.matches(&pod.labels)
        }
    }

    /// The valid policies that select pod `subject` (index into `cluster.pods`).
    pub fn sources(&self, subject: usize) -> BTreeSet<SourceRef> {
        self.policies
            .iter()
            .filter(|c| self.selects(c, subject))
            .map(|c| c.source.clone())
            .collect()
    }

    /// Whether pod `subject` is isolated (default deny) in `direction`.
    pub fn default_deny(&self, subject: usize, direction: Direction) -> bool {
        self.policies
            .iter()
            .filter(|c| self.selects(c, subject))
            .any(|c| match direction {
                Direction::Ingress => c.default_deny_ingress,
                Direction::Egress => c.default_deny_egress,
            })
    }

    fn peer_matches(&self, peer: &Peer, other: usize) -> bool {
        let pod = self.pod(other);
        match peer {
            Peer::K8sPods {
                namespace,
                namespaces,
                pods,
            } => {
                namespace.as_ref().is_none_or(|ns| *ns == pod.namespace)
                    && namespaces
                        .as_ref()
                        .is_none_or(|s| s.matches(&self.cluster.namespace_labels(&pod.namespace)))
                    && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
            Peer::Endpoints {
                namespace,
                selector,
            } => {
                namespace.as_ref().is_none_or(|ns| *ns == pod.namespace)
                    && selector.matches(&self.tendril_labels[other])
            }
            Peer::Entity { covers_pods } => *covers_pods,
            Peer::Cidr(c) => c.matches(pod.ip),
        }
    }

    fn port_matches(
        &self,
        m: &PortMatch,
        subject: usize,
        direction: Direction,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        match m {
            PortMatch::Range {
                protocol: p,
                first,
                last,
            } => p.is_none_or(|p| p == protocol) && (*first..=*last).contains(&port),
            PortMatch::Named { protocol: p, name } => {
                if p.is_some_and(|p| p != protocol) {
                    return false;
                }
                let has = |pod: &Pod| {
                    pod.named_ports
                        .iter()
                        .any(|np| np.name == *name && np.protocol == protocol && np.port == port)
                };
                match direction {
                    // The receiving endpoint's own container ports.
                    Direction::Ingress => has(self.pod(subject)),
                    // Any endpoint in the cluster with that name (Cilium; POLICY_SPEC §1).
                    Direction::Egress => self.cluster.pods.iter().any(has),
                }
            }
        }
    }

    /// The decision at one enforcement point: `subject`'s `direction` for traffic with
    /// `peer` to destination port `port`/`protocol` (indices into `cluster.pods`).
    pub fn verdict(
        &self,
        subject: usize,
        peer: usize,
        direction: Direction,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let mut isolated = false;
        let mut allowed = false;
        for c in self.policies.iter().filter(|c| self.selects(c, subject)) {
            isolated |= match direction {
                Direction::Ingress => c.default_deny_ingress,
                Direction::Egress => c.default_deny_egress,
            };
            for r in c.rules.iter().filter(|r| r.direction == direction) {
                let peer_ok = r
                    .peers
                    .as_ref()
                    .is_none_or(|ps| ps.iter().any(|p| self.peer_matches(p, peer)));
                let port_ok = r.ports.as_ref().is_none_or(|ps| {
                    ps.iter()
                        .any(|m| self.port_matches(m, subject, direction, port, protocol))
                });
                if peer_ok && port_ok {
                    match r.verdict {
                        Verdict::Deny => return false,
                        Verdict::Allow => allowed = true,
                    }
                }
            }
        }
        allowed || !isolated
    }

    /// Whether a connection from pod `src` to pod `dst` on `port`/`protocol` gets through:
    /// the sender's egress and the receiver's ingress both allow it.
    pub fn allowed(&self, src: usize, dst: usize, port: u16, protocol: Protocol) -> bool {
        self.verdict(src, dst, Direction::Egress, port, protocol)
            && self.verdict(dst, src, Direction::Ingress, port, protocol)
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
