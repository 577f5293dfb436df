//! Kubernetes-style conditions: `lastTransitionTime` moves only when `status` changes, and
//! every condition carries the `observedGeneration` it was computed from.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The condition types shared across kinds (`Ready`, `Valid`, `Realized`).
pub use tendril_crds::common::conditions::*;

pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// A condition as a reconciler wants it, before it is merged with what the object holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredCondition {
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl DesiredCondition {
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// The condition to write: `desired` at `generation`, keeping the previous
/// `lastTransitionTime` when the status did not change.
pub fn merge(
    previous: Option<&Condition>,
    desired: &DesiredCondition,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if desired.status { TRUE } else { FALSE };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: desired.type_.clone(),
        status: status.to_string(),
        reason: desired.reason.clone(),
        message: desired.message.clone(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The condition of `type_` in `conditions`.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets `desired` in `conditions` (replacing the entry of the same type) and reports
/// whether anything a reader would see changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    desired: &DesiredCondition,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let merged = merge(find(conditions, &desired.type_), desired, generation, now);
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        Some(existing) if *existing == merged => false,
        Some(existing) => {
            *existing = merged;
            true
        }
        None => {
            conditions.push(merged);
            true
        }
    }
}

/// Whether `conditions` already say what `desired` says at `generation` (so the status
/// write can be skipped).
pub fn is_current(
    conditions: &[Condition],
    desired: &DesiredCondition,
    generation: Option<i64>,
) -> bool {
    let status = if desired.status { TRUE } else { FALSE };
    find(conditions, &desired.type_).is_some_and(|c| {
        c.status == status
            && c.reason == desired.reason
            && c.message == desired.message
            && c.observed_generation == generation
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let ready = DesiredCondition::new("Ready", true, "Up", "all good");
        let mut conds = Vec::new();
        assert!(set(&mut conds, &ready, Some(1), t(100)));
        assert_eq!(conds[0].last_transition_time, Time(t(100)));
        assert_eq!(conds[0].status, "True");

        // same status, new message and generation: time kept
        let ready2 = DesiredCondition::new("Ready", true, "Up", "still good");
        assert!(set(&mut conds, &ready2, Some(2), t(200)));
        assert_eq!(conds[0].last_transition_time, Time(t(100)));
        assert_eq!(conds[0].message, "still good");
        assert_eq!(conds[0].observed_generation, Some(2));

        // nothing changed: no write needed, time kept
        assert!(!set(&mut conds, &ready2, Some(2), t(300)));
        assert_eq!(conds[0].last_transition_time, Time(t(100)));

        // status flips: time moves
        let down = DesiredCondition::new("Ready", false, "Down", "broken");
        assert!(set(&mut conds, &down, Some(2), t(400)));
        assert_eq!(conds[0].last_transition_time, Time(t(400)));
        assert_eq!(conds[0].status, "False");
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn other_types_are_left_alone() {
        let mut conds = Vec::new();
        set(
            &mut conds,
            &DesiredCondition::new("Ready", true, "A", ""),
            None,
            t(1),
        );
        set(
            &mut conds,
            &DesiredCondition::new("Other", false, "B", ""),
            None,
            t(2),
        );
        assert_eq!(conds.len(), 2);
        assert_eq!(
            find(&conds, "Ready").unwrap().last_transition_time,
            Time(t(1))
        );
        assert_eq!(find(&conds, "Other").unwrap().status, "False");
    }

    #[test]
    fn is_current_compares_generation_and_text() {
        let d = DesiredCondition::new("Ready", true, "Up", "m");
        let conds = vec![merge(None, &d, Some(3), t(5))];
        assert!(is_current(&conds, &d, Some(3)));
        assert!(!is_current(&conds, &d, Some(4)));
        assert!(!is_current(
            &conds,
            &DesiredCondition::new("Ready", true, "Up", "x"),
            Some(3)
        ));
        assert!(!is_current(&[], &d, Some(3)));
    }
}
