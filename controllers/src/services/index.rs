//! The concern's in-memory state beside the caches: which EndpointSlices belong to which
//! Service ([`SliceIndex`]) and what the reconciles recorded for the status writer
//! ([`Board`]).

use super::{Key, service_of};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tendril_runtime::DesiredCondition;
use tendril_runtime::caches::Change;
use tokio::sync::Notify;

/// Which EndpointSlices belong to which Service, by name; the slices themselves are read
/// from the store. Updated from the same change stream that triggers the reconciles, so a
/// reconcile never misses the slice that triggered it.
#[derive(Clone, Default)]
pub(super) struct SliceIndex(Arc<Mutex<HashMap<Key, BTreeSet<String>>>>);

impl SliceIndex {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, BTreeSet<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn apply(&self, change: &Change<EndpointSlice>, store: &Store<EndpointSlice>) {
        let mut index = self.lock();
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
            Change::Listed => {
                index.clear();
                for slice in store.state() {
                    if let Some(key) = service_of(&slice) {
                        index.entry(key).or_default().insert(slice.name_any());
                    }
                }
            }
            Change::Failed(_) => {}
        }
    }

    pub(super) fn slices(
        &self,
        key: &Key,
        store: &Store<EndpointSlice>,
    ) -> Vec<Arc<EndpointSlice>> {
        let names: Vec<String> = self
            .lock()
            .get(key)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
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
    pub(super) generation: Option<i64>,
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

    pub(super) fn set(&self, key: Key, entry: Entry) {
        let changed = self.lock().insert(key, entry.clone()) != Some(entry);
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
