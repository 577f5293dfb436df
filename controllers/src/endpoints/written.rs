//! The Endpoint specs this process applied that its (lagging) Endpoint cache has not
//! delivered yet. Without them, a pod that changes right after its Endpoint was created
//! is reconciled against a store without that Endpoint, and the next write starts at
//! revision 1 again — with new content under a revision the agents already reported as
//! realized.
//!
//! Unlike [`runtime::revisions::Revisions`] this is per pod *incarnation*: an Endpoint
//! written for a pod is comparable only with one of the same `spec.podUID` (a new pod of
//! the same name starts again at 1), and a deletion is not remembered (at 100k pods of
//! churn that memory would never shrink).

use std::collections::HashMap;
use std::sync::Mutex;
use tendril_crds::v1alpha1::{Endpoint, EndpointSpec};
use tendril_runtime::caches::Change;

/// Namespace and name of an Endpoint (its pod's).
pub type Key = (String, String);

#[derive(Default)]
pub struct Written {
    specs: Mutex<HashMap<Key, EndpointSpec>>,
}

impl Written {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, EndpointSpec>> {
        self.specs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// About to apply `spec`: recorded before the write, so a watch that delivers it
    /// before the write returns still finds it to forget.
    pub fn applying(&self, key: Key, spec: &EndpointSpec) {
        self.lock().insert(key, spec.clone());
    }

    /// The apply of `spec` failed: it must not stand for what the API holds.
    pub fn failed(&self, key: &Key, spec: &EndpointSpec) {
        let mut specs = self.lock();
        if specs.get(key).is_some_and(|s| s.revision == spec.revision) {
            specs.remove(key);
        }
    }

    /// What we wrote for pod `pod_uid` when the store has not caught up with it (`stored`
    /// older, of another pod, or none). Anything written for another pod is forgotten.
    pub fn ahead_of(
        &self,
        key: &Key,
        pod_uid: &str,
        stored: Option<&EndpointSpec>,
    ) -> Option<EndpointSpec> {
        let mut specs = self.lock();
        let ours = specs.get(key)?;
        let caught_up =
            stored.is_some_and(|s| s.pod_uid == ours.pod_uid && s.revision >= ours.revision);
        if ours.pod_uid != pod_uid || caught_up {
            specs.remove(key);
            return None;
        }
        Some(ours.clone())
    }

    /// The cache delivered `change`: a write of ours it holds now is forgotten, and so is
    /// one whose object was deleted.
    pub fn observe(&self, change: &Change<Endpoint>) {
        let (endpoint, deleted) = match change {
            Change::Applied(e) => (e, false),
            Change::Deleted(e) => (e, true),
            _ => return,
        };
        let (Some(ns), Some(name)) = (&endpoint.metadata.namespace, &endpoint.metadata.name) else {
            return;
        };
        let mut specs = self.lock();
        // The common case (nothing in flight) without building an owned key.
        if specs.is_empty() {
            return;
        }
        let key = (ns.clone(), name.clone());
        let Some(ours) = specs.get(&key) else { return };
        let seen = &endpoint.spec;
        if seen.pod_uid == ours.pod_uid && (deleted || seen.revision >= ours.revision) {
            specs.remove(&key);
        }
    }

    /// Writes not yet delivered by the cache.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn spec(pod_uid: &str, revision: i64, ip: &str) -> EndpointSpec {
        EndpointSpec {
            pod_uid: pod_uid.into(),
            revision,
            ips: vec![ip.into()],
            ..Default::default()
        }
    }

    fn endpoint(spec: EndpointSpec) -> Arc<Endpoint> {
        let mut ep = Endpoint::new("web", spec);
        ep.metadata.namespace = Some("shop".into());
        Arc::new(ep)
    }

    fn key() -> Key {
        ("shop".into(), "web".into())
    }

    #[test]
    fn a_write_the_store_lacks_stands_until_the_cache_delivers_it() {
        let written = Written::default();
        let first = spec("u1", 1, "10.0.0.1");
        written.applying(key(), &first);
        assert_eq!(written.ahead_of(&key(), "u1", None), Some(first.clone()));
        // An older revision in the store does not hide it.
        let older = spec("u1", 0, "10.0.0.9");
        assert_eq!(
            written.ahead_of(&key(), "u1", Some(&older)),
            Some(first.clone())
        );
        written.observe(&Change::Applied(endpoint(first.clone())));
        assert_eq!(written.len(), 0, "delivered: the store holds it");
        assert_eq!(written.ahead_of(&key(), "u1", Some(&first)), None);
    }

    #[test]
    fn the_store_catching_up_forgets_it_at_the_next_reconcile_too() {
        let written = Written::default();
        let ours = spec("u1", 2, "10.0.0.2");
        written.applying(key(), &ours);
        assert_eq!(written.ahead_of(&key(), "u1", Some(&ours)), None);
        assert_eq!(written.len(), 0);
    }

    #[test]
    fn another_pod_of_the_same_name_is_another_incarnation() {
        let written = Written::default();
        written.applying(key(), &spec("u1", 3, "10.0.0.1"));
        // The store holds the old pod's Endpoint at a higher revision: our write for the
        // new pod is still ahead of it.
        let ours = spec("u2", 1, "10.0.0.2");
        written.applying(key(), &ours);
        let old = spec("u1", 3, "10.0.0.1");
        assert_eq!(
            written.ahead_of(&key(), "u2", Some(&old)),
            Some(ours.clone())
        );
        // The old Endpoint's deletion arriving late does not forget the new write.
        written.observe(&Change::Deleted(endpoint(old)));
        assert_eq!(written.len(), 1);
        // Reconciling a third pod forgets what was written for the second.
        assert_eq!(written.ahead_of(&key(), "u3", None), None);
        assert_eq!(written.len(), 0);
    }

    #[test]
    fn a_deleted_or_failed_write_is_forgotten() {
        let written = Written::default();
        let ours = spec("u1", 1, "10.0.0.1");
        written.applying(key(), &ours);
        written.observe(&Change::Deleted(endpoint(ours.clone())));
        assert_eq!(written.len(), 0);

        written.applying(key(), &ours);
        written.failed(&key(), &spec("u1", 0, "x"));
        assert_eq!(written.len(), 1, "another write's failure");
        written.failed(&key(), &ours);
        assert_eq!(written.len(), 0);
    }
}
