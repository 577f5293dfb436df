//! The egress gateway maps of `bpf/lib/egress.h`: `egress_policy` (source pod + destination
//! prefix → gateway and egress IP, LPM), `egress_exempt` (prefixes never steered: the
//! cluster's own) and `egress_nat` (the gateway's SNAT table, filled by the programs).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::{
    Pod,
    maps::{LpmTrie, MapData},
};
use ipnet::{IpNet, Ipv4Net};

use super::{
    layout::{self, EgressKey, EgressPrefix, EgressValue, IpcacheKey, Lb4NatEntry, Lb4NatKey},
    pinned::{DataplaneError, MapKey, MapPressure, PinnedMap, show_key},
    report::Report,
};

impl MapKey for EgressKey {
    type Backend<V: Pod> = LpmTrie<MapData, EgressPrefix, V>;
    type Desired = (Ipv4Addr, Ipv4Net);

    fn from_desired((source, destination): (Ipv4Addr, Ipv4Net)) -> Self {
        Self::new(source, destination)
    }
}

impl fmt::Display for EgressKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_parts() {
            Some((source, destination)) => write!(f, "egress {source} -> {destination}"),
            None => show_key(f, None::<String>, self),
        }
    }
}

/// The egress maps.
pub struct EgressMaps {
    policy: PinnedMap<EgressKey, EgressValue>,
    exempt: PinnedMap<IpcacheKey, u32>,
    nat: PinnedMap<Lb4NatKey, Lb4NatEntry>,
}

impl fmt::Debug for EgressMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressMaps").finish_non_exhaustive()
    }
}

impl EgressMaps {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            policy: PinnedMap::open(dir, layout::EGRESS_POLICY)?,
            exempt: PinnedMap::open(dir, layout::EGRESS_EXEMPT)?,
            nat: PinnedMap::open(dir, layout::EGRESS_NAT)?,
        })
    }

    /// The converged maps read the kernel again at their next convergence.
    pub fn forget_known(&mut self) {
        self.policy.forget_known();
        self.exempt.forget_known();
    }

    /// Converges `egress_policy` (pruned only with `prune`).
    pub fn converge_policy(
        &mut self,
        desired: &BTreeMap<(Ipv4Addr, Ipv4Net), EgressValue>,
        prune: bool,
    ) -> Result<Report<EgressKey>, DataplaneError> {
        self.policy.converge(desired, prune)
    }

    /// Converges `egress_exempt`.
    pub fn converge_exempt(
        &mut self,
        desired: &BTreeMap<IpNet, u32>,
        prune: bool,
    ) -> Result<Report<IpcacheKey>, DataplaneError> {
        self.exempt.converge(desired, prune)
    }

    pub fn policy(&self) -> Result<BTreeMap<EgressKey, EgressValue>, DataplaneError> {
        self.policy.read()
    }

    /// The gateway's SNAT table: two entries per connection.
    pub fn nat(&self) -> Result<BTreeMap<Lb4NatKey, Lb4NatEntry>, DataplaneError> {
        self.nat.read()
    }

    /// Fill of the maps the agent writes.
    pub fn pressure(&self) -> [MapPressure; 2] {
        [self.policy.pressure(), self.exempt.pressure()]
    }

    /// Fill of `egress_nat`: a full table refuses new connections.
    pub fn nat_pressure(&self) -> MapPressure {
        self.nat.pressure()
    }

    /// Removes the connections of `egress_nat` idle for longer than their timeout at
    /// `now_s` (seconds of CLOCK_MONOTONIC, the programs' clock): both entries of a
    /// connection once neither was used within [`idle_timeout`]. Returns how many
    /// connections were removed.
    pub fn gc_nat(&mut self, now_s: u32) -> Result<usize, DataplaneError> {
        let stale = stale_nat_entries(&self.nat.read()?, now_s);
        let mut removed = 0;
        for key in &stale {
            if self.nat.delete(key)? && key.dir == layout::LB_NAT_FORWARD {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The entries of `entries` (an `egress_nat` snapshot) to remove at `now_s`: both entries
/// of each connection neither of whose directions was used within [`idle_timeout`], and
/// reply entries left without their forward entry once idle as long.
pub fn stale_nat_entries(entries: &BTreeMap<Lb4NatKey, Lb4NatEntry>, now_s: u32) -> Vec<Lb4NatKey> {
    let mut stale = Vec::new();
    for (key, entry) in entries {
        if key.dir != layout::LB_NAT_FORWARD {
            continue;
        }
        let peer = peer_key(entry, key.proto, layout::LB_NAT_REPLY);
        let peer_entry = entries.get(&peer);
        let last = peer_entry.map_or(entry.last_seen, |p| p.last_seen.max(entry.last_seen));
        let closing =
            (entry.flags | peer_entry.map_or(0, |p| p.flags)) & layout::LB_NAT_F_CLOSING != 0;
        if now_s.saturating_sub(last) >= idle_timeout(key.proto, closing) {
            stale.push(*key);
            if peer_entry.is_some() {
                stale.push(peer);
            }
        }
    }
    for (key, entry) in entries {
        if key.dir == layout::LB_NAT_REPLY
            && !entries.contains_key(&peer_key(entry, key.proto, layout::LB_NAT_FORWARD))
            && now_s.saturating_sub(entry.last_seen)
                >= idle_timeout(key.proto, entry.flags & layout::LB_NAT_F_CLOSING != 0)
        {
            stale.push(*key);
        }
    }
    stale
}

/// Idle seconds after which a connection's entries go (`lb4_nat_idle` in lib/lb_nat.h).
pub fn idle_timeout(proto: u8, closing: bool) -> u32 {
    const TCP: u8 = 6;
    match (proto, closing) {
        (TCP, true) => layout::LB_NAT_IDLE_CLOSED_S,
        (TCP, false) => layout::LB_NAT_IDLE_TCP_S,
        _ => layout::LB_NAT_IDLE_UDP_S,
    }
}

/// The key of the other direction's entry of the connection `entry` belongs to
/// (`lb4_nat_peer_key`): an entry says what its packets become, which is the tuple the
/// other side sends with, reversed.
fn peer_key(entry: &Lb4NatEntry, proto: u8, dir: u8) -> Lb4NatKey {
    Lb4NatKey {
        saddr: entry.daddr,
        daddr: entry.saddr,
        sport: entry.dport,
        dport: entry.sport,
        proto,
        dir,
        pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pod 10.200.0.5:40000 → 203.0.113.10:80 SNATed to 10.250.0.240:12345, both entries.
    fn connection(
        proto: u8,
        forward_seen: u32,
        reply_seen: u32,
        flags: u8,
    ) -> [(Lb4NatKey, Lb4NatEntry); 2] {
        let (pod, server, egress) = ([10, 200, 0, 5], [203, 0, 113, 10], [10, 250, 0, 240]);
        let (pod_port, server_port, snat_port) = (
            40000u16.to_be_bytes(),
            80u16.to_be_bytes(),
            12345u16.to_be_bytes(),
        );
        let forward = Lb4NatKey {
            saddr: pod,
            daddr: server,
            sport: pod_port,
            dport: server_port,
            proto,
            dir: layout::LB_NAT_FORWARD,
            pad: 0,
        };
        let to = Lb4NatEntry {
            saddr: egress,
            daddr: server,
            sport: snat_port,
            dport: server_port,
            flags,
            last_seen: forward_seen,
            ..Default::default()
        };
        let reply = Lb4NatKey {
            saddr: server,
            daddr: egress,
            sport: server_port,
            dport: snat_port,
            proto,
            dir: layout::LB_NAT_REPLY,
            pad: 0,
        };
        let back = Lb4NatEntry {
            saddr: server,
            daddr: pod,
            sport: server_port,
            dport: pod_port,
            flags,
            last_seen: reply_seen,
            ..Default::default()
        };
        [(forward, to), (reply, back)]
    }

    #[test]
    fn a_connection_goes_when_both_directions_are_idle() {
        let tcp_open: BTreeMap<_, _> = connection(6, 1000, 1000, 0).into_iter().collect();
        assert!(stale_nat_entries(&tcp_open, 1000 + 21_599).is_empty());
        assert_eq!(stale_nat_entries(&tcp_open, 1000 + 21_600).len(), 2);
        let closed: BTreeMap<_, _> = connection(6, 1000, 1000, layout::LB_NAT_F_CLOSING)
            .into_iter()
            .collect();
        assert!(stale_nat_entries(&closed, 1059).is_empty());
        assert_eq!(stale_nat_entries(&closed, 1060).len(), 2);
        // UDP whose answers still come: kept while either direction is used.
        let udp: BTreeMap<_, _> = connection(17, 1000, 1100, 0).into_iter().collect();
        assert!(stale_nat_entries(&udp, 1150).is_empty());
        assert_eq!(stale_nat_entries(&udp, 1160).len(), 2);
    }

    #[test]
    fn an_orphaned_reply_entry_goes_once_idle() {
        let [_, reply] = connection(17, 1000, 1000, 0);
        let orphan: BTreeMap<_, _> = [reply].into_iter().collect();
        assert!(stale_nat_entries(&orphan, 1030).is_empty());
        assert_eq!(stale_nat_entries(&orphan, 1060), vec![reply.0]);
    }
}
