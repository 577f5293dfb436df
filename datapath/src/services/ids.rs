//! Stable numbering of backends (`lb_backends` ids, u32 ≥ 1) and frontends (`lb_revnat`
//! indexes, u16 ≥ 1).
//!
//! Why stable: a socket translated at connect, an affinity record and (on the tc path) a
//! conntrack entry refer to a backend id or rev-nat index. A restarted agent reads what the
//! pinned maps hold and keeps every id whose backend (or frontend) is still wanted, so
//! nothing established changes meaning. New ids continue after the highest id held, so an
//! id that just went away is not handed to another backend while records may still name
//! it; only when the range is exhausted are freed ids reused (lowest first).

use std::collections::{BTreeMap, BTreeSet};

/// Assigns ids to `wanted` keys: the id `held` gives a key when it has one, otherwise the
/// next id after the highest held one (wrapping to the lowest free id), within
/// `1..=max`. Keys that cannot get an id (the range is full) are returned apart.
pub fn assign<K: Ord + Clone>(
    wanted: &BTreeSet<K>,
    held: &BTreeMap<K, u32>,
    max: u32,
) -> (BTreeMap<K, u32>, Vec<K>) {
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    for key in wanted {
        if let Some(id) = held.get(key).copied().filter(|id| (1..=max).contains(id)) {
            // Two held keys cannot share an id (a map key is unique), but be safe.
            if used.insert(id) {
                out.insert(key.clone(), id);
            }
        }
    }
    // Ids held by keys no longer wanted are still skipped on the first round.
    let taken: BTreeSet<u32> = held.values().copied().collect();
    let mut next = taken.iter().next_back().copied().unwrap_or(0);
    let mut exhausted = Vec::new();
    let mut lowest_free = 1u32;
    for key in wanted {
        if out.contains_key(key) {
            continue;
        }
        let id = if next < max {
            next += 1;
            Some(next)
        } else {
            // Reuse: the lowest id not in use now.
            while lowest_free <= max && used.contains(&lowest_free) {
                lowest_free += 1;
            }
            (lowest_free <= max).then_some(lowest_free)
        };
        match id {
            Some(id) => {
                used.insert(id);
                out.insert(key.clone(), id);
            }
            None => exhausted.push(key.clone()),
        }
    }
    (out, exhausted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn held_ids_are_kept_and_new_ones_follow_the_highest() {
        let held = BTreeMap::from([("a", 3), ("b", 7), ("gone", 9)]);
        let wanted = BTreeSet::from(["a", "b", "c", "d"]);
        let (ids, exhausted) = assign(&wanted, &held, 100);
        assert!(exhausted.is_empty());
        assert_eq!(
            ids,
            BTreeMap::from([("a", 3), ("b", 7), ("c", 10), ("d", 11)])
        );
    }

    #[test]
    fn a_full_range_reuses_free_ids_then_reports_the_rest() {
        let held = BTreeMap::from([("a", 1), ("b", 3)]);
        let wanted = BTreeSet::from(["a", "b", "c", "d", "e"]);
        let (ids, exhausted) = assign(&wanted, &held, 3);
        assert_eq!(ids, BTreeMap::from([("a", 1), ("b", 3), ("c", 2)]));
        assert_eq!(exhausted, vec!["d", "e"]);
    }

    proptest! {
        /// No two wanted keys share an id, every id is in range, and every held id of a
        /// wanted key is kept.
        #[test]
        fn ids_are_unique_in_range_and_stable(
            held in proptest::collection::btree_map(0u8..40, 1u32..30, 0..20),
            wanted in proptest::collection::btree_set(0u8..40, 0..30),
            max in 1u32..40,
        ) {
            // A map holds each id once.
            let mut seen = BTreeSet::new();
            let held: BTreeMap<u8, u32> = held.into_iter().filter(|(_, id)| seen.insert(*id)).collect();
            let (ids, exhausted) = assign(&wanted, &held, max);
            let distinct: BTreeSet<u32> = ids.values().copied().collect();
            prop_assert_eq!(distinct.len(), ids.len());
            prop_assert!(ids.values().all(|id| (1..=max).contains(id)));
            prop_assert_eq!(ids.len() + exhausted.len(), wanted.len());
            for (key, id) in &held {
                if wanted.contains(key) && *id <= max {
                    prop_assert_eq!(ids.get(key), Some(id));
                }
            }
            prop_assert!(exhausted.is_empty() || ids.len() == max as usize);
        }
    }
}
