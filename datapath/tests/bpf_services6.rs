//! `BPF_PROG_TEST_RUN` of the tc service path for IPv6 (`bpf/lib/lb6_nat.h`) on crafted
//! packets, as `bpf_services.rs` does for IPv4: a NodePort on the node's IPv6 address to a
//! local backend (client address kept; handed to the stack, which routes it into the pod)
//! and its answer, SNAT to a remote backend and its answer, `loadBalancerSourceRanges`,
//! rejects (TCP RST, ICMPv6 port unreachable), a pod's ClusterIP packet translated in
//! `from_container` with the answer reversed at the client's `to_container`, hairpin, and
//! a packet with an extension header. Every rewritten frame's transport checksum is
//! recomputed here over the IPv6 pseudo-header. Needs root.

mod bpf_services_support;
mod bpf_support;

use bpf_services_support::{v6::*, *};
use bpf_support::*;
use tendril_datapath::bpf::{
    Hook,
    maps::{Direction, MetricReason},
};

#[test]
fn node_port_to_a_local_backend_keeps_the_client_address_and_answers_as_the_frontend() {
    let mut node = node6();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend6("NodePort", None, NODE_PORT, "TCP")],
            vec![backend(POD_A6, NODE)],
        )],
    );
    let run1 = run_from(
        &node,
        Hook::FromNetdev,
        &syn6(CLIENT6, 40000, NODE_IP6, NODE_PORT),
        LO,
    );
    assert_eq!(
        run1.ret, TC_ACT_OK,
        "to the stack, which routes it into the pod"
    );
    assert_eq!(tuple6(&run1.data), (CLIENT6, 40000, POD_A6, 8080));
    assert_checksum6(&run1.data);
    assert_eq!(
        run1.data[21], 64,
        "the stack decrements the hop limit, not the program"
    );

    // The backend answers (from its veth): the frontend is the source again.
    let answer = tcp6(POD_A6, 8080, CLIENT6, 40000, TCP_SYN | TCP_ACK);
    let run2 = run_from(&node, Hook::FromContainer, &answer, LO);
    assert_eq!(tuple6(&run2.data), (NODE_IP6, NODE_PORT, CLIENT6, 40000));
    assert_checksum6(&run2.data);
    assert_left_by_fib(&node, run2.ret, Direction::Egress);
    assert_eq!(
        node.dataplane.lb.nat6().unwrap().len(),
        2,
        "forward and reply"
    );
}

#[test]
fn node_port_to_a_remote_backend_is_snated_to_the_node_and_its_answer_reversed() {
    let mut node = node6();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend6("NodePort", None, NODE_PORT, "TCP")],
            vec![backend(REMOTE_POD6, "n2")],
        )],
    );
    let run1 = run_from(
        &node,
        Hook::FromNetdev,
        &syn6(CLIENT6, 40000, NODE_IP6, NODE_PORT),
        LO,
    );
    assert_eq!(run1.ret, TC_ACT_REDIRECT, "into the tunnel");
    let (src, sport, dst, dport) = tuple6(&run1.data);
    assert_eq!((src, dst, dport), (NODE_IP6, REMOTE_POD6, 8080));
    assert!((61000..=65535).contains(&sport), "SNAT port {sport}");
    assert_checksum6(&run1.data);
    assert_eq!(run1.data[21], 63, "hop limit decremented");
    assert_eq!(
        count(&node, MetricReason::ForwardTunnel, Direction::Ingress),
        1
    );

    // The backend's answer comes back (natively) to the node's address.
    let answer = ack6(REMOTE_POD6, 8080, NODE_IP6, sport);
    let run2 = run_from(&node, Hook::FromNetdev, &answer, LO);
    assert_eq!(tuple6(&run2.data), (NODE_IP6, NODE_PORT, CLIENT6, 40000));
    assert_checksum6(&run2.data);
    assert_left_by_fib(&node, run2.ret, Direction::Ingress);
}

#[test]
fn source_ranges_admit_only_their_clients() {
    let mut node = node6();
    let mut svc = service(
        "web",
        vec![frontend6("LoadBalancer", Some(LB_IP6), 80, "TCP")],
        vec![backend(POD_A6, NODE)],
    );
    // An IPv4 range admits no IPv6 client; the IPv6 one admits CLIENT6 only.
    svc.spec.load_balancer_source_ranges =
        vec!["198.51.100.0/24".into(), "2001:db8:ff::/48".into()];
    program(&mut node, &[svc]);
    let refused = run_from(
        &node,
        Hook::FromNetdev,
        &syn6(OTHER_CLIENT6, 40000, LB_IP6, 80),
        LO,
    );
    assert_eq!(refused.ret, TC_ACT_SHOT);
    assert_eq!(
        count(&node, MetricReason::DropLbSourceRange, Direction::Ingress),
        1
    );
    let admitted = run_from(
        &node,
        Hook::FromNetdev,
        &syn6(CLIENT6, 40000, LB_IP6, 80),
        LO,
    );
    assert_eq!(admitted.ret, TC_ACT_OK);
    assert_eq!(tuple6(&admitted.data), (CLIENT6, 40000, POD_A6, 8080));
    assert_checksum6(&admitted.data);
}

#[test]
fn a_service_without_backends_rejects_with_rst_and_icmpv6_port_unreachable() {
    let mut node = node6();
    program(
        &mut node,
        &[service(
            "web",
            vec![
                frontend6("ClusterIP", Some(CLUSTER_IP6), 80, "TCP"),
                frontend6("NodePort", None, NODE_PORT, "TCP"),
                frontend6("NodePort", None, NODE_PORT, "UDP"),
            ],
            vec![],
        )],
    );
    let request = syn6(CLIENT6, 40000, NODE_IP6, NODE_PORT);
    let run1 = run_from(&node, Hook::FromNetdev, &request, LO);
    assert_eq!(run1.ret, TC_ACT_REDIRECT, "back out of the uplink");
    assert_eq!(run1.data.len(), 14 + 40 + 20, "Ethernet + IPv6 + bare TCP");
    assert_eq!(tuple6(&run1.data), (NODE_IP6, NODE_PORT, CLIENT6, 40000));
    assert_eq!(run1.data[20], 6, "next header TCP");
    assert_eq!(run1.data[54 + 13], TCP_RST | TCP_ACK, "flags");
    let seq = u32::from_be_bytes(request[58..62].try_into().unwrap());
    let ack_seq = u32::from_be_bytes(run1.data[62..66].try_into().unwrap());
    assert_eq!(ack_seq, seq.wrapping_add(1));
    assert_eq!(&run1.data[0..6], &request[6..12], "to the sender's MAC");
    assert_checksum6(&run1.data);

    let datagram = udp6_valid(CLIENT6, 40000, NODE_IP6, NODE_PORT);
    let run2 = run_from(&node, Hook::FromNetdev, &datagram, LO);
    assert_eq!(run2.ret, TC_ACT_REDIRECT);
    assert_eq!(run2.data.len(), 14 + 40 + 8 + 40 + 8);
    assert_eq!(run2.data[20], IPPROTO_ICMPV6);
    assert_eq!(&run2.data[54..56], &[1, 4], "destination unreachable, port");
    assert_eq!(
        &run2.data[62..110],
        &datagram[14..62],
        "quotes the datagram's header and first 8 bytes"
    );
    assert_eq!(
        (&run2.data[22..38], &run2.data[38..54]),
        (&datagram[38..54], &datagram[22..38]),
        "from the frontend to the client"
    );
    assert_checksum6(&run2.data);
    assert_eq!(
        count(&node, MetricReason::LbRejected, Direction::Ingress),
        2
    );
}

#[test]
fn a_pod_reaching_a_cluster_ip_outside_the_socket_lb_is_translated_and_answered() {
    let mut node = node6();
    let empty_ip = "fd00:96::b".parse().unwrap();
    program(
        &mut node,
        &[
            service(
                "web",
                vec![frontend6("ClusterIP", Some(CLUSTER_IP6), 80, "TCP")],
                vec![backend(POD_A6, NODE)],
            ),
            service(
                "empty",
                vec![frontend6("ClusterIP", Some(empty_ip), 80, "TCP")],
                vec![],
            ),
        ],
    );
    // Pod B → ClusterIP: translated to pod A, for the stack to route.
    let run1 = run_from(
        &node,
        Hook::FromContainer,
        &syn6(POD_B6, 40000, CLUSTER_IP6, 80),
        LO,
    );
    assert_eq!(run1.ret, TC_ACT_OK);
    assert_eq!(tuple6(&run1.data), (POD_B6, 40000, POD_A6, 8080));
    assert_checksum6(&run1.data);
    // Pod A answers: left as sent on its way out, reversed on its way into pod B.
    let answer = tcp6(POD_A6, 8080, POD_B6, 40000, TCP_SYN | TCP_ACK);
    let run2 = run_from(&node, Hook::FromContainer, &answer, LO);
    assert_eq!(run2.ret, TC_ACT_OK);
    assert_eq!(tuple6(&run2.data), (POD_A6, 8080, POD_B6, 40000));
    let run3 = run_from(&node, Hook::ToContainer, &run2.data, LO);
    assert_eq!(run3.ret, TC_ACT_OK);
    assert_eq!(tuple6(&run3.data), (CLUSTER_IP6, 80, POD_B6, 40000));
    assert_checksum6(&run3.data);
    // A service without backends: RST back into the pod.
    let run4 = run_from(
        &node,
        Hook::FromContainer,
        &syn6(POD_B6, 40001, empty_ip, 80),
        LO,
    );
    assert_eq!(run4.ret, TC_ACT_REDIRECT);
    assert_eq!(run4.data[54 + 13], TCP_RST | TCP_ACK);
    assert_eq!(tuple6(&run4.data), (empty_ip, 80, POD_B6, 40001));
    assert_checksum6(&run4.data);
}

#[test]
fn a_pod_reaching_itself_through_its_service_sees_the_frontend_as_its_peer() {
    let mut node = node6();
    program(
        &mut node,
        &[service(
            "web",
            vec![frontend6("ClusterIP", Some(CLUSTER_IP6), 80, "TCP")],
            vec![backend(POD_A6, NODE)],
        )],
    );
    let run1 = run_from(
        &node,
        Hook::FromContainer,
        &syn6(POD_A6, 40000, CLUSTER_IP6, 80),
        LO,
    );
    assert_eq!(run1.ret, TC_ACT_OK);
    assert_eq!(tuple6(&run1.data), (CLUSTER_IP6, 40000, POD_A6, 8080));
    assert_checksum6(&run1.data);
    let answer = tcp6(POD_A6, 8080, CLUSTER_IP6, 40000, TCP_SYN | TCP_ACK);
    let run2 = run_from(&node, Hook::FromContainer, &answer, LO);
    assert_eq!(run2.ret, TC_ACT_OK, "back into the pod by the stack");
    assert_eq!(tuple6(&run2.data), (CLUSTER_IP6, 80, POD_A6, 40000));
    assert_checksum6(&run2.data);
}

/// The transport header after a hop-by-hop options header is found (lib/ipv6.h's parse)
/// and rewritten; the options are left as they are.
#[test]
fn a_datagram_with_an_extension_header_is_translated() {
    let mut node = node6();
    program(
        &mut node,
        &[service(
            "dns",
            vec![frontend6("LoadBalancer", Some(LB_IP6), 53, "UDP")],
            vec![{
                let mut b = backend(POD_A6, NODE);
                b.protocol = "UDP".into();
                b
            }],
        )],
    );
    let plain = udp6(CLIENT6, 40000, LB_IP6, 53);
    // Hop-by-hop options (next header UDP, length 0: 8 bytes, PadN) before the datagram.
    let mut l4 = vec![17, 0, 1, 4, 0, 0, 0, 0];
    l4.extend_from_slice(&plain[54..]);
    let frame = with_checksum6(ipv6_frame(CLIENT6, LB_IP6, IPPROTO_HOPOPTS, 64, &l4));
    assert_checksum6(&frame);
    let run = run_from(&node, Hook::FromNetdev, &frame, LO);
    assert_eq!(run.ret, TC_ACT_OK);
    assert_eq!(tuple6(&run.data), (CLIENT6, 40000, POD_A6, 8080));
    assert_eq!(&run.data[54..62], &frame[54..62], "options untouched");
    assert_checksum6(&run.data);
}

/// One measured case: name, hook, the packet of call `i`, expected verdict.
type Case<'a> = (&'a str, Hook, &'a dyn Fn(u16) -> Vec<u8>, u32);

/// Per-packet cost of the IPv6 path (the kernel's timing of one run, averaged over many
/// calls), printed with `--nocapture`, never asserted: a new NodePort connection (a
/// distinct client port per call: service lookup, backend selection, two NAT entries,
/// rewrite), an established one (one NAT lookup and the rewrite), a pod's ClusterIP
/// packet (with the pod hook's policy parse), and the node's own IPv6 (no service: the
/// lookups every such packet now pays).
#[test]
fn ns_per_packet_of_the_ipv6_service_path() {
    const CALLS: u16 = 20_000;
    let mut node = node6();
    program(
        &mut node,
        &[service(
            "web",
            vec![
                frontend6("ClusterIP", Some(CLUSTER_IP6), 80, "TCP"),
                frontend6("NodePort", None, NODE_PORT, "TCP"),
            ],
            vec![backend(POD_A6, NODE), backend(POD_B6, NODE)],
        )],
    );
    let measure = |hook: Hook, frame: &dyn Fn(u16) -> Vec<u8>, expected: u32| {
        let program = node.programs.classifier(hook);
        let mut total_ns = 0u128;
        for i in 0..CALLS {
            let run = run(program, &frame(i), LO, 0, 1);
            assert_eq!(run.ret, expected, "{hook:?}");
            total_ns += run.duration.as_nanos();
        }
        total_ns as f64 / f64::from(CALLS)
    };
    let cases: [Case<'_>; 4] = [
        (
            "from_netdev → host (no service)",
            Hook::FromNetdev,
            &|_| ack6(CLIENT6, 40000, NODE_IP6, 22),
            TC_ACT_OK,
        ),
        (
            "from_netdev NodePort, new connection",
            Hook::FromNetdev,
            &|i| syn6(CLIENT6, 20000 + i, NODE_IP6, NODE_PORT),
            TC_ACT_OK,
        ),
        (
            "from_netdev NodePort, established",
            Hook::FromNetdev,
            &|_| ack6(CLIENT6, 20000, NODE_IP6, NODE_PORT),
            TC_ACT_OK,
        ),
        (
            "from_container ClusterIP, established",
            Hook::FromContainer,
            &|_| ack6(POD_B6, 40000, CLUSTER_IP6, 80),
            TC_ACT_OK,
        ),
    ];
    println!("{:<40} {:>8}", "IPv6 program / path", "ns/pkt");
    for (name, hook, frame, expected) in cases {
        println!("{name:<40} {:>8.1}", measure(hook, frame, expected));
    }
}
