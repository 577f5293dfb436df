//! What a convergence did, entry by entry: the pure half of [`super::PinnedMap`]. A
//! [`Diff`] says what is pending; a [`Report`] what was done and what failed, with the
//! failing entries' typed keys (not their printed form) and the counts metrics need.

use std::{collections::BTreeMap, fmt};

use aya::maps::MapError;

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
    /// The error of `op` on `map`: [`Self::Full`] when the kernel says the map is full.
    pub fn new(map: &'static str, op: Op, max_entries: u32, source: MapError) -> Self {
        if let MapError::SyscallError(e) = &source {
            // Hash maps answer E2BIG when full, LPM tries ENOSPC.
            if matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)) {
                return Self::Full { map, max_entries };
            }
        }
        Self::Kernel { map, op, source }
    }

    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Full { .. } => "full",
            Self::Kernel { .. } => "error",
        }
    }
}

/// One entry that did not converge.
#[derive(Debug)]
pub struct Failure<K> {
    /// The entry's key, typed (`Display` shows it as an IP, a prefix, a policy entry...).
    pub key: K,
    pub op: Op,
    pub error: MapWriteError,
}

/// What one convergence did to one map (or to the maps written in one order).
#[derive(Debug)]
pub struct Report<K> {
    pub added: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Stale entries left in place because `prune` was false.
    pub stale_kept: usize,
    pub failed: Vec<Failure<K>>,
}

impl<K> Default for Report<K> {
    fn default() -> Self {
        Self {
            added: 0,
            updated: 0,
            deleted: 0,
            unchanged: 0,
            stale_kept: 0,
            failed: Vec::new(),
        }
    }
}

impl<K> Report<K> {
    /// A report that starts from the entries a diff found unchanged.
    pub fn unchanged(unchanged: usize) -> Self {
        Self {
            unchanged,
            ..Self::default()
        }
    }

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

    /// Counts one operation on `key`, or records its failure. Returns whether it succeeded.
    pub fn record(&mut self, key: K, op: Op, result: Result<(), MapWriteError>) -> bool {
        match result {
            Ok(()) => {
                *match op {
                    Op::Add => &mut self.added,
                    Op::Update => &mut self.updated,
                    Op::Delete => &mut self.deleted,
                } += 1;
                true
            }
            Err(error) => {
                self.failed.push(Failure { op, error, key });
                false
            }
        }
    }

    /// The same report with its keys converted (e.g. into [`super::AnyKey`], to list the
    /// reports of several maps together).
    pub fn map_keys<J>(self, key: impl Fn(K) -> J) -> Report<J> {
        Report {
            added: self.added,
            updated: self.updated,
            deleted: self.deleted,
            unchanged: self.unchanged,
            stale_kept: self.stale_kept,
            failed: self
                .failed
                .into_iter()
                .map(|f| Failure {
                    op: f.op,
                    error: f.error,
                    key: key(f.key),
                })
                .collect(),
        }
    }

    /// The counts alone, whatever the key type (for logs and metrics).
    pub fn counts(&self) -> Counts {
        Counts {
            added: self.added,
            updated: self.updated,
            deleted: self.deleted,
            unchanged: self.unchanged,
            stale_kept: self.stale_kept,
            failed: self.failed.len(),
        }
    }
}

/// What a [`Report`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub added: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub stale_kept: usize,
    pub failed: usize,
}

/// The difference between what a map holds and what it should hold.
#[derive(Debug, PartialEq, Eq)]
pub struct Diff<K> {
    pub add: Vec<K>,
    pub update: Vec<K>,
    pub stale: Vec<K>,
    pub unchanged: usize,
}

impl<K: Copy> Diff<K> {
    /// Updates then additions, the order in which [`super::PinnedMap`] writes them.
    pub fn writes(&self) -> impl Iterator<Item = (K, Op)> + '_ {
        let update = self.update.iter().map(|k| (*k, Op::Update));
        update.chain(self.add.iter().map(|k| (*k, Op::Add)))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sorts_keys_into_add_update_stale() {
        let current = BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]);
        let desired = BTreeMap::from([(2, 'b'), (3, 'x'), (4, 'd')]);
        let d = diff(&current, &desired);
        assert_eq!(
            d,
            Diff {
                add: vec![4],
                update: vec![3],
                stale: vec![1],
                unchanged: 1
            }
        );
        assert_eq!(
            d.writes().collect::<Vec<_>>(),
            vec![(3, Op::Update), (4, Op::Add)]
        );
    }

    #[test]
    fn a_report_counts_successes_and_keeps_typed_failures() {
        let full = || MapWriteError::Full {
            map: "m",
            max_entries: 2,
        };
        let mut report = Report::unchanged(4);
        assert!(report.record(1u16, Op::Add, Ok(())));
        assert!(report.record(2, Op::Update, Ok(())));
        assert!(report.record(3, Op::Delete, Ok(())));
        assert!(!report.record(7, Op::Add, Err(full())));
        assert_eq!(
            (
                report.added,
                report.updated,
                report.deleted,
                report.unchanged
            ),
            (1, 1, 1, 4)
        );
        assert_eq!((report.failed[0].key, report.failed[0].op), (7, Op::Add));
        assert!(report.map_full() && !report.is_converged());
        assert_eq!(
            report.counts(),
            Counts {
                added: 1,
                updated: 1,
                deleted: 1,
                unchanged: 4,
                stale_kept: 0,
                failed: 1
            }
        );

        let report = report.map_keys(u32::from);
        assert_eq!((report.failed[0].key, report.unchanged), (7u32, 4));
    }
}
