//! The order in which `policy`, `policy_cidrs` and `policy_state` are written: the pure
//! half of [`super::PolicyMaps::converge_with_cidrs`], which the conntrack re-judging
//! tests (`tests/bpf_policy.rs`) prove on the real programs.

use std::collections::BTreeMap;

use super::{
    layout::{POLICY_VERDICT_DENY, PolicyKey, PolicyValue},
    report::{Diff, Op},
};
use crate::bpf::policy::PolicyState;

/// One step of a policy convergence, in [`policy_steps`] order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStep {
    UpsertEntries,
    UpsertCidrs,
    InterimStates,
    DeleteEntries,
    DeleteCidrs,
    FinalStates,
    DeleteStates,
    /// Without `prune`: count what steps 4, 5 and 7 would delete as `stale_kept`.
    KeepStale,
}

/// The order of [`super::PolicyMaps::converge_with_cidrs`].
pub fn policy_steps(prune: bool) -> Vec<PolicyStep> {
    use PolicyStep::*;
    if prune {
        vec![
            UpsertEntries,
            UpsertCidrs,
            InterimStates,
            DeleteEntries,
            DeleteCidrs,
            FinalStates,
            DeleteStates,
        ]
    } else {
        vec![
            UpsertEntries,
            UpsertCidrs,
            InterimStates,
            FinalStates,
            KeepStale,
        ]
    }
}

/// The states written while stale entries are still in: each endpoint's new default-deny
/// flags under the revision its connections were judged under — its current one, or 0 (what
/// conntrack stamps while an endpoint has no state) for an endpoint without a state. Only
/// what differs from `current` is written.
pub fn interim_state_writes(
    current: &BTreeMap<u16, PolicyState>,
    wanted: &BTreeMap<u16, PolicyState>,
) -> Vec<(u16, Op, PolicyState)> {
    wanted
        .iter()
        .filter_map(|(id, state)| {
            let held = current.get(id);
            let interim = PolicyState {
                revision: held.map_or(0, |h| h.revision),
                flags: state.flags,
            };
            match held {
                Some(h) if *h == interim => None,
                Some(_) => Some((*id, Op::Update, interim)),
                None => Some((*id, Op::Add, interim)),
            }
        })
        .collect()
}

/// The order of the policy map's writes and deletions: entries that deny go in before
/// those that allow, and go out after them, so no single write opens something that a deny
/// closes in both the old and the new policy (e.g. a new "allow any peer" next to a new
/// "deny peer P").
pub fn policy_write_order(
    diff: &Diff<PolicyKey>,
    current: &BTreeMap<PolicyKey, PolicyValue>,
    desired: &BTreeMap<PolicyKey, PolicyValue>,
) -> (Vec<(PolicyKey, Op)>, Vec<PolicyKey>) {
    let denies =
        |value: Option<&PolicyValue>| value.is_some_and(|v| v.verdict == POLICY_VERDICT_DENY);
    let mut writes: Vec<(PolicyKey, Op)> = diff.writes().collect();
    writes.sort_by_key(|(k, _)| !denies(desired.get(k)));
    let mut deletes = diff.stale.clone();
    deletes.sort_by_key(|k| denies(current.get(k)));
    (writes, deletes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::maps::diff;

    #[test]
    fn policy_denies_are_written_first_and_deleted_last() {
        use crate::bpf::{
            maps::Direction,
            policy::{PolicyEntry, Verdict},
        };
        let e = |peer| PolicyEntry {
            endpoint_id: 1,
            direction: Direction::Ingress,
            peer,
            protocol: 0,
            port: 0,
            port_prefix: 0,
        };
        let kv = |peer, verdict: Verdict| (e(peer).to_key(), verdict.to_value(&e(peer)));
        let current = BTreeMap::from([
            kv(1, Verdict::Deny),
            kv(2, Verdict::Allow),
            kv(5, Verdict::Allow),
        ]);
        let desired = BTreeMap::from([
            kv(0, Verdict::Allow),
            kv(3, Verdict::Deny),
            kv(5, Verdict::Deny),
        ]);
        let d = diff(&current, &desired);
        let (writes, deletes) = policy_write_order(&d, &current, &desired);
        let peers: Vec<(u32, Op)> = writes
            .iter()
            .map(|(k, op)| (k.peer_identity, *op))
            .collect();
        assert_eq!(peers, vec![(5, Op::Update), (3, Op::Add), (0, Op::Add)]);
        let peers: Vec<u32> = deletes.iter().map(|k| k.peer_identity).collect();
        assert_eq!(peers, vec![2, 1]);
    }

    #[test]
    fn policy_steps_delete_only_after_every_upsert_and_bump_revisions_after_deletes() {
        use PolicyStep::*;
        assert_eq!(
            policy_steps(true),
            vec![
                UpsertEntries,
                UpsertCidrs,
                InterimStates,
                DeleteEntries,
                DeleteCidrs,
                FinalStates,
                DeleteStates
            ]
        );
        assert_eq!(
            policy_steps(false),
            vec![
                UpsertEntries,
                UpsertCidrs,
                InterimStates,
                FinalStates,
                KeepStale
            ]
        );
    }

    #[test]
    fn interim_states_keep_the_old_revision_or_0_and_take_the_new_flags() {
        let st = |revision, flags| PolicyState { revision, flags };
        let current = BTreeMap::from([(1, st(4, 3)), (2, st(9, 0)), (3, st(1, 1)), (5, st(7, 2))]);
        let wanted = BTreeMap::from([(1, st(5, 1)), (2, st(9, 0)), (4, st(2, 2)), (5, st(8, 2))]);
        assert_eq!(
            interim_state_writes(&current, &wanted),
            vec![(1, Op::Update, st(4, 1)), (4, Op::Add, st(0, 2))],
            "2 unchanged; 3 vanishes later; 4 is new: revision 0, as conntrack stamps it \
             without a state; 5 only changes its revision, in the final step"
        );
        assert!(interim_state_writes(&wanted, &wanted).is_empty());
    }
}
