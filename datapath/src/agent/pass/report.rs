//! What a pass achieved, written where users and tests read it: `NodeNetwork.status`
//! (`realizedRevision`, condition `Realized`) and each local `Endpoint.status`
//! (`realizedRevision`, `realizedPolicyRevision`, `Realized`), by server-side apply under
//! [`FIELD_MANAGER`]. The `Realized` condition is a pure function of the pass
//! ([`realized_condition`]).

use super::index::EndpointRef;
use super::{FIELD_MANAGER, MapGroup, NodeContext, Pass, StepFailure};
use crate::bpf::AnyKey;
use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tendril_crds::v1alpha1::{Endpoint, NodeNetwork};
use tendril_runtime::conditions::{self, DesiredCondition, REALIZED};
use tendril_runtime::{apply_body, apply_status};

/// The node's `Realized` condition for a pass that ran every step (`failure: None`) or
/// stopped at a step that could not run. Checked in order: a step that failed, a full map,
/// failed writes to the forwarding maps, to the policy maps, `node_config`, netlink errors,
/// attach errors, no `NodeNetwork`.
pub fn realized_condition(pass: &Pass, failure: Option<&StepFailure>) -> DesiredCondition {
    let condition = |status, reason: &str, message: String| {
        DesiredCondition::new(REALIZED, status, reason, message)
    };
    if let Some(f) = failure {
        return condition(false, f.reason, f.message.clone());
    }
    let failed = |group: MapGroup| {
        pass.maps
            .iter()
            .filter(move |m| m.group == group)
            .flat_map(|m| &m.report.failed)
    };
    if pass.maps.iter().any(|m| m.report.map_full()) {
        return condition(
            false,
            "MapFull",
            "a BPF map is full (see tendril_bpf_map_pressure)".to_string(),
        );
    }
    let forwarding: BTreeSet<&AnyKey> = failed(MapGroup::Forwarding).map(|f| &f.key).collect();
    if !forwarding.is_empty() {
        return condition(
            false,
            "MapWriteFailed",
            format!("{} map writes failed", forwarding.len()),
        );
    }
    let policy = failed(MapGroup::Policy).count();
    if policy > 0 {
        return condition(
            false,
            "MapWriteFailed",
            format!("{policy} policy map writes failed"),
        );
    }
    let services = failed(MapGroup::Services).count();
    if services > 0 {
        return condition(
            false,
            "MapWriteFailed",
            format!("{services} services map writes failed"),
        );
    }
    if let Some(e) = &pass.node_config_error {
        return condition(false, "MapWriteFailed", e.clone());
    }
    if !pass.netlink.errors.is_empty() {
        return condition(false, "NetlinkFailed", pass.netlink.errors.join("; "));
    }
    if !pass.attached.errors.is_empty() {
        return condition(false, "AttachFailed", pass.attached.errors.join("; "));
    }
    match pass.desired.generation {
        None => condition(
            false,
            "NoNodeNetwork",
            "the node's NodeNetwork does not exist".into(),
        ),
        // Counts stay out of the condition: it is rewritten only when it changes.
        Some(generation) => condition(
            true,
            "Realized",
            format!("the kernel realizes generation {generation}"),
        ),
    }
}

/// Logs every failed map write of the pass (errors when a map is full).
fn log_map_failures(pass: &Pass) {
    let full = pass.maps.iter().any(|m| m.report.map_full());
    for m in &pass.maps {
        for f in &m.report.failed {
            if full {
                tracing::error!(map = m.map, key = %f.key, op = %f.op, error = %f.error, "BPF map write failed");
            } else {
                tracing::warn!(map = m.map, key = %f.key, op = %f.op, error = %f.error, "BPF map write failed");
            }
        }
    }
}

/// What a pass reported for the node, to skip unchanged writes.
#[derive(Clone, Debug, PartialEq)]
struct NodeReport {
    uid: Option<String>,
    realized_revision: Option<i64>,
    realized_services_revision: Option<i64>,
    condition: DesiredCondition,
    socket_lb: Option<DesiredCondition>,
}

/// The node's `SocketLB` condition: whether service connections of the node's and its pods'
/// processes are translated at connect.
pub const SOCKET_LB: &str = "SocketLB";

pub fn socket_lb_condition(state: &super::services::SocketLb) -> DesiredCondition {
    use super::services::SocketLb;
    match state {
        SocketLb::Attached(cgroup) => DesiredCondition::new(
            SOCKET_LB,
            true,
            "Attached",
            format!(
                "connect, sendmsg, recvmsg and getpeername (IPv4 and IPv6) attached to cgroup {}",
                cgroup.display()
            ),
        ),
        SocketLb::Disabled => DesiredCondition::new(
            SOCKET_LB,
            false,
            "Disabled",
            "services.socketLB.enabled is false",
        ),
        SocketLb::Failed(error) => DesiredCondition::new(SOCKET_LB, false, "AttachFailed", error),
    }
}

/// The node's `IPv6Policy` condition: whether this node's datapath judges IPv6 by policy.
pub const IPV6_POLICY: &str = "IPv6Policy";

/// True when `policy.ipv6` is on (bpf/lib/ipv6.h judges IPv6 as IPv4); otherwise the
/// programs fail closed, IPv6 to and from endpoints with policy is dropped, and this
/// condition says so, so nobody mistakes a node that drops IPv6 for one that polices it.
pub fn ipv6_policy_condition(enforced: bool) -> DesiredCondition {
    if enforced {
        return DesiredCondition::new(
            IPV6_POLICY,
            true,
            "Enforced",
            "IPv6 is judged by the same policy as IPv4 (identities, IPv6 CIDRs, conntrack); \
             neighbour discovery and the ICMPv6 errors of RFC 4890 always pass",
        );
    }
    DesiredCondition::new(
        IPV6_POLICY,
        false,
        "FailClosed",
        "policy.ipv6 is false: IPv6 to and from endpoints selected by a policy is dropped \
         (drop reason ipv6_policy_not_enforced); neighbour discovery passes, endpoints \
         without policy keep their IPv6",
    )
}

/// The node status writer, with what it remembers between passes.
#[derive(Debug, Default)]
pub struct Reporter {
    last_report: Option<NodeReport>,
    /// The last generation realized (so a failing pass keeps reporting it).
    last_realized: Option<i64>,
    /// The highest LBService revision realized (monotonic; kept by failing passes).
    last_services: Option<i64>,
    last_socket_lb: Option<DesiredCondition>,
    announced: bool,
    /// When the status was last written, and until when a report that only moves
    /// `realizedServicesRevision` waits (`services.reportIntervalMillis`).
    last_write: Option<tokio::time::Instant>,
    deferred: Option<tokio::time::Instant>,
}

/// Whether `report` may wait until `interval` after the last write: it only moves the
/// services revision (every other field says what was written), and the last write was
/// less than `interval` ago. Returns when it is due.
fn services_report_deferred(
    last: Option<&NodeReport>,
    report: &NodeReport,
    last_write: Option<tokio::time::Instant>,
    interval: Duration,
    now: tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let last = last?;
    let only_services = NodeReport {
        realized_services_revision: last.realized_services_revision,
        ..report.clone()
    } == *last;
    let due = last_write? + interval;
    (only_services && due > now).then_some(due)
}

impl Reporter {
    /// When a pass must run to write a deferred services revision.
    pub fn deferred_until(&self) -> Option<tokio::time::Instant> {
        self.deferred
    }

    /// Writes `NodeNetwork.status.realizedRevision` and `Realized` when they change;
    /// returns whether the node realizes its desired state.
    pub async fn node_status(
        &mut self,
        node: &NodeContext,
        own: Option<&NodeNetwork>,
        pass: &Pass,
        failure: Option<StepFailure>,
    ) -> bool {
        if self.last_realized.is_none() {
            self.last_realized = own
                .and_then(|nn| nn.status.as_ref())
                .and_then(|s| s.realized_revision);
        }
        // Always written once known: under server-side apply a field this manager stops
        // sending would be removed.
        let reported_services = own
            .and_then(|nn| nn.status.as_ref())
            .and_then(|s| s.realized_services_revision);
        self.last_services = self
            .last_services
            .max(reported_services)
            .max(pass.services.realized_revision);
        if let Some(state) = &pass.services.socket_lb {
            self.last_socket_lb = Some(socket_lb_condition(state));
        }
        let condition = realized_condition(pass, failure.as_ref());
        let realized = condition.status;
        if failure.is_none() {
            log_map_failures(pass);
            tracing::debug!(
                ipcache = pass.desired.ipcache.len(),
                routes = pass.desired.routes.len(),
                local = pass.desired.local.len(),
                pending = pass.desired.pending.len(),
                realized,
                "pass done"
            );
        }
        if realized {
            self.last_realized = pass.desired.generation;
            if !self.announced {
                // Once per process: tests and operators wait for this after a restart.
                tracing::info!(generation = ?pass.desired.generation, "datapath realized");
                self.announced = true;
            }
        }
        let Some(own) = own else { return realized };
        let lagging = !realized || self.last_realized != own.metadata.generation;
        node.metrics
            .set_unrealized("NodeNetwork", usize::from(lagging));
        let report = NodeReport {
            uid: own.metadata.uid.clone(),
            realized_revision: self.last_realized,
            realized_services_revision: self.last_services,
            condition,
            socket_lb: self.last_socket_lb.clone(),
        };
        if self.last_report.as_ref() == Some(&report) {
            self.deferred = None;
            return realized;
        }
        let now = tokio::time::Instant::now();
        self.deferred = services_report_deferred(
            self.last_report.as_ref(),
            &report,
            self.last_write,
            Duration::from_millis(node.cfg.services.report_interval_millis),
            now,
        );
        if self.deferred.is_some() {
            return realized;
        }
        let previous = own
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let merged = conditions::merge(
            conditions::find(&previous, REALIZED),
            &report.condition,
            own.metadata.generation,
            k8s_openapi::jiff::Timestamp::now(),
        );
        let mut conditions = vec![merged];
        if let Some(socket_lb) = &report.socket_lb {
            conditions.push(conditions::merge(
                conditions::find(&previous, SOCKET_LB),
                socket_lb,
                own.metadata.generation,
                k8s_openapi::jiff::Timestamp::now(),
            ));
        }
        conditions.push(conditions::merge(
            conditions::find(&previous, IPV6_POLICY),
            &ipv6_policy_condition(node.cfg.policy.ipv6),
            own.metadata.generation,
            k8s_openapi::jiff::Timestamp::now(),
        ));
        let mut status = json!({ "conditions": conditions });
        if let Some(revision) = report.realized_revision {
            status["realizedRevision"] = json!(revision);
        }
        if let Some(revision) = report.realized_services_revision {
            status["realizedServicesRevision"] = json!(revision);
        }
        let body =
            apply_body::<NodeNetwork>(&node.cfg.node_name, None, json!({ "status": status }));
        let api: Api<NodeNetwork> = Api::all(node.client.clone());
        match apply_status(&api, FIELD_MANAGER, &body).await {
            Ok(_) => {
                tracing::info!(realized, reason = %report.condition.reason, revision = ?report.realized_revision, services_revision = ?report.realized_services_revision, "NodeNetwork status");
                self.last_report = Some(report);
                self.last_write = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "writing NodeNetwork status"),
        }
        realized
    }
}

/// A local endpoint's state after a pass, for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointState {
    pub key: EndpointRef,
    pub revision: i64,
    /// The `ResolvedPolicy` revision now in the maps for it.
    pub policy_revision: Option<i64>,
    /// Addresses in the map and programs on its veth.
    pub wired: bool,
    /// A map write for it failed.
    pub failed: bool,
}

/// Every local endpoint's state after a complete pass.
pub fn endpoint_states(pass: &Pass) -> Vec<EndpointState> {
    let failed_ips: BTreeSet<IpAddr> = pass
        .maps
        .iter()
        .filter(|m| m.group == MapGroup::Forwarding)
        .flat_map(|m| &m.report.failed)
        .filter_map(|f| match f.key {
            AnyKey::Endpoint(key) => key.ip(),
            _ => None,
        })
        .collect();
    pass.desired
        .local
        .iter()
        .map(|ep| EndpointState {
            key: ep.key.clone(),
            revision: ep.revision,
            policy_revision: pass.policy_realized.get(&ep.key).copied(),
            wired: ep.ips.iter().all(|ip| {
                pass.netlink
                    .wiring
                    .get(ip)
                    .is_some_and(|w| pass.attached.attached.contains(&w.ifindex))
            }),
            failed: ep.ips.iter().any(|ip| failed_ips.contains(ip)),
        })
        .collect()
}

/// Writes `Endpoint.status` of local endpoints whose realized state differs from what
/// the object says: realized → `realizedRevision` + `Realized=True`; a failed map
/// write → `Realized=False` (the last realized revision is kept). Pending endpoints
/// (veth not there yet) are not written.
///
/// What writing them needs, owned: the writes of a pass can run while the
/// next pass converges the maps ([`super::NodePass`] starts them in a task of their own,
/// each after the previous pass's, so an endpoint's reports never overtake each other).
#[derive(Clone)]
pub struct EndpointStatusWriter {
    client: kube::Client,
    store: kube::runtime::reflector::Store<Endpoint>,
    metrics: super::metrics::DatapathMetrics,
    node_name: String,
    written: WrittenStatuses,
}

/// Per endpoint, what this agent last wrote into its status and the `resourceVersion` the
/// object had just before: while the store still shows that version the write's echo has
/// not arrived, and the object holds what was written (the next pass does not write it
/// again).
pub type WrittenStatuses = Arc<Mutex<BTreeMap<EndpointRef, (Option<String>, WrittenStatus)>>>;

/// The fields of one status write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenStatus {
    realized_revision: Option<i64>,
    realized_policy_revision: Option<i64>,
    realized: bool,
    reason: String,
    generation: Option<i64>,
}

impl EndpointStatusWriter {
    pub fn of(node: &NodeContext, written: &WrittenStatuses) -> Self {
        Self {
            client: node.client.clone(),
            store: node.view.endpoints.store(),
            metrics: node.metrics.clone(),
            node_name: node.cfg.node_name.clone(),
            written: written.clone(),
        }
    }

    pub async fn write(&self, states: &[EndpointState]) {
        let node = self;
        let unrealized = states.iter().filter(|s| s.failed || !s.wired).count();
        node.metrics.set_unrealized("Endpoint", unrealized);
        let store = &node.store;
        {
            // Bounded by the local endpoints.
            let local: BTreeSet<&EndpointRef> = states.iter().map(|s| &s.key).collect();
            let mut written = node.written.lock().unwrap_or_else(|p| p.into_inner());
            written.retain(|key, _| local.contains(key));
        }
        let mut writes = Vec::new();
        for state in states {
            let key = &state.key;
            let Some(current) = store.get(&ObjectRef::new(&key.name).within(&key.namespace)) else {
                continue;
            };
            let status = current.status.clone().unwrap_or_default();
            let previous = conditions::find(&status.conditions, REALIZED);
            let desired = if state.failed {
                DesiredCondition::new(REALIZED, false, "MapWriteFailed", "a BPF map write failed")
            } else if state.wired {
                DesiredCondition::new(
                    REALIZED,
                    true,
                    "Realized",
                    format!(
                        "revision {} is in the datapath of {}",
                        state.revision, node.node_name
                    ),
                )
            } else {
                continue;
            };
            let realized_revision = if desired.status {
                Some(state.revision)
            } else {
                status.realized_revision
            };
            // Written only when the policy's entries are in; otherwise the last one stays.
            let realized_policy_revision = state
                .policy_revision
                .filter(|_| desired.status)
                .or(status.realized_policy_revision);
            let up_to_date = status.realized_revision == realized_revision
                && status.realized_policy_revision == realized_policy_revision
                && previous.is_some_and(|c| {
                    c.status
                        == if desired.status {
                            conditions::TRUE
                        } else {
                            conditions::FALSE
                        }
                        && c.reason == desired.reason
                        && c.observed_generation == current.metadata.generation
                });
            let wanted = WrittenStatus {
                realized_revision,
                realized_policy_revision,
                realized: desired.status,
                reason: desired.reason.to_string(),
                generation: current.metadata.generation,
            };
            let before = current.metadata.resource_version.clone();
            let echo_pending = node
                .written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(key)
                .is_some_and(|(rv, w)| *rv == before && *w == wanted);
            if up_to_date || echo_pending {
                continue;
            }
            let condition = conditions::merge(
                previous,
                &desired,
                current.metadata.generation,
                k8s_openapi::jiff::Timestamp::now(),
            );
            let mut fields = json!({ "conditions": [condition] });
            if let Some(revision) = realized_revision {
                fields["realizedRevision"] = json!(revision);
            }
            if let Some(revision) = realized_policy_revision {
                fields["realizedPolicyRevision"] = json!(revision);
            }
            let body = apply_body::<Endpoint>(
                &key.name,
                Some(&key.namespace),
                json!({ "status": fields }),
            );
            let api: Api<Endpoint> = Api::namespaced(node.client.clone(), &key.namespace);
            let written = node.written.clone();
            writes.push(async move {
                let res = apply_status(&api, FIELD_MANAGER, &body).await;
                let mut written = written.lock().unwrap_or_else(|p| p.into_inner());
                match res {
                    Ok(_) => {
                        written.insert(key.clone(), (before, wanted));
                        tracing::debug!(endpoint = %key, revision = state.revision, "Endpoint realized")
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        written.remove(key);
                    }
                    Err(e) => {
                        written.remove(key);
                        tracing::warn!(endpoint = %key, error = %e, "writing Endpoint status")
                    }
                }
            });
        }
        // One object each: no order among them, and a policy change reports several at once.
        futures::stream::iter(writes)
            .buffer_unordered(STATUS_WRITES_IN_FLIGHT)
            .collect::<()>()
            .await;
    }
}

/// Endpoint status writes in flight at once.
const STATUS_WRITES_IN_FLIGHT: usize = 8;

/// Map fill and the programs' per-reason counters into metrics.
pub async fn observe_maps(node: &NodeContext) {
    let metrics = node.metrics.clone();
    let _ = node
        .with_dataplane(move |dp| {
            match dp.pressure() {
                Ok(p) => {
                    metrics.observe_pressure(&p);
                    metrics.egress.observe_pressure(&p);
                }
                Err(e) => tracing::warn!(error = %e, "reading map pressure"),
            }
            match dp.metrics.samples() {
                Ok(samples) => metrics.observe_samples(&samples),
                Err(e) => tracing::warn!(error = %e, "reading the metrics map"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::pass::MapOutcome;
    use crate::bpf::maps::{EndpointKey, PolicyItem};
    use crate::bpf::{Failure, MapWriteError, Op, Report};

    fn failure(key: AnyKey, full: bool) -> Failure<AnyKey> {
        Failure {
            key,
            op: Op::Add,
            error: if full {
                MapWriteError::Full {
                    map: "ipcache",
                    max_entries: 1,
                }
            } else {
                MapWriteError::Kernel {
                    map: "ipcache",
                    op: Op::Add,
                    source: aya::maps::MapError::KeyNotFound,
                }
            },
        }
    }

    #[test]
    fn a_services_revision_alone_waits_for_the_report_interval() {
        let report = |services, reason: &str| NodeReport {
            uid: Some("u".into()),
            realized_revision: Some(3),
            realized_services_revision: Some(services),
            condition: DesiredCondition::new(REALIZED, true, reason, "m"),
            socket_lb: None,
        };
        let t0 = tokio::time::Instant::now();
        let interval = Duration::from_secs(2);
        let last = report(10, "Realized");
        let at = |ms| t0 + Duration::from_millis(ms);
        // A newer services revision 500 ms after the last write: due 2 s after it.
        assert_eq!(
            services_report_deferred(
                Some(&last),
                &report(11, "Realized"),
                Some(t0),
                interval,
                at(500)
            ),
            Some(at(2000))
        );
        // Once the interval has passed: written at once.
        assert_eq!(
            services_report_deferred(
                Some(&last),
                &report(12, "Realized"),
                Some(t0),
                interval,
                at(2000)
            ),
            None
        );
        // Anything else changed: written at once, with the services revision it has.
        assert_eq!(
            services_report_deferred(
                Some(&last),
                &report(11, "MapFull"),
                Some(t0),
                interval,
                at(500)
            ),
            None
        );
        // Nothing written yet: at once.
        assert_eq!(
            services_report_deferred(None, &report(11, "Realized"), None, interval, at(500)),
            None
        );
    }

    fn with_map(pass: &mut Pass, group: MapGroup, failed: Vec<Failure<AnyKey>>) {
        pass.maps.push(MapOutcome {
            map: "m",
            group,
            report: Report {
                failed,
                ..Report::default()
            },
        });
    }

    fn reason(pass: &Pass, failure: Option<&StepFailure>) -> (bool, String) {
        let c = realized_condition(pass, failure);
        (c.status, c.reason.to_string())
    }

    #[test]
    fn realized_needs_a_node_network_and_no_problem() {
        let mut pass = Pass::default();
        assert_eq!(reason(&pass, None), (false, "NoNodeNetwork".into()));
        pass.desired.generation = Some(3);
        let c = realized_condition(&pass, None);
        assert!(c.status);
        assert_eq!(c.message, "the kernel realizes generation 3");
    }

    #[test]
    fn problems_are_reported_in_order_of_precedence() {
        let mut pass = Pass::default();
        pass.desired.generation = Some(1);
        pass.attached.errors.push("attach".into());
        assert_eq!(reason(&pass, None), (false, "AttachFailed".into()));
        pass.netlink.errors.push("route".into());
        assert_eq!(reason(&pass, None), (false, "NetlinkFailed".into()));
        pass.node_config_error = Some("node_config".into());
        assert_eq!(reason(&pass, None), (false, "MapWriteFailed".into()));
        let policy_state = |id| AnyKey::Policy(PolicyItem::State(id));
        with_map(
            &mut pass,
            MapGroup::Policy,
            vec![failure(policy_state(1), false)],
        );
        let c = realized_condition(&pass, None);
        assert_eq!(c.message, "1 policy map writes failed");
        let pod = AnyKey::Endpoint(EndpointKey::new("10.0.0.1".parse().unwrap()));
        with_map(
            &mut pass,
            MapGroup::Forwarding,
            vec![failure(pod, false), failure(pod, false)],
        );
        let c = realized_condition(&pass, None);
        assert_eq!(c.message, "1 map writes failed", "distinct keys");
        with_map(
            &mut pass,
            MapGroup::Policy,
            vec![failure(policy_state(2), true)],
        );
        assert_eq!(reason(&pass, None), (false, "MapFull".into()));
        let step = StepFailure::new("NetlinkFailed", "no netns");
        let c = realized_condition(&pass, Some(&step));
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("NetlinkFailed", "no netns")
        );
    }
}
