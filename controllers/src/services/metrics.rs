//! The services concern's metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tendril_runtime as runtime;

pub(super) struct Metrics {
    pub(super) lbservices: Gauge,
    pub(super) backends: Gauge,
    pub(super) invalid: Gauge,
    pub(super) pending: Gauge,
    pub(super) revision: Gauge,
    pub(super) writes: Counter,
    pub(super) publishes: Counter,
    pub(super) deletes: Counter,
    pub(super) status_writes: Counter,
    pub(super) translate_seconds: Histogram,
}

impl Metrics {
    pub(super) fn new(m: &runtime::Metrics) -> Self {
        Self {
            lbservices: m.domain(
                "tendril_services_lbservices",
                "LBServices the services concern keeps (one per served Service)",
                Gauge::default,
            ),
            backends: m.domain(
                "tendril_services_backends",
                "Backends in all LBServices",
                Gauge::default,
            ),
            invalid: m.domain(
                "tendril_services_invalid",
                "LBServices with Valid=False (served in part)",
                Gauge::default,
            ),
            pending: m.domain(
                "tendril_services_unrealized_lbservices",
                "LBServices whose revision some node does not realize yet (at the last status pass)",
                Gauge::default,
            ),
            revision: m.domain(
                "tendril_services_revision",
                "The last number of the cluster-wide LBService revision sequence",
                Gauge::default,
            ),
            writes: m.domain(
                "tendril_services_writes",
                "LBService specs written (each with a new revision)",
                Counter::default,
            ),
            publishes: m.domain(
                "tendril_services_settled_publishes",
                "LBServices written again to carry the settled revision when writes drained",
                Counter::default,
            ),
            deletes: m.domain(
                "tendril_services_deletes",
                "LBServices deleted (Service gone or no longer served)",
                Counter::default,
            ),
            status_writes: m.domain(
                "tendril_services_status_writes",
                "LBService status writes",
                Counter::default,
            ),
            translate_seconds: m.domain(
                "tendril_services_translate_seconds",
                "Time to translate one Service and its EndpointSlices",
                || Histogram::new(exponential_buckets(0.000_005, 2.0, 16)),
            ),
        }
    }
}
