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

mod bpf_services_support;
mod bpf_support;

use std::net::Ipv4Addr;
use tendril_crds::v1alpha1::{Backend, LBService};
use tendril_datapath::config::LbAlgorithm;
use tendril_datapath::services::desired::{NodeServices, lb_state};

use bpf_services_support::*;
use bpf_support::*;
use tendril_datapath::bpf::{
    Hook, MapSizes,
    maps::{Direction, EndpointInfo, MetricReason},
};

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
                node_addresses: &[NODE_IP.into()],
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
