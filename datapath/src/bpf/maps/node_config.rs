//! `node_config`: the single entry that tells the programs about their node (tunnel
//! device, node address, flags).

use std::path::Path;

use aya::maps::{Array, Map, MapData};

use super::{
    layout::{self, NodeConfig},
    pinned::{DataplaneError, open_pin},
    report::{MapWriteError, Op},
};

/// The `node_config` map.
pub struct NodeConfigMap {
    map: Array<MapData, NodeConfig>,
}

impl NodeConfigMap {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let (data, _) = open_pin(dir, layout::NODE_CONFIG)?;
        let map = Array::try_from(Map::Array(data)).map_err(|source| DataplaneError::Open {
            path: dir.join(layout::NODE_CONFIG),
            source,
        })?;
        Ok(Self { map })
    }

    pub fn get(&self) -> Result<NodeConfig, DataplaneError> {
        self.map.get(&0, 0).map_err(|source| DataplaneError::Read {
            map: layout::NODE_CONFIG,
            source,
        })
    }

    /// Writes the node's configuration (tunnel device, node address) if it differs.
    /// Returns whether it was written.
    pub fn set(&mut self, config: &NodeConfig) -> Result<bool, DataplaneError> {
        if self.get()? == *config {
            return Ok(false);
        }
        self.map
            .set(0, config, 0)
            .map_err(|e| MapWriteError::new(layout::NODE_CONFIG, Op::Update, 1, e))?;
        Ok(true)
    }
}
