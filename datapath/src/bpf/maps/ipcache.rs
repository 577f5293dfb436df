//! `ipcache`: IP prefix → security identity and tunnel endpoint (LPM trie). Its key type
//! also keys `policy_cidrs`.

use std::{collections::BTreeMap, fmt};

use aya::{
    Pod,
    maps::{LpmTrie, MapData},
};
use ipnet::IpNet;

use super::{
    layout::{IpcacheKey, IpcachePrefix, IpcacheValue},
    pinned::{DataplaneError, MapKey, PinnedMap, show_key},
};

/// The `ipcache` map.
pub type Ipcache = PinnedMap<IpcacheKey, IpcacheValue>;

impl MapKey for IpcacheKey {
    type Backend<V: Pod> = LpmTrie<MapData, IpcachePrefix, V>;
    type Desired = IpNet;

    fn from_desired(net: IpNet) -> Self {
        Self::from_net(&net)
    }
}

/// The prefix (a malformed key as stored).
impl fmt::Display for IpcacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        show_key(f, self.to_net(), self)
    }
}

impl Ipcache {
    /// What the ipcache holds, by prefix.
    pub fn by_prefix(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, DataplaneError> {
        Ok(self
            .read()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_net()?, v)))
            .collect())
    }
}
