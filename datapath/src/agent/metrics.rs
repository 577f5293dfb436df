//! The agent's domain metrics, registered in the harness's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tendril_runtime::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// `tendril_agent_ip_allocations_total{result}`: new allocations (success) and refusals.
    pub allocations: Family<ResultLabel, Counter>,
    /// `tendril_agent_ips_in_use`.
    pub ips_in_use: Gauge,
    /// `tendril_agent_ip_pool_size`: addresses pods may get (saturates at i64::MAX).
    pub ip_pool_size: Gauge,
    /// `tendril_agent_ip_leaks_released_total`: allocations released by the Endpoint reconcile.
    pub leaks_released: Counter,
}

impl AgentMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let allocations = metrics.domain(
            "tendril_agent_ip_allocations",
            "Pod address allocations by result",
            Family::<ResultLabel, Counter>::default,
        );
        for result in ["success", "error"] {
            let _ = allocations.get_or_create(&ResultLabel {
                result: result.into(),
            });
        }
        Self {
            allocations,
            ips_in_use: metrics.domain(
                "tendril_agent_ips_in_use",
                "Pod addresses in use on this node",
                Gauge::default,
            ),
            ip_pool_size: metrics.domain(
                "tendril_agent_ip_pool_size",
                "Pod addresses this node's pod CIDRs hold",
                Gauge::default,
            ),
            leaks_released: metrics.domain(
                "tendril_agent_ip_leaks_released",
                "Allocations released because no live Endpoint used them",
                Counter::default,
            ),
        }
    }

    pub fn allocation(&self, result: &str) {
        self.allocations
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }
}
