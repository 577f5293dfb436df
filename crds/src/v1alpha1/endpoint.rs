//! `Endpoint` (desired state, namespaced): one per pod, like Cilium's `CiliumEndpoint`.
//!
//! Written by the endpoints concern (field manager `tendril-endpoints`) from the Pod and its
//! Namespace; the identities concern fills `spec.identity`. The agent of `spec.node` reports
//! in `status` which revision of the endpoint, and of the policy of its identity, its kernel
//! state realizes.

use crate::common::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "Endpoint",
    plural = "endpoints",
    shortname = "tep",
    category = "tendril",
    namespaced,
    status = "EndpointStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"IPs","type":"string","jsonPath":".spec.ips"}"#,
    printcolumn = r#"{"name":"Identity","type":"integer","jsonPath":".spec.identity"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Realized","type":"integer","jsonPath":".status.realizedRevision"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","description":"The Realized condition: the node's datapath realizes the endpoint","jsonPath":".status.conditions[?(@.type==\"Realized\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// Name of the Node the pod runs on.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// The pod's IPs, at most one per family.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 2),
        inner(length(max = 45)),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [
            {"rule": "self.all(ip, isIP(ip))", "message": "every entry of ips must be an IP address such as 10.244.1.7"}
        ])
    )]
    pub ips: Vec<String>,
    /// The security-relevant labels of the pod (pod labels after the identity label filter,
    /// plus the namespace label), which determine its identity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub security_labels: BTreeMap<String, String>,
    /// The numeric security identity for `securityLabels`, once allocated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub identity: Option<i64>,
    /// Container ports with a name, so policies can refer to them by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        schema_with = "crate::common::named_list_schema::<NamedPort>",
        length(max = 128)
    )]
    pub named_ports: Vec<NamedPort>,
    /// The pod's service account.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
    /// The workload that runs the pod, from its controller owner: a Deployment for a pod of
    /// a ReplicaSet the Deployment made, a CronJob for one of a Job a CronJob made, else the
    /// owner itself (StatefulSet, DaemonSet, Job, ...). Absent for a pod without one. Flows
    /// name it (Hubble's `workloads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<EndpointWorkload>,
    /// The uid of the Pod this Endpoint is for. An Endpoint has no owner reference (the
    /// garbage collector would race the operator's own delete, one more apiserver request
    /// per pod); the operator deletes it with its pod, and sweeps Endpoints whose pod is gone.
    #[serde(default, rename = "podUID", skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 128))]
    pub pod_uid: String,
    /// Increases on every change of this spec; the agent reports the one it realizes.
    #[schemars(range(min = 0))]
    pub revision: i64,
}

/// The workload of a pod: kind and name, e.g. `Deployment` `web`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointWorkload {
    /// The owner's kind, e.g. `Deployment`, `StatefulSet`, `DaemonSet`, `CronJob`, `Job`.
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A named container port.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    /// IANA service name (at most 15 characters, e.g. `http`).
    #[schemars(length(min = 1, max = 15))]
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `TCP`, `UDP` or `SCTP`.
    #[schemars(extend("enum" = ["TCP", "UDP", "SCTP"]))]
    pub protocol: String,
}

/// Written by the agent of `spec.node`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `spec.revision` the node's datapath realizes for this endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_revision: Option<i64>,
    /// The `ResolvedPolicy.spec.revision` of the endpoint's identity that the datapath enforces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_policy_revision: Option<i64>,
}
