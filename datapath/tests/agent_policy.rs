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
use tendril_datapath::agent::pass::policy::{ClusterNamedPorts, PolicySubject};
use tendril_datapath::agent::pass::{PolicyRealization, realize_policy};
use tendril_datapath::bpf::maps::Direction;
use tendril_datapath::bpf::policy::{
    LOCAL_IDENTITY_FLAG, POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS,
    POLICY_F_HAS_DENY_INGRESS, POLICY_F_SELECTED, PROTO_ANY, PROTO_TCP, PolicyEntry, PolicyState,
    Verdict,
};
use tendril_datapath::bpf::{Dataplane, MapSizes};

fn policy_map(dir: &Path) -> BTreeMap<PolicyEntry, Verdict> {
    Dataplane::open(dir)
        .unwrap()
        .policy
        .entries()
        .expect("reading policy")
}

fn state_map(dir: &Path) -> BTreeMap<u16, PolicyState> {
    Dataplane::open(dir)
        .unwrap()
        .policy
        .states()
        .expect("reading policy_state")
}

fn rule(verdict: &str, peers: &[i64], cidrs: &[&str], ports: Vec<ResolvedPort>) -> ResolvedRule {
    ResolvedRule {
        verdict: verdict.parse().unwrap(),
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
        protocol: "TCP".parse().unwrap(),
    }
}

fn named_tcp(name: &str) -> ResolvedPort {
    ResolvedPort {
        port: 0,
        end_port: None,
        name: Some(name.into()),
        protocol: "TCP".parse().unwrap(),
    }
}

fn http(port: i32) -> Vec<NamedPort> {
    vec![NamedPort {
        name: "http".into(),
        port,
        protocol: "TCP".parse().unwrap(),
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
    let r = realize_policy(dp, subjects, ports, None).expect("policy maps converge");
    assert!(r.cidrs.is_converged(), "{:?}", r.cidrs.failed);
    assert!(r.policy.is_converged(), "{:?}", r.policy.failed);
    r
}

fn counts<K>(r: &tendril_datapath::bpf::Report<K>) -> (usize, usize, usize) {
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
    // The deny of 302 is an ingress deny: the datapath must look past a first allow there.
    let both = POLICY_F_DEFAULT_DENY_INGRESS
        | POLICY_F_DEFAULT_DENY_EGRESS
        | POLICY_F_SELECTED
        | POLICY_F_HAS_DENY_INGRESS;
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
    let cidrs = node.dataplane.policy.cidrs().unwrap();
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
    assert!(!again.skipped);
    // The same translation as the last convergence: the maps are left alone.
    let same = realize_policy(
        &mut node.dataplane,
        &subjects,
        &cluster,
        Some(&again.wanted),
    )
    .unwrap();
    assert!(same.skipped);
    assert_eq!(same.wanted, again.wanted);

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
    let unchanged = Some(&again.wanted);
    let next = realize_policy(&mut node.dataplane, &subjects, &cluster, unchanged).unwrap();
    assert!(!next.skipped, "a new translation is converged");
    assert!(next.policy.is_converged() && next.cidrs.is_converged());
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
                flags: POLICY_F_DEFAULT_DENY_EGRESS | POLICY_F_SELECTED
            }
        )])
    );
    let slash8: IpNet = "10.0.0.0/8".parse().unwrap();
    assert_eq!(
        node.dataplane.policy.cidrs().unwrap(),
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
    let r = realize_policy(&mut dp, &subjects, &ClusterNamedPorts::default(), None).unwrap();
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
    let r = realize_policy(&mut dp, &subjects, &ClusterNamedPorts::default(), None).unwrap();
    assert_eq!(r.wanted.entries.len(), 6);
    assert!(r.policy.map_full(), "{:?}", r.policy);
    assert!(!r.policy.is_converged());
    assert!(policy_map(&dir.0).len() <= 4);
}

mod enforcement {
    //! What the agent writes, enforced by the real programs (`BPF_PROG_TEST_RUN`) and
    //! reported through the events reader: a new revision re-judges an established
    //! connection against exactly the new entries; audit mode lets would-be drops pass.

    use super::*;
    use bpf_support::{TC_ACT_REDIRECT, TC_ACT_SHOT, run, udp_frame};
    use std::net::Ipv4Addr;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use tendril_datapath::agent::pass::events::{self, Flow, FlowLog};
    use tendril_datapath::agent::pass::metrics::{DatapathMetrics, VerdictLabels};
    use tendril_datapath::bpf::Hook;
    use tendril_datapath::bpf::maps::{
        EndpointInfo, IpcacheValue, MetricReason, NODE_F_POLICY_AUDIT, NodeConfig,
    };
    use tendril_runtime::Metrics;
    use tokio_util::sync::CancellationToken;

    const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
    const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const NODE_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 1, 0x0a];
    const LO: u32 = 1;

    fn node() -> Node {
        let mut node = Node::load("agent-policy-enforce", &MapSizes::default());
        let endpoint = |ifindex, identity, endpoint_id, last| EndpointInfo {
            ifindex,
            identity,
            endpoint_id,
            mac: [0x02, 0, 0, 0, 0, last],
            node_mac: [0x02, 0, 0, 0, 1, last],
            ..Default::default()
        };
        let endpoints = BTreeMap::from([
            (POD_A.into(), endpoint(LO, 256, 1, 0x0a)),
            (POD_B.into(), endpoint(4242, 257, 2, 0x0b)),
        ]);
        let ipcache = BTreeMap::from([
            (
                format!("{POD_A}/32").parse().unwrap(),
                IpcacheValue::new(256, None),
            ),
            (
                format!("{POD_B}/32").parse().unwrap(),
                IpcacheValue::new(257, None),
            ),
        ]);
        let dp = &mut node.dataplane;
        assert!(
            dp.endpoints
                .converge(&endpoints, true)
                .unwrap()
                .is_converged()
        );
        assert!(dp.ipcache.converge(&ipcache, true).unwrap().is_converged());
        set_flags(dp, 0);
        node
    }

    fn set_flags(dp: &mut Dataplane, flags: u32) {
        dp.node_config
            .set(&NodeConfig {
                tunnel_ifindex: 0,
                node_ipv4: [192, 168, 0, 1],
                flags,
                pad: 0,
            })
            .unwrap();
    }

    /// Identity 256 may send UDP to 257 on `port` only.
    fn egress_to_b(revision: i64, port: i32) -> ResolvedPolicySpec {
        ResolvedPolicySpec {
            identity: 256,
            revision,
            default_deny: ResolvedDefaultDeny {
                ingress: false,
                egress: true,
            },
            egress: vec![rule(
                "Allow",
                &[257],
                &[],
                vec![ResolvedPort {
                    protocol: "UDP".parse().unwrap(),
                    ..tcp(port)
                }],
            )],
            ..Default::default()
        }
    }

    fn send(node: &Node, dport: u16) -> u32 {
        let frame = udp_frame(MAC_A, NODE_MAC_A, POD_A, POD_B, 64, dport);
        run(
            node.programs.classifier(Hook::FromContainer),
            &frame,
            LO,
            0,
            1,
        )
        .ret
    }

    fn flows_until(log: &FlowLog, done: impl Fn(&[Flow]) -> bool) -> Vec<Flow> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let flows = log.recent(None);
            if done(&flows) {
                return flows;
            }
            assert!(Instant::now() < deadline, "flows never arrived: {flows:#?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_new_revision_rejudges_established_connections_and_events_report_it() {
        let mut node = node();
        let dir = node.dir.0.clone();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let registry = Metrics::new("test");
        let metrics = DatapathMetrics::register(&registry);
        let log = FlowLog::new(64);
        let stop = CancellationToken::new();
        // The same events also become Hubble flows (crate::flows), in a ring of their own.
        let flow_metrics = tendril_datapath::flows::metrics::FlowMetrics::unregistered();
        let (sink, queue) = tendril_datapath::flows::pipeline::queue(64, flow_metrics.clone());
        let ring = tendril_datapath::flows::ring::FlowRing::new(64);
        runtime.spawn(tendril_datapath::flows::pipeline::enrich(
            queue,
            ring.clone(),
            Default::default(),
            "node-a".into(),
            flow_metrics,
            stop.clone(),
        ));
        let reader = runtime.spawn(events::run(
            Arc::new(Mutex::new(Dataplane::open(&dir).unwrap())),
            metrics.clone(),
            log.clone(),
            Some(sink),
            10,
            stop.clone(),
        ));
        let realize_for_a = |dp: &mut Dataplane, spec: &ResolvedPolicySpec| {
            let subjects = [PolicySubject {
                endpoint_id: 1,
                policy: Some(spec),
                named_ports: &[],
            }];
            realize(dp, &subjects, &ClusterNamedPorts::default());
        };

        // Revision 1: 53 allowed (a connection is established), 54 denied by default.
        realize_for_a(&mut node.dataplane, &egress_to_b(1, 53));
        assert_eq!(send(&node, 53), TC_ACT_REDIRECT);
        assert_eq!(send(&node, 53), TC_ACT_REDIRECT, "established");
        assert_eq!(send(&node, 54), TC_ACT_SHOT);
        let drops = |node: &Node| {
            node.dataplane
                .metrics
                .packets(MetricReason::DropPolicy, Direction::Egress)
                .unwrap()
        };
        assert_eq!(drops(&node), 1);

        // Revision 2 replaces 53 by 54: the established 53 flow stops at its next packet,
        // 54 opens.
        realize_for_a(&mut node.dataplane, &egress_to_b(2, 54));
        assert_eq!(send(&node, 53), TC_ACT_SHOT, "re-judged under revision 2");
        assert_eq!(send(&node, 54), TC_ACT_REDIRECT);
        assert_eq!(drops(&node), 2);

        // Audit mode: a would-be drop passes and is counted as audit.
        set_flags(&mut node.dataplane, NODE_F_POLICY_AUDIT);
        assert_eq!(send(&node, 55), TC_ACT_REDIRECT);
        assert_eq!(
            node.dataplane
                .metrics
                .packets(MetricReason::PolicyAudit, Direction::Egress)
                .unwrap(),
            1
        );
        assert_eq!(drops(&node), 2);

        let flows = flows_until(&log, |f| f.iter().any(|f| f.verdict == "audit"));
        let dest = |port: u16| format!("{POD_B}:{port}");
        let find = |verdict: &str, port: u16| {
            flows
                .iter()
                .filter(|f| f.verdict == verdict && f.destination == dest(port))
                .collect::<Vec<_>>()
        };
        let allowed_53 = find("allow", 53);
        assert_eq!(
            allowed_53.len(),
            1,
            "one verdict per new connection: {flows:#?}"
        );
        assert_eq!(allowed_53[0].kind, "policy-verdict");
        assert_eq!(allowed_53[0].matched, "l4");
        assert_eq!(
            (
                allowed_53[0].source_identity,
                allowed_53[0].destination_identity
            ),
            (256, 257)
        );
        let denied_53 = find("deny", 53);
        assert_eq!(denied_53.len(), 1, "{flows:#?}");
        assert_eq!(
            (
                denied_53[0].kind,
                denied_53[0].matched,
                denied_53[0].reason.as_str()
            ),
            ("drop", "conntrack", "policy_denied")
        );
        assert_eq!(find("deny", 54)[0].matched, "default");
        assert_eq!(find("audit", 55)[0].direction, "egress");
        let verdicts = |verdict: &str, matched: &str| {
            metrics
                .policy_verdicts
                .get_or_create(&VerdictLabels {
                    direction: "egress".into(),
                    verdict: verdict.parse().unwrap(),
                    r#match: matched.into(),
                })
                .get()
        };
        assert_eq!(verdicts("deny", "conntrack"), 1);
        assert_eq!(verdicts("deny", "default"), 1);
        assert!(verdicts("allow", "l4") >= 2);
        assert!(registry.encode().contains("tendril_policy_verdicts_total"));

        // The Hubble flows of the same packets: the re-judged 53 and the default-denied 54
        // DROPPED with Hubble's POLICY_DENIED at egress, the audited 55 AUDIT.
        use tendril_datapath::flows::proto::flow::{DropReason, TrafficDirection, Verdict, layer4};
        use tendril_datapath::flows::ring::Entry;
        let hubble = |verdict: Verdict, port: u32| {
            ring.snapshot()
                .0
                .into_iter()
                .filter_map(|e| match e {
                    Entry::Flow(f) => Some(f),
                    Entry::Lost(_) => None,
                })
                .filter(|f| {
                    f.verdict == verdict as i32
                        && matches!(
                            f.l4.as_ref().and_then(|l| l.protocol.as_ref()),
                            Some(layer4::Protocol::Udp(u)) if u.destination_port == port
                        )
                })
                .count()
        };
        for (verdict, port) in [
            (Verdict::Dropped, 53),
            (Verdict::Dropped, 54),
            (Verdict::Audit, 55),
        ] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while hubble(verdict, port) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "no Hubble flow {verdict:?} to port {port}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let (entries, _) = ring.snapshot();
        let Some(Entry::Flow(dropped)) = entries
            .iter()
            .find(|e| matches!(e, Entry::Flow(f) if f.verdict == Verdict::Dropped as i32))
        else {
            panic!("no dropped flow")
        };
        assert_eq!(dropped.drop_reason_desc, DropReason::PolicyDenied as i32);
        assert_eq!(dropped.traffic_direction, TrafficDirection::Egress as i32);
        assert_eq!(dropped.node_name, "node-a");
        assert_eq!(dropped.source.as_ref().unwrap().identity, 256);

        stop.cancel();
        runtime.block_on(reader).unwrap();
    }
}
