//! `EgressRoute` (desired state, cluster-scoped): one per `EgressGatewayPolicy`, same name:
//! the source pod IPs, destinations, gateway node and egress IP the agents program.
//!
//! Written by the egress concern (field manager `tendril-egress`). Every node steers
//! matching traffic of its local pods to `gatewayNode`; the gateway SNATs it to `egressIP`.

use crate::common::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "EgressRoute",
    plural = "egressroutes",
    shortname = "ter",
    category = "tendril",
    status = "EgressRouteStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".spec.gatewayNode"}"#,
    printcolumn = r#"{"name":"Egress IP","type":"string","jsonPath":".spec.egressIP"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Realized","type":"integer","jsonPath":".status.realizedRevision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EgressRouteSpec {
    /// Increases on every change of this spec.
    #[schemars(range(min = 0))]
    pub revision: i64,
    /// IPs of the pods the policy selects.
    #[serde(default, rename = "sourceIPs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16384),
        inner(length(max = 45)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(ip, isIP(ip))", "message": "every sourceIPs entry must be an IP address"}])
    )]
    pub source_ips: Vec<String>,
    #[serde(
        default,
        rename = "destinationCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(
        length(max = 64),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "every destinationCIDRs entry must be a CIDR"}])
    )]
    pub destination_cidrs: Vec<String>,
    #[serde(
        default,
        rename = "excludedCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(
        length(max = 64),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "every excludedCIDRs entry must be a CIDR"}])
    )]
    pub excluded_cidrs: Vec<String>,
    /// The gateway node; absent when no node matches (matching traffic is then dropped, as in Cilium).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_node: Option<String>,
    /// The gateway node's address other nodes tunnel the traffic to.
    #[serde(default, rename = "gatewayIP", skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "gatewayIP must be an IP address"}])
    )]
    pub gateway_ip: Option<String>,
    /// The source IP the gateway SNATs to.
    #[serde(default, rename = "egressIP", skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 45),
        extend("x-kubernetes-validations" = [{"rule": "isIP(self)", "message": "egressIP must be an IP address"}])
    )]
    pub egress_ip: Option<String>,
    /// The gateway interface the traffic leaves through, when the policy names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

/// Maintained by the egress concern from the agents' `NodeNetwork` reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRouteStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The highest `spec.revision` that every node realizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_revision: Option<i64>,
}
