//! Step `services`: every `LBService` into the `lb_*` maps ([`crate::services::desired`]),
//! the node's and its pods' network namespaces into `lb_netns`, `lb_config`, and the
//! socket-LB cgroup hooks attached (once per process, then kept pinned).
//!
//! Reports: `NodeNetwork.status.realizedServicesRevision` (the highest LBService revision
//! realized, only when the whole step converged; never lower than before), the `SocketLB`
//! condition, `tendril_services_*` metrics (programmed services/frontends/backends, sync
//! duration, network programming duration from `tendril.dev/service-changed-at`,
//! skipped frontends by reason, socket LB enabled), and a Warning Event on the NodeNetwork
//! when a services map is full.

use super::{MapGroup, MapOutcome, NodeContext, Pass, Step, StepFailure};
use crate::bpf::maps::{LbConfig, LbItem, NETNS_NODE, NETNS_POD};
use crate::bpf::{AnyKey, DataplaneError, Report};
use crate::services::desired::{self, BackendAddr, FrontendAddr, MaglevTable, NodeServices};
use crate::services::health_check::{self, HealthCheckServers};
use crate::services::kernel::{self, NetnsCookies};
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tendril_crds::facts::annotations::SERVICE_CHANGED_AT;
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tokio_util::sync::CancellationToken;

/// The socket LB on this node, as the `SocketLB` condition and metric report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketLb {
    /// Hooks attached to this cgroup.
    Attached(PathBuf),
    /// `services.socketLB.enabled: false` or `services.enabled: false`.
    Disabled,
    /// Attaching failed: services work only where the tc path covers them.
    Failed(String),
}

/// What the services step did in a pass (default: it did not run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicesOutcome {
    /// The highest LBService revision the maps now realize (converged without failure).
    pub realized_revision: Option<i64>,
    pub socket_lb: Option<SocketLb>,
}

/// Seconds from the Service change behind `svc`'s revision ([`SERVICE_CHANGED_AT`]) to
/// `now`; `None` without a readable annotation. A clock behind the operator's gives 0.
pub fn programming_delay(svc: &LBService, now: k8s_openapi::jiff::Timestamp) -> Option<f64> {
    let at: k8s_openapi::jiff::Timestamp = svc
        .metadata
        .annotations
        .as_ref()?
        .get(SERVICE_CHANGED_AT)?
        .parse()
        .ok()?;
    Some(now.duration_since(at).as_secs_f64().max(0.0))
}

/// The node's addresses (every type, both families) from its NodeNetwork.
pub fn node_addresses(network: Option<&NodeNetwork>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = network
        .map(|nn| {
            nn.spec
                .addresses
                .iter()
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// The step, with what it keeps between passes.
pub struct Services {
    maglev: Option<MaglevTable>,
    cookies: Arc<Mutex<NetnsCookies>>,
    socket_lb: Option<SocketLb>,
    /// (namespace/name, revision) whose programming delay was observed.
    observed: BTreeSet<(String, i64)>,
    /// The highest revision realized so far (reported monotonically).
    realized: Option<i64>,
    /// What the node reported when this process started: revisions up to it were realized
    /// by an earlier process, their delay is unknown (not this process's uptime).
    reported_at_start: Option<Option<i64>>,
    full_reported: bool,
    recorder: Option<Recorder>,
    /// Health-check node ports of `externalTrafficPolicy: Local` services (opened on the
    /// first pass, in the node's network namespace).
    health_checks: Option<HealthCheckServers>,
    /// Whether the last services step converged: `serviceProxyHealthy` of the health checks.
    healthy: Arc<AtomicBool>,
}

impl Services {
    /// `maglev`: the Maglev table builder (`None`: Maglev services select at random).
    pub fn new(maglev: Option<MaglevTable>) -> Self {
        Self {
            maglev,
            cookies: Arc::default(),
            socket_lb: None,
            observed: BTreeSet::new(),
            realized: None,
            reported_at_start: None,
            full_reported: false,
            recorder: None,
            health_checks: None,
            healthy: Arc::default(),
        }
    }
}

/// The blocking half's result.
struct Converged {
    report: Report<LbItem>,
    desired: desired::DesiredServices,
    netns_errors: Vec<String>,
}

impl Step for Services {
    const NAME: &'static str = "services";

    async fn run(&mut self, node: &NodeContext, pass: &mut Pass) -> Result<(), StepFailure> {
        let cfg = &node.cfg.services;
        if !cfg.enabled {
            self.socket_lb = Some(SocketLb::Disabled);
            node.metrics.socket_lb_enabled.set(0);
            pass.services = ServicesOutcome {
                realized_revision: None,
                socket_lb: self.socket_lb.clone(),
            };
            return Ok(());
        }
        let started = Instant::now();
        let services: Vec<Arc<LBService>> = node.view.lb_services.store().state();
        let own = node
            .view
            .node_networks
            .store()
            .get(&ObjectRef::new(&node.cfg.node_name));
        if self.reported_at_start.is_none() {
            let reported = own
                .as_ref()
                .and_then(|nn| nn.status.as_ref())
                .and_then(|s| s.realized_services_revision);
            self.reported_at_start = Some(reported);
            self.realized = self.realized.max(reported);
        }
        let addresses = node_addresses(own.as_deref());
        let mut netns: Vec<(PathBuf, u8)> = vec![(
            node.cfg
                .node_netns
                .clone()
                .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net")),
            NETNS_NODE,
        )];
        netns.extend((node.pod_netns)().into_iter().map(|p| (p, NETNS_POD)));
        let lb_config = LbConfig {
            maglev_table_size: cfg.maglev_table_size,
            hash_seed: cfg.hash_seed,
        };
        let (node_name, default_algorithm, maglev) =
            (node.cfg.node_name.clone(), cfg.algorithm, self.maglev);
        let cookies = self.cookies.clone();
        let converged = node
            .with_dataplane(move |dp| {
                // Both families: their ids are one numbering.
                let held = dp.lb.held_ids()?;
                let held_backends: BTreeMap<BackendAddr, u32> = (held.backends.iter())
                    .map(|(id, b)| (BackendAddr::from(b), *id))
                    .chain(
                        held.backends6
                            .iter()
                            .map(|(id, b)| (BackendAddr::from(b), *id)),
                    )
                    .collect();
                let held_frontends: BTreeMap<FrontendAddr, u16> = (held.revnat.iter())
                    .map(|(index, r)| (FrontendAddr::from(r), *index))
                    .chain(
                        held.revnat6
                            .iter()
                            .map(|(i, r)| (FrontendAddr::from(r), *i)),
                    )
                    .collect();
                let wanted = desired::lb_state(
                    services.iter().map(AsRef::as_ref),
                    &NodeServices {
                        node_name: &node_name,
                        node_addresses: &addresses,
                        default_algorithm,
                        maglev_table_size: lb_config.maglev_table_size,
                        hash_seed: lb_config.hash_seed,
                        maglev,
                        held_backends: &held_backends,
                        held_frontends: &held_frontends,
                    },
                );
                dp.lb.set_config(&lb_config)?;
                let mut report = dp.lb.converge(&wanted.state, true)?;
                let (cookies, errors) = cookies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .resolve(&netns);
                let netns_report = dp.lb.converge_netns(&cookies, true)?;
                report.added += netns_report.added;
                report.deleted += netns_report.deleted;
                report.updated += netns_report.updated;
                report.unchanged += netns_report.unchanged;
                report.failed.extend(netns_report.failed);
                Ok::<_, DataplaneError>(Converged {
                    report,
                    desired: wanted,
                    netns_errors: errors
                        .into_iter()
                        // A pod deleted since its allocation was read: not an error.
                        .filter(|(_, e)| e.kind() != std::io::ErrorKind::NotFound)
                        .map(|(path, e)| format!("{}: {e}", path.display()))
                        .collect(),
                })
            })
            .await?
            .map_err(|e| StepFailure::new("MapReadFailed", e))?;
        node.metrics.observe_converge("lb", &converged.report);
        for error in &converged.netns_errors {
            tracing::warn!(%error, "reading a pod's netns cookie (its sockets are not translated)");
        }
        self.ensure_socket_lb(node).await;

        let desired = &converged.desired;
        let m = &node.metrics;
        m.services_programmed
            .set(i64::try_from(desired.services).unwrap_or(i64::MAX));
        m.services_frontends
            .set(i64::try_from(desired.frontends).unwrap_or(i64::MAX));
        m.services_backends.set(
            i64::try_from(desired.state.backends.len() + desired.state.backends6.len())
                .unwrap_or(i64::MAX),
        );
        let mut skipped: BTreeMap<&str, i64> = [
            desired::SkipReason::Sctp,
            desired::SkipReason::Invalid,
            desired::SkipReason::Conflict,
            desired::SkipReason::IdsExhausted,
        ]
        .into_iter()
        .map(|r| (r.as_str(), 0))
        .collect();
        for s in &desired.skipped {
            *skipped.entry(s.reason.as_str()).or_default() += 1;
        }
        for (reason, n) in skipped {
            m.services_skipped
                .get_or_create(&super::metrics::ReasonLabel {
                    reason: reason.into(),
                })
                .set(n);
        }
        if desired.maglev_without_table > 0 {
            tracing::warn!(
                scopes = desired.maglev_without_table,
                table_size = cfg.maglev_table_size,
                "Maglev services select at random: more backends than Maglev table slots \
                 (raise services.maglevTableSize)"
            );
        }
        let converged_ok = converged.report.is_converged();
        if converged_ok {
            self.realized = self.realized.max(desired.revision);
            self.observe_programming_delay(node, &services_of(node));
            self.full_reported = false;
        } else if converged.report.map_full() && !self.full_reported {
            self.full_reported = true;
            self.publish_full_event(node, own.as_deref(), &converged.report)
                .await;
        }
        self.healthy.store(converged_ok, Ordering::Relaxed);
        self.serve_health_checks(node, &services_of(node)).await;
        m.services_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        pass.services = ServicesOutcome {
            realized_revision: self.realized,
            socket_lb: self.socket_lb.clone(),
        };
        pass.maps.push(MapOutcome {
            map: "lb",
            group: MapGroup::Services,
            report: converged.report.map_keys(AnyKey::from),
        });
        Ok(())
    }
}

fn services_of(node: &NodeContext) -> Vec<Arc<LBService>> {
    node.view.lb_services.store().state()
}

impl Services {
    /// Opens, updates and closes the health-check node ports. A port that cannot be opened
    /// is logged and retried on the next pass; it never fails the step (the maps are in).
    async fn serve_health_checks(&mut self, node: &NodeContext, services: &[Arc<LBService>]) {
        let own = node
            .view
            .node_networks
            .store()
            .get(&ObjectRef::new(&node.cfg.node_name));
        let bind = health_check::wildcard(&node_addresses(own.as_deref()));
        // The node gained or lost IPv6: its listeners are opened again on the new wildcard.
        if self
            .health_checks
            .as_ref()
            .is_some_and(|s| s.bind() != bind)
        {
            self.health_checks = None;
        }
        let healthy = self.healthy.clone();
        let servers = self.health_checks.get_or_insert_with(|| {
            HealthCheckServers::new(
                bind,
                node.cfg.node_netns.clone(),
                Arc::new(move || healthy.load(Ordering::Relaxed)),
                CancellationToken::new(),
            )
        });
        let desired = health_check::desired_health_checks(
            services.iter().map(AsRef::as_ref),
            &node.cfg.node_name,
        );
        for error in servers.converge(&desired).await {
            tracing::warn!(%error, "health-check node port not served");
        }
    }

    /// Attaches the socket-LB hooks once per process (they stay pinned; a restarted agent
    /// swaps its programs in without a gap). A failure is reported, not retried every pass.
    async fn ensure_socket_lb(&mut self, node: &NodeContext) {
        if self.socket_lb.is_some() {
            return;
        }
        let cfg = &node.cfg.services.socket_lb;
        if !cfg.enabled {
            let dir = node.cfg.pin_dir.clone();
            let _ = tokio::task::spawn_blocking(move || crate::bpf::detach_socket_lb(&dir)).await;
            self.socket_lb = Some(SocketLb::Disabled);
            node.metrics.socket_lb_enabled.set(0);
            return;
        }
        let (configured, attacher) = (cfg.cgroup_path.clone(), node.attacher.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let cgroup = kernel::socket_lb_cgroup(&configured).map_err(|e| e.to_string())?;
            let mut attacher = attacher.lock().unwrap_or_else(|p| p.into_inner());
            attacher
                .programs
                .attach_socket_lb(&cgroup)
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(cgroup)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        self.socket_lb = Some(match outcome {
            Ok(cgroup) => {
                tracing::info!(cgroup = %cgroup.display(), "socket LB attached");
                node.metrics.socket_lb_enabled.set(1);
                SocketLb::Attached(cgroup)
            }
            Err(error) => {
                tracing::error!(%error, "socket LB not attached: service connections of this node's processes are not translated at connect");
                node.metrics.socket_lb_enabled.set(0);
                SocketLb::Failed(error)
            }
        });
    }

    /// `tendril_services_network_programming_duration_seconds`, once per (LBService,
    /// revision) realized by this process after it started (a revision realized before,
    /// at or below what the node reported at start, has an unknown delay).
    fn observe_programming_delay(&mut self, node: &NodeContext, services: &[Arc<LBService>]) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut current = BTreeSet::new();
        for svc in services {
            let key = (
                format!(
                    "{}/{}",
                    svc.metadata.namespace.as_deref().unwrap_or_default(),
                    svc.metadata.name.as_deref().unwrap_or_default()
                ),
                svc.spec.revision,
            );
            current.insert(key.clone());
            let realized_before = self
                .reported_at_start
                .flatten()
                .is_some_and(|r| svc.spec.revision <= r);
            if self.observed.insert(key)
                && !realized_before
                && let Some(delay) = programming_delay(svc, now)
            {
                node.metrics.services_programming_seconds.observe(delay);
            }
        }
        self.observed.retain(|k| current.contains(k));
    }

    async fn publish_full_event(
        &mut self,
        node: &NodeContext,
        own: Option<&NodeNetwork>,
        report: &Report<LbItem>,
    ) {
        let maps: BTreeSet<String> = report
            .failed
            .iter()
            .filter_map(|f| match &f.error {
                crate::bpf::MapWriteError::Full { map, max_entries } => {
                    Some(format!("{map} ({max_entries} entries)"))
                }
                _ => None,
            })
            .collect();
        let note = format!(
            "services map full: {}; {} entries not programmed (raise bpfMapSizes)",
            maps.into_iter().collect::<Vec<_>>().join(", "),
            report.failed.len()
        );
        tracing::error!(%note, "services not realized");
        let Some(own) = own else { return };
        let recorder = self.recorder.get_or_insert_with(|| {
            Recorder::new(
                node.client.clone(),
                Reporter {
                    controller: "tendril-agent".into(),
                    instance: Some(node.cfg.node_name.clone()),
                },
            )
        });
        let event = Event {
            type_: EventType::Warning,
            reason: "MapFull".into(),
            note: Some(note),
            action: "ProgramServices".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &own.object_ref(&())).await {
            tracing::warn!(error = %e, "publishing the MapFull Event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::common::NodeAddress;
    use tendril_crds::v1alpha1::{LBServiceSpec, NodeNetworkSpec};

    #[test]
    fn programming_delay_runs_from_the_annotation() {
        let mut svc = LBService::new("web", LBServiceSpec::default());
        let now: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:05.750000Z".parse().unwrap();
        assert_eq!(programming_delay(&svc, now), None);
        svc.metadata.annotations = Some(
            [(
                SERVICE_CHANGED_AT.to_string(),
                "2026-01-02T03:04:05.250000Z".to_string(),
            )]
            .into(),
        );
        assert_eq!(programming_delay(&svc, now), Some(0.5));
        let earlier: k8s_openapi::jiff::Timestamp = "2026-01-02T03:04:00Z".parse().unwrap();
        assert_eq!(programming_delay(&svc, earlier), Some(0.0));
    }

    #[test]
    fn node_addresses_are_every_ip_of_the_node_network() {
        let mut nn = NodeNetwork::new("n1", NodeNetworkSpec::default());
        for (type_, address) in [
            ("InternalIP", "10.250.0.10"),
            ("ExternalIP", "192.0.2.10"),
            ("InternalIP", "fd00::10"),
            ("Hostname", "n1"),
        ] {
            nn.spec.addresses.push(NodeAddress {
                type_: type_.into(),
                address: address.into(),
            });
        }
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            node_addresses(Some(&nn)),
            [ip("10.250.0.10"), ip("192.0.2.10"), ip("fd00::10")]
        );
        assert!(node_addresses(None).is_empty());
    }
}
