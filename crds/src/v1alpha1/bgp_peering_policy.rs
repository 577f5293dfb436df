//! `BGPPeeringPolicy` (intent, cluster-scoped): which nodes speak BGP to which peers and what
//! they advertise, like Cilium's `CiliumBGPPeeringPolicy`.
//!
//! The BGP concern turns every policy that selects a node into that node's `BGPNodeConfig`;
//! the agent drives GoBGP from it.

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "BGPPeeringPolicy",
    plural = "bgppeeringpolicies",
    shortname = "tbgpp",
    category = "tendril",
    status = "BGPPeeringPolicyStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Local ASNs","type":"string","jsonPath":".spec.virtualRouters[*].localASN"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.selectedNodes"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeeringPolicySpec {
    /// Nodes this policy applies to; absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// One BGP speaker per local ASN.
    #[schemars(
        length(min = 1, max = 16),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["localASN"])
    )]
    pub virtual_routers: Vec<VirtualRouter>,
}

/// A BGP speaker on each selected node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualRouter {
    /// The node's autonomous system number (1–4294967295).
    #[serde(rename = "localASN")]
    #[schemars(range(min = 1, max = 4_294_967_295_i64))]
    pub local_asn: i64,
    /// Advertise the node's pod CIDRs.
    #[serde(default, rename = "exportPodCIDR")]
    pub export_pod_cidr: bool,
    /// Advertise the LoadBalancer and external IPs of the Services it selects; absent advertises none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// The peers.
    #[schemars(
        length(min = 1, max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["peerAddress"])
    )]
    pub neighbors: Vec<BGPNeighbor>,
}

/// A BGP peer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.keepAliveTimeSeconds < self.holdTimeSeconds", "message": "keepAliveTimeSeconds must be less than holdTimeSeconds"}
]))]
#[serde(rename_all = "camelCase")]
pub struct BGPNeighbor {
    /// The peer's address: an IP, or a single-host CIDR as Cilium writes it (`192.0.2.1/32`).
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [
            {"rule": "isIP(self) || (isCIDR(self) && cidr(self).prefixLength() == (cidr(self).ip().family() == 4 ? 32 : 128))",
             "message": "peerAddress must be an IP address or a /32 (/128) CIDR"}
        ])
    )]
    pub peer_address: String,
    /// The peer's autonomous system number (1–4294967295).
    #[serde(rename = "peerASN")]
    #[schemars(range(min = 1, max = 4_294_967_295_i64))]
    pub peer_asn: i64,
    /// TCP port of the peer (default 179).
    #[serde(default = "bgp_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub peer_port: i32,
    /// TTL of eBGP packets, for peers more than one hop away (default 1).
    #[serde(default = "one", rename = "eBGPMultihopTTL")]
    #[schemars(range(min = 1, max = 255))]
    pub ebgp_multihop_ttl: i32,
    /// Seconds between connection attempts (default 120).
    #[serde(default = "connect_retry")]
    #[schemars(range(min = 1, max = 2_147_483_647))]
    pub connect_retry_time_seconds: i32,
    /// BGP hold time (3–65535, default 90).
    #[serde(default = "hold_time")]
    #[schemars(range(min = 3, max = 65535))]
    pub hold_time_seconds: i32,
    /// BGP keepalive interval (1–65535, default 30); less than the hold time.
    #[serde(default = "keepalive_time")]
    #[schemars(range(min = 1, max = 65535))]
    pub keep_alive_time_seconds: i32,
    /// Graceful restart, so an agent restart does not withdraw routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart: Option<GracefulRestart>,
    /// Name of a `Secret` (in the operator namespace) whose `password` key holds the TCP MD5 password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub auth_secret_ref: Option<String>,
}

fn bgp_port() -> i32 {
    179
}
fn one() -> i32 {
    1
}
fn connect_retry() -> i32 {
    120
}
fn hold_time() -> i32 {
    90
}
fn keepalive_time() -> i32 {
    30
}
fn restart_time() -> i32 {
    120
}

/// BGP graceful restart (RFC 4724).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GracefulRestart {
    pub enabled: bool,
    /// How long the peer keeps our routes while we restart (1–4095, default 120).
    #[serde(default = "restart_time")]
    #[schemars(range(min = 1, max = 4095))]
    pub restart_time_seconds: i32,
}

/// Written by the BGP concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeeringPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes this policy currently selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_nodes: Option<i64>,
}
