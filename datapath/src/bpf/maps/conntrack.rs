//! `conntrack` and `conntrack6`: one entry per direction of a connection at an enforcement
//! point (LRU hash; IPv4 and IPv6 keys), written by the programs; the agent only reads them
//! and removes what is idle or orphaned.

use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::{Pod, maps::MapData};

use super::{
    endpoints::Endpoints,
    layout::{self, Ct6Key, CtKey, CtValue},
    pinned::{DataplaneError, MapKey, MapPressure, PinnedMap, is_not_found},
};
use crate::bpf::policy::ct_timeout_ns;

impl MapKey for CtKey {
    type Backend<V: Pod> = aya::maps::HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for CtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} {}:{} -> {}:{} dir {} endpoint {}",
            self.proto,
            Ipv4Addr::from(self.saddr),
            self.sport,
            Ipv4Addr::from(self.daddr),
            self.dport,
            self.dir,
            self.endpoint_id
        )
    }
}

impl MapKey for Ct6Key {
    type Backend<V: Pod> = aya::maps::HashMap<MapData, Self, V>;
    type Desired = Self;

    fn from_desired(key: Self) -> Self {
        key
    }
}

impl fmt::Display for Ct6Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto {} [{}]:{} -> [{}]:{} dir {} endpoint {}",
            self.proto,
            Ipv6Addr::from(self.saddr),
            self.sport,
            Ipv6Addr::from(self.daddr),
            self.dport,
            self.dir,
            self.endpoint_id
        )
    }
}

/// What garbage collection needs of a key of either family.
pub trait ConntrackKey: MapKey<Desired = Self> + Pod + fmt::Display {
    fn proto(&self) -> u8;
    fn endpoint_id(&self) -> u16;
}

impl ConntrackKey for CtKey {
    fn proto(&self) -> u8 {
        self.proto
    }
    fn endpoint_id(&self) -> u16 {
        self.endpoint_id
    }
}

impl ConntrackKey for Ct6Key {
    fn proto(&self) -> u8 {
        self.proto
    }
    fn endpoint_id(&self) -> u16 {
        self.endpoint_id
    }
}

/// The `conntrack` and `conntrack6` maps.
#[derive(Debug)]
pub struct Conntrack {
    v4: ConntrackTable<CtKey>,
    v6: ConntrackTable<Ct6Key>,
}

impl Conntrack {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            v4: ConntrackTable::open(dir, layout::CONNTRACK)?,
            v6: ConntrackTable::open(dir, layout::CONNTRACK6)?,
        })
    }

    /// Every IPv4 entry (for inspection and tests; the map may hold 256k entries).
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>, DataplaneError> {
        self.v4.entries()
    }

    /// Every IPv6 entry.
    pub fn entries6(&self) -> Result<Vec<(Ct6Key, CtValue)>, DataplaneError> {
        self.v6.entries()
    }

    /// Fill levels of both maps (see [`ConntrackTable::pressure`]).
    pub fn pressure(&self) -> [MapPressure; 2] {
        [self.v4.pressure(), self.v6.pressure()]
    }

    /// [`ConntrackTable::gc`] on both maps; how many entries were removed.
    pub fn gc(&mut self, now_ns: u64, endpoints: &Endpoints) -> Result<usize, DataplaneError> {
        Ok(self.v4.gc(now_ns, endpoints)? + self.v6.gc(now_ns, endpoints)?)
    }
}

/// One conntrack map.
#[derive(Debug)]
pub struct ConntrackTable<K: ConntrackKey> {
    map: PinnedMap<K, CtValue>,
    /// Entries left by the last [`Self::gc`] (counting an LRU of 256k entries on every
    /// pressure reading would hold the map lock too long).
    live_after_gc: Option<u32>,
}

impl<K: ConntrackKey> ConntrackTable<K> {
    fn open(dir: &Path, name: &'static str) -> Result<Self, DataplaneError> {
        Ok(Self {
            map: PinnedMap::open(dir, name)?,
            live_after_gc: None,
        })
    }

    fn entries(&self) -> Result<Vec<(K, CtValue)>, DataplaneError> {
        self.map.read_error(self.map.iter().collect())
    }

    /// Fill level, as counted by the last [`Self::gc`]; counted now if it never ran.
    pub fn pressure(&self) -> MapPressure {
        match self.live_after_gc {
            Some(entries) => MapPressure {
                map: self.map.name(),
                entries,
                max_entries: self.map.max_entries(),
            },
            None => self.map.pressure(),
        }
    }

    /// Removes the entries idle for longer than their timeout
    /// ([`crate::bpf::policy::ct_timeout_ns`]) at `now_ns` (CLOCK_MONOTONIC, as
    /// [`crate::bpf::policy::monotonic_now_ns`] reads it), and those of endpoints no longer
    /// in `endpoints`. Returns how many were removed.
    pub fn gc(&mut self, now_ns: u64, endpoints: &Endpoints) -> Result<usize, DataplaneError> {
        let mut expired = Vec::new();
        let mut live = Vec::new();
        for entry in self.map.iter() {
            let (key, value) = match entry {
                Ok(kv) => kv,
                // Evicted or deleted by the programs while iterating.
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return self.map.read_error(Err(e)),
            };
            let idle = now_ns.saturating_sub(value.last_seen_ns);
            if idle > ct_timeout_ns(key.proto(), value.flags) {
                expired.push(key);
            } else {
                live.push(key);
            }
        }
        // Read after the entries: an endpoint an entry was created for is in this view
        // unless it has been removed since.
        let endpoint_ids: BTreeSet<u16> = endpoints
            .read()?
            .values()
            .map(|info| info.endpoint_id)
            .collect();
        let (orphaned, live): (Vec<K>, Vec<K>) = live
            .into_iter()
            .partition(|key| !endpoint_ids.contains(&key.endpoint_id()));
        expired.extend(orphaned);
        let mut removed = 0;
        for key in &expired {
            if self.map.delete(key)? {
                removed += 1;
            }
        }
        self.live_after_gc = Some(u32::try_from(live.len()).unwrap_or(u32::MAX));
        Ok(removed)
    }
}
