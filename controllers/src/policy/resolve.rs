//! The resolver: every policy and every identity in, one `ResolvedPolicySpec` per cluster
//! identity out. Pure: values in, values out; the reconciler numbers revisions and writes.
//!
//! Semantics (POLICY_SPEC §1): Kubernetes `NetworkPolicy` exactly as upstream (policyTypes
//! defaulting, isolation of the selected pods only, additive allows, ipBlock with except,
//! named ports kept by name, endPort); Tendril `NetworkPolicy`/`ClusterNetworkPolicy` as
//! Cilium (endpoint selectors scoped to the namespace, entities, CIDR sets, deny rules that
//! win, per-direction default deny). An invalid policy contributes nothing at all.
//!
//! Selectors choose among the cluster identities (id ≥ 256) of the input; reserved
//! identities are reached through entities (`host`, `world`, …).
//!
//! The output is canonical, so equal inputs give equal specs whatever their order: rules
//! with the same verdict and ports are merged into one (peers and CIDRs united), then
//! rules with the same verdict, peers and CIDRs (ports united), until nothing merges;
//! peers, CIDRs (aggregated) and ports (ranges coalesced) are sorted, duplicates dropped.

use super::selector::{IdentityIndex, Selector};
use crate::identities::labels::{NAMESPACE_LABELS_PREFIX, POD_NAMESPACE};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use tendril_crds::v1alpha1::{
    ClusterNetworkPolicy, EgressRule, IngressRule, NetworkPolicy, NetworkPolicySpec, PolicySource,
    PolicySourceKind, PortRule, Protocol, ResolvedDefaultDeny, ResolvedPolicySpec, ResolvedPort,
    ResolvedRule, Verdict,
};

/// Security labels of one identity, as in `Identity.spec.securityLabels`.
pub type Labels = BTreeMap<String, String>;

/// `PolicySource.kind` of a Tendril `NetworkPolicy`.
pub const KIND_NAMESPACED: PolicySourceKind = PolicySourceKind::NetworkPolicy;
/// `PolicySource.kind` of a `ClusterNetworkPolicy`.
pub const KIND_CLUSTER: PolicySourceKind = PolicySourceKind::ClusterNetworkPolicy;
/// `PolicySource.kind` of a `networking.k8s.io/v1` `NetworkPolicy`.
pub const KIND_KUBERNETES: PolicySourceKind = PolicySourceKind::KubernetesNetworkPolicy;

/// Reasons of `Valid=False`.
pub const INVALID_CIDR: &str = "InvalidCIDR";
pub const INVALID_PORT: &str = "InvalidPort";
pub const INVALID_SELECTOR: &str = "InvalidSelector";
pub const UNSUPPORTED: &str = "Unsupported";
/// Reason of `Valid=True`.
pub const RESOLVED: &str = "Resolved";

/// Verdicts of `ResolvedRule.verdict`.
pub const ALLOW: Verdict = Verdict::Allow;
pub const DENY: Verdict = Verdict::Deny;

pub use tendril_crds::facts::{ANY_PEER, CLUSTER_IDENTITY_MIN as MIN_CLUSTER_IDENTITY};
use tendril_crds::facts::{ENTITY_ALL, ENTITY_CLUSTER, Reserved};
/// Reserved identity of the node itself (always allowed in: kubelet probes).
pub const HOST: i64 = Reserved::Host.id();

/// Every policy the resolver reads.
#[derive(Default, Clone, Debug)]
pub struct Sources {
    pub kubernetes: Vec<k8s::NetworkPolicy>,
    pub namespaced: Vec<NetworkPolicy>,
    pub cluster: Vec<ClusterNetworkPolicy>,
}

/// The outcome of one resolve.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// Every identity >= 256 in the input → its spec (revision 0; the reconciler numbers it).
    pub policies: BTreeMap<i64, ResolvedPolicySpec>,
    /// Per source policy: Ok(selected identity count) or the reason it was left out.
    /// Sorted by kind, namespace and name.
    pub sources: Vec<(PolicySource, Result<usize, Invalid>)>,
}

/// Why a policy was left out: a `Valid=False` reason and a message for its author.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

impl Invalid {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// Resolves every policy against every identity.
pub fn resolve(identities: &BTreeMap<i64, Labels>, sources: &Sources) -> Resolution {
    let mut index = IdentityIndex::new(identities, MIN_CLUSTER_IDENTITY);
    let mut compiled: Vec<Compiled> = Vec::new();
    let mut outcomes: Vec<(PolicySource, Result<usize, Invalid>)> = Vec::new();
    let mut record = |source: PolicySource, result: Result<Compiled, Invalid>| match result {
        Ok(c) => {
            outcomes.push((source, Ok(c.subjects.len())));
            compiled.push(c);
        }
        Err(e) => outcomes.push((source, Err(e))),
    };
    for np in &sources.kubernetes {
        let source = source_of(KIND_KUBERNETES, np.namespace(), np);
        let result = kubernetes(np, &mut index, source.clone());
        record(source, result);
    }
    for np in &sources.namespaced {
        let source = source_of(KIND_NAMESPACED, np.namespace(), np);
        let ns = np.namespace().unwrap_or_else(|| "default".to_string());
        let result = tendril(&np.spec, Some(&ns), &mut index, source.clone());
        record(source, result);
    }
    for np in &sources.cluster {
        let source = source_of(KIND_CLUSTER, None, np);
        // Both kinds share one spec shape (see crds/src/v1alpha1/network_policy.rs).
        let spec = NetworkPolicySpec {
            description: np.spec.description.clone(),
            endpoint_selector: np.spec.endpoint_selector.clone(),
            node_selector: np.spec.node_selector.clone(),
            ingress: np.spec.ingress.clone(),
            ingress_deny: np.spec.ingress_deny.clone(),
            egress: np.spec.egress.clone(),
            egress_deny: np.spec.egress_deny.clone(),
            enable_default_deny: np.spec.enable_default_deny.clone(),
        };
        let result = tendril(&spec, None, &mut index, source.clone());
        record(source, result);
    }
    outcomes.sort_by(|a, b| source_key(&a.0).cmp(&source_key(&b.0)));

    // Which policies select each identity; identities selected by the same policies get
    // the same spec, computed once.
    let mut selecting: BTreeMap<i64, Vec<u32>> =
        index.all().iter().map(|&id| (id, Vec::new())).collect();
    for (i, c) in compiled.iter().enumerate() {
        for id in c.subjects.iter() {
            if let Some(list) = selecting.get_mut(id) {
                list.push(i as u32);
            }
        }
    }
    let mut memo: HashMap<&[u32], Arc<ResolvedPolicySpec>> = HashMap::new();
    let mut policies = BTreeMap::new();
    for (id, list) in &selecting {
        let shared = memo
            .entry(list.as_slice())
            .or_insert_with(|| Arc::new(combine(list.iter().map(|&i| &compiled[i as usize]))));
        let mut spec = ResolvedPolicySpec::clone(shared);
        spec.identity = *id;
        policies.insert(*id, spec);
    }
    Resolution {
        policies,
        sources: outcomes,
    }
}

fn source_of<K: kube::Resource>(
    kind: PolicySourceKind,
    namespace: Option<String>,
    obj: &K,
) -> PolicySource {
    PolicySource {
        kind,
        namespace,
        name: obj.meta().name.clone().unwrap_or_default(),
        generation: obj.meta().generation,
    }
}

fn source_key(s: &PolicySource) -> (PolicySourceKind, Option<&str>, &str) {
    (s.kind, s.namespace.as_deref(), &s.name)
}

/// One valid policy, translated: its subjects and what it says about them.
struct Compiled {
    source: PolicySource,
    subjects: Arc<[i64]>,
    default_deny: ResolvedDefaultDeny,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
}

/// The spec of a subject selected by exactly `policies`.
fn combine<'a>(policies: impl Iterator<Item = &'a Compiled>) -> ResolvedPolicySpec {
    let mut spec = ResolvedPolicySpec::default();
    let mut ingress = Vec::new();
    let mut egress = Vec::new();
    for c in policies {
        spec.default_deny.ingress |= c.default_deny.ingress;
        spec.default_deny.egress |= c.default_deny.egress;
        ingress.extend(c.ingress.iter().cloned());
        egress.extend(c.egress.iter().cloned());
        spec.sources.push(c.source.clone());
    }
    if spec.default_deny.ingress {
        // The node's own traffic (kubelet probes) is always allowed in, like Cilium's
        // allow-localhost; an explicit deny of `host` still wins in the datapath.
        ingress.push(Rule::any_port(Verdict::Allow, vec![HOST], vec![]));
    }
    spec.ingress = canonical(ingress).into_iter().map(Rule::into_api).collect();
    spec.egress = canonical(egress).into_iter().map(Rule::into_api).collect();
    spec.sources
        .sort_by(|a, b| source_key(a).cmp(&source_key(b)));
    spec.sources.dedup();
    spec
}

// ---------------------------------------------------------------------------------------
// Rules, ports and their canonical form.

/// Every concrete protocol; a resolved port is always one of these, never `ANY`.
const ALL_PROTOCOLS: &[Protocol] = Protocol::Any.expand();

/// A port range of one protocol, or a named port. `start == 0` without a name is every
/// port of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Port {
    protocol: Protocol,
    name: Option<String>,
    start: u16,
    end: u16,
}

impl Port {
    fn range(protocol: Protocol, start: u16, end: u16) -> Self {
        Self {
            protocol,
            name: None,
            start,
            end,
        }
    }

    fn named(protocol: Protocol, name: &str) -> Self {
        Self {
            protocol,
            name: Some(name.to_string()),
            start: 0,
            end: 0,
        }
    }

    fn is_all(&self) -> bool {
        self.name.is_none() && self.start == 0
    }

    fn into_api(self) -> ResolvedPort {
        ResolvedPort {
            port: i32::from(self.start),
            end_port: (self.end > self.start).then_some(i32::from(self.end)),
            name: self.name,
            protocol: self.protocol,
        }
    }
}

/// The ports of a rule: every port and protocol, or a list.
enum Ports {
    All,
    Some(Vec<Port>),
}

impl Ports {
    fn add(&mut self, other: Ports) {
        match (&mut *self, other) {
            (Ports::All, _) => {}
            (_, Ports::All) => *self = Ports::All,
            (Ports::Some(a), Ports::Some(b)) => a.extend(b),
        }
    }

    /// The canonical list (empty = every port and protocol).
    fn into_list(self) -> Vec<Port> {
        match self {
            Ports::All => Vec::new(),
            Ports::Some(list) => normalize_ports(list),
        }
    }
}

/// Sorted; per protocol either "all ports" alone, or coalesced ranges then named ports.
fn normalize_ports(mut ports: Vec<Port>) -> Vec<Port> {
    ports.sort();
    ports.dedup();
    let all: BTreeSet<Protocol> = ports
        .iter()
        .filter(|p| p.is_all())
        .map(|p| p.protocol)
        .collect();
    let mut out: Vec<Port> = Vec::with_capacity(ports.len());
    for p in ports {
        if all.contains(&p.protocol) && !p.is_all() {
            continue;
        }
        if let Some(last) = out.last_mut()
            && p.name.is_none()
            && last.name.is_none()
            && last.protocol == p.protocol
            && !last.is_all()
            && u32::from(p.start) <= u32::from(last.end) + 1
        {
            last.end = last.end.max(p.end);
            continue;
        }
        out.push(p);
    }
    out
}

/// A rule: `verdict` for traffic with a peer in `peers` or an address in `cidrs`, on
/// `ports` (empty = all). Field order is the canonical sort order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Rule {
    verdict: Verdict,
    peers: Vec<i64>,
    cidrs: Vec<IpNet>,
    ports: Vec<Port>,
}

impl Rule {
    fn any_port(verdict: Verdict, peers: Vec<i64>, cidrs: Vec<IpNet>) -> Self {
        Self {
            verdict,
            peers,
            cidrs,
            ports: Vec::new(),
        }
    }

    fn matches_nothing(&self) -> bool {
        self.peers.is_empty() && self.cidrs.is_empty()
    }

    fn into_api(self) -> ResolvedRule {
        ResolvedRule {
            verdict: self.verdict,
            peers: self.peers,
            cidrs: self.cidrs.iter().map(ToString::to_string).collect(),
            ports: self.ports.into_iter().map(Port::into_api).collect(),
        }
    }
}

/// Canonical peers and CIDRs: sorted, deduplicated, any-peer absorbs the rest, CIDRs
/// aggregated (covered prefixes dropped, sibling prefixes joined).
fn normalize_peers(peers: &mut Vec<i64>, cidrs: &mut Vec<IpNet>) {
    peers.sort_unstable();
    peers.dedup();
    if peers.first() == Some(&ANY_PEER) {
        peers.truncate(1);
        cidrs.clear();
    } else if !cidrs.is_empty() {
        *cidrs = IpNet::aggregate(cidrs);
        cidrs.sort();
    }
}

/// Peer identities and CIDRs of a rule being merged.
type PeerSet = (Vec<i64>, Vec<IpNet>);

/// The canonical form of a rule list (see the module doc).
fn canonical(rules: Vec<Rule>) -> Vec<Rule> {
    let mut rules: Vec<Rule> = rules
        .into_iter()
        .map(|mut r| {
            normalize_peers(&mut r.peers, &mut r.cidrs);
            r.ports = normalize_ports(r.ports);
            r
        })
        .filter(|r| !r.matches_nothing())
        .collect();
    loop {
        // Same verdict and ports: one rule for the union of the peers.
        let mut by_ports: BTreeMap<(Verdict, Vec<Port>), PeerSet> = BTreeMap::new();
        for r in rules {
            let e = by_ports.entry((r.verdict, r.ports)).or_default();
            e.0.extend(r.peers);
            e.1.extend(r.cidrs);
        }
        let merged: Vec<Rule> = by_ports
            .into_iter()
            .map(|((verdict, ports), (mut peers, mut cidrs))| {
                normalize_peers(&mut peers, &mut cidrs);
                Rule {
                    verdict,
                    peers,
                    cidrs,
                    ports,
                }
            })
            .collect();
        let before = merged.len();
        // Same verdict and peers: one rule for the union of the ports.
        let mut by_peers: BTreeMap<(Verdict, Vec<i64>, Vec<IpNet>), Ports> = BTreeMap::new();
        for r in merged {
            let ports = if r.ports.is_empty() {
                Ports::All
            } else {
                Ports::Some(r.ports)
            };
            match by_peers.entry((r.verdict, r.peers, r.cidrs)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(ports);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().add(ports),
            }
        }
        rules = by_peers
            .into_iter()
            .map(|((verdict, peers, cidrs), ports)| Rule {
                verdict,
                peers,
                cidrs,
                ports: ports.into_list(),
            })
            .collect();
        if rules.len() == before {
            break;
        }
    }
    rules.sort();
    rules
}

// ---------------------------------------------------------------------------------------
// CIDRs.

/// `cidr` minus every prefix of `except`, as disjoint prefixes.
fn cidr_minus(cidr: &str, except: &[String]) -> Result<Vec<IpNet>, Invalid> {
    let net = parse_cidr(cidr)?;
    let mut excepts = Vec::with_capacity(except.len());
    for e in except {
        let e = parse_cidr(e)?;
        if !net.contains(&e) {
            return Err(Invalid::new(
                INVALID_CIDR,
                format!("except {e} does not lie inside cidr {net}"),
            ));
        }
        excepts.push(e);
    }
    let mut out = Vec::new();
    subtract(net, &excepts, &mut out);
    Ok(out)
}

fn subtract(net: IpNet, excepts: &[IpNet], out: &mut Vec<IpNet>) {
    if excepts.iter().any(|e| e.contains(&net)) {
        return;
    }
    if !excepts.iter().any(|e| net.contains(e)) {
        out.push(net);
        return;
    }
    // Some except lies strictly inside: look at both halves.
    for half in net
        .subnets(net.prefix_len() + 1)
        .expect("a prefix strictly containing another can be split")
    {
        subtract(half, excepts, out);
    }
}

/// A CIDR such as `10.0.0.0/8` (host bits are cleared, as the kernel would).
fn parse_cidr(s: &str) -> Result<IpNet, Invalid> {
    s.trim().parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
        Invalid::new(
            INVALID_CIDR,
            format!("{s:?} is not a CIDR such as 10.0.0.0/8"),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Label keys.

/// A Kubernetes pod label key as an identity label key.
fn pod_key(key: &str) -> String {
    format!("k8s:{key}")
}

/// A Kubernetes namespace label key as an identity label key.
fn namespace_key(key: &str) -> String {
    format!("{NAMESPACE_LABELS_PREFIX}{key}")
}

/// A Tendril selector key: `app` and `any:app` mean `k8s:app`; `<source>:key` is literal.
fn tendril_key(key: &str) -> String {
    match key.split_once(':') {
        None => pod_key(key),
        Some(("any", rest)) => pod_key(rest),
        Some(_) => key.to_string(),
    }
}

fn compile_selector(
    selector: &LabelSelector,
    what: &str,
    key: impl Fn(&str) -> String,
) -> Result<Selector, Invalid> {
    Selector::compile(selector, key)
        .map_err(|m| Invalid::new(INVALID_SELECTOR, format!("{what}: {m}")))
}

// ---------------------------------------------------------------------------------------
// Kubernetes NetworkPolicy.

fn kubernetes(
    np: &k8s::NetworkPolicy,
    index: &mut IdentityIndex,
    source: PolicySource,
) -> Result<Compiled, Invalid> {
    let ns = np.namespace().unwrap_or_else(|| "default".to_string());
    let spec = np.spec.clone().unwrap_or_default();
    let in_namespace = |sel: Selector| sel.and_equals(POD_NAMESPACE, &ns);
    let subjects = compile_selector(
        &spec.pod_selector.clone().unwrap_or_default(),
        "podSelector",
        pod_key,
    )?;
    let subjects = index.select(&in_namespace(subjects));

    let ingress_rules = spec.ingress.unwrap_or_default();
    let egress_rules = spec.egress.unwrap_or_default();
    let (mut ingress_type, mut egress_type) = (false, false);
    match &spec.policy_types {
        Some(types) if !types.is_empty() => {
            for t in types {
                match t.as_str() {
                    "Ingress" => ingress_type = true,
                    "Egress" => egress_type = true,
                    other => {
                        return Err(Invalid::new(
                            UNSUPPORTED,
                            format!("policyTypes entry {other:?} is neither Ingress nor Egress"),
                        ));
                    }
                }
            }
        }
        // Upstream defaulting: always Ingress; Egress iff there are egress rules.
        _ => {
            ingress_type = true;
            egress_type = !egress_rules.is_empty();
        }
    }

    let mut peers = |list: Option<&Vec<k8s::NetworkPolicyPeer>>,
                     what: &str|
     -> Result<(Vec<i64>, Vec<IpNet>), Invalid> {
        let list = list.map(Vec::as_slice).unwrap_or_default();
        if list.is_empty() {
            return Ok((vec![ANY_PEER], Vec::new()));
        }
        let (mut ids, mut cidrs) = (Vec::new(), Vec::new());
        for (i, peer) in list.iter().enumerate() {
            let at = format!("{what}[{i}]");
            match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
                (Some(block), None, None) => cidrs.extend(cidr_minus(
                    &block.cidr,
                    block.except.as_deref().unwrap_or_default(),
                )?),
                (Some(_), _, _) => {
                    return Err(Invalid::new(
                        INVALID_SELECTOR,
                        format!("{at}: ipBlock cannot be combined with a selector"),
                    ));
                }
                (None, None, None) => {
                    return Err(Invalid::new(
                        INVALID_SELECTOR,
                        format!("{at}: a peer needs podSelector, namespaceSelector or ipBlock"),
                    ));
                }
                (None, None, Some(pods)) => {
                    let sel = compile_selector(pods, &format!("{at}.podSelector"), pod_key)?;
                    ids.extend(index.select(&in_namespace(sel)).iter());
                }
                (None, Some(namespaces), pods) => {
                    let mut sel = compile_selector(
                        namespaces,
                        &format!("{at}.namespaceSelector"),
                        namespace_key,
                    )?;
                    if let Some(pods) = pods {
                        sel = sel.and(&compile_selector(
                            pods,
                            &format!("{at}.podSelector"),
                            pod_key,
                        )?);
                    }
                    ids.extend(index.select(&sel).iter());
                }
            }
        }
        Ok((ids, cidrs))
    };

    let mut ingress = Vec::new();
    for (i, rule) in ingress_rules.iter().enumerate() {
        let (ids, cidrs) = peers(rule.from.as_ref(), &format!("ingress[{i}].from"))?;
        let ports = kubernetes_ports(rule.ports.as_deref(), &format!("ingress[{i}].ports"))?;
        ingress.push(Rule {
            verdict: Verdict::Allow,
            peers: ids,
            cidrs,
            ports: ports.into_list(),
        });
    }
    let mut egress = Vec::new();
    for (i, rule) in egress_rules.iter().enumerate() {
        let (ids, cidrs) = peers(rule.to.as_ref(), &format!("egress[{i}].to"))?;
        let ports = kubernetes_ports(rule.ports.as_deref(), &format!("egress[{i}].ports"))?;
        egress.push(Rule {
            verdict: Verdict::Allow,
            peers: ids,
            cidrs,
            ports: ports.into_list(),
        });
    }
    // Rules of a direction not in policyTypes have no effect (upstream).
    if !ingress_type {
        ingress.clear();
    }
    if !egress_type {
        egress.clear();
    }
    Ok(Compiled {
        source,
        subjects,
        default_deny: ResolvedDefaultDeny {
            ingress: ingress_type,
            egress: egress_type,
        },
        ingress,
        egress,
    })
}

fn kubernetes_ports(
    ports: Option<&[k8s::NetworkPolicyPort]>,
    what: &str,
) -> Result<Ports, Invalid> {
    let ports = ports.unwrap_or_default();
    if ports.is_empty() {
        return Ok(Ports::All);
    }
    let mut out = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("{what}[{i}]");
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        // Kubernetes has no `ANY`.
        let protocol = Protocol::parse(proto)
            .filter(|p| *p != Protocol::Any)
            .ok_or_else(|| {
                Invalid::new(
                    INVALID_PORT,
                    format!("{at}: protocol {proto:?} is not TCP, UDP or SCTP"),
                )
            })?;
        let port = match &p.port {
            None => None,
            Some(IntOrString::Int(n)) => Some(n.to_string()),
            Some(IntOrString::String(s)) => Some(s.clone()),
        };
        out.extend(port_entries(
            &[protocol],
            port.as_deref(),
            p.end_port,
            &at,
            false,
        )?);
    }
    Ok(Ports::Some(out))
}

/// The entries of one port spec for each of `protocols`. `port` is a number, a name, or
/// absent (every port); `zero_is_all` lets `"0"` mean every port (Tendril).
fn port_entries(
    protocols: &[Protocol],
    port: Option<&str>,
    end_port: Option<i32>,
    at: &str,
    zero_is_all: bool,
) -> Result<Vec<Port>, Invalid> {
    let bad = |m: String| Invalid::new(INVALID_PORT, format!("{at}: {m}"));
    let port = port.map(str::trim).filter(|p| !p.is_empty());
    let (start, end) = match port {
        None => {
            if end_port.is_some() {
                return Err(bad("endPort needs a port".into()));
            }
            (0, 0)
        }
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u32 = p
                .parse()
                .map_err(|_| bad(format!("port {p} is out of range")))?;
            if n == 0 && zero_is_all {
                if end_port.is_some() {
                    return Err(bad("endPort needs a port from 1 to 65535".into()));
                }
                (0, 0)
            } else if !(1..=65535).contains(&n) {
                return Err(bad(format!("port {p} is not between 1 and 65535")));
            } else {
                let end = match end_port {
                    None => n,
                    Some(e) if e >= n as i32 && e <= 65535 => e as u32,
                    Some(e) => {
                        return Err(bad(format!(
                            "endPort {e} must be between port {n} and 65535"
                        )));
                    }
                };
                (n as u16, end as u16)
            }
        }
        Some(name) => {
            if end_port.is_some() {
                return Err(bad(format!(
                    "named port {name:?} cannot have an endPort (ranges need numbers)"
                )));
            }
            if !is_port_name(name) {
                return Err(bad(format!(
                    "{name:?} is neither a port number nor a port name (lowercase letters, digits and '-', at most 15)"
                )));
            }
            return Ok(protocols.iter().map(|&p| Port::named(p, name)).collect());
        }
    };
    Ok(protocols
        .iter()
        .map(|&p| Port::range(p, start, end))
        .collect())
}

/// An IANA service name, as container port names are.
fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

// ---------------------------------------------------------------------------------------
// Tendril NetworkPolicy / ClusterNetworkPolicy.

/// An entity's peer identities (`cluster` → every cluster identity plus the reserved ones
/// inside the cluster).
fn entity(name: &str, index: &IdentityIndex) -> Option<Vec<i64>> {
    if let Some(r) = Reserved::from_name(name) {
        return Some(vec![r.id()]);
    }
    Some(match name {
        ENTITY_ALL => vec![ANY_PEER],
        // Every reserved identity but world.
        ENTITY_CLUSTER => Reserved::ALL
            .into_iter()
            .filter(|r| *r != Reserved::World)
            .map(Reserved::id)
            .chain(index.all().iter().copied())
            .collect(),
        _ => return None,
    })
}

/// The peer fields of a Tendril rule, borrowed from an ingress or an egress rule.
struct TendrilPeers<'a> {
    endpoints: &'a [LabelSelector],
    entities: &'a [String],
    cidrs: &'a [String],
    cidr_sets: &'a [tendril_crds::v1alpha1::CidrRule],
    ports: &'a [PortRule],
}

impl<'a> From<&'a IngressRule> for TendrilPeers<'a> {
    fn from(r: &'a IngressRule) -> Self {
        Self {
            endpoints: &r.from_endpoints,
            entities: &r.from_entities,
            cidrs: &r.from_cidr,
            cidr_sets: &r.from_cidr_set,
            ports: &r.to_ports,
        }
    }
}

impl<'a> From<&'a EgressRule> for TendrilPeers<'a> {
    fn from(r: &'a EgressRule) -> Self {
        Self {
            endpoints: &r.to_endpoints,
            entities: &r.to_entities,
            cidrs: &r.to_cidr,
            cidr_sets: &r.to_cidr_set,
            ports: &r.to_ports,
        }
    }
}

fn tendril(
    spec: &NetworkPolicySpec,
    namespace: Option<&str>,
    index: &mut IdentityIndex,
    source: PolicySource,
) -> Result<Compiled, Invalid> {
    if spec.node_selector.is_some() {
        return Err(Invalid::new(
            UNSUPPORTED,
            "nodeSelector (host policies) is not supported yet; select pods with endpointSelector",
        ));
    }
    let Some(selector) = &spec.endpoint_selector else {
        return Err(Invalid::new(
            INVALID_SELECTOR,
            "endpointSelector is required (use {} to select every pod)",
        ));
    };
    let mut subjects = compile_selector(selector, "endpointSelector", tendril_key)?;
    if let Some(ns) = namespace {
        subjects = subjects.and_equals(POD_NAMESPACE, ns);
    }
    let subjects = index.select(&subjects);

    let mut rules = |list: Vec<TendrilPeers>,
                     verdict: Verdict,
                     what: &str|
     -> Result<Vec<Rule>, Invalid> {
        let mut out = Vec::new();
        for (i, r) in list.into_iter().enumerate() {
            let at = format!("{what}[{i}]");
            let (mut peers, mut cidrs) = (Vec::new(), Vec::new());
            if r.endpoints.is_empty()
                && r.entities.is_empty()
                && r.cidrs.is_empty()
                && r.cidr_sets.is_empty()
            {
                peers.push(ANY_PEER);
            }
            for (j, sel) in r.endpoints.iter().enumerate() {
                let mut sel = compile_selector(sel, &format!("{at} endpoints[{j}]"), tendril_key)?;
                if let Some(ns) = namespace
                    && !sel.mentions(POD_NAMESPACE)
                {
                    sel = sel.and_equals(POD_NAMESPACE, ns);
                }
                peers.extend(index.select(&sel).iter());
            }
            for e in r.entities {
                peers.extend(entity(e, index).ok_or_else(|| {
                    Invalid::new(
                        INVALID_SELECTOR,
                        format!(
                            "{at}: unknown entity {e:?} (one of {})",
                            tendril_crds::v1alpha1::ENTITIES.join(", ")
                        ),
                    )
                })?);
            }
            for c in r.cidrs {
                cidrs.push(parse_cidr(c)?);
            }
            for set in r.cidr_sets {
                cidrs.extend(cidr_minus(&set.cidr, &set.except)?);
            }
            let mut ports = if r.ports.is_empty() {
                Ports::All
            } else {
                Ports::Some(Vec::new())
            };
            for (j, pr) in r.ports.iter().enumerate() {
                for (k, p) in pr.ports.iter().enumerate() {
                    let at = format!("{at}.toPorts[{j}].ports[{k}]");
                    let protocols: &[Protocol] = match p.protocol.as_str() {
                        "" => ALL_PROTOCOLS,
                        other => match Protocol::parse(other) {
                            Some(protocol) => protocol.expand(),
                            None => {
                                return Err(Invalid::new(
                                    INVALID_PORT,
                                    format!(
                                        "{at}: protocol {other:?} is not TCP, UDP, SCTP or ANY"
                                    ),
                                ));
                            }
                        },
                    };
                    let entries = port_entries(protocols, Some(&p.port), p.end_port, &at, true)?;
                    // ANY with every port: every port of every protocol.
                    if protocols.len() == ALL_PROTOCOLS.len() && entries.iter().all(Port::is_all) {
                        ports.add(Ports::All);
                    } else {
                        ports.add(Ports::Some(entries));
                    }
                }
            }
            out.push(Rule {
                verdict,
                peers,
                cidrs,
                ports: ports.into_list(),
            });
        }
        Ok(out)
    };
    let mut ingress = rules(
        spec.ingress.iter().map(Into::into).collect(),
        Verdict::Allow,
        "ingress",
    )?;
    ingress.extend(rules(
        spec.ingress_deny.iter().map(Into::into).collect(),
        Verdict::Deny,
        "ingressDeny",
    )?);
    let mut egress = rules(
        spec.egress.iter().map(Into::into).collect(),
        Verdict::Allow,
        "egress",
    )?;
    egress.extend(rules(
        spec.egress_deny.iter().map(Into::into).collect(),
        Verdict::Deny,
        "egressDeny",
    )?);
    let switch = spec.enable_default_deny.clone().unwrap_or_default();
    let default_deny = ResolvedDefaultDeny {
        ingress: switch
            .ingress
            .unwrap_or(!spec.ingress.is_empty() || !spec.ingress_deny.is_empty()),
        egress: switch
            .egress
            .unwrap_or(!spec.egress.is_empty() || !spec.egress_deny.is_empty()),
    };
    Ok(Compiled {
        source,
        subjects,
        default_deny,
        ingress,
        egress,
    })
}

#[cfg(test)]
#[path = "resolve_tests.rs"]
mod tests;
