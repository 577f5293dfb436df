//! `PodIPPool` (intent, cluster-scoped): the address space pods get their IPs from.
//!
//! Reads like Cilium's `CiliumPodIPPool`: each family lists its CIDRs and the mask size of
//! the per-node CIDR carved out of them. The IPAM concern hands every selected node one CIDR
//! per family and writes it into `NodeNetwork.spec.podCIDRs`.
//!
//! The apiserver refuses a pool whose CIDRs are malformed, of the wrong family, not in
//! canonical form (host bits set), overlapping each other, or larger than the per-node mask,
//! and refuses any change of a mask size (it would re-address running pods).

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "PodIPPool",
    plural = "podippools",
    shortname = "pipp",
    category = "tendril",
    status = "PodIPPoolStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"IPv4 CIDRs","type":"string","jsonPath":".spec.ipv4.cidrs"}"#,
    printcolumn = r#"{"name":"IPv4 Mask","type":"integer","jsonPath":".spec.ipv4.maskSize"}"#,
    printcolumn = r#"{"name":"IPv6 CIDRs","type":"string","jsonPath":".spec.ipv6.cidrs"}"#,
    printcolumn = r#"{"name":"IPv6 Mask","type":"integer","jsonPath":".spec.ipv6.maskSize"}"#,
    printcolumn = r#"{"name":"Allocated","type":"integer","jsonPath":".status.allocatedCIDRs"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.availableCIDRs"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.ipv4) || has(self.ipv6)", "message": "a pool needs at least one of ipv4 or ipv6"}
]))]
#[serde(rename_all = "camelCase")]
pub struct PodIPPoolSpec {
    /// IPv4 address space of the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<PodIPPoolIPv4>,
    /// IPv6 address space of the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<PodIPPoolIPv6>,
    /// Nodes that take their pod CIDRs from this pool; absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
}

/// The IPv4 part of a pool: CIDRs split into per-node blocks of `maskSize`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.cidrs.all(c, !isCIDR(c) || cidr(c).ip().family() != 4 || cidr(c).prefixLength() <= self.maskSize)",
     "message": "maskSize must be at least the prefix length of every CIDR (a node CIDR cannot be larger than the pool CIDR)"}
]))]
#[serde(rename_all = "camelCase")]
pub struct PodIPPoolIPv4 {
    /// IPv4 CIDRs in canonical form, e.g. `10.244.0.0/16`; at most 16, none overlapping.
    #[schemars(
        length(min = 1, max = 16),
        inner(length(max = 18)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(c, isCIDR(c))", "message": "every entry of cidrs must be a CIDR such as 10.244.0.0/16"},
            {"rule": "self.all(c, !isCIDR(c) || cidr(c).ip().family() == 4)", "message": "ipv4.cidrs must hold IPv4 CIDRs only"},
            {"rule": "self.all(c, !isCIDR(c) || cidr(c) == cidr(c).masked())", "message": "every CIDR must be in canonical form, without host bits (10.244.0.0/16, not 10.244.1.0/16)"},
            {"rule": "self.all(a, !isCIDR(a) || self.exists_one(b, isCIDR(b) && (cidr(a).containsCIDR(cidr(b)) || cidr(b).containsCIDR(cidr(a)))))", "message": "CIDRs of one pool must not repeat or overlap"}
        ])
    )]
    pub cidrs: Vec<String>,
    /// Prefix length of the CIDR each node gets (8–30), e.g. 24 for 254 pods per node.
    /// Immutable: changing it would re-address running pods.
    #[schemars(
        range(min = 8, max = 30),
        extend("x-kubernetes-validations" = [
            {"rule": "self == oldSelf", "message": "maskSize is immutable: changing it would re-address running pods"}
        ])
    )]
    pub mask_size: i32,
}

/// The IPv6 part of a pool: CIDRs split into per-node blocks of `maskSize`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.cidrs.all(c, !isCIDR(c) || cidr(c).ip().family() != 6 || cidr(c).prefixLength() <= self.maskSize)",
     "message": "maskSize must be at least the prefix length of every CIDR (a node CIDR cannot be larger than the pool CIDR)"}
]))]
#[serde(rename_all = "camelCase")]
pub struct PodIPPoolIPv6 {
    /// IPv6 CIDRs in canonical form, e.g. `fd00:10:244::/56`; at most 16, none overlapping.
    #[schemars(
        length(min = 1, max = 16),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(c, isCIDR(c))", "message": "every entry of cidrs must be a CIDR such as fd00:10:244::/56"},
            {"rule": "self.all(c, !isCIDR(c) || cidr(c).ip().family() == 6)", "message": "ipv6.cidrs must hold IPv6 CIDRs only"},
            {"rule": "self.all(c, !isCIDR(c) || cidr(c) == cidr(c).masked())", "message": "every CIDR must be in canonical form, without host bits (fd00:10:244::/56, not fd00:10:244::1/56)"},
            {"rule": "self.all(a, !isCIDR(a) || self.exists_one(b, isCIDR(b) && (cidr(a).containsCIDR(cidr(b)) || cidr(b).containsCIDR(cidr(a)))))", "message": "CIDRs of one pool must not repeat or overlap"}
        ])
    )]
    pub cidrs: Vec<String>,
    /// Prefix length of the CIDR each node gets (48–126), e.g. 64.
    /// Immutable: changing it would re-address running pods.
    #[schemars(
        range(min = 48, max = 126),
        extend("x-kubernetes-validations" = [
            {"rule": "self == oldSelf", "message": "maskSize is immutable: changing it would re-address running pods"}
        ])
    )]
    pub mask_size: i32,
}

/// Written by the IPAM concern.
///
/// `allocatedCIDRs` counts node CIDRs handed out from this pool, all families together (a
/// dual-stack node holds two). `availableCIDRs` is how many more nodes can get a full set of
/// CIDRs from the pool: the minimum over its families of free node CIDRs, saturating at
/// `i64::MAX` (an IPv6 pool is practically unbounded).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodIPPoolStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node CIDRs handed out from this pool (all families).
    #[serde(default, rename = "allocatedCIDRs")]
    pub allocated_cidrs: i64,
    /// Nodes that can still get a full set of CIDRs from this pool.
    #[serde(default, rename = "availableCIDRs")]
    pub available_cidrs: i64,
}
