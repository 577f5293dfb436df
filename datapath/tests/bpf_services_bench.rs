//! Per-packet cost of the tc service path via `BPF_PROG_TEST_RUN`, printed (run with
//! `--nocapture`), never asserted (the machine is shared and noisy): a NodePort packet from
//! outside (first packet of a connection: service lookup, backend selection, two NAT
//! entries, rewrite, delivery; established: one NAT lookup, rewrite, delivery), a pod's
//! ClusterIP packet outside the socket LB, and the baselines measured in the same run (a
//! packet to a pod and to the node itself, which now pays the service lookups), with 1 and
//! with 10,000 services programmed. Verdicts and rewrites are asserted so the numbers
//! measure the right path.
//!
//! A translated packet is rewritten in place and a test run reuses its skb across repeats,
//! so every figure is one run per call, averaged over many calls (the kernel's own timing
//! of the program, syscall excluded).

mod bpf_support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_support::*;
use tendril_crds::v1alpha1::{Backend, Frontend, LBService, LBServiceSpec};
use tendril_datapath::bpf::{
    Hook, MapSizes,
    maps::{EndpointInfo, IpcacheValue, NODE_F_TUNNEL, NodeConfig},
};
use tendril_datapath::config::LbAlgorithm;
use tendril_datapath::services::desired::{NodeServices, lb_state};

const CALLS: u32 = 20_000;
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

fn service(i: u32) -> LBService {
    let [_, _, c, d] = i.to_be_bytes();
    let mut svc = LBService::new(
        &format!("svc-{i}"),
        LBServiceSpec {
            revision: 1,
            committed_revision: None,
            frontends: vec![
                Frontend {
                    name: "web".into(),
                    type_: "ClusterIP".into(),
                    address: Some(format!("10.96.{c}.{d}")),
                    port: 80,
                    protocol: "TCP".into(),
                },
                Frontend {
                    name: "web".into(),
                    type_: "NodePort".into(),
                    address: None,
                    port: 30000 + i32::try_from(i % 2000).unwrap(),
                    protocol: "TCP".into(),
                },
            ],
            backends: [POD_A, POD_B]
                .iter()
                .map(|ip| Backend {
                    port_name: "web".into(),
                    address: ip.to_string(),
                    port: 8080,
                    protocol: "TCP".into(),
                    weight: 1,
                    node_name: Some("n1".into()),
                    zone: None,
                    state: "active".into(),
                })
                .collect(),
            external_traffic_policy: "Cluster".into(),
            internal_traffic_policy: "Cluster".into(),
            ..LBServiceSpec::default()
        },
    );
    svc.metadata.namespace = Some("default".into());
    svc
}

/// A node with both pods behind loopback and `services` services, each a ClusterIP and a
/// NodePort over both pods (NodePorts repeat every 2000 services: the later claims are
/// skipped as conflicts, as the agent does).
fn node(services: u32) -> Node {
    let mut node = Node::load("svcbench", &MapSizes::default());
    let ep = |last: u8| EndpointInfo {
        ifindex: 1,
        identity: 256 + u32::from(last),
        endpoint_id: u16::from(last),
        flags: 0,
        mac: [2, 0, 0, 0, 0, last],
        node_mac: [2, 0, 0, 0, 1, last],
    };
    let endpoints = BTreeMap::from([(POD_A.into(), ep(10)), (POD_B.into(), ep(20))]);
    let ipcache = BTreeMap::from([(
        format!("{NODE_IP}/32").parse().unwrap(),
        IpcacheValue::local_node(1),
    )]);
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
            tunnel_ifindex: 77,
            node_ipv4: NODE_IP.octets(),
            flags: NODE_F_TUNNEL,
            pad: 0,
        })
        .unwrap();
    let services: Vec<LBService> = (0..services).map(service).collect();
    let (hb, hf) = (BTreeMap::new(), BTreeMap::new());
    let desired = lb_state(
        &services,
        &NodeServices {
            node_name: "n1",
            node_addresses: &[NODE_IP.into()],
            default_algorithm: LbAlgorithm::Random,
            maglev_table_size: 16381,
            hash_seed: 1,
            maglev: None,
            held_backends: &hb,
            held_frontends: &hf,
        },
    );
    let report = node.dataplane.lb.converge(&desired.state, true).unwrap();
    assert!(report.is_converged(), "{report:?}");
    node
}

/// Mean ns per packet over `CALLS` single runs; `check` sees each output frame.
fn measure(node: &Node, hook: Hook, frame: &[u8], expected: u32, check: impl Fn(&[u8])) -> f64 {
    let program = node.programs.classifier(hook);
    let mut total_ns = 0u128;
    for _ in 0..CALLS {
        let run = run(program, frame, 1, 0, 1);
        assert_eq!(run.ret, expected, "{hook:?}");
        check(&run.data);
        total_ns += run.duration.as_nanos();
    }
    total_ns as f64 / f64::from(CALLS)
}

fn dst(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
}

/// One measured case: name, hook, packet, expected verdict, check of the packet after.
type Case<'a> = (&'a str, Hook, Vec<u8>, u32, &'a dyn Fn(&[u8]));

#[test]
fn ns_per_packet_of_the_service_path() {
    let to_backend = |f: &[u8]| assert!([POD_A, POD_B].contains(&dst(f)), "{}", dst(f));
    let untouched = |_: &[u8]| {};
    let cases: Vec<Case<'_>> = vec![
        (
            "from_netdev → pod (no service)",
            Hook::FromNetdev,
            tcp(CLIENT, 40000, POD_A, 8080, TCP_ACK),
            TC_ACT_REDIRECT,
            &untouched,
        ),
        (
            "from_netdev → host (no service)",
            Hook::FromNetdev,
            tcp(CLIENT, 40000, NODE_IP, 22, TCP_ACK),
            TC_ACT_OK,
            &untouched,
        ),
        (
            "from_netdev NodePort, first packet",
            Hook::FromNetdev,
            tcp(CLIENT, 40000, NODE_IP, 30000, TCP_SYN),
            TC_ACT_REDIRECT,
            &to_backend,
        ),
        (
            "from_netdev NodePort, established",
            Hook::FromNetdev,
            tcp(CLIENT, 40000, NODE_IP, 30000, TCP_ACK),
            TC_ACT_REDIRECT,
            &to_backend,
        ),
        (
            "from_container ClusterIP, first",
            Hook::FromContainer,
            tcp(POD_A, 40001, Ipv4Addr::new(10, 96, 0, 0), 80, TCP_SYN),
            TC_ACT_REDIRECT,
            &to_backend,
        ),
        (
            "from_container ClusterIP, established",
            Hook::FromContainer,
            tcp(POD_A, 40001, Ipv4Addr::new(10, 96, 0, 0), 80, TCP_ACK),
            TC_ACT_REDIRECT,
            &to_backend,
        ),
        (
            "from_container → pod (no service)",
            Hook::FromContainer,
            tcp(POD_A, 40002, POD_B, 8080, TCP_ACK),
            TC_ACT_REDIRECT,
            &untouched,
        ),
    ];
    let one = node(1);
    let many = node(10_000);
    println!(
        "{:<40} {:>16} {:>22}",
        "program / path", "ns/pkt (1 svc)", "ns/pkt (10,000 svc)"
    );
    for (name, hook, frame, expected, check) in &cases {
        let a = measure(&one, *hook, frame, *expected, check);
        let b = measure(&many, *hook, frame, *expected, check);
        println!("{name:<40} {a:>16.1} {b:>22.1}");
    }
}
