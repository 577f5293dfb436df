//! `BGPNodeConfig` (desired state, cluster-scoped): one per node (same name as the Node):
//! the BGP sessions its agent opens and the prefixes it advertises.
//!
//! Written by the BGP concern (field manager `tendril-bgp`) from `BGPPeeringPolicy`,
//! `NodeNetwork` and `LBService`; the agent configures GoBGP from it and reports the realized
//! revision and the state of each session in `status`.

use super::bgp_peering_policy::BGPNeighbor;
use crate::common::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    /// BGP router id (an IPv4 address, normally the node's InternalIP).
    #[schemars(
        length(max = 15),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self) && ip(self).family() == 4", "message": "routerID must be an IPv4 address"}])
    )]
    #[serde(rename = "routerID")]
    pub router_id: String,
    /// Sessions to open.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["peerAddress"])
    )]
    pub neighbors: Vec<BGPNeighbor>,
    /// Prefixes to advertise to every neighbor of this router.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 4096),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["prefix"])
    )]
    pub advertisements: Vec<Advertisement>,
}

/// A prefix to advertise and why.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Advertisement {
    #[schemars(
        length(max = 43),
        extend("x-kubernetes-validations" = [{"rule": "isCIDR(self)", "message": "prefix must be a CIDR"}])
    )]
    pub prefix: String,
    /// `PodCIDR` or `Service`.
    #[schemars(extend("enum" = ["PodCIDR", "Service"]))]
    pub source: String,
    /// For `Service`: the `namespace/name` of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
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
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
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
}
