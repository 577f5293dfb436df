//! Shared by the `bpf_*` integration tests: unique pin directories cleaned up
//! on drop, crafted packets and `__sk_buff` contexts for `BPF_PROG_TEST_RUN`.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use ipnet::IpNet;
use tendril_datapath::bpf::{
    Dataplane, Hook, MapSizes, PolicyEntry, PolicyEvent, PolicyState, Programs, Verdict, loader,
    maps::{Direction, EndpointInfo, IpcacheValue, MetricReason, NodeConfig},
};

/// An endpoint entry with MACs derived from `last` (pod 02:..:00:last, node 02:..:01:last).
pub fn endpoint_info(ifindex: u32, identity: u32, endpoint_id: u16, last: u8) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        identity,
        endpoint_id,
        flags: 0,
        mac: [2, 0, 0, 0, 0, last],
        node_mac: [2, 0, 0, 0, 1, last],
    }
}

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique node pin directory under /sys/fs/bpf/tendril, removed on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = loader::node_pin_dir(
            Path::new(loader::BPFFS_ROOT),
            &format!("test-{tag}-{}-{n}", std::process::id()),
        );
        loader::ensure_bpffs(&dir).expect("bpffs");
        Self(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Programs and maps of a fresh node.
pub struct Node {
    pub programs: Programs,
    pub dataplane: Dataplane,
    pub dir: PinDir,
}

impl Node {
    /// Writes `endpoints` (pruning the rest); panics unless it converged.
    pub fn set_endpoints(&mut self, endpoints: &BTreeMap<IpAddr, EndpointInfo>) {
        let report = self.dataplane.endpoints.converge(endpoints, true).unwrap();
        assert!(report.is_converged(), "endpoints: {report:?}");
    }

    /// Writes `ipcache` (pruning the rest); panics unless it converged.
    pub fn set_ipcache(&mut self, ipcache: &BTreeMap<IpNet, IpcacheValue>) {
        let report = self.dataplane.ipcache.converge(ipcache, true).unwrap();
        assert!(report.is_converged(), "ipcache: {report:?}");
    }

    /// Writes `policy_state` alone (no policy entries); panics unless it converged.
    pub fn set_policy_states(&mut self, states: &BTreeMap<u16, PolicyState>) {
        let report = self
            .dataplane
            .policy
            .converge(&BTreeMap::new(), states, true)
            .unwrap();
        assert!(report.is_converged(), "policy states: {report:?}");
    }

    /// Writes a node config without tunnel, node address 192.168.0.1, with `flags`.
    pub fn set_node_flags(&mut self, flags: u32) {
        self.dataplane
            .node_config
            .set(&NodeConfig {
                tunnel_ifindex: 0,
                node_ipv4: [192, 168, 0, 1],
                flags,
                pad: 0,
            })
            .unwrap();
    }

    /// Writes policy `entries` and the `policy_state` of one endpoint (revision 1, `flags`),
    /// pruning the rest; panics unless it converged.
    pub fn set_policy(
        &mut self,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        endpoint_id: u16,
        flags: u32,
    ) {
        let states = BTreeMap::from([(endpoint_id, PolicyState { revision: 1, flags })]);
        let report = self
            .dataplane
            .policy
            .converge(entries, &states, true)
            .unwrap();
        assert!(report.is_converged(), "policy: {report:?}");
    }

    /// The verdict of `hook` on `frame`, run once on loopback (ifindex 1) with `mark`.
    pub fn verdict(&self, hook: Hook, frame: &[u8], mark: u32) -> u32 {
        run(self.programs.classifier(hook), frame, 1, mark, 1).ret
    }

    /// Packets counted for (reason, direction).
    pub fn count(&self, reason: MetricReason, dir: Direction) -> u64 {
        self.dataplane.metrics.packets(reason, dir).unwrap()
    }

    /// Every event waiting in the ring buffer, decoded.
    pub fn events(&self) -> Vec<PolicyEvent> {
        let mut ring = self.dataplane.open_events().unwrap();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            out.push(PolicyEvent::from_bytes(&item).expect("a well-formed event"));
        }
        out
    }

    pub fn load(tag: &str, sizes: &MapSizes) -> Self {
        let dir = PinDir::new(tag);
        let programs = Programs::load(&dir.0, sizes).expect("load programs");
        let dataplane = Dataplane::open(&dir.0).expect("open maps");
        Self {
            programs,
            dataplane,
            dir,
        }
    }
}

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether the IPv4 header checksum of an Ethernet frame verifies.
pub fn ipv4_checksum_ok(frame: &[u8]) -> bool {
    checksum(&frame[14..34]) == 0
}

/// An Ethernet + IPv4 + UDP frame with a valid IP checksum.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    dport: u16,
) -> Vec<u8> {
    let payload = b"tendril test payload";
    let udp_len = 8 + payload.len();
    let total_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + total_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, 17, 0, 0];
    ip[2..4].copy_from_slice(&(total_len as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// A broadcast ARP request frame.
pub fn arp_frame(src_mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[10, 0, 1, 10, 0, 0, 0, 0, 0, 0, 10, 0, 1, 1]);
    f.resize(60, 0);
    f
}

/// `struct __sk_buff` (192 bytes) with the fields test runs may set.
pub fn skb_ctx(ifindex: u32, mark: u32) -> [u8; 192] {
    let mut ctx = [0u8; 192];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes()); // mark
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes()); // ifindex
    ctx
}

pub fn ctx_mark(ctx: &[u8; 192]) -> u32 {
    u32::from_ne_bytes(ctx[8..12].try_into().unwrap())
}

/// Result of one `BPF_PROG_TEST_RUN`.
pub struct Run {
    pub ret: u32,
    pub data: Vec<u8>,
    pub ctx: [u8; 192],
    pub duration: std::time::Duration,
}

/// Runs `program` on `frame` (on loopback unless `ifindex` > 1), `repeat` times.
pub fn run(program: &SchedClassifier, frame: &[u8], ifindex: u32, mark: u32, repeat: u32) -> Run {
    let ctx_in = skb_ctx(ifindex, mark);
    let mut ctx_out = [0u8; 192];
    let mut data_out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut data_out);
    opts.ctx_in = Some(&ctx_in);
    opts.ctx_out = Some(&mut ctx_out);
    opts.repeat = repeat;
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    data_out.truncate(result.data_size_out as usize);
    Run {
        ret: result.return_value,
        data: data_out,
        ctx: ctx_out,
        duration: result.duration,
    }
}

/// An Ethernet + IPv4 frame around `l4` (protocol `proto`), valid IP checksum,
/// TTL 64. Transport checksums are left zero: the programs never check them.
pub fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&[2, 0, 0, 0, 1, 1]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    f.extend_from_slice(&ipv4_header(src, dst, proto, l4.len()));
    f.extend_from_slice(l4);
    f
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0];
    ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment (20-byte header, a few payload bytes) in a frame.
pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    h.extend_from_slice(b"data");
    ipv4_frame(src, dst, 6, &h)
}

/// A UDP datagram in a frame.
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 8];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(b"data");
    ipv4_frame(src, dst, 17, &h)
}

/// An SCTP packet (common header only) in a frame.
pub fn sctp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    ipv4_frame(src, dst, 132, &h)
}

/// An ICMP echo request (`reply` false) or reply with this id.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16, reply: bool) -> Vec<u8> {
    let mut h = vec![if reply { 0 } else { 8 }, 0, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&1u16.to_be_bytes());
    h.extend_from_slice(b"ping");
    ipv4_frame(src, dst, 1, &h)
}

/// An ICMP destination unreachable (port unreachable) from `src` to `dst`, quoting the IP
/// header and first 8 transport bytes of `quoted` (a frame).
pub fn icmp_unreachable(src: Ipv4Addr, dst: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let mut h = vec![3, 3, 0, 0, 0, 0, 0, 0];
    h.extend_from_slice(&quoted[14..14 + 28]);
    ipv4_frame(src, dst, 1, &h)
}

/// Makes `frame` an IPv4 fragment: identification `id`, more-fragments flag, offset in
/// 8-byte units; the header checksum is recomputed.
pub fn fragment(mut frame: Vec<u8>, id: u16, more: bool, offset: u16) -> Vec<u8> {
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    let flags_offset = if more { 0x2000 } else { 0 } | (offset & 0x1FFF);
    frame[20..22].copy_from_slice(&flags_offset.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// The BTF of the object file at `object`, as `bpftool -j btf dump file` prints it.
pub fn btf_types(object: &Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "btf", "dump", "file"])
        .arg(object)
        .output()
        .expect("bpftool (installed by hack/install-prereqs.sh)");
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let btf: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    btf["types"].as_array().cloned().unwrap_or_default()
}

pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMPV6: u8 = 58;

/// An Ethernet + IPv6 frame around `l4` (next header `proto`) with hop limit
/// `hop_limit`. Checksums are left zero: the programs never check them.
pub fn ipv6_frame(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    proto: u8,
    hop_limit: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + l4.len());
    f.extend_from_slice(&[2, 0, 0, 0, 1, 1]);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.push(proto);
    f.push(hop_limit);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(l4);
    f
}

/// An IPv6 fragment of a datagram of upper-layer `proto`: a fragment header (offset in
/// 8-byte units, more-fragments flag, identification `id`) before `body`.
pub fn ipv6_fragment(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    proto: u8,
    id: u32,
    more: bool,
    offset: u16,
    body: &[u8],
) -> Vec<u8> {
    const IPPROTO_FRAGMENT: u8 = 44;
    let mut l4 = vec![proto, 0];
    l4.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    l4.extend_from_slice(&id.to_be_bytes());
    l4.extend_from_slice(body);
    ipv6_frame(src, dst, IPPROTO_FRAGMENT, 64, &l4)
}

/// A UDP datagram over IPv6 with 16 bytes of payload.
pub fn udp6(src: std::net::Ipv6Addr, sport: u16, dst: std::net::Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    l4.extend_from_slice(&24u16.to_be_bytes());
    l4.extend_from_slice(&[0, 0]);
    l4.extend_from_slice(&[0xAB; 16]);
    ipv6_frame(src, dst, IPPROTO_UDP, 64, &l4)
}

/// An ICMPv6 message (type, code 0, 4 bytes of body, 16 of data) with `hop_limit`.
pub fn icmp6(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    icmp_type: u8,
    hop_limit: u8,
) -> Vec<u8> {
    let mut l4 = vec![icmp_type, 0, 0, 0, 0x12, 0x34, 0, 1];
    l4.extend_from_slice(&[0; 16]);
    ipv6_frame(src, dst, IPPROTO_ICMPV6, hop_limit, &l4)
}

const IPPROTO_UDP: u8 = 17;
