//! Policy entries as the agent computes them and the `policy`, `policy_state` and
//! `policy_cidrs` maps store them (`bpf/lib/maps.h`).
//!
//! An entry is one key of the per-endpoint policy LPM trie: (endpoint, direction, peer
//! identity) always matched, then optionally the protocol, then a prefix of the destination
//! port. A port range becomes several entries, one per aligned block ([`port_range_prefixes`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::maps::{
    Direction, MetricReason, POLICY_STATIC_PREFIX, POLICY_VERDICT_ALLOW, POLICY_VERDICT_DENY,
    PolicyKey, PolicyValue, RawPolicyEvent, RawPolicyEvent6,
};

/// Node-local identities of policy CIDRs have this bit set; they never leave the node.
pub use tendril_crds::facts::LOCAL_IDENTITY_FLAG;

/// `POLICY_F_DEFAULT_DENY_INGRESS` / `_EGRESS` in `policy_state.flags`.
pub const POLICY_F_DEFAULT_DENY_INGRESS: u32 = 0x01;
pub const POLICY_F_DEFAULT_DENY_EGRESS: u32 = 0x02;
/// `POLICY_F_SELECTED`: some policy selects the endpoint (sources, rules or a default deny);
/// its IPv6 fails closed while the node enforces no IPv6 policy.
pub const POLICY_F_SELECTED: u32 = 0x04;
/// `POLICY_F_HAS_DENY_INGRESS` / `_EGRESS`: the endpoint has deny entries in that direction;
/// without any, the datapath takes the first allowing lookup of a new connection.
pub const POLICY_F_HAS_DENY_INGRESS: u32 = 0x08;
pub const POLICY_F_HAS_DENY_EGRESS: u32 = 0x10;

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

/// `POLICY_VALUE_F_L4` in `policy_value.flags`: the entry names a protocol (reported as an
/// L4 match in events).
pub const POLICY_VALUE_F_L4: u8 = 0x01;

impl PolicyEntry {
    /// The map key: [`POLICY_STATIC_PREFIX`] bits, + 16 (protocol, pad) when a protocol is
    /// named, + the port prefix. Port bits outside the prefix are cleared; an entry for any
    /// protocol ignores `port`/`port_prefix`.
    pub fn to_key(&self) -> PolicyKey {
        let (prefix, protocol, port) = match self.protocol {
            PROTO_ANY => (POLICY_STATIC_PREFIX, 0, 0),
            proto => {
                let bits = self.port_prefix.min(16);
                (
                    POLICY_STATIC_PREFIX + 16 + u32::from(bits),
                    proto,
                    self.port & port_mask(bits),
                )
            }
        };
        PolicyKey {
            prefixlen: prefix,
            endpoint_id: self.endpoint_id,
            direction: self.direction as u8,
            pad0: 0,
            peer_identity: self.peer,
            protocol,
            pad1: 0,
            dport: port.to_be_bytes(),
        }
    }

    /// The entry a map key stands for; `None` for a key this build would not write.
    pub fn from_key(key: &PolicyKey) -> Option<Self> {
        let direction = Direction::from_raw(key.direction)?;
        let (protocol, port, port_prefix) = match key.prefixlen.checked_sub(POLICY_STATIC_PREFIX)? {
            0 => (PROTO_ANY, 0, 0),
            bits @ 16..=32 => (
                key.protocol,
                u16::from_be_bytes(key.dport),
                u8::try_from(bits - 16).ok()?,
            ),
            _ => return None,
        };
        Some(Self {
            endpoint_id: key.endpoint_id,
            direction,
            peer: key.peer_identity,
            protocol,
            port,
            port_prefix,
        })
    }
}

impl Verdict {
    /// The map value of an entry with this verdict.
    pub fn to_value(self, entry: &PolicyEntry) -> PolicyValue {
        PolicyValue {
            verdict: match self {
                Self::Allow => POLICY_VERDICT_ALLOW,
                Self::Deny => POLICY_VERDICT_DENY,
            },
            flags: if entry.protocol == PROTO_ANY {
                0
            } else {
                POLICY_VALUE_F_L4
            },
            pad: 0,
            rule_cookie: 0,
        }
    }

    pub fn from_value(value: &PolicyValue) -> Option<Self> {
        match value.verdict {
            POLICY_VERDICT_ALLOW => Some(Self::Allow),
            POLICY_VERDICT_DENY => Some(Self::Deny),
            _ => None,
        }
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

/// `POLICY_F_HAS_DENY_*` of the directions some of `entries` deny in (one endpoint's).
pub fn deny_flags<'a>(entries: impl IntoIterator<Item = (&'a PolicyEntry, &'a Verdict)>) -> u32 {
    entries
        .into_iter()
        .filter(|(_, v)| **v == Verdict::Deny)
        .fold(0, |flags, (k, _)| {
            flags
                | match k.direction {
                    Direction::Ingress => POLICY_F_HAS_DENY_INGRESS,
                    Direction::Egress => POLICY_F_HAS_DENY_EGRESS,
                }
        })
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

/// `EVENT_*` in `policy_event.type`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A packet was dropped (any reason; policy drops carry verdict and match).
    Drop = 1,
    /// The policy verdict of a new (or re-judged) connection that passed.
    PolicyVerdict = 2,
}

impl EventKind {
    pub const ALL: [Self; 2] = [Self::Drop, Self::PolicyVerdict];

    pub fn from_raw(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == code)
    }
}

/// `EVENT_VERDICT_*`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventVerdict {
    Allow = 1,
    Deny = 2,
    /// Denied by policy, passed because of audit mode.
    Audit = 3,
}

impl EventVerdict {
    pub const ALL: [Self; 3] = [Self::Allow, Self::Deny, Self::Audit];

    pub fn from_raw(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|v| *v as u8 == code)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

/// `EVENT_MATCH_*`: what decided the verdict.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PolicyMatch {
    /// The endpoint has no policy (or the event is not about policy).
    None = 0,
    /// A rule without ports.
    L3 = 1,
    /// A rule with protocol and ports.
    L4 = 2,
    /// No rule matched: the direction's default.
    Default = 3,
    /// An established connection re-judged after a policy revision change.
    Conntrack = 4,
}

impl PolicyMatch {
    pub const ALL: [Self; 5] = [
        Self::None,
        Self::L3,
        Self::L4,
        Self::Default,
        Self::Conntrack,
    ];

    /// An unknown code reads as `None`.
    pub fn from_raw(code: u8) -> Self {
        Self::ALL
            .into_iter()
            .find(|m| *m as u8 == code)
            .unwrap_or(Self::None)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::L3 => "l3",
            Self::L4 => "l4",
            Self::Default => "default",
            Self::Conntrack => "conntrack",
        }
    }
}

/// One record of the `events` ring buffer, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub kind: EventKind,
    /// The drop reason; for an audit verdict the reason audit mode waived; `None` for an
    /// allow (or a reason this build does not know).
    pub reason: Option<MetricReason>,
    pub raw_reason: u8,
    /// The enforcement direction (policy events) or the counting direction (other drops).
    pub direction: Option<Direction>,
    /// IP protocol number.
    pub protocol: u8,
    /// `None` for drops that are not about policy.
    pub verdict: Option<EventVerdict>,
    pub matched: PolicyMatch,
    /// The local endpoint judged (0 for drops that are not about policy).
    pub endpoint_id: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub saddr: IpAddr,
    pub daddr: IpAddr,
    /// Host order; the ICMP echo id for ICMP echo.
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    /// TCP: the flags byte of the packet's header ([`TCP_FIN`] ..); 0 otherwise.
    pub tcp_flags: u8,
    /// ICMP/ICMPv6: the packet's type and code; 0 otherwise.
    pub icmp_type: u8,
    pub icmp_code: u8,
}

/// The bits of [`PolicyEvent::tcp_flags`] (the TCP header's flags byte).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;
pub const TCP_ECE: u8 = 0x40;
pub const TCP_CWR: u8 = 0x80;

impl PolicyEvent {
    /// Size of one record (`sizeof(struct policy_event)`).
    pub const SIZE: usize = std::mem::size_of::<RawPolicyEvent>();

    /// Decodes a ring buffer record; `None` if it is too short or of an unknown type. A
    /// record of `struct policy_event6`'s length is about IPv6.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() >= std::mem::size_of::<RawPolicyEvent6>() {
            // SAFETY: RawPolicyEvent6 is plain `#[repr(C)]` integers (every bit pattern
            // valid) and `bytes` holds at least its size; read_unaligned copes with any
            // alignment.
            let raw: RawPolicyEvent6 =
                unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawPolicyEvent6>()) };
            let mut event = Self::from_raw(&raw.base)?;
            event.saddr = IpAddr::V6(Ipv6Addr::from(raw.saddr6));
            event.daddr = IpAddr::V6(Ipv6Addr::from(raw.daddr6));
            return Some(event);
        }
        if bytes.len() < Self::SIZE {
            return None;
        }
        // SAFETY: as above, for RawPolicyEvent.
        let raw: RawPolicyEvent =
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RawPolicyEvent>()) };
        Self::from_raw(&raw)
    }

    pub fn from_raw(raw: &RawPolicyEvent) -> Option<Self> {
        let kind = EventKind::from_raw(raw.kind)?;
        let verdict = EventVerdict::from_raw(raw.verdict);
        let matched = PolicyMatch::from_raw(raw.matched);
        Some(Self {
            ts_ns: raw.ts_ns,
            kind,
            reason: MetricReason::from_raw(raw.reason),
            raw_reason: raw.reason,
            direction: Direction::from_raw(raw.dir),
            protocol: raw.proto,
            verdict,
            matched,
            endpoint_id: raw.endpoint_id,
            src_identity: raw.src_identity,
            dst_identity: raw.dst_identity,
            saddr: IpAddr::V4(Ipv4Addr::from(raw.saddr)),
            daddr: IpAddr::V4(Ipv4Addr::from(raw.daddr)),
            sport: raw.sport,
            dport: raw.dport,
            ifindex: raw.ifindex,
            tcp_flags: raw.tcp_flags,
            icmp_type: raw.icmp_type,
            icmp_code: raw.icmp_code,
        })
    }
}

/// Conntrack timeouts applied by [`super::Dataplane::conntrack_gc`], on the time since an
/// entry was last seen.
pub const CT_TIMEOUT_TCP_ESTABLISHED_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_UNREPLIED_NS: u64 = 60 * 1_000_000_000;
pub const CT_TIMEOUT_OTHER_NS: u64 = 60 * 1_000_000_000;

/// How long an entry with these flags may stay idle.
pub fn ct_timeout_ns(proto: u8, flags: u8) -> u64 {
    use super::maps::{CT_F_CLOSING, CT_F_SEEN_REPLY};
    if proto != PROTO_TCP {
        CT_TIMEOUT_OTHER_NS
    } else if flags & CT_F_CLOSING != 0 {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else if flags & CT_F_SEEN_REPLY != 0 {
        CT_TIMEOUT_TCP_ESTABLISHED_NS
    } else {
        CT_TIMEOUT_TCP_UNREPLIED_NS
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, for
/// [`super::Dataplane::conntrack_gc`] and event timestamps.
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
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

    #[test]
    fn entries_round_trip_through_map_keys() {
        for e in [
            entry(300, PROTO_TCP, 80, 16),
            entry(300, PROTO_UDP, 64, 10),
            entry(0, PROTO_ANY, 0, 0),
            entry(1 << 24 | 3, PROTO_SCTP, 0, 0),
        ] {
            let key = e.to_key();
            assert_eq!(PolicyEntry::from_key(&key), Some(e));
        }
        let key = entry(300, PROTO_TCP, 80, 16).to_key();
        assert_eq!((key.prefixlen, key.protocol, key.dport), (96, 6, [0, 80]));
        let key = entry(300, PROTO_TCP, 0x1234, 8).to_key();
        assert_eq!(
            (key.prefixlen, key.dport),
            (88, [0x12, 0]),
            "host bits cleared"
        );
        assert_eq!(entry(300, PROTO_ANY, 80, 16).to_key().prefixlen, 64);
    }

    #[test]
    fn events_decode_from_their_bytes() {
        let raw = RawPolicyEvent {
            ts_ns: 42,
            kind: 1,
            reason: 139,
            dir: 1,
            proto: 6,
            verdict: 2,
            matched: 2,
            endpoint_id: 7,
            src_identity: 300,
            dst_identity: 256,
            saddr: [10, 0, 0, 1],
            daddr: [10, 0, 0, 2],
            sport: 40000,
            dport: 80,
            ifindex: 9,
            tcp_flags: TCP_SYN | TCP_ACK,
            ..RawPolicyEvent::default()
        };
        // SAFETY: reading the bytes of a plain repr(C) value without padding.
        let bytes: [u8; PolicyEvent::SIZE] = unsafe { std::mem::transmute(raw) };
        let ev = PolicyEvent::from_bytes(&bytes).unwrap();
        assert_eq!(ev.kind, EventKind::Drop);
        assert_eq!(ev.reason, Some(MetricReason::DropPolicyDeny));
        assert_eq!(ev.direction, Some(Direction::Ingress));
        assert_eq!(ev.verdict, Some(EventVerdict::Deny));
        assert_eq!(ev.matched, PolicyMatch::L4);
        assert_eq!(ev.saddr, IpAddr::from([10, 0, 0, 1]));
        assert_eq!((ev.sport, ev.dport, ev.endpoint_id), (40000, 80, 7));
        assert_eq!(ev.tcp_flags, 0x12);
        assert!(PolicyEvent::from_bytes(&bytes[..10]).is_none());
    }

    #[test]
    fn ipv6_events_decode_by_their_length() {
        let raw = RawPolicyEvent6 {
            base: RawPolicyEvent {
                kind: 1,
                reason: MetricReason::DropIpv6PolicyNotEnforced as u8,
                dir: 2,
                proto: 58,
                verdict: 2,
                icmp_type: 128,
                ..RawPolicyEvent::default()
            },
            saddr6: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
            daddr6: "fd00::3".parse::<Ipv6Addr>().unwrap().octets(),
        };
        // SAFETY: reading the bytes of a plain repr(C) value without padding.
        let bytes: [u8; std::mem::size_of::<RawPolicyEvent6>()] =
            unsafe { std::mem::transmute(raw) };
        let ev = PolicyEvent::from_bytes(&bytes).unwrap();
        assert_eq!(ev.reason, Some(MetricReason::DropIpv6PolicyNotEnforced));
        assert_eq!(ev.saddr, "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(ev.daddr, "fd00::3".parse::<IpAddr>().unwrap());
        assert_eq!((ev.icmp_type, ev.icmp_code), (128, 0));
        // The IPv4 length still decodes as IPv4.
        let v4 = PolicyEvent::from_bytes(&bytes[..PolicyEvent::SIZE]).unwrap();
        assert!(v4.saddr.is_ipv4());
    }

    #[test]
    fn conntrack_timeouts_follow_the_connection_state() {
        use crate::bpf::maps::{CT_F_CLOSING, CT_F_SEEN_REPLY};
        assert_eq!(
            ct_timeout_ns(PROTO_TCP, CT_F_SEEN_REPLY),
            6 * 3600 * 1_000_000_000
        );
        assert_eq!(
            ct_timeout_ns(PROTO_TCP, CT_F_SEEN_REPLY | CT_F_CLOSING),
            10_000_000_000
        );
        assert_eq!(ct_timeout_ns(PROTO_TCP, 0), 60_000_000_000);
        assert_eq!(ct_timeout_ns(PROTO_UDP, CT_F_SEEN_REPLY), 60_000_000_000);
    }
}
