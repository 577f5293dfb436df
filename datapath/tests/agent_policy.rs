//! The agent's policy translation converged into real pinned maps (a fresh node pin
//! directory under /sys/fs/bpf/tendril, removed on drop): what `ResolvedPolicy` objects say
//! lands in `policy`, `policy_state` and `policy_cidrs`, read back from the kernel; a
//! restart (maps reopened) keeps CIDR ids and changes nothing; a new revision replaces
//! exactly the difference; a full map is reported. No API server. Needs root.

mod bpf_support;

use bpf_support::{Node, PinDir};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tendril_crds::v1alpha1::{
    NamedPort, ResolvedDefaultDeny, ResolvedPolicySpec, ResolvedPort, ResolvedRule,
};
use tendril_datapath::agent::datapath::policy::{ClusterNamedPorts, PolicySubject};
use tendril_datapath::agent::datapath::{PolicyRealization, realize_policy};
use tendril_datapath::bpf::maps::Direction;
use tendril_datapath::bpf::policy::{
    LOCAL_IDENTITY_FLAG, POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS, PROTO_ANY,
    PROTO_TCP, PolicyEntry, PolicyState, Verdict,
};
use tendril_datapath::bpf::{Dataplane, MapSizes};

fn policy_map(dir: &Path) -> BTreeMap<PolicyEntry, Verdict> {
    Dataplane::open(dir)
        .unwrap()
        .policy()
        .expect("reading policy")
}

fn state_map(dir: &Path) -> BTreeMap<u16, PolicyState> {
    Dataplane::open(dir)
        .unwrap()
        .policy_states()
        .expect("reading policy_state")
}

fn rule(verdict: &str, peers: &[i64], cidrs: &[&str], ports: Vec<ResolvedPort>) -> ResolvedRule {
    ResolvedRule {
        verdict: verdict.into(),
        peers: peers.to_vec(),
        cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        ports,
    }
}

fn tcp(port: i32) -> ResolvedPort {
    ResolvedPort {
        port,
        end_port: None,
        name: None,
        protocol: "TCP".into(),
    }
}

fn named_tcp(name: &str) -> ResolvedPort {
    ResolvedPort {
        port: 0,
        end_port: None,
        name: Some(name.into()),
        protocol: "TCP".into(),
    }
}

fn http(port: i32) -> Vec<NamedPort> {
    vec![NamedPort {
        name: "http".into(),
        port,
        protocol: "TCP".into(),
    }]
}

/// Identity 300: ingress from 301 on the named port `http`, a deny of 302, egress to
/// 10.0.0.0/8 and 10.1.0.0/16 on 443, both directions default deny.
fn policy_v3() -> ResolvedPolicySpec {
    ResolvedPolicySpec {
        identity: 300,
        revision: 3,
        default_deny: ResolvedDefaultDeny {
            ingress: true,
            egress: true,
        },
        ingress: vec![
            rule("Allow", &[1], &[], vec![]),
            rule("Allow", &[301], &[], vec![named_tcp("http")]),
            rule("Deny", &[302], &[], vec![]),
        ],
        egress: vec![rule(
            "Allow",
            &[],
            &["10.0.0.0/8", "10.1.0.0/16"],
            vec![tcp(443)],
        )],
        sources: Vec::new(),
    }
}

fn realize(
    dp: &mut Dataplane,
    subjects: &[PolicySubject<'_>],
    ports: &ClusterNamedPorts,
) -> PolicyRealization {
    let r = realize_policy(dp, subjects, ports).expect("policy maps converge");
    assert!(r.cidrs.is_converged(), "{:?}", r.cidrs.failed);
    assert!(r.policy.is_converged(), "{:?}", r.policy.failed);
    r
}

fn counts(r: &tendril_datapath::bpf::ConvergeReport) -> (usize, usize, usize) {
    (r.added, r.updated, r.deleted)
}

#[test]
fn resolved_policies_land_in_the_pinned_maps_and_survive_a_restart() {
    let mut node = Node::load("agent-policy", &MapSizes::default());
    let dir = node.dir.0.clone();
    let v3 = policy_v3();
    let (ports7, ports8) = (http(8080), http(9090));
    let cluster = ClusterNamedPorts::from_endpoints([ports7.as_slice(), ports8.as_slice()]);
    let subjects = [
        PolicySubject {
            endpoint_id: 7,
            policy: Some(&v3),
            named_ports: &ports7,
        },
        PolicySubject {
            endpoint_id: 8,
            policy: Some(&v3),
            named_ports: &ports8,
        },
        // An identity without a ResolvedPolicy: no state, no entries (allow all).
        PolicySubject {
            endpoint_id: 9,
            policy: None,
            named_ports: &[],
        },
    ];

    let first = realize(&mut node.dataplane, &subjects, &cluster);
    let held = policy_map(&dir);
    assert_eq!(
        held, first.wanted.entries,
        "the map holds what was translated"
    );
    // The report counts the entries and the two states.
    assert_eq!(first.policy.added, held.len() + 2);
    let both = POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_DEFAULT_DENY_EGRESS;
    assert_eq!(
        state_map(&dir),
        BTreeMap::from([
            (
                7,
                PolicyState {
                    revision: 3,
                    flags: both
                }
            ),
            (
                8,
                PolicyState {
                    revision: 3,
                    flags: both
                }
            ),
        ])
    );
    // Named port per endpoint: 8080 for 7, 9090 for 8.
    let ingress_301 = |ep: u16| -> Vec<u16> {
        held.keys()
            .filter(|e| e.endpoint_id == ep && e.direction == Direction::Ingress && e.peer == 301)
            .map(|e| e.port)
            .collect()
    };
    assert_eq!(ingress_301(7), vec![8080]);
    assert_eq!(ingress_301(8), vec![9090]);
    assert_eq!(
        held[&PolicyEntry {
            endpoint_id: 7,
            direction: Direction::Ingress,
            peer: 302,
            protocol: PROTO_ANY,
            port: 0,
            port_prefix: 0
        }],
        Verdict::Deny
    );
    // CIDRs: two node-local ids; the /8 rule covers both, so endpoint 7 has egress
    // entries for both ids.
    let cidrs = node.dataplane.policy_cidrs().unwrap();
    assert_eq!(cidrs, first.wanted.cidrs);
    assert_eq!(cidrs.len(), 2);
    assert!(cidrs.values().all(|id| id & LOCAL_IDENTITY_FLAG != 0));
    let egress_peers: BTreeSet<u32> = held
        .keys()
        .filter(|e| e.endpoint_id == 7 && e.direction == Direction::Egress)
        .map(|e| e.peer)
        .collect();
    assert_eq!(egress_peers, cidrs.values().copied().collect());
    assert!(!held.keys().any(|e| e.endpoint_id == 9));

    // Restart: the maps are reopened, ids read back; nothing changes.
    drop(std::mem::replace(
        &mut node.dataplane,
        Dataplane::open(&dir).expect("reopen"),
    ));
    let again = realize(&mut node.dataplane, &subjects, &cluster);
    assert_eq!(again.wanted, first.wanted);
    assert_eq!(counts(&again.cidrs), (0, 0, 0));
    assert_eq!(counts(&again.policy), (0, 0, 0));

    // Revision 4: the deny and the /16 are gone, ingress default deny off.
    let mut v4 = policy_v3();
    v4.revision = 4;
    v4.default_deny.ingress = false;
    v4.ingress.remove(2);
    v4.egress[0].cidrs.remove(1);
    let subjects = [
        PolicySubject {
            endpoint_id: 7,
            policy: Some(&v4),
            named_ports: &ports7,
        },
        // Endpoint 8 has no policy any more.
        PolicySubject {
            endpoint_id: 8,
            policy: None,
            named_ports: &ports8,
        },
    ];
    let next = realize(&mut node.dataplane, &subjects, &cluster);
    assert_eq!(policy_map(&dir), next.wanted.entries);
    assert!(
        policy_map(&dir)
            .keys()
            .all(|e| e.endpoint_id == 7 && e.peer != 302)
    );
    assert_eq!(
        state_map(&dir),
        BTreeMap::from([(
            7,
            PolicyState {
                revision: 4,
                flags: POLICY_F_DEFAULT_DENY_EGRESS
            }
        )])
    );
    let slash8: IpNet = "10.0.0.0/8".parse().unwrap();
    assert_eq!(
        node.dataplane.policy_cidrs().unwrap(),
        BTreeMap::from([(slash8, cidrs[&slash8])]),
        "the remaining prefix keeps its id"
    );
    assert!(next.policy.deleted > 0 && next.cidrs.deleted == 1);
    assert!(policy_map(&dir).contains_key(&PolicyEntry {
        endpoint_id: 7,
        direction: Direction::Egress,
        peer: cidrs[&slash8],
        protocol: PROTO_TCP,
        port: 443,
        port_prefix: 16,
    }));
}

#[test]
fn a_full_policy_map_is_reported_not_silently_dropped() {
    let sizes = MapSizes {
        policy: 4,
        ..MapSizes::default()
    };
    let dir = PinDir::new("agent-policy-full");
    let _programs = tendril_datapath::bpf::Programs::load(&dir.0, &sizes).expect("load programs");
    let mut dp = Dataplane::open(&dir.0).expect("open maps");
    let spec = ResolvedPolicySpec {
        identity: 300,
        revision: 1,
        default_deny: ResolvedDefaultDeny {
            ingress: true,
            egress: false,
        },
        ingress: vec![rule(
            "Allow",
            &[301, 302, 303],
            &[],
            vec![ResolvedPort {
                end_port: Some(81),
                ..tcp(80)
            }],
        )],
        ..Default::default()
    };
    let subjects = [PolicySubject {
        endpoint_id: 1,
        policy: Some(&spec),
        named_ports: &[],
    }];
    let r = realize_policy(&mut dp, &subjects, &ClusterNamedPorts::default()).unwrap();
    assert_eq!(
        r.wanted.entries.len(),
        3,
        "80-81 is one aligned block per peer"
    );
    let spec = ResolvedPolicySpec {
        ingress: vec![rule(
            "Allow",
            &[301, 302, 303],
            &[],
            vec![tcp(80), tcp(443)],
        )],
        revision: 2,
        ..spec
    };
    let subjects = [PolicySubject {
        endpoint_id: 1,
        policy: Some(&spec),
        named_ports: &[],
    }];
    let r = realize_policy(&mut dp, &subjects, &ClusterNamedPorts::default()).unwrap();
    assert_eq!(r.wanted.entries.len(), 6);
    assert!(r.policy.map_full(), "{:?}", r.policy);
    assert!(!r.policy.is_converged());
    assert!(policy_map(&dir.0).len() <= 4);
}
