//! `tendril_bgp_*`: the node's BGP speaker, its sessions and prefixes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tendril_runtime::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

/// One session (peers are few: at most 64 per router, bounded by the CRD).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet, PartialOrd, Ord)]
pub struct PeerLabels {
    pub local_asn: String,
    pub peer_address: String,
    pub peer_asn: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: String,
}

#[derive(Clone, Debug)]
pub struct BgpMetrics {
    /// `tendril_bgp_sessions{state}`: the node's sessions by BGP FSM state.
    pub sessions: Family<StateLabel, Gauge>,
    /// `tendril_bgp_session_established{local_asn,peer_address,peer_asn}`: 1 while the
    /// session is Established (the peer-down alert watches it).
    pub session_established: Family<PeerLabels, Gauge>,
    /// `tendril_bgp_prefixes_advertised{…peer}` / `…_received{…peer}`.
    pub prefixes_advertised: Family<PeerLabels, Gauge>,
    pub prefixes_received: Family<PeerLabels, Gauge>,
    /// `tendril_bgp_paths`: prefixes the node originates.
    pub paths: Gauge,
    /// `tendril_bgp_daemon_up`: 1 while gobgpd runs with its API open.
    pub daemon_up: Gauge,
    /// `tendril_bgp_daemon_restarts_total`: gobgpd exits and failed starts.
    pub daemon_restarts: Counter,
    /// `tendril_bgp_api_errors_total{operation}`: failed gobgpd API calls.
    pub api_errors: Family<OperationLabel, Counter>,
    /// `tendril_bgp_realize_seconds`: a change of the node's BGPNodeConfig (or a daemon
    /// restart) → gobgpd holds its peers and paths.
    pub realize_seconds: Histogram,
}

/// The FSM states, as `BGPNodeConfig.status.sessions[].state` names them.
pub const STATES: [&str; 6] = [
    "Idle",
    "Connect",
    "Active",
    "OpenSent",
    "OpenConfirm",
    "Established",
];

impl BgpMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        Self {
            sessions: metrics.domain(
                "tendril_bgp_sessions",
                "BGP sessions of the node's speaker by state",
                Family::default,
            ),
            session_established: metrics.domain(
                "tendril_bgp_session_established",
                "1 while the BGP session to the peer is Established, else 0",
                Family::default,
            ),
            prefixes_advertised: metrics.domain(
                "tendril_bgp_prefixes_advertised",
                "Prefixes advertised to the peer",
                Family::default,
            ),
            prefixes_received: metrics.domain(
                "tendril_bgp_prefixes_received",
                "Prefixes received from the peer",
                Family::default,
            ),
            paths: metrics.domain(
                "tendril_bgp_paths",
                "Prefixes the node's speaker originates",
                Gauge::default,
            ),
            daemon_up: metrics.domain(
                "tendril_bgp_daemon_up",
                "1 while the node's gobgpd runs with its API open",
                Gauge::default,
            ),
            daemon_restarts: metrics.domain(
                "tendril_bgp_daemon_restarts",
                "Exits and failed starts of the node's gobgpd (each is restarted with backoff)",
                Counter::default,
            ),
            api_errors: metrics.domain(
                "tendril_bgp_api_errors",
                "Failed calls to gobgpd's API by operation",
                Family::default,
            ),
            realize_seconds: metrics.domain(
                "tendril_bgp_realize_seconds",
                "Time from a change of the node's BGPNodeConfig to gobgpd holding its peers and paths",
                || Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            ),
        }
    }
}
