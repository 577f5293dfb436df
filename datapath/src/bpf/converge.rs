//! Convergence of desired state into the pinned maps, by diff: read what the
//! map holds, apply only the difference, delete what is stale — and delete
//! only when the caller says its view is complete (`prune`), so a restarting
//! agent never wipes valid state. Every entry that cannot be written is
//! reported with a typed error; a full map is [`MapWriteError::Full`], never
//! a silent drop.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, RingBuf};
use ipnet::IpNet;

use super::maps::{
    self, CtKey, CtValue, EndpointInfo, EndpointKey, IpcacheKey, IpcachePrefix, IpcacheValue,
    MetricReason, MetricsKey, MetricsValue, NodeConfig, PolicyCidrValue, PolicyKey, PolicyPrefix,
    PolicyValue,
};
use super::policy::{PolicyEntry, PolicyState, Verdict, ct_timeout_ns};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening pinned map {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("reading map {map}: {source}")]
    Read { map: &'static str, source: MapError },
    #[error(transparent)]
    Write(#[from] MapWriteError),
}

/// Why one entry could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MapWriteError {
    #[error("map {map} is full ({max_entries} entries)")]
    Full { map: &'static str, max_entries: u32 },
    #[error("{op} on map {map}: {source}")]
    Kernel {
        map: &'static str,
        op: Op,
        source: MapError,
    },
}

impl MapWriteError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Full { .. } => "full",
            Self::Kernel { .. } => "error",
        }
    }
}

/// A map operation, as labelled in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Add,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry that did not converge.
#[derive(Debug)]
pub struct ConvergeFailure {
    /// The entry's key, printed (an IP or a prefix).
    pub key: String,
    pub op: Op,
    pub error: MapWriteError,
}

/// What one convergence did to one map.
#[derive(Debug, Default)]
pub struct ConvergeReport {
    pub added: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Stale entries left in place because `prune` was false.
    pub stale_kept: usize,
    pub failed: Vec<ConvergeFailure>,
}

impl ConvergeReport {
    /// Whether the map now holds exactly what was asked (modulo stale entries
    /// kept on purpose).
    pub fn is_converged(&self) -> bool {
        self.failed.is_empty()
    }

    /// Whether some entry failed because the map is full.
    pub fn map_full(&self) -> bool {
        self.failed
            .iter()
            .any(|f| matches!(f.error, MapWriteError::Full { .. }))
    }
}

/// The difference between what a map holds and what it should hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Diff<K> {
    pub add: Vec<K>,
    pub update: Vec<K>,
    pub stale: Vec<K>,
    pub unchanged: usize,
}

/// Pure diff of two keyed states.
pub fn diff<K: Ord + Clone, V: PartialEq>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Diff<K> {
    let mut out = Diff {
        add: Vec::new(),
        update: Vec::new(),
        stale: Vec::new(),
        unchanged: 0,
    };
    for (key, value) in desired {
        match current.get(key) {
            None => out.add.push(key.clone()),
            Some(held) if held != value => out.update.push(key.clone()),
            Some(_) => out.unchanged += 1,
        }
    }
    out.stale = current
        .keys()
        .filter(|key| !desired.contains_key(key))
        .cloned()
        .collect();
    out
}

/// Entries held in a map vs capacity, for the map pressure metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapPressure {
    pub map: &'static str,
    pub entries: u32,
    pub max_entries: u32,
}

impl MapPressure {
    pub fn ratio(&self) -> f64 {
        f64::from(self.entries) / f64::from(self.max_entries.max(1))
    }
}

/// Counters of one reason and direction, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricSample {
    /// `None` for a reason this build does not know (a newer program).
    pub reason: Option<MetricReason>,
    pub raw_reason: u8,
    pub direction: Option<maps::Direction>,
    pub packets: u64,
    pub bytes: u64,
}

/// A policy convergence, read and diffed, not yet applied.
struct PolicyPlan {
    desired: BTreeMap<PolicyKey, PolicyValue>,
    writes: Vec<(PolicyKey, Op)>,
    deletes: Vec<PolicyKey>,
    /// The states wanted, and those held before the convergence.
    states: BTreeMap<u16, PolicyState>,
    current_states: BTreeMap<u16, PolicyState>,
    stale_states: Vec<u16>,
    /// Endpoints some entry of which failed to write: their revision stays.
    incomplete: BTreeSet<u16>,
    /// Some prefix failed to write: no revision changes.
    cidrs_incomplete: bool,
    /// Endpoints whose interim state was written (and counted).
    interim_written: BTreeSet<u16>,
    prune: bool,
    report: ConvergeReport,
}

/// One step of a policy convergence, in [`policy_steps`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStep {
    UpsertEntries,
    UpsertCidrs,
    InterimStates,
    DeleteEntries,
    DeleteCidrs,
    FinalStates,
    DeleteStates,
    /// Without `prune`: count what steps 4, 5 and 7 would delete as `stale_kept`.
    KeepStale,
}

/// The order of [`Dataplane::converge_policy_with_cidrs`].
pub fn policy_steps(prune: bool) -> Vec<PolicyStep> {
    use PolicyStep::*;
    if prune {
        vec![
            UpsertEntries,
            UpsertCidrs,
            InterimStates,
            DeleteEntries,
            DeleteCidrs,
            FinalStates,
            DeleteStates,
        ]
    } else {
        vec![
            UpsertEntries,
            UpsertCidrs,
            InterimStates,
            FinalStates,
            KeepStale,
        ]
    }
}

/// The states written while stale entries are still in: each endpoint's new default-deny
/// flags under the revision its connections were judged under — its current one, or 0 (what
/// conntrack stamps while an endpoint has no state) for an endpoint without a state. Only
/// what differs from `current` is written.
pub fn interim_state_writes(
    current: &BTreeMap<u16, PolicyState>,
    wanted: &BTreeMap<u16, PolicyState>,
) -> Vec<(u16, Op, PolicyState)> {
    wanted
        .iter()
        .filter_map(|(id, state)| {
            let held = current.get(id);
            let interim = PolicyState {
                revision: held.map_or(0, |h| h.revision),
                flags: state.flags,
            };
            match held {
                Some(h) if *h == interim => None,
                Some(_) => Some((*id, Op::Update, interim)),
                None => Some((*id, Op::Add, interim)),
            }
        })
        .collect()
}

struct CidrPlan {
    desired: BTreeMap<IpcacheKey, PolicyCidrValue>,
    diff: Diff<IpcacheKey>,
    report: ConvergeReport,
}

fn show_policy_key(key: &PolicyKey) -> String {
    match PolicyEntry::from_key(key) {
        Some(e) => format!("{e:?}"),
        None => format!("{key:?}"),
    }
}

fn show_net_key(key: &IpcacheKey) -> String {
    key.to_net()
        .map_or_else(|| format!("{key:?}"), |net| net.to_string())
}

/// The pinned maps of one node, typed.
pub struct Dataplane {
    dir: PathBuf,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    endpoints_max: u32,
    ipcache: LpmTrie<MapData, IpcachePrefix, IpcacheValue>,
    ipcache_max: u32,
    metrics: PerCpuHashMap<MapData, MetricsKey, MetricsValue>,
    node_config: Array<MapData, NodeConfig>,
    policy: LpmTrie<MapData, PolicyPrefix, PolicyValue>,
    policy_max: u32,
    policy_state: HashMap<MapData, u16, PolicyState>,
    policy_state_max: u32,
    policy_cidrs: LpmTrie<MapData, IpcachePrefix, PolicyCidrValue>,
    policy_cidrs_max: u32,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    conntrack_max: u32,
    /// Entries left by the last [`Dataplane::conntrack_gc`] (counting an LRU of 256k
    /// entries on every pressure reading would hold the map lock too long).
    conntrack_entries: Option<u32>,
}

impl fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataplane")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn open_pin(dir: &Path, name: &str) -> Result<(MapData, u32), DataplaneError> {
    let path = dir.join(name);
    let open_err = |source| DataplaneError::Open {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    let max_entries = data.info().map_err(open_err)?.max_entries();
    Ok((data, max_entries))
}

/// Every entry `entries` yields, keys converted by `key`, or the read error naming `map`.
fn read_all<K, K2, V, C: FromIterator<(K2, V)>>(
    map: &'static str,
    entries: impl Iterator<Item = Result<(K, V), MapError>>,
    key: impl Fn(K) -> K2,
) -> Result<C, DataplaneError> {
    entries
        .map(|entry| entry.map(|(k, v)| (key(k), v)))
        .collect::<Result<_, _>>()
        .map_err(|source| DataplaneError::Read { map, source })
}

fn write_error(map: &'static str, op: Op, max_entries: u32, source: MapError) -> MapWriteError {
    if let MapError::SyscallError(e) = &source {
        // Hash maps answer E2BIG when full, LPM tries ENOSPC.
        if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
            return MapWriteError::Full { map, max_entries };
        }
    }
    MapWriteError::Kernel { map, op, source }
}

fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Applies a diff through `write`/`delete`: stale entries first (when
/// pruning) so their slots are free for the additions.
fn apply<K: Copy>(
    diff: Diff<K>,
    prune: bool,
    show: impl Fn(&K) -> String,
    mut write: impl FnMut(&K, Op) -> Result<(), MapWriteError>,
    mut delete: impl FnMut(&K) -> Result<(), MapWriteError>,
) -> ConvergeReport {
    let mut report = ConvergeReport {
        unchanged: diff.unchanged,
        ..ConvergeReport::default()
    };
    if prune {
        for key in &diff.stale {
            match delete(key) {
                Ok(()) => report.deleted += 1,
                Err(error) => report.failed.push(ConvergeFailure {
                    key: show(key),
                    op: Op::Delete,
                    error,
                }),
            }
        }
    } else {
        report.stale_kept = diff.stale.len();
    }
    for (keys, op) in [(&diff.update, Op::Update), (&diff.add, Op::Add)] {
        for key in keys {
            match write(key, op) {
                Ok(()) if op == Op::Add => report.added += 1,
                Ok(()) => report.updated += 1,
                Err(error) => report.failed.push(ConvergeFailure {
                    key: show(key),
                    op,
                    error,
                }),
            }
        }
    }
    report
}

/// Writes the additions and updates of `diff` into `report`.
fn upsert<K: Copy>(
    report: &mut ConvergeReport,
    diff: &Diff<K>,
    show: impl Fn(&K) -> String,
    write: impl FnMut(&K, Op) -> Result<(), MapWriteError>,
) {
    let writes = diff
        .update
        .iter()
        .map(|k| (*k, Op::Update))
        .chain(diff.add.iter().map(|k| (*k, Op::Add)));
    upsert_in_order(report, writes, show, write);
}

fn upsert_in_order<K>(
    report: &mut ConvergeReport,
    writes: impl IntoIterator<Item = (K, Op)>,
    show: impl Fn(&K) -> String,
    mut write: impl FnMut(&K, Op) -> Result<(), MapWriteError>,
) {
    for (key, op) in writes {
        match write(&key, op) {
            Ok(()) if op == Op::Add => report.added += 1,
            Ok(()) => report.updated += 1,
            Err(error) => report.failed.push(ConvergeFailure {
                key: show(&key),
                op,
                error,
            }),
        }
    }
}

/// The order of the policy map's writes and deletions: entries that deny go in before
/// those that allow, and go out after them, so no single write opens something that a deny
/// closes in both the old and the new policy (e.g. a new "allow any peer" next to a new
/// "deny peer P").
pub fn policy_write_order(
    diff: &Diff<PolicyKey>,
    current: &BTreeMap<PolicyKey, PolicyValue>,
    desired: &BTreeMap<PolicyKey, PolicyValue>,
) -> (Vec<(PolicyKey, Op)>, Vec<PolicyKey>) {
    let denies =
        |value: Option<&PolicyValue>| value.is_some_and(|v| v.verdict == maps::POLICY_VERDICT_DENY);
    let mut writes: Vec<(PolicyKey, Op)> = diff
        .update
        .iter()
        .map(|k| (*k, Op::Update))
        .chain(diff.add.iter().map(|k| (*k, Op::Add)))
        .collect();
    writes.sort_by_key(|(k, _)| !denies(desired.get(k)));
    let mut deletes = diff.stale.clone();
    deletes.sort_by_key(|k| denies(current.get(k)));
    (writes, deletes)
}

fn delete_all<K>(
    report: &mut ConvergeReport,
    keys: &[K],
    show: impl Fn(&K) -> String,
    mut delete: impl FnMut(&K) -> Result<(), MapWriteError>,
) {
    for key in keys {
        match delete(key) {
            Ok(()) => report.deleted += 1,
            Err(error) => report.failed.push(ConvergeFailure {
                key: show(key),
                op: Op::Delete,
                error,
            }),
        }
    }
}

impl Dataplane {
    /// Opens the maps pinned in a node's directory (created by
    /// [`super::Programs::load`]).
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        let (endpoints, endpoints_max) = open_pin(dir, maps::ENDPOINTS)?;
        let (ipcache, ipcache_max) = open_pin(dir, maps::IPCACHE)?;
        let (metrics, _) = open_pin(dir, maps::METRICS)?;
        let (node_config, _) = open_pin(dir, maps::NODE_CONFIG)?;
        let (policy, policy_max) = open_pin(dir, maps::POLICY)?;
        let (policy_state, policy_state_max) = open_pin(dir, maps::POLICY_STATE)?;
        let (policy_cidrs, policy_cidrs_max) = open_pin(dir, maps::POLICY_CIDRS)?;
        let (conntrack, conntrack_max) = open_pin(dir, maps::CONNTRACK)?;
        let typed = |name: &str, source| DataplaneError::Open {
            path: dir.join(name),
            source,
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            endpoints: HashMap::try_from(Map::HashMap(endpoints))
                .map_err(|e| typed(maps::ENDPOINTS, e))?,
            endpoints_max,
            ipcache: LpmTrie::try_from(Map::LpmTrie(ipcache))
                .map_err(|e| typed(maps::IPCACHE, e))?,
            ipcache_max,
            metrics: PerCpuHashMap::try_from(Map::PerCpuHashMap(metrics))
                .map_err(|e| typed(maps::METRICS, e))?,
            node_config: Array::try_from(Map::Array(node_config))
                .map_err(|e| typed(maps::NODE_CONFIG, e))?,
            policy: LpmTrie::try_from(Map::LpmTrie(policy)).map_err(|e| typed(maps::POLICY, e))?,
            policy_max,
            policy_state: HashMap::try_from(Map::HashMap(policy_state))
                .map_err(|e| typed(maps::POLICY_STATE, e))?,
            policy_state_max,
            policy_cidrs: LpmTrie::try_from(Map::LpmTrie(policy_cidrs))
                .map_err(|e| typed(maps::POLICY_CIDRS, e))?,
            policy_cidrs_max,
            conntrack: HashMap::try_from(Map::LruHashMap(conntrack))
                .map_err(|e| typed(maps::CONNTRACK, e))?,
            conntrack_max,
            conntrack_entries: None,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    fn endpoints_raw(&self) -> Result<BTreeMap<EndpointKey, EndpointInfo>, DataplaneError> {
        read_all(maps::ENDPOINTS, self.endpoints.iter(), |k| k)
    }

    fn ipcache_raw(&self) -> Result<BTreeMap<IpcacheKey, IpcacheValue>, DataplaneError> {
        read_all(maps::IPCACHE, self.ipcache.iter(), |k| {
            IpcacheKey::from_lpm(&k)
        })
    }

    /// What the endpoints map holds, by pod IP.
    pub fn endpoints(&self) -> Result<BTreeMap<IpAddr, EndpointInfo>, DataplaneError> {
        Ok(self
            .endpoints_raw()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.ip()?, v)))
            .collect())
    }

    /// What the ipcache holds, by prefix.
    pub fn ipcache(&self) -> Result<BTreeMap<IpNet, IpcacheValue>, DataplaneError> {
        Ok(self
            .ipcache_raw()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_net()?, v)))
            .collect())
    }

    /// Converges the endpoints map to `desired`. Stale entries are deleted
    /// only when `prune` is set (the caller's caches are complete).
    pub fn converge_endpoints(
        &mut self,
        desired: &BTreeMap<IpAddr, EndpointInfo>,
        prune: bool,
    ) -> Result<ConvergeReport, DataplaneError> {
        let desired: BTreeMap<EndpointKey, EndpointInfo> = desired
            .iter()
            .map(|(ip, info)| (EndpointKey::new(*ip), *info))
            .collect();
        let current = self.endpoints_raw()?;
        let max = self.endpoints_max;
        let map = &mut self.endpoints;
        let map_cell = std::cell::RefCell::new(map);
        Ok(apply(
            diff(&current, &desired),
            prune,
            |key| {
                key.ip()
                    .map_or_else(|| format!("{key:?}"), |ip| ip.to_string())
            },
            |key, op| {
                map_cell
                    .borrow_mut()
                    .insert(key, desired[key], 0)
                    .map_err(|e| write_error(maps::ENDPOINTS, op, max, e))
            },
            |key| match map_cell.borrow_mut().remove(key) {
                Err(e) if !is_not_found(&e) => {
                    Err(write_error(maps::ENDPOINTS, Op::Delete, max, e))
                }
                _ => Ok(()),
            },
        ))
    }

    /// Converges the ipcache to `desired` (prefixes → identity, tunnel
    /// endpoint). Stale prefixes are deleted only when `prune` is set.
    pub fn converge_ipcache(
        &mut self,
        desired: &BTreeMap<IpNet, IpcacheValue>,
        prune: bool,
    ) -> Result<ConvergeReport, DataplaneError> {
        let desired: BTreeMap<IpcacheKey, IpcacheValue> = desired
            .iter()
            .map(|(net, value)| (IpcacheKey::from_net(net), *value))
            .collect();
        let current = self.ipcache_raw()?;
        let max = self.ipcache_max;
        let map_cell = std::cell::RefCell::new(&mut self.ipcache);
        Ok(apply(
            diff(&current, &desired),
            prune,
            |key| {
                key.to_net()
                    .map_or_else(|| format!("{key:?}"), |net| net.to_string())
            },
            |key, op| {
                map_cell
                    .borrow_mut()
                    .insert(&key.to_lpm(), desired[key], 0)
                    .map_err(|e| write_error(maps::IPCACHE, op, max, e))
            },
            |key| match map_cell.borrow_mut().remove(&key.to_lpm()) {
                Err(e) if !is_not_found(&e) => Err(write_error(maps::IPCACHE, Op::Delete, max, e)),
                _ => Ok(()),
            },
        ))
    }

    pub fn node_config(&self) -> Result<NodeConfig, DataplaneError> {
        self.node_config
            .get(&0, 0)
            .map_err(|source| DataplaneError::Read {
                map: maps::NODE_CONFIG,
                source,
            })
    }

    /// Writes the node's configuration (tunnel device, node address) if it differs.
    pub fn set_node_config(&mut self, config: &NodeConfig) -> Result<bool, DataplaneError> {
        if self.node_config()? == *config {
            return Ok(false);
        }
        self.node_config
            .set(0, config, 0)
            .map_err(|e| write_error(maps::NODE_CONFIG, Op::Update, 1, e))?;
        Ok(true)
    }

    /// Per-reason, per-direction counters summed over CPUs.
    pub fn metrics(&self) -> Result<Vec<MetricSample>, DataplaneError> {
        let mut samples = Vec::new();
        for entry in self.metrics.iter() {
            let (key, per_cpu) = entry.map_err(|source| DataplaneError::Read {
                map: maps::METRICS,
                source,
            })?;
            let (packets, bytes) = per_cpu.iter().fold((0u64, 0u64), |(p, b), v| {
                (p.wrapping_add(v.packets), b.wrapping_add(v.bytes))
            });
            samples.push(MetricSample {
                reason: MetricReason::from_raw(key.reason),
                raw_reason: key.reason,
                direction: maps::Direction::from_raw(key.dir),
                packets,
                bytes,
            });
        }
        samples.sort_by_key(|s| (s.raw_reason, s.direction));
        Ok(samples)
    }

    /// Packets counted for one reason and direction (0 if never seen).
    pub fn metric_packets(
        &self,
        reason: MetricReason,
        direction: maps::Direction,
    ) -> Result<u64, DataplaneError> {
        Ok(self
            .metrics()?
            .iter()
            .filter(|s| s.reason == Some(reason) && s.direction == Some(direction))
            .map(|s| s.packets)
            .sum())
    }

    /// Fill level of the maps the agent writes, and of `conntrack` (as counted by the last
    /// [`Self::conntrack_gc`]; counted now if it never ran).
    pub fn pressure(&self) -> Result<Vec<MapPressure>, DataplaneError> {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let conntrack = match self.conntrack_entries {
            Some(n) => n,
            None => count(self.conntrack.keys().filter(Result::is_ok).count()),
        };
        Ok(vec![
            MapPressure {
                map: maps::ENDPOINTS,
                entries: count(self.endpoints.keys().filter(Result::is_ok).count()),
                max_entries: self.endpoints_max,
            },
            MapPressure {
                map: maps::IPCACHE,
                entries: count(self.ipcache.keys().filter(Result::is_ok).count()),
                max_entries: self.ipcache_max,
            },
            MapPressure {
                map: maps::POLICY,
                entries: count(self.policy.keys().filter(Result::is_ok).count()),
                max_entries: self.policy_max,
            },
            MapPressure {
                map: maps::POLICY_STATE,
                entries: count(self.policy_state.keys().filter(Result::is_ok).count()),
                max_entries: self.policy_state_max,
            },
            MapPressure {
                map: maps::POLICY_CIDRS,
                entries: count(self.policy_cidrs.keys().filter(Result::is_ok).count()),
                max_entries: self.policy_cidrs_max,
            },
            MapPressure {
                map: maps::CONNTRACK,
                entries: conntrack,
                max_entries: self.conntrack_max,
            },
        ])
    }

    fn policy_raw(&self) -> Result<BTreeMap<PolicyKey, PolicyValue>, DataplaneError> {
        read_all(maps::POLICY, self.policy.iter(), |k| {
            PolicyKey::from_lpm(&k)
        })
    }

    /// What the policy map holds. Keys this build would not write are left out.
    pub fn policy(&self) -> Result<BTreeMap<PolicyEntry, Verdict>, DataplaneError> {
        Ok(self
            .policy_raw()?
            .iter()
            .filter_map(|(k, v)| Some((PolicyEntry::from_key(k)?, Verdict::from_value(v)?)))
            .collect())
    }

    /// What the policy_state map holds, by endpoint id.
    pub fn policy_states(&self) -> Result<BTreeMap<u16, PolicyState>, DataplaneError> {
        read_all(maps::POLICY_STATE, self.policy_state.iter(), |k| k)
    }

    /// Converges the policy of every local endpoint (`policy` and `policy_state`; `policy_cidrs`
    /// untouched). The order is that of [`Self::converge_policy_with_cidrs`].
    pub fn converge_policy(
        &mut self,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
    ) -> Result<ConvergeReport, DataplaneError> {
        let (_, policy) = self.converge_ordered(None, entries, states, prune)?;
        Ok(policy)
    }

    /// Converges `policy`, `policy_cidrs` and `policy_state` in the one order that keeps a
    /// packet judged by the old policy, the new one or (a new connection, briefly) their
    /// union, and re-judges established connections only against the complete new policy:
    /// 1. upsert new and changed entries, denies first (each LPM entry is replaced
    ///    atomically; entries of a new CIDR id are inert, no prefix maps to it yet);
    /// 2. upsert new and changed prefixes (an address moving to a new, longer prefix finds
    ///    that prefix's entries already there);
    /// 3. interim states: the new default-deny flags under the OLD revision, so no
    ///    established connection is re-judged while stale entries are still in. An endpoint
    ///    without a state gets revision 0 — the revision conntrack stamps while an endpoint
    ///    has no state, so its connections (if any) are not re-judged yet either;
    /// 4. delete stale entries, denies last (only if `prune`);
    /// 5. delete stale prefixes (only if `prune`): a removed deny's prefix goes only after
    ///    the deny itself;
    /// 6. final states: the revisions change and conntrack re-judges established
    ///    connections against exactly the new entries;
    /// 7. delete the states of endpoints absent from `states` (only if `prune`).
    ///
    /// Without `prune`, 4, 5 and 7 are skipped and what they would delete is reported as
    /// `stale_kept`; then 6 skips the endpoints with stale entries kept (all of them while a
    /// stale prefix is kept): their revision changes in the next pruning call. `entries` are stored as given: run [`super::policy::propagate_denies`]
    /// first. Failures (e.g. a full map) are reported per entry and the later steps still
    /// run (stale deletions free room for the next pass), except that the revision of an
    /// endpoint is not bumped (6) while one of its entries failed to write, nor any
    /// revision while a prefix failed to write: its established connections would be
    /// re-judged against an incomplete policy. Returns the reports of (`policy_cidrs`,
    /// `policy` + `policy_state`).
    pub fn converge_policy_with_cidrs(
        &mut self,
        cidrs: &BTreeMap<IpNet, u32>,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
    ) -> Result<(ConvergeReport, ConvergeReport), DataplaneError> {
        self.converge_ordered(Some(cidrs), entries, states, prune)
    }

    fn converge_ordered(
        &mut self,
        cidrs: Option<&BTreeMap<IpNet, u32>>,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
    ) -> Result<(ConvergeReport, ConvergeReport), DataplaneError> {
        let mut policy = self.plan_policy(entries, states, prune)?;
        let mut cidr = cidrs.map(|c| self.plan_cidrs(c)).transpose()?;
        for step in policy_steps(prune) {
            self.apply_policy_step(step, &mut policy, cidr.as_mut());
        }
        let cidr_report = cidr.map(|c| c.report).unwrap_or_default();
        Ok((cidr_report, policy.report))
    }

    fn apply_policy_step(
        &mut self,
        step: PolicyStep,
        plan: &mut PolicyPlan,
        cidr: Option<&mut CidrPlan>,
    ) {
        match step {
            PolicyStep::UpsertEntries => {
                let (policy, max) = (&mut self.policy, self.policy_max);
                let desired = &plan.desired;
                let failed_before = plan.report.failed.len();
                let mut failed_eps = Vec::new();
                upsert_in_order(
                    &mut plan.report,
                    plan.writes.iter().copied(),
                    show_policy_key,
                    |key, op| {
                        policy.insert(&key.to_lpm(), desired[key], 0).map_err(|e| {
                            failed_eps.push(key.endpoint_id);
                            write_error(maps::POLICY, op, max, e)
                        })
                    },
                );
                debug_assert_eq!(plan.report.failed.len() - failed_before, failed_eps.len());
                plan.incomplete.extend(failed_eps);
            }
            PolicyStep::UpsertCidrs => {
                if let Some(cidr) = cidr {
                    self.cidr_upserts(cidr);
                    if !cidr.report.failed.is_empty() {
                        plan.cidrs_incomplete = true;
                    }
                }
            }
            PolicyStep::InterimStates => {
                let writes = interim_state_writes(&plan.current_states, &plan.states);
                let failed_before = plan.report.failed.len();
                self.write_states(&mut plan.report, writes.clone());
                let failed: BTreeSet<String> = plan.report.failed[failed_before..]
                    .iter()
                    .map(|f| f.key.clone())
                    .collect();
                plan.interim_written = writes
                    .iter()
                    .map(|(id, _, _)| *id)
                    .filter(|id| !failed.contains(&format!("policy_state[{id}]")))
                    .collect();
            }
            PolicyStep::DeleteEntries => {
                let (policy, max) = (&mut self.policy, self.policy_max);
                delete_all(
                    &mut plan.report,
                    &plan.deletes,
                    show_policy_key,
                    |key| match policy.remove(&key.to_lpm()) {
                        Err(e) if !is_not_found(&e) => {
                            Err(write_error(maps::POLICY, Op::Delete, max, e))
                        }
                        _ => Ok(()),
                    },
                );
            }
            PolicyStep::DeleteCidrs => {
                if let Some(cidr) = cidr {
                    self.cidr_prune(cidr);
                }
            }
            PolicyStep::FinalStates => {
                // Kept stale entries (no `prune`) would take part in the re-judging: the
                // revision of an endpoint that has any, or of every endpoint while a stale
                // prefix is kept (it shadows the prefixes containing it), waits for a
                // pruning pass.
                if !plan.prune && cidr.is_some_and(|c| !c.diff.stale.is_empty()) {
                    return;
                }
                let stale_eps: BTreeSet<u16> = if plan.prune {
                    BTreeSet::new()
                } else {
                    plan.deletes.iter().map(|k| k.endpoint_id).collect()
                };
                let current = self.policy_states().unwrap_or_default();
                let writes: Vec<(u16, Op, PolicyState)> = plan
                    .states
                    .iter()
                    .filter(|(id, _)| {
                        !plan.cidrs_incomplete
                            && !plan.incomplete.contains(id)
                            && !stale_eps.contains(id)
                    })
                    .filter_map(|(id, state)| match current.get(id) {
                        Some(held) if held == state => None,
                        Some(_) => Some((*id, Op::Update, *state)),
                        None => Some((*id, Op::Add, *state)),
                    })
                    .collect();
                // An endpoint whose interim state was written is counted once.
                let (again, first): (Vec<_>, Vec<_>) = writes
                    .into_iter()
                    .partition(|(id, _, _)| plan.interim_written.contains(id));
                self.write_states(&mut plan.report, first);
                let mut scratch = ConvergeReport::default();
                self.write_states(&mut scratch, again);
                plan.report.failed.append(&mut scratch.failed);
            }
            PolicyStep::DeleteStates => {
                let (policy_state, max) = (&mut self.policy_state, self.policy_state_max);
                delete_all(
                    &mut plan.report,
                    &plan.stale_states,
                    |id| format!("policy_state[{id}]"),
                    |id| match policy_state.remove(id) {
                        Err(e) if !is_not_found(&e) => {
                            Err(write_error(maps::POLICY_STATE, Op::Delete, max, e))
                        }
                        _ => Ok(()),
                    },
                );
            }
            PolicyStep::KeepStale => {
                plan.report.stale_kept = plan.deletes.len() + plan.stale_states.len();
                if let Some(cidr) = cidr {
                    cidr.report.stale_kept = cidr.diff.stale.len();
                }
            }
        }
    }

    /// Writes `policy_state` entries, each reported.
    fn write_states(&mut self, report: &mut ConvergeReport, writes: Vec<(u16, Op, PolicyState)>) {
        let (policy_state, max) = (&mut self.policy_state, self.policy_state_max);
        upsert_in_order(
            report,
            writes.into_iter().map(|(id, op, state)| ((id, state), op)),
            |(id, _)| format!("policy_state[{id}]"),
            |(id, state), op| {
                policy_state
                    .insert(id, state, 0)
                    .map_err(|e| write_error(maps::POLICY_STATE, op, max, e))
            },
        );
    }

    fn plan_policy(
        &self,
        entries: &BTreeMap<PolicyEntry, Verdict>,
        states: &BTreeMap<u16, PolicyState>,
        prune: bool,
    ) -> Result<PolicyPlan, DataplaneError> {
        let desired: BTreeMap<PolicyKey, PolicyValue> = entries
            .iter()
            .map(|(entry, verdict)| (entry.to_key(), verdict.to_value(entry)))
            .collect();
        let current = self.policy_raw()?;
        let entries_diff = diff(&current, &desired);
        let (writes, deletes) = policy_write_order(&entries_diff, &current, &desired);
        let current_states = self.policy_states()?;
        let states_diff = diff(&current_states, states);
        Ok(PolicyPlan {
            report: ConvergeReport {
                unchanged: entries_diff.unchanged + states_diff.unchanged,
                ..ConvergeReport::default()
            },
            desired,
            writes,
            deletes,
            states: states.clone(),
            current_states,
            stale_states: states_diff.stale,
            incomplete: BTreeSet::new(),
            cidrs_incomplete: false,
            interim_written: BTreeSet::new(),
            prune,
        })
    }

    fn policy_cidrs_raw(&self) -> Result<BTreeMap<IpcacheKey, PolicyCidrValue>, DataplaneError> {
        read_all(maps::POLICY_CIDRS, self.policy_cidrs.iter(), |k| {
            IpcacheKey::from_lpm(&k)
        })
    }

    /// The node-local CIDR identities in use (prefix → identity), so a restarted agent keeps
    /// them stable.
    pub fn policy_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, DataplaneError> {
        Ok(self
            .policy_cidrs_raw()?
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_net()?, v.identity)))
            .collect())
    }

    /// Converges `policy_cidrs` (prefix → node-local CIDR identity). Additions and changes
    /// first, then (only if `prune`) deletions. See [`Self::converge_policy_with_cidrs`] for
    /// changing prefixes and policy together.
    pub fn converge_policy_cidrs(
        &mut self,
        cidrs: &BTreeMap<IpNet, u32>,
        prune: bool,
    ) -> Result<ConvergeReport, DataplaneError> {
        let mut plan = self.plan_cidrs(cidrs)?;
        self.cidr_upserts(&mut plan);
        if prune {
            self.cidr_prune(&mut plan);
        } else {
            plan.report.stale_kept = plan.diff.stale.len();
        }
        Ok(plan.report)
    }

    fn plan_cidrs(&self, cidrs: &BTreeMap<IpNet, u32>) -> Result<CidrPlan, DataplaneError> {
        let desired: BTreeMap<IpcacheKey, PolicyCidrValue> = cidrs
            .iter()
            .map(|(net, identity)| {
                (
                    IpcacheKey::from_net(net),
                    PolicyCidrValue {
                        identity: *identity,
                        pad: 0,
                    },
                )
            })
            .collect();
        let diff = diff(&self.policy_cidrs_raw()?, &desired);
        Ok(CidrPlan {
            report: ConvergeReport {
                unchanged: diff.unchanged,
                ..ConvergeReport::default()
            },
            desired,
            diff,
        })
    }

    fn cidr_upserts(&mut self, plan: &mut CidrPlan) {
        let (map, max) = (&mut self.policy_cidrs, self.policy_cidrs_max);
        let desired = &plan.desired;
        upsert(&mut plan.report, &plan.diff, show_net_key, |key, op| {
            map.insert(&key.to_lpm(), desired[key], 0)
                .map_err(|e| write_error(maps::POLICY_CIDRS, op, max, e))
        });
    }

    fn cidr_prune(&mut self, plan: &mut CidrPlan) {
        let (map, max) = (&mut self.policy_cidrs, self.policy_cidrs_max);
        delete_all(
            &mut plan.report,
            &plan.diff.stale,
            show_net_key,
            |key| match map.remove(&key.to_lpm()) {
                Err(e) if !is_not_found(&e) => {
                    Err(write_error(maps::POLICY_CIDRS, Op::Delete, max, e))
                }
                _ => Ok(()),
            },
        );
    }

    /// Every conntrack entry (for inspection and tests; the map may hold 256k entries).
    pub fn conntrack_entries(&self) -> Result<Vec<(CtKey, CtValue)>, DataplaneError> {
        read_all(maps::CONNTRACK, self.conntrack.iter(), |k| k)
    }

    /// Removes the conntrack entries idle for longer than their timeout
    /// ([`super::policy::ct_timeout_ns`]) at `now_ns` (CLOCK_MONOTONIC, as
    /// [`super::policy::monotonic_now_ns`] reads it), and those of endpoints no longer in
    /// the endpoints map. Returns how many were removed.
    pub fn conntrack_gc(&mut self, now_ns: u64) -> Result<usize, DataplaneError> {
        let mut expired = Vec::new();
        let mut live = Vec::new();
        for entry in self.conntrack.iter() {
            let (key, value) = match entry {
                Ok(kv) => kv,
                // Evicted or deleted by the programs while iterating.
                Err(e) if is_not_found(&e) => continue,
                Err(source) => {
                    return Err(DataplaneError::Read {
                        map: maps::CONNTRACK,
                        source,
                    });
                }
            };
            let idle = now_ns.saturating_sub(value.last_seen_ns);
            if idle > ct_timeout_ns(key.proto, value.flags) {
                expired.push(key);
            } else {
                live.push(key);
            }
        }
        // Read after the entries: an endpoint an entry was created for is in this view
        // unless it has been removed since.
        let endpoint_ids: std::collections::BTreeSet<u16> = self
            .endpoints_raw()?
            .values()
            .map(|info| info.endpoint_id)
            .collect();
        let (orphaned, live): (Vec<CtKey>, Vec<CtKey>) = live
            .into_iter()
            .partition(|key| !endpoint_ids.contains(&key.endpoint_id));
        expired.extend(orphaned);
        let mut removed = 0;
        for key in &expired {
            match self.conntrack.remove(key) {
                Ok(()) => removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(
                        write_error(maps::CONNTRACK, Op::Delete, self.conntrack_max, e).into(),
                    );
                }
            }
        }
        self.conntrack_entries = Some(u32::try_from(live.len()).unwrap_or(u32::MAX));
        Ok(removed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sorts_keys_into_add_update_stale() {
        let current = BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]);
        let desired = BTreeMap::from([(2, 'b'), (3, 'x'), (4, 'd')]);
        assert_eq!(
            diff(&current, &desired),
            Diff {
                add: vec![4],
                update: vec![3],
                stale: vec![1],
                unchanged: 1
            }
        );
    }

    #[test]
    fn policy_denies_are_written_first_and_deleted_last() {
        use crate::bpf::{
            maps::Direction,
            policy::{PolicyEntry, Verdict},
        };
        let e = |peer| PolicyEntry {
            endpoint_id: 1,
            direction: Direction::Ingress,
            peer,
            protocol: 0,
            port: 0,
            port_prefix: 0,
        };
        let kv = |peer, verdict: Verdict| (e(peer).to_key(), verdict.to_value(&e(peer)));
        let current = BTreeMap::from([
            kv(1, Verdict::Deny),
            kv(2, Verdict::Allow),
            kv(5, Verdict::Allow),
        ]);
        let desired = BTreeMap::from([
            kv(0, Verdict::Allow),
            kv(3, Verdict::Deny),
            kv(5, Verdict::Deny),
        ]);
        let d = diff(&current, &desired);
        let (writes, deletes) = policy_write_order(&d, &current, &desired);
        let peers: Vec<(u32, Op)> = writes
            .iter()
            .map(|(k, op)| (k.peer_identity, *op))
            .collect();
        assert_eq!(peers, vec![(5, Op::Update), (3, Op::Add), (0, Op::Add)]);
        let peers: Vec<u32> = deletes.iter().map(|k| k.peer_identity).collect();
        assert_eq!(peers, vec![2, 1]);
    }

    #[test]
    fn policy_steps_delete_only_after_every_upsert_and_bump_revisions_after_deletes() {
        use PolicyStep::*;
        assert_eq!(
            policy_steps(true),
            vec![
                UpsertEntries,
                UpsertCidrs,
                InterimStates,
                DeleteEntries,
                DeleteCidrs,
                FinalStates,
                DeleteStates
            ]
        );
        assert_eq!(
            policy_steps(false),
            vec![
                UpsertEntries,
                UpsertCidrs,
                InterimStates,
                FinalStates,
                KeepStale
            ]
        );
    }

    #[test]
    fn interim_states_keep_the_old_revision_or_0_and_take_the_new_flags() {
        let st = |revision, flags| PolicyState { revision, flags };
        let current = BTreeMap::from([(1, st(4, 3)), (2, st(9, 0)), (3, st(1, 1)), (5, st(7, 2))]);
        let wanted = BTreeMap::from([(1, st(5, 1)), (2, st(9, 0)), (4, st(2, 2)), (5, st(8, 2))]);
        assert_eq!(
            interim_state_writes(&current, &wanted),
            vec![(1, Op::Update, st(4, 1)), (4, Op::Add, st(0, 2))],
            "2 unchanged; 3 vanishes later; 4 is new: revision 0, as conntrack stamps it \
             without a state; 5 only changes its revision, in the final step"
        );
        assert!(interim_state_writes(&wanted, &wanted).is_empty());
    }

    #[test]
    fn apply_prunes_only_when_asked_and_reports_failures() {
        let d = || Diff {
            add: vec![1, 2],
            update: vec![3],
            stale: vec![9],
            unchanged: 0,
        };
        let mut deleted = Vec::new();
        let report = apply(
            d(),
            false,
            |k| k.to_string(),
            |_, _| Ok(()),
            |k| {
                deleted.push(*k);
                Ok(())
            },
        );
        assert!(deleted.is_empty());
        assert_eq!(
            (
                report.added,
                report.updated,
                report.deleted,
                report.stale_kept
            ),
            (2, 1, 0, 1)
        );

        let report = apply(
            d(),
            true,
            |k| k.to_string(),
            |k, _| match k {
                2 => Err(MapWriteError::Full {
                    map: "m",
                    max_entries: 2,
                }),
                _ => Ok(()),
            },
            |_| Ok(()),
        );
        assert_eq!((report.added, report.updated, report.deleted), (1, 1, 1));
        assert!(report.map_full());
        assert_eq!(report.failed[0].key, "2");
        assert_eq!(report.failed[0].op, Op::Add);
    }
}
