//! Policy entries as the agent computes them and the `policy`, `policy_state` and
//! `policy_cidrs` maps store them (`bpf/lib/maps.h`).
//!
//! An entry is one key of the per-endpoint policy LPM trie: (endpoint, direction, peer
//! identity) always matched, then optionally the protocol, then a prefix of the destination
//! port. A port range becomes several entries, one per aligned block ([`port_range_prefixes`]).

use super::maps::Direction;

/// Node-local identities of policy CIDRs have this bit set; they never leave the node.
pub const LOCAL_IDENTITY_FLAG: u32 = 1 << 24;

/// `POLICY_F_DEFAULT_DENY_INGRESS` / `_EGRESS` in `policy_state.flags`.
pub const POLICY_F_DEFAULT_DENY_INGRESS: u32 = 0x01;
pub const POLICY_F_DEFAULT_DENY_EGRESS: u32 = 0x02;

/// IP protocol numbers a rule can name (0 = any protocol).
pub const PROTO_ANY: u8 = 0;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// One key of the policy map, before encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub endpoint_id: u16,
    pub direction: Direction,
    /// The peer's security identity; 0 = any peer; [`LOCAL_IDENTITY_FLAG`] set = a CIDR.
    pub peer: u32,
    /// [`PROTO_ANY`] matches every protocol and port (then `port`/`port_prefix` are 0).
    pub protocol: u8,
    /// First port of the block (host order); only the top `port_prefix` bits count.
    pub port: u16,
    /// How many leading bits of the port are matched: 0 = every port, 16 = exactly `port`.
    pub port_prefix: u8,
}

impl PolicyEntry {
    /// Whether every packet this entry matches is also matched by `wider` (same endpoint,
    /// direction and peer; `wider`'s protocol and port block contain this one's).
    pub fn is_within(&self, wider: &PolicyEntry) -> bool {
        if (self.endpoint_id, self.direction, self.peer)
            != (wider.endpoint_id, wider.direction, wider.peer)
        {
            return false;
        }
        if wider.protocol == PROTO_ANY {
            return true;
        }
        if self.protocol != wider.protocol || self.port_prefix < wider.port_prefix {
            return false;
        }
        port_mask(wider.port_prefix) & (self.port ^ wider.port) == 0
    }
}

/// The port bits a prefix of `bits` leading bits keeps.
pub fn port_mask(bits: u8) -> u16 {
    match bits {
        0 => 0,
        b if b >= 16 => u16::MAX,
        b => u16::MAX << (16 - b),
    }
}

/// What a matching entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow,
    Deny,
}

/// `struct policy_state`: one per endpoint that has a ResolvedPolicy.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyState {
    /// Low 32 bits of the ResolvedPolicy revision; conntrack entries judged under another
    /// revision are re-judged.
    pub revision: u32,
    /// `POLICY_F_*`.
    pub flags: u32,
}

/// The aligned port blocks covering `start..=end` exactly: (first port, prefix bits).
/// `(0, 0)` alone stands for every port.
pub fn port_range_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    if start > end {
        return blocks;
    }
    let (mut low, end) = (u32::from(start), u32::from(end));
    while low <= end {
        // The largest aligned block starting at `low` that stays within `end`.
        let mut size_bits = if low == 0 {
            16
        } else {
            low.trailing_zeros().min(16)
        };
        while size_bits > 0 && low + (1 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        blocks.push((low as u16, 16 - size_bits as u8));
        low += 1 << size_bits;
    }
    blocks
}

/// Deny wins, within one LPM lookup: an entry whose key space lies inside a `Deny` entry of
/// the same endpoint, direction and peer becomes `Deny` too, because the trie answers with
/// the longest (most specific) match only.
pub fn propagate_denies(entries: &mut std::collections::BTreeMap<PolicyEntry, Verdict>) {
    let denies: Vec<PolicyEntry> = entries
        .iter()
        .filter(|(_, v)| **v == Verdict::Deny)
        .map(|(k, _)| *k)
        .collect();
    if denies.is_empty() {
        return;
    }
    for (entry, verdict) in entries.iter_mut() {
        if *verdict == Verdict::Allow && denies.iter().any(|d| entry.is_within(d)) {
            *verdict = Verdict::Deny;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn covered(blocks: &[(u16, u8)], port: u16) -> bool {
        blocks
            .iter()
            .any(|(p, bits)| port_mask(*bits) & (port ^ p) == 0)
    }

    #[test]
    fn single_ports_and_the_full_range() {
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_prefixes(80, 81), vec![(80, 15)]);
        assert_eq!(port_range_prefixes(81, 82), vec![(81, 16), (82, 16)]);
        assert_eq!(port_range_prefixes(1, 65535).len(), 16);
        assert!(port_range_prefixes(9, 8).is_empty());
    }

    proptest! {
        #[test]
        fn blocks_cover_exactly_the_range(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (start, end) = (a.min(b), a.max(b));
            let blocks = port_range_prefixes(start, end);
            prop_assert!(blocks.len() <= 32);
            prop_assert_eq!(covered(&blocks, probe), (start..=end).contains(&probe));
            prop_assert!(covered(&blocks, start) && covered(&blocks, end));
        }
    }

    fn entry(peer: u32, protocol: u8, port: u16, port_prefix: u8) -> PolicyEntry {
        PolicyEntry {
            endpoint_id: 7,
            direction: Direction::Ingress,
            peer,
            protocol,
            port,
            port_prefix,
        }
    }

    #[test]
    fn a_deny_turns_the_allows_inside_it_into_denies() {
        let mut entries = BTreeMap::from([
            (entry(300, PROTO_TCP, 80, 16), Verdict::Allow),
            (entry(300, PROTO_UDP, 80, 16), Verdict::Allow),
            (entry(300, PROTO_TCP, 0, 0), Verdict::Deny),
            (entry(301, PROTO_TCP, 80, 16), Verdict::Allow),
            (entry(302, PROTO_TCP, 64, 10), Verdict::Deny),
            (entry(302, PROTO_TCP, 80, 16), Verdict::Allow),
            (entry(302, PROTO_TCP, 8080, 16), Verdict::Allow),
        ]);
        propagate_denies(&mut entries);
        assert_eq!(entries[&entry(300, PROTO_TCP, 80, 16)], Verdict::Deny);
        assert_eq!(entries[&entry(300, PROTO_UDP, 80, 16)], Verdict::Allow);
        assert_eq!(entries[&entry(301, PROTO_TCP, 80, 16)], Verdict::Allow);
        assert_eq!(entries[&entry(302, PROTO_TCP, 80, 16)], Verdict::Deny);
        assert_eq!(entries[&entry(302, PROTO_TCP, 8080, 16)], Verdict::Allow);
    }

    #[test]
    fn any_protocol_contains_everything_of_its_peer() {
        assert!(entry(5, PROTO_UDP, 53, 16).is_within(&entry(5, PROTO_ANY, 0, 0)));
        assert!(!entry(6, PROTO_UDP, 53, 16).is_within(&entry(5, PROTO_ANY, 0, 0)));
        assert!(!entry(5, PROTO_TCP, 0, 0).is_within(&entry(5, PROTO_TCP, 80, 16)));
    }
}
