//! Translation of `ResolvedPolicy` objects into the node's policy maps: a pure function of
//! the policies of the local endpoints' identities, the endpoints' named ports and the
//! node's current CIDR identity allocation (POLICY_SPEC §1–§4).
//!
//! - Every local endpoint whose identity has a `ResolvedPolicy` gets a `policy_state`
//!   (revision, default-deny flags) and its entries, keyed by its endpoint id. Endpoints
//!   without one get nothing: no state means no policy (allow all).
//! - CIDRs: every IPv4 and IPv6 prefix a local endpoint's policy names gets a node-local
//!   identity `1<<24 | n`; ids already allocated (read back from the pinned map) are kept, so
//!   a restart changes nothing. The datapath looks up the longest node prefix of the peer's
//!   family containing the peer's address, so a rule naming prefix P applies to the ids of
//!   every node prefix inside P (never to a prefix of the other family).
//! - Ports: protocol `ANY` with a port → TCP, UDP and SCTP; `ANY` port 0 → every protocol
//!   and port; ranges → aligned LPM blocks; named ports resolve against the subject's own
//!   named ports (ingress) or every endpoint's (egress); an unresolvable name yields no
//!   entry (it matches nothing).
//! - A key produced by several rules with different verdicts is `Deny`, then denies are
//!   propagated into the allows they contain ([`propagate_denies`]).

use crate::bpf::maps::Direction;
use crate::bpf::policy::{
    LOCAL_IDENTITY_FLAG, POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS,
    POLICY_F_SELECTED, PROTO_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyEntry, PolicyState,
    Verdict, deny_flags, port_range_prefixes, propagate_denies,
};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tendril_crds::v1alpha1::{
    self as api, NamedPort, ResolvedPolicySpec, ResolvedPort, ResolvedRule,
};

/// The largest `n` of a node-local CIDR identity `1<<24 | n`.
const MAX_LOCAL_CIDR_INDEX: u32 = LOCAL_IDENTITY_FLAG - 1;

/// One local endpoint as the policy translation sees it.
#[derive(Clone, Debug)]
pub struct PolicySubject<'a> {
    pub endpoint_id: u16,
    /// The policy to enforce for it (its identity's `ResolvedPolicy`), if any.
    pub policy: Option<&'a ResolvedPolicySpec>,
    /// The endpoint's own named ports (ingress named ports resolve against these).
    pub named_ports: &'a [NamedPort],
}

/// (name, IP protocol) → ports, over every endpoint of the cluster (egress named ports).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterNamedPorts(BTreeMap<(String, u8), BTreeSet<u16>>);

impl ClusterNamedPorts {
    pub fn from_endpoints<'a>(ports: impl IntoIterator<Item = &'a [NamedPort]>) -> Self {
        let mut out = Self::default();
        for list in ports {
            for p in list {
                out.insert(p);
            }
        }
        out
    }

    pub fn insert(&mut self, port: &NamedPort) {
        let (Some(protocol), Ok(number)) =
            (protocol_number(&port.protocol), u16::try_from(port.port))
        else {
            return;
        };
        if protocol == PROTO_ANY || number == 0 {
            return;
        }
        self.0
            .entry((port.name.clone(), protocol))
            .or_default()
            .insert(number);
    }

    fn ports(&self, name: &str, protocol: u8) -> impl Iterator<Item = u16> + '_ {
        self.0
            .get(&(name.to_string(), protocol))
            .into_iter()
            .flatten()
            .copied()
    }
}

/// One local endpoint's share of a translation and what it was made from (besides the
/// node's CIDR ids and the cluster's named ports, kept once in [`DesiredPolicy`]): the next
/// translation reuses it when none of that changed.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointPolicy {
    spec: ResolvedPolicySpec,
    named_ports: Vec<NamedPort>,
    pub entries: BTreeMap<PolicyEntry, Verdict>,
    problems: Vec<String>,
}

/// What the policy maps of the node should hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredPolicy {
    pub entries: BTreeMap<PolicyEntry, Verdict>,
    /// `entries` by endpoint (those with a policy), each with what it was made from.
    pub by_endpoint: BTreeMap<u16, Arc<EndpointPolicy>>,
    /// The cluster's named ports the entries were made with.
    cluster_ports: ClusterNamedPorts,
    pub states: BTreeMap<u16, PolicyState>,
    /// `policy_cidrs`: every prefix (both families) named by a local endpoint's policy →
    /// its id.
    pub cidrs: BTreeMap<IpNet, u32>,
    /// Endpoint id → the `ResolvedPolicy` revision its entries and state realize.
    pub revisions: BTreeMap<u16, i64>,
    /// Things that could not be translated (unparseable CIDR, unknown protocol, …); the
    /// rest of the policy is still in (each item narrows what is allowed, never widens).
    pub problems: Vec<String>,
}

/// IANA protocol number of a `ResolvedPort.protocol`; `ANY` → [`PROTO_ANY`].
fn resolved_protocol_number(protocol: api::Protocol) -> u8 {
    protocol.number().unwrap_or(PROTO_ANY)
}

/// IANA protocol number of a named port's protocol (`NamedPort.protocol`, as in the pod
/// spec); `ANY` or empty → [`PROTO_ANY`].
pub fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Some(PROTO_TCP),
        "UDP" => Some(PROTO_UDP),
        "SCTP" => Some(PROTO_SCTP),
        "ANY" | "" => Some(PROTO_ANY),
        _ => None,
    }
}

const ALL_PROTOCOLS: [u8; 3] = [PROTO_TCP, PROTO_UDP, PROTO_SCTP];

/// (protocol, first port, prefix bits) blocks one `ResolvedPort` covers for an endpoint.
fn port_blocks(
    port: &ResolvedPort,
    direction: Direction,
    own: &[NamedPort],
    cluster: &ClusterNamedPorts,
    problems: &mut Vec<String>,
) -> Vec<(u8, u16, u8)> {
    let protocol = resolved_protocol_number(port.protocol);
    let protocols: &[u8] = if protocol == PROTO_ANY {
        &ALL_PROTOCOLS
    } else {
        std::slice::from_ref(&protocol)
    };
    if let Some(name) = port.name.as_deref().filter(|n| !n.is_empty()) {
        let mut out = BTreeSet::new();
        for &proto in protocols {
            match direction {
                Direction::Ingress => {
                    for p in own {
                        if p.name == name
                            && protocol_number(&p.protocol) == Some(proto)
                            && let Ok(number) = u16::try_from(p.port)
                        {
                            out.insert((proto, number, 16));
                        }
                    }
                }
                Direction::Egress => {
                    out.extend(cluster.ports(name, proto).map(|n| (proto, n, 16)));
                }
            }
        }
        return out.into_iter().collect();
    }
    let (Ok(start), Ok(end)) = (
        u16::try_from(port.port),
        u16::try_from(port.end_port.unwrap_or(port.port)),
    ) else {
        problems.push(format!("port out of range: {port:?}"));
        return Vec::new();
    };
    if start == 0 && port.end_port.is_none() {
        // Port 0: every port of the protocol; ANY + 0 is every protocol.
        return if protocol == PROTO_ANY {
            vec![(PROTO_ANY, 0, 0)]
        } else {
            vec![(protocol, 0, 0)]
        };
    }
    let blocks = port_range_prefixes(start, end);
    protocols
        .iter()
        .flat_map(|&proto| blocks.iter().map(move |&(p, bits)| (proto, p, bits)))
        .collect()
}

/// Node-local ids for `prefixes`: the ones `current` holds keep theirs; new ones take the
/// lowest free index, never one `current` still holds (its entries may still be in the
/// policy map until this pass prunes them).
pub fn allocate_cidr_ids(
    prefixes: &BTreeSet<IpNet>,
    current: &BTreeMap<IpNet, u32>,
) -> (BTreeMap<IpNet, u32>, Vec<String>) {
    let taken: BTreeSet<u32> = current.values().copied().collect();
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    let mut next = 1u32;
    for prefix in prefixes {
        let net = *prefix;
        if let Some(id) = current.get(&net) {
            out.insert(net, *id);
            continue;
        }
        while taken.contains(&(LOCAL_IDENTITY_FLAG | next)) {
            next += 1;
        }
        if next > MAX_LOCAL_CIDR_INDEX {
            problems.push(format!("no node-local CIDR identity left for {net}"));
            continue;
        }
        out.insert(net, LOCAL_IDENTITY_FLAG | next);
        next += 1;
    }
    (out, problems)
}

fn parse_net(cidr: &str, problems: &mut Vec<String>) -> Option<IpNet> {
    match cidr.parse::<IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            problems.push(format!("unparseable CIDR {cidr:?}"));
            None
        }
    }
}

/// A prefix as (family, first address, length), both families in one ordered space: the
/// prefixes inside P are those from P's first to P's last address with a length of at
/// least P's.
fn prefix_span(net: &IpNet) -> ((bool, u128), (bool, u128), u8) {
    match net {
        IpNet::V4(v4) => (
            (false, u128::from(u32::from(v4.network()))),
            (false, u128::from(u32::from(v4.broadcast()))),
            v4.prefix_len(),
        ),
        IpNet::V6(v6) => (
            (true, u128::from(v6.network())),
            (true, u128::from(v6.broadcast())),
            v6.prefix_len(),
        ),
    }
}

fn rule_verdict(rule: &ResolvedRule) -> Verdict {
    match rule.verdict {
        api::Verdict::Allow => Verdict::Allow,
        api::Verdict::Deny => Verdict::Deny,
    }
}

/// Whether some policy selects the endpoint: the ResolvedPolicy every identity has is
/// empty (no source, rule or default deny) until one does. The datapath drops the IPv6 of
/// selected endpoints while it enforces no IPv6 policy (bpf/lib/ipv6.h).
fn is_selected(spec: &ResolvedPolicySpec) -> bool {
    !spec.sources.is_empty()
        || !spec.ingress.is_empty()
        || !spec.egress.is_empty()
        || spec.default_deny.ingress
        || spec.default_deny.egress
}

fn rules(spec: &ResolvedPolicySpec) -> impl Iterator<Item = (Direction, &ResolvedRule)> {
    spec.ingress
        .iter()
        .map(|r| (Direction::Ingress, r))
        .chain(spec.egress.iter().map(|r| (Direction::Egress, r)))
}

impl DesiredPolicy {
    /// The same content as `other`, cheaply when `other` is the translation this one
    /// reused its endpoints' entries from ([`translate_reusing`]).
    pub fn same_as(&self, other: &DesiredPolicy) -> bool {
        self.cidrs == other.cidrs
            && self.states == other.states
            && self.revisions == other.revisions
            && self.problems == other.problems
            && self.by_endpoint.len() == other.by_endpoint.len()
            && self
                .by_endpoint
                .iter()
                .zip(&other.by_endpoint)
                .all(|((a, pa), (b, pb))| a == b && (Arc::ptr_eq(pa, pb) || pa == pb))
    }

    /// The endpoints whose entries differ from `previous`'s (gained, lost or changed).
    pub fn changed_endpoints(&self, previous: &DesiredPolicy) -> BTreeSet<u16> {
        let mut out: BTreeSet<u16> = previous
            .by_endpoint
            .keys()
            .filter(|id| !self.by_endpoint.contains_key(id))
            .copied()
            .collect();
        for (id, now) in &self.by_endpoint {
            match previous.by_endpoint.get(id) {
                Some(before) if Arc::ptr_eq(before, now) || before.entries == now.entries => {}
                _ => {
                    out.insert(*id);
                }
            }
        }
        out
    }
}

/// The policy maps' desired content for `subjects` (see the module documentation).
pub fn translate(
    subjects: &[PolicySubject<'_>],
    cluster_ports: &ClusterNamedPorts,
    current_cidrs: &BTreeMap<IpNet, u32>,
) -> DesiredPolicy {
    translate_reusing(subjects, cluster_ports, current_cidrs, None)
}

/// [`translate`], reusing the entries of every endpoint whose policy, named ports, the
/// node's CIDR ids and the cluster's named ports equal those `previous` was made from: a
/// change of one identity's policy translates only its endpoints again.
pub fn translate_reusing(
    subjects: &[PolicySubject<'_>],
    cluster_ports: &ClusterNamedPorts,
    current_cidrs: &BTreeMap<IpNet, u32>,
    previous: Option<&DesiredPolicy>,
) -> DesiredPolicy {
    let mut out = DesiredPolicy {
        cluster_ports: cluster_ports.clone(),
        ..DesiredPolicy::default()
    };
    let with_policy: Vec<(&PolicySubject<'_>, &ResolvedPolicySpec)> = subjects
        .iter()
        .filter_map(|s| s.policy.map(|p| (s, p)))
        .collect();

    // Every prefix the local policies name, once per distinct policy.
    let mut prefixes = BTreeSet::new();
    let mut seen_policies = BTreeSet::new();
    for (_, spec) in &with_policy {
        if !seen_policies.insert((spec.identity, spec.revision)) {
            continue;
        }
        for (_, rule) in rules(spec) {
            for cidr in &rule.cidrs {
                if let Some(net) = parse_net(cidr, &mut out.problems) {
                    prefixes.insert(net);
                }
            }
        }
    }
    let (cidrs, problems) = allocate_cidr_ids(&prefixes, current_cidrs);
    out.cidrs = cidrs;
    out.problems.extend(problems);
    let reusable = previous.filter(|p| p.cidrs == out.cidrs && p.cluster_ports == *cluster_ports);
    // Node prefixes by (family, first address, length): those inside a rule prefix P are
    // the ones starting within P's addresses with a length of at least P's — a range query.
    let node_prefixes: BTreeMap<((bool, u128), u8), u32> = out
        .cidrs
        .iter()
        .map(|(net, id)| {
            let (first, _, len) = prefix_span(net);
            ((first, len), *id)
        })
        .collect();
    let mut within_cache: BTreeMap<IpNet, Vec<u32>> = BTreeMap::new();
    let mut ids_within = |rule_prefix: IpNet| -> Vec<u32> {
        within_cache
            .entry(rule_prefix)
            .or_insert_with(|| {
                let (first, last, len) = prefix_span(&rule_prefix);
                node_prefixes
                    .range((first, 0)..=(last, 128))
                    .filter(|((_, l), _)| *l >= len)
                    .map(|(_, id)| *id)
                    .collect()
            })
            .clone()
    };

    for (subject, spec) in with_policy {
        let mut flags = 0;
        if spec.default_deny.ingress {
            flags |= POLICY_F_DEFAULT_DENY_INGRESS;
        }
        if spec.default_deny.egress {
            flags |= POLICY_F_DEFAULT_DENY_EGRESS;
        }
        if is_selected(spec) {
            flags |= POLICY_F_SELECTED;
        }
        // The low 32 bits: the conntrack epoch only has to differ between revisions.
        let revision = (spec.revision as u64 & u64::from(u32::MAX)) as u32;
        out.revisions.insert(subject.endpoint_id, spec.revision);
        let kept = reusable
            .and_then(|p| p.by_endpoint.get(&subject.endpoint_id))
            .filter(|p| p.named_ports == subject.named_ports && p.spec == *spec);
        if let Some(kept) = kept {
            flags |= deny_flags(&kept.entries);
            out.states
                .insert(subject.endpoint_id, PolicyState { revision, flags });
            out.by_endpoint.insert(subject.endpoint_id, kept.clone());
            continue;
        }
        let mut entries = BTreeMap::new();
        let mut problems = Vec::new();
        for (direction, rule) in rules(spec) {
            let verdict = rule_verdict(rule);
            let mut peers: BTreeSet<u32> = rule
                .peers
                .iter()
                .filter_map(|p| u32::try_from(*p).ok())
                .collect();
            for cidr in &rule.cidrs {
                // Problems were recorded while collecting prefixes.
                if let Some(net) = parse_net(cidr, &mut Vec::new()) {
                    peers.extend(ids_within(net));
                }
            }
            if peers.is_empty() {
                // Only invalid peers: it matches nothing here (never "any").
                continue;
            }
            let blocks: Vec<(u8, u16, u8)> = if rule.ports.is_empty() {
                vec![(PROTO_ANY, 0, 0)]
            } else {
                let mut blocks = BTreeSet::new();
                for port in &rule.ports {
                    blocks.extend(port_blocks(
                        port,
                        direction,
                        subject.named_ports,
                        cluster_ports,
                        &mut problems,
                    ));
                }
                blocks.into_iter().collect()
            };
            for peer in peers {
                for &(protocol, port, port_prefix) in &blocks {
                    let key = PolicyEntry {
                        endpoint_id: subject.endpoint_id,
                        direction,
                        peer,
                        protocol,
                        port,
                        port_prefix,
                    };
                    entries
                        .entry(key)
                        .and_modify(|v| {
                            if verdict == Verdict::Deny {
                                *v = Verdict::Deny;
                            }
                        })
                        .or_insert(verdict);
                }
            }
        }
        // Denies propagate within one endpoint, direction and peer only.
        propagate_denies(&mut entries);
        flags |= deny_flags(&entries);
        out.states
            .insert(subject.endpoint_id, PolicyState { revision, flags });
        out.by_endpoint.insert(
            subject.endpoint_id,
            Arc::new(EndpointPolicy {
                spec: spec.clone(),
                named_ports: subject.named_ports.to_vec(),
                entries,
                problems,
            }),
        );
    }
    // Keys start with the endpoint id: in endpoint order, the chained maps are sorted.
    out.entries = out
        .by_endpoint
        .values()
        .flat_map(|p| p.entries.iter().map(|(k, v)| (*k, *v)))
        .collect();
    for p in out.by_endpoint.values() {
        out.problems.extend(p.problems.iter().cloned());
    }
    out.problems.sort();
    out.problems.dedup();
    out
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
