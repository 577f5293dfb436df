//! `BGPNodeConfig` (desired state, cluster-scoped): one per node (same name as the Node):
//! the BGP sessions its agent opens and the prefixes it advertises.
//!
//! Written by the BGP concern (field manager `tendril-bgp`) from `BGPPeeringPolicy`,
//! `NodeNetwork` and `LBService`; the agent configures GoBGP from it and reports the realized
//! revision and the state of each session in `status`.

use super::bgp_peering_policy::BGPNeighbor;
use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Annotation on a `Node`: the BGP router id (an IPv4 address) of its routers, for a node
/// without an IPv4 InternalIP or whose InternalIP is not unique.
pub const BGP_ROUTER_ID_ANNOTATION: &str = "bgp.tendril.dev/router-id";
/// Annotation on a `BGPNodeConfig`: when the operator observed the change that produced its
/// revision (RFC 3339, microseconds, UTC).
pub const BGP_CHANGED_AT_ANNOTATION: &str = "tendril.dev/bgp-changed-at";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "BGPNodeConfig",
    plural = "bgpnodeconfigs",
    shortname = "tbgpnc",
    category = "tendril",
    status = "BGPNodeConfigStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Realized","type":"integer","jsonPath":".status.realizedRevision"}"#,
    printcolumn = r#"{"name":"Established","type":"integer","jsonPath":".status.establishedSessions"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPNodeConfigSpec {
    /// The node whose agent runs these routers.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Increases on every change of this spec.
    #[schemars(range(min = 0))]
    pub revision: i64,
    /// BGP speakers to run, one per local ASN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["localASN"])
    )]
    pub routers: Vec<NodeRouter>,
}

/// One BGP speaker of the node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeRouter {
    #[serde(rename = "localASN")]
    #[schemars(range(min = 1, max = 4_294_967_295_i64))]
    pub local_asn: i64,
    /// BGP router id (an IPv4 address: the node's InternalIP, or the Node's
    /// `bgp.tendril.dev/router-id` annotation).
    #[schemars(
        length(max = 15),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self) && ip(self).family() == 4", "message": "routerID must be an IPv4 address"}])
    )]
    #[serde(rename = "routerID")]
    pub router_id: String,
    /// Sessions to open (`peerAddress` is a plain IP here, never a CIDR), with their timers,
    /// graceful restart and password `Secret`, as the policy defines them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["peerAddress"])
    )]
    pub neighbors: Vec<BGPNeighbor>,
    /// Prefixes to advertise to every neighbor of this router, sorted by prefix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 4096),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["prefix"])
    )]
    pub advertisements: Vec<Advertisement>,
}

/// Why a prefix is advertised.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum AdvertisementSource {
    /// One of the node's pod CIDRs.
    #[default]
    PodCIDR,
    /// A Service's LoadBalancer ingress IP.
    LoadBalancerIP,
    /// A Service's external IP.
    ExternalIP,
    /// A Service's cluster IP.
    ClusterIP,
}

impl AdvertisementSource {
    pub const ALL: [AdvertisementSource; 4] = [
        AdvertisementSource::PodCIDR,
        AdvertisementSource::LoadBalancerIP,
        AdvertisementSource::ExternalIP,
        AdvertisementSource::ClusterIP,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AdvertisementSource::PodCIDR => "PodCIDR",
            AdvertisementSource::LoadBalancerIP => "LoadBalancerIP",
            AdvertisementSource::ExternalIP => "ExternalIP",
            AdvertisementSource::ClusterIP => "ClusterIP",
        }
    }
}

/// A prefix to advertise, why, and the communities it carries.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Advertisement {
    /// A pod CIDR, or a Service address as /32 (IPv4) or /128 (IPv6).
    #[schemars(
        length(max = 43),
        extend("x-kubernetes-validations" = [{"rule": "isCIDR(self)", "message": "prefix must be a CIDR"}])
    )]
    pub prefix: String,
    /// Why (when several reasons hold, the first in the order PodCIDR, LoadBalancerIP,
    /// ExternalIP, ClusterIP).
    pub source: AdvertisementSource,
    /// For a Service address: the `namespace/name` of every Service that has it, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
    pub services: Vec<String>,
    /// Standard communities (`65000:100`), sorted, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "standard_communities_schema")]
    pub communities: Vec<String>,
    /// Large communities (`65000:1:2`), sorted, each once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "large_communities_schema")]
    pub large_communities: Vec<String>,
}

// Patterns, not CEL: CEL's cost estimate over up to 16 × 4096 advertisements exceeds the
// apiserver's budget. The operator writes only values it parsed; the patterns guard hand edits.
fn standard_communities_schema(_: &mut SchemaGenerator) -> Schema {
    const PART: &str =
        "(0|[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";
    json_schema!({
        "type": "array",
        "items": {"type": "string", "maxLength": 11, "pattern": format!("^{PART}:{PART}$")},
        "maxItems": 64,
        "x-kubernetes-list-type": "atomic",
    })
}

fn large_communities_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {"type": "string", "maxLength": 32, "pattern": "^[0-9]{1,10}:[0-9]{1,10}:[0-9]{1,10}$"},
        "maxItems": 64,
        "x-kubernetes-list-type": "atomic",
    })
}

/// Written by the node's agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPNodeConfigStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `spec.revision` the agent's BGP speaker realizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_revision: Option<i64>,
    /// Sessions in state `Established`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_sessions: Option<i64>,
    /// State of each session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub sessions: Vec<SessionStatus>,
}

/// The state of one BGP session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    #[serde(rename = "localASN")]
    pub local_asn: i64,
    pub peer_address: String,
    #[serde(rename = "peerASN")]
    pub peer_asn: i64,
    /// `Idle`, `Connect`, `Active`, `OpenSent`, `OpenConfirm` or `Established`.
    #[schemars(extend("enum" = ["Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established"]))]
    pub state: String,
    /// Prefixes advertised to the peer.
    #[serde(default)]
    pub advertised: i64,
    /// Prefixes received from the peer.
    #[serde(default)]
    pub received: i64,
    /// When the session last became `Established` (absent in any other state): its uptime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_since: Option<Time>,
}
