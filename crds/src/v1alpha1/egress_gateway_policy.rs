//! `EgressGatewayPolicy` (intent, cluster-scoped): traffic from selected pods to selected
//! destinations leaves the cluster through a gateway node with a fixed source IP, like
//! Cilium's `CiliumEgressGatewayPolicy`.
//!
//! The egress concern resolves each policy into one `EgressRoute` of the same name.

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "EgressGatewayPolicy",
    plural = "egressgatewaypolicies",
    shortname = "tegp",
    category = "tendril",
    status = "EgressGatewayPolicyStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Destinations","type":"string","jsonPath":".spec.destinationCIDRs"}"#,
    printcolumn = r#"{"name":"Egress IP","type":"string","jsonPath":".spec.egressGateway.egressIP"}"#,
    printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".status.gatewayNode"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicySpec {
    /// Source pods: a pod matches if any selector matches it.
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "atomic"))]
    pub selectors: Vec<EgressSelector>,
    /// Destinations whose traffic goes through the gateway.
    #[serde(rename = "destinationCIDRs")]
    #[schemars(
        length(min = 1, max = 64),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "every destinationCIDRs entry must be a CIDR such as 0.0.0.0/0"}])
    )]
    pub destination_cidrs: Vec<String>,
    /// Destinations excluded from `destinationCIDRs` (they keep the normal path).
    #[serde(
        default,
        rename = "excludedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(
        length(max = 64),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "every excludedCIDRs entry must be a CIDR such as 10.0.0.0/8"}])
    )]
    pub excluded_cidrs: Vec<String>,
    /// The gateway node and the source address traffic leaves with.
    pub egress_gateway: EgressGateway,
}

/// Pods selected by pod labels and/or namespace labels (both must match when both are set).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.podSelector) || has(self.namespaceSelector)", "message": "a selector needs podSelector or namespaceSelector"}
]))]
#[serde(rename_all = "camelCase")]
pub struct EgressSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Where traffic leaves: the first matching node (by name) is the gateway; the source IP is
/// `egressIP`, or the first IPv4 address of `interface` on the gateway, or its default
/// route's address when neither is set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(has(self.interface) && has(self.egressIP))", "message": "set at most one of interface or egressIP"}
]))]
#[serde(rename_all = "camelCase")]
pub struct EgressGateway {
    /// Candidate gateway nodes.
    pub node_selector: LabelSelector,
    /// The gateway's interface whose address is the source IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 15))]
    pub interface: Option<String>,
    /// The source IP (must be configured on the gateway node).
    #[serde(default, rename = "egressIP", skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "egressIP must be an IP address"}])
    )]
    pub egress_ip: Option<String>,
}

/// Written by the egress concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressGatewayPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The node currently chosen as gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_node: Option<String>,
}
