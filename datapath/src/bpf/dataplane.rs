//! [`Dataplane`]: the pinned maps of one node, one typed field per map. Each map converges
//! itself (`dp.endpoints.converge(..)`, `dp.policy.converge_with_cidrs(..)`); what spans
//! maps is here: opening them all, their fill levels, conntrack GC (which reads
//! `endpoints`) and the `events` ring buffer.

use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, RingBuf};

use super::maps::{
    self, Conntrack, DataplaneError, EgressMaps, Endpoints, Ipcache, LbMaps, MapPressure, Metrics,
    NodeConfigMap, PinnedMap, PolicyMaps, open_pin,
};

/// The pinned maps of one node, typed.
pub struct Dataplane {
    dir: PathBuf,
    pub endpoints: Endpoints,
    pub ipcache: Ipcache,
    pub policy: PolicyMaps,
    pub node_config: NodeConfigMap,
    pub metrics: Metrics,
    pub conntrack: Conntrack,
    /// The services maps (`lb_*`).
    pub lb: LbMaps,
    /// The egress gateway maps (`egress_*`).
    pub egress: EgressMaps,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Opens the maps pinned in a node's directory (created by
    /// [`super::Programs::load`]).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            dir: dir.to_path_buf(),
            endpoints: PinnedMap::open(dir, maps::ENDPOINTS)?,
            ipcache: PinnedMap::open(dir, maps::IPCACHE)?,
            policy: PolicyMaps::open(dir)?,
            node_config: NodeConfigMap::open(dir)?,
            metrics: Metrics::open(dir)?,
            conntrack: Conntrack::open(dir)?,
            lb: LbMaps::open(dir)?,
            egress: EgressMaps::open(dir)?,
        })
    }

    /// The maps the passes converge read the kernel again at their next convergence
    /// (each otherwise diffs against what it wrote; see [`PinnedMap::known`]). The policy
    /// maps keep their own schedule ([`PolicyMaps::forget_known`]).
    pub fn forget_known(&mut self) {
        self.endpoints.forget_known();
        self.ipcache.forget_known();
        self.lb.forget_known();
        self.egress.forget_known();
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Fill level of the maps the agent writes, and of `conntrack` (as counted by the last
    /// [`Self::conntrack_gc`]; counted now if it never ran).
    pub fn pressure(&self) -> Result<Vec<MapPressure>, DataplaneError> {
        let mut pressure = vec![self.endpoints.pressure(), self.ipcache.pressure()];
        pressure.extend(self.policy.pressure());
        pressure.extend(self.conntrack.pressure());
        pressure.extend(self.lb.pressure());
        pressure.extend(self.egress.pressure());
        // The gateway's SNAT table: its occupancy is what port exhaustion shows as.
        pressure.push(self.egress.nat_pressure());
        Ok(pressure)
    }

    /// Removes the conntrack entries idle for longer than their timeout and those of
    /// endpoints no longer in the endpoints map (see [`Conntrack::gc`]). Returns how many
    /// were removed.
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<usize, DataplaneError> {
        self.conntrack.gc(now_ns, &self.endpoints)
    }

    /// The `events` ring buffer (policy verdicts and drops; decode each record with
    /// [`super::policy::PolicyEvent::from_bytes`]). One consumer at a time.
    pub fn open_events(&self) -> Result<RingBuf<MapData>, DataplaneError> {
        let (data, _) = open_pin(&self.dir, maps::EVENTS)?;
        RingBuf::try_from(Map::RingBuf(data)).map_err(|source| DataplaneError::Open {
            path: self.dir.join(maps::EVENTS),
            source,
        })
    }
}
