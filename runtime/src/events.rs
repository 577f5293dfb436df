//! Kubernetes Events (events.k8s.io) about the objects a concern handles: one recorder per
//! concern, and Warnings published without failing the reconcile (an Event is a report,
//! never a reason to retry).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
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
