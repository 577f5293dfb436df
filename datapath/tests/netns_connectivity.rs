//! End to end with real packets: two simulated nodes (network namespaces on
//! an underlay bridge), two pods each (veth pairs configured by hand, as the
//! CNI plugin would), the programs attached as pinned TCX links and the maps
//! filled through the convergence API. ICMP, TCP and UDP between every pair
//! of pods, same node and across nodes, in overlay and in native-routing
//! mode; the source identity is checked in the VNI on the wire; the programs
//! keep forwarding after the loader is gone, and re-attaching under a
//! running ping loses nothing. Needs root.

mod bpf_support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use bpf_support::PinDir;
use ipnet::IpNet;
use tendril_datapath::bpf::{
    Dataplane, Hook, MapSizes, Programs, loader,
    maps::{Direction, EndpointInfo, IpcacheValue, MetricReason, NODE_F_TUNNEL, NodeConfig},
};

const UNDERLAY_PREFIX: [u8; 3] = [192, 168, 77];
const VXLAN_PORT: u16 = 8472;
const IDENTITY_HOST: u32 = 1;
const IDENTITY_REMOTE_NODE: u32 = 6;

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Overlay,
    Native,
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn exec(ns: &str, cmd: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec")
}

/// A network namespace, deleted (with every device in it) on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
                // SAFETY: a valid netns fd; setns only affects this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
    })
}

/// (ifindex, MAC) of a device.
fn link_info(ns: &str, dev: &str) -> (u32, [u8; 6]) {
    let json: serde_json::Value =
        serde_json::from_str(&ip(&["-n", ns, "-j", "link", "show", "dev", dev])).unwrap();
    let ifindex = json[0]["ifindex"].as_u64().unwrap() as u32;
    let mut mac = [0u8; 6];
    for (byte, hex) in mac
        .iter_mut()
        .zip(json[0]["address"].as_str().unwrap().split(':'))
    {
        *byte = u8::from_str_radix(hex, 16).unwrap();
    }
    (ifindex, mac)
}

struct Pod {
    ns: String,
    ip: Ipv4Addr,
    identity: u32,
    node: usize,
    host_if: String,
}

struct Cluster {
    mode: Mode,
    pods: Vec<Pod>,
    node_ns: Vec<String>,
    underlay_ns: String,
    // Dropped last-to-first: pins, then pod, node and underlay namespaces.
    pins: Vec<PinDir>,
    _netns: Vec<Netns>,
}

fn node_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        UNDERLAY_PREFIX[0],
        UNDERLAY_PREFIX[1],
        UNDERLAY_PREFIX[2],
        node as u8 + 1,
    )
}

fn pod_cidr(node: usize) -> IpNet {
    format!("10.{}.0.0/24", 101 + node).parse().unwrap()
}

impl Cluster {
    fn build(mode: Mode, nodes: usize, pods_per_node: usize) -> Self {
        let tag = format!(
            "{}{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut netns = Vec::new();
        let underlay = Netns::new(format!("tdu-{tag}"));
        let underlay_ns = underlay.0.clone();
        ip(&["-n", &underlay_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &underlay_ns, "link", "set", "br0", "up"]);
        netns.push(underlay);

        let mut node_ns = Vec::new();
        let mut pods = Vec::new();
        for n in 0..nodes {
            let node = Netns::new(format!("tdn{n}-{tag}"));
            let ns = node.0.clone();
            netns.push(node);
            let port = format!("u{n}");
            ip(&[
                "-n",
                &underlay_ns,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "uplink",
                "netns",
                &ns,
            ]);
            ip(&[
                "-n",
                &underlay_ns,
                "link",
                "set",
                &port,
                "master",
                "br0",
                "up",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", node_ip(n)),
                "dev",
                "uplink",
            ]);
            ip(&["-n", &ns, "link", "set", "uplink", "up"]);
            let sysctl = exec(
                &ns,
                &[
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            );
            assert!(
                sysctl.status.success(),
                "{}",
                String::from_utf8_lossy(&sysctl.stderr)
            );
            match mode {
                Mode::Overlay => {
                    let port = VXLAN_PORT.to_string();
                    ip(&[
                        "-n", &ns, "link", "add", "tvx", "type", "vxlan", "external", "dstport",
                        &port,
                    ]);
                    // As the agent should: no IPv6 autoconfiguration chatter into the overlay.
                    let sysctl = exec(&ns, &["sysctl", "-qw", "net.ipv6.conf.tvx.disable_ipv6=1"]);
                    assert!(
                        sysctl.status.success(),
                        "{}",
                        String::from_utf8_lossy(&sysctl.stderr)
                    );
                    // The node's own traffic is routed into the device; with no
                    // ARP it needs no neighbour, the tunnel key does the rest.
                    ip(&["-n", &ns, "link", "set", "tvx", "arp", "off", "up"]);
                }
                Mode::Native => {
                    for other in (0..nodes).filter(|o| *o != n) {
                        let via = node_ip(other).to_string();
                        ip(&[
                            "-n",
                            &ns,
                            "route",
                            "add",
                            &pod_cidr(other).to_string(),
                            "via",
                            &via,
                        ]);
                    }
                }
            }
            for p in 0..pods_per_node {
                let pod = Netns::new(format!("tdp{n}{p}-{tag}"));
                let pod_ns = pod.0.clone();
                netns.push(pod);
                let host_if = format!("lxc{p}");
                let pod_ip = Ipv4Addr::new(10, 101 + n as u8, 0, 10 + p as u8);
                ip(&[
                    "-n", &ns, "link", "add", &host_if, "mtu", "1450", "type", "veth", "peer",
                    "name", "eth0", "mtu", "1450", "netns", &pod_ns,
                ]);
                ip(&["-n", &ns, "link", "set", &host_if, "up"]);
                ip(&[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("{pod_ip}/32"),
                    "dev",
                    &host_if,
                ]);
                let (_, host_mac) = link_info(&ns, &host_if);
                let host_mac = host_mac
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":");
                ip(&[
                    "-n",
                    &pod_ns,
                    "addr",
                    "add",
                    &format!("{pod_ip}/32"),
                    "dev",
                    "eth0",
                ]);
                ip(&["-n", &pod_ns, "link", "set", "eth0", "up"]);
                ip(&[
                    "-n",
                    &pod_ns,
                    "route",
                    "add",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ]);
                ip(&[
                    "-n",
                    &pod_ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                ]);
                ip(&[
                    "-n",
                    &pod_ns,
                    "neigh",
                    "add",
                    "169.254.1.1",
                    "lladdr",
                    &host_mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ]);
                pods.push(Pod {
                    ns: pod_ns,
                    ip: pod_ip,
                    identity: 1000 + 10 * n as u32 + p as u32,
                    node: n,
                    host_if,
                });
            }
            node_ns.push(ns);
        }
        let mut cluster = Self {
            mode,
            pods,
            node_ns,
            underlay_ns,
            pins: Vec::new(),
            _netns: netns,
        };
        for n in 0..nodes {
            let pins = PinDir::new(&format!("e2e{n}"));
            cluster.load_and_attach(n, &pins);
            cluster.converge(n, &pins);
            cluster.pins.push(pins);
        }
        cluster
    }

    /// What an agent does at start: load, attach every hook, then exit
    /// (here: drop `Programs`); the pinned links keep the programs attached.
    fn load_and_attach(&self, n: usize, pins: &PinDir) {
        let mode = self.mode;
        let lxcs: Vec<String> = self
            .pods
            .iter()
            .filter(|p| p.node == n)
            .map(|p| p.host_if.clone())
            .collect();
        in_netns(&self.node_ns[n], || {
            let mut programs = Programs::load(&pins.0, &MapSizes::default()).expect("load");
            for lxc in &lxcs {
                programs
                    .attach(Hook::FromContainer, lxc)
                    .expect("attach from-container");
                programs
                    .attach(Hook::ToContainer, lxc)
                    .expect("attach to-container");
            }
            programs
                .attach(Hook::FromNetdev, "uplink")
                .expect("attach from-netdev");
            if mode == Mode::Overlay {
                programs
                    .attach(Hook::FromOverlay, "tvx")
                    .expect("attach from-overlay");
                programs
                    .attach(Hook::ToOverlay, "tvx")
                    .expect("attach to-overlay");
            }
        });
    }

    fn converge(&self, n: usize, pins: &PinDir) {
        let ns = &self.node_ns[n];
        let mut dp = Dataplane::open(&pins.0).unwrap();
        let mut endpoints = BTreeMap::new();
        let mut ipcache = BTreeMap::new();
        for (i, pod) in self.pods.iter().enumerate() {
            let net: IpNet = IpAddr::V4(pod.ip).into();
            if pod.node == n {
                let (ifindex, node_mac) = link_info(ns, &pod.host_if);
                let (_, mac) = link_info(&pod.ns, "eth0");
                let info = EndpointInfo {
                    ifindex,
                    identity: pod.identity,
                    endpoint_id: i as u16,
                    flags: 0,
                    mac,
                    node_mac,
                };
                endpoints.insert(IpAddr::V4(pod.ip), info);
                ipcache.insert(net, IpcacheValue::new(pod.identity, None));
            } else {
                let tunnel = (self.mode == Mode::Overlay).then(|| node_ip(pod.node));
                ipcache.insert(net, IpcacheValue::new(pod.identity, tunnel));
            }
        }
        for other in 0..self.node_ns.len() {
            let net: IpNet = IpAddr::V4(node_ip(other)).into();
            let value = match other == n {
                true => IpcacheValue::local_node(IDENTITY_HOST),
                false => IpcacheValue::new(IDENTITY_REMOTE_NODE, None),
            };
            ipcache.insert(net, value);
        }
        assert!(
            dp.endpoints
                .converge(&endpoints, true)
                .unwrap()
                .is_converged()
        );
        assert!(dp.ipcache.converge(&ipcache, true).unwrap().is_converged());
        let config = match self.mode {
            Mode::Overlay => NodeConfig {
                tunnel_ifindex: link_info(ns, "tvx").0,
                node_ipv4: node_ip(n).octets(),
                flags: NODE_F_TUNNEL,
                pad: 0,
            },
            Mode::Native => NodeConfig {
                node_ipv4: node_ip(n).octets(),
                ..NodeConfig::default()
            },
        };
        dp.node_config.set(&config).unwrap();
        if self.mode == Mode::Overlay {
            // The node's own traffic to remote pods is routed into the overlay.
            for other in (0..self.node_ns.len()).filter(|o| *o != n) {
                let src = node_ip(n).to_string();
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &pod_cidr(other).to_string(),
                    "dev",
                    "tvx",
                    "src",
                    &src,
                ]);
            }
        }
    }

    fn dataplane(&self, n: usize) -> Dataplane {
        Dataplane::open(&self.pins[n].0).unwrap()
    }

    fn count(&self, n: usize, reason: MetricReason, dir: Direction) -> u64 {
        self.dataplane(n).metrics.packets(reason, dir).unwrap()
    }

    fn drops(&self, n: usize) -> Vec<(MetricReason, u64)> {
        self.dataplane(n)
            .metrics
            .samples()
            .unwrap()
            .into_iter()
            .filter(|s| s.reason.is_none_or(MetricReason::is_drop))
            .map(|s| {
                (
                    s.reason.unwrap_or(MetricReason::DropInvalidPacket),
                    s.packets,
                )
            })
            .collect()
    }
}

fn ping(ns: &str, dst: Ipv4Addr) {
    let out = exec(
        ns,
        &["ping", "-c", "2", "-i", "0.2", "-w", "20", &dst.to_string()],
    );
    assert!(
        out.status.success(),
        "ping {dst} from {ns}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Accepts one connection, or panics after `timeout` (so a failed client
/// cannot leave the server thread blocked forever).
fn accept_within(listener: &TcpListener, timeout: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(timeout)).unwrap();
                return conn;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Sets the flag when dropped, also when the scope unwinds.
struct SetOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn tcp_echo(server: &Pod, client: &Pod) {
    let listener = in_netns(&server.ns, || TcpListener::bind((server.ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut conn = accept_within(&listener, Duration::from_secs(30));
            let mut buf = vec![0u8; 64 * 1024];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf).unwrap();
        });
        in_netns(&client.ns, || {
            let mut conn =
                TcpStream::connect_timeout(&addr, Duration::from_secs(20)).expect("tcp connect");
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let sent: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            conn.write_all(&sent).unwrap();
            let mut got = vec![0u8; sent.len()];
            conn.read_exact(&mut got).unwrap();
            assert_eq!(got, sent, "tcp {} -> {}", client.ip, server.ip);
        });
    });
}

fn udp_echo(server: &Pod, client: &Pod) {
    let sock = in_netns(&server.ns, || UdpSocket::bind((server.ip, 0)).unwrap());
    let addr = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = [0u8; 1500];
            while !done.load(Ordering::Relaxed) {
                if let Ok((len, from)) = sock.recv_from(&mut buf) {
                    sock.send_to(&buf[..len], from).unwrap();
                }
            }
        });
        let _stop = SetOnDrop(&done);
        in_netns(&client.ns, || {
            let client_sock = UdpSocket::bind((client.ip, 0)).unwrap();
            client_sock
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let payload = format!("udp {} -> {}", client.ip, addr);
            let mut buf = [0u8; 1500];
            // UDP may lose the first datagram while neighbours resolve: retry, 40 × 0.5 s at most.
            let echoed = (0..40).any(|_| {
                client_sock.send_to(payload.as_bytes(), addr).unwrap();
                matches!(client_sock.recv_from(&mut buf), Ok((len, from)) if from == addr && &buf[..len] == payload.as_bytes())
            });
            assert!(echoed, "no UDP echo {payload}");
        });
    });
}

fn all_pairs(cluster: &Cluster) {
    for client in &cluster.pods {
        for server in cluster.pods.iter().filter(|s| s.ip != client.ip) {
            ping(&client.ns, server.ip);
            tcp_echo(server, client);
            udp_echo(server, client);
        }
    }
}

/// Captures VXLAN frames on an underlay bridge port until one carries an
/// inner packet from `src`; returns its VNI.
fn vni_on_the_wire(
    underlay_ns: &str,
    port: &str,
    src: Ipv4Addr,
    send: impl FnOnce() + Send,
) -> u32 {
    let ifindex = link_info(underlay_ns, port).0;
    in_netns(underlay_ns, || {
        // SAFETY: plain socket calls on a descriptor we own.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd,
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid option pointer and length.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        std::thread::scope(|scope| {
            scope.spawn(send);
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                // SAFETY: buf is writable for its length.
                let len = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                if len < 14 + 20 + 8 + 8 + 14 + 20 {
                    continue;
                }
                let f = &buf[..len as usize];
                let is_vxlan = f[12..14] == [0x08, 0x00]
                    && f[23] == 17
                    && u16::from_be_bytes([f[36], f[37]]) == VXLAN_PORT;
                // Outer eth 14 + IP 20 + UDP 8 + VXLAN 8, then inner eth 14, inner IP src at +12.
                let inner_ip = 14 + 20 + 8 + 8 + 14;
                if is_vxlan && f[inner_ip + 12..inner_ip + 16] == src.octets() {
                    let vxlan = 14 + 20 + 8;
                    // SAFETY: fd is ours.
                    unsafe { libc::close(fd) };
                    return u32::from_be_bytes([0, f[vxlan + 4], f[vxlan + 5], f[vxlan + 6]]);
                }
            }
            panic!("no VXLAN frame from {src} seen on {port}");
        })
    })
}

#[test]
fn overlay_mode_connects_every_pod_pair_with_the_identity_in_the_vni() {
    let cluster = Cluster::build(Mode::Overlay, 2, 2);
    all_pairs(&cluster);

    for n in 0..2 {
        assert!(
            cluster.count(n, MetricReason::ForwardLocal, Direction::Egress) > 0,
            "same-node delivery by from_container"
        );
        assert!(
            cluster.count(n, MetricReason::ForwardTunnel, Direction::Egress) > 0,
            "encapsulation by from_container"
        );
        assert!(
            cluster.count(n, MetricReason::ForwardLocal, Direction::Ingress) > 0,
            "delivery by from_overlay"
        );
        assert_eq!(cluster.drops(n), vec![], "no drops on node {n}");
    }

    // The VNI of a packet from pod 0 of node 0 is that pod's identity.
    let (src, dst) = (&cluster.pods[0], &cluster.pods[2]);
    let vni = vni_on_the_wire(&cluster.underlay_ns, "u0", src.ip, || ping(&src.ns, dst.ip));
    assert_eq!(vni, src.identity);

    // The node's own traffic: to a local pod through to_container, to a remote
    // pod through to_overlay with the host identity in the VNI.
    ping(&cluster.node_ns[0], cluster.pods[0].ip);
    assert!(cluster.count(0, MetricReason::DeliverViaStack, Direction::Ingress) > 0);
    let vni = vni_on_the_wire(&cluster.underlay_ns, "u0", node_ip(0), || {
        ping(&cluster.node_ns[0], cluster.pods[3].ip)
    });
    assert_eq!(vni, IDENTITY_HOST);
}

#[test]
fn native_routing_mode_connects_every_pod_pair() {
    let cluster = Cluster::build(Mode::Native, 2, 2);
    all_pairs(&cluster);
    for n in 0..2 {
        assert!(cluster.count(n, MetricReason::ForwardLocal, Direction::Egress) > 0);
        assert!(
            cluster.count(n, MetricReason::ToStackNative, Direction::Egress) > 0,
            "routed by the host"
        );
        assert!(
            cluster.count(n, MetricReason::ForwardLocal, Direction::Ingress) > 0,
            "delivered by from_netdev"
        );
        assert_eq!(
            cluster.count(n, MetricReason::ForwardTunnel, Direction::Egress),
            0
        );
        assert_eq!(cluster.drops(n), vec![], "no drops on node {n}");
    }
}

#[test]
fn reattaching_under_traffic_loses_no_packet() {
    let cluster = Cluster::build(Mode::Overlay, 2, 1);
    let (a, b) = (&cluster.pods[0], &cluster.pods[1]);
    ping(&a.ns, b.ip);
    let before = cluster.count(0, MetricReason::ForwardTunnel, Direction::Egress);
    // A TCP stream across the nodes, running through every re-attach.
    let listener = in_netns(&b.ns, || TcpListener::bind((b.ip, 0)).unwrap());
    let addr = listener.local_addr().unwrap();
    let mut stream = in_netns(&a.ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(20)).unwrap()
    });
    let mut receiver = accept_within(&listener, Duration::from_secs(20));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                match receiver.read(&mut buf).expect("stream read") {
                    0 => return total,
                    n => {
                        assert!(
                            buf[..n].iter().all(|byte| *byte == 0x5a),
                            "stream corrupted"
                        );
                        total += n as u64;
                    }
                }
            }
        });
        let writer = scope.spawn(|| {
            let chunk = [0x5au8; 4096];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(&chunk).expect("stream write");
                sent += chunk.len() as u64;
            }
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        });
        let _stop = SetOnDrop(&stop);
        let pinger = scope.spawn(|| {
            exec(
                &a.ns,
                &[
                    "ping",
                    "-c",
                    "300",
                    "-i",
                    "0.01",
                    "-W",
                    "5",
                    &b.ip.to_string(),
                ],
            )
        });
        // Agent restarts: load and attach again on both nodes, three times.
        for _ in 0..3 {
            for n in 0..2 {
                cluster.load_and_attach(n, &cluster.pins[n]);
            }
        }
        let out = pinger.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!(
            "ping during re-attach: {}",
            stdout.lines().rev().nth(1).unwrap_or("")
        );
        assert!(
            stdout.contains("300 packets transmitted, 300 received"),
            "{stdout}"
        );
        stop.store(true, Ordering::Relaxed);
        let sent = writer.join().unwrap();
        let received = reader.join().unwrap();
        println!("TCP stream during re-attach: {sent} bytes sent, {received} received");
        assert_eq!(received, sent, "the connection survived intact");
        assert!(sent > 0);
    });
    let after = cluster.count(0, MetricReason::ForwardTunnel, Direction::Egress);
    assert!(
        after >= before + 300,
        "the programs forwarded the pings ({before} → {after})"
    );
    // One link per hook and interface remains pinned.
    let links = loader::pinned_links(&cluster.pins[0].0).unwrap();
    assert_eq!(links.len(), 5, "{links:?}");

    // A pod goes away: its veth is deleted, its link pins are garbage.
    ip(&["-n", &cluster.node_ns[1], "link", "del", &b.host_if]);
    let node1 = &cluster.node_ns[1];
    let exists = |ifname: &str| {
        exec(node1, &["ip", "link", "show", "dev", ifname])
            .status
            .success()
    };
    let removed = loader::prune_links(&cluster.pins[1].0, |ifname, _| exists(ifname)).unwrap();
    assert_eq!(
        removed,
        vec![
            ("lxc0".to_string(), Hook::FromContainer),
            ("lxc0".to_string(), Hook::ToContainer)
        ]
    );
    assert_eq!(loader::pinned_links(&cluster.pins[1].0).unwrap().len(), 3);
}

/// Runs `iperf3` from `client_ns` to a one-off server in `server_ns`; bits/s.
fn iperf3(server_ns: &str, server_ip: Ipv4Addr, client_ns: &str) -> f64 {
    let port = (5300 + COUNTER.fetch_add(1, Ordering::Relaxed) % 500).to_string();
    let ip = server_ip.to_string();
    let mut server = Command::new("ip")
        .args([
            "netns", "exec", server_ns, "iperf3", "-s", "-1", "-B", &ip, "-p", &port,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 (installed by hack/install-prereqs.sh)");
    // The server needs a moment to listen: retry the client, 100 × at most.
    // (iperf3 3.12 exits 0 with an "error" in its JSON when refused.)
    let mut result = None;
    for _ in 0..100 {
        let run = exec(
            client_ns,
            &["iperf3", "-c", &ip, "-p", &port, "-t", "3", "-J"],
        );
        let json: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap_or_default();
        if let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() {
            result = Some(bps);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    result.unwrap_or_else(|| panic!("iperf3 {client_ns} -> {ip} never completed"))
}

/// Mean round-trip time in ms over 100 pings.
fn rtt_ms(ns: &str, dst: Ipv4Addr) -> f64 {
    let out = exec(
        ns,
        &["ping", "-q", "-c", "100", "-i", "0.005", &dst.to_string()],
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "rtt min/avg/max/mdev = 0.030/0.045/0.090/0.010 ms"
    let stats = stdout
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .expect("ping summary");
    stats
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .split('/')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// Cross-node pod-to-pod throughput and latency through the overlay and
/// through native routing, as ratios to a plain veth pair between two
/// namespaces, measured side by side in one run. Printed, not asserted.
#[test]
fn throughput_and_latency_against_a_plain_veth() {
    let tag = format!(
        "{}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let (left, right) = (
        Netns::new(format!("tdvl-{tag}")),
        Netns::new(format!("tdvr-{tag}")),
    );
    ip(&[
        "-n", &left.0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &right.0,
    ]);
    ip(&["-n", &left.0, "addr", "add", "10.99.0.1/24", "dev", "eth0"]);
    ip(&["-n", &right.0, "addr", "add", "10.99.0.2/24", "dev", "eth0"]);
    ip(&["-n", &left.0, "link", "set", "eth0", "up"]);
    ip(&["-n", &right.0, "link", "set", "eth0", "up"]);
    let right_ip = Ipv4Addr::new(10, 99, 0, 2);
    ping(&left.0, right_ip);

    let overlay = Cluster::build(Mode::Overlay, 2, 1);
    let native = Cluster::build(Mode::Native, 2, 1);
    for cluster in [&overlay, &native] {
        ping(&cluster.pods[0].ns, cluster.pods[1].ip);
    }
    let veth_bps = iperf3(&right.0, right_ip, &left.0);
    let veth_rtt = rtt_ms(&left.0, right_ip);
    println!(
        "plain veth: {:.2} Gbit/s, rtt {veth_rtt:.3} ms",
        veth_bps / 1e9
    );
    for (name, cluster) in [("overlay (VXLAN)", &overlay), ("native routing", &native)] {
        let (a, b) = (&cluster.pods[0], &cluster.pods[1]);
        let bps = iperf3(&b.ns, b.ip, &a.ns);
        let rtt = rtt_ms(&a.ns, b.ip);
        println!(
            "{name}: {:.2} Gbit/s ({:.2}× veth), rtt {rtt:.3} ms ({:.2}× veth)",
            bps / 1e9,
            bps / veth_bps,
            rtt / veth_rtt
        );
        assert!(bps > 0.0);
    }
}
