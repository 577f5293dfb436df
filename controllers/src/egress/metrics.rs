//! The egress concern's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tendril_runtime as runtime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: String,
}

pub(super) struct Metrics {
    pub(super) routes: Gauge,
    pub(super) without_gateway: Gauge,
    pub(super) invalid_policies: Gauge,
    pub(super) source_ips: Gauge,
    pub(super) gateway_changes: Family<ReasonLabel, Counter>,
    pub(super) route_writes: Counter,
    pub(super) route_deletes: Counter,
}

impl Metrics {
    pub(super) fn new(m: &runtime::Metrics) -> Self {
        Self {
            routes: m.domain(
                "tendril_egress_routes",
                "EgressRoutes the concern holds (one per valid EgressGatewayPolicy)",
                Gauge::default,
            ),
            without_gateway: m.domain(
                "tendril_egress_policies_without_gateway",
                "Valid EgressGatewayPolicies no eligible node can serve (their traffic is dropped)",
                Gauge::default,
            ),
            invalid_policies: m.domain(
                "tendril_egress_invalid_policies",
                "EgressGatewayPolicies with Valid=False (their route is held as it was)",
                Gauge::default,
            ),
            source_ips: m.domain(
                "tendril_egress_source_ips",
                "Pod addresses steered to a gateway, summed over the routes",
                Gauge::default,
            ),
            gateway_changes: m.domain(
                "tendril_egress_gateway_changes",
                "Gateway changes of policies, by reason (Assigned, NodeNotReady, NodeNotSelected, NodeDeleted, NodeWithoutAddress, NoneEligible)",
                Family::default,
            ),
            route_writes: m.domain(
                "tendril_egress_route_writes",
                "EgressRoute specs written",
                Counter::default,
            ),
            route_deletes: m.domain(
                "tendril_egress_route_deletes",
                "EgressRoutes deleted (their policy is gone)",
                Counter::default,
            ),
        }
    }
}
