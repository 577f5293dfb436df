//! Leader election on a `coordination.k8s.io/v1` Lease (kube-lease-manager), so that of
//! several operator replicas exactly one runs the controllers.
//!
//! The work runs only while this process holds the lease. When the lease is lost the
//! work's cancellation token fires and the controllers stop; on shutdown the lease is
//! released (holder cleared). A standby checks the lease when the holder's lease would
//! expire, so takeover happens within one lease duration after the leader stopped renewing.
//! `leader_election_master_status{name}` is 1 while leading.
//!
//! The Lease namespace must exist: the operator does not create namespaces (the
//! deployment manifests do). While it is missing the elector logs and retries.
//!
//! Known limit: kube-lease-manager keeps reporting leadership while it cannot reach the
//! API server to renew. A replica that cannot reach the API server cannot write either,
//! so the window where two replicas could both write is an asymmetric partition.

use super::backoff::Backoff;
use super::metrics::Metrics;
use super::server::Health;
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

const HEALTH_CHECK: &str = "leader-election";

/// Settings of leader election (`leaderElection` in operator.yaml).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    /// Run controllers only while holding the Lease. Off: run them unconditionally.
    pub enabled: bool,
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease (must exist).
    pub lease_namespace: String,
    /// How long a lease is valid after its last renewal, in seconds.
    pub lease_duration_seconds: u64,
    /// The holder renews this many seconds before the lease expires (< duration).
    pub renew_grace_seconds: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_name: "tendril-operator".to_string(),
            lease_namespace: "tendril-system".to_string(),
            lease_duration_seconds: 15,
            renew_grace_seconds: 5,
        }
    }
}

impl LeaderElectionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_duration_seconds == 0 || self.renew_grace_seconds == 0 {
            return Err(
                "leaderElection: leaseDurationSeconds and renewGraceSeconds must be > 0".into(),
            );
        }
        if self.renew_grace_seconds >= self.lease_duration_seconds {
            return Err(
                "leaderElection: renewGraceSeconds must be less than leaseDurationSeconds".into(),
            );
        }
        if self.lease_name.is_empty() || self.lease_namespace.is_empty() {
            return Err("leaderElection: leaseName and leaseNamespace must not be empty".into());
        }
        Ok(())
    }
}

/// The identity of this elector: `<hostname>_<pid>`.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string());
    format!("{host}_{}", std::process::id())
}

/// Runs `work(term)` while this process holds the lease, again each time it regains it,
/// until `shutdown` fires; then stops the work and releases the lease.
pub async fn run_while_leader<F, Fut>(
    client: Client,
    config: &LeaderElectionConfig,
    identity: &str,
    metrics: &Metrics,
    health: &Health,
    shutdown: CancellationToken,
    work: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let gauge = metrics.leader(&config.lease_name);
    gauge.set(0);
    health.register(HEALTH_CHECK);
    let retry = Backoff {
        base_millis: 500,
        max_millis: 10_000,
        jitter: 0.5,
    };
    let mut attempt = 0;
    while !shutdown.is_cancelled() {
        let manager = match build(client.clone(), config, identity).await {
            Ok(m) => m,
            Err(e) => {
                attempt += 1;
                let delay = retry.delay(attempt, &mut rand::rng());
                warn!(error = %e, lease = %config.lease_name, namespace = %config.lease_namespace,
                      retry_in = ?delay, "cannot set up the leader election Lease");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        attempt = 0;
        health.set_ready(HEALTH_CHECK, true);
        info!(identity, lease = %config.lease_name, "leader election started, standing by");
        let (mut rx, handle) = manager.watch().await;
        let shutting_down = lead(&mut rx, config, identity, &gauge, &shutdown, &work).await;
        // Closing the channel makes the lease watcher release the lease and exit.
        drop(rx);
        if shutting_down {
            match tokio::time::timeout(RELEASE_TIMEOUT, handle).await {
                Ok(res) => report(res),
                Err(_) => warn!("timed out releasing the lease"),
            }
            break;
        }
        report(handle.await);
        warn!("lease watcher ended; restarting leader election");
    }
    // Shutdown: closing the channel makes the lease watcher release the lease and exit.
    health.remove(HEALTH_CHECK);
    gauge.set(0);
    info!(identity, lease = %config.lease_name, "leader election stopped");
}

/// Alternates standby and leading on one lease watcher. Returns true on shutdown, false
/// when the lease watcher ended (the elector starts over).
async fn lead<F, Fut>(
    rx: &mut watch::Receiver<bool>,
    config: &LeaderElectionConfig,
    identity: &str,
    gauge: &prometheus_client::metrics::gauge::Gauge,
    shutdown: &CancellationToken,
    work: &F,
) -> bool
where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        // Standby until we hold the lease.
        while !*rx.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                changed = rx.changed() => if changed.is_err() { return false },
            }
        }
        info!(identity, lease = %config.lease_name, "became leader");
        gauge.set(1);
        let term = shutdown.child_token();
        let mut task = tokio::spawn(work(term.clone()));
        let lost = tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = wait_for(rx, false) => true,
            res = &mut task => {
                error!(?res, "controllers stopped while leading");
                true
            }
        };
        term.cancel();
        if !task.is_finished() {
            let _ = task.await;
        }
        gauge.set(0);
        if !lost {
            return true;
        }
        warn!(identity, lease = %config.lease_name, "lost leadership; controllers stopped");
        if rx.has_changed().is_err() {
            return false;
        }
    }
}

/// Runs `work` under leader election when enabled, else directly until `shutdown`.
pub async fn run_maybe_leader<F, Fut>(
    client: Client,
    config: &LeaderElectionConfig,
    identity: &str,
    metrics: &Metrics,
    health: &Health,
    shutdown: CancellationToken,
    work: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if config.enabled {
        run_while_leader(client, config, identity, metrics, health, shutdown, work).await;
    } else {
        work(shutdown).await;
    }
}

async fn build(
    client: Client,
    config: &LeaderElectionConfig,
    identity: &str,
) -> kube_lease_manager::Result<LeaseManager> {
    LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&config.lease_namespace)
        .with_identity(identity)
        .with_duration(config.lease_duration_seconds)
        .with_grace(config.renew_grace_seconds)
        .build()
        .await
}

/// Waits until the channel says `value` (or the sender is gone).
async fn wait_for(rx: &mut watch::Receiver<bool>, value: bool) {
    loop {
        if *rx.borrow_and_update() == value {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn report(res: Result<kube_lease_manager::Result<LeaseManager>, tokio::task::JoinError>) {
    match res {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "lease watcher failed"),
        Err(e) => warn!(error = %e, "lease watcher panicked"),
    }
}

/// How long shutdown waits for the lease to be released.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
