//! The source identity of overlay traffic as ingress policy sees it. A test run cannot give
//! a packet tunnel metadata, so this sends real VXLAN datagrams over loopback into a
//! collect-metadata VXLAN device (in a network namespace of its own) whose tc ingress runs
//! `from_overlay`, and reads the policy events. The VNI carries the sender's identity; the
//! sending node's own "host" (1) must be judged as "remote-node" (6).
//!
//! IPv6 inside the IPv4 underlay: `from_overlay` hands it to the stack with the VNI's
//! identity in the mark, the stack forwards it into a pod's veth, whose `to_container`
//! (lib/ipv6.h) judges it by that identity, not by the ipcache's for the source. Needs
//! root.

mod bpf_support;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV6, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use bpf_support::*;
use tendril_datapath::bpf::{
    EventKind, EventVerdict, Hook, MapSizes, PolicyEntry, PolicyEvent, Verdict,
    maps::{Direction, EndpointInfo, IpcacheValue, MetricReason, NODE_F_IPV6_POLICY},
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
    node.set_policy(&entries, EP_B, POLICY_F_DEFAULT_DENY_INGRESS);

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

const POD_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0xb);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 5);
/// What the ipcache says of REMOTE_POD6: never what the VNI says.
const ID_IPCACHE: u32 = 999;
const ID_ALLOWED: u32 = 301;
const ID_DENIED: u32 = 300;
const UDP_PORT: u16 = 5000;

/// Ethernet + IPv6 + UDP with a valid checksum (IPv6 receivers require one), to a MAC
/// that is not the receiving device's (as the sender's VXLAN device addresses it).
fn udp6_frame(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&UDP_PORT.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // Pseudo-header (addresses, length, next header) + datagram, ones' complement.
    let mut sum: u32 = 0;
    let mut words = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    words(&src.octets());
    words(&dst.octets());
    words(&u32::from(len).to_be_bytes());
    words(&[0, 0, 0, 17]);
    words(&udp);
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xFFFF,
        c => c,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    let mut f = vec![2, 0, 0, 0, 9, 9, 2, 0, 0, 0, 9, 8, 0x86, 0xDD];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&udp);
    f
}

#[test]
fn overlay_ipv6_is_judged_by_the_vni_identity_at_the_pods_veth() {
    let mut node = Node::load("ovid6", &MapSizes::default());
    let node_ns = Netns::new();
    let pod_ns = Netns::new();
    let port = VXLAN_PORT.to_string();
    ip(&[
        "-n", &node_ns.0, "link", "add", "tvx", "type", "vxlan", "external", "dstport", &port,
    ]);
    ip(&["-n", &node_ns.0, "link", "set", "tvx", "up"]);
    // Pod B: a veth into its own namespace, its /128 routed there, as the CNI plugin does.
    ip(&[
        "-n", &node_ns.0, "link", "add", "tvh", "type", "veth", "peer", "name", "tvp", "netns",
        &pod_ns.0,
    ]);
    ip(&[
        "-n",
        &pod_ns.0,
        "link",
        "set",
        "tvp",
        "address",
        "02:00:00:00:00:0b",
        "up",
    ]);
    let b = POD_B6.to_string();
    ip(&[
        "-n",
        &pod_ns.0,
        "addr",
        "add",
        &format!("{b}/128"),
        "dev",
        "tvp",
        "nodad",
    ]);
    ip(&["-n", &node_ns.0, "link", "set", "tvh", "up"]);
    ip(&[
        "-n",
        &node_ns.0,
        "route",
        "add",
        &format!("{b}/128"),
        "dev",
        "tvh",
    ]);
    ip(&[
        "-n",
        &node_ns.0,
        "neigh",
        "add",
        &b,
        "lladdr",
        "02:00:00:00:00:0b",
        "dev",
        "tvh",
        "nud",
        "permanent",
    ]);
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &node_ns.0, "sysctl", "-qw"])
        .arg("net.ipv6.conf.all.forwarding=1")
        .status()
        .unwrap();
    assert!(sysctl.success());
    // `ip -o link show`: "7: tvh@if2: ...".
    let link = Command::new("ip")
        .args(["-n", &node_ns.0, "-o", "link", "show", "dev", "tvh"])
        .output()
        .unwrap();
    let tvh: u32 = String::from_utf8_lossy(&link.stdout)
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("tvh's ifindex");

    node.set_node_flags(NODE_F_IPV6_POLICY);
    node.set_endpoints(&BTreeMap::from([(
        POD_B6.into(),
        EndpointInfo {
            ifindex: tvh,
            identity: ID_B,
            endpoint_id: EP_B,
            ..Default::default()
        },
    )]));
    node.set_ipcache(&BTreeMap::from([(
        "fd00:30::/64".parse().unwrap(),
        IpcacheValue::new(ID_IPCACHE, Some(Ipv4Addr::LOCALHOST)),
    )]));
    // Only ID_ALLOWED may reach B; the ipcache's identity for the source would be denied.
    let entries = BTreeMap::from([(l3(ID_ALLOWED), Verdict::Allow)]);
    node.set_policy(&entries, EP_B, POLICY_F_DEFAULT_DENY_INGRESS);

    let programs = &mut node.programs;
    node_ns.run(|| {
        programs
            .attach(Hook::FromOverlay, "tvx")
            .expect("attach from-overlay");
        programs
            .attach(Hook::ToContainer, "tvh")
            .expect("attach to-container");
    });
    let receiver = pod_ns.run(|| {
        let socket = UdpSocket::bind(SocketAddrV6::new(POD_B6, UDP_PORT, 0, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
    });
    node_ns.run(|| {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        for (vni, sport, payload) in [
            (ID_DENIED, 2000, &b"denied"[..]),
            (1, 2001, b"from-host"),
            (ID_ALLOWED, 2002, b"allowed"),
        ] {
            let inner = udp6_frame(REMOTE_POD6, sport, POD_B6, payload);
            socket
                .send_to(&vxlan(vni, &inner), (Ipv4Addr::LOCALHOST, VXLAN_PORT))
                .unwrap();
        }
    });

    // Only the allowed identity's datagram reaches the pod.
    let mut buf = [0u8; 64];
    let (n, from) = receiver.recv_from(&mut buf).expect("the allowed datagram");
    assert_eq!(&buf[..n], b"allowed");
    assert_eq!(from.ip(), std::net::IpAddr::V6(REMOTE_POD6));

    let events = wait_events(&node, 2);
    let by_port = |sport| {
        events
            .iter()
            .find(|e| e.sport == sport)
            .unwrap_or_else(|| panic!("no event of source port {sport}: {events:#?}"))
    };
    let denied = by_port(2000);
    assert_eq!(denied.kind, EventKind::Drop);
    assert_eq!(
        denied.src_identity, ID_DENIED,
        "the VNI's identity, not the ipcache's {ID_IPCACHE}"
    );
    assert_eq!(denied.dst_identity, ID_B);
    let from_host = by_port(2001);
    assert_eq!(from_host.kind, EventKind::Drop);
    assert_eq!(
        from_host.src_identity, 6,
        "host of another node → remote-node"
    );
    assert!(
        node.dataplane
            .metrics
            .packets(MetricReason::ToStackNonIpv4, Direction::Ingress)
            .unwrap()
            >= 3,
        "from_overlay handed the IPv6 packets to the stack"
    );
}
