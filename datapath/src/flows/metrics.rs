//! Flow metrics in the style of Hubble's (`hubble_flows_processed_total`,
//! `hubble_drop_total`), under Tendril's prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tendril_runtime::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessedLabels {
    /// `L3_L4` (Hubble's flow type).
    pub r#type: String,
    /// `policy-verdict` or `drop` (the event's kind).
    pub subtype: String,
    /// `FORWARDED`, `DROPPED`, `AUDIT`.
    pub verdict: String,
    /// The endpoints' namespaces with `flows.metrics.namespaceContext`, else empty (an
    /// empty label is no label to Prometheus).
    pub source_namespace: String,
    pub destination_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// Hubble's drop reason name (`POLICY_DENY`, `POLICY_DENIED`, …).
    pub reason: String,
    pub protocol: String,
    /// As in [`ProcessedLabels`].
    pub source_namespace: String,
    pub destination_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LostLabels {
    /// `events_queue`: the enricher's queue was full (the event reader never waits).
    pub source: String,
}

#[derive(Clone, Debug)]
pub struct FlowMetrics {
    /// `tendril_flows_processed_total{type,subtype,verdict}`.
    pub processed: Family<ProcessedLabels, Counter>,
    /// `tendril_flows_drops_total{reason,protocol}`.
    pub drops: Family<DropLabels, Counter>,
    /// `tendril_flows_lost_total{source}`.
    pub lost: Family<LostLabels, Counter>,
    /// `tendril_flows_ring_flows`: flows in the node's ring now.
    pub ring_flows: Gauge,
    /// `tendril_flows_observer_clients`: GetFlows calls being served.
    pub observer_clients: Gauge,
    /// Label flows with their namespaces (`flows.metrics.namespaceContext`): one series per
    /// namespace pair and verdict, so off by default.
    pub namespace_context: bool,
}

impl FlowMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        Self {
            processed: metrics.domain(
                "tendril_flows_processed",
                "Flows enriched into the node's flow ring, by type, subtype (policy-verdict, drop) and verdict",
                Family::default,
            ),
            drops: metrics.domain(
                "tendril_flows_drops",
                "Dropped flows by Hubble drop reason and protocol",
                Family::default,
            ),
            lost: metrics.domain(
                "tendril_flows_lost",
                "Datapath events lost before they became flows, by where they were lost",
                Family::default,
            ),
            ring_flows: metrics.domain(
                "tendril_flows_ring_flows",
                "Flows in the node's flow ring",
                Gauge::default,
            ),
            observer_clients: metrics.domain(
                "tendril_flows_observer_clients",
                "GetFlows calls the node's Observer API is serving",
                Gauge::default,
            ),
            namespace_context: false,
        }
    }

    /// Unregistered metrics (tests, benchmarks).
    pub fn unregistered() -> Self {
        Self {
            processed: Family::default(),
            drops: Family::default(),
            lost: Family::default(),
            ring_flows: Gauge::default(),
            observer_clients: Gauge::default(),
            namespace_context: false,
        }
    }

    /// With (or without) the namespace labels.
    pub fn with_namespace_context(mut self, on: bool) -> Self {
        self.namespace_context = on;
        self
    }
}
