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

/// A BGP speaker on each selected node. Several policies selecting one node merge their
/// routers by `localASN` (neighbors and advertisements are unioned); a peer defined twice
/// differently on one node is a conflict (`Valid=False`, reason `Conflict`) and that node's
/// `BGPNodeConfig` is left as it was.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualRouter {
    /// The node's autonomous system number (1–4294967295).
    #[serde(rename = "localASN")]
    #[schemars(range(min = 1, max = 4_294_967_295_i64))]
    pub local_asn: i64,
    /// Advertise the node's pod CIDRs (the same as an advertisement of type `PodCIDR`
    /// without communities).
    #[serde(default, rename = "exportPodCIDR")]
    pub export_pod_cidr: bool,
    /// Advertise the LoadBalancer and external IPs of the Services it selects (the same as
    /// an advertisement of type `Service` with addresses `LoadBalancerIP` and `ExternalIP`
    /// and no communities); absent advertises none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// What to advertise, with which communities (beside `exportPodCIDR` and
    /// `serviceSelector`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "atomic"))]
    pub advertisements: Vec<BGPAdvertisement>,
    /// The peers.
    #[schemars(
        length(min = 1, max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["peerAddress"])
    )]
    pub neighbors: Vec<BGPNeighbor>,
}

/// What an advertisement announces.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum AdvertisementType {
    /// The node's pod CIDRs (`NodeNetwork.spec.podCIDRs`).
    PodCIDR,
    /// Addresses of the selected Services, each as a /32 (IPv4) or /128 (IPv6).
    Service,
}

/// Which addresses of a Service are advertised.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum ServiceAddress {
    /// `status.loadBalancer.ingress[].ip` of a Service of type LoadBalancer; with
    /// `externalTrafficPolicy: Local` only from nodes with a ready local backend.
    LoadBalancerIP,
    /// `spec.externalIPs`; with `externalTrafficPolicy: Local` only from nodes with a ready
    /// local backend.
    ExternalIP,
    /// `spec.clusterIPs`; with `internalTrafficPolicy: Local` only from nodes with a ready
    /// local backend.
    ClusterIP,
}

/// Prefixes to advertise and the BGP communities they carry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.advertisementType != 'Service' || (has(self.addresses) && size(self.addresses) > 0)",
     "message": "a Service advertisement needs addresses: LoadBalancerIP, ExternalIP and/or ClusterIP"},
    {"rule": "self.advertisementType != 'Service' || has(self.selector)",
     "message": "a Service advertisement needs a selector ({} selects every Service)"},
    {"rule": "self.advertisementType != 'PodCIDR' || (!has(self.addresses) && !has(self.selector))",
     "message": "a PodCIDR advertisement takes no addresses or selector"}
]))]
#[serde(rename_all = "camelCase")]
pub struct BGPAdvertisement {
    /// `PodCIDR` or `Service`.
    pub advertisement_type: AdvertisementType,
    /// For `Service`: which addresses of the selected Services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3), extend("x-kubernetes-list-type" = "set"))]
    pub addresses: Vec<ServiceAddress>,
    /// For `Service`: the Services whose addresses are advertised, by label; `{}` selects
    /// every Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// BGP communities attached to the prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub communities: Option<Communities>,
}

/// BGP communities (RFC 1997 standard, RFC 8092 large).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Communities {
    /// Standard communities `ASN:value`, both 0–65535, e.g. `65000:100`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(max = 11)),
        extend("x-kubernetes-list-type" = "set"),
        extend("x-kubernetes-validations" = [{"rule": STANDARD_COMMUNITY_RULE, "message": STANDARD_COMMUNITY_MESSAGE}])
    )]
    pub standard: Vec<String>,
    /// Large communities `ASN:value:value`, each 0–4294967295, e.g. `65000:1:2`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(max = 32)),
        extend("x-kubernetes-list-type" = "set"),
        extend("x-kubernetes-validations" = [{"rule": LARGE_COMMUNITY_RULE, "message": LARGE_COMMUNITY_MESSAGE}])
    )]
    pub large: Vec<String>,
}

/// CEL: every standard community is two numbers 0–65535 joined by `:`.
const STANDARD_COMMUNITY_RULE: &str =
    "self.all(c, c.matches('^[0-9]{1,5}:[0-9]{1,5}$') && c.split(':').all(p, int(p) <= 65535))";
const STANDARD_COMMUNITY_MESSAGE: &str =
    "standard communities are written ASN:value, both 0-65535, e.g. 65000:100";
/// CEL: every large community is three numbers 0–4294967295 joined by `:`.
const LARGE_COMMUNITY_RULE: &str = "self.all(c, c.matches('^[0-9]{1,10}:[0-9]{1,10}:[0-9]{1,10}$') && c.split(':').all(p, int(p) <= 4294967295))";
const LARGE_COMMUNITY_MESSAGE: &str =
    "large communities are written ASN:value:value, each 0-4294967295, e.g. 65000:1:2";

/// A BGP peer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.holdTimeSeconds == 0 || self.holdTimeSeconds >= 3 * self.keepAliveTimeSeconds",
     "message": "holdTimeSeconds must be 0 (no keepalives) or at least 3 × keepAliveTimeSeconds (defaults 90 and 30)"}
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
    /// BGP hold time: 0 (no keepalives, the session never times out) or 3–65535, at least
    /// 3 × the keepalive interval (default 90).
    #[serde(default = "hold_time")]
    #[schemars(
        range(min = 0, max = 65535),
        extend("x-kubernetes-validations" = [{"rule": "self == 0 || self >= 3", "message": "holdTimeSeconds must be 0 or at least 3"}])
    )]
    pub hold_time_seconds: i32,
    /// BGP keepalive interval (1–21845, default 30); at most a third of the hold time.
    #[serde(default = "keepalive_time")]
    #[schemars(range(min = 1, max = 21845))]
    pub keep_alive_time_seconds: i32,
    /// Graceful restart, so an agent restart does not withdraw routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart: Option<GracefulRestart>,
    /// Name of a `Secret` in the agents' BGP secrets namespace (`tendril-bgp-secrets`,
    /// `bgp.secretsNamespace` in config/agent.yaml) whose `password` key holds the TCP MD5
    /// password.
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
