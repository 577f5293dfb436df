//! Per-packet cost of each program via `BPF_PROG_TEST_RUN` with repeat,
//! printed (run with `--nocapture`), never asserted: the machine is shared
//! and noisy. Also with a small and a large ipcache, to show the LPM lookup
//! stays flat. Verdicts are asserted so the numbers measure the right path.
//!
//! Test runs reuse one skb across repeats, so paths that decrement the TTL
//! run at most 254 times per call: each figure is the mean over many calls
//! of the kernel's own per-repeat average (syscall overhead excluded).
//!
//! IPv6 rows: the fail-closed paths of bpf/lib/ipv6.h (an endpoint without policy passes,
//! one with policy is dropped and reported; the events ring fills and further events
//! count as lost, as on a node under such traffic), and the policy paths of a node that
//! judges IPv6 by policy (an established flow of a selected endpoint: one `conntrack6`
//! lookup), next to IPv4's; IPv6 into the overlay (`to_overlay`: the inner destination's
//! node from the ipcache, the tunnel key set) next to IPv4's.

mod bpf_support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use bpf_support::*;
use ipnet::IpNet;
use tendril_datapath::bpf::{
    Hook, MapSizes, PolicyState,
    maps::{EndpointInfo, IpcacheValue, NODE_F_IPV6_POLICY, NODE_F_TUNNEL, NodeConfig},
    policy::POLICY_F_SELECTED,
};

const CALLS: u32 = 200;
const POD_A6: &str = "fd00:10::a";
const POD_B6: &str = "fd00:10::b";
const POD_C6: &str = "fd00:10::c";
const REPEAT: u32 = 250;

/// `ipv6_policy`: the node judges IPv6 by policy (NODE_F_IPV6_POLICY), else fails closed.
fn node(extra_prefixes: u32, ipv6_policy: bool) -> Node {
    let mut node = Node::load("bench", &MapSizes::default());
    let ep = |ifindex, last: u8| EndpointInfo {
        ifindex,
        identity: 256 + u32::from(last),
        endpoint_id: u16::from(last),
        flags: 0,
        mac: [2, 0, 0, 0, 0, last],
        node_mac: [2, 0, 0, 0, 1, last],
    };
    // IPv6: A and B dual-stack; C (behind the test runs' loopback too) has policy, so
    // its IPv6 fails closed (bpf/lib/ipv6.h).
    let endpoints = BTreeMap::from([
        (Ipv4Addr::new(10, 0, 1, 10).into(), ep(1, 10)),
        (Ipv4Addr::new(10, 0, 1, 20).into(), ep(4242, 20)),
        (POD_A6.parse::<Ipv6Addr>().unwrap().into(), ep(1, 10)),
        (POD_B6.parse::<Ipv6Addr>().unwrap().into(), ep(4242, 20)),
        (POD_C6.parse::<Ipv6Addr>().unwrap().into(), ep(1, 30)),
    ]);
    let mut ipcache: BTreeMap<IpNet, IpcacheValue> = BTreeMap::from([
        (
            "10.0.2.0/24".parse().unwrap(),
            IpcacheValue::new(300, Some(Ipv4Addr::new(192, 168, 0, 2))),
        ),
        (
            "192.168.0.1/32".parse().unwrap(),
            IpcacheValue::local_node(1),
        ),
        // Another node's IPv6 pods, behind its IPv4 address (IPv6 inside the overlay).
        (
            "fd00:20::/112".parse().unwrap(),
            IpcacheValue::new(300, Some(Ipv4Addr::new(192, 168, 0, 2))),
        ),
    ]);
    for i in 0..extra_prefixes {
        let [_, b, c, d] = (0x0B00_0000 + i * 4).to_be_bytes();
        ipcache.insert(
            format!("11.{b}.{c}.{d}/30").parse().unwrap(),
            IpcacheValue::new(400, None),
        );
    }
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
            node_ipv4: [192, 168, 0, 1],
            flags: NODE_F_TUNNEL | if ipv6_policy { NODE_F_IPV6_POLICY } else { 0 },
            pad: 0,
        })
        .unwrap();
    node.set_policy_states(&BTreeMap::from([(
        30,
        PolicyState {
            revision: 1,
            flags: POLICY_F_SELECTED,
        },
    )]));
    node
}

/// Mean ns per packet. `to_overlay` leaves an skb that already carries a
/// tunnel key (its cheap path on a repeat), so it runs once per call.
fn measure(node: &Node, hook: Hook, frame: &[u8], expected: u32) -> f64 {
    let program = node.programs.classifier(hook);
    let (calls, repeat) = match hook {
        Hook::ToOverlay => (CALLS * REPEAT / 10, 1),
        _ => (CALLS, REPEAT),
    };
    let mut total_ns = 0u128;
    for _ in 0..calls {
        let run = run(program, frame, 1, 0, repeat);
        assert_eq!(run.ret, expected, "{hook:?}");
        total_ns += run.duration.as_nanos();
    }
    total_ns as f64 / f64::from(calls)
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn ns_per_packet_of_each_program() {
    let pod_a = Ipv4Addr::new(10, 0, 1, 10);
    let pod_b = Ipv4Addr::new(10, 0, 1, 20);
    let remote = Ipv4Addr::new(10, 0, 2, 5);
    let node_ip = Ipv4Addr::new(192, 168, 0, 1);
    let mac_a = [2, 0, 0, 0, 0, 10];
    let gw = [2, 0, 0, 0, 1, 10];
    // (name, hook, frame, verdict, on a node that judges IPv6 by policy)
    let cases = [
        (
            "from_container → local pod",
            Hook::FromContainer,
            udp_frame(mac_a, gw, pod_a, pod_b, 255, 53),
            TC_ACT_REDIRECT,
            false,
        ),
        (
            "from_container → tunnel",
            Hook::FromContainer,
            udp_frame(mac_a, gw, pod_a, remote, 255, 53),
            TC_ACT_REDIRECT,
            false,
        ),
        (
            "from_container → stack (unknown)",
            Hook::FromContainer,
            udp_frame(mac_a, gw, pod_a, Ipv4Addr::new(8, 8, 8, 8), 255, 53),
            TC_ACT_OK,
            false,
        ),
        (
            "to_container (via stack)",
            Hook::ToContainer,
            udp_frame(gw, mac_a, node_ip, pod_b, 255, 53),
            TC_ACT_OK,
            false,
        ),
        (
            "from_netdev → local pod",
            Hook::FromNetdev,
            udp_frame(gw, mac_a, remote, pod_b, 255, 53),
            TC_ACT_REDIRECT,
            false,
        ),
        (
            "from_netdev → host",
            Hook::FromNetdev,
            udp_frame(gw, mac_a, remote, node_ip, 255, 53),
            TC_ACT_OK,
            false,
        ),
        (
            "IPv6 from_container → stack",
            Hook::FromContainer,
            udp6(v6(POD_A6), 40000, v6(POD_B6), 53),
            TC_ACT_OK,
            false,
        ),
        (
            "IPv6 from_container fail closed",
            Hook::FromContainer,
            udp6(v6(POD_C6), 40000, v6(POD_B6), 53),
            TC_ACT_SHOT,
            false,
        ),
        (
            "IPv6 to_container (via stack)",
            Hook::ToContainer,
            udp6(v6(POD_A6), 40000, v6(POD_B6), 53),
            TC_ACT_OK,
            false,
        ),
        (
            "IPv6 to_container fail closed",
            Hook::ToContainer,
            udp6(v6(POD_A6), 40000, v6(POD_C6), 53),
            TC_ACT_SHOT,
            false,
        ),
        (
            "IPv6 from_container → stack (policy)",
            Hook::FromContainer,
            udp6(v6(POD_C6), 40000, v6(POD_B6), 53),
            TC_ACT_OK,
            true,
        ),
        (
            "IPv6 to_container (policy)",
            Hook::ToContainer,
            udp6(v6(POD_A6), 40000, v6(POD_C6), 53),
            TC_ACT_OK,
            true,
        ),
        (
            "to_overlay (host → remote pod)",
            Hook::ToOverlay,
            udp_frame(gw, mac_a, node_ip, remote, 255, 53),
            TC_ACT_OK,
            false,
        ),
        (
            "IPv6 to_overlay (→ remote pod)",
            Hook::ToOverlay,
            udp6(v6(POD_A6), 40000, v6("fd00:20::5"), 53),
            TC_ACT_OK,
            true,
        ),
    ];
    let small = node(0, false);
    let large = node(10_000, false);
    let small6 = node(0, true);
    let large6 = node(10_000, true);
    println!(
        "{:<36} {:>14} {:>22}",
        "program / path", "ns/pkt (3 pfx)", "ns/pkt (10,003 pfx)"
    );
    for (name, hook, frame, expected, ipv6_policy) in &cases {
        let (small, large) = if *ipv6_policy {
            (&small6, &large6)
        } else {
            (&small, &large)
        };
        let a = measure(small, *hook, frame, *expected);
        let b = measure(large, *hook, frame, *expected);
        println!("{name:<36} {a:>14.1} {b:>22.1}");
    }
    // 10,000 extra prefixes, the node's own address, the tunnelled IPv4 and IPv6 CIDRs.
    assert_eq!(large.dataplane.pressure().unwrap()[1].entries, 10_003);
}
