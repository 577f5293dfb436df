//! How many `Endpoint`s carry each identity, kept from the Endpoint change stream.
//!
//! Counting by scanning every Endpoint cost endpoints × identities per round of
//! reconciles: at 10,000 pods and ~500 identities the scale harness saw the identities
//! concern's reconciles grow ×11 from 10% to 30% of the full size. The index makes a count
//! one lookup; each Endpoint change costs O(1).

use std::collections::HashMap;

/// Endpoints per identity, and each endpoint's identity (to move its reference when it
/// changes identity or goes).
#[derive(Debug, Default)]
pub struct References {
    identity_of: HashMap<String, i64>,
    counts: HashMap<i64, i64>,
}

impl References {
    /// An endpoint (by `namespace/name`) now carries `identity` (`None`: none yet). Returns
    /// the identity it carried before, when that changed.
    pub fn set(&mut self, endpoint: &str, identity: Option<i64>) -> Option<i64> {
        let previous = match identity {
            Some(id) => self.identity_of.insert(endpoint.to_string(), id),
            None => self.identity_of.remove(endpoint),
        };
        if previous == identity {
            return None;
        }
        if let Some(old) = previous {
            self.release(old);
        }
        if let Some(new) = identity {
            *self.counts.entry(new).or_default() += 1;
        }
        previous
    }

    /// The endpoint is gone; the identity it carried, if any.
    pub fn remove(&mut self, endpoint: &str) -> Option<i64> {
        let previous = self.identity_of.remove(endpoint)?;
        self.release(previous);
        Some(previous)
    }

    /// Rebuilt from a complete list (after a relist or a lagged change stream, which may
    /// hide deletions). Returns the identities whose count changed: the changes that were
    /// missed moved them, and one left without endpoints must be looked at, or garbage
    /// collection never sees it.
    pub fn reset<'a>(
        &mut self,
        endpoints: impl IntoIterator<Item = (String, Option<i64>)> + 'a,
    ) -> Vec<i64> {
        let before = std::mem::take(&mut self.counts);
        self.identity_of.clear();
        for (endpoint, identity) in endpoints {
            self.set(&endpoint, identity);
        }
        let mut changed: Vec<i64> = before
            .iter()
            .filter(|(id, n)| self.counts.get(id) != Some(n))
            .map(|(id, _)| *id)
            .chain(
                self.counts
                    .keys()
                    .filter(|id| !before.contains_key(id))
                    .copied(),
            )
            .collect();
        changed.sort_unstable();
        changed
    }

    /// The identity the endpoint carries, as far as the index knows.
    pub fn identity_of(&self, endpoint: &str) -> Option<i64> {
        self.identity_of.get(endpoint).copied()
    }

    pub fn count(&self, identity: i64) -> i64 {
        self.counts.get(&identity).copied().unwrap_or(0)
    }

    fn release(&mut self, identity: i64) {
        if let Some(n) = self.counts.get_mut(&identity) {
            *n -= 1;
            if *n <= 0 {
                self.counts.remove(&identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_names_the_identities_whose_count_the_missed_changes_moved() {
        let mut r = References::default();
        r.set("ns/a", Some(300));
        r.set("ns/b", Some(300));
        r.set("ns/c", Some(301));
        r.set("ns/d", Some(302));
        // Missed: c deleted (301 left without endpoints), b moved to 303, d unchanged.
        let changed = r.reset([
            ("ns/a".to_string(), Some(300)),
            ("ns/b".to_string(), Some(303)),
            ("ns/d".to_string(), Some(302)),
        ]);
        assert_eq!(changed, [300, 301, 303]);
        assert_eq!((r.count(300), r.count(301), r.count(303)), (1, 0, 1));
        assert!(
            r.reset([
                ("ns/a".to_string(), Some(300)),
                ("ns/b".to_string(), Some(303)),
                ("ns/d".to_string(), Some(302)),
            ])
            .is_empty()
        );
    }

    #[test]
    fn references_follow_endpoints_between_identities() {
        let mut r = References::default();
        assert_eq!(r.set("ns/a", Some(300)), None);
        assert_eq!(r.set("ns/b", Some(300)), None);
        assert_eq!(r.set("ns/c", None), None);
        assert_eq!(r.count(300), 2);
        // The same identity again changes nothing.
        assert_eq!(r.set("ns/a", Some(300)), None);
        assert_eq!(r.count(300), 2);
        // a moves to 301: 300 loses it.
        assert_eq!(r.set("ns/a", Some(301)), Some(300));
        assert_eq!((r.count(300), r.count(301)), (1, 1));
        // b loses its identity, then goes.
        assert_eq!(r.set("ns/b", None), Some(300));
        assert_eq!(r.count(300), 0);
        assert_eq!(r.remove("ns/b"), None);
        assert_eq!(r.remove("ns/a"), Some(301));
        assert_eq!(r.count(301), 0);
        assert!(r.counts.is_empty() && r.identity_of.is_empty());
    }

    #[test]
    fn a_relist_replaces_everything() {
        let mut r = References::default();
        r.set("ns/gone", Some(300));
        r.set("ns/kept", Some(301));
        r.reset([
            ("ns/kept".to_string(), Some(301)),
            ("ns/new".to_string(), Some(301)),
        ]);
        assert_eq!((r.count(300), r.count(301)), (0, 2));
    }

    /// The index agrees with counting by scan after any sequence of changes.
    #[test]
    fn agrees_with_a_scan() {
        let mut r = References::default();
        let mut truth: HashMap<String, Option<i64>> = HashMap::new();
        let mut seed = 7u64;
        for _ in 0..5_000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let endpoint = format!("ns/{}", (seed >> 33) % 50);
            let identity = match (seed >> 20) % 6 {
                0 => None,
                n => Some(300 + n as i64),
            };
            if (seed >> 40).is_multiple_of(5) {
                r.remove(&endpoint);
                truth.remove(&endpoint);
            } else {
                r.set(&endpoint, identity);
                truth.insert(endpoint, identity);
            }
            for id in 300..306 {
                let scanned = truth.values().filter(|v| **v == Some(id)).count() as i64;
                assert_eq!(r.count(id), scanned, "identity {id}");
            }
        }
    }
}
