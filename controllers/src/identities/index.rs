//! Identity numbering, the in-memory identity index and garbage-collection decisions: pure
//! values, no Kubernetes client.
//!
//! Numbering follows Cilium: 0 unknown, 1–8 reserved ([`Reserved`]), 256–65535 cluster
//! identities. New cluster ids are picked next-fit: the cursor starts after the highest id
//! known at start and moves forward, wrapping around at 65535. Compared with lowest-free,
//! next-fit delays the reuse of a just-collected id as long as possible (a node that missed
//! the deletion still maps the old id to the old labels for a while), and it stays
//! deterministic. Compared with a random start, two replicas racing pick the same candidate
//! and collide on the `Identity` name; the loser learns the winner's labels from the 409 and
//! takes the next id — one extra round trip, and no ids scattered over the space. Creation
//! under the numeric name is the lock, so correctness never depends on the choice.
//!
//! The operator may hand out fewer ids than the whole cluster range
//! (`identities.clusterIdMax`): [`IdentityIndex::with_max`] caps the range, and
//! [`IdentityIndex::space`] says how much of it is in use.

use super::labels::{SOURCE_RESERVED, SecurityLabels};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

pub use tendril_crds::facts::{
    CLUSTER_IDENTITY_MAX as CLUSTER_MAX, CLUSTER_IDENTITY_MIN as CLUSTER_MIN,
    IDENTITY_UNKNOWN as UNKNOWN, Reserved,
};

/// `{"reserved:<name>": ""}`: the security labels of a reserved identity.
pub fn reserved_labels(r: Reserved) -> SecurityLabels {
    SecurityLabels::from([(format!("{SOURCE_RESERVED}{}", r.name()), String::new())])
}

/// What kind of id a number is (the `type` label of `tendril_identities`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    Reserved,
    Cluster,
    /// Outside both ranges; never allocated by Tendril.
    Invalid,
}

impl IdentityKind {
    pub fn of(id: i64) -> IdentityKind {
        if Reserved::from_id(id).is_some() {
            IdentityKind::Reserved
        } else if (CLUSTER_MIN..=CLUSTER_MAX).contains(&id) {
            IdentityKind::Cluster
        } else {
            IdentityKind::Invalid
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Reserved => "reserved",
            IdentityKind::Cluster => "cluster",
            IdentityKind::Invalid => "invalid",
        }
    }
}

/// Every cluster id the operator may hand out is taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "identity space exhausted: every cluster identity id from {CLUSTER_MIN} to identities.clusterIdMax is in use; ids come back as unused identities are collected"
)]
pub struct Exhausted;

/// How much of the cluster id range the operator hands out is in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    /// Ids in the range that an `Identity` holds or a creation has reserved.
    pub used: u64,
    /// Ids in the range.
    pub capacity: u64,
}

/// The identities known to this process: id ↔ labels, ids being created, and when each id
/// was last handed to an endpoint (so garbage collection never races an allocation).
#[derive(Clone, Debug)]
pub struct IdentityIndex {
    by_id: BTreeMap<i64, SecurityLabels>,
    /// Labels → ids carrying them. Normally one; two replicas racing without a lease could
    /// leave two, and then the lowest is canonical and the other is collected once unused.
    by_labels: HashMap<SecurityLabels, BTreeSet<i64>>,
    /// Ids whose `Identity` is being created by this process.
    pending: BTreeSet<i64>,
    last_used: HashMap<i64, Timestamp>,
    /// Next candidate id.
    cursor: i64,
    /// The highest cluster id handed out (`identities.clusterIdMax`).
    max: i64,
}

impl Default for IdentityIndex {
    fn default() -> Self {
        IdentityIndex {
            by_id: BTreeMap::new(),
            by_labels: HashMap::new(),
            pending: BTreeSet::new(),
            last_used: HashMap::new(),
            cursor: CLUSTER_MIN,
            max: CLUSTER_MAX,
        }
    }
}

impl IdentityIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// An index that hands out cluster ids from [`CLUSTER_MIN`] to `max` only (clamped to
    /// the cluster range).
    pub fn with_max(max: i64) -> Self {
        IdentityIndex {
            max: max.clamp(CLUSTER_MIN, CLUSTER_MAX),
            ..Self::default()
        }
    }

    /// Ids in use and ids available in the range this index hands out.
    pub fn space(&self) -> Space {
        let in_range = |id: &i64| (CLUSTER_MIN..=self.max).contains(id);
        let known = self.by_id.range(CLUSTER_MIN..=self.max).count();
        let pending = self
            .pending
            .iter()
            .filter(|id| in_range(id) && !self.by_id.contains_key(id))
            .count();
        Space {
            used: (known + pending) as u64,
            capacity: (self.max - CLUSTER_MIN + 1) as u64,
        }
    }

    /// An `Identity` exists (seen on a watch, created, or met on a 409).
    pub fn apply(&mut self, id: i64, labels: SecurityLabels) {
        self.pending.remove(&id);
        if let Some(old) = self.by_id.insert(id, labels.clone())
            && old != labels
        {
            self.unlink(id, &old);
        }
        self.by_labels.entry(labels).or_default().insert(id);
    }

    /// An `Identity` is gone.
    pub fn delete(&mut self, id: i64) {
        if let Some(labels) = self.by_id.remove(&id) {
            self.unlink(id, &labels);
        }
        self.last_used.remove(&id);
    }

    /// Replaces the contents with a full listing (watch restart), keeping pending ids.
    pub fn reset(&mut self, identities: impl IntoIterator<Item = (i64, SecurityLabels)>) {
        self.by_id.clear();
        self.by_labels.clear();
        for (id, labels) in identities {
            self.apply(id, labels);
        }
        self.last_used.retain(|id, _| self.by_id.contains_key(id));
    }

    /// Moves the cursor after the highest cluster id known (call once the initial list is in).
    pub fn start_after_highest(&mut self) {
        let highest = self
            .by_id
            .range(CLUSTER_MIN..=self.max)
            .next_back()
            .map(|(id, _)| *id);
        self.cursor = highest.map_or(CLUSTER_MIN, |id| self.wrap_next(id));
    }

    fn unlink(&mut self, id: i64, labels: &SecurityLabels) {
        if let Some(ids) = self.by_labels.get_mut(labels) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_labels.remove(labels);
            }
        }
    }

    /// The canonical id of a label set (the lowest, should there be several).
    pub fn lookup(&self, labels: &SecurityLabels) -> Option<i64> {
        self.by_labels
            .get(labels)
            .and_then(|ids| ids.first().copied())
    }

    pub fn labels(&self, id: i64) -> Option<&SecurityLabels> {
        self.by_id.get(&id)
    }

    /// Ids carrying labels another (lower) id also carries.
    pub fn is_duplicate(&self, id: i64) -> bool {
        self.by_id
            .get(&id)
            .and_then(|l| self.lookup(l))
            .is_some_and(|canonical| canonical != id)
    }

    /// Picks the next free cluster id and marks it pending; the caller creates the
    /// `Identity` and then calls [`IdentityIndex::apply`] or [`IdentityIndex::abandon`].
    pub fn reserve_next(&mut self) -> Result<i64, Exhausted> {
        let span = self.max - CLUSTER_MIN + 1;
        let mut candidate = self.cursor;
        for _ in 0..span {
            if !self.by_id.contains_key(&candidate) && !self.pending.contains(&candidate) {
                self.pending.insert(candidate);
                self.cursor = self.wrap_next(candidate);
                return Ok(candidate);
            }
            candidate = self.wrap_next(candidate);
        }
        Err(Exhausted)
    }

    /// A reserved id was not created after all.
    pub fn abandon(&mut self, id: i64) {
        self.pending.remove(&id);
    }

    /// Records that an endpoint was just given `id`.
    pub fn touch(&mut self, id: i64, now: Timestamp) {
        let entry = self.last_used.entry(id).or_insert(now);
        if *entry < now {
            *entry = now;
        }
    }

    pub fn last_used(&self, id: i64) -> Option<Timestamp> {
        self.last_used.get(&id).copied()
    }

    /// Known identities by kind, for the `tendril_identities{type}` gauge.
    pub fn count(&self, kind: IdentityKind) -> usize {
        self.by_id
            .keys()
            .filter(|id| IdentityKind::of(**id) == kind)
            .count()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.by_id.keys().copied()
    }

    /// The id after `id` in the range handed out, wrapping around.
    fn wrap_next(&self, id: i64) -> i64 {
        if !(CLUSTER_MIN..self.max).contains(&id) {
            CLUSTER_MIN
        } else {
            id + 1
        }
    }
}

/// Counts, per identity id, the endpoints that use it.
pub fn count_references(
    identities_of_endpoints: impl IntoIterator<Item = i64>,
) -> HashMap<i64, i64> {
    let mut refs = HashMap::new();
    for id in identities_of_endpoints {
        *refs.entry(id).or_insert(0) += 1;
    }
    refs
}

/// What the identities concern does with one `Identity`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcDecision {
    /// Keep it; its status should read `references` and `last_referenced`. When unused,
    /// look again after `recheck_after`.
    Keep {
        references: i64,
        last_referenced: Option<Timestamp>,
        recheck_after: Option<Duration>,
    },
    /// Unreferenced for the whole grace period: delete it.
    Collect,
}

/// Decides whether an identity stays, from its references (endpoints using it now), the
/// `status.lastReferenced` it carries, the last time this process handed it out, the
/// current time and the grace period. Reserved identities always stay.
pub fn gc_decision(
    id: i64,
    references: i64,
    status_last_referenced: Option<Timestamp>,
    last_used: Option<Timestamp>,
    now: Timestamp,
    grace: Duration,
) -> GcDecision {
    if references > 0 || IdentityKind::of(id) == IdentityKind::Reserved {
        return GcDecision::Keep {
            references,
            last_referenced: None,
            recheck_after: None,
        };
    }
    // Unreferenced since the status says, or since now when it only just became so; an
    // allocation this process made later pushes the deadline out.
    let since = status_last_referenced
        .unwrap_or(now)
        .max(last_used.unwrap_or(Timestamp::MIN));
    let grace = SignedDuration::try_from(grace).unwrap_or(SignedDuration::MAX);
    let deadline = since.checked_add(grace).unwrap_or(Timestamp::MAX);
    if now >= deadline {
        GcDecision::Collect
    } else {
        GcDecision::Keep {
            references: 0,
            last_referenced: Some(since),
            recheck_after: Duration::try_from(deadline.duration_since(now)).ok(),
        }
    }
}

/// When to write an Identity's status. `shown`: the `references` and `lastReferenced` it
/// carries (`None`: no status yet); `want`: what they should be; `since_write`: how long
/// ago this process last wrote it. A change of whether the identity is used (what garbage
/// collection reads) is written at once; a count that only moves between positive values
/// waits until `refresh` has passed since the last write, so a busy identity's churn costs
/// one status write per `refresh`, not one per pod. `Err(wait)`: look again after `wait`.
pub fn references_write_due(
    shown: Option<(i64, Option<Timestamp>)>,
    want: (i64, Option<Timestamp>),
    since_write: Option<Duration>,
    refresh: Duration,
) -> Result<bool, Duration> {
    let Some(shown) = shown else {
        return Ok(true);
    };
    if shown == want {
        return Ok(false);
    }
    if (shown.0 > 0) != (want.0 > 0) || shown.1 != want.1 {
        return Ok(true);
    }
    match since_write {
        Some(ago) if ago < refresh => Err(refresh - ago),
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_positive_count_is_refreshed_at_most_once_per_interval() {
        let t = Timestamp::from_second(100).unwrap();
        let s = Duration::from_secs;
        // No status yet, or whether it is used changes: at once.
        assert_eq!(
            references_write_due(None, (3, None), Some(s(1)), s(30)),
            Ok(true)
        );
        assert_eq!(
            references_write_due(Some((2, None)), (0, Some(t)), Some(s(1)), s(30)),
            Ok(true)
        );
        assert_eq!(
            references_write_due(Some((0, Some(t))), (1, None), Some(s(1)), s(30)),
            Ok(true)
        );
        // Nothing changed: nothing to write.
        assert_eq!(
            references_write_due(Some((2, None)), (2, None), None, s(30)),
            Ok(false)
        );
        // 2 → 3 written 10 s ago: wait 20 s; 40 s ago, or never by this process: now.
        assert_eq!(
            references_write_due(Some((2, None)), (3, None), Some(s(10)), s(30)),
            Err(s(20))
        );
        assert_eq!(
            references_write_due(Some((2, None)), (3, None), Some(s(40)), s(30)),
            Ok(true)
        );
        assert_eq!(
            references_write_due(Some((2, None)), (3, None), None, s(30)),
            Ok(true)
        );
        // A zero interval writes every change.
        assert_eq!(
            references_write_due(Some((2, None)), (3, None), Some(s(0)), s(0)),
            Ok(true)
        );
    }

    fn labels(app: &str) -> SecurityLabels {
        SecurityLabels::from([("k8s:app".to_string(), app.to_string())])
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn reserved_numbering_matches_cilium() {
        let ids: Vec<(i64, &str)> = Reserved::ALL.iter().map(|r| (r.id(), r.name())).collect();
        assert_eq!(
            ids,
            vec![
                (1, "host"),
                (2, "world"),
                (3, "unmanaged"),
                (4, "health"),
                (5, "init"),
                (6, "remote-node"),
                (7, "kube-apiserver"),
                (8, "ingress")
            ]
        );
        assert_eq!(
            reserved_labels(Reserved::World),
            SecurityLabels::from([("reserved:world".into(), String::new())])
        );
        assert_eq!(IdentityKind::of(UNKNOWN), IdentityKind::Invalid);
        assert_eq!(IdentityKind::of(8), IdentityKind::Reserved);
        assert_eq!(IdentityKind::of(9), IdentityKind::Invalid);
        assert_eq!(IdentityKind::of(256), IdentityKind::Cluster);
        assert_eq!(IdentityKind::of(65536), IdentityKind::Invalid);
    }

    #[test]
    fn next_fit_skips_known_and_pending_ids_and_wraps() {
        let mut index = IdentityIndex::new();
        index.apply(256, labels("a"));
        index.apply(258, labels("b"));
        assert_eq!(index.reserve_next(), Ok(257));
        // 257 is pending: not handed out twice.
        assert_eq!(index.reserve_next(), Ok(259));
        index.abandon(257);
        index.apply(259, labels("c"));
        // The cursor moves on; 257 is reused only after wrapping around.
        assert_eq!(index.reserve_next(), Ok(260));

        let mut index = IdentityIndex::new();
        index.apply(CLUSTER_MAX, labels("last"));
        index.apply(300, labels("x"));
        index.start_after_highest();
        assert_eq!(index.reserve_next(), Ok(CLUSTER_MIN));
    }

    #[test]
    fn exhaustion_is_an_error_not_a_reuse() {
        let mut index = IdentityIndex::new();
        for id in CLUSTER_MIN..=CLUSTER_MAX {
            index.apply(id, labels(&id.to_string()));
        }
        assert_eq!(index.reserve_next(), Err(Exhausted));
        index.delete(1000);
        assert_eq!(index.reserve_next(), Ok(1000));
        assert_eq!(index.reserve_next(), Err(Exhausted));
    }

    #[test]
    fn a_capped_range_is_exhausted_at_its_max_and_reports_its_use() {
        let max = CLUSTER_MIN + 2;
        let mut index = IdentityIndex::with_max(max);
        assert_eq!(
            index.space(),
            Space {
                used: 0,
                capacity: 3
            }
        );
        // An id above the cap (left by an earlier, larger setting) is neither counted nor
        // a reason to move the cursor past the cap.
        index.apply(CLUSTER_MAX, labels("old"));
        index.start_after_highest();
        assert_eq!(index.reserve_next(), Ok(CLUSTER_MIN));
        assert_eq!(index.space().used, 1);
        index.apply(CLUSTER_MIN, labels("a"));
        assert_eq!(index.reserve_next(), Ok(CLUSTER_MIN + 1));
        assert_eq!(index.reserve_next(), Ok(max));
        assert_eq!(
            index.space(),
            Space {
                used: 3,
                capacity: 3
            }
        );
        assert_eq!(index.reserve_next(), Err(Exhausted));
        // A collected id is handed out again.
        index.abandon(CLUSTER_MIN + 1);
        assert_eq!(index.reserve_next(), Ok(CLUSTER_MIN + 1));
        assert_eq!(IdentityIndex::with_max(1_000_000).space().capacity, 65280);
    }

    #[test]
    fn lookup_prefers_the_lowest_of_duplicate_ids() {
        let mut index = IdentityIndex::new();
        index.apply(300, labels("web"));
        index.apply(280, labels("web"));
        assert_eq!(index.lookup(&labels("web")), Some(280));
        assert!(index.is_duplicate(300));
        assert!(!index.is_duplicate(280));
        index.delete(280);
        assert_eq!(index.lookup(&labels("web")), Some(300));
        assert!(!index.is_duplicate(300));
        index.reset([(400, labels("db"))]);
        assert_eq!(index.lookup(&labels("web")), None);
        assert_eq!(index.lookup(&labels("db")), Some(400));
        assert_eq!(index.count(IdentityKind::Cluster), 1);
    }

    #[test]
    fn gc_waits_for_the_grace_period_after_the_last_reference() {
        let grace = Duration::from_secs(60);
        // Referenced: kept, lastReferenced cleared.
        assert_eq!(
            gc_decision(300, 2, Some(t(0)), None, t(1000), grace),
            GcDecision::Keep {
                references: 2,
                last_referenced: None,
                recheck_after: None
            }
        );
        // Just became unreferenced: the clock starts now.
        assert_eq!(
            gc_decision(300, 0, None, None, t(10), grace),
            GcDecision::Keep {
                references: 0,
                last_referenced: Some(t(10)),
                recheck_after: Some(grace)
            }
        );
        // Within the grace period: kept, with the time left.
        assert_eq!(
            gc_decision(300, 0, Some(t(10)), None, t(40), grace),
            GcDecision::Keep {
                references: 0,
                last_referenced: Some(t(10)),
                recheck_after: Some(Duration::from_secs(30))
            }
        );
        // Past it: collected.
        assert_eq!(
            gc_decision(300, 0, Some(t(10)), None, t(70), grace),
            GcDecision::Collect
        );
        // An allocation by this process pushes the deadline out.
        assert_eq!(
            gc_decision(300, 0, Some(t(10)), Some(t(50)), t(70), grace),
            GcDecision::Keep {
                references: 0,
                last_referenced: Some(t(50)),
                recheck_after: Some(Duration::from_secs(40))
            }
        );
        // Reserved identities are never collected.
        assert!(matches!(
            gc_decision(2, 0, Some(t(0)), None, t(100_000), grace),
            GcDecision::Keep { .. }
        ));
    }

    #[test]
    fn counts_references() {
        let refs = count_references([300, 301, 300]);
        assert_eq!(refs.get(&300), Some(&2));
        assert_eq!(refs.get(&301), Some(&1));
        assert_eq!(refs.get(&302), None);
    }
}
