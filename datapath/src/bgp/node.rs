//! The node's BGP loop: this node's `BGPNodeConfig` → gobgpd, then what gobgpd reports →
//! `BGPNodeConfig.status` and `tendril_bgp_*`.
//!
//! It runs beside the datapath's passes, not as one of their steps: BGP shares nothing
//! with the eBPF maps, must not hold the datapath back when gobgpd is missing or failing
//! (nor be held back by it), and reports session state every few seconds — much more often
//! than the datapath needs to resync. It is driven like every agent loop
//! ([`crate::agent::driver`]): a pass on each change of the node's `BGPNodeConfig`
//! (debounced), on every daemon start or exit, every `bgp.statusIntervalSeconds`, and with
//! backoff after a failure.
//!
//! A pass: the desired speaker ([`super::desired`]); the daemon wanted or not
//! ([`super::daemon`]); `StartBgp` if the daemon has no speaker yet (or another ASN /
//! router id); ListPeer and ListPath, the [`super::desired::plan`] of the difference, and
//! its calls; then ListPeer again for the status. A new daemon epoch starts from nothing:
//! every peer and path is added again, the peers flagged as restarting (graceful restart's
//! R and F bits) so routers that kept the node's routes keep them until its End-of-RIB.

use super::daemon::{Daemon, DaemonConfig, DaemonState};
use super::desired::{
    self, DesiredBgp, MAX_PASSWORD_BYTES, PASSWORD_KEY, PASSWORD_SECRET_MISSING, Password,
    PasswordMissing, PeerSpec,
};
use super::metrics::{BgpMetrics, PeerLabels, STATES, StateLabel};
use super::speaker::{self, ApiError};
use crate::agent::driver::{self, LoopTiming, NodeLoop, PassOutcome};
use crate::agent::view::{Wake, wake_on};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tendril_crds::v1alpha1::{BGPNodeConfig, SessionStatus};
use tendril_runtime::caches::{Cache, Caches};
use tendril_runtime::conditions::{self, DesiredCondition, REALIZED};
use tendril_runtime::{apply_body, apply_status};
use tokio_util::sync::CancellationToken;

/// Field manager of `BGPNodeConfig.status`.
pub const FIELD_MANAGER: &str = "tendril-agent-bgp";
/// Scope of the agent's `BGPNodeConfig` cache: its own node's object only.
pub const CACHE_SCOPE: &str = "own-node";

/// The agent's cache of its node's `BGPNodeConfig` (a watch selecting its name).
pub fn node_config_cache(caches: &Caches, node_name: &str) -> Cache<BGPNodeConfig> {
    caches.scoped(
        CACHE_SCOPE,
        Api::all(caches.client().clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
    )
}

/// The agent's cache of the Secrets of `namespace` (`bgp.secretsNamespace`): the peers'
/// passwords. Its scope is the namespace: the only one whose Secrets the agent reads.
pub fn secrets_cache(caches: &Caches, namespace: &str) -> Cache<Secret> {
    caches.scoped(
        namespace,
        Api::namespaced(caches.client().clone(), namespace),
        watcher::Config::default(),
    )
}

/// The password of Secret `namespace/name` (key `password`), from the cache.
fn read_password(
    secrets: &Store<Secret>,
    listed: bool,
    namespace: &str,
    name: &str,
) -> Result<Password, PasswordMissing> {
    let Some(secret) = secrets.get(&ObjectRef::new(name).within(namespace)) else {
        return Err(if listed {
            PasswordMissing::Secret
        } else {
            PasswordMissing::NotListed
        });
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(PASSWORD_KEY))
        .ok_or(PasswordMissing::Key)?;
    match std::str::from_utf8(&bytes.0) {
        Ok(p) if !p.is_empty() && p.len() <= MAX_PASSWORD_BYTES => Ok(Password::new(p)),
        _ => Err(PasswordMissing::Unusable),
    }
}

/// What the loop needs to know.
#[derive(Clone, Debug)]
pub struct BgpNodeConfig {
    pub node_name: String,
    pub daemon: DaemonConfig,
    /// gobgpd's BGP listen port; -1: it only connects out.
    pub listen_port: i32,
    /// Where the peers' password Secrets are (`bgp.secretsNamespace`).
    pub secrets_namespace: String,
    pub timing: LoopTiming,
}

/// Runs the node's BGP loop until `shutdown` (which also kills the daemon).
pub async fn run(
    client: kube::Client,
    configs: Cache<BGPNodeConfig>,
    secrets: Cache<Secret>,
    cfg: BgpNodeConfig,
    metrics: BgpMetrics,
    shutdown: CancellationToken,
) {
    let wake = Wake::default();
    wake_on(&configs, &wake, |_| true);
    // A created, changed or deleted password reaches gobgpd on the next pass.
    wake_on(&secrets, &wake, |_| true);
    let secrets_listed = Arc::new(AtomicBool::new(false));
    {
        let (store, listed, wake) = (secrets.store(), secrets_listed.clone(), wake.clone());
        tokio::spawn(async move {
            tendril_runtime::store_ready(&store).await;
            listed.store(true, Ordering::Relaxed);
            wake.touch();
        });
    }
    let daemon = Daemon::spawn(
        cfg.daemon.clone(),
        metrics.clone(),
        wake.clone(),
        shutdown.clone(),
    );
    let store = configs.store();
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tendril_runtime::store_ready(&store) => {}
    }
    for state in STATES {
        metrics
            .sessions
            .get_or_create(&StateLabel {
                state: state.into(),
            })
            .set(0);
    }
    let timing = cfg.timing.clone();
    let mut node = BgpNode {
        client,
        configs,
        secrets: secrets.store(),
        secrets_listed,
        cfg,
        metrics,
        daemon,
        epoch: None,
        api: None,
        applied: BTreeMap::new(),
        configured: false,
        last_status: None,
        peer_series: BTreeSet::new(),
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = driver::drive(&wake, &timing, &mut node) => {}
    }
}

/// The loop's state between passes.
struct BgpNode {
    client: kube::Client,
    configs: Cache<BGPNodeConfig>,
    secrets: Store<Secret>,
    /// The Secrets' store has been listed once (until then a missing one may only be late).
    secrets_listed: Arc<AtomicBool>,
    cfg: BgpNodeConfig,
    metrics: BgpMetrics,
    daemon: Daemon,
    /// The daemon start the fields below describe.
    epoch: Option<u64>,
    api: Option<super::api::Client>,
    /// The settings this process gave each peer of the current daemon.
    applied: BTreeMap<IpAddr, PeerSpec>,
    /// The current daemon has been configured once (later peers are not restarting).
    configured: bool,
    /// The status last written (unchanged statuses are not written again).
    last_status: Option<(Option<String>, serde_json::Value)>,
    /// Per-peer metric series set, to remove those of peers that went away.
    peer_series: BTreeSet<PeerLabels>,
}

/// What a pass reports in the status.
struct Report {
    condition: DesiredCondition,
    realized_revision: Option<i64>,
    sessions: Vec<SessionStatus>,
}

impl NodeLoop for BgpNode {
    async fn pass(&mut self) -> PassOutcome {
        let Some(config) = self
            .configs
            .store()
            .get(&ObjectRef::new(&self.cfg.node_name))
        else {
            // No BGP on this node (or its config was deleted: peers withdraw at once).
            self.daemon.want(false);
            self.observe_sessions(&[]);
            self.metrics.paths.set(0);
            self.last_status = None;
            return PassOutcome::Converged;
        };
        let (outcome, report) = self.converge(&config).await;
        self.observe_sessions(&report.sessions);
        self.write_status(&config, report).await;
        outcome
    }

    fn realized(&mut self, delay: Duration) {
        self.metrics.realize_seconds.observe(delay.as_secs_f64());
    }
}

impl BgpNode {
    async fn converge(&mut self, config: &BGPNodeConfig) -> (PassOutcome, Report) {
        let previous = config.status.as_ref().and_then(|s| s.realized_revision);
        let listed = self.secrets_listed.load(Ordering::Relaxed);
        let namespace = &self.cfg.secrets_namespace;
        let desired = match desired::desired(&config.spec, namespace, |name| {
            read_password(&self.secrets, listed, namespace, name)
        }) {
            Ok(Some(desired)) => desired,
            Ok(None) => {
                self.daemon.want(false);
                self.metrics.paths.set(0);
                let report = Report {
                    condition: DesiredCondition::new(
                        REALIZED,
                        true,
                        "NoRouters",
                        "no BGP router on this node: gobgpd is not running",
                    ),
                    realized_revision: Some(config.spec.revision),
                    sessions: vec![],
                };
                return (PassOutcome::Converged, report);
            }
            Err(invalid) => {
                tracing::warn!(reason = invalid.reason, error = %invalid.message, "BGPNodeConfig not realized");
                let report = Report {
                    condition: DesiredCondition::new(
                        REALIZED,
                        false,
                        invalid.reason,
                        invalid.message,
                    ),
                    realized_revision: previous,
                    sessions: vec![],
                };
                // Nothing to retry until the spec changes.
                return (PassOutcome::Converged, report);
            }
        };
        self.daemon.want(true);
        let DaemonState::Running { epoch } = self.daemon.state() else {
            let report = Report {
                condition: DesiredCondition::new(
                    REALIZED,
                    false,
                    "DaemonNotRunning",
                    format!(
                        "gobgpd ({}) is not running; the agent (re)starts it with backoff",
                        self.cfg.daemon.gobgpd.display()
                    ),
                ),
                realized_revision: previous,
                sessions: idle_sessions(&desired),
            };
            // The daemon's start wakes the loop.
            return (PassOutcome::Waiting, report);
        };
        if self.epoch != Some(epoch) {
            self.epoch = Some(epoch);
            self.api = None;
            self.applied.clear();
            self.configured = false;
        }
        match self.apply(&desired).await {
            Ok(mut sessions) if !desired.held_back.is_empty() => {
                let problems: Vec<&str> = desired
                    .held_back
                    .values()
                    .map(|h| h.problem.as_str())
                    .collect();
                tracing::warn!(problems = ?problems, "BGP peers held back: their password cannot be read");
                // A held-back peer gobgpd does not hold is reported as a session that is down.
                for (address, held) in &desired.held_back {
                    let address = address.to_string();
                    if !sessions.iter().any(|s| s.peer_address == address) {
                        sessions.push(SessionStatus {
                            local_asn: i64::from(desired.speaker.asn),
                            peer_address: address,
                            peer_asn: i64::from(held.peer_asn),
                            state: "Idle".into(),
                            advertised: 0,
                            received: 0,
                            established_since: None,
                        });
                    }
                }
                sessions.sort_by(|a, b| a.peer_address.cmp(&b.peer_address));
                let report = Report {
                    condition: DesiredCondition::new(
                        REALIZED,
                        false,
                        PASSWORD_SECRET_MISSING,
                        format!(
                            "{}; the other {} peers and {} paths are configured",
                            problems.join("; "),
                            desired.peers.len(),
                            desired.paths.len()
                        ),
                    ),
                    realized_revision: previous,
                    sessions,
                };
                // The Secret's arrival wakes the loop.
                (PassOutcome::Converged, report)
            }
            Ok(sessions) => {
                let report = Report {
                    condition: DesiredCondition::new(
                        REALIZED,
                        true,
                        "Realized",
                        format!(
                            "gobgpd holds {} peers and {} paths of revision {}",
                            desired.peers.len(),
                            desired.paths.len(),
                            desired.revision
                        ),
                    ),
                    realized_revision: Some(desired.revision),
                    sessions,
                };
                (PassOutcome::Converged, report)
            }
            Err(error) => {
                tracing::warn!(%error, "configuring gobgpd");
                self.metrics
                    .api_errors
                    .get_or_create(&super::metrics::OperationLabel {
                        operation: error.operation.into(),
                    })
                    .inc();
                // Reconnect next time (the daemon may have restarted under us).
                self.api = None;
                let report = Report {
                    condition: DesiredCondition::new(
                        REALIZED,
                        false,
                        "DaemonApiFailed",
                        error.to_string(),
                    ),
                    realized_revision: previous,
                    sessions: idle_sessions(&desired),
                };
                (PassOutcome::Failed, report)
            }
        }
    }

    /// Converges gobgpd to `desired`; returns the sessions' state afterwards.
    async fn apply(&mut self, desired: &DesiredBgp) -> Result<Vec<SessionStatus>, ApiError> {
        let api = match &mut self.api {
            Some(api) => api,
            None => {
                let api = super::api::connect(&self.cfg.daemon.socket)
                    .await
                    .map_err(|e| ApiError {
                        operation: "connect",
                        status: tonic::Status::unavailable(e.to_string()),
                    })?;
                self.api.insert(api)
            }
        };
        match speaker::global(api).await? {
            Some(running) if running == desired.speaker => {}
            running => {
                if running.is_some() {
                    // Another ASN or router id: the speaker starts over (sessions reset).
                    speaker::stop(api).await?;
                    self.applied.clear();
                }
                speaker::start(api, &desired.speaker, self.cfg.listen_port).await?;
                tracing::info!(asn = desired.speaker.asn, router_id = %desired.speaker.router_id, "BGP speaker started");
            }
        }
        let held_peers: BTreeSet<IpAddr> = speaker::peers(api)
            .await?
            .iter()
            .filter_map(|p| p.conf.as_ref()?.neighbor_address.parse().ok())
            .collect();
        let held_paths = speaker::local_paths(api).await?;
        let plan = desired::plan(desired, &held_peers, &self.applied, &held_paths);
        if !plan.is_empty() {
            tracing::info!(
                add_peers = plan.add_peers.len(),
                replace_peers = plan.replace_peers.len(),
                delete_peers = plan.delete_peers.len(),
                add_paths = plan.add_paths.len(),
                delete_paths = plan.delete_paths.len(),
                revision = desired.revision,
                "applying BGP changes"
            );
        }
        for address in &plan.delete_peers {
            speaker::delete_peer(api, *address).await?;
            self.applied.remove(address);
        }
        for peer in &plan.replace_peers {
            speaker::delete_peer(api, peer.address).await?;
            self.applied.remove(&peer.address);
            speaker::add_peer(api, peer, false).await?;
            self.applied.insert(peer.address, peer.clone());
        }
        let restarting = !self.configured;
        for peer in &plan.add_peers {
            speaker::add_peer(api, peer, restarting).await?;
            self.applied.insert(peer.address, peer.clone());
        }
        for path in &plan.delete_paths {
            speaker::delete_path(api, path).await?;
        }
        for path in &plan.add_paths {
            speaker::add_path(api, path).await?;
        }
        self.configured = true;
        self.metrics
            .paths
            .set(i64::try_from(desired.paths.len()).unwrap_or(i64::MAX));
        let mut sessions: Vec<SessionStatus> = speaker::peers(api)
            .await?
            .iter()
            .filter_map(|p| speaker::session_status(p, desired.speaker.asn))
            .collect();
        for session in &mut sessions {
            session.advertised = if session.state == "Established" {
                speaker::advertised_to(api, &session.peer_address).await?
            } else {
                0
            };
        }
        sessions.sort_by(|a, b| a.peer_address.cmp(&b.peer_address));
        Ok(sessions)
    }

    fn observe_sessions(&mut self, sessions: &[SessionStatus]) {
        let m = &self.metrics;
        for state in STATES {
            let n = sessions.iter().filter(|s| s.state == state).count();
            m.sessions
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut series = BTreeSet::new();
        for s in sessions {
            let labels = PeerLabels {
                local_asn: s.local_asn.to_string(),
                peer_address: s.peer_address.clone(),
                peer_asn: s.peer_asn.to_string(),
            };
            m.session_established
                .get_or_create(&labels)
                .set(i64::from(s.state == "Established"));
            m.prefixes_advertised
                .get_or_create(&labels)
                .set(s.advertised);
            m.prefixes_received.get_or_create(&labels).set(s.received);
            series.insert(labels);
        }
        for gone in self.peer_series.difference(&series) {
            m.session_established.remove(gone);
            m.prefixes_advertised.remove(gone);
            m.prefixes_received.remove(gone);
        }
        self.peer_series = series;
    }

    /// `BGPNodeConfig.status` by server-side apply, when it differs from the last write.
    async fn write_status(&mut self, config: &BGPNodeConfig, report: Report) {
        let previous = config
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let established = report
            .sessions
            .iter()
            .filter(|s| s.state == "Established")
            .count();
        let mut status = json!({
            "establishedSessions": established,
            "sessions": report.sessions,
        });
        if let Some(revision) = report.realized_revision {
            status["realizedRevision"] = json!(revision);
        }
        // Compared without the condition's timestamp: unchanged → no write.
        let key = (
            config.metadata.uid.clone(),
            json!([
                status,
                report.condition.reason,
                report.condition.status,
                report.condition.message,
                config.metadata.generation
            ]),
        );
        if self.last_status.as_ref() == Some(&key) {
            return;
        }
        status["conditions"] = json!([conditions::merge(
            conditions::find(&previous, REALIZED),
            &report.condition,
            config.metadata.generation,
            k8s_openapi::jiff::Timestamp::now(),
        )]);
        let body =
            apply_body::<BGPNodeConfig>(&self.cfg.node_name, None, json!({ "status": status }));
        let api: Api<BGPNodeConfig> = Api::all(self.client.clone());
        match apply_status(&api, FIELD_MANAGER, &body).await {
            Ok(_) => {
                tracing::debug!(revision = ?report.realized_revision, established, "BGPNodeConfig status");
                self.last_status = Some(key);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(error = %e, "writing BGPNodeConfig status"),
        }
    }
}

/// The sessions of `desired` while gobgpd cannot be asked: all Idle.
fn idle_sessions(desired: &DesiredBgp) -> Vec<SessionStatus> {
    desired
        .peers
        .values()
        .map(|p| SessionStatus {
            local_asn: i64::from(desired.speaker.asn),
            peer_address: p.address.to_string(),
            peer_asn: i64::from(p.peer_asn),
            state: "Idle".into(),
            advertised: 0,
            received: 0,
            established_since: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;
    use kube::runtime::reflector;

    fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("tendril-bgp-secrets".into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn a_password_is_the_password_key_of_its_secret() {
        let (store, mut writer) = reflector::store::<Secret>();
        let too_long = [b'x'; MAX_PASSWORD_BYTES + 1];
        for s in [
            secret("tor-1", &[("password", b"s3cret"), ("other", b"x")]),
            secret("no-key", &[("pass", b"s3cret")]),
            secret("empty", &[("password", b"")]),
            secret("binary", &[("password", &[0xff, 0xfe])]),
            secret("long", &[("password", &too_long)]),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let read = |listed, name| read_password(&store, listed, "tendril-bgp-secrets", name);
        assert_eq!(read(true, "tor-1"), Ok(Password::new("s3cret")));
        assert_eq!(read(true, "no-key"), Err(PasswordMissing::Key));
        for unusable in ["empty", "binary", "long"] {
            assert_eq!(read(true, unusable), Err(PasswordMissing::Unusable));
        }
        assert_eq!(read(true, "gone"), Err(PasswordMissing::Secret));
        // Before the first list, a missing Secret may only be late.
        assert_eq!(read(false, "gone"), Err(PasswordMissing::NotListed));
        // Only the configured namespace is read.
        assert_eq!(
            read_password(&store, true, "default", "tor-1"),
            Err(PasswordMissing::Secret)
        );
    }
}
