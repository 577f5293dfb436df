//! Tests of the policy translation ([`super`]).

use super::*;
use crate::bpf::policy::{POLICY_F_HAS_DENY_EGRESS, POLICY_F_HAS_DENY_INGRESS};
use tendril_crds::v1alpha1::ResolvedDefaultDeny;

fn rule(verdict: &str, peers: &[i64], cidrs: &[&str], ports: Vec<ResolvedPort>) -> ResolvedRule {
    ResolvedRule {
        verdict: verdict.parse().unwrap(),
        peers: peers.to_vec(),
        cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        ports,
    }
}

fn port(protocol: &str, port: i32, end_port: Option<i32>) -> ResolvedPort {
    ResolvedPort {
        port,
        end_port,
        name: None,
        protocol: protocol.parse().unwrap(),
    }
}

fn named(protocol: &str, name: &str) -> ResolvedPort {
    ResolvedPort {
        port: 0,
        end_port: None,
        name: Some(name.into()),
        protocol: protocol.parse().unwrap(),
    }
}

fn np(name: &str, port: i32, protocol: &str) -> NamedPort {
    NamedPort {
        name: name.into(),
        port,
        protocol: protocol.into(),
    }
}

fn spec(
    identity: i64,
    revision: i64,
    ingress: Vec<ResolvedRule>,
    egress: Vec<ResolvedRule>,
) -> ResolvedPolicySpec {
    ResolvedPolicySpec {
        identity,
        revision,
        default_deny: ResolvedDefaultDeny {
            ingress: !ingress.is_empty(),
            egress: !egress.is_empty(),
        },
        ingress,
        egress,
        sources: Vec::new(),
    }
}

fn key(ep: u16, direction: Direction, peer: u32, protocol: u8, port: u16, bits: u8) -> PolicyEntry {
    PolicyEntry {
        endpoint_id: ep,
        direction,
        peer,
        protocol,
        port,
        port_prefix: bits,
    }
}

fn subject<'a>(
    id: u16,
    policy: &'a ResolvedPolicySpec,
    ports: &'a [NamedPort],
) -> PolicySubject<'a> {
    PolicySubject {
        endpoint_id: id,
        policy: Some(policy),
        named_ports: ports,
    }
}

use Direction::{Egress, Ingress};

#[test]
fn named_ports_resolve_against_the_subject_for_ingress_and_the_cluster_for_egress() {
    let p = spec(
        300,
        1,
        vec![rule("Allow", &[301], &[], vec![named("TCP", "http")])],
        vec![rule("Allow", &[302], &[], vec![named("ANY", "dns")])],
    );
    let own = [np("http", 8080, "TCP"), np("dns", 5353, "UDP")];
    let other_a = [np("http", 80, "TCP"), np("dns", 53, "UDP")];
    let other_b = [
        np("dns", 53, "TCP"),
        np("dns", 1053, "UDP"),
        np("http", 81, "UDP"),
    ];
    let cluster = ClusterNamedPorts::from_endpoints([&own[..], &other_a[..], &other_b[..]]);
    let d = translate(&[subject(7, &p, &own)], &cluster, &BTreeMap::new());
    let got: Vec<_> = d.entries.keys().copied().collect();
    assert_eq!(
        got,
        vec![
            // Ingress: only the subject's own "http"/TCP, not the cluster's 80.
            key(7, Ingress, 301, PROTO_TCP, 8080, 16),
            // Egress: every endpoint's "dns" of every protocol (ANY).
            key(7, Egress, 302, PROTO_TCP, 53, 16),
            key(7, Egress, 302, PROTO_UDP, 53, 16),
            key(7, Egress, 302, PROTO_UDP, 1053, 16),
            key(7, Egress, 302, PROTO_UDP, 5353, 16),
        ]
    );
    assert!(d.entries.values().all(|v| *v == Verdict::Allow));

    // An endpoint without the name gets no ingress entry (the rule matches nothing),
    // yet its state is there: default deny holds.
    let d = translate(&[subject(8, &p, &[])], &cluster, &BTreeMap::new());
    assert!(d.entries.keys().all(|k| k.direction == Egress));
    assert_eq!(
        d.states[&8].flags,
        POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_DEFAULT_DENY_EGRESS | POLICY_F_SELECTED
    );
}

#[test]
fn any_protocol_expands_and_any_port_zero_is_everything() {
    let p = spec(
        300,
        1,
        vec![
            rule("Allow", &[301], &[], vec![port("ANY", 80, None)]),
            rule("Allow", &[302], &[], vec![port("ANY", 0, None)]),
            rule("Allow", &[303], &[], vec![port("UDP", 0, None)]),
            rule("Allow", &[304], &[], vec![port("TCP", 80, Some(83))]),
            rule("Allow", &[305], &[], vec![]),
        ],
        vec![],
    );
    let d = translate(
        &[subject(1, &p, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    let got: BTreeSet<_> = d.entries.keys().copied().collect();
    let want = BTreeSet::from([
        key(1, Ingress, 301, PROTO_TCP, 80, 16),
        key(1, Ingress, 301, PROTO_UDP, 80, 16),
        key(1, Ingress, 301, PROTO_SCTP, 80, 16),
        key(1, Ingress, 302, PROTO_ANY, 0, 0),
        key(1, Ingress, 303, PROTO_UDP, 0, 0),
        key(1, Ingress, 304, PROTO_TCP, 80, 14),
        key(1, Ingress, 305, PROTO_ANY, 0, 0),
    ]);
    assert_eq!(got, want);
}

#[test]
fn cidr_rules_cover_every_node_prefix_inside_them() {
    let p = spec(
        300,
        1,
        vec![],
        vec![
            rule("Allow", &[], &["10.0.0.0/8"], vec![port("TCP", 443, None)]),
            rule("Deny", &[], &["10.1.0.0/16"], vec![]),
            rule("Allow", &[], &["10.1.2.0/24", "fd00::/64"], vec![]),
        ],
    );
    let d = translate(
        &[subject(1, &p, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    let id = |c: &str| d.cidrs[&c.parse::<IpNet>().unwrap()];
    assert_eq!(d.cidrs.len(), 4);
    assert!(d.cidrs.values().all(|id| id & LOCAL_IDENTITY_FLAG != 0));
    let (wide, mid, narrow) = (id("10.0.0.0/8"), id("10.1.0.0/16"), id("10.1.2.0/24"));
    let v = |peer, proto, port, bits| {
        d.entries
            .get(&key(1, Egress, peer, proto, port, bits))
            .copied()
    };
    // /8 allow applies to itself and to both narrower node prefixes.
    assert_eq!(v(wide, PROTO_TCP, 443, 16), Some(Verdict::Allow));
    // The /16 deny covers the /24 too and wins over both allows there.
    assert_eq!(v(mid, PROTO_ANY, 0, 0), Some(Verdict::Deny));
    assert_eq!(v(mid, PROTO_TCP, 443, 16), Some(Verdict::Deny));
    assert_eq!(v(narrow, PROTO_ANY, 0, 0), Some(Verdict::Deny));
    assert_eq!(v(narrow, PROTO_TCP, 443, 16), Some(Verdict::Deny));
    // The /24 allow does not reach the wider prefixes.
    assert_eq!(v(wide, PROTO_ANY, 0, 0), None);
    // The IPv6 prefix is a node prefix of its own, which no IPv4 rule covers.
    assert_eq!(v(id("fd00::/64"), PROTO_ANY, 0, 0), Some(Verdict::Allow));
    assert_eq!(v(id("fd00::/64"), PROTO_TCP, 443, 16), None);
    assert_eq!(d.entries.len(), 6);
}

/// IPv4 prefixes anywhere, IPv6 prefixes within a few /16s so they nest often.
fn any_prefix() -> impl proptest::strategy::Strategy<Value = IpNet> {
    use proptest::prelude::*;
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| IpNet::V4(ipnet::Ipv4Net::new(a.into(), l).unwrap().trunc())),
        (0u128..3, any::<u128>(), 0u8..=128).prop_map(|(top, low, l)| {
            let addr = (top << 112) | (0xfd00 << 112) | (low >> 16);
            IpNet::V6(ipnet::Ipv6Net::new(addr.into(), l).unwrap().trunc())
        }),
    ]
}

proptest::proptest! {
    /// The range query finds exactly the node prefixes a rule prefix contains, in both
    /// families and never across them.
    #[test]
    fn rule_prefixes_cover_exactly_the_node_prefixes_inside_them(
        nets in proptest::collection::vec(any_prefix(), 1..12),
    ) {
        let cidrs: Vec<String> = nets.iter().map(ToString::to_string).collect();
        let refs: Vec<&str> = cidrs.iter().map(String::as_str).collect();
        let rules: Vec<ResolvedRule> = refs
            .iter()
            .map(|c| rule("Allow", &[], &[c], vec![port("TCP", 1, None)]))
            .collect();
        let p = spec(300, 1, rules, vec![]);
        let d = translate(&[subject(1, &p, &[])], &ClusterNamedPorts::default(), &BTreeMap::new());
        let peers: BTreeSet<u32> = d.entries.keys().map(|e| e.peer).collect();
        // Every node prefix is inside itself, so each id has an entry...
        proptest::prop_assert_eq!(peers.len(), d.cidrs.len());
        // ...and a single rule's ids are exactly the node prefixes inside it.
        for rule_net in &nets {
            let one = spec(301, 1, vec![rule("Allow", &[], &[&rule_net.to_string()], vec![])], vec![]);
            let both = [subject(1, &p, &[]), subject(2, &one, &[])];
            let d = translate(&both, &ClusterNamedPorts::default(), &BTreeMap::new());
            let got: BTreeSet<u32> = d.entries.keys().filter(|e| e.endpoint_id == 2).map(|e| e.peer).collect();
            let want: BTreeSet<u32> = d
                .cidrs
                .iter()
                .filter(|(n, _)| rule_net.contains(*n))
                .map(|(_, id)| *id)
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}

#[test]
fn deny_wins_over_allow_for_the_same_key_and_inside_it() {
    let p = spec(
        300,
        1,
        vec![
            rule("Allow", &[0, 301], &[], vec![port("TCP", 80, None)]),
            rule("Deny", &[301], &[], vec![port("TCP", 80, None)]),
            rule("Deny", &[302], &[], vec![port("TCP", 0, None)]),
            rule(
                "Allow",
                &[302],
                &[],
                vec![port("TCP", 80, Some(81)), port("UDP", 80, None)],
            ),
        ],
        vec![],
    );
    let d = translate(
        &[subject(1, &p, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    let v = |peer, proto, port, bits| d.entries[&key(1, Ingress, peer, proto, port, bits)];
    assert_eq!(v(0, PROTO_TCP, 80, 16), Verdict::Allow);
    assert_eq!(v(301, PROTO_TCP, 80, 16), Verdict::Deny);
    assert_eq!(v(302, PROTO_TCP, 80, 15), Verdict::Deny, "propagated");
    assert_eq!(v(302, PROTO_UDP, 80, 16), Verdict::Allow);
    // Denies only in ingress: only there must the datapath look past the first allow.
    assert_eq!(
        d.states[&1].flags & (POLICY_F_HAS_DENY_INGRESS | POLICY_F_HAS_DENY_EGRESS),
        POLICY_F_HAS_DENY_INGRESS
    );
    // Allows only: the first allowing lookup decides in both directions.
    let allow_only = spec(
        300,
        2,
        vec![rule("Allow", &[301], &[], vec![])],
        vec![rule("Allow", &[0], &[], vec![port("UDP", 53, None)])],
    );
    let d = translate(
        &[subject(1, &allow_only, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    assert_eq!(
        d.states[&1].flags & (POLICY_F_HAS_DENY_INGRESS | POLICY_F_HAS_DENY_EGRESS),
        0
    );
}

#[test]
fn state_carries_the_revision_and_default_deny_only_for_endpoints_with_a_policy() {
    let mut p = spec(300, (7u64 << 32 | 5) as i64, vec![], vec![]);
    p.default_deny.egress = true;
    let subjects = [
        subject(1, &p, &[]),
        subject(2, &p, &[]),
        PolicySubject {
            endpoint_id: 3,
            policy: None,
            named_ports: &[],
        },
    ];
    let d = translate(&subjects, &ClusterNamedPorts::default(), &BTreeMap::new());
    assert_eq!(
        d.states,
        BTreeMap::from([
            (
                1,
                PolicyState {
                    revision: 5,
                    flags: POLICY_F_DEFAULT_DENY_EGRESS | POLICY_F_SELECTED
                }
            ),
            (
                2,
                PolicyState {
                    revision: 5,
                    flags: POLICY_F_DEFAULT_DENY_EGRESS | POLICY_F_SELECTED
                }
            ),
        ])
    );
    assert_eq!(d.revisions[&1], p.revision);
    assert!(d.entries.is_empty());
    assert!(d.cidrs.is_empty());

    // An empty ResolvedPolicy still gets a state (revision tracked, allow all), but
    // selects nothing (its IPv6 is not failed closed).
    let empty = spec(301, 1, vec![], vec![]);
    let d = translate(
        &[subject(4, &empty, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    assert_eq!(
        d.states[&4],
        PolicyState {
            revision: 1,
            flags: 0
        }
    );
}

#[test]
fn cidr_ids_are_stable_and_never_reuse_an_id_still_pinned() {
    let net = |s: &str| s.parse::<ipnet::Ipv4Net>().unwrap();
    let current = BTreeMap::from([
        (IpNet::V4(net("192.168.0.0/16")), LOCAL_IDENTITY_FLAG | 2),
        (IpNet::V4(net("172.16.0.0/12")), LOCAL_IDENTITY_FLAG | 1),
    ]);
    let wanted = BTreeSet::from(
        [net("192.168.0.0/16"), net("10.0.0.0/8"), net("8.8.8.8/32")].map(IpNet::V4),
    );
    let (ids, problems) = allocate_cidr_ids(&wanted, &current);
    assert!(problems.is_empty());
    assert_eq!(
        ids[&IpNet::V4(net("192.168.0.0/16"))],
        LOCAL_IDENTITY_FLAG | 2,
        "kept"
    );
    // 1 is still pinned (172.16/12 is pruned in this pass): new ones take 3 and 4.
    let new: BTreeSet<u32> = [net("10.0.0.0/8"), net("8.8.8.8/32")]
        .iter()
        .map(|n| ids[&IpNet::V4(*n)])
        .collect();
    assert_eq!(
        new,
        BTreeSet::from([LOCAL_IDENTITY_FLAG | 3, LOCAL_IDENTITY_FLAG | 4])
    );
    // The next pass (what was pinned is now `ids`) changes nothing.
    assert_eq!(allocate_cidr_ids(&wanted, &ids).0, ids);

    // Through translate: a restart reading back the map gets the same ids.
    let p = spec(
        300,
        1,
        vec![rule("Allow", &[], &["10.0.0.0/8", "1.2.3.4/32"], vec![])],
        vec![],
    );
    let first = translate(
        &[subject(1, &p, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    let again = translate(
        &[subject(1, &p, &[])],
        &ClusterNamedPorts::default(),
        &first.cidrs,
    );
    assert_eq!(first, again);
}

#[test]
fn a_retranslation_reuses_the_endpoints_whose_inputs_did_not_change() {
    let a = spec(
        300,
        1,
        vec![rule("Allow", &[301], &[], vec![port("TCP", 80, None)])],
        vec![],
    );
    let b = spec(
        310,
        1,
        vec![rule("Allow", &[311], &["10.0.0.0/8"], vec![])],
        vec![],
    );
    let own = [np("http", 8080, "TCP")];
    let cluster = ClusterNamedPorts::default();
    let first = translate(
        &[subject(1, &a, &own), subject(2, &b, &[])],
        &cluster,
        &BTreeMap::new(),
    );
    // Identity 300's policy changes: endpoint 1 is translated again, 2 is reused.
    let mut a2 = a.clone();
    a2.revision = 2;
    a2.ingress[0].ports.push(port("UDP", 53, None));
    let subjects = [subject(1, &a2, &own), subject(2, &b, &[])];
    let next = translate_reusing(&subjects, &cluster, &first.cidrs, Some(&first));
    assert!(Arc::ptr_eq(&first.by_endpoint[&2], &next.by_endpoint[&2]));
    assert!(!Arc::ptr_eq(&first.by_endpoint[&1], &next.by_endpoint[&1]));
    assert_eq!(next.changed_endpoints(&first), BTreeSet::from([1]));
    // Exactly what a translation from scratch gives.
    assert_eq!(next, translate(&subjects, &cluster, &first.cidrs));
    assert!(!next.same_as(&first));
    let again = translate_reusing(&subjects, &cluster, &next.cidrs, Some(&next));
    assert!(again.same_as(&next));
    assert!(again.changed_endpoints(&next).is_empty());
    // A new named port somewhere in the cluster: nothing is reused.
    let more = ClusterNamedPorts::from_endpoints([&own[..]]);
    let renamed = translate_reusing(&subjects, &more, &next.cidrs, Some(&next));
    assert!(!Arc::ptr_eq(
        &next.by_endpoint[&2],
        &renamed.by_endpoint[&2]
    ));
    assert_eq!(renamed, translate(&subjects, &more, &next.cidrs));
    // Endpoint 2 loses its policy: it is changed (its entries go).
    let gone = [subject(1, &a2, &own)];
    let fewer = translate_reusing(&gone, &cluster, &next.cidrs, Some(&next));
    assert_eq!(fewer.changed_endpoints(&next), BTreeSet::from([2]));
}

#[test]
fn a_rule_whose_peers_are_all_ipv6_matches_those_prefixes_only() {
    let p = spec(
        300,
        1,
        vec![rule("Allow", &[], &["fd00::/8"], vec![])],
        vec![],
    );
    let d = translate(
        &[subject(1, &p, &[])],
        &ClusterNamedPorts::default(),
        &BTreeMap::new(),
    );
    let id = d.cidrs[&"fd00::/8".parse::<IpNet>().unwrap()];
    assert_eq!(
        d.entries.keys().map(|e| e.peer).collect::<Vec<_>>(),
        [id],
        "never widened to any peer"
    );
    assert_eq!(
        d.states[&1].flags,
        POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_SELECTED
    );
}
