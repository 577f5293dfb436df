//! `BPF_PROG_TEST_RUN` of the tc service path (`bpf/lib/lb_nat.h`) on crafted packets:
//! NodePort to a local backend (client address kept) and its answer, SNAT to a remote
//! backend and its answer, a connection keeping its backend across a service change,
//! `loadBalancerSourceRanges`, rejects (TCP RST, ICMP port unreachable) for a service
//! without backends, and a pod's ClusterIP packet translated in `from_container`. The maps
//! are programmed from `LBService` objects by the agent's own desired-state function.
//! Checksums (IP and TCP/UDP) are verified on every rewritten frame. Needs root.
//!
//! A test run cannot show where a redirect goes; `from_netdev`'s answers leave by the FIB,
//! which a test run resolves against the test's own routes: they are checked rewritten, and
//! either redirected or counted `service_no_route`.

mod bpf_support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_support::*;
use tendril_crds::v1alpha1::{Backend, Frontend, LBService, LBServiceSpec};
use tendril_datapath::bpf::{
    Hook, MapSizes,
    maps::{Direction, EndpointInfo, IpcacheValue, MetricReason, NODE_F_TUNNEL, NodeConfig},
};
use tendril_datapath::config::LbAlgorithm;
use tendril_datapath::services::desired::{NodeServices, lb_state};

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 5);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 200);
const NODE_PORT: u16 = 30080;
const TUNNEL_IFINDEX: u32 = 77;
const LO: u32 = 1;
const NODE: &str = "n1";

fn backend(ip: Ipv4Addr, node: &str) -> Backend {
    Backend {
        port_name: "web".into(),
        address: ip.to_string(),
        port: 8080,
        protocol: "TCP".into(),
        weight: 1,
        node_name: Some(node.into()),
        zone: None,
        state: "active".into(),
    }
}

fn frontend(type_: &str, address: Option<Ipv4Addr>, port: u16, protocol: &str) -> Frontend {
    Frontend {
        name: "web".into(),
        type_: type_.into(),
        address: address.map(|a| a.to_string()),
        port: port.into(),
        protocol: protocol.into(),
    }
}

fn service(name: &str, frontends: Vec<Frontend>, backends: Vec<Backend>) -> LBService {
    let mut svc = LBService::new(
        name,
        LBServiceSpec {
            revision: 1,
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

/// Pods A and B behind loopback (test runs need a device that exists), a remote pod CIDR
/// behind a tunnel.
fn node() -> Node {
    node_with(&MapSizes::default())
}

fn node_with(sizes: &MapSizes) -> Node {
    let mut node = Node::load("svc", sizes);
    let endpoints = BTreeMap::from([
        (
            POD_A.into(),
            EndpointInfo {
                ifindex: LO,
                identity: 256,
                endpoint_id: 1,
                mac: [2, 0, 0, 0, 0, 0xa],
                node_mac: [2, 0, 0, 0, 1, 0xa],
                ..Default::default()
            },
        ),
        (
            POD_B.into(),
            EndpointInfo {
                ifindex: LO,
                identity: 257,
                endpoint_id: 2,
                mac: [2, 0, 0, 0, 0, 0xb],
                node_mac: [2, 0, 0, 0, 1, 0xb],
                ..Default::default()
            },
        ),
    ]);
    let ipcache = BTreeMap::from([
        (
            "10.0.2.0/24".parse().unwrap(),
            IpcacheValue::new(300, Some(REMOTE_NODE)),
        ),
        (
            format!("{NODE_IP}/32").parse().unwrap(),
            IpcacheValue::local_node(1),
        ),
        (
            format!("{POD_A}/32").parse().unwrap(),
            IpcacheValue::new(256, None),
        ),
        (
            format!("{POD_B}/32").parse().unwrap(),
            IpcacheValue::new(257, None),
        ),
    ]);
    assert!(
        node.dataplane
            .endpoints
            .converge(&endpoints, true)
            .unwrap()
            .is_converged()
    );
    assert!(
        node.dataplane
            .ipcache
            .converge(&ipcache, true)
            .unwrap()
            .is_converged()
    );
    node.dataplane
        .node_config
        .set(&NodeConfig {
            tunnel_ifindex: TUNNEL_IFINDEX,
            node_ipv4: NODE_IP.octets(),
            flags: NODE_F_TUNNEL,
            pad: 0,
        })
        .unwrap();
    node
}

/// Programs `services` as the agent's services step would on node `n1`.
fn program(node: &mut Node, services: &[LBService]) {
    let (held_backends, held_frontends) = (
        node.dataplane
            .lb
            .backends()
            .unwrap()
            .iter()
            .map(|(id, b)| (b.into(), *id))
            .collect(),
        node.dataplane
            .lb
            .revnat()
            .unwrap()
            .iter()
            .map(|(i, r)| (r.into(), *i))
            .collect(),
    );
    let desired = lb_state(
        services,
        &NodeServices {
            node_name: NODE,
            node_addresses: &[NODE_IP],
            default_algorithm: LbAlgorithm::Random,
            maglev_table_size: 16381,
            hash_seed: 1,
            maglev: None,
            held_backends: &held_backends,
            held_frontends: &held_frontends,
        },
    );
    let report = node.dataplane.lb.converge(&desired.state, true).unwrap();
    assert!(report.is_converged(), "{report:?}");
}

fn checksum16(bytes: &[u8], mut sum: u32) -> u16 {
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP/UDP checksum over the pseudo header and segment of `frame` (0 when valid).
fn l4_checksum(frame: &[u8]) -> u16 {
    let ip = &frame[14..34];
    let l4 = &frame[34..14 + usize::from(u16::from_be_bytes([ip[2], ip[3]]))];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, ip[9]]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    let sum: u32 = pseudo
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    checksum16(l4, sum)
}

/// `frame` with a valid TCP/UDP checksum.
fn with_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let off = if frame[23] == 6 { 34 + 16 } else { 34 + 6 };
    frame[off..off + 2].copy_from_slice(&[0, 0]);
    let sum = l4_checksum(&frame);
    frame[off..off + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    with_l4_checksum(tcp(src, sport, dst, dport, TCP_SYN))
}

fn ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    with_l4_checksum(tcp(src, sport, dst, dport, TCP_ACK))
}

/// (source, source port, destination, destination port) of a frame.
fn tuple(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ip4 = |o: usize| Ipv4Addr::new(frame[o], frame[o + 1], frame[o + 2], frame[o + 3]);
    let port = |o: usize| u16::from_be_bytes([frame[o], frame[o + 1]]);
    (ip4(26), port(34), ip4(30), port(36))
}

fn assert_checksums(frame: &[u8]) {
    assert!(ipv4_checksum_ok(frame), "IP checksum");
    assert_eq!(l4_checksum(frame), 0, "transport checksum");
}

fn count(node: &Node, reason: MetricReason, dir: Direction) -> u64 {
    node.dataplane.metrics.packets(reason, dir).unwrap()
}

/// An answer that leaves by the FIB: redirected, or (no route in the test's namespace)
/// dropped and counted as such.
fn assert_left_by_fib(node: &Node, ret: u32, dir: Direction) {
    match ret {
        TC_ACT_REDIRECT => assert_eq!(count(node, MetricReason::LbTranslated, dir), 1),
        TC_ACT_SHOT => assert_eq!(count(node, MetricReason::DropLbNoRoute, dir), 1),
        other => panic!("an answer must not go to the stack: verdict {other}"),
    }
}

#[test]
fn node_port_to_a_local_backend_keeps_the_client_address_and_answers_as_the_frontend() {
    let mut node = node();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend("NodePort", None, NODE_PORT, "TCP")],
            vec![backend(POD_A, NODE)],
        )],
    );
    let netdev = node.programs.classifier(Hook::FromNetdev);
    let run = run(netdev, &syn(CLIENT, 40000, NODE_IP, NODE_PORT), LO, 0, 1);
    assert_eq!(run.ret, TC_ACT_REDIRECT, "into the backend pod");
    assert_eq!(tuple(&run.data), (CLIENT, 40000, POD_A, 8080));
    assert_checksums(&run.data);

    // The backend answers (from its veth): the frontend is the source again.
    let answer = with_l4_checksum(tcp(POD_A, 8080, CLIENT, 40000, TCP_SYN | TCP_ACK));
    let run = run_from(&node, Hook::FromContainer, &answer, LO);
    assert_eq!(tuple(&run.data), (NODE_IP, NODE_PORT, CLIENT, 40000));
    assert_checksums(&run.data);
    assert_left_by_fib(&node, run.ret, Direction::Egress);
}

fn run_from(node: &Node, hook: Hook, frame: &[u8], ifindex: u32) -> Run {
    run(node.programs.classifier(hook), frame, ifindex, 0, 1)
}

#[test]
fn node_port_to_a_remote_backend_is_snated_and_its_answer_reversed() {
    let mut node = node();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend("NodePort", None, NODE_PORT, "TCP")],
            vec![backend(REMOTE_POD, "n2")],
        )],
    );
    let run1 = run_from(
        &node,
        Hook::FromNetdev,
        &syn(CLIENT, 40000, NODE_IP, NODE_PORT),
        LO,
    );
    assert_eq!(run1.ret, TC_ACT_REDIRECT, "into the tunnel");
    let (src, sport, dst, dport) = tuple(&run1.data);
    assert_eq!((src, dst, dport), (NODE_IP, REMOTE_POD, 8080));
    assert!((61000..=65535).contains(&sport), "SNAT port {sport}");
    assert_checksums(&run1.data);
    assert_eq!(
        count(&node, MetricReason::ForwardTunnel, Direction::Ingress),
        1
    );

    // The backend's answer comes back natively to the node's address.
    let answer = ack(REMOTE_POD, 8080, NODE_IP, sport);
    let run2 = run_from(&node, Hook::FromNetdev, &answer, LO);
    assert_eq!(tuple(&run2.data), (NODE_IP, NODE_PORT, CLIENT, 40000));
    assert_checksums(&run2.data);
    assert_left_by_fib(&node, run2.ret, Direction::Ingress);
}

#[test]
fn an_established_connection_keeps_its_backend_across_a_service_change() {
    let mut node = node();
    let with = |b: Ipv4Addr| {
        service(
            "web",
            vec![frontend("LoadBalancer", Some(LB_IP), 80, "TCP")],
            vec![backend(b, NODE)],
        )
    };
    program(&mut node, &[with(POD_A)]);
    let run1 = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(tuple(&run1.data).2, POD_A);
    program(&mut node, &[with(POD_B)]);
    // The same connection's next segment: still pod A.
    let run2 = run_from(&node, Hook::FromNetdev, &ack(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(tuple(&run2.data), (CLIENT, 40000, POD_A, 8080));
    assert_checksums(&run2.data);
    // A new connection: pod B, the only backend now.
    let run3 = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40001, LB_IP, 80), LO);
    assert_eq!(tuple(&run3.data), (CLIENT, 40001, POD_B, 8080));
}

#[test]
fn source_ranges_admit_only_their_clients() {
    let mut node = node();
    let mut svc = service(
        "web",
        vec![frontend("LoadBalancer", Some(LB_IP), 80, "TCP")],
        vec![backend(POD_A, NODE)],
    );
    svc.spec.load_balancer_source_ranges = vec!["198.51.100.0/24".into()];
    program(&mut node, &[svc]);
    let refused = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(refused.ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropLbSourceRange, Direction::Ingress),
        1
    );
    let inside = Ipv4Addr::new(198, 51, 100, 7);
    let admitted = run_from(&node, Hook::FromNetdev, &syn(inside, 40000, LB_IP, 80), LO);
    assert_eq!(admitted.ret, TC_ACT_REDIRECT);
    assert_eq!(tuple(&admitted.data), (inside, 40000, POD_A, 8080));
}

#[test]
fn a_service_without_backends_rejects_with_rst_and_port_unreachable() {
    let mut node = node();
    let mut svc = service(
        "web",
        vec![
            frontend("NodePort", None, NODE_PORT, "TCP"),
            frontend("NodePort", None, NODE_PORT, "UDP"),
        ],
        vec![],
    );
    svc.spec.external_traffic_policy = "Local".into();
    program(&mut node, &[svc]);

    let request = syn(CLIENT, 40000, NODE_IP, NODE_PORT);
    let run1 = run_from(&node, Hook::FromNetdev, &request, LO);
    assert_eq!(run1.ret, TC_ACT_REDIRECT, "back out of the uplink");
    assert_eq!(run1.data.len(), 54, "Ethernet + IP + bare TCP");
    assert_eq!(tuple(&run1.data), (NODE_IP, NODE_PORT, CLIENT, 40000));
    assert_eq!(run1.data[47], TCP_RST | TCP_ACK, "flags");
    let seq = u32::from_be_bytes(request[38..42].try_into().unwrap());
    let ack_seq = u32::from_be_bytes(run1.data[42..46].try_into().unwrap());
    assert_eq!(ack_seq, seq.wrapping_add(1));
    assert_eq!(&run1.data[0..6], &request[6..12], "to the sender's MAC");
    assert_checksums(&run1.data);

    let datagram = with_l4_checksum(udp(CLIENT, 40000, NODE_IP, NODE_PORT));
    let run2 = run_from(&node, Hook::FromNetdev, &datagram, LO);
    assert_eq!(run2.ret, TC_ACT_REDIRECT);
    assert_eq!(run2.data[23], 1, "ICMP");
    assert_eq!(&run2.data[34..36], &[3, 3], "port unreachable");
    assert_eq!(&run2.data[42..70], &datagram[14..42], "quotes the datagram");
    assert!(ipv4_checksum_ok(&run2.data));
    assert_eq!(checksum16(&run2.data[34..70], 0), 0, "ICMP checksum");
    assert_eq!(
        count(&node, MetricReason::LbRejected, Direction::Ingress),
        2
    );
}

#[test]
fn a_local_policy_without_a_local_backend_drops_as_kube_proxy_does() {
    let mut node = node();
    let mut svc = service(
        "web",
        vec![frontend("NodePort", None, NODE_PORT, "TCP")],
        vec![backend(REMOTE_POD, "n2")],
    );
    svc.spec.external_traffic_policy = "Local".into();
    program(&mut node, &[svc]);
    let run = run_from(
        &node,
        Hook::FromNetdev,
        &syn(CLIENT, 40000, NODE_IP, NODE_PORT),
        LO,
    );
    assert_eq!(run.ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropLbNoBackend, Direction::Ingress),
        1
    );
    assert_eq!(
        count(&node, MetricReason::LbRejected, Direction::Ingress),
        0
    );
}

#[test]
fn a_pod_reaching_a_cluster_ip_outside_the_socket_lb_is_translated_in_from_container() {
    let mut node = node();
    program(
        &mut node,
        &[
            service(
                "web",
                vec![frontend("ClusterIP", Some(CLUSTER_IP), 80, "TCP")],
                vec![backend(POD_A, NODE)],
            ),
            service(
                "empty",
                vec![frontend(
                    "ClusterIP",
                    Some(Ipv4Addr::new(10, 96, 0, 11)),
                    80,
                    "TCP",
                )],
                vec![],
            ),
        ],
    );
    // Pod B → ClusterIP: delivered into pod A.
    let run1 = run_from(
        &node,
        Hook::FromContainer,
        &syn(POD_B, 40000, CLUSTER_IP, 80),
        LO,
    );
    assert_eq!(run1.ret, TC_ACT_REDIRECT);
    assert_eq!(tuple(&run1.data), (POD_B, 40000, POD_A, 8080));
    assert_checksums(&run1.data);
    // Pod A answers: pod B sees the ClusterIP answer.
    let answer = with_l4_checksum(tcp(POD_A, 8080, POD_B, 40000, TCP_SYN | TCP_ACK));
    let run2 = run_from(&node, Hook::FromContainer, &answer, LO);
    assert_eq!(run2.ret, TC_ACT_REDIRECT, "into pod B");
    assert_eq!(tuple(&run2.data), (CLUSTER_IP, 80, POD_B, 40000));
    assert_checksums(&run2.data);
    // A service without backends: RST back into the pod.
    let empty = syn(POD_B, 40001, Ipv4Addr::new(10, 96, 0, 11), 80);
    let run3 = run_from(&node, Hook::FromContainer, &empty, LO);
    assert_eq!(run3.ret, TC_ACT_REDIRECT);
    assert_eq!(run3.data[47], TCP_RST | TCP_ACK);
    assert_eq!(
        tuple(&run3.data),
        (Ipv4Addr::new(10, 96, 0, 11), 80, POD_B, 40001)
    );
    assert_checksums(&run3.data);
}

#[test]
fn a_pod_reaching_itself_through_its_service_sees_the_frontend_as_its_peer() {
    let mut node = node();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend("ClusterIP", Some(CLUSTER_IP), 80, "TCP")],
            vec![backend(POD_A, NODE)],
        )],
    );
    let run1 = run_from(
        &node,
        Hook::FromContainer,
        &syn(POD_A, 40000, CLUSTER_IP, 80),
        LO,
    );
    assert_eq!(run1.ret, TC_ACT_REDIRECT, "back into pod A");
    assert_eq!(tuple(&run1.data), (CLUSTER_IP, 40000, POD_A, 8080));
    assert_checksums(&run1.data);
    let answer = with_l4_checksum(tcp(POD_A, 8080, CLUSTER_IP, 40000, TCP_SYN | TCP_ACK));
    let run2 = run_from(&node, Hook::FromContainer, &answer, LO);
    assert_eq!(run2.ret, TC_ACT_REDIRECT, "back into pod A");
    assert_eq!(tuple(&run2.data), (CLUSTER_IP, 80, POD_A, 40000));
    assert_checksums(&run2.data);
}

#[test]
fn a_full_services_map_is_reported_and_never_half_programs_a_service() {
    let sizes = MapSizes {
        lb_services: 3,
        ..MapSizes::default()
    };
    let mut node = node_with(&sizes);
    let with = |backends: Vec<Backend>| {
        service(
            "web",
            vec![frontend("LoadBalancer", Some(LB_IP), 80, "TCP")],
            backends,
        )
    };
    let program_capped = |node: &mut Node, svc: LBService| {
        let held_backends = node
            .dataplane
            .lb
            .backends()
            .unwrap()
            .iter()
            .map(|(id, b)| (b.into(), *id))
            .collect();
        let held_frontends = node
            .dataplane
            .lb
            .revnat()
            .unwrap()
            .iter()
            .map(|(i, r)| (r.into(), *i))
            .collect();
        let desired = lb_state(
            [&svc],
            &NodeServices {
                node_name: NODE,
                node_addresses: &[NODE_IP],
                default_algorithm: LbAlgorithm::Random,
                maglev_table_size: 16381,
                hash_seed: 1,
                maglev: None,
                held_backends: &held_backends,
                held_frontends: &held_frontends,
            },
        );
        node.dataplane.lb.converge(&desired.state, true).unwrap()
    };
    // One backend: the service and its slot (2 of 3 entries).
    assert!(program_capped(&mut node, with(vec![backend(POD_A, NODE)])).is_converged());
    // Three backends need 4 entries: the third slot does not fit.
    let report = program_capped(
        &mut node,
        with(vec![
            backend(POD_A, NODE),
            backend(POD_B, NODE),
            backend(REMOTE_POD, "n2"),
        ]),
    );
    assert!(report.map_full() && !report.is_converged(), "{report:?}");
    // The service keeps counting only slots that exist (its update was held back).
    let held = node.dataplane.lb.services().unwrap();
    for (key, svc) in held.iter().filter(|(k, _)| k.backend_slot == 0) {
        assert_eq!(svc.count, 1, "{key}");
        for slot in 1..=svc.count {
            assert!(held.contains_key(&tendril_datapath::bpf::maps::Lb4Key {
                backend_slot: slot,
                ..*key
            }));
        }
    }
    // And it still serves: every new connection lands on a backend.
    for port in 40000..40020 {
        let run = run_from(&node, Hook::FromNetdev, &syn(CLIENT, port, LB_IP, 80), LO);
        let drops: Vec<(MetricReason, u64)> = MetricReason::ALL
            .into_iter()
            .map(|r| (r, count(&node, r, Direction::Ingress)))
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(run.ret, TC_ACT_REDIRECT, "{drops:?}");
        assert!([POD_A, POD_B].contains(&tuple(&run.data).2));
    }
}

#[test]
fn policy_judges_the_backend_after_translation() {
    use tendril_crds::v1alpha1::{
        ResolvedDefaultDeny, ResolvedPolicySpec, ResolvedPort, ResolvedRule,
    };
    use tendril_datapath::agent::pass::policy::{ClusterNamedPorts, PolicySubject};
    use tendril_datapath::agent::pass::realize_policy;

    let mut node = node();
    let to_b = Ipv4Addr::new(10, 96, 0, 20);
    program(
        &mut node,
        &[
            service(
                "web-a",
                vec![frontend("ClusterIP", Some(CLUSTER_IP), 80, "TCP")],
                vec![backend(POD_A, NODE)],
            ),
            service(
                "web-b",
                vec![frontend("ClusterIP", Some(to_b), 80, "TCP")],
                vec![backend(POD_B, NODE)],
            ),
        ],
    );
    // A third pod (endpoint 3) may send only to pod A's identity (256), TCP 8080; the
    // service addresses appear in no rule.
    let client = Ipv4Addr::new(10, 0, 1, 30);
    let mut endpoints = node.dataplane.endpoints.by_ip().unwrap();
    endpoints.insert(
        client.into(),
        EndpointInfo {
            ifindex: LO,
            identity: 258,
            endpoint_id: 3,
            mac: [2, 0, 0, 0, 0, 0xc],
            node_mac: [2, 0, 0, 0, 1, 0xc],
            ..Default::default()
        },
    );
    assert!(
        node.dataplane
            .endpoints
            .converge(&endpoints, true)
            .unwrap()
            .is_converged()
    );
    let spec = ResolvedPolicySpec {
        identity: 258,
        revision: 1,
        default_deny: ResolvedDefaultDeny {
            ingress: false,
            egress: true,
        },
        egress: vec![ResolvedRule {
            verdict: "Allow".parse().unwrap(),
            peers: vec![256],
            cidrs: vec![],
            ports: vec![ResolvedPort {
                port: 8080,
                end_port: None,
                name: None,
                protocol: "TCP".parse().unwrap(),
            }],
        }],
        ..Default::default()
    };
    let subjects = [PolicySubject {
        endpoint_id: 3,
        policy: Some(&spec),
        named_ports: &[],
    }];
    let r = realize_policy(
        &mut node.dataplane,
        &subjects,
        &ClusterNamedPorts::default(),
        None,
    )
    .unwrap();
    assert!(r.policy.is_converged());

    let allowed = run_from(
        &node,
        Hook::FromContainer,
        &syn(client, 40000, CLUSTER_IP, 80),
        LO,
    );
    assert_eq!(
        allowed.ret, TC_ACT_REDIRECT,
        "to pod A through its ClusterIP"
    );
    assert_eq!(tuple(&allowed.data), (client, 40000, POD_A, 8080));
    let denied = run_from(
        &node,
        Hook::FromContainer,
        &syn(client, 40001, to_b, 80),
        LO,
    );
    assert_eq!(denied.ret, TC_ACT_SHOT, "pod B's identity is not allowed");
    assert_eq!(count(&node, MetricReason::DropPolicy, Direction::Egress), 1);
}

/// The backend a frame was translated to.
fn backend_of(run: &Run) -> Ipv4Addr {
    tuple(&run.data).2
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_and_a_syn_after_close_is_judged_afresh() {
    let mut node = node();
    let web = |backends: Vec<Backend>| {
        service(
            "web",
            vec![frontend("LoadBalancer", Some(LB_IP), 80, "TCP")],
            backends,
        )
    };
    // A second service keeps both backends in lb_backends whatever web holds.
    let other = service(
        "other",
        vec![frontend("LoadBalancer", Some(LB_IP), 81, "TCP")],
        vec![backend(POD_A, NODE), backend(POD_B, NODE)],
    );
    program(
        &mut node,
        &[
            web(vec![backend(POD_A, NODE), backend(POD_B, NODE)]),
            other.clone(),
        ],
    );
    let first = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
    let chosen = backend_of(&first);
    // Random selection: without the NAT entry a retransmission would be a coin toss.
    for _ in 0..16 {
        let again = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
        assert_eq!(backend_of(&again), chosen, "a retransmitted SYN moved");
    }
    let remaining = if chosen == POD_A { POD_B } else { POD_A };
    program(&mut node, &[web(vec![backend(remaining, NODE)]), other]);
    // Still the handshake of the first connection: its backend, though no longer chosen.
    let again = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(backend_of(&again), chosen);
    // The connection closes; the next SYN on that tuple is a new connection.
    let fin = with_l4_checksum(tcp(CLIENT, 40000, LB_IP, 80, TCP_FIN | TCP_ACK));
    assert_eq!(
        backend_of(&run_from(&node, Hook::FromNetdev, &fin, LO)),
        chosen
    );
    let reopened = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(tuple(&reopened.data), (CLIENT, 40000, remaining, 8080));
    assert_checksums(&reopened.data);
}

fn monotonic_seconds() -> u32 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) },
        0
    );
    now.tv_sec as u32
}

#[test]
fn snat_ports_of_idle_connections_serve_new_ones_and_busy_ones_never_do() {
    use tendril_datapath::bpf::maps::{
        LB_NAT, LB_NAT_F_CLOSING, LB_NAT_F_NORTH_SOUTH, LB_NAT_F_SNAT, LB_NAT_IDLE_CLOSED_S,
        LB_NAT_REPLY, Lb4NatEntry, Lb4NatKey, Op, PinnedMap,
    };
    // 61000-65535: LB_SNAT_PORT_MIN and LB_SNAT_PORT_RANGE of lb_nat.h.
    const PORTS: std::ops::RangeInclusive<u16> = 61000..=65535;
    let mut node = node();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend("NodePort", None, NODE_PORT, "TCP")],
            vec![backend(REMOTE_POD, "n2")],
        )],
    );
    let mut nat: PinnedMap<Lb4NatKey, Lb4NatEntry> =
        PinnedMap::open(&node.dir.0, LB_NAT).expect("lb_nat");
    // Every SNAT port towards the backend held by some other client's connection.
    let hold_every_port = |nat: &mut PinnedMap<Lb4NatKey, Lb4NatEntry>, age: u32, flags: u8| {
        let now = monotonic_seconds();
        for port in PORTS {
            let key = Lb4NatKey {
                saddr: REMOTE_POD.octets(),
                daddr: NODE_IP.octets(),
                sport: 8080u16.to_be_bytes(),
                dport: port.to_be_bytes(),
                proto: 6,
                dir: LB_NAT_REPLY,
                pad: 0,
            };
            let entry = Lb4NatEntry {
                saddr: NODE_IP.octets(),
                daddr: Ipv4Addr::new(203, 0, 113, 99).octets(),
                sport: NODE_PORT.to_be_bytes(),
                dport: port.to_be_bytes(),
                backend_id: 1,
                rev_nat_index: 1,
                flags: LB_NAT_F_SNAT | LB_NAT_F_NORTH_SOUTH | flags,
                pad: 0,
                last_seen: now - age,
            };
            nat.put(&key, &entry, Op::Add).unwrap();
        }
    };
    let connect = |node: &Node, sport: u16| {
        run_from(
            node,
            Hook::FromNetdev,
            &syn(CLIENT, sport, NODE_IP, NODE_PORT),
            LO,
        )
    };

    hold_every_port(&mut nat, 0, 0);
    assert_eq!(
        connect(&node, 40000).ret,
        TC_ACT_SHOT,
        "busy ports given away"
    );
    assert_eq!(count(&node, MetricReason::DropLbNat, Direction::Ingress), 1);

    // Idle past the closed-connection time but never closed: an open connection still.
    hold_every_port(&mut nat, LB_NAT_IDLE_CLOSED_S + 1, 0);
    assert_eq!(
        connect(&node, 40001).ret,
        TC_ACT_SHOT,
        "open connections' ports given away"
    );

    // Closed and idle past the backend's TIME_WAIT: their ports serve new connections.
    hold_every_port(&mut nat, LB_NAT_IDLE_CLOSED_S + 1, LB_NAT_F_CLOSING);
    let run = connect(&node, 40002);
    assert_eq!(run.ret, TC_ACT_REDIRECT, "into the tunnel");
    let (src, sport, dst, _) = tuple(&run.data);
    assert_eq!((src, dst), (NODE_IP, REMOTE_POD));
    assert!(PORTS.contains(&sport));
    assert_eq!(
        count(&node, MetricReason::LbSnatPortReused, Direction::Ingress),
        1
    );
    // The port now answers for the new connection.
    let answer = ack(REMOTE_POD, 8080, NODE_IP, sport);
    let back = run_from(&node, Hook::FromNetdev, &answer, LO);
    assert_eq!(tuple(&back.data), (NODE_IP, NODE_PORT, CLIENT, 40002));
}
