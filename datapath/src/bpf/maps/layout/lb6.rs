//! `#[repr(C)]` mirrors of the IPv6 services maps' keys and values (`bpf/lib/lb.h`,
//! `bpf/lib/lb6_nat.h`) and of `node_config6` (`bpf/lib/maps.h`);
//! re-exported by [`super`], checked by `tests/bpf_map_layout.rs` like the rest. The
//! service value ([`super::LbServiceValue`]) and the maps keyed by backend id or rev-nat
//! index alone (`lb_affinity`, `lb_maglev`) are shared with IPv4.

use super::LpmKey;

/// The IPv6 services maps.
pub const LB6_SERVICES: &str = "lb6_services";
pub const LB6_BACKENDS: &str = "lb6_backends";
pub const LB6_REVNAT: &str = "lb6_revnat";
pub const LB6_SOCK_REVNAT: &str = "lb6_sock_revnat";
pub const LB6_SOURCE_RANGES: &str = "lb6_source_ranges";
/// The tc service path's IPv6 connections (`lib/lb6_nat.h`), as `lb_nat` for IPv4.
pub const LB6_NAT: &str = "lb6_nat";
/// The node's IPv6 address, the source of SNATed IPv6 service connections.
pub const NODE_CONFIG6: &str = "node_config6";
/// `AFFINITY_BY_ADDR6` in `lb_affinity_key.kind`: an IPv6 client's address folded to 64 bits.
pub const AFFINITY_BY_ADDR6: u8 = 2;

/// `struct lb6_key`: a frontend (address `::`: a NodePort's wildcard entry) in one scope;
/// `backend_slot` 0 is the service, 1..=count its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6Key {
    /// Network order.
    pub address: [u8; 16],
    /// Network order.
    pub dport: [u8; 2],
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

/// `struct lb6_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6Backend {
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    /// `BE_F_*`.
    pub flags: u8,
}

/// `struct lb6_reverse_nat`: the frontend of a rev-nat index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6ReverseNat {
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct lb6_sock_revnat_key`: a translated socket and its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6SockRevnatKey {
    pub cookie: u64,
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 6],
}

/// `struct lb6_sock_revnat_value`: the frontend the socket connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb6SockRevnatValue {
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub rev_nat_index: u16,
}

/// `struct lb6_src_range_key`: the full LPM key of `lb6_source_ranges`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6SrcRangeKey {
    pub prefixlen: u32,
    pub rev_nat_index: u16,
    pub pad: u16,
    pub address: [u8; 16],
}

/// The part of [`Lb6SrcRangeKey`] after `prefixlen` (the data of an aya LPM key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6SrcRangePrefix {
    pub rev_nat_index: u16,
    pub pad: u16,
    pub address: [u8; 16],
}

impl LpmKey for Lb6SrcRangeKey {
    type Prefix = Lb6SrcRangePrefix;

    fn to_lpm(self) -> aya::maps::lpm_trie::Key<Lb6SrcRangePrefix> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            Lb6SrcRangePrefix {
                rev_nat_index: self.rev_nat_index,
                pad: self.pad,
                address: self.address,
            },
        )
    }

    fn from_lpm(key: &aya::maps::lpm_trie::Key<Lb6SrcRangePrefix>) -> Self {
        let d = key.data();
        Self {
            prefixlen: key.prefix_len(),
            rev_nat_index: d.rev_nat_index,
            pad: d.pad,
            address: d.address,
        }
    }
}

/// `struct lb6_nat_key`: a tuple as a packet carries it (ports network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6NatKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    /// `LB_NAT_FORWARD` / `LB_NAT_REPLY`.
    pub dir: u8,
    pub pad: u16,
}

/// `struct lb6_nat_entry`: what a packet of that tuple is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb6NatEntry {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub backend_id: u32,
    pub rev_nat_index: u16,
    pub flags: u8,
    pub pad: u8,
    /// Seconds of CLOCK_MONOTONIC when a packet last used the entry.
    pub last_seen: u32,
}

/// `struct node_config6`, the single entry of `node_config6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig6 {
    /// All zero: the node has no IPv6 address (no SNAT: remote backends see the client).
    pub node_ipv6: [u8; 16],
}

// SAFETY: plain `#[repr(C)]` integers and byte arrays without implicit padding (their sizes
// are checked against the objects' BTF).
unsafe impl aya::Pod for Lb6Key {}
unsafe impl aya::Pod for Lb6Backend {}
unsafe impl aya::Pod for Lb6ReverseNat {}
unsafe impl aya::Pod for Lb6SockRevnatKey {}
unsafe impl aya::Pod for Lb6SockRevnatValue {}
unsafe impl aya::Pod for Lb6SrcRangeKey {}
unsafe impl aya::Pod for Lb6SrcRangePrefix {}
unsafe impl aya::Pod for Lb6NatKey {}
unsafe impl aya::Pod for Lb6NatEntry {}
unsafe impl aya::Pod for NodeConfig6 {}
