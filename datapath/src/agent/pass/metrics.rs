//! The datapath's metrics, registered in the harness's registry.

use crate::bpf::{MapPressure, MetricSample, Report};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tendril_runtime::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapOpLabels {
    pub map: String,
    pub operation: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    pub direction: String,
    pub verdict: String,
    /// Label `match`.
    pub r#match: String,
}

/// (raw reason, raw direction) of a sample.
type SampleKey = (u8, Option<u8>);

#[derive(Clone, Debug)]
pub struct DatapathMetrics {
    /// `tendril_bpf_map_operations_total{map,operation,outcome}`.
    pub map_operations: Family<MapOpLabels, Counter>,
    /// `tendril_bpf_map_pressure{map}`: entries / capacity.
    pub map_pressure: Family<MapLabel, Gauge<f64, AtomicU64>>,
    /// `tendril_datapath_realize_seconds`: a change seen by a watch → the kernel converged.
    pub realize_seconds: Histogram,
    /// `tendril_datapath_packets_total{reason,direction}` / `…_drops_total`, from the
    /// programs' per-reason `metrics` map.
    pub packets: Family<ReasonLabels, Counter>,
    pub drops: Family<ReasonLabels, Counter>,
    /// `tendril_agent_unrealized_revisions{kind}`: local objects (`Endpoint`, `NodeNetwork`,
    /// `ResolvedPolicy` of a local endpoint) whose current revision the node's datapath does
    /// not realize yet.
    pub unrealized: Family<KindLabel, Gauge>,
    /// `tendril_policy_verdicts_total{direction,verdict,match}`: policy verdicts of new
    /// connections, from the datapath's events.
    pub policy_verdicts: Family<VerdictLabels, Counter>,
    /// `tendril_policy_implementation_delay_seconds`: a `ResolvedPolicy` revision written
    /// (its `tendril.dev/policy-changed-at`) → realized on this node; once per (identity,
    /// revision).
    pub policy_implementation_delay: Histogram,
    /// `tendril_policy_endpoints`: local endpoints whose policy is in the maps.
    pub policy_endpoints: Gauge,
    /// `tendril_conntrack_gc_removed_total`: expired conntrack entries removed.
    pub conntrack_gc_removed: Counter,
    /// `tendril_services_programmed`: LBServices with a frontend in the maps.
    pub services_programmed: Gauge,
    /// `tendril_services_frontends_programmed`: frontends (address, port, protocol) in the maps.
    pub services_frontends: Gauge,
    /// `tendril_services_backends_programmed`: distinct backends in the maps.
    pub services_backends: Gauge,
    /// `tendril_services_sync_duration_seconds`: one services step (desired state + maps).
    pub services_sync_seconds: Histogram,
    /// `tendril_services_network_programming_duration_seconds`: an LBService change (its
    /// `tendril.dev/service-changed-at`) → realized on this node, as kube-proxy defines it.
    pub services_programming_seconds: Histogram,
    /// `tendril_services_skipped{reason}`: frontends/backends the node cannot program now.
    pub services_skipped: Family<ReasonLabel, Gauge>,
    /// `tendril_services_socket_lb_enabled`: 1 when the socket-LB hooks are attached.
    pub socket_lb_enabled: Gauge,
    /// The egress step's (`tendril_egress_*`).
    pub egress: super::egress::EgressMetrics,
    /// Last absolute value read per (raw reason, raw direction): the map counts since it
    /// was created (it survives restarts), the counters grow by the difference.
    seen: Arc<Mutex<HashMap<SampleKey, u64>>>,
}

impl DatapathMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        Self {
            map_operations: metrics.domain(
                "tendril_bpf_map_operations",
                "BPF map writes by map, operation (add, update, delete) and outcome (success, full, error)",
                Family::default,
            ),
            map_pressure: metrics.domain(
                "tendril_bpf_map_pressure",
                "Fill ratio of each BPF map (entries / max entries)",
                Family::default,
            ),
            realize_seconds: metrics.domain(
                "tendril_datapath_realize_seconds",
                "Time from a change of the watched desired state to the kernel converged",
                || Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ),
            packets: metrics.domain(
                "tendril_datapath_packets",
                "Packets the eBPF programs forwarded or passed on, by reason and direction",
                Family::default,
            ),
            drops: metrics.domain(
                "tendril_datapath_drops",
                "Packets the eBPF programs dropped, by reason and direction",
                Family::default,
            ),
            unrealized: metrics.domain(
                "tendril_agent_unrealized_revisions",
                "Local objects (by kind) whose current revision the datapath does not realize yet",
                Family::default,
            ),
            policy_verdicts: metrics.domain(
                "tendril_policy_verdicts",
                "Policy verdicts of new connections by direction, verdict (allow, deny, audit) and match (none, l3, l4, default, conntrack)",
                Family::default,
            ),
            policy_implementation_delay: metrics.domain(
                "tendril_policy_implementation_delay_seconds",
                "Time from a policy change seen by the operator to the resulting ResolvedPolicy revision realized on this node",
                || Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            ),
            policy_endpoints: metrics.domain(
                "tendril_policy_endpoints",
                "Local endpoints whose ResolvedPolicy is in the policy maps",
                Gauge::default,
            ),
            conntrack_gc_removed: metrics.domain(
                "tendril_conntrack_gc_removed",
                "Expired conntrack entries removed by the agent's garbage collection",
                Counter::default,
            ),
            services_programmed: metrics.domain(
                "tendril_services_programmed",
                "LBServices with at least one frontend in the node's services maps",
                Gauge::default,
            ),
            services_frontends: metrics.domain(
                "tendril_services_frontends_programmed",
                "Service frontends (address, port, protocol) in the node's services maps",
                Gauge::default,
            ),
            services_backends: metrics.domain(
                "tendril_services_backends_programmed",
                "Distinct service backends in the node's services maps",
                Gauge::default,
            ),
            services_sync_seconds: metrics.domain(
                "tendril_services_sync_duration_seconds",
                "Duration of one services step: desired state computed and the services maps converged",
                || Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
            services_programming_seconds: metrics.domain(
                "tendril_services_network_programming_duration_seconds",
                "Time from a Service change seen by the operator (tendril.dev/service-changed-at) to the LBService realized on this node",
                || Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            ),
            services_skipped: metrics.domain(
                "tendril_services_skipped",
                "Service frontends, backends or ranges this node does not program, by reason (sctp, ipv6, invalid, conflict, ids_exhausted)",
                Family::default,
            ),
            socket_lb_enabled: metrics.domain(
                "tendril_services_socket_lb_enabled",
                "1 when the socket-level load-balancing hooks are attached on this node, else 0",
                Gauge::default,
            ),
            egress: super::egress::EgressMetrics::register(metrics),
            seen: Arc::default(),
        }
    }

    pub fn observe_verdict(&self, direction: &str, verdict: &str, matched: &str) {
        self.policy_verdicts
            .get_or_create(&VerdictLabels {
                direction: direction.into(),
                verdict: verdict.into(),
                r#match: matched.into(),
            })
            .inc();
    }

    pub fn set_unrealized(&self, kind: &str, count: usize) {
        self.unrealized
            .get_or_create(&KindLabel { kind: kind.into() })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts a convergence of `map` in `tendril_bpf_map_operations_total` and logs it when
    /// it changed anything.
    pub fn observe_converge<K>(&self, map: &str, report: &Report<K>) {
        if report.added + report.updated + report.deleted > 0 {
            tracing::info!(
                map,
                added = report.added,
                updated = report.updated,
                deleted = report.deleted,
                stale_kept = report.stale_kept,
                "map converged"
            );
        }
        let count = |operation: &str, outcome: &str, n: usize| {
            if n > 0 {
                self.map_operations
                    .get_or_create(&MapOpLabels {
                        map: map.into(),
                        operation: operation.into(),
                        outcome: outcome.into(),
                    })
                    .inc_by(n as u64);
            }
        };
        count("add", "success", report.added);
        count("update", "success", report.updated);
        count("delete", "success", report.deleted);
        for failure in &report.failed {
            count(failure.op.as_str(), failure.error.metric_label(), 1);
        }
    }

    pub fn observe_pressure(&self, pressure: &[MapPressure]) {
        for p in pressure {
            self.map_pressure
                .get_or_create(&MapLabel { map: p.map.into() })
                .set(p.ratio());
        }
    }

    pub fn observe_samples(&self, samples: &[MetricSample]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for s in samples {
            let key = (s.raw_reason, s.direction.map(|d| d as u8));
            let last = seen.insert(key, s.packets).unwrap_or(0);
            let delta = s.packets.saturating_sub(last);
            let labels = ReasonLabels {
                reason: s.reason.map_or_else(
                    || format!("unknown_{}", s.raw_reason),
                    |r| r.as_str().into(),
                ),
                direction: s.direction.map_or("unknown", |d| d.as_str()).into(),
            };
            let drop = s.reason.is_none_or(|r| r.is_drop());
            let family = if drop { &self.drops } else { &self.packets };
            family.get_or_create(&labels).inc_by(delta);
        }
    }
}
