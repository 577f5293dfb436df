//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of `m` slots, each
//! naming a backend, built so every backend owns about `m / n` slots (in proportion to its
//! weight) and a change to the backend set moves as few slots as possible. The datapath hashes
//! a flow to a slot; every agent builds the same table from the same inputs, so a flow lands on
//! the same backend whichever node it enters.
//!
//! A backend's place in the table depends only on its hash key (address and port), the table
//! size and the cluster-wide seed — never on the order backends are listed or on node-local
//! backend ids.

/// Default table size: prime, and large enough for ~160 backends at ≤ 1% disruption when
/// one is added or removed (Cilium uses the same default).
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// Table sizes must be prime (so every skip visits every slot) and not above this.
pub const MAX_TABLE_SIZE: u32 = 131071;

/// A backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// What the table stores for this backend's slots (the node's backend id).
    pub id: u32,
    /// Relative share of slots; 0 gets none.
    pub weight: u32,
    /// Stable identity of the backend across nodes, e.g. `10.0.1.5:8080/TCP`.
    pub key: &'a [u8],
}

/// Why a table cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "Maglev table size {0} is not a prime number (use e.g. 251, 509, 1021, 2039, 4093, 16381, 32749, 65521 or 131071)"
    )]
    NotPrime(u32),
    #[error("Maglev table size {0} is above the maximum {MAX_TABLE_SIZE}")]
    TooLarge(u32),
    #[error(
        "Maglev table size {size} is too small for {backends} backends (it must be larger than the backend count)"
    )]
    TooSmall { size: u32, backends: usize },
}

/// Checks a configured table size.
pub fn check_table_size(m: u32) -> Result<(), MaglevError> {
    if m > MAX_TABLE_SIZE {
        return Err(MaglevError::TooLarge(m));
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    Ok(())
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// The lookup table: `m` backend ids. Empty when no backend has a weight.
///
/// Weighted population: in round `r` a backend of weight `w` claims a slot when
/// `⌊(r+1)·w/w_max⌋ > ⌊r·w/w_max⌋`, so over the rounds it claims slots at `w/w_max` the rate
/// of the heaviest backend. Equal weights give the paper's algorithm exactly.
pub fn maglev_table(
    backends: &[MaglevBackend<'_>],
    m: u32,
    seed: u32,
) -> Result<Vec<u32>, MaglevError> {
    check_table_size(m)?;
    let mut live: Vec<&MaglevBackend<'_>> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Ok(Vec::new());
    }
    if live.len() >= m as usize {
        return Err(MaglevError::TooSmall {
            size: m,
            backends: live.len(),
        });
    }
    // Order by key so the table does not depend on the order of the input.
    live.sort_by(|a, b| a.key.cmp(b.key).then(a.id.cmp(&b.id)));
    let m64 = u64::from(m);
    let permutations: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = hash64(b.key, seed, 0x6f66_6673_6574) % m64;
            let skip = hash64(b.key, seed, 0x736b_6970) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = u64::from(live.iter().map(|b| b.weight).max().unwrap_or(1));
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; m as usize];
    let mut next = vec![0u64; live.len()];
    let mut filled = 0u32;
    let mut round = 0u64;
    while filled < m {
        for (i, backend) in live.iter().enumerate() {
            let w = u64::from(backend.weight);
            if (round + 1) * w / max_weight == round * w / max_weight {
                continue;
            }
            let (offset, skip) = permutations[i];
            // Each backend's permutation visits every slot once (m prime), so this ends.
            let slot = loop {
                let candidate = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                if table[candidate] == EMPTY {
                    break candidate;
                }
            };
            table[slot] = backend.id;
            filled += 1;
            if filled == m {
                break;
            }
        }
        round += 1;
    }
    Ok(table)
}

/// The services step's hook ([`super::desired::MaglevTable`]): backends as (id, weight, hash
/// key). A table that cannot be built (more backends than slots) is empty: the service then
/// selects at random, never fails a connection; the step counts it in `maglev_without_table`.
pub fn lookup_table(backends: &[(u32, u32, &[u8])], m: u32, seed: u32) -> Vec<u32> {
    let input: Vec<MaglevBackend<'_>> = backends
        .iter()
        .map(|&(id, weight, key)| MaglevBackend { id, weight, key })
        .collect();
    maglev_table(&input, m, seed).unwrap_or_default()
}

/// 64-bit FNV-1a of `seed`, `salt` and `key`, finished with the SplitMix64 mixer: stable
/// across Rust versions and machines (unlike `std`'s hashers), which every agent relies on.
fn hash64(key: &[u8], seed: u32, salt: u64) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for byte in seed
        .to_le_bytes()
        .iter()
        .chain(salt.to_le_bytes().iter())
        .chain(key)
    {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080/TCP", i / 250, i % 250 + 1))
            .collect()
    }

    fn backends(keys: &[String]) -> Vec<MaglevBackend<'_>> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| MaglevBackend {
                id: i as u32 + 1,
                weight: 1,
                key: k.as_bytes(),
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for id in table {
            *counts.entry(*id).or_default() += 1;
        }
        counts
    }

    #[test]
    fn table_sizes_must_be_prime_and_bounded() {
        assert!(check_table_size(DEFAULT_TABLE_SIZE).is_ok());
        assert!(check_table_size(251).is_ok());
        assert_eq!(check_table_size(16384), Err(MaglevError::NotPrime(16384)));
        assert_eq!(check_table_size(1), Err(MaglevError::NotPrime(1)));
        assert_eq!(check_table_size(262139), Err(MaglevError::TooLarge(262139)));
        let message = check_table_size(1000).unwrap_err().to_string();
        assert!(message.contains("not a prime"), "{message}");
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let k = keys(10);
        let table = maglev_table(&backends(&k), DEFAULT_TABLE_SIZE, 7).unwrap();
        assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
        let counts = shares(&table);
        assert_eq!(counts.len(), 10);
        let ideal = DEFAULT_TABLE_SIZE as f64 / 10.0;
        for (id, n) in counts {
            assert!((1..=10).contains(&id));
            // The paper's imbalance bound for equal weights is small; allow 2%.
            assert!(
                (n as f64 - ideal).abs() / ideal < 0.02,
                "backend {id} owns {n} slots"
            );
        }
    }

    #[test]
    fn input_order_and_ids_do_not_change_which_backend_owns_a_slot() {
        let k = keys(20);
        let forward = backends(&k);
        let mut reversed = forward.clone();
        reversed.reverse();
        let a = maglev_table(&forward, 4093, 1).unwrap();
        let b = maglev_table(&reversed, 4093, 1).unwrap();
        assert_eq!(a, b);
        // Another node numbers its backends differently: same owners, other ids.
        let renumbered: Vec<MaglevBackend<'_>> = forward
            .iter()
            .map(|b| MaglevBackend {
                id: b.id + 100,
                ..*b
            })
            .collect();
        let c = maglev_table(&renumbered, 4093, 1).unwrap();
        assert!(a.iter().zip(&c).all(|(x, y)| x + 100 == *y));
    }

    #[test]
    fn the_seed_changes_the_table() {
        let k = keys(5);
        let a = maglev_table(&backends(&k), 4093, 1).unwrap();
        let b = maglev_table(&backends(&k), 4093, 2).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn removing_one_backend_moves_little_more_than_its_own_slots() {
        let k = keys(100);
        let all = backends(&k);
        let before = maglev_table(&all, DEFAULT_TABLE_SIZE, 3).unwrap();
        let removed = 42u32;
        let fewer: Vec<_> = all.iter().copied().filter(|b| b.id != removed).collect();
        let after = maglev_table(&fewer, DEFAULT_TABLE_SIZE, 3).unwrap();
        let moved_others = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b != a)
            .count();
        // Slots of surviving backends that changed owner: the paper reports ~1–2% at this size.
        let fraction = moved_others as f64 / DEFAULT_TABLE_SIZE as f64;
        assert!(
            fraction < 0.03,
            "{:.2}% of slots of surviving backends moved",
            fraction * 100.0
        );
        assert!(after.iter().all(|id| *id != removed));
    }

    #[test]
    fn weights_set_the_share_and_zero_weight_gets_none() {
        let k = keys(3);
        let mut b = backends(&k);
        b[0].weight = 3;
        b[1].weight = 1;
        b[2].weight = 0;
        let counts = shares(&maglev_table(&b, 4093, 9).unwrap());
        assert_eq!(counts.get(&3), None);
        let ratio = counts[&1] as f64 / counts[&2] as f64;
        assert!((2.7..3.3).contains(&ratio), "weight 3:1 gave {ratio:.2}");
    }

    #[test]
    fn no_weighted_backend_means_an_empty_table_and_too_many_is_an_error() {
        let k = keys(2);
        let mut b = backends(&k);
        b.iter_mut().for_each(|b| b.weight = 0);
        assert!(maglev_table(&b, 251, 0).unwrap().is_empty());
        let many = keys(300);
        assert_eq!(
            maglev_table(&backends(&many), 251, 0),
            Err(MaglevError::TooSmall {
                size: 251,
                backends: 300
            })
        );
    }
}
