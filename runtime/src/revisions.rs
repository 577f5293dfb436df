//! Revisions of desired-state objects. Each desired-state spec carries a `revision` that
//! grows with every change of its content; the agent reports the revision its kernel state
//! realizes, which is how propagation is measured and how tests wait without sleeping.
//!
//! A concern that writes such objects compares what it wants with what exists ([`plan`]:
//! unchanged specs are left alone, changed ones get the previous revision + 1, new ones 1)
//! and remembers what it wrote and what it saw deleted ([`Revisions`]), because its store
//! lags behind its own writes, and an object deleted by someone else must come back with a
//! higher revision, never a lower one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tendril_crds::v1alpha1::{
    BGPNodeConfigSpec, EgressRouteSpec, LBServiceSpec, ResolvedPolicySpec,
};

/// A spec with a revision.
pub trait Revisioned: Clone {
    fn revision(&self) -> i64;
    fn set_revision(&mut self, revision: i64);
    /// Equal but for the revision.
    fn same_content(&self, other: &Self) -> bool;
}

impl Revisioned for ResolvedPolicySpec {
    fn revision(&self) -> i64 {
        self.revision
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
    }
    fn same_content(&self, other: &Self) -> bool {
        self.identity == other.identity
            && self.default_deny == other.default_deny
            && self.ingress == other.ingress
            && self.egress == other.egress
            && self.sources == other.sources
    }
}

impl Revisioned for LBServiceSpec {
    fn revision(&self) -> i64 {
        self.revision
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
    }
    fn same_content(&self, other: &Self) -> bool {
        // Destructured, so a new field cannot be forgotten here.
        let LBServiceSpec {
            revision: _,
            committed_revision: _,
            frontends,
            backends,
            session_affinity,
            external_traffic_policy,
            internal_traffic_policy,
            load_balancer_source_ranges,
            health_check_node_port,
            algorithm,
        } = self;
        *frontends == other.frontends
            && *backends == other.backends
            && *session_affinity == other.session_affinity
            && *external_traffic_policy == other.external_traffic_policy
            && *internal_traffic_policy == other.internal_traffic_policy
            && *load_balancer_source_ranges == other.load_balancer_source_ranges
            && *health_check_node_port == other.health_check_node_port
            && *algorithm == other.algorithm
    }
}

impl Revisioned for BGPNodeConfigSpec {
    fn revision(&self) -> i64 {
        self.revision
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
    }
    fn same_content(&self, other: &Self) -> bool {
        // Destructured, so a new field cannot be forgotten here.
        let BGPNodeConfigSpec {
            revision: _,
            node_name,
            routers,
        } = self;
        *node_name == other.node_name && *routers == other.routers
    }
}

impl Revisioned for EgressRouteSpec {
    fn revision(&self) -> i64 {
        self.revision
    }
    fn set_revision(&mut self, revision: i64) {
        self.revision = revision;
    }
    fn same_content(&self, other: &Self) -> bool {
        // Destructured, so a new field cannot be forgotten here.
        let EgressRouteSpec {
            revision: _,
            source_ips,
            destination_cidrs,
            excluded_cidrs,
            gateway_node,
            gateway_ip,
            egress_ip,
            interface,
        } = self;
        *source_ips == other.source_ips
            && *destination_cidrs == other.destination_cidrs
            && *excluded_cidrs == other.excluded_cidrs
            && *gateway_node == other.gateway_node
            && *gateway_ip == other.gateway_ip
            && *egress_ip == other.egress_ip
            && *interface == other.interface
    }
}

/// The writes that bring the API to the desired specs.
#[derive(Debug, PartialEq)]
pub struct Plan<Key, S> {
    /// Specs whose content changed (or that do not exist yet), with their new revision.
    pub apply: Vec<(Key, S)>,
    /// Objects that exist but are no longer desired.
    pub delete: Vec<Key>,
}

/// Compares `desired` with what exists (`current`: the latest spec known per key, written
/// by us or seen in the store). A spec equal but for the revision is left alone; a changed
/// one gets the previous revision + 1; a new one starts at 1, or after the revision in
/// `deleted` (objects deleted by someone else while still desired: put back without the
/// revision going backwards). Existing keys not desired are deleted when `prunable`.
pub fn plan<Key: Ord + Clone, S: Revisioned>(
    desired: &BTreeMap<Key, S>,
    current: &BTreeMap<Key, S>,
    deleted: &BTreeMap<Key, i64>,
    prunable: impl Fn(&Key) -> bool,
) -> Plan<Key, S> {
    let mut apply = Vec::new();
    for (key, spec) in desired {
        let revision = match current.get(key) {
            Some(prev) if prev.same_content(spec) => continue,
            Some(prev) => prev.revision() + 1,
            None => deleted.get(key).map_or(1, |r| r + 1),
        };
        let mut spec = spec.clone();
        spec.set_revision(revision);
        apply.push((key.clone(), spec));
    }
    let delete = current
        .keys()
        .filter(|key| prunable(key) && !desired.contains_key(key))
        .cloned()
        .collect();
    Plan { apply, delete }
}

/// A spec this process wrote, or saw deleted.
#[derive(Clone, Debug)]
struct Known<S> {
    spec: S,
    /// The watch reported the object deleted (while it may still be desired).
    deleted: bool,
}

/// What this process wrote and saw deleted, per key, beyond its (lagging) store. Cheap to
/// clone; clones share it.
#[derive(Clone, Debug)]
pub struct Revisions<Key, S> {
    known: Arc<Mutex<BTreeMap<Key, Known<S>>>>,
}

impl<Key, S> Default for Revisions<Key, S> {
    fn default() -> Self {
        Self {
            known: Arc::default(),
        }
    }
}

impl<Key: Ord + Clone, S: Revisioned> Revisions<Key, S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, Known<S>>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `spec` for `key` unless a newer revision is known.
    fn remember(&self, key: Key, spec: &S, deleted: bool) {
        let mut known = self.lock();
        if known
            .get(&key)
            .is_none_or(|k| k.spec.revision() <= spec.revision())
        {
            known.insert(
                key,
                Known {
                    spec: spec.clone(),
                    deleted,
                },
            );
        }
    }

    /// We wrote `spec`.
    pub fn wrote(&self, key: Key, spec: &S) {
        self.remember(key, spec, false);
    }

    /// The watch saw the object deleted in state `spec`.
    pub fn deleted(&self, key: Key, spec: &S) {
        self.remember(key, spec, true);
    }

    /// The watch delivered `key` at `revision`: a write of ours it has caught up with is
    /// forgotten now, not at the key's next reconcile (which may never come: a concern
    /// that wrote 10k objects would otherwise hold a second copy of each).
    pub fn caught_up(&self, key: &Key, revision: i64) {
        let mut known = self.lock();
        if known
            .get(key)
            .is_some_and(|k| !k.deleted && k.spec.revision() <= revision)
        {
            known.remove(key);
        }
    }

    /// How many writes and deletions are remembered (writes the store has not caught up
    /// with).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// We are deleting the object ourselves: nothing to remember.
    pub fn forget(&self, key: &Key) {
        self.lock().remove(key);
    }

    /// The latest spec known for one `key`: `stored` (the store's), or ours when we wrote a
    /// newer one; `None` when the store has none and ours was seen deleted since (or we
    /// never wrote one). The one-key form of [`Revisions::current`], for a concern that
    /// reconciles object by object. What the store has caught up with is forgotten, so the
    /// memory holds only the writes still in flight.
    pub fn latest(&self, key: &Key, stored: Option<S>) -> Option<S> {
        let mut known = self.lock();
        match (known.get(key), stored) {
            (Some(k), Some(s)) if !k.deleted && k.spec.revision() > s.revision() => {
                Some(k.spec.clone())
            }
            (Some(k), None) if !k.deleted => Some(k.spec.clone()),
            (Some(k), Some(s)) if !k.deleted => {
                known.remove(key);
                Some(s)
            }
            (_, stored) => stored,
        }
    }

    /// The latest spec per key (the store's, or ours when we wrote a newer one), and the
    /// last revision of those deleted by someone else — the `current` and `deleted` of
    /// [`plan`].
    pub fn current(
        &self,
        stored: impl IntoIterator<Item = (Key, S)>,
    ) -> (BTreeMap<Key, S>, BTreeMap<Key, i64>) {
        let known = self.lock();
        let mut current: BTreeMap<Key, S> = stored.into_iter().collect();
        let mut deleted = BTreeMap::new();
        for (key, k) in known.iter() {
            if k.deleted {
                if !current.contains_key(key) {
                    deleted.insert(key.clone(), k.spec.revision());
                }
                continue;
            }
            match current.get(key) {
                Some(seen) if seen.revision() >= k.spec.revision() => {}
                _ => {
                    current.insert(key.clone(), k.spec.clone());
                }
            }
        }
        (current, deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec: content and revision.
    #[derive(Clone, Debug, PartialEq)]
    struct Spec(&'static str, i64);

    impl Revisioned for Spec {
        fn revision(&self) -> i64 {
            self.1
        }
        fn set_revision(&mut self, revision: i64) {
            self.1 = revision;
        }
        fn same_content(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }

    fn map<const N: usize>(entries: [(u32, Spec); N]) -> BTreeMap<u32, Spec> {
        entries.into()
    }

    #[test]
    fn plan_numbers_new_changed_and_restored_specs_and_prunes_what_it_may() {
        let desired = map([
            (1, Spec("a", 0)),
            (2, Spec("b", 0)),
            (3, Spec("c", 0)),
            (4, Spec("d", 0)),
        ]);
        let current = map([
            (1, Spec("a", 4)),
            (2, Spec("old", 7)),
            (8, Spec("x", 1)),
            (9, Spec("y", 1)),
        ]);
        let deleted = [(4, 5)].into();
        let p = plan(&desired, &current, &deleted, |k| *k != 9);
        assert_eq!(
            p,
            Plan {
                apply: vec![(2, Spec("b", 8)), (3, Spec("c", 1)), (4, Spec("d", 6))],
                delete: vec![8],
            }
        );
    }

    #[test]
    fn our_writes_count_until_the_store_catches_up() {
        let revisions = Revisions::default();
        revisions.wrote(1, &Spec("new", 3));
        // The store still shows revision 2: ours is the current one.
        let (current, deleted) = revisions.current([(1, Spec("old", 2))]);
        assert_eq!(current, map([(1, Spec("new", 3))]));
        assert!(deleted.is_empty());
        // The store caught up (or moved past us): the store's.
        let (current, _) = revisions.current([(1, Spec("newer", 4))]);
        assert_eq!(current, map([(1, Spec("newer", 4))]));
        // An older write never replaces a newer one.
        revisions.wrote(1, &Spec("stale", 2));
        let (current, _) = revisions.current([]);
        assert_eq!(current, map([(1, Spec("new", 3))]));
    }

    #[test]
    fn a_deletion_by_someone_else_is_remembered_until_the_object_is_back() {
        let revisions = Revisions::default();
        revisions.wrote(1, &Spec("a", 5));
        revisions.deleted(1, &Spec("a", 5));
        let (current, deleted) = revisions.current([]);
        assert!(current.is_empty());
        assert_eq!(deleted, [(1, 5)].into());
        // Put back (revision 6) and seen in the store: nothing deleted any more.
        let (current, deleted) = revisions.current([(1, Spec("a", 6))]);
        assert_eq!(current, map([(1, Spec("a", 6))]));
        assert!(deleted.is_empty());
        // Deleting it ourselves forgets it.
        revisions.forget(&1);
        assert_eq!(revisions.current([]), (BTreeMap::new(), BTreeMap::new()));
    }

    #[test]
    fn latest_of_one_key_prefers_the_newer_and_forgets_the_deleted() {
        let revisions = Revisions::default();
        assert_eq!(revisions.latest(&1, None), None);
        assert_eq!(revisions.latest(&1, Some(Spec("s", 2))), Some(Spec("s", 2)));
        revisions.wrote(1, &Spec("ours", 3));
        assert_eq!(
            revisions.latest(&1, None),
            Some(Spec("ours", 3)),
            "store lags"
        );
        assert_eq!(
            revisions.latest(&1, Some(Spec("old", 2))),
            Some(Spec("ours", 3))
        );
        assert_eq!(
            revisions.latest(&1, Some(Spec("new", 4))),
            Some(Spec("new", 4))
        );
        // The store caught up: forgotten, the store's is the latest from now on.
        assert_eq!(revisions.latest(&1, None), None);
        revisions.wrote(1, &Spec("ours", 5));
        revisions.deleted(1, &Spec("ours", 5));
        assert_eq!(revisions.latest(&1, None), None, "deleted by someone else");
    }

    #[test]
    fn a_write_the_watch_caught_up_with_is_forgotten() {
        let revisions = Revisions::default();
        revisions.wrote(1, &Spec("ours", 3));
        revisions.wrote(2, &Spec("ours", 4));
        revisions.caught_up(&1, 2);
        assert_eq!(
            revisions.len(),
            2,
            "an older revision seen: ours is still newer"
        );
        revisions.caught_up(&1, 3);
        revisions.caught_up(&2, 7);
        assert!(revisions.is_empty());
        assert_eq!(revisions.latest(&1, Some(Spec("s", 3))), Some(Spec("s", 3)));
        // A deletion seen is kept: it numbers the object's next creation.
        revisions.deleted(1, &Spec("s", 3));
        revisions.caught_up(&1, 3);
        assert_eq!(revisions.len(), 1);
    }
}
