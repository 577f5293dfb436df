//! The BGP concern's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tendril_runtime as runtime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct SourceLabel {
    pub(super) source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ErrorLabel {
    pub(super) error: String,
}

pub(super) struct Metrics {
    pub(super) node_configs: Gauge,
    pub(super) held_nodes: Gauge,
    pub(super) invalid_policies: Gauge,
    pub(super) advertisements: Family<SourceLabel, Gauge>,
    pub(super) writes: Counter,
    pub(super) deletes: Counter,
    pub(super) reconcile_errors: Family<ErrorLabel, Counter>,
    pub(super) compute_seconds: Histogram,
}

impl Metrics {
    pub(super) fn new(m: &runtime::Metrics) -> Self {
        Self {
            node_configs: m.domain(
                "tendril_bgp_node_configs",
                "BGPNodeConfigs the BGP concern wants (nodes selected by a policy)",
                Gauge::default,
            ),
            held_nodes: m.domain(
                "tendril_bgp_held_nodes",
                "Nodes whose BGPNodeConfig is left as it was (conflicting or invalid policies, no router id)",
                Gauge::default,
            ),
            invalid_policies: m.domain(
                "tendril_bgp_invalid_policies",
                "BGPPeeringPolicies with Valid=False",
                Gauge::default,
            ),
            advertisements: m.domain(
                "tendril_bgp_advertisements",
                "Prefixes advertised over all nodes and routers, by source",
                Family::<SourceLabel, Gauge>::default,
            ),
            writes: m.domain(
                "tendril_bgp_node_config_writes",
                "BGPNodeConfig specs written (each with a new revision)",
                Counter::default,
            ),
            deletes: m.domain(
                "tendril_bgp_node_config_deletes",
                "BGPNodeConfigs deleted (node no longer selected or gone)",
                Counter::default,
            ),
            reconcile_errors: m.domain(
                "tendril_bgp_reconcile_errors",
                "Failed BGP reconciles (retried with backoff), by kind of error",
                Family::<ErrorLabel, Counter>::default,
            ),
            compute_seconds: m.domain(
                "tendril_bgp_compute_seconds",
                "Time to compute every node's BGP configuration",
                || Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            ),
        }
    }
}
