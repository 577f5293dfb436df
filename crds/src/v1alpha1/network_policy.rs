//! `NetworkPolicy` (intent, namespaced) and `ClusterNetworkPolicy` (intent, cluster-scoped):
//! identity-aware L3/L4 policy shaped like Cilium's `CiliumNetworkPolicy` and
//! `CiliumClusterwideNetworkPolicy`.
//!
//! A policy selects its subjects with `endpointSelector` (pods) or `nodeSelector` (hosts),
//! exactly one of them, and lists allow rules (`ingress`, `egress`) and deny rules
//! (`ingressDeny`, `egressDeny`); a deny always wins over an allow. Peers are pods
//! (`fromEndpoints`/`toEndpoints`, label selectors; in a namespaced policy they are limited
//! to the policy's namespace unless they select `k8s:io.kubernetes.pod.namespace`), entities
//! (`host`, `world`, `cluster`, …) and CIDRs (`fromCIDR`, `fromCIDRSet` with `except`).
//! `toPorts` narrows a rule to ports, port ranges (`endPort`) and protocols.
//!
//! The policy concern resolves every policy that selects an identity into one
//! `ResolvedPolicy` for it.

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Both policy kinds share one spec shape; the macro keeps their fields identical.
macro_rules! policy_spec {
    ($(#[$attr:meta])* $name:ident) => {
        #[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
        $(#[$attr])*
        #[schemars(extend("x-kubernetes-validations" = [
            {"rule": "has(self.endpointSelector) != has(self.nodeSelector)",
             "message": "set exactly one of endpointSelector (pods) or nodeSelector (hosts)"}
        ]))]
        #[serde(rename_all = "camelCase")]
        pub struct $name {
            /// Free text shown to whoever reads the policy.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 1024))]
            pub description: Option<String>,
            /// The pods this policy applies to (`{}` selects every pod in scope).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub endpoint_selector: Option<LabelSelector>,
            /// The nodes (host endpoints) this policy applies to.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub node_selector: Option<LabelSelector>,
            /// Traffic the subjects may receive.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
            pub ingress: Vec<IngressRule>,
            /// Traffic the subjects must not receive, whatever an allow rule says.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
            pub ingress_deny: Vec<IngressRule>,
            /// Traffic the subjects may send.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
            pub egress: Vec<EgressRule>,
            /// Traffic the subjects must not send, whatever an allow rule says.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
            pub egress_deny: Vec<EgressRule>,
            /// Whether selecting a subject puts it into default deny for a direction. Absent
            /// means: default deny in each direction that has at least one rule (Cilium's behavior).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub enable_default_deny: Option<DefaultDeny>,
        }
    };
}

policy_spec!(
    /// Spec of `NetworkPolicy` (namespaced).
    #[kube(
        group = "tendril.dev",
        version = "v1alpha1",
        kind = "NetworkPolicy",
        plural = "networkpolicies",
        shortname = "tnp",
        category = "tendril",
        namespaced,
        status = "PolicyStatus",
        derive = "Default",
        derive = "PartialEq",
        printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
        printcolumn = r#"{"name":"Subjects","type":"integer","jsonPath":".status.selectedIdentities"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )]
    NetworkPolicySpec
);

policy_spec!(
    /// Spec of `ClusterNetworkPolicy` (cluster-scoped: selectors span all namespaces).
    #[kube(
        group = "tendril.dev",
        version = "v1alpha1",
        kind = "ClusterNetworkPolicy",
        plural = "clusternetworkpolicies",
        shortname = "tcnp",
        category = "tendril",
        status = "PolicyStatus",
        derive = "Default",
        derive = "PartialEq",
        printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
        printcolumn = r#"{"name":"Subjects","type":"integer","jsonPath":".status.selectedIdentities"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )]
    ClusterNetworkPolicySpec
);

/// Per-direction default deny switch.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefaultDeny {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<bool>,
}

pub use crate::facts::ENTITIES;

/// Traffic into the subjects. Peer fields are alternatives (a packet matches if any peer
/// matches); `toPorts` narrows all of them. A rule without peers matches every peer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Pods sending the traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
    pub from_endpoints: Vec<LabelSelector>,
    /// Entities sending the traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10),
        inner(length(max = 16)),
        extend("x-kubernetes-list-type" = "set"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(e, e in ['host', 'remote-node', 'world', 'cluster', 'kube-apiserver', 'all', 'health', 'init', 'ingress', 'unmanaged'])",
             "message": "fromEntities entries must be one of host, remote-node, world, cluster, kube-apiserver, all, health, init, ingress, unmanaged"}
        ])
    )]
    pub from_entities: Vec<String>,
    /// CIDRs sending the traffic (outside the cluster's pods).
    #[serde(default, rename = "fromCIDR", skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(c, isCIDR(c))", "message": "every fromCIDR entry must be a CIDR such as 192.0.2.0/24"}
        ])
    )]
    pub from_cidr: Vec<String>,
    /// CIDRs with exceptions sending the traffic.
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "atomic"))]
    pub from_cidr_set: Vec<CidrRule>,
    /// Ports the traffic goes to; absent means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "atomic"))]
    pub to_ports: Vec<PortRule>,
}

/// Traffic out of the subjects. Peer fields are alternatives; `toPorts` narrows all of them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Pods receiving the traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "atomic"))]
    pub to_endpoints: Vec<LabelSelector>,
    /// Entities receiving the traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 10),
        inner(length(max = 16)),
        extend("x-kubernetes-list-type" = "set"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(e, e in ['host', 'remote-node', 'world', 'cluster', 'kube-apiserver', 'all', 'health', 'init', 'ingress', 'unmanaged'])",
             "message": "toEntities entries must be one of host, remote-node, world, cluster, kube-apiserver, all, health, init, ingress, unmanaged"}
        ])
    )]
    pub to_entities: Vec<String>,
    /// CIDRs receiving the traffic.
    #[serde(default, rename = "toCIDR", skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(c, isCIDR(c))", "message": "every toCIDR entry must be a CIDR such as 192.0.2.0/24"}
        ])
    )]
    pub to_cidr: Vec<String>,
    /// CIDRs with exceptions receiving the traffic.
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "atomic"))]
    pub to_cidr_set: Vec<CidrRule>,
    /// Ports the traffic goes to; absent means every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "atomic"))]
    pub to_ports: Vec<PortRule>,
}

/// A CIDR minus some of its sub-CIDRs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.except) || !isCIDR(self.cidr) || self.except.all(e, !isCIDR(e) || cidr(self.cidr).containsCIDR(cidr(e)))",
     "message": "every except entry must lie inside cidr"}
]))]
#[serde(rename_all = "camelCase")]
pub struct CidrRule {
    #[schemars(
        length(max = 43),
        extend("x-kubernetes-validations" = [
            {"rule": "isCIDR(self)", "message": "cidr must be a CIDR such as 10.0.0.0/8"}
        ])
    )]
    pub cidr: String,
    /// Sub-CIDRs of `cidr` that the rule does not cover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(length(max = 43)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(c, isCIDR(c))", "message": "every except entry must be a CIDR such as 10.96.0.0/12"}
        ])
    )]
    pub except: Vec<String>,
}

/// A set of ports the rule applies to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-list-type" = "atomic"))]
    pub ports: Vec<PortProtocol>,
}

/// A port (or range up to `endPort`) and protocol.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.endPort) || (self.port.matches('^[0-9]+$') && int(self.port) <= self.endPort)",
     "message": "endPort needs a numeric port and must be at least port"}
]))]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    /// A port number (1–65535) or the name of a container port (e.g. `http`).
    #[schemars(
        length(min = 1, max = 15),
        extend("x-kubernetes-validations" = [
            {"rule": "self.matches('^[0-9]+$') ? (int(self) >= 1 && int(self) <= 65535) : self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
             "message": "port must be a number from 1 to 65535 or a port name such as http"}
        ])
    )]
    pub port: String,
    /// Last port of a range starting at `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    /// `TCP`, `UDP`, `SCTP` or `ANY` (the default).
    #[serde(default = "any_protocol")]
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP", "ANY"]))]
    pub protocol: String,
}

fn any_protocol() -> String {
    "ANY".into()
}

/// Written by the policy concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of identities this policy currently selects as subjects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_identities: Option<i64>,
}
