//! [`PinnedMap`]: one pinned map, typed by its kernel key and value, converged by diff.
//! Every map the agent writes is one of these; the per-map modules add the typed views
//! (`IpAddr`, `IpNet`, `PolicyEntry` keys) and, for policy, the order of the writes.

use std::{
    collections::BTreeMap,
    fmt, io,
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, Map, MapData, MapError, lpm_trie},
};

use super::report::{Diff, MapWriteError, Op, Report, diff};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening pinned map {path}: {source}")]
    Open { path: PathBuf, source: MapError },
    #[error("reading map {map}: {source}")]
    Read { map: &'static str, source: MapError },
    #[error(transparent)]
    Write(#[from] MapWriteError),
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

/// The aya map behind a [`PinnedMap`], keyed by `K` as the kernel lays it out.
pub trait Backend<K, V>: TryFrom<Map, Error = MapError> {
    fn entries(&self) -> impl Iterator<Item = Result<(K, V), MapError>>;
    fn keys(&self) -> impl Iterator<Item = Result<K, MapError>>;
    fn insert(&mut self, key: &K, value: &V) -> Result<(), MapError>;
    fn remove(&mut self, key: &K) -> Result<(), MapError>;
}

/// A key as the kernel stores it (`#[repr(C)]`, mirrored from `bpf/lib/maps.h`), and the
/// kind of map that holds it. `Display` shows it in reports and logs.
pub trait MapKey: Pod + Ord + fmt::Debug + fmt::Display {
    /// An `aya::maps::HashMap` (also for LRU hashes) or an [`LpmTrie`] (see [`LpmKey`]).
    type Backend<V: Pod>: Backend<Self, V>;
    /// What callers key the desired state by: an IP for `endpoints`, a prefix for
    /// `ipcache`, the key itself where nothing reads better.
    type Desired: Ord + Copy;
    fn from_desired(key: Self::Desired) -> Self;
}

/// A full LPM trie key (`prefixlen` first, as the kernel stores it) and its split form
/// for aya ([`lpm_trie::Key`] carries `prefixlen` itself).
pub trait LpmKey: Copy {
    type Prefix: Pod;
    fn to_lpm(self) -> lpm_trie::Key<Self::Prefix>;
    fn from_lpm(key: &lpm_trie::Key<Self::Prefix>) -> Self;
}

impl<K: Pod, V: Pod> Backend<K, V> for HashMap<MapData, K, V> {
    fn entries(&self) -> impl Iterator<Item = Result<(K, V), MapError>> {
        self.iter()
    }

    fn keys(&self) -> impl Iterator<Item = Result<K, MapError>> {
        HashMap::keys(self)
    }

    fn insert(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        HashMap::insert(self, key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        HashMap::remove(self, key)
    }
}

impl<K: LpmKey, V: Pod> Backend<K, V> for LpmTrie<MapData, K::Prefix, V> {
    fn entries(&self) -> impl Iterator<Item = Result<(K, V), MapError>> {
        self.iter()
            .map(|entry| entry.map(|(k, v)| (K::from_lpm(&k), v)))
    }

    fn keys(&self) -> impl Iterator<Item = Result<K, MapError>> {
        LpmTrie::keys(self).map(|key| key.map(|k| K::from_lpm(&k)))
    }

    fn insert(&mut self, key: &K, value: &V) -> Result<(), MapError> {
        LpmTrie::insert(self, &key.to_lpm(), value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        LpmTrie::remove(self, &key.to_lpm())
    }
}

/// Opens the map pinned as `dir/name`, with its capacity.
pub(crate) fn open_pin(dir: &Path, name: &str) -> Result<(MapData, u32), DataplaneError> {
    let path = dir.join(name);
    let open_err = |source| DataplaneError::Open {
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    let max_entries = data.info().map_err(open_err)?.max_entries();
    Ok((data, max_entries))
}

/// Shows a key as what it stands for (`decoded`), or as stored when it does not decode
/// (written by another build, or malformed).
pub(crate) fn show_key(
    f: &mut fmt::Formatter<'_>,
    decoded: Option<impl fmt::Display>,
    raw: &impl fmt::Debug,
) -> fmt::Result {
    match decoded {
        Some(decoded) => write!(f, "{decoded}"),
        None => write!(f, "{raw:?}"),
    }
}

/// Whether a lookup or deletion failed only because the key is not there.
pub(crate) fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(e) => e.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

/// One pinned map, typed.
pub struct PinnedMap<K: MapKey, V: Pod> {
    name: &'static str,
    max_entries: u32,
    map: K::Backend<V>,
    /// What the map holds as far as this process knows: read at the first [`Self::diff`]
    /// and kept in step with every write since, so a convergence costs the syscalls of its
    /// delta instead of a read of every entry (at 10k remote endpoints, reading `ipcache`
    /// and the `lb_*` maps back was most of a pass). Only for maps nothing else writes
    /// (the programs write conntrack and NAT, which are never diffed); forgotten on a
    /// failed write and by [`Self::forget_known`] (the agent's periodic resync reads the
    /// kernel again, so an entry changed behind the agent's back is put right).
    known: Option<BTreeMap<K, V>>,
}

impl<K: MapKey, V: Pod> fmt::Debug for PinnedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedMap")
            .field("name", &self.name)
            .field("max_entries", &self.max_entries)
            .field("known", &self.known.as_ref().map(BTreeMap::len))
            .finish_non_exhaustive()
    }
}

impl<K: MapKey, V: Pod + PartialEq> PinnedMap<K, V> {
    /// Opens the map pinned as `dir/name` (created by [`crate::bpf::Programs::load`]).
    pub fn open(dir: &Path, name: &'static str) -> Result<Self, DataplaneError> {
        let (data, max_entries) = open_pin(dir, name)?;
        let map = Map::from_map_data(data)
            .and_then(K::Backend::<V>::try_from)
            .map_err(|source| DataplaneError::Open {
                path: dir.join(name),
                source,
            })?;
        Ok(Self {
            name,
            max_entries,
            map,
            known: None,
        })
    }

    /// The next [`Self::diff`] reads the kernel instead of trusting what was written.
    pub fn forget_known(&mut self) {
        self.known = None;
    }

    /// Its name, which is also its pin file name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Every entry as the kernel holds it, one lookup per key (the programs may add and
    /// remove entries meanwhile).
    pub fn iter(&self) -> impl Iterator<Item = Result<(K, V), MapError>> {
        self.map.entries()
    }

    /// Every entry, or the read error naming the map.
    pub fn read(&self) -> Result<BTreeMap<K, V>, DataplaneError> {
        self.read_error(self.iter().collect())
    }

    pub(crate) fn read_error<T>(&self, result: Result<T, MapError>) -> Result<T, DataplaneError> {
        result.map_err(|source| DataplaneError::Read {
            map: self.name,
            source,
        })
    }

    /// Entries held (as known, else counted key by key) vs capacity.
    pub fn pressure(&self) -> MapPressure {
        let entries = match &self.known {
            Some(known) => known.len(),
            None => self.map.keys().filter(Result::is_ok).count(),
        };
        MapPressure {
            map: self.name,
            entries: u32::try_from(entries).unwrap_or(u32::MAX),
            max_entries: self.max_entries,
        }
    }

    /// Writes one entry; `op` only labels the error.
    pub fn put(&mut self, key: &K, value: &V, op: Op) -> Result<(), MapWriteError> {
        match self.map.insert(key, value) {
            Ok(()) => {
                if let Some(known) = &mut self.known {
                    known.insert(*key, *value);
                }
                Ok(())
            }
            Err(e) => {
                self.known = None;
                Err(MapWriteError::new(self.name, op, self.max_entries, e))
            }
        }
    }

    /// Deletes one entry; one already gone is no error. Returns whether it was there.
    pub fn delete(&mut self, key: &K) -> Result<bool, MapWriteError> {
        let result = self.map.remove(key);
        match &result {
            Ok(()) => {}
            Err(e) if is_not_found(e) => {}
            Err(_) => self.known = None,
        }
        if let Some(known) = &mut self.known {
            known.remove(key);
        }
        match result {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(MapWriteError::new(
                self.name,
                Op::Delete,
                self.max_entries,
                e,
            )),
        }
    }

    /// Writes the additions and updates of `diff` (updates first), each reported under
    /// `key(k)`.
    pub fn upsert<R>(
        &mut self,
        report: &mut Report<R>,
        diff: &Diff<K>,
        desired: &BTreeMap<K, V>,
        key: impl Fn(K) -> R,
    ) {
        for (k, op) in diff.writes() {
            report.record(key(k), op, self.put(&k, &desired[&k], op));
        }
    }

    /// Deletes `keys`, each reported under `key(k)`.
    pub fn delete_all<R>(&mut self, report: &mut Report<R>, keys: &[K], key: impl Fn(K) -> R) {
        for k in keys {
            let deleted = self.delete(k).map(drop);
            report.record(key(*k), Op::Delete, deleted);
        }
    }

    /// `desired` in kernel keys, and how the map differs from it (from what is known to be
    /// there; the kernel is read when nothing is).
    pub fn diff(
        &mut self,
        desired: &BTreeMap<K::Desired, V>,
    ) -> Result<(BTreeMap<K, V>, Diff<K>), DataplaneError> {
        let desired: BTreeMap<K, V> = desired
            .iter()
            .map(|(key, value)| (K::from_desired(*key), *value))
            .collect();
        let diff = diff(self.known()?, &desired);
        Ok((desired, diff))
    }

    /// What the map holds as far as this process knows (read from the kernel when it does
    /// not know; see `known` on the struct).
    pub fn known(&mut self) -> Result<&BTreeMap<K, V>, DataplaneError> {
        if self.known.is_none() {
            self.known = Some(self.read()?);
        }
        Ok(self.known.get_or_insert_default())
    }

    /// Converges the map to `desired` by diff: stale entries are deleted first (so their
    /// slots are free for the additions), and only when `prune` is set (the caller's view
    /// is complete); then updates, then additions. Every entry that cannot be written is
    /// in the report's `failed`, a full map as [`MapWriteError::Full`].
    pub fn converge(
        &mut self,
        desired: &BTreeMap<K::Desired, V>,
        prune: bool,
    ) -> Result<Report<K>, DataplaneError> {
        let (desired, diff) = self.diff(desired)?;
        let mut report = Report::unchanged(diff.unchanged);
        if prune {
            self.delete_all(&mut report, &diff.stale, |k| k);
        } else {
            report.stale_kept = diff.stale.len();
        }
        self.upsert(&mut report, &diff, &desired, |k| k);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key of the in-memory map below.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    #[repr(transparent)]
    struct Key(u32);

    // SAFETY: a plain u32.
    unsafe impl Pod for Key {}

    impl fmt::Display for Key {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "key {}", self.0)
        }
    }

    /// A map in memory that answers E2BIG when full, as a kernel hash map does, and logs
    /// every write.
    struct Memory<V> {
        entries: BTreeMap<Key, V>,
        capacity: usize,
        log: Vec<(Op, u32)>,
        /// Full reads of the map.
        reads: std::cell::Cell<usize>,
    }

    impl<V> TryFrom<Map> for Memory<V> {
        type Error = MapError;

        fn try_from(_: Map) -> Result<Self, MapError> {
            Err(MapError::KeyNotFound)
        }
    }

    impl<V: Pod> Backend<Key, V> for Memory<V> {
        fn entries(&self) -> impl Iterator<Item = Result<(Key, V), MapError>> {
            self.reads.set(self.reads.get() + 1);
            self.entries.iter().map(|(k, v)| Ok((*k, *v)))
        }

        fn keys(&self) -> impl Iterator<Item = Result<Key, MapError>> {
            self.entries.keys().map(|k| Ok(*k))
        }

        fn insert(&mut self, key: &Key, value: &V) -> Result<(), MapError> {
            if !self.entries.contains_key(key) && self.entries.len() == self.capacity {
                return Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_elem",
                    io_error: io::Error::from_raw_os_error(libc::E2BIG),
                }));
            }
            let op = match self.entries.insert(*key, *value) {
                Some(_) => Op::Update,
                None => Op::Add,
            };
            self.log.push((op, key.0));
            Ok(())
        }

        fn remove(&mut self, key: &Key) -> Result<(), MapError> {
            self.log.push((Op::Delete, key.0));
            self.entries
                .remove(key)
                .map(drop)
                .ok_or(MapError::KeyNotFound)
        }
    }

    impl MapKey for Key {
        type Backend<V: Pod> = Memory<V>;
        type Desired = Self;

        fn from_desired(key: Self) -> Self {
            key
        }
    }

    fn map(held: &[(u32, u8)], capacity: usize) -> PinnedMap<Key, u8> {
        PinnedMap {
            name: "m",
            max_entries: u32::try_from(capacity).unwrap(),
            map: Memory {
                entries: held.iter().map(|(k, v)| (Key(*k), *v)).collect(),
                capacity,
                log: Vec::new(),
                reads: Default::default(),
            },
            known: None,
        }
    }

    #[test]
    fn converge_prunes_only_when_asked_and_reports_failures() {
        let desired = BTreeMap::from([(Key(1), 1), (Key(2), 2), (Key(3), 30)]);
        let mut m = map(&[(3, 3), (4, 4), (9, 9)], 4);
        let report = m.converge(&desired, false).unwrap();
        assert_eq!(
            (
                report.added,
                report.updated,
                report.deleted,
                report.stale_kept
            ),
            (1, 1, 0, 2)
        );
        assert_eq!(report.failed.len(), 1, "4 and 9 kept: no room for 2");
        assert!(report.map_full());
        let failure = &report.failed[0];
        assert_eq!((failure.key, failure.op), (Key(2), Op::Add));
        assert!(matches!(
            failure.error,
            MapWriteError::Full {
                map: "m",
                max_entries: 4
            }
        ));
        assert_eq!(
            m.map.log,
            [(Op::Update, 3), (Op::Add, 1)],
            "updates, then additions"
        );

        // Pruning frees the slots first: everything fits.
        m.map.log.clear();
        let report = m.converge(&desired, true).unwrap();
        assert!(report.is_converged(), "{report:?}");
        assert_eq!((report.added, report.deleted, report.unchanged), (1, 2, 2));
        assert_eq!(m.map.log, [(Op::Delete, 4), (Op::Delete, 9), (Op::Add, 2)]);
        assert_eq!(m.read().unwrap(), desired);
        assert_eq!(m.pressure().entries, 3);
    }

    #[test]
    fn converge_diffs_against_what_it_wrote_until_told_to_read_again() {
        let mut m = map(&[(1, 1), (2, 2)], 3);
        let desired = BTreeMap::from([(Key(1), 1), (Key(3), 3)]);
        assert!(m.converge(&desired, true).unwrap().is_converged());
        assert_eq!(m.map.reads.get(), 1, "the first convergence reads the map");

        // Later convergences cost only their delta: no read, one write.
        m.map.log.clear();
        let desired = BTreeMap::from([(Key(1), 10), (Key(3), 3)]);
        let report = m.converge(&desired, true).unwrap();
        assert_eq!((report.updated, report.unchanged), (1, 1));
        assert_eq!(
            (m.map.reads.get(), &m.map.log[..]),
            (1, &[(Op::Update, 1)][..])
        );

        // An entry changed behind its back is put right once it reads again.
        m.map.entries.insert(Key(3), 99);
        m.map.entries.insert(Key(7), 7);
        assert_eq!(m.converge(&desired, true).unwrap().unchanged, 2);
        m.forget_known();
        let report = m.converge(&desired, true).unwrap();
        assert_eq!((report.updated, report.deleted), (1, 1));
        assert_eq!(m.read().unwrap(), desired);

        // A failed write forgets: the next convergence reads what the kernel kept.
        let reads = m.map.reads.get();
        let too_many = BTreeMap::from([(Key(1), 10), (Key(3), 3), (Key(4), 4), (Key(5), 5)]);
        assert!(m.converge(&too_many, true).unwrap().map_full());
        m.converge(&desired, true).unwrap();
        assert_eq!(m.map.reads.get(), reads + 1, "read again after the failure");
        assert_eq!(m.read().unwrap(), desired);
    }

    #[test]
    fn a_delete_of_what_is_gone_is_no_error() {
        let mut m = map(&[(1, 1)], 4);
        assert!(m.delete(&Key(1)).unwrap());
        assert!(!m.delete(&Key(1)).unwrap());
    }
}
