//! `#[repr(C)]` mirrors of every map key and value in `bpf/lib/maps.h`, and
//! the reasons of `bpf/lib/metrics.h`. `tests/bpf_map_layout.rs` compares
//! sizes and field offsets with the BTF of the compiled objects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::LpmKey;

mod egress;
mod lb6;
pub use egress::*;
pub use lb6::*;

/// Map names, which are also their pin file names in the node's bpffs directory.
pub const IPCACHE: &str = "ipcache";
pub const ENDPOINTS: &str = "endpoints";
pub const METRICS: &str = "metrics";
pub const NODE_CONFIG: &str = "node_config";
pub const POLICY: &str = "policy";
pub const POLICY_STATE: &str = "policy_state";
pub const POLICY_CIDRS: &str = "policy_cidrs";
pub const CONNTRACK: &str = "conntrack";
pub const CONNTRACK6: &str = "conntrack6";
pub const EVENTS: &str = "events";
pub const IPV4_FRAGS: &str = "ipv4_frags";
pub const IPV6_FRAGS: &str = "ipv6_frags";
pub const POLICY_CONFIG: &str = "policy_config";
pub const POLICY_FLOWS: &str = "policy_flows";
/// The services maps of `bpf/lib/lb.h`.
pub const LB_SERVICES: &str = "lb_services";
pub const LB_BACKENDS: &str = "lb_backends";
pub const LB_REVNAT: &str = "lb_revnat";
pub const LB_AFFINITY: &str = "lb_affinity";
pub const LB_SOURCE_RANGES: &str = "lb_source_ranges";
pub const LB_MAGLEV: &str = "lb_maglev";
pub const LB_NETNS: &str = "lb_netns";
pub const LB_SOCK_REVNAT: &str = "lb_sock_revnat";
pub const LB_CONFIG: &str = "lb_config";
pub const LB_NAT: &str = "lb_nat";
/// The egress gateway maps of `bpf/lib/egress.h`.
pub const EGRESS_POLICY: &str = "egress_policy";
pub const EGRESS_EXEMPT: &str = "egress_exempt";
pub const EGRESS_NAT: &str = "egress_nat";

/// Default capacities, as compiled into the objects (`*_MAX_ENTRIES` in maps.h).
pub const IPCACHE_MAX_ENTRIES: u32 = 131_072;
pub const ENDPOINTS_MAX_ENTRIES: u32 = 8192;
pub const METRICS_MAX_ENTRIES: u32 = 1024;
pub const POLICY_MAX_ENTRIES: u32 = 65_536;
pub const POLICY_STATE_MAX_ENTRIES: u32 = 8192;
pub const POLICY_CIDRS_MAX_ENTRIES: u32 = 16_384;
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
/// Bytes of the `events` ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Fragmented datagrams whose ports are remembered (LRU; not configurable).
pub const IPV4_FRAGS_MAX_ENTRIES: u32 = 8192;
/// The same for IPv6 (`ipv6_frags`).
pub const IPV6_FRAGS_MAX_ENTRIES: u32 = 8192;
/// Flows whose last reported allow verdict is remembered (LRU; not configurable).
pub const POLICY_FLOWS_MAX_ENTRIES: u32 = 65_536;
/// `policy_config.event_mode` (`POLICY_EVENTS_*`).
pub const POLICY_EVENTS_AGGREGATE: u32 = 0;
pub const POLICY_EVENTS_ALL: u32 = 1;
pub const POLICY_EVENTS_DROPS: u32 = 2;
pub const LB_SERVICES_MAX_ENTRIES: u32 = 65_536;
pub const LB_BACKENDS_MAX_ENTRIES: u32 = 65_536;
pub const LB_REVNAT_MAX_ENTRIES: u32 = 65_536;
pub const LB_AFFINITY_MAX_ENTRIES: u32 = 65_536;
pub const LB_SOURCE_RANGES_MAX_ENTRIES: u32 = 4096;
pub const LB_MAGLEV_MAX_ENTRIES: u32 = 65_536;
pub const LB_NETNS_MAX_ENTRIES: u32 = 8192;
pub const LB_SOCK_REVNAT_MAX_ENTRIES: u32 = 131_072;
pub const LB_NAT_MAX_ENTRIES: u32 = 262_144;
pub const EGRESS_POLICY_MAX_ENTRIES: u32 = 16_384;
pub const EGRESS_EXEMPT_MAX_ENTRIES: u32 = 4096;
pub const EGRESS_NAT_MAX_ENTRIES: u32 = 65_536;
/// Bits of an `egress_policy` key always matched (the source address).
pub const EGRESS_STATIC_PREFIX: u32 = 32;
/// `EGRESS_F_EXCLUDED` in `egress_value.flags`: an excludedCIDRs prefix.
pub const EGRESS_F_EXCLUDED: u32 = 0x01;
/// Egress SNAT source ports (`EGRESS_SNAT_PORT_MIN`, `EGRESS_SNAT_PORT_RANGE`).
pub const EGRESS_SNAT_PORT_MIN: u16 = 10_000;
pub const EGRESS_SNAT_PORT_RANGE: u16 = 22_768;
/// `LB_NAT_*`: the direction of an `lb_nat` entry, and its flags.
pub const LB_NAT_FORWARD: u8 = 1;
pub const LB_NAT_REPLY: u8 = 2;
pub const LB_NAT_F_SNAT: u8 = 0x01;
pub const LB_NAT_F_NORTH_SOUTH: u8 = 0x02;
pub const LB_NAT_F_HAIRPIN: u8 = 0x04;
pub const LB_NAT_F_CLOSING: u8 = 0x08;
/// Idle seconds after which an `lb_nat` connection's SNAT port may serve another.
pub const LB_NAT_IDLE_CLOSED_S: u32 = 60;
pub const LB_NAT_IDLE_TCP_S: u32 = 21_600;
pub const LB_NAT_IDLE_UDP_S: u32 = 60;

/// `LB_SCOPE_*`: the lookup scope of a service entry.
pub const LB_SCOPE_EXTERNAL: u8 = 0;
pub const LB_SCOPE_INTERNAL: u8 = 1;
/// `SVC_F_*` in `lb4_service.flags`.
pub const SVC_F_NODEPORT: u8 = 0x01;
pub const SVC_F_EXTERNAL: u8 = 0x02;
pub const SVC_F_TWO_SCOPES: u8 = 0x04;
pub const SVC_F_AFFINITY: u8 = 0x08;
pub const SVC_F_SOURCE_RANGES: u8 = 0x10;
pub const SVC_F_MAGLEV: u8 = 0x20;
pub const SVC_F_LOCAL_ONLY: u8 = 0x40;
/// An empty scope of a service with backends elsewhere (a Local policy): drop, not reject.
pub const SVC_F_DROP_EMPTY: u8 = 0x80;
/// `BE_F_LOCAL` in `lb4_backend.flags`: the backend runs on this node.
pub const BE_F_LOCAL: u8 = 0x01;
/// Bits of an `lb4_src_range_key` always matched: rev-nat index + pad.
pub const LB_SRC_RANGE_STATIC_PREFIX: u32 = 32;
/// `lb_netns` values: the node's own network namespace, or a pod's.
pub const NETNS_NODE: u8 = 1;
pub const NETNS_POD: u8 = 2;

/// `AF_INET` / `AF_INET6`, as the programs store them.
pub const FAMILY_IPV4: u8 = 2;
pub const FAMILY_IPV6: u8 = 10;

/// Bits of an ipcache key always matched before the address: family + pad.
pub const IPCACHE_STATIC_PREFIX: u32 = 32;

/// `IPCACHE_F_LOCAL_NODE`: the address belongs to this node.
pub const IPCACHE_F_LOCAL_NODE: u8 = 0x01;
/// `NODE_F_TUNNEL`: the overlay is enabled on this node.
pub const NODE_F_TUNNEL: u32 = 0x01;
/// `NODE_F_POLICY_AUDIT`: would-be policy drops are counted, reported and passed.
pub const NODE_F_POLICY_AUDIT: u32 = 0x02;
/// `NODE_F_IPV6_POLICY`: IPv6 is judged by policy and conntrack; unset, IPv6 of
/// policy-selected endpoints fails closed (bpf/lib/ipv6.h).
pub const NODE_F_IPV6_POLICY: u32 = 0x04;

/// Bits of a policy key always matched: endpoint id, direction, pad, peer identity.
pub const POLICY_STATIC_PREFIX: u32 = 64;
/// `POLICY_VERDICT_*` in `policy_value.verdict`.
pub const POLICY_VERDICT_ALLOW: u8 = 1;
pub const POLICY_VERDICT_DENY: u8 = 2;

/// `CT_F_*` in `ct_value.flags`.
pub const CT_F_SEEN_REPLY: u8 = 0x01;
/// TCP: RST, or FIN in both directions.
pub const CT_F_CLOSING: u8 = 0x02;
/// Admitted only because of audit mode (judged again when audit mode is off).
pub const CT_F_AUDIT: u8 = 0x04;
pub const CT_F_FIN_FORWARD: u8 = 0x08;
pub const CT_F_FIN_REPLY: u8 = 0x10;

/// The 24 bits of the VXLAN VNI that carry the source identity.
pub const IDENTITY_MAX_VNI: u32 = 0x00FF_FFFF;

fn addr_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (FAMILY_IPV4, addr)
        }
        IpAddr::V6(v6) => (FAMILY_IPV6, v6.octets()),
    }
}

fn bytes_addr(family: u8, addr: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        FAMILY_IPV6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

/// `struct ipcache_key`: the full LPM key as the kernel stores it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheKey {
    /// Bits matched after this field: [`IPCACHE_STATIC_PREFIX`] + the address prefix.
    pub prefixlen: u32,
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

/// The part of [`IpcacheKey`] after `prefixlen`: the data of aya's
/// [`aya::maps::lpm_trie::Key`], which carries `prefixlen` itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcachePrefix {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

impl IpcacheKey {
    /// The key of a prefix; host bits are cleared.
    pub fn from_net(net: &IpNet) -> Self {
        let net = net.trunc();
        let (family, addr) = addr_bytes(net.network());
        Self {
            prefixlen: IPCACHE_STATIC_PREFIX + u32::from(net.prefix_len()),
            family,
            pad: [0; 3],
            addr,
        }
    }

    /// The prefix this key stands for, `None` for a malformed key.
    pub fn to_net(&self) -> Option<IpNet> {
        let prefix = u8::try_from(self.prefixlen.checked_sub(IPCACHE_STATIC_PREFIX)?).ok()?;
        match bytes_addr(self.family, &self.addr)? {
            IpAddr::V4(v4) => Ipv4Net::new(v4, prefix).ok().map(IpNet::V4),
            IpAddr::V6(v6) => Ipv6Net::new(v6, prefix).ok().map(IpNet::V6),
        }
    }
}

impl LpmKey for IpcacheKey {
    type Prefix = IpcachePrefix;

    fn to_lpm(self) -> aya::maps::lpm_trie::Key<IpcachePrefix> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            IpcachePrefix {
                family: self.family,
                pad: self.pad,
                addr: self.addr,
            },
        )
    }

    fn from_lpm(key: &aya::maps::lpm_trie::Key<IpcachePrefix>) -> Self {
        let data = key.data();
        Self {
            prefixlen: key.prefix_len(),
            family: data.family,
            pad: data.pad,
            addr: data.addr,
        }
    }
}

/// `struct ipcache_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    /// IPv4 underlay address of the node hosting the prefix, network order;
    /// all zero when no tunnel is needed.
    pub tunnel_endpoint: [u8; 4],
    pub flags: u8,
    pub encrypt_key: u8,
    pub pad: u16,
}

impl IpcacheValue {
    pub fn new(identity: u32, tunnel_endpoint: Option<Ipv4Addr>) -> Self {
        Self {
            identity,
            tunnel_endpoint: tunnel_endpoint.map_or([0; 4], |ip| ip.octets()),
            ..Self::default()
        }
    }

    /// An address of this node itself (identity `host`, no tunnel).
    pub fn local_node(identity: u32) -> Self {
        Self {
            flags: IPCACHE_F_LOCAL_NODE,
            ..Self::new(identity, None)
        }
    }

    pub fn tunnel_endpoint(&self) -> Option<Ipv4Addr> {
        (self.tunnel_endpoint != [0; 4]).then(|| Ipv4Addr::from(self.tunnel_endpoint))
    }
}

/// `struct endpoint_key`: a local pod address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub family: u8,
    pub pad: [u8; 3],
    pub addr: [u8; 16],
}

impl EndpointKey {
    pub fn new(ip: IpAddr) -> Self {
        let (family, addr) = addr_bytes(ip);
        Self {
            family,
            pad: [0; 3],
            addr,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        bytes_addr(self.family, &self.addr)
    }
}

/// `struct endpoint_info`: how to deliver to a local pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointInfo {
    /// Host-side veth ifindex (in the node's network namespace).
    pub ifindex: u32,
    pub identity: u32,
    pub endpoint_id: u16,
    pub flags: u16,
    /// Pod-side MAC.
    pub mac: [u8; 6],
    /// Host-side veth MAC: the source MAC of packets delivered to the pod
    /// (the pod's gateway neighbour entry must point at it).
    pub node_mac: [u8; 6],
}

/// `struct metrics_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MetricsKey {
    pub reason: u8,
    pub dir: u8,
    pub pad: u16,
}

/// `struct metrics_value`, one per CPU in the map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MetricsValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct node_config`, the single entry of `node_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NodeConfig {
    /// Ifindex of the collect-metadata VXLAN device; 0 when there is no overlay.
    pub tunnel_ifindex: u32,
    pub node_ipv4: [u8; 4],
    pub flags: u32,
    pub pad: u32,
}

/// `struct policy_key`: the full LPM key of the `policy` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Bits matched after this field: [`POLICY_STATIC_PREFIX`], + 16 when a protocol is
    /// named, + the port prefix.
    pub prefixlen: u32,
    pub endpoint_id: u16,
    pub direction: u8,
    pub pad0: u8,
    pub peer_identity: u32,
    pub protocol: u8,
    pub pad1: u8,
    /// Destination port, network order.
    pub dport: [u8; 2],
}

/// The part of [`PolicyKey`] after `prefixlen` (the data of an aya LPM key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyPrefix {
    pub endpoint_id: u16,
    pub direction: u8,
    pub pad0: u8,
    pub peer_identity: u32,
    pub protocol: u8,
    pub pad1: u8,
    pub dport: [u8; 2],
}

impl LpmKey for PolicyKey {
    type Prefix = PolicyPrefix;

    fn to_lpm(self) -> aya::maps::lpm_trie::Key<PolicyPrefix> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            PolicyPrefix {
                endpoint_id: self.endpoint_id,
                direction: self.direction,
                pad0: self.pad0,
                peer_identity: self.peer_identity,
                protocol: self.protocol,
                pad1: self.pad1,
                dport: self.dport,
            },
        )
    }

    fn from_lpm(key: &aya::maps::lpm_trie::Key<PolicyPrefix>) -> Self {
        let d = key.data();
        Self {
            prefixlen: key.prefix_len(),
            endpoint_id: d.endpoint_id,
            direction: d.direction,
            pad0: d.pad0,
            peer_identity: d.peer_identity,
            protocol: d.protocol,
            pad1: d.pad1,
            dport: d.dport,
        }
    }
}

/// `struct policy_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    /// `POLICY_VERDICT_*`.
    pub verdict: u8,
    pub flags: u8,
    pub pad: u16,
    pub rule_cookie: u32,
}

/// `struct policy_state` is [`crate::bpf::policy::PolicyState`] (`#[repr(C)]`).
pub use crate::bpf::policy::PolicyState;

/// `struct policy_cidr_value`: the node-local identity of a policy CIDR. Its key is an
/// [`IpcacheKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyCidrValue {
    pub identity: u32,
    pub pad: u32,
}

/// `struct ct_key`: one direction of a connection at one enforcement point.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CtKey {
    /// Network order.
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Host order; ICMP echo: the echo id in both.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The enforcement point that created it (`Direction as u8`).
    pub dir: u8,
    pub endpoint_id: u16,
}

/// `struct ct6_key`: [`CtKey`] of an IPv6 connection (map `conntrack6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ct6Key {
    /// Network order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host order; ICMPv6 echo: the echo id in both.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// The enforcement point that created it (`Direction as u8`).
    pub dir: u8,
    pub endpoint_id: u16,
}

/// `struct ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at creation.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// The `policy_state.revision` the connection was last judged under.
    pub policy_revision: u32,
    /// `CT_F_*`.
    pub flags: u8,
    pub pad: [u8; 3],
    pub packets: u64,
    /// The `policy_config.epoch` at which `policy_revision` was last known current.
    pub policy_epoch: u32,
    pub pad2: u32,
}

/// `struct policy_config`, the single entry of `policy_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyConfig {
    /// Bumped after every change of a `policy_state` revision.
    pub epoch: u32,
    /// `POLICY_EVENTS_*`: which allow verdicts are reported.
    pub event_mode: u32,
    /// Aggregation: at most one allow verdict per flow this often.
    pub event_interval_ns: u64,
}

/// `struct policy_flow_key`: one flow of the event aggregation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyFlowKey {
    pub peer_identity: u32,
    pub endpoint_id: u16,
    pub dport: u16,
    pub dir: u8,
    pub proto: u8,
    pub verdict: u8,
    pub pad: u8,
}

/// `struct policy_event` as the programs write it into the `events` ring buffer; decoded by
/// [`crate::bpf::policy::PolicyEvent::from_bytes`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RawPolicyEvent {
    pub ts_ns: u64,
    pub kind: u8,
    pub reason: u8,
    pub dir: u8,
    pub proto: u8,
    pub verdict: u8,
    pub matched: u8,
    pub endpoint_id: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    /// TCP: the header's flags byte.
    pub tcp_flags: u8,
    /// ICMP/ICMPv6: the packet's type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub pad: [u8; 5],
}

/// `struct policy_event6`: an event about IPv6 (`base.saddr`/`daddr` are zero). Told
/// apart from [`RawPolicyEvent`] by the record's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RawPolicyEvent6 {
    pub base: RawPolicyEvent,
    pub saddr6: [u8; 16],
    pub daddr6: [u8; 16],
}

/// `struct frag4_key`: one fragmented IPv4 datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Frag4Key {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// IP identification, network order.
    pub id: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct frag6_key`: one fragmented IPv6 datagram (map `ipv6_frags`, whose values are
/// [`Frag4Ports`] too).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Frag6Key {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The fragment header's identification, network order.
    pub id: [u8; 4],
    /// The fragment header's next header.
    pub proto: u8,
    pub pad: [u8; 3],
}

/// `struct frag4_ports`: the ports its first fragment carried (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Frag4Ports {
    pub sport: u16,
    pub dport: u16,
}

/// `struct lb4_key`: a frontend (address 0: a NodePort's wildcard entry) in one scope;
/// `backend_slot` 0 is the service, 1..=count its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4Key {
    /// Network order.
    pub address: [u8; 4],
    /// Network order.
    pub dport: [u8; 2],
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

/// `struct lb_service`: slot 0 (the service) or a backend slot, of either family (it carries
/// no address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbServiceValue {
    /// Slots ≥ 1: the backend id.
    pub backend_id: u32,
    /// Slot 0: backends taking new connections (0: the service rejects).
    pub count: u16,
    pub rev_nat_index: u16,
    /// Seconds of client-IP affinity.
    pub affinity_timeout: u32,
    /// `SVC_F_*`.
    pub flags: u8,
    pub pad: [u8; 3],
}

/// `struct lb4_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4Backend {
    /// Network order.
    pub address: [u8; 4],
    /// Network order.
    pub port: [u8; 2],
    pub proto: u8,
    /// `BE_F_*`.
    pub flags: u8,
}

/// `struct lb4_reverse_nat`: the frontend of a rev-nat index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4ReverseNat {
    pub address: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct lb_affinity_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LbAffinityKey {
    pub client: u64,
    pub rev_nat_index: u16,
    pub kind: u8,
    pub pad: [u8; 5],
}

/// `struct lb_affinity_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbAffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

/// `struct lb4_src_range_key`: the full LPM key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4SrcRangeKey {
    pub prefixlen: u32,
    pub rev_nat_index: u16,
    pub pad: u16,
    pub address: [u8; 4],
}

/// The part of [`Lb4SrcRangeKey`] after `prefixlen` (the data of an aya LPM key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4SrcRangePrefix {
    pub rev_nat_index: u16,
    pub pad: u16,
    pub address: [u8; 4],
}

impl LpmKey for Lb4SrcRangeKey {
    type Prefix = Lb4SrcRangePrefix;

    fn to_lpm(self) -> aya::maps::lpm_trie::Key<Lb4SrcRangePrefix> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            Lb4SrcRangePrefix {
                rev_nat_index: self.rev_nat_index,
                pad: self.pad,
                address: self.address,
            },
        )
    }

    fn from_lpm(key: &aya::maps::lpm_trie::Key<Lb4SrcRangePrefix>) -> Self {
        let d = key.data();
        Self {
            prefixlen: key.prefix_len(),
            rev_nat_index: d.rev_nat_index,
            pad: d.pad,
            address: d.address,
        }
    }
}

/// `struct lb_maglev_key`: one slot of a service's Maglev table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LbMaglevKey {
    pub rev_nat_index: u16,
    pub scope: u8,
    pub pad: u8,
    pub slot: u32,
}

/// `struct lb_sock_revnat_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct LbSockRevnatKey {
    pub cookie: u64,
    pub address: [u8; 4],
    pub port: [u8; 2],
    pub pad: u16,
}

/// `struct lb_sock_revnat_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbSockRevnatValue {
    pub address: [u8; 4],
    pub port: [u8; 2],
    pub rev_nat_index: u16,
}

/// `struct lb_config`, the single entry of `lb_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LbConfig {
    /// Maglev table size M (prime).
    pub maglev_table_size: u32,
    pub hash_seed: u32,
}

/// `struct lb4_nat_key`: a tuple as a packet carries it (ports network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb4NatKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// `LB_NAT_FORWARD` / `LB_NAT_REPLY`.
    pub dir: u8,
    pub pad: u16,
}

/// `struct lb4_nat_entry`: what a packet of that tuple is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb4NatEntry {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub backend_id: u32,
    pub rev_nat_index: u16,
    pub flags: u8,
    pub pad: u8,
    /// Seconds of CLOCK_MONOTONIC when a packet last used the entry.
    pub last_seen: u32,
}

// SAFETY: plain `#[repr(C)]` data of integers and byte arrays; every bit
// pattern is valid and the padding is explicit, so no uninitialised bytes
// reach the kernel.
unsafe impl aya::Pod for IpcacheKey {}
unsafe impl aya::Pod for IpcachePrefix {}
unsafe impl aya::Pod for IpcacheValue {}
unsafe impl aya::Pod for EndpointKey {}
unsafe impl aya::Pod for EndpointInfo {}
unsafe impl aya::Pod for MetricsKey {}
unsafe impl aya::Pod for MetricsValue {}
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for PolicyKey {}
unsafe impl aya::Pod for PolicyPrefix {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for PolicyState {}
unsafe impl aya::Pod for PolicyCidrValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for Ct6Key {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for PolicyConfig {}
unsafe impl aya::Pod for PolicyFlowKey {}
unsafe impl aya::Pod for RawPolicyEvent {}
unsafe impl aya::Pod for RawPolicyEvent6 {}
unsafe impl aya::Pod for Frag4Key {}
unsafe impl aya::Pod for Frag6Key {}
unsafe impl aya::Pod for Frag4Ports {}
unsafe impl aya::Pod for Lb4Key {}
unsafe impl aya::Pod for LbServiceValue {}
unsafe impl aya::Pod for Lb4Backend {}
unsafe impl aya::Pod for Lb4ReverseNat {}
unsafe impl aya::Pod for LbAffinityKey {}
unsafe impl aya::Pod for LbAffinityValue {}
unsafe impl aya::Pod for Lb4SrcRangeKey {}
unsafe impl aya::Pod for Lb4SrcRangePrefix {}
unsafe impl aya::Pod for LbMaglevKey {}
unsafe impl aya::Pod for LbSockRevnatKey {}
unsafe impl aya::Pod for LbSockRevnatValue {}
unsafe impl aya::Pod for LbConfig {}
unsafe impl aya::Pod for Lb4NatKey {}
unsafe impl aya::Pod for Lb4NatEntry {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::maps::MetricReason;

    #[test]
    fn ipcache_key_round_trips_prefixes() {
        for net in [
            "10.1.2.0/24",
            "10.1.2.3/32",
            "0.0.0.0/0",
            "fd00::/64",
            "fd00::1/128",
        ] {
            let net: IpNet = net.parse().unwrap();
            let key = IpcacheKey::from_net(&net);
            assert_eq!(key.to_net(), Some(net));
            assert_eq!(IpcacheKey::from_lpm(&key.to_lpm()), key);
        }
        let key = IpcacheKey::from_net(&"10.1.2.3/24".parse().unwrap());
        assert_eq!(key.prefixlen, 56);
        assert_eq!(&key.addr[..4], &[10, 1, 2, 0], "host bits cleared");
    }

    #[test]
    fn endpoint_key_round_trips_addresses() {
        for ip in ["10.0.0.7", "fd00::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(EndpointKey::new(ip).ip(), Some(ip));
        }
    }

    #[test]
    fn metric_reasons_round_trip() {
        for reason in MetricReason::ALL {
            assert_eq!(MetricReason::from_raw(reason as u8), Some(reason));
        }
        assert!(MetricReason::DropPolicy.is_drop());
        assert!(!MetricReason::ForwardTunnel.is_drop());
    }

    #[test]
    fn lpm_key_has_the_kernel_layout() {
        assert_eq!(
            std::mem::size_of::<aya::maps::lpm_trie::Key<IpcachePrefix>>(),
            std::mem::size_of::<IpcacheKey>()
        );
    }
}
