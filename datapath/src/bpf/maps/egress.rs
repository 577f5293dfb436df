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

    /// Fill of `egress_nat` (counted: an LRU map, so full is not an error, but a full one
    /// evicts live connections).
    pub fn nat_pressure(&self) -> MapPressure {
        self.nat.pressure()
    }
}
