//! Kubernetes Events (events.k8s.io) about the objects a concern handles: one recorder per
//! concern, and Warnings published without failing the reconcile (an Event is a report,
//! never a reason to retry).

use crate::DesiredCondition;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use tracing::warn;

/// A recorder reporting as `controller` (e.g. `tendril-operator`).
pub fn recorder(client: Client, controller: &str) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: controller.into(),
            instance: None,
        },
    )
}

/// Publishes a Warning Event about `regarding` (a repeat of the same one becomes a series);
/// a failure is logged, not returned.
pub async fn publish_warning(
    recorder: &Recorder,
    regarding: &ObjectReference,
    reason: &str,
    note: &str,
    action: &str,
) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, regarding).await {
        warn!(error = %e, %reason, "publishing a Warning Event failed");
    }
}

/// The problem last reported per object, so that each problem becomes one Warning Event:
/// again only when its message changes, and forgotten once it is gone.
pub struct ProblemLog<Key> {
    last: Mutex<HashMap<Key, String>>,
}

impl<Key> Default for ProblemLog<Key> {
    fn default() -> Self {
        Self {
            last: Mutex::default(),
        }
    }
}

impl<Key: Eq + Hash + Clone> ProblemLog<Key> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, String>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key`'s problem `message` is not reported yet; it counts as reported now.
    pub fn is_new(&self, key: &Key, message: &str) -> bool {
        let mut last = self.lock();
        if last.get(key).is_some_and(|m| m == message) {
            return false;
        }
        last.insert(key.clone(), message.to_string());
        true
    }

    /// `key` has no problem (any more).
    pub fn clear(&self, key: &Key) {
        self.lock().remove(key);
    }

    /// Of every current problem, the ones not reported yet (they count as reported now);
    /// objects without a problem are forgotten.
    pub fn fresh(
        &self,
        problems: impl IntoIterator<Item = (Key, DesiredCondition)>,
    ) -> Vec<(Key, DesiredCondition)> {
        let problems: HashMap<Key, DesiredCondition> = problems.into_iter().collect();
        self.lock().retain(|key, _| problems.contains_key(key));
        problems
            .into_iter()
            .filter(|(key, c)| self.is_new(key, &c.message))
            .collect()
    }
}

/// A Warning Event on each object of `store` named in `problems` (those of
/// [`ProblemLog::fresh`]), logged with `what`; objects gone from the store are skipped.
pub async fn warn_each<K>(
    recorder: &Recorder,
    store: &Store<K>,
    problems: Vec<(String, DesiredCondition)>,
    action: &str,
    what: &str,
) where
    K: Resource<DynamicType = ()> + Clone,
{
    for (name, problem) in problems {
        let Some(obj) = store.get(&ObjectRef::new(&name)) else {
            continue;
        };
        warn!(object = %name, reason = %problem.reason, message = %problem.message, "{what}");
        publish_warning(
            recorder,
            &obj.object_ref(&()),
            &problem.reason,
            &problem.message,
            action,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(message: &str) -> DesiredCondition {
        DesiredCondition::new("Valid", false, "InvalidSpec", message)
    }

    #[test]
    fn a_problem_is_reported_once_per_message_and_again_after_it_went_away() {
        let log: ProblemLog<String> = ProblemLog::default();
        let names = |v: Vec<(String, DesiredCondition)>| {
            let mut n: Vec<String> = v.into_iter().map(|(k, _)| k).collect();
            n.sort();
            n
        };
        let a = ("a".to_string(), problem("bad selector"));
        let b = ("b".to_string(), problem("no router id"));
        assert_eq!(names(log.fresh([a.clone(), b.clone()])), ["a", "b"]);
        assert!(
            log.fresh([a.clone(), b.clone()]).is_empty(),
            "reported twice"
        );
        // A new message for a: reported; b unchanged: not.
        let a2 = ("a".to_string(), problem("another bad selector"));
        assert_eq!(names(log.fresh([a2.clone(), b.clone()])), ["a"]);
        // b is fixed, then breaks again the same way: a new report.
        assert!(log.fresh([a2.clone()]).is_empty());
        assert_eq!(names(log.fresh([a2, b])), ["b"]);
    }

    #[test]
    fn one_object_at_a_time_is_new_until_cleared() {
        let log: ProblemLog<(String, String)> = ProblemLog::default();
        let key = ("ns".to_string(), "web".to_string());
        assert!(log.is_new(&key, "port 80 twice"));
        assert!(!log.is_new(&key, "port 80 twice"));
        log.clear(&key);
        assert!(log.is_new(&key, "port 80 twice"));
    }
}
