//! A decoded datapath event → a Hubble `flow.Flow`, with both sides named from what the
//! node knows: the `Endpoint`s (pod name, namespace, security labels, identity) and the
//! `Identity`s (labels of peers that are not pods: reserved identities, remote ones).
//! Pure: the caller passes the wall-clock time and the [`Directory`].

use super::proto::flow::{
    self, CiliumEventType, DropReason, Emitter, Endpoint, FlowType, IpVersion, Layer4,
    NetworkInterface, TraceObservationPoint, TrafficDirection, Verdict, Workload, layer4,
};
use crate::bpf::maps::{Direction, MetricReason};
use crate::bpf::policy::{
    EventKind, EventVerdict, PolicyEvent, PolicyMatch, TCP_ACK, TCP_CWR, TCP_ECE, TCP_FIN, TCP_PSH,
    TCP_RST, TCP_SYN, TCP_URG,
};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use tendril_crds::facts::{CLUSTER_IDENTITY_MAX, CLUSTER_IDENTITY_MIN, Reserved};
use tendril_crds::v1alpha1::{Endpoint as EndpointObject, Identity, ResolvedPolicy};

/// Cilium's monitor message types (`flow.CiliumEventType.type`), which `hubble observe
/// --type drop|policy-verdict` select.
pub const MESSAGE_TYPE_DROP: i32 = 1;
pub const MESSAGE_TYPE_POLICY_VERDICT: i32 = 5;

/// Cilium's policy match types (`flow.Flow.policy_match_type`).
const POLICY_MATCH_L3_ONLY: u32 = 1;
const POLICY_MATCH_L3_L4: u32 = 2;

/// What the node knows about one pod: its `Endpoint` as cached (shared with the cache, not
/// copied: at 100k remote pods a copy of each name was a large part of the agent), its
/// identity and labels.
#[derive(Clone, Debug)]
pub struct PodInfo {
    endpoint: Arc<EndpointObject>,
    pub identity: u32,
    /// `source:key=value`, sorted; one allocation per distinct label set (pods of one
    /// identity share it: at 10k remote pods a copy each was a large part of the agent).
    pub labels: Arc<Vec<String>>,
}

impl PodInfo {
    pub fn namespace(&self) -> &str {
        self.endpoint
            .metadata
            .namespace
            .as_deref()
            .unwrap_or_default()
    }

    pub fn pod_name(&self) -> &str {
        self.endpoint.metadata.name.as_deref().unwrap_or_default()
    }

    /// The pod's workload (Hubble's `workloads`), from the Endpoint's `spec.workload`.
    pub fn workloads(&self) -> Vec<Workload> {
        self.endpoint
            .spec
            .workload
            .iter()
            .map(|w| Workload {
                name: w.name.clone(),
                kind: w.kind.clone(),
            })
            .collect()
    }
}

/// IP → pod, identity → labels, and identity → the one policy that decides its traffic
/// (when exactly one does), rebuilt from the caches when they change.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    pods: HashMap<IpAddr, Arc<PodInfo>>,
    /// Every node's pod CIDRs: an address in one (past its gateway) is a pod's.
    pod_cidrs: Vec<ipnet::IpNet>,
    identities: HashMap<u32, Arc<Vec<String>>>,
    sole_policy: HashMap<u32, flow::Policy>,
}

/// `source:key=value` (a label with an empty value, such as `reserved:world`, as its key).
fn label_strings<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> Vec<String> {
    let mut out: Vec<String> = labels
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    out.sort();
    out
}

impl Directory {
    /// The sole policy of each identity whose `ResolvedPolicy` comes from exactly one
    /// source: then a rule's verdict is that policy's. (The resolved entries do not say
    /// which source each came from, so with several sources no policy is named.)
    pub fn with_policies<'a>(
        mut self,
        policies: impl IntoIterator<Item = &'a ResolvedPolicy>,
    ) -> Self {
        for rp in policies {
            if let ([source], Ok(id)) =
                (rp.spec.sources.as_slice(), u32::try_from(rp.spec.identity))
            {
                self.sole_policy.insert(
                    id,
                    flow::Policy {
                        name: source.name.clone(),
                        namespace: source.namespace.clone().unwrap_or_default(),
                        kind: source.kind.as_str().into(),
                        revision: source
                            .generation
                            .and_then(|g| u64::try_from(g).ok())
                            .unwrap_or(0),
                        labels: Vec::new(),
                    },
                );
            }
        }
        self
    }

    /// The one policy deciding `identity`'s traffic, if exactly one does.
    pub fn sole_policy(&self, identity: u32) -> Option<&flow::Policy> {
        self.sole_policy.get(&identity)
    }

    pub fn build<'a>(
        endpoints: impl IntoIterator<Item = &'a Arc<EndpointObject>>,
        identities: impl IntoIterator<Item = &'a Identity>,
    ) -> Self {
        let mut dir = Directory::default();
        for id in identities {
            if let Ok(n) = u32::try_from(id.spec.id) {
                dir.identities
                    .insert(n, Arc::new(label_strings(id.spec.security_labels.iter())));
            }
        }
        // A pod's labels are its identity's (the same set): one allocation per identity.
        // The agent's cache drops the Endpoints' own copy; an endpoint whose identity is
        // not known yet falls back to it.
        let mut label_sets: HashMap<Vec<String>, Arc<Vec<String>>> = HashMap::new();
        for ep in endpoints {
            let identity = ep
                .spec
                .identity
                .and_then(|id| u32::try_from(id).ok())
                .unwrap_or(0);
            let labels = match dir.identities.get(&identity) {
                Some(labels) => labels.clone(),
                None => label_sets
                    .entry(label_strings(ep.spec.security_labels.iter()))
                    .or_insert_with_key(|l| Arc::new(l.clone()))
                    .clone(),
            };
            let info = Arc::new(PodInfo {
                endpoint: ep.clone(),
                identity,
                labels,
            });
            for ip in &ep.spec.ips {
                if let Ok(ip) = ip.parse() {
                    dir.pods.insert(ip, info.clone());
                }
            }
        }
        dir
    }

    /// The pod CIDRs of every node (`NodeNetwork` `spec.podCIDRs`; unparsable ones skipped).
    pub fn with_pod_cidrs<'a>(mut self, cidrs: impl IntoIterator<Item = &'a String>) -> Self {
        self.pod_cidrs = cidrs.into_iter().filter_map(|c| c.parse().ok()).collect();
        self
    }

    /// Whether `ip` is in a pod CIDR past the network address and the node's gateway (its
    /// first address): where pods get their addresses.
    fn in_pod_range(&self, ip: &IpAddr) -> bool {
        let offset = |net: IpAddr, ip: &IpAddr| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(a.to_bits() - n.to_bits()),
            (IpAddr::V6(n), IpAddr::V6(a)) => a.to_bits() - n.to_bits(),
            _ => 0,
        };
        self.pod_cidrs
            .iter()
            .any(|c| c.contains(ip) && offset(c.network(), ip) >= 2)
    }

    /// Whether `event` names a pod this directory does not know yet: a side whose address
    /// is no known pod's but has a cluster identity (only pods have those) or lies where
    /// pods get their addresses (the datapath may not know the pod yet either: a drop of
    /// an unknown source, a remote pod seen as its node). Its Endpoint is on its way, so
    /// the flow is worth holding briefly ([`super::pipeline`]).
    pub fn lacks_pod_of(&self, event: &PolicyEvent) -> bool {
        let cluster = CLUSTER_IDENTITY_MIN..=CLUSTER_IDENTITY_MAX;
        [
            (event.saddr, event.src_identity),
            (event.daddr, event.dst_identity),
        ]
        .iter()
        .any(|(ip, id)| {
            !self.pods.contains_key(ip)
                && (cluster.contains(&i64::from(*id)) || self.in_pod_range(ip))
        })
    }

    /// The flow endpoint of `ip` with `identity` (from the event): the pod's names when the
    /// address is a known pod's, the identity's labels otherwise.
    pub fn endpoint(&self, ip: IpAddr, identity: u32, endpoint_id: u32) -> Endpoint {
        if let Some(pod) = self.pods.get(&ip) {
            return Endpoint {
                id: endpoint_id,
                identity: if identity == 0 {
                    pod.identity
                } else {
                    identity
                },
                namespace: pod.namespace().to_string(),
                labels: pod.labels.to_vec(),
                pod_name: pod.pod_name().to_string(),
                workloads: pod.workloads(),
                ..Endpoint::default()
            };
        }
        let labels = self
            .identities
            .get(&identity)
            .map(|l| l.as_ref().clone())
            .or_else(|| {
                Reserved::ALL
                    .into_iter()
                    .find(|r| r.id32() == identity)
                    .map(|r| vec![format!("reserved:{}", r.name())])
            })
            .unwrap_or_default();
        Endpoint {
            id: endpoint_id,
            identity,
            labels,
            ..Endpoint::default()
        }
    }
}

/// Tendril's drop reason → Hubble's (`flow.DropReason`).
pub fn drop_reason(reason: MetricReason) -> DropReason {
    match reason {
        MetricReason::DropInvalidSource => DropReason::InvalidSourceIp,
        MetricReason::DropInvalidPacket => DropReason::InvalidPacketDropped,
        MetricReason::DropTtlExceeded => DropReason::TtlExceeded,
        // IPv6 of an endpoint with policy, which the node cannot judge yet: a policy drop.
        MetricReason::DropPolicy | MetricReason::DropIpv6PolicyNotEnforced => {
            DropReason::PolicyDenied
        }
        MetricReason::DropPolicyDeny => DropReason::PolicyDeny,
        MetricReason::DropNoTunnelDevice | MetricReason::DropNoTunnelEndpoint => {
            DropReason::NoTunnelOrEncapsulationEndpoint
        }
        MetricReason::DropTunnelKey => DropReason::ErrorRetrievingTunnelKey,
        MetricReason::DropIdentityTooLarge => DropReason::InvalidIdentity,
        MetricReason::DropUnsupportedL3 => DropReason::UnsupportedL3Protocol,
        MetricReason::DropLbNoBackend => DropReason::ServiceBackendNotFound,
        MetricReason::DropLbSourceRange => DropReason::DeniedByLbSrcRangeCheck,
        MetricReason::DropLbNoRoute => DropReason::FibLookupFailed,
        MetricReason::DropLbNat | MetricReason::DropEgressSnat => {
            DropReason::NoMappingForNatMasquerade
        }
        MetricReason::DropEgressUnsupported => DropReason::UnsupportedProtocolForNatMasquerade,
        MetricReason::DropEgressNoGateway | MetricReason::DropEgressNotGateway => {
            DropReason::NoEgressGateway
        }
        _ => DropReason::Unknown,
    }
}

/// The TCP header's flags byte as Hubble's `TCPFlags`.
pub fn tcp_flags(bits: u8) -> flow::TcpFlags {
    let set = |bit: u8| bits & bit != 0;
    flow::TcpFlags {
        fin: set(TCP_FIN),
        syn: set(TCP_SYN),
        rst: set(TCP_RST),
        psh: set(TCP_PSH),
        ack: set(TCP_ACK),
        urg: set(TCP_URG),
        ece: set(TCP_ECE),
        cwr: set(TCP_CWR),
        ns: false,
    }
}

fn l4(event: &PolicyEvent) -> Option<Layer4> {
    let (sport, dport) = (u32::from(event.sport), u32::from(event.dport));
    let icmp = (u32::from(event.icmp_type), u32::from(event.icmp_code));
    let protocol = match event.protocol {
        // A later fragment (no transport header) or a packet too short has none.
        6 => layer4::Protocol::Tcp(flow::Tcp {
            source_port: sport,
            destination_port: dport,
            flags: (event.tcp_flags != 0).then(|| tcp_flags(event.tcp_flags)),
        }),
        17 => layer4::Protocol::Udp(flow::Udp {
            source_port: sport,
            destination_port: dport,
        }),
        132 => layer4::Protocol::Sctp(flow::Sctp {
            source_port: sport,
            destination_port: dport,
        }),
        1 => layer4::Protocol::IcmPv4(flow::IcmPv4 {
            r#type: icmp.0,
            code: icmp.1,
        }),
        58 => layer4::Protocol::IcmPv6(flow::IcmPv6 {
            r#type: icmp.0,
            code: icmp.1,
        }),
        _ => return None,
    };
    Some(Layer4 {
        protocol: Some(protocol),
    })
}

/// One event as a Hubble flow. `time` is the event's wall-clock time, `uuid` its id.
pub fn flow_of(
    event: &PolicyEvent,
    directory: &Directory,
    node_name: &str,
    time: prost_types::Timestamp,
    uuid: String,
) -> flow::Flow {
    let is_policy = event.verdict.is_some();
    let verdict = match (event.kind, event.verdict) {
        (_, Some(EventVerdict::Audit)) => Verdict::Audit,
        (EventKind::Drop, _) => Verdict::Dropped,
        (EventKind::PolicyVerdict, Some(EventVerdict::Deny)) => Verdict::Dropped,
        (EventKind::PolicyVerdict, _) => Verdict::Forwarded,
    };
    let reason = match (event.kind, verdict) {
        (EventKind::Drop, _) | (_, Verdict::Dropped) => {
            event.reason.map_or(DropReason::Unknown, drop_reason)
        }
        _ => DropReason::Unknown,
    };
    let direction = match event.direction {
        Some(Direction::Ingress) => TrafficDirection::Ingress,
        Some(Direction::Egress) => TrafficDirection::Egress,
        _ => TrafficDirection::Unknown,
    };
    // The judged endpoint is the destination of ingress and the source of egress.
    let local_id = u32::from(event.endpoint_id);
    let (src_id, dst_id) = match direction {
        TrafficDirection::Ingress => (0, local_id),
        TrafficDirection::Egress => (local_id, 0),
        TrafficDirection::Unknown => (0, 0),
    };
    let point = match (is_policy, direction) {
        (true, TrafficDirection::Ingress) => TraceObservationPoint::ToEndpoint,
        (true, TrafficDirection::Egress) => TraceObservationPoint::FromEndpoint,
        _ => TraceObservationPoint::UnknownPoint,
    };
    let event_type = match event.kind {
        // The sub type of a drop is its reason in Cilium's numbering (what the CLI prints).
        EventKind::Drop => CiliumEventType {
            r#type: MESSAGE_TYPE_DROP,
            sub_type: if reason == DropReason::Unknown {
                i32::from(event.raw_reason)
            } else {
                reason as i32
            },
        },
        EventKind::PolicyVerdict => CiliumEventType {
            r#type: MESSAGE_TYPE_POLICY_VERDICT,
            sub_type: 0,
        },
    };
    let policy_match_type = match event.matched {
        PolicyMatch::L3 => POLICY_MATCH_L3_ONLY,
        PolicyMatch::L4 => POLICY_MATCH_L3_L4,
        _ => 0,
    };
    // The policy whose rule decided (an allow rule, or a deny rule: POLICY_DENY), when the
    // judged endpoint's identity has exactly one. A default deny is no rule's doing.
    let subject = match direction {
        TrafficDirection::Ingress => event.dst_identity,
        _ => event.src_identity,
    };
    let by_rule = matches!(event.matched, PolicyMatch::L3 | PolicyMatch::L4);
    let decided_by: Vec<flow::Policy> = directory
        .sole_policy(subject)
        .filter(|_| is_policy && by_rule)
        .cloned()
        .into_iter()
        .collect();
    let denied = verdict == Verdict::Dropped || event.verdict == Some(EventVerdict::Audit);
    let (mut ingress_allowed_by, mut ingress_denied_by) = (Vec::new(), Vec::new());
    let (mut egress_allowed_by, mut egress_denied_by) = (Vec::new(), Vec::new());
    match (direction, denied) {
        (TrafficDirection::Ingress, false) => ingress_allowed_by = decided_by,
        (TrafficDirection::Ingress, true) => ingress_denied_by = decided_by,
        (TrafficDirection::Egress, false) => egress_allowed_by = decided_by,
        (TrafficDirection::Egress, true) => egress_denied_by = decided_by,
        _ => {}
    }
    flow::Flow {
        time: Some(time),
        uuid,
        emitter: Some(Emitter {
            name: "Tendril".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
        verdict: verdict as i32,
        drop_reason: if reason == DropReason::Unknown {
            0
        } else {
            reason as u32
        },
        drop_reason_desc: reason as i32,
        ip: Some(flow::Ip {
            source: event.saddr.to_string(),
            destination: event.daddr.to_string(),
            ip_version: if event.saddr.is_ipv6() {
                IpVersion::IPv6
            } else {
                IpVersion::IPv4
            } as i32,
            ..flow::Ip::default()
        }),
        l4: l4(event),
        source: Some(directory.endpoint(event.saddr, event.src_identity, src_id)),
        destination: Some(directory.endpoint(event.daddr, event.dst_identity, dst_id)),
        r#type: FlowType::L3L4 as i32,
        node_name: node_name.to_string(),
        event_type: Some(event_type),
        traffic_direction: direction as i32,
        policy_match_type,
        trace_observation_point: point as i32,
        // Policy events are about the first packet of a connection (or one re-judged by
        // conntrack): never a reply. Other drops do not say.
        is_reply: is_policy.then_some(false),
        interface: (event.ifindex != 0).then(|| NetworkInterface {
            index: event.ifindex,
            name: String::new(),
        }),
        ingress_allowed_by,
        ingress_denied_by,
        egress_allowed_by,
        egress_denied_by,
        ..flow::Flow::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tendril_crds::v1alpha1::{
        EndpointSpec, EndpointWorkload, IdentitySpec, PolicySource, PolicySourceKind,
        ResolvedPolicySpec,
    };

    fn event(
        kind: EventKind,
        verdict: Option<EventVerdict>,
        reason: Option<MetricReason>,
    ) -> PolicyEvent {
        PolicyEvent {
            ts_ns: 1,
            kind,
            reason,
            raw_reason: reason.map_or(0, |r| r as u8),
            direction: Some(Direction::Ingress),
            protocol: 6,
            verdict,
            matched: PolicyMatch::L4,
            endpoint_id: 7,
            src_identity: 300,
            dst_identity: 301,
            saddr: IpAddr::from([10, 0, 0, 1]),
            daddr: IpAddr::from([10, 0, 1, 2]),
            sport: 40000,
            dport: 80,
            ifindex: 9,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_code: 0,
        }
    }

    /// Identity 300, the client's: `k8s:app=client`.
    fn client_identity() -> Identity {
        Identity::new(
            "300",
            IdentitySpec {
                id: 300,
                security_labels: BTreeMap::from([("k8s:app".into(), "client".into())]),
            },
        )
    }

    fn directory() -> Directory {
        let mut ep = EndpointObject::new(
            "web-1",
            EndpointSpec {
                node: "n1".into(),
                ips: vec!["10.0.1.2".into()],
                security_labels: BTreeMap::from([
                    ("k8s:app".into(), "web".into()),
                    ("k8s:io.kubernetes.pod.namespace".into(), "demo".into()),
                ]),
                identity: Some(301),
                workload: Some(EndpointWorkload {
                    kind: "Deployment".into(),
                    name: "web".into(),
                }),
                ..EndpointSpec::default()
            },
        );
        ep.metadata.namespace = Some("demo".into());
        let id = client_identity();
        let policy = |identity: i64, names: &[&str]| {
            ResolvedPolicy::new(
                &identity.to_string(),
                ResolvedPolicySpec {
                    identity,
                    sources: names
                        .iter()
                        .map(|n| PolicySource {
                            kind: PolicySourceKind::KubernetesNetworkPolicy,
                            namespace: Some("demo".into()),
                            name: n.to_string(),
                            generation: Some(3),
                        })
                        .collect(),
                    ..ResolvedPolicySpec::default()
                },
            )
        };
        // web (301) has one policy; the client (300) has two, so none is named for it.
        let policies = [policy(301, &["web-from-clients"]), policy(300, &["a", "b"])];
        Directory::build([&Arc::new(ep)], [&id]).with_policies(policies.iter())
    }

    #[test]
    fn a_pod_without_its_own_labels_is_named_with_its_identitys() {
        // As the agent caches Endpoints: security labels dropped, the identity's used.
        let ep = |name: &str, ip: &str| {
            let mut ep = EndpointObject::new(
                name,
                EndpointSpec {
                    ips: vec![ip.into()],
                    identity: Some(300),
                    ..EndpointSpec::default()
                },
            );
            ep.metadata.namespace = Some("demo".into());
            Arc::new(ep)
        };
        let id = client_identity();
        let (a, b) = (ep("c-1", "10.0.1.7"), ep("c-2", "10.0.1.8"));
        let dir = Directory::build([&a, &b], [&id]);
        let one = dir.endpoint("10.0.1.7".parse().unwrap(), 0, 0);
        assert_eq!(one.pod_name, "c-1");
        assert_eq!(one.labels, ["k8s:app=client"]);
        let (pa, pb) = (
            &dir.pods[&"10.0.1.7".parse().unwrap()],
            &dir.pods[&"10.0.1.8".parse().unwrap()],
        );
        assert!(
            Arc::ptr_eq(&pa.labels, &pb.labels),
            "one allocation per identity"
        );
    }

    #[test]
    fn the_deciding_policy_is_named_when_only_one_can_be() {
        let mut ev = event(EventKind::PolicyVerdict, Some(EventVerdict::Allow), None);
        let flow = flow_of(
            &ev,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert_eq!(flow.ingress_allowed_by.len(), 1);
        assert_eq!(flow.ingress_allowed_by[0].name, "web-from-clients");
        assert_eq!(flow.ingress_allowed_by[0].kind, "KubernetesNetworkPolicy");
        assert_eq!(flow.ingress_allowed_by[0].revision, 3);
        // A default deny is no rule's doing.
        ev.kind = EventKind::Drop;
        ev.verdict = Some(EventVerdict::Deny);
        ev.matched = PolicyMatch::Default;
        ev.reason = Some(MetricReason::DropPolicy);
        let flow = flow_of(
            &ev,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert!(flow.ingress_denied_by.is_empty() && flow.ingress_allowed_by.is_empty());
        // A deny rule at the client's egress: two policies, none named.
        ev.direction = Some(Direction::Egress);
        ev.matched = PolicyMatch::L4;
        let flow = flow_of(
            &ev,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert!(flow.egress_denied_by.is_empty());
    }

    #[test]
    fn a_denied_ingress_names_both_sides_and_the_reason() {
        let ev = event(
            EventKind::Drop,
            Some(EventVerdict::Deny),
            Some(MetricReason::DropPolicyDeny),
        );
        let flow = flow_of(
            &ev,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        assert_eq!(flow.drop_reason_desc, DropReason::PolicyDeny as i32);
        assert_eq!(flow.drop_reason, 181);
        assert_eq!(flow.traffic_direction, TrafficDirection::Ingress as i32);
        assert_eq!(
            flow.trace_observation_point,
            TraceObservationPoint::ToEndpoint as i32
        );
        let event_type = flow.event_type.unwrap();
        assert_eq!(
            (event_type.r#type, event_type.sub_type),
            (MESSAGE_TYPE_DROP, 181)
        );
        assert_eq!(flow.is_reply, Some(false));
        let dst = flow.destination.unwrap();
        assert_eq!(
            (dst.namespace.as_str(), dst.pod_name.as_str()),
            ("demo", "web-1")
        );
        assert_eq!((dst.id, dst.identity), (7, 301));
        assert_eq!(
            dst.labels,
            vec!["k8s:app=web", "k8s:io.kubernetes.pod.namespace=demo"]
        );
        // Not a known pod: named by its identity's labels.
        let src = flow.source.unwrap();
        assert_eq!((src.pod_name.as_str(), src.identity, src.id), ("", 300, 0));
        assert_eq!(src.labels, vec!["k8s:app=client"]);
        let Some(layer4::Protocol::Tcp(tcp)) = flow.l4.unwrap().protocol else {
            panic!("not TCP")
        };
        assert_eq!((tcp.source_port, tcp.destination_port), (40000, 80));
        assert_eq!(flow.node_name, "n1");
    }

    #[test]
    fn verdicts_and_reserved_identities() {
        let mut ev = event(EventKind::PolicyVerdict, Some(EventVerdict::Allow), None);
        ev.src_identity = Reserved::World.id32();
        ev.saddr = IpAddr::from([192, 0, 2, 1]);
        let flow = flow_of(
            &ev,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert_eq!(flow.verdict, Verdict::Forwarded as i32);
        assert_eq!(flow.drop_reason_desc, DropReason::Unknown as i32);
        assert_eq!(flow.event_type.unwrap().r#type, MESSAGE_TYPE_POLICY_VERDICT);
        assert_eq!(flow.source.unwrap().labels, vec!["reserved:world"]);
        ev.verdict = Some(EventVerdict::Audit);
        let audit = flow_of(
            &ev,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert_eq!(audit.verdict, Verdict::Audit as i32);
        // A drop outside policy: no verdict, no direction claim about replies.
        let mut other = event(EventKind::Drop, None, Some(MetricReason::DropInvalidPacket));
        other.protocol = 17;
        let flow = flow_of(
            &other,
            &directory(),
            "n1",
            prost_types::Timestamp::default(),
            "u".into(),
        );
        assert_eq!(flow.verdict, Verdict::Dropped as i32);
        assert_eq!(
            flow.drop_reason_desc,
            DropReason::InvalidPacketDropped as i32
        );
        assert_eq!(flow.is_reply, None);
        assert!(matches!(
            flow.l4.unwrap().protocol,
            Some(layer4::Protocol::Udp(_))
        ));
    }

    #[test]
    fn flows_of_pods_not_known_yet_are_told_apart() {
        let dir = directory();
        // Client (identity 300) is no pod this node knows; web (10.0.1.2) is.
        let ev = event(EventKind::PolicyVerdict, Some(EventVerdict::Allow), None);
        assert!(
            dir.lacks_pod_of(&ev),
            "a cluster identity at an unknown address"
        );
        let mut known = ev;
        known.saddr = IpAddr::from([10, 0, 1, 2]);
        assert!(!dir.lacks_pod_of(&known));
        let mut world = ev;
        world.src_identity = Reserved::World.id32();
        assert!(!dir.lacks_pod_of(&world), "the world never becomes a pod");
        let mut cidr = ev;
        cidr.src_identity = tendril_crds::facts::LOCAL_IDENTITY_FLAG | 5;
        assert!(!dir.lacks_pod_of(&cidr), "nor does a CIDR");
        // Addresses where pods get theirs, whatever identity the datapath gave them (it
        // may not know the pod yet either): not the network address nor the gateway.
        let dir = directory().with_pod_cidrs(&["10.0.0.0/24".to_string(), "bad".to_string()]);
        let mut remote = world;
        remote.saddr = IpAddr::from([10, 0, 0, 5]);
        remote.src_identity = Reserved::RemoteNode.id32();
        assert!(dir.lacks_pod_of(&remote), "10.0.0.5 is in 10.0.0.0/24");
        for gateway_or_network in [[10, 0, 0, 1], [10, 0, 0, 0]] {
            remote.saddr = IpAddr::from(gateway_or_network);
            assert!(
                !directory()
                    .with_pod_cidrs(&["10.0.0.0/24".to_string()])
                    .in_pod_range(&remote.saddr)
            );
        }
        remote.saddr = IpAddr::from([10, 0, 0, 7]);
        remote.src_identity = 0;
        assert!(dir.lacks_pod_of(&remote), "no identity at all");
        remote.saddr = IpAddr::from([192, 0, 2, 7]);
        assert!(!dir.lacks_pod_of(&remote), "outside every pod CIDR");
    }

    #[test]
    fn tcp_flags_icmp_and_workloads_reach_the_flow() {
        let mut ev = event(EventKind::PolicyVerdict, Some(EventVerdict::Allow), None);
        ev.tcp_flags = crate::bpf::policy::TCP_SYN | crate::bpf::policy::TCP_ECE;
        let flow = flow_of(&ev, &directory(), "n1", Default::default(), "u".into());
        let Some(layer4::Protocol::Tcp(tcp)) = flow.l4.unwrap().protocol else {
            panic!("not TCP")
        };
        let flags = tcp.flags.unwrap();
        assert!(flags.syn && flags.ece);
        assert!(!(flags.ack || flags.fin || flags.rst || flags.psh || flags.urg || flags.cwr));
        // No flags known (a later fragment): none claimed.
        ev.tcp_flags = 0;
        let flow = flow_of(&ev, &directory(), "n1", Default::default(), "u".into());
        let Some(layer4::Protocol::Tcp(tcp)) = flow.l4.unwrap().protocol else {
            panic!("not TCP")
        };
        assert_eq!(tcp.flags, None);
        ev.protocol = 1;
        (ev.icmp_type, ev.icmp_code) = (3, 13);
        let flow = flow_of(&ev, &directory(), "n1", Default::default(), "u".into());
        assert_eq!(
            flow.l4.unwrap().protocol,
            Some(layer4::Protocol::IcmPv4(flow::IcmPv4 {
                r#type: 3,
                code: 13
            }))
        );
        ev.protocol = 58;
        (ev.icmp_type, ev.icmp_code) = (128, 0);
        let flow = flow_of(&ev, &directory(), "n1", Default::default(), "u".into());
        assert_eq!(
            flow.l4.unwrap().protocol,
            Some(layer4::Protocol::IcmPv6(flow::IcmPv6 {
                r#type: 128,
                code: 0
            }))
        );
        // web-1 runs for Deployment web.
        let dst = flow.destination.unwrap();
        assert_eq!(
            dst.workloads,
            vec![Workload {
                name: "web".into(),
                kind: "Deployment".into()
            }]
        );
    }
}
