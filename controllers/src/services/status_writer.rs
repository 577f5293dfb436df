//! The status writer: `LBService.status` from the reconciles' board and the nodes'
//! reports ([`super::status`] says what), written only where its truth changed.

use super::index::Entry;
use super::status::{self, DesiredStatus, NodeReports};
use super::{Key, STATUS_CONCURRENCY, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use serde_json::json;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_runtime::caches::Cache;
use tendril_runtime::{self as runtime, conditions};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

impl Shared {
    /// One pass of the status writer: every status whose truth changed is written.
    /// Returns when the earliest pending revision reaches its deadline, if one is pending.
    async fn write_statuses(
        &self,
        state: &mut StatusState,
    ) -> Result<Option<Duration>, kube::Error> {
        let StatusState {
            written,
            pending_since,
        } = state;
        let limit = Duration::from_millis(self.config.realize_deadline_millis);
        let now = Instant::now();
        let nodes = NodeReports::new(self.stores.networks.state().iter().map(|nn| {
            nn.status
                .as_ref()
                .and_then(|s| s.realized_services_revision)
        }));
        let entries: Vec<(Key, Entry)> = self
            .board
            .lock()
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        self.metrics.lbservices.set(entries.len() as i64);
        self.metrics
            .backends
            .set(entries.iter().map(|(_, e)| e.backends as i64).sum());
        self.metrics
            .invalid
            .set(entries.iter().filter(|(_, e)| !e.valid.status).count() as i64);
        let keys: BTreeSet<&Key> = entries.iter().map(|(k, _)| k).collect();
        written.retain(|k, _| keys.contains(k));
        pending_since.retain(|k, _| keys.contains(k));

        let mut todo = Vec::new();
        let mut recheck: Option<Duration> = None;
        let mut pending = 0;
        for (key, e) in &entries {
            let stored = self.stores.lbservice(key);
            let stored_status = stored.as_ref().and_then(|lb| lb.status.as_ref());
            let shown = match written.get(key) {
                Some(d) => d.realized.clone(),
                None => status::shown_realized(stored_status),
            };
            // The deadline runs from the oldest revision not yet realized everywhere: a
            // Service that changes faster than its nodes realize still turns Pending.
            let since = if nodes.at_least(e.revision) < nodes.nodes() {
                pending += 1;
                *pending_since.entry(key.clone()).or_insert(e.since)
            } else {
                pending_since.remove(key);
                e.since
            };
            let deadline = status::Deadline {
                pending_for: now.saturating_duration_since(since),
                limit,
            };
            let (want, due) =
                status::desired(&e.valid, e.revision, &nodes, deadline, shown.as_ref());
            if let Some(due) = due {
                recheck = Some(recheck.map_or(due, |r| r.min(due)));
            }
            // What the store shows needs no memory of ours: `written` holds only writes the
            // store has not caught up with (a copy per LBService was ~0.7 KiB each).
            if status::is_current(stored_status, &want) {
                written.remove(key);
                continue;
            }
            if written.get(key) == Some(&want) {
                continue;
            }
            // A new LBService within its deadline, nothing wrong with it: its first status
            // waits until there is a Realized to say, so that it is written once.
            if want.realized.is_none() && want.valid.status && stored_status.is_none() {
                continue;
            }
            let previous_conditions = stored_status
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            todo.push((key.clone(), want, previous_conditions));
        }
        self.metrics.pending.set(pending);
        if todo.is_empty() {
            return Ok(recheck);
        }
        debug!(
            writes = todo.len(),
            nodes = nodes.nodes(),
            "writing LBService statuses"
        );
        let results = futures::stream::iter(todo)
            .map(|(key, want, previous)| async move {
                let now = Timestamp::now();
                let conds: Vec<_> = std::iter::once(&want.valid)
                    .chain(want.realized.as_ref())
                    .map(|c| conditions::merge(conditions::find(&previous, &c.type_), c, None, now))
                    .collect();
                let body = runtime::apply_body::<LBService>(
                    &key.1,
                    Some(&key.0),
                    json!({"status": {"conditions": conds}}),
                );
                let api = Api::<LBService>::namespaced(self.client.clone(), &key.0);
                let res = runtime::apply_status(&api, &self.manager, &body).await;
                (key, want, res)
            })
            .buffer_unordered(STATUS_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut first_error = None;
        for (key, want, res) in results {
            match res {
                Ok(_) => {
                    self.metrics.status_writes.inc();
                    written.insert(key, want);
                }
                // Deleted meanwhile: nothing to describe.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    written.remove(&key);
                }
                Err(e) => {
                    warn!(namespace = %key.0, service = %key.1, error = %e, "writing the LBService status failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(recheck), Err)
    }
}

/// What the status writer keeps between passes.
#[derive(Default)]
struct StatusState {
    /// What this term wrote that the store does not show yet (it lags behind).
    written: HashMap<Key, DesiredStatus>,
    /// Since when each LBService has had a revision some node does not realize.
    pending_since: HashMap<Key, Instant>,
}

/// Writes the statuses whose truth changed, on every change of the nodes' reports, of the
/// LBServices or of what the reconciles recorded; a failed pass is retried with backoff.
pub(super) async fn write_statuses(
    shared: Arc<Shared>,
    networks: Cache<NodeNetwork>,
    lbservices: Cache<LBService>,
    backoff: runtime::Backoff,
    stop: CancellationToken,
) {
    let batch = Duration::from_millis(shared.config.status_batch_millis);
    let mut network_changes = networks.subscribe();
    let mut lb_changes = lbservices.subscribe();
    let mut state = StatusState::default();
    let mut failures = 0u32;
    // The earliest deadline of a pending revision: its status is looked at again then.
    let mut recheck = None;
    loop {
        let retry = if failures > 0 {
            backoff.delay(failures, &mut rand::rng())
        } else {
            recheck.unwrap_or(Duration::from_secs(3600))
        };
        // (A closed channel — the process is ending — also returns at once; the stop
        // token ends the loop.)
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = shared.board.wake.notified() => {}
            _ = network_changes.recv_change() => {}
            _ = lb_changes.recv_change() => {}
            _ = tokio::time::sleep(retry) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(batch) => {}
        }
        // Everything that arrived meanwhile is handled by this one pass.
        while network_changes.recv_change().now_or_never().is_some() {}
        while lb_changes.recv_change().now_or_never().is_some() {}
        if shared
            .stores
            .networks
            .wait_until_ready()
            .now_or_never()
            .is_none()
            || shared
                .stores
                .lbservices
                .wait_until_ready()
                .now_or_never()
                .is_none()
        {
            continue;
        }
        match shared.write_statuses(&mut state).await {
            Ok(next) => {
                failures = 0;
                recheck = next;
            }
            Err(_) => failures += 1,
        }
    }
}
