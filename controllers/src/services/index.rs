//! The concern's in-memory state beside the caches: which EndpointSlices belong to which
//! Service ([`SliceIndex`]) and what the reconciles recorded for the status writer
//! ([`Board`]).

use super::slice::SliceInfo;
use super::{Key, service_of};
use futures::FutureExt;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tendril_runtime::DesiredCondition;
use tendril_runtime::caches::Change;
use tokio::sync::Notify;

/// Which EndpointSlices belong to which Service, by name; the slices themselves are read
/// from the store. Updated from the same change stream that triggers the reconciles, so a
/// reconcile never misses the slice that triggered it. Built from the store at its first
/// use when that stream has not delivered its first list yet: the Services' own stream
/// races it at start, and a Service reconciled against an empty index would be written
/// without backends (an operator restart would publish every such Service empty).
#[derive(Clone, Default)]
pub(super) struct SliceIndex(Arc<Mutex<Slices>>);

#[derive(Default)]
pub(super) struct Slices {
    /// The index holds a complete list (from the stream's or from the store).
    complete: bool,
    by_service: HashMap<Key, BTreeSet<String>>,
}

impl Slices {
    fn rebuild(&mut self, store: &Store<SliceInfo>) {
        self.by_service.clear();
        for slice in store.state() {
            if let Some(key) = service_of(&slice) {
                self.by_service
                    .entry(key)
                    .or_default()
                    .insert(slice.name_any());
            }
        }
        self.complete = true;
    }
}

impl SliceIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slices> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn apply(&self, change: &Change<SliceInfo>, store: &Store<SliceInfo>) {
        let mut slices = self.lock();
        let index = &mut slices.by_service;
        match change {
            Change::Applied(slice) => {
                if let Some(key) = service_of(slice) {
                    index.entry(key).or_default().insert(slice.name_any());
                }
            }
            Change::Deleted(slice) => {
                if let Some(key) = service_of(slice)
                    && let Some(names) = index.get_mut(&key)
                {
                    names.remove(&slice.name_any());
                    if names.is_empty() {
                        index.remove(&key);
                    }
                }
            }
            // A relist: the store is complete; rebuild from it (what the stream replays
            // next is already in).
            Change::Listed => slices.rebuild(store),
            Change::Failed(_) => {}
        }
    }

    pub(super) fn slices(&self, key: &Key, store: &Store<SliceInfo>) -> Vec<Arc<SliceInfo>> {
        let names: Vec<String> = {
            let mut slices = self.lock();
            if !slices.complete && matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
                slices.rebuild(store);
            }
            slices
                .by_service
                .get(key)
                .map(|n| n.iter().cloned().collect())
                .unwrap_or_default()
        };
        names
            .iter()
            .filter_map(|n| store.get(&ObjectRef::new(n).within(&key.0)))
            .filter(|s| service_of(s).as_ref() == Some(key))
            .collect()
    }
}

/// What the reconciles recorded per served Service, for the status writer.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Entry {
    pub(super) valid: DesiredCondition,
    pub(super) revision: i64,
    /// The LBService's generation after the write of `revision` (our own writes are
    /// recognised by it and trigger nothing).
    pub(super) generation: Option<i64>,
    /// When this process first recorded `revision` (its `Realized` deadline runs from
    /// here; a revision found at start runs from the start).
    pub(super) since: Instant,
    pub(super) backends: usize,
}

#[derive(Default)]
pub(super) struct Board {
    entries: Mutex<HashMap<Key, Entry>>,
    pub(super) wake: Notify,
}

impl Board {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `entry`; one at the revision already recorded keeps its `since`.
    pub(super) fn set(&self, key: Key, mut entry: Entry) {
        let mut entries = self.lock();
        if let Some(old) = entries.get(&key)
            && old.revision == entry.revision
        {
            entry.since = old.since;
        }
        let changed = entries.insert(key, entry.clone()) != Some(entry);
        drop(entries);
        if changed {
            self.wake.notify_one();
        }
    }

    pub(super) fn get(&self, key: &Key) -> Option<Entry> {
        self.lock().get(key).cloned()
    }

    pub(super) fn remove(&self, key: &Key) {
        if self.lock().remove(key).is_some() {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn slice(name: &str, service: &str) -> SliceInfo {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": [],
        }))
        .unwrap()
    }

    fn listed_store(slices: &[SliceInfo]) -> Store<SliceInfo> {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for s in slices {
            writer.apply_watcher_event(&Event::InitApply(s.clone()));
        }
        writer.apply_watcher_event(&Event::InitDone);
        store
    }

    fn names(v: Vec<Arc<SliceInfo>>) -> Vec<String> {
        v.iter().map(|s| s.name_any()).collect()
    }

    #[test]
    fn a_reconcile_before_the_slice_stream_listed_still_sees_the_stored_slices() {
        let store = listed_store(&[slice("web-a", "web"), slice("web-b", "web")]);
        let index = SliceIndex::default();
        let web: Key = ("default".into(), "web".into());
        // The Services' stream won the race: no change of slices was applied yet.
        assert_eq!(names(index.slices(&web, &store)), ["web-a", "web-b"]);
        // The slice stream's replay then changes nothing; later changes apply as usual.
        index.apply(&Change::Listed, &store);
        index.apply(&Change::Deleted(Arc::new(slice("web-a", "web"))), &store);
        assert_eq!(names(index.slices(&web, &store)), ["web-b"]);
    }

    #[test]
    fn an_unlisted_store_leaves_the_index_to_the_stream() {
        let (store, _writer) = reflector::store::<SliceInfo>();
        let index = SliceIndex::default();
        let web: Key = ("default".into(), "web".into());
        assert!(index.slices(&web, &store).is_empty());
        index.apply(&Change::Applied(Arc::new(slice("web-a", "web"))), &store);
        assert!(!index.lock().complete, "one change is not a complete list");
    }
}
