//! The cluster-wide revision sequence of `LBService`s (see the `LBService` module doc).
//!
//! One counter for every service: each change gets the next number. Up to
//! `services.writesInFlight` writes are applied at once, so they can commit out of order;
//! each write carries `committedRevision`: its own revision when it is alone in flight,
//! else the highest revision up to which every write had finished (committed, or failed and
//! carried by nobody) when it was sent. An agent that has seen a spec has therefore seen
//! every revision up to its `committedRevision`, and reporting one number per node
//! (`NodeNetwork.status.realizedServicesRevision`) still says which services it realizes.
//! When overlapping writes drain, the last one to finish is written again with the final
//! `committedRevision` ([`Sequence::finish`] says when), so a burst's tail is reported
//! realized too; a lone change costs one write, as before.
//!
//! Each leadership term starts above every revision any `LBService` carries and every
//! revision any node reports as realized: an `LBService` deleted since still counts
//! through the nodes' reports, so a number is never handed out twice. A change that leaves
//! the spec as it is consumes no number; a write that fails leaves a gap, which is harmless
//! (no object carries the missing number).

use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet};
use tendril_crds::v1alpha1::LBServiceSpec;
use tendril_runtime::revisions::Revisioned;

/// The sequence of one leadership term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    last: i64,
    /// Numbers handed out whose write has not finished.
    in_flight: BTreeSet<i64>,
    /// The highest `committedRevision` a write carries (sent or being sent).
    published: i64,
    /// See [`Sequence::tail`].
    tail: Option<i64>,
}

impl Sequence {
    /// Starts above every `LBService` revision and every node's realized revision.
    /// `published` is the highest `committedRevision` the stored LBServices carry (their
    /// `revision` where they carry none): below the highest stored revision, a term that
    /// ended with writes in flight left a tail unreported, which [`Sequence::tail`] gives.
    pub fn start(
        revisions: impl IntoIterator<Item = i64>,
        realized: impl IntoIterator<Item = i64>,
        published: i64,
    ) -> Self {
        let stored = revisions.into_iter().max().unwrap_or(0).max(0);
        let last = realized.into_iter().fold(stored, i64::max);
        Self {
            last,
            in_flight: BTreeSet::new(),
            // Revisions only nodes report belong to deleted LBServices: nothing to carry.
            published: last,
            tail: (stored > published).then_some(stored),
        }
    }

    /// Once per term: the highest stored revision when a write must carry it as
    /// `committedRevision` (on the LBService that has it) because the last term did not.
    /// Should that write fail, the next drain publishes a settled revision above it.
    pub fn tail(&mut self) -> Option<i64> {
        self.tail.take()
    }

    /// Continues above `revision` (an LBService written by someone else carries it).
    pub fn observe(&mut self, revision: i64) {
        self.last = self.last.max(revision);
    }

    /// The last number handed out (or the start).
    pub fn last(&self) -> i64 {
        self.last
    }

    /// Every revision up to this one has finished.
    pub fn settled(&self) -> i64 {
        self.in_flight.first().map_or(self.last, |first| first - 1)
    }

    /// `desired` numbered with the next revision, and the `committedRevision` it carries,
    /// when its content differs from `current` (the latest spec written, if any); `None`
    /// (and no number used) when it does not. The number is in flight until
    /// [`Sequence::finish`].
    pub fn number(
        &mut self,
        desired: &LBServiceSpec,
        current: Option<&LBServiceSpec>,
    ) -> Option<LBServiceSpec> {
        if current.is_some_and(|c| c.same_content(desired)) {
            return None;
        }
        // Alone in flight, a write completes the sequence itself: whoever sees it has seen
        // everything before it and it. Beside others, it carries what had settled.
        let committed = if self.in_flight.is_empty() {
            self.last + 1
        } else {
            self.settled()
        };
        self.last += 1;
        self.in_flight.insert(self.last);
        self.published = self.published.max(committed);
        let mut spec = desired.clone();
        spec.revision = self.last;
        spec.committed_revision = Some(committed);
        Some(spec)
    }

    /// The write of `revision` finished (committed or failed). When it was the last in
    /// flight and no write carries the settled revision yet, returns it: the caller writes
    /// it (on the object it just wrote) and calls [`Sequence::unpublish`] if it could not.
    pub fn finish(&mut self, revision: i64) -> Option<i64> {
        self.in_flight.remove(&revision);
        if self.in_flight.is_empty() {
            self.unpublished()
        } else {
            None
        }
    }

    /// The settled revision when no write carries it yet; it counts as carried from now.
    pub fn unpublished(&mut self) -> Option<i64> {
        let settled = self.settled();
        (settled > self.published).then(|| {
            self.published = settled;
            settled
        })
    }

    /// `committed` could not be written: the next drain tries again.
    pub fn unpublish(&mut self, committed: i64) {
        if self.published == committed {
            self.published = self.settled().min(committed - 1);
        }
    }
}

/// Whether `desired` differs from `current` but for the revision (a write is needed).
pub fn changed(desired: &LBServiceSpec, current: Option<&LBServiceSpec>) -> bool {
    current.is_none_or(|c| !c.same_content(desired))
}

/// The `last-change-trigger-time` annotations of a service's EndpointSlices, by slice name.
pub type Triggers = BTreeMap<String, String>;

/// The `SERVICE_CHANGED_AT` of a write: the oldest `last-change-trigger-time` among the
/// service's EndpointSlices whose trigger time changed since the last write (the
/// EndpointSlice controller's change is the trigger, and kube-proxy's network programming
/// duration starts there too); else when the concern observed the change; else now.
///
/// `seen` are the slices' trigger times at the last write (or no-op) of this term; without
/// them (the first change after a restart) a trigger counts when it is later than
/// `previous`, the annotation of the last write. Trigger times have whole seconds, so a
/// comparison with `previous` alone would miss a slice change in the same second as an
/// observed change.
pub fn changed_at(
    previous: Option<DateTime<Utc>>,
    triggers: &Triggers,
    seen: Option<&Triggers>,
    observed: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    triggers
        .iter()
        .filter(|(slice, t)| match seen {
            Some(seen) => seen.get(*slice) != Some(*t),
            None => true,
        })
        .filter_map(|(_, t)| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| seen.is_some() || previous.is_none_or(|p| *t > p))
        .min()
        .or(observed)
        .unwrap_or(now)
}

/// Which parts of the spec a write changes, for the log: `new`, or e.g. `backends`.
pub fn what_changed(current: Option<&LBServiceSpec>, new: &LBServiceSpec) -> String {
    let Some(c) = current else {
        return "new".into();
    };
    let parts = [
        ("frontends", c.frontends != new.frontends),
        ("backends", c.backends != new.backends),
        (
            "sessionAffinity",
            c.session_affinity != new.session_affinity,
        ),
        (
            "trafficPolicies",
            c.external_traffic_policy != new.external_traffic_policy
                || c.internal_traffic_policy != new.internal_traffic_policy,
        ),
        (
            "loadBalancerSourceRanges",
            c.load_balancer_source_ranges != new.load_balancer_source_ranges,
        ),
        (
            "healthCheckNodePort",
            c.health_check_node_port != new.health_check_node_port,
        ),
        ("algorithm", c.algorithm != new.algorithm),
    ];
    let changed: Vec<&str> = parts.iter().filter(|(_, d)| *d).map(|(n, _)| *n).collect();
    changed.join(",")
}

/// How much of `wait` is left at `now` when it began at `start` (`None`: over, or no start).
/// Times in ms since the epoch. Two waits use it:
/// - a new Service without EndpointSlices waits for them (from its creation) before its
///   LBService is written. Its slices usually follow within a second; writing before them
///   costs a second write and a second revision for the same Service, and in a burst of new
///   Services the ordered sequence makes every write wait for the ones before it. A Service
///   that really has no endpoints is written (and rejects) when the wait is over. The
///   creation time has the apiserver's second precision, so the wait is at most `wait`;
/// - a change of a Service already written waits (from the first change not yet written)
///   for the changes that follow it: a replaced pod is a removal and an addition of a
///   backend, one write instead of two.
pub fn wait_left(
    start: Option<i64>,
    now: i64,
    wait: std::time::Duration,
) -> Option<std::time::Duration> {
    let left = i64::try_from(wait.as_millis()).ok()? - (now - start?);
    (left > 0).then(|| std::time::Duration::from_millis(left.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::Frontend;

    fn spec(port: i32) -> LBServiceSpec {
        LBServiceSpec {
            frontends: vec![Frontend {
                name: "http".into(),
                type_: "ClusterIP".into(),
                address: Some("10.96.0.1".into()),
                port,
                protocol: "TCP".into(),
            }],
            external_traffic_policy: "Cluster".into(),
            internal_traffic_policy: "Cluster".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_term_starts_above_every_stored_and_every_realized_revision() {
        assert_eq!(Sequence::start([], [], 0).last(), 0);
        assert_eq!(Sequence::start([3, 9, 4], [7], 9).last(), 9);
        // The service with revision 12 was deleted; a node still reports it realized.
        assert_eq!(Sequence::start([3, 9], [12, 5], 9).last(), 12);
        let mut seq = Sequence::start([3, 9], [12], 9);
        assert_eq!(seq.number(&spec(80), None).unwrap().revision, 13);
    }

    #[test]
    fn changes_take_consecutive_numbers_and_no_op_takes_none() {
        let mut seq = Sequence::start([5], [], 5);
        let a = seq.number(&spec(80), None).unwrap();
        assert_eq!(a.revision, 6);
        // Same content (whatever revision it carries): nothing to write, no number used.
        assert_eq!(seq.number(&spec(80), Some(&a)), None);
        assert!(!changed(&spec(80), Some(&a)));
        assert_eq!(seq.last(), 6);
        let b = seq.number(&spec(81), Some(&a)).unwrap();
        assert_eq!(b.revision, 7);
        assert!(changed(&spec(81), None));
        // Another service shares the sequence.
        assert_eq!(seq.number(&spec(90), None).unwrap().revision, 8);
    }

    #[test]
    fn writes_in_flight_carry_what_had_committed_and_the_drain_publishes_the_rest() {
        let mut seq = Sequence::start([10], [], 10);
        // Alone in flight: a write carries its own revision, and needs no second write.
        let a = seq.number(&spec(79), None).unwrap();
        assert_eq!((a.revision, a.committed_revision), (11, Some(11)));
        assert_eq!(seq.finish(11), None);
        // Three at once: the first is alone when sent; the others carry what had settled.
        let b = seq.number(&spec(80), None).unwrap();
        let c = seq.number(&spec(81), None).unwrap();
        let d = seq.number(&spec(82), None).unwrap();
        assert_eq!((b.revision, c.revision, d.revision), (12, 13, 14));
        assert_eq!(
            [
                b.committed_revision,
                c.committed_revision,
                d.committed_revision
            ],
            [Some(12), Some(11), Some(11)]
        );
        // 13 commits first: 12 is still in flight, nothing settles past 11.
        assert_eq!(seq.finish(13), None);
        assert_eq!(seq.settled(), 11);
        // 12 commits: 12 and 13 settled; a write sent now carries 13, not 14.
        assert_eq!(seq.finish(12), None);
        let e = seq.number(&spec(83), None).unwrap();
        assert_eq!((e.revision, e.committed_revision), (15, Some(13)));
        // 15 then 14 finish: the last one out publishes 15, once.
        assert_eq!(seq.finish(15), None);
        assert_eq!(seq.finish(14), Some(15));
        assert_eq!(seq.unpublished(), None);
    }

    #[test]
    fn a_publication_that_failed_is_retried_and_a_failed_write_is_a_gap() {
        let mut seq = Sequence::start([], [], 0);
        let a = seq.number(&spec(80), None).unwrap();
        let b = seq.number(&spec(81), None).unwrap();
        assert_eq!(seq.finish(a.revision), None);
        assert_eq!(seq.finish(b.revision), Some(2));
        seq.unpublish(2);
        assert_eq!(seq.unpublished(), Some(2));
        // A failed write finishes too: nobody carries 4, and 4 settles with it.
        let c = seq.number(&spec(82), None).unwrap();
        let d = seq.number(&spec(83), None).unwrap();
        assert_eq!(seq.finish(d.revision), None);
        assert_eq!(seq.finish(c.revision), Some(4));
    }

    #[test]
    fn a_term_after_one_that_ended_in_flight_has_a_tail_to_publish() {
        // Stored: revisions 4 and 5, the latest carrying 3 (4 and 5 went out together).
        let mut seq = Sequence::start([4, 5], [3], 3);
        assert_eq!(seq.tail(), Some(5));
        assert_eq!(seq.tail(), None);
        assert_eq!(seq.unpublished(), None);
        // Fully published: nothing to do, even below what nodes report (12 was deleted).
        let mut seq = Sequence::start([4, 5], [12], 5);
        assert_eq!(seq.tail(), None);
        assert_eq!(seq.unpublished(), None);
        // The next write continues above 12.
        let a = seq.number(&spec(80), None).unwrap();
        assert_eq!((a.revision, a.committed_revision), (13, Some(13)));
        assert_eq!(seq.finish(13), None);
    }

    #[test]
    fn restart_numbers_continue_without_reshuffle() {
        // Term 1 writes three services.
        let mut term1 = Sequence::start([], [], 0);
        let written: Vec<LBServiceSpec> = [80, 81, 82]
            .into_iter()
            .map(|p| term1.number(&spec(p), None).unwrap())
            .collect();
        // Term 2 sees the same desired specs: nothing is rewritten; a new change continues.
        let mut term2 = Sequence::start(written.iter().map(|s| s.revision), [2], 3);
        for (p, w) in [80, 81, 82].into_iter().zip(&written) {
            assert_eq!(term2.number(&spec(p), Some(w)), None);
        }
        assert_eq!(term2.number(&spec(83), None).unwrap().revision, 4);
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn triggers(entries: &[(&str, &str)]) -> Triggers {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn changed_at_takes_the_slices_whose_trigger_changed_then_the_observation() {
        let now = t("2026-01-01T00:10:00Z");
        let seen_at = t("2026-01-01T00:09:00.500Z");
        let observed = Some(seen_at);
        let prev = Some(t("2026-01-01T00:09:00.200Z"));
        let before = triggers(&[("a", "2026-01-01T00:04:00Z"), ("b", "2026-01-01T00:05:00Z")]);
        // Slice b changed in the same second as the previous (observed) write: its trigger
        // time is still the one.
        let after = triggers(&[("a", "2026-01-01T00:04:00Z"), ("b", "2026-01-01T00:09:00Z")]);
        assert_eq!(
            changed_at(prev, &after, Some(&before), observed, now),
            t("2026-01-01T00:09:00Z")
        );
        // Two slices changed: the oldest change.
        let both = triggers(&[("a", "2026-01-01T00:08:00Z"), ("b", "2026-01-01T00:09:00Z")]);
        assert_eq!(
            changed_at(prev, &both, Some(&before), observed, now),
            t("2026-01-01T00:08:00Z")
        );
        // No slice changed (the Service did): the observation.
        assert_eq!(
            changed_at(prev, &before, Some(&before), observed, now),
            seen_at
        );
        // Nothing observed (e.g. put back after a deletion): now.
        assert_eq!(changed_at(prev, &before, Some(&before), None, now), now);
        // After a restart (nothing seen): triggers later than the previous write count.
        assert_eq!(changed_at(prev, &before, None, observed, now), seen_at);
        let late = triggers(&[("a", "2026-01-01T00:09:30Z")]);
        assert_eq!(
            changed_at(prev, &late, None, observed, now),
            t("2026-01-01T00:09:30Z")
        );
        // A first write takes any trigger; garbage is ignored.
        let odd = triggers(&[("a", "2026-01-01T00:01:00Z"), ("b", "yesterday")]);
        assert_eq!(
            changed_at(None, &odd, None, observed, now),
            t("2026-01-01T00:01:00Z")
        );
    }

    #[test]
    fn a_wait_is_what_is_left_of_it_from_its_start() {
        let wait = std::time::Duration::from_millis(1000);
        let created = 1_000_000;
        assert_eq!(
            wait_left(Some(created), created + 300, wait),
            Some(std::time::Duration::from_millis(700))
        );
        assert_eq!(wait_left(Some(created), created + 1000, wait), None);
        assert_eq!(wait_left(Some(created), created + 5000, wait), None);
        // No start (a creation time never comes from an apiserver without one): no wait.
        assert_eq!(wait_left(None, created, wait), None);
        // Turned off.
        assert_eq!(
            wait_left(Some(created), created, std::time::Duration::ZERO),
            None
        );
    }
}
