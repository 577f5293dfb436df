//! `LBService.status` as a pure function of the translation and the nodes' reports.
//!
//! `Realized` follows a deadline, as a Deployment's `Progressing` follows
//! `progressDeadlineSeconds`: it is `True` once every node that runs an agent (every
//! `NodeNetwork`) reports `realizedServicesRevision` ≥ `spec.revision`, and a new revision
//! that every node realizes within `services.realizeDeadlineMillis` rewrites nothing; a
//! change still pending after the deadline (counted from the oldest revision some node
//! does not realize, so a Service that changes faster than its nodes keep up still turns)
//! turns it `False`, `Pending`. No message names a revision or a node count: with a node
//! that never reports (or one that realizes each revision a moment late) they would move
//! with every revision, and a status write per backend change doubles the apiserver writes
//! of every EndpointSlice change at scale (the count did: 0.24 writes per churned pod at
//! 1,000 nodes). So a backend change costs the LBService's spec write and no status write.
//! The exact per-node truth stays in `NodeNetwork.status.realizedServicesRevision`, the
//! number of pending LBServices in `tendril_services_unrealized_lbservices`. Neither
//! condition carries `observedGeneration` for the same reason (the generation moves with
//! every backend).

use super::translate::Problem;
use std::time::Duration;
use tendril_crds::v1alpha1::LBServiceStatus;
use tendril_runtime::conditions::{self, DesiredCondition};

pub const REASON_VALID: &str = "Translated";
pub const REASON_REALIZED: &str = "Realized";
pub const REASON_PENDING: &str = "Pending";
pub const REASON_NO_NODES: &str = "NoNodes";
pub const PENDING_MESSAGE: &str = "not every node realizes the service within services.realizeDeadlineMillis (each node's revision: NodeNetwork status.realizedServicesRevision)";

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
    /// `None`: no `Realized` yet (a new LBService whose first revision is within the
    /// deadline).
    pub realized: Option<DesiredCondition>,
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

/// How long the current revision has been pending, and how long it may be.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    pub pending_for: Duration,
    pub limit: Duration,
}

/// The status of an `LBService` at `revision` whose translation says `valid`, given the nodes' reports and the `Realized` it shows now; and,
/// while the revision is pending within its deadline, how long until the deadline (when to
/// look again).
pub fn desired(
    valid: &DesiredCondition,
    revision: i64,
    nodes: &NodeReports,
    deadline: Deadline,
    shown: Option<&DesiredCondition>,
) -> (DesiredStatus, Option<Duration>) {
    let total = nodes.nodes();
    let done = nodes.at_least(revision);
    let mut recheck = None;
    let realized = if total == 0 {
        Some(DesiredCondition::new(
            conditions::REALIZED,
            false,
            REASON_NO_NODES,
            "no node runs an agent (no NodeNetwork)",
        ))
    } else if done == total {
        Some(DesiredCondition::new(
            conditions::REALIZED,
            true,
            REASON_REALIZED,
            "every node realizes the current revision",
        ))
    } else if deadline.pending_for < deadline.limit
        && shown.is_none_or(|s| s.status || s.reason == REASON_PENDING)
    {
        // Within the deadline what is shown stays: True (the nodes are on their way),
        // an earlier Pending, or nothing yet.
        recheck = Some(deadline.limit - deadline.pending_for);
        shown.cloned()
    } else {
        Some(DesiredCondition::new(
            conditions::REALIZED,
            false,
            REASON_PENDING,
            PENDING_MESSAGE,
        ))
    };
    (
        DesiredStatus {
            valid: valid.clone(),
            realized,
        },
        recheck,
    )
}

/// The `Realized` condition `status` shows.
pub fn shown_realized(status: Option<&LBServiceStatus>) -> Option<DesiredCondition> {
    let c = conditions::find(&status?.conditions, conditions::REALIZED)?;
    Some(DesiredCondition::new(
        &c.type_,
        c.status == "True",
        &c.reason,
        c.message.clone(),
    ))
}

/// Whether `status` already says what `desired` says.
pub fn is_current(status: Option<&LBServiceStatus>, desired: &DesiredStatus) -> bool {
    let Some(status) = status else {
        return false;
    };
    conditions::is_current(&status.conditions, &desired.valid, None)
        && match &desired.realized {
            Some(r) => conditions::is_current(&status.conditions, r, None),
            None => conditions::find(&status.conditions, conditions::REALIZED).is_none(),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

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

    const NOW: Deadline = Deadline {
        pending_for: Duration::ZERO,
        limit: Duration::ZERO,
    };

    fn within(pending_ms: u64, limit_ms: u64) -> Deadline {
        Deadline {
            pending_for: Duration::from_millis(pending_ms),
            limit: Duration::from_millis(limit_ms),
        }
    }

    #[test]
    fn realized_once_every_node_reports_at_least_the_revision() {
        let nodes = NodeReports::new([Some(4), Some(6), Some(6), None, Some(9)]);
        let (s, recheck) = desired(&ok(), 5, &nodes, NOW, None);
        let r = s.realized.unwrap();
        assert!(!r.status);
        assert_eq!(r.reason, REASON_PENDING);
        assert_eq!(r.message, PENDING_MESSAGE);
        assert_eq!(recheck, None);

        let nodes = NodeReports::new([Some(5), Some(6), Some(9)]);
        let (s, _) = desired(&ok(), 5, &nodes, NOW, None);
        assert!(s.realized.as_ref().unwrap().status);
        // A node more, or less, that realizes it, or a later revision that every node
        // realizes: the same status, nothing to write.
        let more = NodeReports::new([Some(5), Some(6), Some(9), Some(11)]);
        assert_eq!(desired(&ok(), 5, &more, NOW, s.realized.as_ref()).0, s);
        let later = NodeReports::new([Some(7), Some(8), Some(9)]);
        assert_eq!(desired(&ok(), 6, &later, NOW, s.realized.as_ref()).0, s);

        let none = NodeReports::new([]);
        let (s, _) = desired(&ok(), 5, &none, NOW, None);
        assert_eq!(s.realized.unwrap().reason, REASON_NO_NODES);
    }

    #[test]
    fn a_revision_pending_within_its_deadline_rewrites_nothing() {
        let realized = desired(&ok(), 5, &NodeReports::new([Some(5)]), NOW, None)
            .0
            .realized;
        let nodes = NodeReports::new([Some(5), Some(6)]);
        // Revision 6 pending on one node for 300 ms of 1 s: True stays, look again in 700 ms.
        let (s, recheck) = desired(&ok(), 6, &nodes, within(300, 1000), realized.as_ref());
        assert_eq!(s.realized, realized);
        assert_eq!(recheck, Some(Duration::from_millis(700)));
        // A new LBService shows nothing until its first revision is realized or late.
        let (s, recheck) = desired(&ok(), 6, &nodes, within(300, 1000), None);
        assert_eq!(s.realized, None);
        assert!(recheck.is_some());
        // Past the deadline: Pending.
        let (s, recheck) = desired(&ok(), 6, &nodes, within(1000, 1000), realized.as_ref());
        let r = s.realized.unwrap();
        assert!(!r.status && r.reason == REASON_PENDING, "{r:?}");
        assert_eq!(r.message, PENDING_MESSAGE);
        assert_eq!(recheck, None);
        // NoNodes is never kept once nodes exist: within the deadline it becomes Pending.
        let no_nodes = desired(&ok(), 6, &NodeReports::new([]), NOW, None)
            .0
            .realized;
        let (s, _) = desired(&ok(), 6, &nodes, within(300, 1000), no_nodes.as_ref());
        assert_eq!(s.realized.unwrap().reason, REASON_PENDING);
    }

    #[test]
    fn pending_stays_put_while_the_nodes_move() {
        // One node realizes each revision a moment after it is made, one never reports: what
        // is written stays the same however often the service changes.
        let late = within(60_000, 10_000);
        let mut shown: Option<DesiredCondition> = None;
        let mut statuses = std::collections::BTreeSet::new();
        for revision in 5..9 {
            for agent in [revision - 1, revision] {
                let nodes = NodeReports::new([Some(agent), None]);
                let (s, _) = desired(&ok(), revision, &nodes, late, shown.as_ref());
                shown = s.realized.clone();
                statuses.insert(format!("{:?}", s.realized));
            }
        }
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        assert_eq!(shown.unwrap().message, PENDING_MESSAGE);
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
    fn is_current_compares_conditions_without_generation() {
        let nodes = NodeReports::new([Some(5)]);
        let d = desired(&ok(), 5, &nodes, NOW, None).0;
        let now = Timestamp::from_second(1).unwrap();
        let status = LBServiceStatus {
            conditions: vec![
                conditions::merge(None, &d.valid, None, now),
                conditions::merge(None, d.realized.as_ref().unwrap(), None, now),
            ],
        };
        assert!(is_current(Some(&status), &d));
        assert_eq!(shown_realized(Some(&status)), d.realized);
        assert!(!is_current(None, &d));
        let pending = desired(&ok(), 6, &nodes, NOW, d.realized.as_ref()).0;
        assert!(!is_current(Some(&status), &pending));
        let fresh = desired(&ok(), 6, &nodes, within(0, 1000), None).0;
        assert!(
            !is_current(Some(&status), &fresh),
            "a Realized that should not be there"
        );
    }
}
