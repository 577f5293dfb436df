//! `LBService.status` as a pure function of the translation and the nodes' reports.
//!
//! `Realized` is `True` once every node that runs an agent (every `NodeNetwork`) reports
//! `realizedServicesRevision` ≥ `spec.revision`, and `realizedRevision` is then
//! `spec.revision`; otherwise `False` with how many nodes realize it, and the previous
//! `realizedRevision` stays. The messages name no node count when everything is realized,
//! so adding or removing a node rewrites only the statuses whose truth changed.

use super::translate::Problem;
use tendril_runtime::conditions::{self, DesiredCondition};

pub const REASON_VALID: &str = "Translated";
pub const REASON_REALIZED: &str = "Realized";
pub const REASON_PENDING: &str = "Pending";
pub const REASON_NO_NODES: &str = "NoNodes";

/// The nodes' realized service revisions, sorted, for counting in O(log n).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReports {
    sorted: Vec<i64>,
}

impl NodeReports {
    /// One entry per node; `None`: the node reports nothing yet.
    pub fn new(reports: impl IntoIterator<Item = Option<i64>>) -> Self {
        let mut sorted: Vec<i64> = reports.into_iter().map(|r| r.unwrap_or(0)).collect();
        sorted.sort_unstable();
        Self { sorted }
    }

    pub fn nodes(&self) -> usize {
        self.sorted.len()
    }

    /// Nodes that realize `revision`.
    pub fn at_least(&self, revision: i64) -> usize {
        self.sorted.len() - self.sorted.partition_point(|r| *r < revision)
    }
}

/// What the concern wants `status` to say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    pub valid: DesiredCondition,
    pub realized: DesiredCondition,
    pub realized_revision: Option<i64>,
}

/// The `Valid` condition of a translation with `problems`.
pub fn valid(problems: &[Problem]) -> DesiredCondition {
    match problems.first() {
        None => DesiredCondition::new(
            conditions::VALID,
            true,
            REASON_VALID,
            "every port of the Service is served",
        ),
        Some(first) => DesiredCondition::new(
            conditions::VALID,
            false,
            first.reason,
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// The status of an `LBService` at `revision` whose translation says `valid`, given the
/// nodes' reports and the `realizedRevision` it shows now.
pub fn desired(
    valid: &DesiredCondition,
    revision: i64,
    nodes: &NodeReports,
    previous_realized: Option<i64>,
) -> DesiredStatus {
    let total = nodes.nodes();
    let done = nodes.at_least(revision);
    let (realized, realized_revision) = if total == 0 {
        (
            DesiredCondition::new(
                conditions::REALIZED,
                false,
                REASON_NO_NODES,
                "no node runs an agent (no NodeNetwork)",
            ),
            previous_realized,
        )
    } else if done == total {
        (
            DesiredCondition::new(
                conditions::REALIZED,
                true,
                REASON_REALIZED,
                format!("revision {revision} is realized on every node"),
            ),
            Some(revision),
        )
    } else {
        (
            DesiredCondition::new(
                conditions::REALIZED,
                false,
                REASON_PENDING,
                format!("{done}/{total} nodes realize revision {revision}"),
            ),
            previous_realized.filter(|r| *r <= revision),
        )
    };
    DesiredStatus {
        valid: valid.clone(),
        realized,
        realized_revision,
    }
}

/// Whether `status` (conditions and realizedRevision, at `generation`) already says
/// what `desired` says.
pub fn is_current(
    status: Option<&tendril_crds::v1alpha1::LBServiceStatus>,
    desired: &DesiredStatus,
    generation: Option<i64>,
) -> bool {
    let Some(status) = status else {
        return false;
    };
    conditions::is_current(&status.conditions, &desired.valid, generation)
        && conditions::is_current(&status.conditions, &desired.realized, generation)
        && status.realized_revision == desired.realized_revision
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use tendril_crds::v1alpha1::LBServiceStatus;

    fn ok() -> DesiredCondition {
        valid(&[])
    }

    #[test]
    fn counting_nodes_that_realize_a_revision() {
        let nodes = NodeReports::new([Some(5), None, Some(9), Some(7), Some(9)]);
        assert_eq!(nodes.nodes(), 5);
        assert_eq!(nodes.at_least(0), 5);
        assert_eq!(nodes.at_least(1), 4);
        assert_eq!(nodes.at_least(7), 3);
        assert_eq!(nodes.at_least(9), 2);
        assert_eq!(nodes.at_least(10), 0);
    }

    #[test]
    fn realized_once_every_node_reports_at_least_the_revision() {
        let nodes = NodeReports::new([Some(4), Some(6), Some(6), None, Some(9)]);
        let s = desired(&ok(), 5, &nodes, Some(3));
        assert!(!s.realized.status);
        assert_eq!(s.realized.reason, REASON_PENDING);
        assert_eq!(s.realized.message, "3/5 nodes realize revision 5");
        assert_eq!(s.realized_revision, Some(3), "the previous one stays");

        let nodes = NodeReports::new([Some(5), Some(6), Some(9)]);
        let s = desired(&ok(), 5, &nodes, Some(3));
        assert!(s.realized.status);
        assert_eq!(s.realized_revision, Some(5));
        // A node more, or less, that realizes it: the same status, nothing to write.
        let more = NodeReports::new([Some(5), Some(6), Some(9), Some(11)]);
        assert_eq!(desired(&ok(), 5, &more, Some(5)), s);

        let none = NodeReports::new([]);
        let s = desired(&ok(), 5, &none, None);
        assert!(!s.realized.status);
        assert_eq!(s.realized.reason, REASON_NO_NODES);
    }

    #[test]
    fn valid_names_every_problem() {
        let v = valid(&[
            Problem {
                reason: "Unsupported",
                message: "port a".into(),
            },
            Problem {
                reason: "InvalidAnnotation",
                message: "annotation b".into(),
            },
        ]);
        assert!(!v.status);
        assert_eq!(v.reason, "Unsupported");
        assert_eq!(v.message, "port a; annotation b");
        assert!(ok().status);
    }

    #[test]
    fn is_current_compares_conditions_generation_and_revision() {
        let nodes = NodeReports::new([Some(5)]);
        let d = desired(&ok(), 5, &nodes, None);
        let now = Timestamp::from_second(1).unwrap();
        let status = LBServiceStatus {
            conditions: vec![
                conditions::merge(None, &d.valid, Some(2), now),
                conditions::merge(None, &d.realized, Some(2), now),
            ],
            realized_revision: Some(5),
        };
        assert!(is_current(Some(&status), &d, Some(2)));
        assert!(!is_current(Some(&status), &d, Some(3)));
        assert!(!is_current(None, &d, Some(2)));
        let later = desired(&ok(), 6, &nodes, Some(5));
        assert!(!is_current(Some(&status), &later, Some(2)));
    }
}
