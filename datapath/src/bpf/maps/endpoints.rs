//! `endpoints`: local pod IP → how to deliver to it (ifindex, MACs, identity, endpoint id).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use aya::{Pod, maps::MapData};

use super::{
    layout::{EndpointInfo, EndpointKey},
    pinned::{DataplaneError, MapKey, PinnedMap, show_key},
};

/// The `endpoints` map.
pub type Endpoints = PinnedMap<EndpointKey, EndpointInfo>;

impl MapKey for EndpointKey {
    type Backend<V: Pod> = aya::maps::HashMap<MapData, Self, V>;
    type Desired = IpAddr;

    fn from_desired(ip: IpAddr) -> Self {
        Self::new(ip)
    }
}

/// The pod IP (a malformed key as stored).
impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show_key(f, self.ip(), self)
    }
}

impl Endpoints {
    /// What the map holds, by pod IP.
    pub fn by_ip(&self) -> Result<BTreeMap<IpAddr, EndpointInfo>, DataplaneError> {
        Ok(self
            .read()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.ip()?, v)))
            .collect())
    }
}
