//! `LoadBalancerIPPool` (intent, cluster-scoped): addresses for `type: LoadBalancer`
//! Services, like Cilium's `CiliumLoadBalancerIPPool`.
//!
//! Blocks are CIDRs or `start`–`stop` ranges; `serviceSelector` limits which Services draw
//! from the pool; a `disabled` pool hands out nothing new but keeps its allocations. The IPAM
//! concern writes the chosen IPs into `Service.status.loadBalancer`.

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "LoadBalancerIPPool",
    plural = "loadbalancerippools",
    shortname = "lbipp",
    category = "tendril",
    status = "LoadBalancerIPPoolStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Disabled","type":"boolean","jsonPath":".spec.disabled"}"#,
    printcolumn = r#"{"name":"Used","type":"integer","jsonPath":".status.usedIPs"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.availableIPs"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolSpec {
    /// Address blocks of the pool, none overlapping another CIDR block.
    #[schemars(
        length(min = 1, max = 64),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(a, !has(a.cidr) || !isCIDR(a.cidr) || self.exists_one(b, has(b.cidr) && isCIDR(b.cidr) && (cidr(a.cidr).containsCIDR(cidr(b.cidr)) || cidr(b.cidr).containsCIDR(cidr(a.cidr)))))",
             "message": "CIDR blocks of one pool must not repeat or overlap"}
        ])
    )]
    pub blocks: Vec<IPBlock>,
    /// Services that may take addresses from this pool; absent selects every LoadBalancer Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// Stop handing out new addresses (existing ones stay).
    #[serde(default)]
    pub disabled: bool,
    /// Also hand out the network and broadcast addresses of CIDR blocks (default false).
    #[serde(default, rename = "allowFirstLastIPs")]
    pub allow_first_last_ips: bool,
}

/// A CIDR, or an inclusive `start`–`stop` range of one family.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.cidr) != (has(self.start) || has(self.stop))", "message": "a block is either a cidr or a start/stop range, not both and not neither"},
    {"rule": "has(self.start) == has(self.stop)", "message": "a range block needs both start and stop"},
    {"rule": "!has(self.start) || !has(self.stop) || !isIP(self.start) || !isIP(self.stop) || ip(self.start).family() == ip(self.stop).family()", "message": "start and stop must be of the same IP family"}
]))]
#[serde(rename_all = "camelCase")]
pub struct IPBlock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 43),
        extend("x-kubernetes-validations" = [
            {"rule": "isCIDR(self)", "message": "cidr must be a CIDR such as 198.51.100.0/24"},
            {"rule": "!isCIDR(self) || cidr(self) == cidr(self).masked()", "message": "cidr must be in canonical form, without host bits"}
        ])
    )]
    pub cidr: Option<String>,
    /// First address of a range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "start must be an IP address"}])
    )]
    pub start: Option<String>,
    /// Last address of a range (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "stop must be an IP address"}])
    )]
    pub stop: Option<String>,
}

/// Written by the IPAM concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerIPPoolStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Addresses assigned to Services.
    #[serde(default, rename = "usedIPs")]
    pub used_ips: i64,
    /// Addresses still free (saturating at `i64::MAX`).
    #[serde(default, rename = "availableIPs")]
    pub available_ips: i64,
}
