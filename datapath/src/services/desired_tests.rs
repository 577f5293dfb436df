use super::*;
use tendril_crds::v1alpha1::{ClientIpAffinity, LBServiceSpec, SessionAffinity};

const NODE: &str = "n1";

fn backend(address: &str, node: &str, state: &str) -> Backend {
    Backend {
        port_name: "http".into(),
        address: address.into(),
        port: 8080,
        protocol: "TCP".into(),
        weight: 1,
        node_name: Some(node.into()),
        zone: None,
        state: state.into(),
    }
}

fn frontend(type_: &str, address: Option<&str>, port: i32) -> Frontend {
    Frontend {
        name: "http".into(),
        type_: type_.into(),
        address: address.map(Into::into),
        port,
        protocol: "TCP".into(),
    }
}

fn service(
    name: &str,
    revision: i64,
    frontends: Vec<Frontend>,
    backends: Vec<Backend>,
) -> LBService {
    let mut svc = LBService::new(
        name,
        LBServiceSpec {
            revision,
            committed_revision: None,
            frontends,
            backends,
            external_traffic_policy: "Cluster".into(),
            internal_traffic_policy: "Cluster".into(),
            ..LBServiceSpec::default()
        },
    );
    svc.metadata.namespace = Some("default".into());
    svc
}

fn node<'a>(
    addresses: &'a [IpAddr],
    held_backends: &'a BTreeMap<BackendAddr, u32>,
    held_frontends: &'a BTreeMap<FrontendAddr, u16>,
) -> NodeServices<'a> {
    NodeServices {
        node_name: NODE,
        node_addresses: addresses,
        default_algorithm: LbAlgorithm::Random,
        maglev_table_size: 7,
        hash_seed: 1,
        maglev: None,
        held_backends,
        held_frontends,
    }
}

fn state_of(services: &[LBService]) -> DesiredServices {
    let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
    lb_state(services, &node(&[ip("10.250.0.10")], &hb, &hf))
}

/// The service map entry of a frontend's scope and slot, in its family's map.
fn entry(state: &LbState, f: &FrontendAddr, scope: u8, slot: u16) -> Option<LbServiceValue> {
    match service_key(f, scope, slot) {
        ServiceKey::V4(key) => state.services.get(&key).copied(),
        ServiceKey::V6(key) => state.services6.get(&key).copied(),
    }
}

/// The address of backend `id`, in its family's map.
fn backend_address(state: &LbState, id: u32) -> IpAddr {
    match (state.backends.get(&id), state.backends6.get(&id)) {
        (Some(b), None) => Ipv4Addr::from(b.address).into(),
        (None, Some(b)) => Ipv6Addr::from(b.address).into(),
        other => panic!("backend {id} in both or no family: {other:?}"),
    }
}

/// (count, flags, backend addresses in slot order) of a frontend's scope.
fn scope(state: &LbState, address: IpAddr, port: u16, scope: u8) -> Option<(u16, u8, Vec<IpAddr>)> {
    let f = FrontendAddr {
        address,
        port,
        proto: PROTO_TCP,
    };
    let master = entry(state, &f, scope, 0)?;
    let backends = (1..=master.count)
        .map(|slot| backend_address(state, entry(state, &f, scope, slot).unwrap().backend_id))
        .collect();
    Some((master.count, master.flags, backends))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn a_cluster_ip_gets_one_scope_with_every_active_backend() {
    let svc = service(
        "web",
        4,
        vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("10.200.1.5", "n2", "active"),
            backend("10.200.1.6", "n2", "terminating"),
        ],
    );
    let out = state_of(&[svc]);
    let (count, flags, backends) =
        scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!((count, flags), (2, 0));
    assert_eq!(backends, [ip("10.200.0.5"), ip("10.200.1.5")]);
    assert_eq!(
        scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_INTERNAL),
        None
    );
    assert_eq!(out.state.revnat.len(), 1);
    assert_eq!(out.state.backends.len(), 2);
    let local = out
        .state
        .backends
        .values()
        .filter(|b| b.flags == BE_F_LOCAL)
        .count();
    assert_eq!(local, 1);
    assert_eq!((out.services, out.frontends, out.revision), (1, 1, Some(4)));
}

#[test]
fn a_node_port_listens_on_every_node_address_and_the_wildcard() {
    let svc = service(
        "np",
        1,
        vec![frontend("NodePort", None, 30080)],
        vec![backend("10.200.1.5", "n2", "active")],
    );
    let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
    let addresses = [ip("10.250.0.10"), ip("192.168.1.10")];
    let out = lb_state([&svc], &node(&addresses, &hb, &hf));
    for address in [ip("10.250.0.10"), ip("192.168.1.10"), ip("0.0.0.0")] {
        let (count, flags, _) = scope(&out.state, address, 30080, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!((count, flags), (1, SVC_F_NODEPORT), "{address}");
    }
    assert_eq!((out.frontends, out.state.revnat.len()), (3, 3));
}

#[test]
fn external_traffic_policy_local_splits_the_scopes() {
    let mut svc = service(
        "lb",
        1,
        vec![frontend("LoadBalancer", Some("203.0.113.7"), 80)],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("10.200.1.5", "n2", "active"),
        ],
    );
    svc.spec.external_traffic_policy = "Local".into();
    let out = state_of(&[svc.clone()]);
    let vip = ip("203.0.113.7");
    let (count, flags, backends) = scope(&out.state, vip, 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(count, 1);
    assert_eq!(flags, SVC_F_EXTERNAL | SVC_F_TWO_SCOPES | SVC_F_LOCAL_ONLY);
    assert_eq!(backends, [ip("10.200.0.5")]);
    let (count, flags, _) = scope(&out.state, vip, 80, LB_SCOPE_INTERNAL).unwrap();
    assert_eq!((count, flags), (2, SVC_F_EXTERNAL));

    // No local backend: the external scope drops (kube-proxy's "has no local
    // endpoints"), in-cluster clients still reach n2.
    svc.spec.backends.remove(0);
    let out = state_of(&[svc.clone()]);
    let (count, flags, _) = scope(&out.state, vip, 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(count, 0);
    assert_eq!(flags & SVC_F_DROP_EMPTY, SVC_F_DROP_EMPTY);
    assert_eq!(scope(&out.state, vip, 80, LB_SCOPE_INTERNAL).unwrap().0, 1);
    // No backend anywhere: rejected, not dropped.
    svc.spec.backends.clear();
    let out = state_of(&[svc]);
    let (count, flags, _) = scope(&out.state, vip, 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!((count, flags & SVC_F_DROP_EMPTY), (0, 0));
}

#[test]
fn internal_traffic_policy_local_keeps_local_cluster_ip_backends() {
    let mut svc = service(
        "web",
        1,
        vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("10.200.1.5", "n2", "active"),
        ],
    );
    svc.spec.internal_traffic_policy = "Local".into();
    let out = state_of(&[svc]);
    let (count, flags, backends) =
        scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(
        (count, flags, backends),
        (1, SVC_F_LOCAL_ONLY, vec![ip("10.200.0.5")])
    );
}

#[test]
fn terminating_backends_serve_only_a_scope_without_active_ones() {
    let mut svc = service(
        "lb",
        1,
        vec![frontend("NodePort", None, 30080)],
        vec![
            backend("10.200.0.5", NODE, "terminating"),
            backend("10.200.1.5", "n2", "active"),
            backend("10.200.1.6", "n2", "terminating"),
        ],
    );
    svc.spec.external_traffic_policy = "Local".into();
    let out = state_of(&[svc.clone()]);
    let any = ip("0.0.0.0");
    // External (local) scope: no active local backend → the local terminating one.
    assert_eq!(
        scope(&out.state, any, 30080, LB_SCOPE_EXTERNAL).unwrap().2,
        [ip("10.200.0.5")]
    );
    // Internal scope: an active backend exists → terminating ones take nothing new.
    assert_eq!(
        scope(&out.state, any, 30080, LB_SCOPE_INTERNAL).unwrap().2,
        [ip("10.200.1.5")]
    );
    // Weight 0 takes no new connections.
    svc.spec.backends[1].weight = 0;
    let out = state_of(&[svc]);
    assert_eq!(
        scope(&out.state, any, 30080, LB_SCOPE_INTERNAL).unwrap().2,
        [ip("10.200.0.5"), ip("10.200.1.6")]
    );
}

#[test]
fn a_service_without_backends_is_programmed_to_reject() {
    let out = state_of(&[service(
        "empty",
        2,
        vec![frontend("ClusterIP", Some("10.96.0.11"), 80)],
        vec![],
    )]);
    let (count, _, _) = scope(&out.state, ip("10.96.0.11"), 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(count, 0);
    assert!(out.state.backends.is_empty());
}

#[test]
fn sctp_invalid_and_conflicting_frontends_are_skipped_with_a_reason() {
    let mut sctp = frontend("ClusterIP", Some("10.96.0.12"), 80);
    sctp.protocol = "SCTP".into();
    let garbage = frontend("ClusterIP", Some("fd00::zz"), 80);
    let a = service(
        "a",
        1,
        vec![sctp, garbage, frontend("ClusterIP", Some("10.96.0.13"), 80)],
        vec![],
    );
    let mut b = service(
        "b",
        2,
        vec![frontend("ClusterIP", Some("10.96.0.13"), 80)],
        vec![],
    );
    b.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2030-01-01T00:00:00Z".parse().unwrap(),
    ));
    let out = state_of(&[b, a]);
    let reasons: Vec<(String, SkipReason)> = out
        .skipped
        .iter()
        .map(|s| (s.service.clone(), s.reason))
        .collect();
    assert_eq!(
        reasons,
        [
            ("default/a".to_string(), SkipReason::Sctp),
            ("default/a".to_string(), SkipReason::Invalid),
            ("default/b".to_string(), SkipReason::Conflict),
        ]
    );
    assert_eq!((out.frontends, out.services, out.revision), (1, 1, Some(2)));
}

#[test]
fn held_ids_survive_and_new_ones_do_not_reuse_them() {
    let svc = service(
        "web",
        1,
        vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("10.200.0.6", NODE, "active"),
        ],
    );
    let held_backends = BTreeMap::from([(
        BackendAddr {
            address: ip("10.200.0.6"),
            port: 8080,
            proto: PROTO_TCP,
        },
        42,
    )]);
    let held_frontends = BTreeMap::from([(
        FrontendAddr {
            address: ip("10.96.0.10"),
            port: 80,
            proto: PROTO_TCP,
        },
        9,
    )]);
    let out = lb_state([&svc], &node(&[], &held_backends, &held_frontends));
    assert_eq!(backend_address(&out.state, 42), ip("10.200.0.6"));
    assert_eq!(backend_address(&out.state, 43), ip("10.200.0.5"));
    assert_eq!(out.state.revnat.keys().copied().collect::<Vec<_>>(), [9]);
    assert!(out.state.services.values().all(|s| s.rev_nat_index == 9));
}

#[test]
fn affinity_and_source_ranges_set_their_flags() {
    let mut svc = service(
        "lb",
        1,
        vec![
            frontend("LoadBalancer", Some("203.0.113.7"), 80),
            frontend("LoadBalancer", Some("2001:db8::7"), 80),
            frontend("ClusterIP", Some("10.96.0.10"), 80),
        ],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("fd00:200::5", NODE, "active"),
        ],
    );
    svc.spec.session_affinity = Some(SessionAffinity {
        client_ip: Some(ClientIpAffinity {
            timeout_seconds: 60,
        }),
    });
    svc.spec.load_balancer_source_ranges = vec!["198.51.100.0/24".into(), "fd00::/64".into()];
    let out = state_of(&[svc]);
    let lb = FrontendAddr {
        address: ip("203.0.113.7"),
        port: 80,
        proto: PROTO_TCP,
    };
    let master = entry(&out.state, &lb, LB_SCOPE_EXTERNAL, 0).unwrap();
    assert_eq!(master.affinity_timeout, 60);
    assert_eq!(
        master.flags,
        SVC_F_EXTERNAL | SVC_F_AFFINITY | SVC_F_SOURCE_RANGES
    );
    let key = out.state.source_ranges.keys().next().unwrap();
    assert_eq!(
        (key.rev_nat_index, key.prefixlen, key.address),
        (master.rev_nat_index, 56, [198, 51, 100, 0])
    );
    // The IPv6 range admits no IPv4 client: not in the IPv4 frontend's ranges, not skipped;
    // it is the IPv6 frontend's only one.
    assert_eq!(out.state.source_ranges.len(), 1);
    let lb6 = FrontendAddr {
        address: ip("2001:db8::7"),
        port: 80,
        proto: PROTO_TCP,
    };
    let master6 = entry(&out.state, &lb6, LB_SCOPE_EXTERNAL, 0).unwrap();
    assert_eq!(master6.flags & SVC_F_SOURCE_RANGES, SVC_F_SOURCE_RANGES);
    let key6 = out.state.source_ranges6.keys().next().unwrap();
    assert_eq!(
        (key6.rev_nat_index, key6.prefixlen, key6.address),
        (
            master6.rev_nat_index,
            32 + 64,
            "fd00::".parse::<Ipv6Addr>().unwrap().octets()
        )
    );
    assert_eq!(out.state.source_ranges6.len(), 1);
    assert!(out.skipped.is_empty(), "{:?}", out.skipped);
    // The ClusterIP of the same service: affinity, no source ranges.
    let (_, flags, _) = scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(flags, SVC_F_AFFINITY);
}

#[test]
fn maglev_services_get_a_table_when_the_builder_is_there() {
    fn round_robin(backends: &[(u32, u32, &[u8])], m: u32, _seed: u32) -> Vec<u32> {
        (0..m as usize)
            .map(|i| backends[i % backends.len()].0)
            .collect()
    }
    let mut svc = service(
        "web",
        1,
        vec![frontend("ClusterIP", Some("10.96.0.10"), 80)],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("10.200.0.6", NODE, "active"),
        ],
    );
    svc.spec.algorithm = Some("Maglev".into());
    let out = state_of(&[svc.clone()]);
    assert_eq!(out.maglev_without_table, 1);
    assert!(out.state.maglev.is_empty());
    let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
    let mut n = node(&[], &hb, &hf);
    n.maglev = Some(round_robin);
    let out = lb_state([&svc], &n);
    assert_eq!(out.state.maglev.len(), 7);
    let ids: BTreeSet<u32> = out.state.maglev.values().copied().collect();
    assert_eq!(ids, out.state.backends.keys().copied().collect());
    let (_, flags, _) = scope(&out.state, ip("10.96.0.10"), 80, LB_SCOPE_EXTERNAL).unwrap();
    assert_eq!(flags, SVC_F_MAGLEV);
}

#[test]
fn the_realized_revision_is_the_highest_committed_one_not_the_highest_seen() {
    let with = |name: &str, revision: i64, committed: Option<i64>, port: i32| {
        let mut svc = service(
            name,
            revision,
            vec![frontend("ClusterIP", Some("10.96.0.10"), port)],
            vec![backend("10.200.0.5", NODE, "active")],
        );
        svc.spec.committed_revision = committed;
        svc
    };
    // 12 and 13 went out together while 11 was in flight: seeing them says only that
    // everything up to 10 committed.
    let out = state_of(&[with("a", 12, Some(10), 80), with("b", 13, Some(10), 81)]);
    assert_eq!(out.revision, Some(10));
    // The drain's re-write of 13 carries 13: everything up to it is here.
    let out = state_of(&[with("a", 12, Some(10), 80), with("b", 13, Some(13), 81)]);
    assert_eq!(out.revision, Some(13));
    // Without committedRevision (written one at a time) a spec's own revision counts.
    let out = state_of(&[with("a", 12, Some(10), 80), with("c", 7, None, 82)]);
    assert_eq!(out.revision, Some(10));
    let out = state_of(&[with("c", 7, None, 82)]);
    assert_eq!(out.revision, Some(7));
}

/// A dual-stack service: both ClusterIPs, a NodePort, backends of both families on this
/// node and another.
fn dual_stack() -> LBService {
    service(
        "ds",
        3,
        vec![
            frontend("ClusterIP", Some("10.96.0.20"), 80),
            frontend("ClusterIP", Some("fd00:10:96::20"), 80),
            frontend("NodePort", None, 30090),
        ],
        vec![
            backend("10.200.0.5", NODE, "active"),
            backend("10.200.1.5", "n2", "active"),
            backend("fd00:200::5", NODE, "active"),
            backend("fd00:200:1::5", "n2", "active"),
        ],
    )
}

#[test]
fn dual_stack_frontends_get_only_the_backends_of_their_own_family() {
    let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
    let addresses = [ip("10.250.0.10"), ip("fd00:250::10")];
    let out = lb_state([&dual_stack()], &node(&addresses, &hb, &hf));
    let v4 = [ip("10.200.0.5"), ip("10.200.1.5")];
    let v6 = [ip("fd00:200::5"), ip("fd00:200:1::5")];
    for (address, port, backends, flags) in [
        ("10.96.0.20", 80, &v4, 0),
        ("10.250.0.10", 30090, &v4, SVC_F_NODEPORT),
        ("0.0.0.0", 30090, &v4, SVC_F_NODEPORT),
        ("fd00:10:96::20", 80, &v6, 0),
        ("fd00:250::10", 30090, &v6, SVC_F_NODEPORT),
        ("::", 30090, &v6, SVC_F_NODEPORT),
    ] {
        let got = scope(&out.state, ip(address), port, LB_SCOPE_EXTERNAL).unwrap();
        assert_eq!(got, (2, flags, backends.to_vec()), "{address}:{port}");
    }
    // Three frontends per family, each family in its own maps; one numbering of ids.
    assert_eq!((out.frontends, out.services), (6, 1));
    assert_eq!((out.state.revnat.len(), out.state.revnat6.len()), (3, 3));
    assert_eq!(
        (out.state.backends.len(), out.state.backends6.len()),
        (2, 2)
    );
    let ids: BTreeSet<u32> = out
        .state
        .backends
        .keys()
        .chain(out.state.backends6.keys())
        .copied()
        .collect();
    assert_eq!(ids.len(), 4);
    let indexes: BTreeSet<u16> = out
        .state
        .revnat
        .keys()
        .chain(out.state.revnat6.keys())
        .copied()
        .collect();
    assert_eq!(indexes.len(), 6);
    let local6 = out
        .state
        .backends6
        .values()
        .filter(|b| b.flags == BE_F_LOCAL);
    assert_eq!(local6.count(), 1);
    assert!(out.skipped.is_empty(), "{:?}", out.skipped);
}

#[test]
fn an_ipv6_frontend_without_ipv6_backends_rejects_and_a_single_stack_node_port_stays_in_its_family()
{
    let mut svc = dual_stack();
    svc.spec.backends.retain(|b| !b.address.contains(':'));
    let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
    let addresses = [ip("10.250.0.10"), ip("fd00:250::10")];
    let out = lb_state([&svc], &node(&addresses, &hb, &hf));
    // IPv4 backends never serve the IPv6 ClusterIP: it is programmed to reject.
    assert_eq!(
        scope(&out.state, ip("fd00:10:96::20"), 80, LB_SCOPE_EXTERNAL),
        Some((0, 0, vec![]))
    );
    assert_eq!(
        scope(&out.state, ip("10.96.0.20"), 80, LB_SCOPE_EXTERNAL)
            .unwrap()
            .0,
        2
    );

    // An IPv4-only service's NodePort is not on the node's IPv6 addresses.
    svc.spec.frontends.remove(1);
    let out = lb_state([&svc], &node(&addresses, &hb, &hf));
    assert!(out.state.services6.is_empty() && out.state.revnat6.is_empty());
    assert_eq!(out.frontends, 3);
}

#[test]
fn held_ipv6_ids_survive_beside_the_ipv4_ones() {
    let svc = dual_stack();
    let held_backends = BTreeMap::from([(
        BackendAddr {
            address: ip("fd00:200::5"),
            port: 8080,
            proto: PROTO_TCP,
        },
        7,
    )]);
    let held_frontends = BTreeMap::from([(
        FrontendAddr {
            address: ip("fd00:10:96::20"),
            port: 80,
            proto: PROTO_TCP,
        },
        5,
    )]);
    let out = lb_state([&svc], &node(&[], &held_backends, &held_frontends));
    assert_eq!(backend_address(&out.state, 7), ip("fd00:200::5"));
    assert_eq!(
        Ipv6Addr::from(out.state.revnat6[&5].address),
        "fd00:10:96::20".parse::<Ipv6Addr>().unwrap()
    );
    // New ids follow the highest held one, in both families.
    assert!(out.state.backends.keys().all(|id| *id > 7));
    assert!(out.state.revnat.keys().all(|index| *index > 5));
}
