//! Jittered exponential backoff for failed reconciles, tracked per object.
//!
//! Our own small implementation (the `backoff` crate is unmaintained): the delay for the
//! n-th consecutive failure is `base * 2^n`, capped at `max`, then scaled by a random
//! factor in `[1 - jitter, 1]` so that objects failing together do not retry in lockstep.
//! Because jitter only ever shortens the delay, the cap is a hard upper bound.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The backoff curve of one controller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Backoff {
    /// Delay after the first failure, in milliseconds.
    pub base_millis: u64,
    /// Upper bound of any delay, in milliseconds.
    pub max_millis: u64,
    /// Fraction of the delay that is randomized away (0 = no jitter, 1 = full jitter).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_millis: 500,
            max_millis: 300_000,
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// Refuses a curve that cannot work, naming the keys of the `backoff` section.
    pub fn validate(&self) -> Result<(), String> {
        if self.base_millis == 0 || self.max_millis < self.base_millis {
            return Err("backoff: baseMillis must be > 0 and maxMillis >= baseMillis".into());
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err("backoff: jitter must be within 0..1".into());
        }
        Ok(())
    }

    /// The un-jittered delay after `failures` consecutive failures (`failures >= 1`).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(62);
        let millis = self
            .base_millis
            .saturating_mul(1u64 << exp)
            .min(self.max_millis);
        Duration::from_millis(millis)
    }

    /// The delay to wait after `failures` consecutive failures, jittered with `rng`.
    pub fn delay(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(failures);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return ceiling;
        }
        let factor = rng.random_range((1.0 - jitter)..=1.0);
        ceiling.mul_f64(factor)
    }
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    /// When the retry scheduled by the last failure becomes due.
    due: Instant,
    /// The retry has not started yet.
    waiting: bool,
}

/// Consecutive failures per object, so each object backs off on its own and a success
/// resets it.
#[derive(Debug, Default)]
pub struct BackoffTracker {
    backoff: Backoff,
    entries: Mutex<HashMap<String, Entry>>,
}

impl BackoffTracker {
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            entries: Mutex::default(),
        }
    }

    /// Records a failure of `key` and returns how long to wait before retrying it.
    pub fn failed(&self, key: &str) -> Duration {
        let mut entries = self.entries.lock().expect("backoff lock");
        let entry = entries.entry(key.to_string()).or_insert(Entry {
            failures: 0,
            due: Instant::now(),
            waiting: false,
        });
        entry.failures = entry.failures.saturating_add(1);
        let delay = self.backoff.delay(entry.failures, &mut rand::rng());
        entry.due = Instant::now() + delay;
        entry.waiting = true;
        delay
    }

    /// Forgets the failures of `key` (it reconciled successfully or is gone).
    pub fn reset(&self, key: &str) {
        self.entries.lock().expect("backoff lock").remove(key);
    }

    /// Consecutive failures of `key` so far.
    pub fn failures(&self, key: &str) -> u32 {
        let entries = self.entries.lock().expect("backoff lock");
        entries.get(key).map_or(0, |e| e.failures)
    }

    /// When the pending retry of `key` became (or becomes) due, if it waits for one.
    pub fn due(&self, key: &str) -> Option<Instant> {
        let entries = self.entries.lock().expect("backoff lock");
        entries.get(key).filter(|e| e.waiting).map(|e| e.due)
    }

    /// A reconcile of `key` starts: it no longer waits. Returns when its retry was due, if
    /// it was waiting for one.
    pub fn dequeued(&self, key: &str) -> Option<Instant> {
        let mut entries = self.entries.lock().expect("backoff lock");
        let entry = entries.get_mut(key).filter(|e| e.waiting)?;
        entry.waiting = false;
        Some(entry.due)
    }

    /// Objects whose last reconcile failed and whose retry has not started yet.
    pub fn waiting(&self) -> usize {
        let entries = self.entries.lock().expect("backoff lock");
        entries.values().filter(|e| e.waiting).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn curve() -> Backoff {
        Backoff {
            base_millis: 100,
            max_millis: 10_000,
            jitter: 0.5,
        }
    }

    #[test]
    fn ceiling_doubles_from_base_and_is_capped() {
        let b = curve();
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(5), Duration::from_millis(1600));
        assert_eq!(b.ceiling(8), Duration::from_millis(10_000));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(10_000));
    }

    #[test]
    fn jitter_stays_within_range_and_varies() {
        let b = curve();
        let mut rng = StdRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for failures in 1..=20 {
            for _ in 0..200 {
                let d = b.delay(failures, &mut rng);
                let ceiling = b.ceiling(failures);
                assert!(d <= ceiling, "{d:?} above {ceiling:?}");
                assert!(d >= ceiling.mul_f64(0.5), "{d:?} below half of {ceiling:?}");
                assert!(d <= Duration::from_millis(10_000), "cap exceeded: {d:?}");
                seen.insert(d.as_micros());
            }
        }
        assert!(
            seen.len() > 100,
            "jitter should spread delays, got {}",
            seen.len()
        );
    }

    #[test]
    fn no_jitter_is_exact() {
        let b = Backoff {
            jitter: 0.0,
            ..curve()
        };
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.delay(3, &mut rng), Duration::from_millis(400));
    }

    #[test]
    fn tracker_counts_per_object_and_resets_on_success() {
        let t = BackoffTracker::new(Backoff {
            jitter: 0.0,
            ..curve()
        });
        assert_eq!(t.failed("a"), Duration::from_millis(100));
        assert_eq!(t.failed("a"), Duration::from_millis(200));
        assert_eq!(t.failed("b"), Duration::from_millis(100));
        assert_eq!(t.failures("a"), 2);
        assert_eq!(t.waiting(), 2);
        assert!(t.dequeued("b").is_some());
        assert!(t.dequeued("b").is_none(), "a retry is dequeued once");
        assert_eq!(t.waiting(), 1);
        assert_eq!(t.failures("b"), 1, "dequeuing keeps the failure count");
        t.reset("a");
        assert_eq!(t.failures("a"), 0);
        assert!(t.due("a").is_none());
        assert_eq!(t.failed("a"), Duration::from_millis(100));
        assert_eq!(t.waiting(), 1);
    }
}
