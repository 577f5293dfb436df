//! The lbipam concern's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tendril_runtime as runtime;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct PoolLabel {
    pub(super) pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ReasonLabel {
    pub(super) reason: String,
}

pub(super) struct Metrics {
    pub(super) used: Family<PoolLabel, Gauge>,
    pub(super) available: Family<PoolLabel, Gauge>,
    pub(super) allocations: Family<PoolLabel, Counter>,
    pub(super) releases: Counter,
    pub(super) conflicts: Family<ReasonLabel, Counter>,
    pub(super) unsatisfied: Gauge,
    pub(super) status_writes: Counter,
}

impl Metrics {
    pub(super) fn new(m: &runtime::Metrics) -> Self {
        Self {
            used: m.domain(
                "tendril_lbipam_ips_used",
                "LoadBalancer addresses of each pool held by Services",
                Family::default,
            ),
            available: m.domain(
                "tendril_lbipam_ips_available",
                "LoadBalancer addresses of each pool still free (saturating at 2^63-1)",
                Family::default,
            ),
            allocations: m.domain(
                "tendril_lbipam_allocations",
                "LoadBalancer addresses handed to Services, per pool",
                Family::default,
            ),
            releases: m.domain(
                "tendril_lbipam_releases",
                "LoadBalancer addresses taken back (Service gone, changed or out of its pool)",
                Counter::default,
            ),
            conflicts: m.domain(
                "tendril_lbipam_conflicts",
                "Times a Service's request could not be satisfied, by reason (IPAlreadyAllocated, RequestedIPNotInPool, PoolExhausted, NoPool, InvalidRequest)",
                Family::default,
            ),
            unsatisfied: m.domain(
                "tendril_lbipam_services_unsatisfied",
                "LoadBalancer Services waiting for an address they want",
                Gauge::default,
            ),
            status_writes: m.domain(
                "tendril_lbipam_status_writes",
                "Service and pool status writes",
                Counter::default,
            ),
        }
    }
}
