//! `node_config`: the single entry that tells the programs about their node (tunnel
//! device, node address, flags); and `node_config6`, the node's IPv6 address (a map of its
//! own, so `node_config` keeps the shape earlier agents pinned).

use std::path::Path;

use aya::maps::{Array, Map, MapData};

use super::{
    layout::{self, NodeConfig, NodeConfig6},
    pinned::{DataplaneError, open_pin},
    report::{MapWriteError, Op},
};

/// The `node_config` and `node_config6` maps.
pub struct NodeConfigMap {
    map: Array<MapData, NodeConfig>,
    map6: Array<MapData, NodeConfig6>,
}

fn open_array<T: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<Array<MapData, T>, DataplaneError> {
    let (data, _) = open_pin(dir, name)?;
    Array::try_from(Map::Array(data)).map_err(|source| DataplaneError::Open {
        path: dir.join(name),
        source,
    })
}

impl NodeConfigMap {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            map: open_array(dir, layout::NODE_CONFIG)?,
            map6: open_array(dir, layout::NODE_CONFIG6)?,
        })
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

impl NodeConfigMap {
    pub fn get6(&self) -> Result<NodeConfig6, DataplaneError> {
        self.map6.get(&0, 0).map_err(|source| DataplaneError::Read {
            map: layout::NODE_CONFIG6,
            source,
        })
    }

    /// Writes the node's IPv6 address if it differs. Returns whether it was written.
    pub fn set6(&mut self, config: &NodeConfig6) -> Result<bool, DataplaneError> {
        if self.get6()? == *config {
            return Ok(false);
        }
        self.map6
            .set(0, config, 0)
            .map_err(|e| MapWriteError::new(layout::NODE_CONFIG6, Op::Update, 1, e))?;
        Ok(true)
    }
}
