//! Flows: every datapath verdict event enriched on the node into a Hubble `flow.Flow`, kept
//! in a bounded per-node ring, and served through Hubble's Observer gRPC API, so the real
//! `hubble` CLI (and anything else that speaks that API) reads Tendril's flows.
//!
//! - [`enrich`]: pure: a decoded ring-buffer event + what the node knows of endpoints and
//!   identities ([`enrich::Directory`]) → a `flow.Flow`.
//! - [`ring`]: the bounded ring of flows (oldest overwritten) with sequence numbers, so
//!   followers read at their own pace and learn how many they missed; events the enricher
//!   could not take in time are counted and show up as `LostEvent`s.
//! - [`pipeline`]: the event reader's side: a bounded queue it never waits on (a full
//!   queue loses the event, counted), and the task that enriches into the ring.
//! - [`filter`]: Hubble's `FlowFilter` semantics (whitelist/blacklist), compiled once per
//!   request.
//! - [`observer`]: the agent's `observer.Observer` service (GetFlows, ServerStatus,
//!   GetNodes, GetNamespaces) and `grpc.health.v1` answering SERVING for
//!   `hubble.server.Observer`.
//! - [`relay`]: the same API over every agent: GetFlows merged in time order, ServerStatus
//!   summed, GetNodes (binary `tendril-relay`).
//! - [`metrics`]: the `tendril_flows_*` metrics.
//!
//! The wire contract is in `proto/hubble/*.proto`, written from Hubble's published API
//! reference (field numbers as documented).

pub mod enrich;
pub mod filter;
pub mod metrics;
pub mod observer;
pub mod pipeline;
pub mod relay;
pub mod ring;
pub mod servicemap;

use serde::{Deserialize, Serialize};

/// The generated Observer API (`proto/hubble`, `proto/grpc_health.proto`, by build.rs).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    pub mod flow {
        tonic::include_proto!("flow");
    }
    pub mod relay {
        tonic::include_proto!("relay");
    }
    pub mod observer {
        tonic::include_proto!("observer");
    }
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}

/// The service name the hubble CLI checks with `grpc.health.v1`.
pub const OBSERVER_SERVICE_NAME: &str = "hubble.server.Observer";

/// `flows` in agent.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FlowsConfig {
    /// Keep flows and serve the Observer API at all.
    pub enabled: bool,
    /// Flows kept per node; the oldest is overwritten.
    pub ring_size: usize,
    /// Events waiting for enrichment; when full the reader drops (and counts) instead of
    /// waiting.
    pub queue_size: usize,
    /// The Observer gRPC API (plaintext).
    pub observer: ObserverConfig,
    /// `tendril_flows_*` metrics.
    pub metrics: FlowMetricsConfig,
}

/// `flows.metrics` in agent.yaml.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FlowMetricsConfig {
    /// Label `tendril_flows_processed_total` and `tendril_flows_drops_total` with the
    /// source and destination namespaces (one series per namespace pair: cardinality).
    pub namespace_context: bool,
}

/// `flows.observer` in agent.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ObserverConfig {
    /// host:port of the Observer gRPC API (Hubble's agent port is 4244); empty: not served.
    pub bind_address: String,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ring_size: 16_384,
            queue_size: 4096,
            observer: ObserverConfig::default(),
            metrics: FlowMetricsConfig::default(),
        }
    }
}

impl Default for ObserverConfig {
    fn default() -> Self {
        Self {
            bind_address: "0.0.0.0:4244".into(),
        }
    }
}

impl FlowsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.enabled && (self.ring_size == 0 || self.queue_size == 0) {
            return Err("flows.ringSize and flows.queueSize must be > 0".into());
        }
        if !self.observer.bind_address.is_empty()
            && self
                .observer
                .bind_address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(format!(
                "flows.observer.bindAddress must be host:port such as 0.0.0.0:4244, not {:?}",
                self.observer.bind_address
            ));
        }
        Ok(())
    }
}

/// `time` as a protobuf Timestamp.
pub fn timestamp(time: std::time::SystemTime) -> prost_types::Timestamp {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// Nanoseconds since the epoch of a Timestamp (for ordering and since/until).
pub fn timestamp_nanos(ts: &prost_types::Timestamp) -> i128 {
    i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos)
}
