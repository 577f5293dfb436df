//! `tendrilctl policy trace`: the verdict the datapath gives a packet between two endpoints,
//! and the rules that give it, computed from the ResolvedPolicies with the agent's own
//! translation ([`translate`]) and the lookup order of `bpf/lib/policy.h`'s `policy_decide`:
//!
//! - an endpoint whose identity has no ResolvedPolicy has no `policy_state`: everything
//!   passes;
//! - otherwise three longest-prefix lookups in the endpoint's entries (the peer's identity,
//!   the node-local CIDR identity of the peer's address, any peer); a `Deny` found in any of
//!   them wins, else an `Allow` allows, else the endpoint's default for the direction
//!   (deny only when the direction is in default deny).
//!
//! A packet from A to B is judged twice: at A's egress (peer B) and at B's ingress (peer A);
//! it passes when both allow. A pod reaching itself goes over loopback and is never judged.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnet::IpNet;
use serde::Serialize;
use tendril_crds::v1alpha1::{NamedPort, PolicySource, ResolvedPolicySpec, ResolvedRule};

use crate::agent::pass::policy::{ClusterNamedPorts, DesiredPolicy, PolicySubject, translate};
use crate::bpf::maps::Direction;
use crate::bpf::policy::{
    PROTO_ANY, PROTO_ICMP, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PolicyEntry, Verdict, port_mask,
};

/// The packet being traced: IP protocol number and destination port (0 for ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Packet {
    pub protocol: u8,
    pub port: u16,
}

impl Packet {
    /// `80/TCP`, `53/udp`, `81` (TCP), `ICMP`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (port, proto) = match s.split_once('/') {
            Some((p, proto)) => (p, proto),
            None if s.eq_ignore_ascii_case("icmp") => ("0", "ICMP"),
            None => (s, "TCP"),
        };
        let protocol = match proto.to_ascii_uppercase().as_str() {
            "TCP" => PROTO_TCP,
            "UDP" => PROTO_UDP,
            "SCTP" => PROTO_SCTP,
            "ICMP" => PROTO_ICMP,
            other => {
                return Err(format!(
                    "unknown protocol {other:?} (TCP, UDP, SCTP or ICMP)"
                ));
            }
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{port:?} is not a port number (0-65535)"))?;
        if protocol != PROTO_ICMP && port == 0 {
            return Err(format!("{s:?}: a TCP/UDP/SCTP port is 1-65535"));
        }
        Ok(Self {
            protocol,
            port: if protocol == PROTO_ICMP { 0 } else { port },
        })
    }

    pub fn protocol_name(&self) -> &'static str {
        protocol_name(self.protocol)
    }
}

impl std::fmt::Display for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.protocol == PROTO_ICMP {
            f.write_str("ICMP")
        } else {
            write!(f, "{}/{}", self.port, self.protocol_name())
        }
    }
}

pub fn protocol_name(protocol: u8) -> &'static str {
    match protocol {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        PROTO_ICMP => "ICMP",
        PROTO_ANY => "ANY",
        _ => "other",
    }
}

/// One side's view: the endpoint whose policy judges, and the peer it sees.
#[derive(Clone, Debug)]
pub struct Side<'a> {
    /// The ResolvedPolicy of the judging endpoint's identity, if any.
    pub policy: Option<&'a ResolvedPolicySpec>,
    /// The judging endpoint's named ports (ingress named ports resolve against them).
    pub named_ports: &'a [NamedPort],
    /// The peer's security identity and address.
    pub peer_identity: u32,
    pub peer_ip: Option<Ipv4Addr>,
}

/// Why a direction gave its verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Because {
    /// The endpoint's identity has no ResolvedPolicy: nothing is enforced.
    NoPolicy,
    /// A policy entry matched (see `rules`).
    Rule,
    /// No entry matched and the direction is in default deny.
    DefaultDeny,
    /// No entry matched and the direction is not in default deny.
    DefaultAllow,
}

/// Which lookup of `policy_decide` found the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum MatchedOn {
    PeerIdentity,
    PeerCidr,
    AnyPeer,
}

/// The entry of the policy map that decided, as the agent writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchedEntry {
    pub on: MatchedOn,
    /// The entry's peer: an identity, a node-local CIDR identity, or 0 (any).
    pub peer: u32,
    /// `ANY`, or the protocol with the port block (`80/16` = exactly 80, `64/10` = 64-127).
    pub key: String,
}

/// One rule of the ResolvedPolicy that, alone, gives the verdict for this packet.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    /// Index in the ResolvedPolicy's `ingress` / `egress` list.
    pub index: usize,
    pub rule: ResolvedRule,
}

/// The judgement of one direction.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectionVerdict {
    pub allowed: bool,
    pub because: Because,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<MatchedEntry>,
    /// The rules that give the verdict (several when more than one rule matches).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
    /// The ResolvedPolicy (its name is the subject identity) and the policies behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_policy: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<PolicySource>,
}

impl DirectionVerdict {
    /// One line for a table: `allow (rule ingress[0])`, `deny (default deny)`, ….
    pub fn summary(&self, direction: Direction) -> String {
        let verdict = if self.allowed { "allow" } else { "deny" };
        let dir = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        match self.because {
            Because::NoPolicy => format!("{verdict} (no policy)"),
            Because::DefaultDeny => format!("{verdict} (default deny)"),
            Because::DefaultAllow => format!("{verdict} (not in default deny)"),
            Because::Rule => {
                let rules: Vec<String> = self
                    .rules
                    .iter()
                    .map(|r| format!("{dir}[{}]", r.index))
                    .collect();
                format!(
                    "{verdict} (rp/{} {})",
                    self.resolved_policy.as_deref().unwrap_or("?"),
                    rules.join(",")
                )
            }
        }
    }
}

fn describe_rule(rule: &ResolvedRule) -> String {
    let verdict = match rule.verdict {
        tendril_crds::v1alpha1::Verdict::Allow => "allow",
        tendril_crds::v1alpha1::Verdict::Deny => "deny",
    };
    let mut peers: Vec<String> = rule
        .peers
        .iter()
        .map(|p| u32::try_from(*p).map_or_else(|_| p.to_string(), super::identity_name))
        .collect();
    peers.extend(rule.cidrs.iter().cloned());
    let ports: Vec<String> = rule
        .ports
        .iter()
        .map(|p| {
            let proto = format!("{:?}", p.protocol).to_ascii_uppercase();
            match (&p.name, p.end_port) {
                (Some(name), _) if !name.is_empty() => format!("{name}/{proto}"),
                (_, Some(end)) => format!("{}-{end}/{proto}", p.port),
                _ if p.port == 0 => format!("all/{proto}"),
                _ => format!("{}/{proto}", p.port),
            }
        })
        .collect();
    format!(
        "{verdict} peers [{}] ports [{}]",
        peers.join(", "),
        if ports.is_empty() {
            "all".to_string()
        } else {
            ports.join(", ")
        }
    )
}

impl DirectionVerdict {
    /// The full explanation, one item per line, for a single trace.
    pub fn explain(&self, direction: Direction, at: &str) -> Vec<String> {
        let dir = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let mut out = vec![format!(
            "{dir} at {at}: {}",
            if self.allowed { "ALLOWED" } else { "DENIED" }
        )];
        match &self.resolved_policy {
            None => out.push("  no ResolvedPolicy for its identity: nothing enforced".into()),
            Some(rp) => {
                let sources: Vec<String> = self
                    .sources
                    .iter()
                    .map(|s| match &s.namespace {
                        Some(ns) => format!("{} {ns}/{}", s.kind.as_str(), s.name),
                        None => format!("{} {}", s.kind.as_str(), s.name),
                    })
                    .collect();
                out.push(format!(
                    "  ResolvedPolicy {rp}, from: {}",
                    if sources.is_empty() {
                        "-".to_string()
                    } else {
                        sources.join(", ")
                    }
                ));
            }
        }
        match self.because {
            Because::NoPolicy => {}
            Because::DefaultDeny => {
                out.push(format!("  no entry matches; {dir} is in default deny"));
            }
            Because::DefaultAllow => {
                out.push(format!("  no entry matches; {dir} is not in default deny"));
            }
            Because::Rule => {
                if let Some(e) = &self.entry {
                    let on = match e.on {
                        MatchedOn::PeerIdentity => "the peer's identity",
                        MatchedOn::PeerCidr => "the CIDR identity of the peer's address",
                        MatchedOn::AnyPeer => "any peer",
                    };
                    out.push(format!(
                        "  entry: {} for {on} (peer {})",
                        e.key,
                        super::identity_name(e.peer)
                    ));
                }
                for r in &self.rules {
                    out.push(format!(
                        "  rule {dir}[{}]: {}",
                        r.index,
                        describe_rule(&r.rule)
                    ));
                }
            }
        }
        out
    }
}

/// The decision of `policy_decide` on translated entries: (allowed, because, entry).
fn decide(
    desired: &DesiredPolicy,
    direction: Direction,
    side: &Side<'_>,
    packet: Packet,
) -> (bool, Because, Option<MatchedEntry>) {
    let Some(state) = desired.states.get(&SUBJECT_ID) else {
        return (true, Because::NoPolicy, None);
    };
    let cidr_identity = side.peer_ip.and_then(|ip| longest_cidr(&desired.cidrs, ip));
    let lookups = [
        (MatchedOn::PeerIdentity, Some(side.peer_identity)),
        (MatchedOn::PeerCidr, cidr_identity),
        (MatchedOn::AnyPeer, Some(0)),
    ];
    let mut allow: Option<MatchedEntry> = None;
    for (on, peer) in lookups {
        let Some(peer) = peer else { continue };
        if let Some((entry, verdict)) = lookup(&desired.entries, direction, peer, packet) {
            let matched = MatchedEntry {
                on,
                peer,
                key: entry_key(&entry),
            };
            match verdict {
                Verdict::Deny => return (false, Because::Rule, Some(matched)),
                Verdict::Allow => {
                    allow.get_or_insert(matched);
                }
            }
        }
    }
    if let Some(matched) = allow {
        return (true, Because::Rule, Some(matched));
    }
    let flag = match direction {
        Direction::Ingress => crate::bpf::policy::POLICY_F_DEFAULT_DENY_INGRESS,
        Direction::Egress => crate::bpf::policy::POLICY_F_DEFAULT_DENY_EGRESS,
    };
    if state.flags & flag != 0 {
        (false, Because::DefaultDeny, None)
    } else {
        (true, Because::DefaultAllow, None)
    }
}

/// The endpoint id the trace translates under (any id: one subject at a time).
const SUBJECT_ID: u16 = 1;

/// The longest-prefix match of the policy map for (direction, peer, packet).
fn lookup(
    entries: &BTreeMap<PolicyEntry, Verdict>,
    direction: Direction,
    peer: u32,
    packet: Packet,
) -> Option<(PolicyEntry, Verdict)> {
    // The datapath keys ports only for protocols that have them.
    let port = match packet.protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => packet.port,
        _ => 0,
    };
    entries
        .iter()
        .filter(|(e, _)| e.endpoint_id == SUBJECT_ID && e.direction == direction && e.peer == peer)
        .filter(|(e, _)| {
            e.protocol == PROTO_ANY
                || (e.protocol == packet.protocol
                    && port_mask(e.port_prefix) & (port ^ e.port) == 0)
        })
        .max_by_key(|(e, _)| e.to_key().prefixlen)
        .map(|(e, v)| (*e, *v))
}

fn longest_cidr(cidrs: &BTreeMap<IpNet, u32>, ip: Ipv4Addr) -> Option<u32> {
    cidrs
        .iter()
        .filter(|(net, _)| net.contains(&std::net::IpAddr::V4(ip)))
        .max_by_key(|(net, _)| net.prefix_len())
        .map(|(_, id)| *id)
}

fn entry_key(e: &PolicyEntry) -> String {
    if e.protocol == PROTO_ANY {
        "ANY".to_string()
    } else if e.port_prefix == 0 {
        format!("{} every port", protocol_name(e.protocol))
    } else if e.port_prefix >= 16 {
        format!("{}/{}", e.port, protocol_name(e.protocol))
    } else {
        let last = e.port | !port_mask(e.port_prefix);
        format!("{}-{}/{}", e.port, last, protocol_name(e.protocol))
    }
}

fn translate_one(
    spec: &ResolvedPolicySpec,
    side: &Side<'_>,
    cluster_ports: &ClusterNamedPorts,
) -> DesiredPolicy {
    translate(
        &[PolicySubject {
            endpoint_id: SUBJECT_ID,
            policy: Some(spec),
            named_ports: side.named_ports,
        }],
        cluster_ports,
        &BTreeMap::new(),
    )
}

/// Judges `packet` in `direction` at the endpoint `side` describes.
pub fn judge(
    direction: Direction,
    side: &Side<'_>,
    cluster_ports: &ClusterNamedPorts,
    packet: Packet,
) -> DirectionVerdict {
    let Some(spec) = side.policy else {
        return DirectionVerdict {
            allowed: true,
            because: Because::NoPolicy,
            entry: None,
            rules: Vec::new(),
            resolved_policy: None,
            sources: Vec::new(),
        };
    };
    let desired = translate_one(spec, side, cluster_ports);
    let (allowed, because, entry) = decide(&desired, direction, side, packet);
    // The rules behind a matched entry: each rule of the direction translated alone (with
    // the same named ports and CIDR handling) and judged the same way.
    let mut rules = Vec::new();
    if because == Because::Rule {
        let list = match direction {
            Direction::Ingress => &spec.ingress,
            Direction::Egress => &spec.egress,
        };
        for (index, rule) in list.iter().enumerate() {
            let mut alone = ResolvedPolicySpec {
                identity: spec.identity,
                revision: spec.revision,
                default_deny: Default::default(),
                ingress: Vec::new(),
                egress: Vec::new(),
                sources: Vec::new(),
            };
            match direction {
                Direction::Ingress => alone.ingress.push(rule.clone()),
                Direction::Egress => alone.egress.push(rule.clone()),
            }
            let one = translate_one(&alone, side, cluster_ports);
            let (rule_allows, rule_because, _) = decide(&one, direction, side, packet);
            if rule_because == Because::Rule && rule_allows == allowed {
                rules.push(RuleRef {
                    index,
                    rule: rule.clone(),
                });
            }
        }
    }
    DirectionVerdict {
        allowed,
        because,
        entry,
        rules,
        resolved_policy: Some(spec.identity.to_string()),
        sources: spec.sources.clone(),
    }
}

/// The whole trace of one packet from one endpoint to another.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trace {
    pub from: String,
    pub to: String,
    pub port: String,
    pub allowed: bool,
    /// Set when source and destination are the same pod (loopback, never judged).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub loopback: bool,
    /// At the source's egress (peer: the destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress: Option<DirectionVerdict>,
    /// At the destination's ingress (peer: the source).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingress: Option<DirectionVerdict>,
    /// Why the datapath may answer differently right now (a revision not yet realized).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One endpoint as the trace needs it.
#[derive(Clone, Debug)]
pub struct TraceEndpoint<'a> {
    /// `namespace/pod`.
    pub name: String,
    pub identity: u32,
    pub ip: Option<Ipv4Addr>,
    pub named_ports: &'a [NamedPort],
    pub policy: Option<&'a ResolvedPolicySpec>,
    /// The ResolvedPolicy revision the node's datapath enforces for it (Endpoint status).
    pub realized_policy_revision: Option<i64>,
}

impl TraceEndpoint<'_> {
    /// Set when the datapath does not enforce the current ResolvedPolicy yet.
    fn pending(&self) -> Option<String> {
        let policy = self.policy?;
        (self.realized_policy_revision != Some(policy.revision)).then(|| {
            format!(
                "{} enforces ResolvedPolicy revision {}, not yet {}: its node may still judge by the older one",
                self.name,
                self.realized_policy_revision
                    .map_or("none".to_string(), |r| r.to_string()),
                policy.revision
            )
        })
    }
}

/// Traces `packet` from `from` to `to` (both directions).
pub fn trace(
    from: &TraceEndpoint<'_>,
    to: &TraceEndpoint<'_>,
    cluster_ports: &ClusterNamedPorts,
    packet: Packet,
) -> Trace {
    if from.name == to.name {
        return Trace {
            from: from.name.clone(),
            to: to.name.clone(),
            port: packet.to_string(),
            allowed: true,
            loopback: true,
            egress: None,
            ingress: None,
            warnings: Vec::new(),
        };
    }
    let egress = judge(
        Direction::Egress,
        &Side {
            policy: from.policy,
            named_ports: from.named_ports,
            peer_identity: to.identity,
            peer_ip: to.ip,
        },
        cluster_ports,
        packet,
    );
    let ingress = judge(
        Direction::Ingress,
        &Side {
            policy: to.policy,
            named_ports: to.named_ports,
            peer_identity: from.identity,
            peer_ip: from.ip,
        },
        cluster_ports,
        packet,
    );
    Trace {
        from: from.name.clone(),
        to: to.name.clone(),
        port: packet.to_string(),
        allowed: egress.allowed && ingress.allowed,
        loopback: false,
        egress: Some(egress),
        ingress: Some(ingress),
        warnings: [from.pending(), to.pending()]
            .into_iter()
            .flatten()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::{ResolvedDefaultDeny, ResolvedPort};

    fn rule(verdict: &str, peers: &[i64], cidrs: &[&str], ports: &[(&str, i32)]) -> ResolvedRule {
        ResolvedRule {
            verdict: verdict.parse().unwrap(),
            peers: peers.to_vec(),
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            ports: ports
                .iter()
                .map(|(proto, port)| ResolvedPort {
                    port: *port,
                    end_port: None,
                    name: None,
                    protocol: proto.parse().unwrap(),
                })
                .collect(),
        }
    }

    fn spec(ingress: Vec<ResolvedRule>, deny_ingress: bool) -> ResolvedPolicySpec {
        ResolvedPolicySpec {
            identity: 300,
            revision: 4,
            default_deny: ResolvedDefaultDeny {
                ingress: deny_ingress,
                egress: false,
            },
            ingress,
            egress: Vec::new(),
            sources: Vec::new(),
        }
    }

    fn at_ingress(
        spec: &ResolvedPolicySpec,
        peer: u32,
        ip: &str,
        packet: &str,
    ) -> DirectionVerdict {
        judge(
            Direction::Ingress,
            &Side {
                policy: Some(spec),
                named_ports: &[],
                peer_identity: peer,
                peer_ip: Some(ip.parse().unwrap()),
            },
            &ClusterNamedPorts::default(),
            Packet::parse(packet).unwrap(),
        )
    }

    #[test]
    fn packets_parse_with_tcp_as_the_default() {
        assert_eq!(
            Packet::parse("80").unwrap(),
            Packet {
                protocol: PROTO_TCP,
                port: 80
            }
        );
        assert_eq!(Packet::parse("53/udp").unwrap().protocol, PROTO_UDP);
        assert_eq!(Packet::parse("icmp").unwrap().port, 0);
        assert!(Packet::parse("80/GRE").is_err());
        assert!(Packet::parse("0/TCP").is_err());
        assert!(Packet::parse("http/TCP").is_err());
    }

    #[test]
    fn no_policy_allows_and_default_deny_applies_only_when_selected() {
        let v = judge(
            Direction::Ingress,
            &Side {
                policy: None,
                named_ports: &[],
                peer_identity: 5,
                peer_ip: None,
            },
            &ClusterNamedPorts::default(),
            Packet::parse("80/TCP").unwrap(),
        );
        assert!(v.allowed);
        assert_eq!(v.because, Because::NoPolicy);

        let denying = spec(vec![rule("Allow", &[301], &[], &[("TCP", 80)])], true);
        let v = at_ingress(&denying, 302, "10.0.0.2", "80/TCP");
        assert_eq!((v.allowed, v.because), (false, Because::DefaultDeny));
        let open = spec(vec![rule("Allow", &[301], &[], &[("TCP", 80)])], false);
        let v = at_ingress(&open, 302, "10.0.0.2", "80/TCP");
        assert_eq!((v.allowed, v.because), (true, Because::DefaultAllow));
    }

    #[test]
    fn the_matching_rule_is_named() {
        let p = spec(
            vec![
                rule("Allow", &[301], &[], &[("TCP", 80)]),
                rule("Allow", &[302], &[], &[("UDP", 81)]),
            ],
            true,
        );
        let v = at_ingress(&p, 302, "10.0.0.2", "81/UDP");
        assert!(v.allowed);
        assert_eq!(v.rules.iter().map(|r| r.index).collect::<Vec<_>>(), [1]);
        assert_eq!(v.entry.as_ref().unwrap().on, MatchedOn::PeerIdentity);
        assert_eq!(v.entry.as_ref().unwrap().key, "81/UDP");
        assert_eq!(v.summary(Direction::Ingress), "allow (rp/300 ingress[1])");
        let lines = v.explain(Direction::Ingress, "x/b");
        assert_eq!(lines[0], "ingress at x/b: ALLOWED");
        assert!(
            lines.contains(&"  rule ingress[1]: allow peers [302] ports [81/UDP]".into()),
            "{lines:?}"
        );
        let v = at_ingress(&p, 302, "10.0.0.2", "81/TCP");
        assert_eq!((v.allowed, v.because), (false, Because::DefaultDeny));
    }

    #[test]
    fn deny_wins_over_allow_across_lookups_and_prefixes() {
        // An allow of the peer on TCP 80 and a deny of any peer on every port: the deny
        // (found in the "any peer" lookup) wins although the allow is more specific.
        let p = spec(
            vec![
                rule("Allow", &[301], &[], &[("TCP", 80)]),
                rule("Deny", &[0], &[], &[]),
            ],
            false,
        );
        let v = at_ingress(&p, 301, "10.0.0.2", "80/TCP");
        assert!(!v.allowed);
        assert_eq!(v.entry.as_ref().unwrap().on, MatchedOn::AnyPeer);
        assert_eq!(v.rules.iter().map(|r| r.index).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn cidr_rules_match_the_peer_address() {
        let p = spec(
            vec![
                rule("Allow", &[], &["10.1.0.0/16"], &[]),
                rule("Deny", &[], &["10.1.2.0/24"], &[("UDP", 0)]),
            ],
            true,
        );
        let v = at_ingress(&p, 999, "10.1.9.9", "80/TCP");
        assert!(v.allowed);
        assert_eq!(v.entry.as_ref().unwrap().on, MatchedOn::PeerCidr);
        assert!(!at_ingress(&p, 999, "10.1.2.3", "53/UDP").allowed);
        assert!(at_ingress(&p, 999, "10.1.2.3", "53/TCP").allowed);
        assert!(!at_ingress(&p, 999, "10.2.0.1", "80/TCP").allowed);
    }

    #[test]
    fn port_ranges_use_the_lpm_blocks() {
        let mut r = rule("Allow", &[0], &[], &[]);
        r.ports.push(ResolvedPort {
            port: 80,
            end_port: Some(90),
            name: None,
            protocol: "TCP".parse().unwrap(),
        });
        let p = spec(vec![r], true);
        for (port, want) in [(79, false), (80, true), (85, true), (90, true), (91, false)] {
            let v = at_ingress(&p, 5, "10.0.0.1", &format!("{port}/TCP"));
            assert_eq!(v.allowed, want, "port {port}");
        }
    }

    #[test]
    fn a_trace_needs_both_directions_and_loopback_is_not_judged() {
        let denying = spec(Vec::new(), true);
        let a = TraceEndpoint {
            name: "x/a".into(),
            identity: 301,
            ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
            named_ports: &[],
            policy: None,
            realized_policy_revision: None,
        };
        let b = TraceEndpoint {
            name: "x/b".into(),
            identity: 300,
            ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
            named_ports: &[],
            policy: Some(&denying),
            realized_policy_revision: Some(3),
        };
        let packet = Packet::parse("80/TCP").unwrap();
        let t = trace(&a, &b, &ClusterNamedPorts::default(), packet);
        assert!(!t.allowed);
        assert!(t.egress.as_ref().unwrap().allowed);
        assert!(trace(&b, &a, &ClusterNamedPorts::default(), packet).allowed);
        assert!(trace(&b, &b, &ClusterNamedPorts::default(), packet).loopback);
        // b's node enforces revision 3 of a policy now at 4.
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("x/b enforces ResolvedPolicy revision 3, not yet 4"));
    }
}
