//! `#[repr(C)]` mirrors of the egress gateway maps' keys and values (`bpf/lib/egress.h`);
//! re-exported by [`super`], checked by `tests/bpf_map_layout.rs` like the rest.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::EGRESS_STATIC_PREFIX;
use crate::bpf::maps::LpmKey;

/// `struct egress_key`: source pod address (always matched) + destination prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressKey {
    /// [`EGRESS_STATIC_PREFIX`] + the destination prefix length.
    pub prefixlen: u32,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// The part of [`EgressKey`] after `prefixlen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressPrefix {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl EgressKey {
    /// The key of `source` → `destination` (host bits cleared).
    pub fn new(source: Ipv4Addr, destination: Ipv4Net) -> Self {
        let destination = destination.trunc();
        Self {
            prefixlen: EGRESS_STATIC_PREFIX + u32::from(destination.prefix_len()),
            saddr: source.octets(),
            daddr: destination.network().octets(),
        }
    }

    /// Source and destination prefix, `None` for a malformed key.
    pub fn to_parts(&self) -> Option<(Ipv4Addr, Ipv4Net)> {
        let prefix = u8::try_from(self.prefixlen.checked_sub(EGRESS_STATIC_PREFIX)?).ok()?;
        Some((
            Ipv4Addr::from(self.saddr),
            Ipv4Net::new(Ipv4Addr::from(self.daddr), prefix).ok()?,
        ))
    }
}

impl LpmKey for EgressKey {
    type Prefix = EgressPrefix;

    fn to_lpm(self) -> aya::maps::lpm_trie::Key<EgressPrefix> {
        aya::maps::lpm_trie::Key::new(
            self.prefixlen,
            EgressPrefix {
                saddr: self.saddr,
                daddr: self.daddr,
            },
        )
    }

    fn from_lpm(key: &aya::maps::lpm_trie::Key<EgressPrefix>) -> Self {
        let data = key.data();
        Self {
            prefixlen: key.prefix_len(),
            saddr: data.saddr,
            daddr: data.daddr,
        }
    }
}

/// `struct egress_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EgressValue {
    /// The gateway node's underlay address; all zero: no gateway (the traffic is dropped).
    pub gateway_ip: [u8; 4],
    /// The source address the gateway SNATs to.
    pub egress_ip: [u8; 4],
    pub flags: u32,
    pub pad: u32,
}

// SAFETY: plain `#[repr(C)]` data of integers and byte arrays with explicit padding, as
// the mirrors in `layout.rs`.
unsafe impl aya::Pod for EgressKey {}
unsafe impl aya::Pod for EgressPrefix {}
unsafe impl aya::Pod for EgressValue {}
