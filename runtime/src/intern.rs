//! One shared copy of values that many cached objects repeat: node names in every
//! EndpointSlice, a label set in every pod of a Deployment. A cache holds the `Arc` the
//! interner hands out instead of its own copy.
//!
//! Values no object holds any more are dropped when the table has doubled since it was
//! last swept, so a churn of distinct values (a rollout's new `pod-template-hash`) costs
//! amortized O(1) per call and the table stays within twice what is in use.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Tables smaller than this are never swept.
const MIN_SWEEP: usize = 1024;

pub struct Interner<T: ?Sized> {
    table: Mutex<Table<T>>,
}

struct Table<T: ?Sized> {
    values: HashSet<Arc<T>>,
    /// Sweep when the table reaches this size.
    sweep_at: usize,
}

impl<T: ?Sized + Hash + Eq> Default for Interner<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    pub fn new() -> Self {
        Self {
            table: Mutex::new(Table {
                values: HashSet::new(),
                sweep_at: MIN_SWEEP,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<T>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many values the table holds (in use, or not yet swept).
    pub fn len(&self) -> usize {
        self.lock().values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: ?Sized + Hash + Eq> Table<T> {
    /// Adds `shared`, first dropping what only the table holds if it has doubled.
    fn insert(&mut self, shared: &Arc<T>) {
        if self.values.len() >= self.sweep_at {
            self.values.retain(|v| Arc::strong_count(v) > 1);
            self.sweep_at = (self.values.len() * 2).max(MIN_SWEEP);
        }
        self.values.insert(shared.clone());
    }
}

impl<T: Hash + Eq> Interner<T> {
    /// The shared copy of `value` (`value` itself, the first time).
    pub fn share(&self, value: T) -> Arc<T> {
        let mut table = self.lock();
        if let Some(shared) = table.values.get(&value) {
            return shared.clone();
        }
        let shared = Arc::new(value);
        table.insert(&shared);
        shared
    }
}

impl Interner<str> {
    pub fn intern(&self, value: &str) -> Arc<str> {
        let mut table = self.lock();
        if let Some(shared) = table.values.get(value) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(value);
        table.insert(&shared);
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn equal_values_share_one_copy() {
        let names = Interner::<str>::new();
        let a = names.intern("node-1");
        let b = names.intern(&String::from("node-1"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &names.intern("node-2")));
        assert_eq!(names.len(), 2);

        let sets = Interner::<BTreeMap<String, String>>::new();
        let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let x = sets.share(labels.clone());
        let y = sets.share(labels);
        assert!(Arc::ptr_eq(&x, &y));
    }

    #[test]
    fn values_nobody_holds_are_swept_as_the_table_grows() {
        let names = Interner::<str>::new();
        let kept: Vec<Arc<str>> = (0..100)
            .map(|i| names.intern(&format!("kept-{i}")))
            .collect();
        // A churn of values each dropped right away: the table never holds more than
        // twice what is in use (or the minimum before a sweep).
        for i in 0..100_000 {
            drop(names.intern(&format!("gone-{i}")));
            assert!(
                names.len() <= MIN_SWEEP.max(2 * kept.len()) + 1,
                "{}",
                names.len()
            );
        }
        // What is held survives every sweep, as the same copy.
        for (i, k) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(k, &names.intern(&format!("kept-{i}"))));
        }
    }
}
