//! What a resolve means for the API, as pure values: which `ResolvedPolicy` objects to
//! write (numbered with their next revision) or delete, and the status each Tendril policy
//! should carry.

use super::resolve::{Invalid, MIN_CLUSTER_IDENTITY, RESOLVED, Resolution};
use std::collections::BTreeMap;
use tendril_crds::v1alpha1::ResolvedPolicySpec;
use tendril_runtime::conditions::{DesiredCondition, VALID};

/// The writes one resolve needs.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Specs whose content changed (or that do not exist yet), with their new revision.
    pub apply: Vec<ResolvedPolicySpec>,
    /// Identities whose `ResolvedPolicy` must go: their `Identity` is gone.
    pub delete: Vec<i64>,
}

/// Compares the resolution with what exists (`current`: identity → the latest spec known,
/// written by us or seen in the store). A spec equal but for the revision is left alone;
/// a changed one gets the previous revision + 1; a new one starts at 1, or after the
/// revision in `deleted` (objects deleted by someone else while their identity lives:
/// put back without the revision going backwards).
pub fn plan(
    resolution: &Resolution,
    current: &BTreeMap<i64, ResolvedPolicySpec>,
    deleted: &BTreeMap<i64, i64>,
) -> Plan {
    let mut out = Plan::default();
    for (id, spec) in &resolution.policies {
        let revision = match current.get(id) {
            Some(prev) if same_content(prev, spec) => continue,
            Some(prev) => prev.revision + 1,
            None => deleted.get(id).map_or(1, |r| r + 1),
        };
        out.apply.push(ResolvedPolicySpec {
            revision,
            ..spec.clone()
        });
    }
    out.delete = current
        .keys()
        .copied()
        .filter(|id| *id >= MIN_CLUSTER_IDENTITY && !resolution.policies.contains_key(id))
        .collect();
    out
}

/// Equal but for the revision.
pub fn same_content(a: &ResolvedPolicySpec, b: &ResolvedPolicySpec) -> bool {
    a.identity == b.identity
        && a.default_deny == b.default_deny
        && a.ingress == b.ingress
        && a.egress == b.egress
        && a.sources == b.sources
}

/// The `Valid` condition and `selectedIdentities` of a Tendril policy.
pub fn desired_status(outcome: &Result<usize, Invalid>) -> (DesiredCondition, i64) {
    match outcome {
        Ok(n) => (
            DesiredCondition::new(
                VALID,
                true,
                RESOLVED,
                format!(
                    "resolved; selects {n} {}",
                    if *n == 1 { "identity" } else { "identities" }
                ),
            ),
            *n as i64,
        ),
        Err(e) => (
            DesiredCondition::new(
                VALID,
                false,
                e.reason,
                format!("{}; the policy is not applied", e.message),
            ),
            0,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::{ResolvedDefaultDeny, ResolvedRule};

    fn spec(id: i64, revision: i64, deny_in: bool) -> ResolvedPolicySpec {
        ResolvedPolicySpec {
            identity: id,
            revision,
            default_deny: ResolvedDefaultDeny {
                ingress: deny_in,
                egress: false,
            },
            ingress: if deny_in {
                vec![ResolvedRule {
                    verdict: tendril_crds::v1alpha1::Verdict::Allow,
                    peers: vec![1],
                    ..Default::default()
                }]
            } else {
                vec![]
            },
            ..Default::default()
        }
    }

    fn resolution(specs: &[ResolvedPolicySpec]) -> Resolution {
        Resolution {
            policies: specs.iter().map(|s| (s.identity, s.clone())).collect(),
            sources: vec![],
        }
    }

    #[test]
    fn new_specs_start_at_revision_one() {
        let p = plan(
            &resolution(&[spec(256, 0, false)]),
            &BTreeMap::new(),
            &BTreeMap::new(),
        );
        assert_eq!(p.apply, vec![spec(256, 1, false)]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn unchanged_specs_are_not_written_and_changed_ones_bump_the_revision() {
        let current: BTreeMap<_, _> =
            [(256, spec(256, 4, false)), (257, spec(257, 7, false))].into();
        let p = plan(
            &resolution(&[spec(256, 0, false), spec(257, 0, true)]),
            &current,
            &BTreeMap::new(),
        );
        assert_eq!(p.apply, vec![spec(257, 8, true)]);
    }

    #[test]
    fn specs_of_vanished_identities_are_deleted() {
        let current: BTreeMap<_, _> =
            [(256, spec(256, 1, false)), (300, spec(300, 2, false))].into();
        let p = plan(
            &resolution(&[spec(256, 0, false)]),
            &current,
            &BTreeMap::new(),
        );
        assert!(p.apply.is_empty());
        assert_eq!(p.delete, vec![300]);
    }

    #[test]
    fn a_spec_deleted_by_someone_else_comes_back_with_a_higher_revision() {
        let p = plan(
            &resolution(&[spec(256, 0, false)]),
            &BTreeMap::new(),
            &[(256, 5)].into(),
        );
        assert_eq!(p.apply, vec![spec(256, 6, false)]);
    }

    #[test]
    fn status_says_why() {
        let (c, n) = desired_status(&Ok(3));
        assert!(c.status && c.reason == RESOLVED && n == 3, "{c:?}");
        let (c, n) = desired_status(&Err(Invalid {
            reason: "InvalidCIDR",
            message: "\"x\" is not a CIDR".into(),
        }));
        assert!(!c.status && c.reason == "InvalidCIDR" && n == 0);
        assert!(c.message.contains("not a CIDR"), "{}", c.message);
    }
}
