//! `LBService` (desired state, namespaced): one per `Service`, same namespace and name, with
//! every frontend (ClusterIP, NodePort, LoadBalancer IPs, externalIPs) and its backends.
//!
//! Written by the services concern (field manager `tendril-services`) from the Service, its
//! EndpointSlices and the Nodes; read by every agent, which programs `lb_services`,
//! `lb_backends` and `lb_revnat`. A frontend's backends are those with the same `portName`.
//!
//! Revisions are one cluster-wide sequence: the services concern gives each change the next
//! number. It writes several LBServices at once, so revisions can commit out of order; each
//! spec carries `committedRevision`, a revision up to which every write had committed before
//! this one was sent (or its own, when it was sent alone), so an agent that has seen a spec
//! has seen every revision up to its `committedRevision` (the watch delivers in commit order). When its writes drain, the
//! concern re-writes the last one with the final `committedRevision`. Each agent reports the
//! highest `committedRevision` its maps realize (a spec without one counts as its
//! `revision`: written one at a time) in `NodeNetwork.status.realizedServicesRevision`;
//! the `Realized` condition says whether every node does, judged after a deadline
//! (`services.realizeDeadlineMillis`) so that a change realized in time writes no status.
//!
//! Backend states follow KEP-1669: `active` backends (ready) take new connections;
//! `terminating` backends (serving but terminating) take new connections only when a scope
//! (all backends, or the node's local ones for a `Local` policy) has no `active` backend left;
//! backends that are not serving are not listed. Established connections are never moved.

use crate::common::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "LBService",
    plural = "lbservices",
    shortname = "tlbs",
    category = "tendril",
    namespaced,
    status = "LBServiceStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Frontends","type":"string","jsonPath":".spec.frontends[*].address"}"#,
    printcolumn = r#"{"name":"Backends","type":"string","priority":1,"jsonPath":".spec.backends[*].address"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Realized","type":"string","jsonPath":".status.conditions[?(@.type==\"Realized\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LBServiceSpec {
    /// Increases on every change of this spec.
    #[schemars(range(min = 0))]
    pub revision: i64,
    /// Whoever has seen this spec has seen every LBService revision up to this one (they
    /// had committed when it was written, or it is this spec's own): writes go out several
    /// at a time and can commit out of order. Absent means `revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub committed_revision: Option<i64>,
    /// Addresses and ports clients connect to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), extend("x-kubernetes-list-type" = "atomic"))]
    pub frontends: Vec<Frontend>,
    /// Where connections go.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16384), extend("x-kubernetes-list-type" = "atomic"))]
    pub backends: Vec<Backend>,
    /// Client-IP session affinity; absent means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinity>,
    /// `Cluster` (default) or `Local`: backends for NodePort/LoadBalancer/ExternalIP traffic.
    #[serde(default = "cluster_policy")]
    #[schemars(extend("enum" = ["Cluster", "Local"]))]
    pub external_traffic_policy: String,
    /// `Cluster` (default) or `Local`: backends for ClusterIP traffic from inside the cluster.
    #[serde(default = "cluster_policy")]
    #[schemars(extend("enum" = ["Cluster", "Local"]))]
    pub internal_traffic_policy: String,
    /// Client CIDRs allowed to reach LoadBalancer frontends (empty = any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "every loadBalancerSourceRanges entry must be a CIDR such as 203.0.113.0/24"}])
    )]
    pub load_balancer_source_ranges: Vec<String>,
    /// For `externalTrafficPolicy: Local` NodePort/LoadBalancer services: the node port where
    /// each node answers health checks with its local endpoint count (as kube-proxy does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub health_check_node_port: Option<i32>,
    /// Backend selection: `Random` or `Maglev` (consistent hashing); absent means the agent's
    /// configured default. From the Service annotation `service.tendril.dev/lb-algorithm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Random", "Maglev"]))]
    pub algorithm: Option<String>,
}

fn cluster_policy() -> String {
    "Cluster".into()
}

/// An address, port and protocol clients connect to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.type == 'NodePort' || has(self.address)", "message": "only NodePort frontends may omit address (they listen on every node address)"}
]))]
#[serde(rename_all = "camelCase")]
pub struct Frontend {
    /// The Service port name this frontend serves (empty for a single unnamed port).
    #[serde(default)]
    #[schemars(length(max = 63))]
    pub name: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalIP`.
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalIP"]))]
    pub type_: String,
    /// The frontend IP; absent for a NodePort on every node address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "frontend address must be an IP address"}])
    )]
    pub address: Option<String>,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `TCP`, `UDP` or `SCTP`.
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP"]))]
    pub protocol: String,
}

/// A backend (pod address and target port).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// The Service port name the backend serves (matches `Frontend.name`).
    #[serde(default)]
    #[schemars(length(max = 63))]
    pub port_name: String,
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "backend address must be an IP address"}])
    )]
    pub address: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `TCP`, `UDP` or `SCTP`.
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP"]))]
    pub protocol: String,
    /// Relative weight for backend selection (default 1; 0 takes no new connections).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 65535))]
    pub weight: i32,
    /// Node the backend runs on (for `Local` traffic policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Topology zone of the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `active` or `terminating` (terminating backends keep existing connections only).
    #[serde(default = "active")]
    #[schemars(extend("enum" = ["active", "terminating"]))]
    pub state: String,
}

fn default_weight() -> i32 {
    1
}

fn active() -> String {
    "active".into()
}

/// Session affinity settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinity {
    /// Stick each client IP to one backend.
    #[serde(default, rename = "clientIP", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpAffinity>,
}

/// Client-IP affinity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpAffinity {
    /// How long a client sticks to its backend after its last packet (1–86400, default 10800).
    #[serde(default = "affinity_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: i32,
}

fn affinity_timeout() -> i32 {
    10800
}

/// Maintained by the services concern from the agents' `NodeNetwork` reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LBServiceStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
