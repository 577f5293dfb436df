//! The source identity of overlay traffic as ingress policy sees it. A test run cannot give
//! a packet tunnel metadata, so this sends real VXLAN datagrams over loopback into a
//! collect-metadata VXLAN device (in a network namespace of its own) whose tc ingress runs
//! `from_overlay`, and reads the policy events. The VNI carries the sender's identity; the
//! sending node's own "host" (1) must be judged as "remote-node" (6). Needs root.

mod bpf_support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use bpf_support::*;
use tendril_datapath::bpf::{
    EventKind, EventVerdict, Hook, MapSizes, PolicyEntry, PolicyEvent, PolicyState, Verdict,
    maps::{Direction, EndpointInfo, MetricReason},
    policy::{POLICY_F_DEFAULT_DENY_INGRESS, PROTO_ANY},
};

const VXLAN_PORT: u16 = 8472;
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 20);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 5);
const EP_B: u16 = 2;
const ID_B: u32 = 257;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted (with its devices) on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!(
            "tbpfov-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(format!("/run/netns/{}", self.0)).unwrap();
                    // SAFETY: a valid netns fd; setns affects this thread only.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("netns thread")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A VXLAN datagram payload: header with `vni`, then the inner frame.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(inner);
    p
}

fn l3(peer: u32) -> PolicyEntry {
    PolicyEntry {
        endpoint_id: EP_B,
        direction: Direction::Ingress,
        peer,
        protocol: PROTO_ANY,
        port: 0,
        port_prefix: 0,
    }
}

/// Polls the ring buffer until `n` events arrived (generous timeout; the datagrams are
/// decapsulated asynchronously, in softirq).
fn wait_events(node: &Node, n: usize) -> Vec<PolicyEvent> {
    let mut ring = node.dataplane.open_events().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < deadline {
        match ring.next() {
            Some(item) => out.push(PolicyEvent::from_bytes(&item).unwrap()),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    out
}

#[test]
fn overlay_host_identity_is_judged_as_remote_node() {
    let mut node = Node::load("ovid", &MapSizes::default());
    let endpoints = BTreeMap::from([(
        POD_B.into(),
        EndpointInfo {
            ifindex: 4242,
            identity: ID_B,
            endpoint_id: EP_B,
            ..Default::default()
        },
    )]);
    node.dataplane.endpoints.converge(&endpoints, true).unwrap();
    // Remote nodes may reach B, the (local) host may not, nor anyone else.
    let entries = BTreeMap::from([(l3(6), Verdict::Allow), (l3(1), Verdict::Deny)]);
    let states = BTreeMap::from([(
        EP_B,
        PolicyState {
            revision: 1,
            flags: POLICY_F_DEFAULT_DENY_INGRESS,
        },
    )]);
    assert!(
        node.dataplane
            .policy
            .converge(&entries, &states, true)
            .unwrap()
            .is_converged()
    );

    let ns = Netns::new();
    let port = VXLAN_PORT.to_string();
    ip(&[
        "-n", &ns.0, "link", "add", "tvx", "type", "vxlan", "external", "dstport", &port,
    ]);
    ip(&["-n", &ns.0, "link", "set", "tvx", "up"]);
    let programs = &mut node.programs;
    ns.run(|| {
        programs
            .attach(Hook::FromOverlay, "tvx")
            .expect("attach from-overlay");
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for (vni, sport) in [(1, 1000), (300, 1001)] {
            let inner = tcp(REMOTE_POD, sport, POD_B, 80, TCP_SYN);
            socket
                .send_to(&vxlan(vni, &inner), (Ipv4Addr::LOCALHOST, VXLAN_PORT))
                .unwrap();
        }
    });

    let events = wait_events(&node, 2);
    assert_eq!(events.len(), 2, "{events:#?}");
    let from_host_node = events.iter().find(|e| e.sport == 1000).unwrap();
    assert_eq!(from_host_node.kind, EventKind::PolicyVerdict);
    assert_eq!(from_host_node.verdict, Some(EventVerdict::Allow));
    assert_eq!(
        from_host_node.src_identity, 6,
        "host of another node → remote-node"
    );
    assert_eq!(from_host_node.dst_identity, ID_B);
    let from_pod = events.iter().find(|e| e.sport == 1001).unwrap();
    assert_eq!(from_pod.kind, EventKind::Drop);
    assert_eq!(from_pod.reason, Some(MetricReason::DropPolicy));
    assert_eq!(from_pod.src_identity, 300, "other identities unchanged");
    assert_eq!(
        node.dataplane
            .metrics
            .packets(MetricReason::DropPolicyDeny, Direction::Ingress)
            .unwrap(),
        0,
        "identity 1's deny never applied"
    );
}
