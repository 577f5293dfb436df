//! `metrics`: per-CPU packet and byte counters by reason and direction, written by the
//! programs and read by the agent.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuHashMap};

use super::{
    layout::{self, MetricsKey, MetricsValue},
    pinned::{DataplaneError, open_pin},
    reason::{Direction, MetricReason},
};

/// Counters of one reason and direction, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricSample {
    /// `None` for a reason this build does not know (a newer program).
    pub reason: Option<MetricReason>,
    pub raw_reason: u8,
    pub direction: Option<Direction>,
    pub packets: u64,
    pub bytes: u64,
}

/// The `metrics` map.
pub struct Metrics {
    map: PerCpuHashMap<MapData, MetricsKey, MetricsValue>,
}

impl Metrics {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let (data, _) = open_pin(dir, layout::METRICS)?;
        let map = PerCpuHashMap::try_from(Map::PerCpuHashMap(data)).map_err(|source| {
            DataplaneError::Open {
                path: dir.join(layout::METRICS),
                source,
            }
        })?;
        Ok(Self { map })
    }

    /// Per-reason, per-direction counters summed over CPUs.
    pub fn samples(&self) -> Result<Vec<MetricSample>, DataplaneError> {
        let mut samples = Vec::new();
        for entry in self.map.iter() {
            let (key, per_cpu) = entry.map_err(|source| DataplaneError::Read {
                map: layout::METRICS,
                source,
            })?;
            let (packets, bytes) = per_cpu.iter().fold((0u64, 0u64), |(p, b), v| {
                (p.wrapping_add(v.packets), b.wrapping_add(v.bytes))
            });
            samples.push(MetricSample {
                reason: MetricReason::from_raw(key.reason),
                raw_reason: key.reason,
                direction: Direction::from_raw(key.dir),
                packets,
                bytes,
            });
        }
        samples.sort_by_key(|s| (s.raw_reason, s.direction));
        Ok(samples)
    }

    /// Packets counted for one reason and direction (0 if never seen).
    pub fn packets(
        &self,
        reason: MetricReason,
        direction: Direction,
    ) -> Result<u64, DataplaneError> {
        Ok(self
            .samples()?
            .iter()
            .filter(|s| s.reason == Some(reason) && s.direction == Some(direction))
            .map(|s| s.packets)
            .sum())
    }
}
