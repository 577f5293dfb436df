//! `BPF_PROG_TEST_RUN` of the tc service path's NAT table (`bpf/lib/lb_nat.h`): a
//! retransmitted SYN keeps its backend, SNAT ports of idle connections are reused and busy
//! ones never, and one client port sent to two frontends of one backend stays two
//! connections. Needs root.

mod bpf_services_support;
mod bpf_support;

use std::net::Ipv4Addr;

use tendril_crds::v1alpha1::Backend;

use bpf_services_support::*;
use bpf_support::*;
use tendril_datapath::bpf::{
    Hook,
    maps::{Direction, MetricReason},
};

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

/// One client port sent to two frontends of one backend (a client's kernel picks ephemeral
/// ports per destination, so it happens; the services conformance matrix met it from its
/// outside clients): the backend must see two connections, and each answer must go back
/// as its own frontend. The second one's port is remapped; the client address is kept.
#[test]
fn one_client_port_to_two_frontends_of_one_backend_stays_two_connections() {
    let mut node = node();
    program(
        &mut node,
        &[
            service(
                "web",
                vec![frontend("LoadBalancer", Some(LB_IP), 80, "TCP")],
                vec![backend(POD_A, NODE)],
            ),
            service(
                "api",
                vec![frontend("NodePort", None, NODE_PORT, "TCP")],
                vec![backend(POD_A, NODE)],
            ),
        ],
    );
    let first = run_from(&node, Hook::FromNetdev, &syn(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(tuple(&first.data), (CLIENT, 40000, POD_A, 8080));
    let second = run_from(
        &node,
        Hook::FromNetdev,
        &syn(CLIENT, 40000, NODE_IP, NODE_PORT),
        LO,
    );
    let (src, remapped, dst, dport) = tuple(&second.data);
    assert_eq!(
        (src, dst, dport),
        (CLIENT, POD_A, 8080),
        "client address kept"
    );
    assert!(
        (61000..=65535).contains(&remapped),
        "the taken port {remapped} was not remapped"
    );
    assert_checksums(&second.data);
    assert_eq!(
        count(
            &node,
            MetricReason::LbClientPortRemapped,
            Direction::Ingress
        ),
        1
    );
    // A retransmitted SYN of the second keeps its remapped port; the first is untouched.
    let again = run_from(
        &node,
        Hook::FromNetdev,
        &syn(CLIENT, 40000, NODE_IP, NODE_PORT),
        LO,
    );
    assert_eq!(tuple(&again.data), (CLIENT, remapped, POD_A, 8080));
    let first_ack = run_from(&node, Hook::FromNetdev, &ack(CLIENT, 40000, LB_IP, 80), LO);
    assert_eq!(tuple(&first_ack.data), (CLIENT, 40000, POD_A, 8080));

    // Each answer leaves as its own frontend, to the port the client used.
    let answer = |port| with_l4_checksum(tcp(POD_A, 8080, CLIENT, port, TCP_SYN | TCP_ACK));
    let back1 = run_from(&node, Hook::FromContainer, &answer(40000), LO);
    assert_eq!(tuple(&back1.data), (LB_IP, 80, CLIENT, 40000));
    let back2 = run_from(&node, Hook::FromContainer, &answer(remapped), LO);
    assert_eq!(tuple(&back2.data), (NODE_IP, NODE_PORT, CLIENT, 40000));
    assert_checksums(&back2.data);
    assert_eq!(
        count(
            &node,
            MetricReason::LbClientPortRemapped,
            Direction::Ingress
        ),
        1
    );
}
