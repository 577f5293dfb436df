//! Per-packet cost of policy enforcement via `BPF_PROG_TEST_RUN`, printed (run with
//! `--nocapture`), never asserted: the machine is shared and noisy. Verdicts are asserted
//! so the figures measure the intended path. Every figure is also given as a ratio to a
//! no-op tc program (`return TC_ACT_OK`) measured the same way in the same run: the cost
//! of the test-run machinery itself.
//!
//! Connections: "SYN" is a real new connection (a fresh source port per packet, TCP SYN:
//! conntrack miss, policy lookups, a conntrack insert) with the default allow-event
//! setting (aggregated per flow: after the first, no ring-buffer write) and with
//! `allowEvents: all` (a verdict event per connection, the behaviour before aggregation);
//! "established" is a conntrack hit (one conntrack lookup, no policy lookup).
//!
//! For each path: no policy at all (conntrack only, the baseline), and a policy map holding
//! 10 or 10,000 entries (spread over peers and ports of both endpoints involved), each for
//! a new connection (a fresh source port per packet: conntrack miss, three policy lookups,
//! a conntrack insert and a verdict event) and an established one (conntrack hit).
//!
//! Each figure is the mean over many single-packet runs of the kernel's own measurement
//! (syscall overhead excluded; the timer itself adds a few tens of ns to every figure
//! alike). The event ring is read outside the measurement: after every packet ("new
//! conn": the reader is always caught up, so every verdict event wakes it — the worst
//! case) or after every 1,000 ("new, batch": a reader behind a burst, no wakeups).

mod bpf_support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use bpf_support::*;
use tendril_datapath::bpf::{
    Hook, MapSizes, PolicyEntry, PolicyState, Verdict,
    maps::{Direction, EndpointInfo, IpcacheValue, NODE_F_TUNNEL, NodeConfig},
    policy::{POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS, PROTO_TCP},
};

const CALLS: u16 = 3000;
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const NATIVE: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 5);
const ID_A: u32 = 256;
const ID_B: u32 = 257;
const ID_NATIVE: u32 = 301;

/// A node with pods A (behind loopback, endpoint 1) and B (endpoint 2) and `rules` policy
/// entries (`None`: no policy at all).
fn node(rules: Option<u32>) -> Node {
    let mut node = Node::load("pbench", &MapSizes::default());
    let ep = |ifindex, identity, endpoint_id, last: u8| EndpointInfo {
        ifindex,
        identity,
        endpoint_id,
        flags: 0,
        mac: [2, 0, 0, 0, 0, last],
        node_mac: [2, 0, 0, 0, 1, last],
    };
    let endpoints = BTreeMap::from([
        (POD_A.into(), ep(1, ID_A, 1, 10)),
        (POD_B.into(), ep(4242, ID_B, 2, 20)),
    ]);
    let ipcache = BTreeMap::from([(
        "10.0.3.0/24".parse().unwrap(),
        IpcacheValue::new(ID_NATIVE, None),
    )]);
    node.dataplane.endpoints.converge(&endpoints, true).unwrap();
    node.dataplane.ipcache.converge(&ipcache, true).unwrap();
    node.dataplane
        .node_config
        .set(&NodeConfig {
            tunnel_ifindex: 77,
            node_ipv4: [192, 168, 0, 1],
            flags: NODE_F_TUNNEL,
            pad: 0,
        })
        .unwrap();
    let Some(rules) = rules else {
        return node;
    };
    let entry = |endpoint_id, direction, peer, port| PolicyEntry {
        endpoint_id,
        direction,
        peer,
        protocol: PROTO_TCP,
        port,
        port_prefix: 16,
    };
    // The entries the measured packets match ...
    let mut entries = BTreeMap::from([
        (entry(1, Direction::Egress, ID_B, 80), Verdict::Allow),
        (entry(2, Direction::Ingress, ID_A, 80), Verdict::Allow),
        (entry(2, Direction::Ingress, ID_NATIVE, 80), Verdict::Allow),
    ]);
    // ... and the rest, over other peers and ports of both endpoints.
    let mut i = 0u32;
    while entries.len() < rules as usize {
        let (endpoint_id, direction) = match i % 2 {
            0 => (1, Direction::Egress),
            _ => (2, Direction::Ingress),
        };
        let peer = 1000 + i / 20;
        let port = 1000 + (i % 10) as u16;
        entries.insert(entry(endpoint_id, direction, peer, port), Verdict::Allow);
        i += 1;
    }
    let both = POLICY_F_DEFAULT_DENY_INGRESS | POLICY_F_DEFAULT_DENY_EGRESS;
    let states = BTreeMap::from([
        (
            1,
            PolicyState {
                revision: 1,
                flags: both,
            },
        ),
        (
            2,
            PolicyState {
                revision: 1,
                flags: both,
            },
        ),
    ]);
    let report = node
        .dataplane
        .policy
        .converge(&entries, &states, true)
        .unwrap();
    assert!(report.is_converged());
    assert_eq!(
        node.dataplane.policy.entries().unwrap().len(),
        rules as usize
    );
    node
}

/// Mean ns per packet over `CALLS` single runs; `new` gives every packet its own source
/// port from that base (a new connection each time).
fn measure(
    node: &Node,
    hook: Hook,
    frame: impl Fn(u16) -> Vec<u8>,
    mark: u32,
    new: Option<u16>,
    drain_every: u16,
    opening: Option<FrameFn>,
) -> f64 {
    let program = node.programs.classifier(hook);
    let expected = match hook {
        Hook::ToContainer => TC_ACT_OK,
        _ => TC_ACT_REDIRECT,
    };
    measure_program(
        node,
        program,
        expected,
        frame,
        mark,
        new,
        drain_every,
        opening,
    )
}

/// [`measure`] for any classifier returning `expected`.
#[expect(
    clippy::too_many_arguments,
    reason = "a measurement's knobs, all of them used"
)]
fn measure_program(
    node: &Node,
    program: &aya::programs::SchedClassifier,
    expected: u32,
    frame: impl Fn(u16) -> Vec<u8>,
    mark: u32,
    new: Option<u16>,
    drain_every: u16,
    opening: Option<FrameFn>,
) -> f64 {
    let mut ring = node.dataplane.open_events().unwrap();
    if let Some(open) = opening {
        assert_eq!(run(program, &open(1), 1, mark, 1).ret, expected);
    }
    // Warm up (and establish the connection of the `established` case).
    for _ in 0..100 {
        assert_eq!(
            run(program, &frame(1), 1, mark, 1).ret,
            expected,
            "{expected}"
        );
    }
    // Not timed: the warm-up's first packet is the flow's first (reported) one.
    while ring.next().is_some() {}
    let mut total_ns = 0u128;
    for call in 0..CALLS {
        let sport = new.map_or(1, |base| base + call);
        let r = run(program, &frame(sport), 1, mark, 1);
        assert_eq!(r.ret, expected, "{expected}");
        total_ns += r.duration.as_nanos();
        if call % drain_every == drain_every - 1 {
            while ring.next().is_some() {}
        }
    }
    while ring.next().is_some() {}
    total_ns as f64 / f64::from(CALLS)
}

/// A tc program that does nothing (`return TC_ACT_OK`), compiled and loaded here: the
/// baseline of every ratio.
fn noop_program() -> aya::Ebpf {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("noop.c");
    let obj = dir.path().join("noop.o");
    std::fs::write(
        &src,
        "#include <linux/bpf.h>\n#include <linux/pkt_cls.h>\n\
         __attribute__((section(\"classifier\"), used)) int noop(struct __sk_buff *skb) \
         { return TC_ACT_OK; }\n\
         char LICENSE[] __attribute__((section(\"license\"), used)) = \"GPL\";\n",
    )
    .unwrap();
    let out = std::process::Command::new(std::env::var("CLANG").unwrap_or_else(|_| "clang".into()))
        .args(["-O2", "-target", "bpf", "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("clang (installed by hack/install-prereqs.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bpf = aya::Ebpf::load_file(&obj).expect("load the no-op program");
    let program: &mut aya::programs::SchedClassifier =
        bpf.program_mut("noop").unwrap().try_into().unwrap();
    program.load().unwrap();
    bpf
}

/// A frame of the measured flow, by source port.
type FrameFn = fn(u16) -> Vec<u8>;

#[test]
fn ns_per_packet_with_and_without_policy() {
    let nodes = [
        ("no policy", node(None)),
        ("10", node(Some(10))),
        ("10,000", node(Some(10_000))),
    ];
    let noop_bpf = noop_program();
    let noop: &aya::programs::SchedClassifier =
        noop_bpf.program("noop").unwrap().try_into().unwrap();
    let paths: [(&str, Hook, FrameFn, FrameFn, u32); 3] = [
        (
            "from_container → local pod",
            Hook::FromContainer,
            |sport| tcp(POD_A, sport, POD_B, 80, TCP_ACK),
            |sport| tcp(POD_A, sport, POD_B, 80, TCP_SYN),
            0,
        ),
        (
            "to_container (via stack)",
            Hook::ToContainer,
            |sport| tcp(NATIVE, sport, POD_B, 80, TCP_ACK),
            |sport| tcp(NATIVE, sport, POD_B, 80, TCP_SYN),
            0x0F00 | (ID_NATIVE << 16),
        ),
        (
            "from_netdev → deliver",
            Hook::FromNetdev,
            |sport| tcp(NATIVE, sport, POD_B, 80, TCP_ACK),
            |sport| tcp(NATIVE, sport, POD_B, 80, TCP_SYN),
            0,
        ),
    ];
    let base = measure_program(
        &nodes[0].1,
        noop,
        TC_ACT_OK,
        |sport| tcp(POD_A, sport, POD_B, 80, TCP_ACK),
        0,
        None,
        1,
        None,
    );
    println!("no-op tc program: {base:.1} ns/pkt (the ×1 of every ratio below)");
    println!(
        "{:<28} {:>9} {:>15} {:>15} {:>15} {:>15} {:>10}",
        "path (ns/pkt, ×no-op)",
        "rules",
        "SYN, aggregate",
        "SYN, all events",
        "ACK, no CT",
        "established",
        "CT entries"
    );
    let cell = |ns: f64| format!("{ns:.1} ×{:.1}", ns / base);
    for (i, (name, hook, frame, syn, mark)) in paths.into_iter().enumerate() {
        // Source ports of new connections never repeat across paths sharing a tuple.
        let port = 2 + 20_000 * i as u16;
        for (rules, node) in &nodes {
            let (mode, interval) = (
                tendril_datapath::bpf::maps::POLICY_EVENTS_AGGREGATE,
                5_000_000_000,
            );
            let mut dp = tendril_datapath::bpf::Dataplane::open(&node.dir.0).unwrap();
            dp.policy.set_event_settings(mode, interval).unwrap();
            let aggregated = measure(node, hook, syn, mark, Some(port), 1, None);
            dp.policy
                .set_event_settings(tendril_datapath::bpf::maps::POLICY_EVENTS_ALL, 0)
                .unwrap();
            let all = measure(node, hook, syn, mark, Some(port + CALLS + 100), 1, None);
            dp.policy.set_event_settings(mode, interval).unwrap();
            let ack = measure(
                node,
                hook,
                frame,
                mark,
                Some(port + 2 * (CALLS + 100)),
                1,
                None,
            );
            // Opened with a SYN on source port 1, then its ACKs.
            let established = measure(node, hook, frame, mark, None, 1, Some(syn));
            let ct = node.dataplane.conntrack.entries().unwrap().len();
            println!(
                "{name:<28} {rules:>9} {:>15} {:>15} {:>15} {:>15} {ct:>10}",
                cell(aggregated),
                cell(all),
                cell(ack),
                cell(established)
            );
        }
    }
}
