//! `Identity` (desired state, cluster-scoped): a numeric security identity and the security
//! label set it stands for, like Cilium's `CiliumIdentity`.
//!
//! The object's name is the decimal id (`256`), so two allocators racing for the same id
//! collide on `create` and exactly one wins. Ids follow Cilium's numbering: 1–8 are the
//! reserved identities (host, world, unmanaged, health, init, remote-node, kube-apiserver,
//! ingress), 256–65535 are cluster identities. Both the id and the labels are immutable: an
//! identity is never re-pointed at other labels while anything references it.
//!
//! Written by the identities concern (field manager `tendril-identities`); it also maintains
//! `status.references` and `status.lastReferenced` for garbage collection after a grace period.

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "Identity",
    plural = "identities",
    shortname = "tid",
    category = "tendril",
    status = "IdentityStatus",
    derive = "Default",
    derive = "PartialEq",
    validation = Rule::new("self.metadata.name == string(self.spec.id)").message("the name of an Identity must be its id in decimal (spec.id 300 → name \"300\")"),
    printcolumn = r#"{"name":"ID","type":"integer","jsonPath":".spec.id"}"#,
    printcolumn = r#"{"name":"Labels","type":"string","priority":1,"jsonPath":".spec.securityLabels"}"#,
    printcolumn = r#"{"name":"References","type":"integer","jsonPath":".status.references"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    /// The numeric identity: 1–8 reserved, 256–65535 cluster identities. Immutable.
    #[schemars(
        range(min = 1, max = 65535),
        extend("x-kubernetes-validations" = [
            {"rule": "self == oldSelf", "message": "spec.id is immutable"},
            {"rule": "self <= 8 || self >= 256", "message": "spec.id must be a reserved identity (1-8) or a cluster identity (256-65535)"}
        ])
    )]
    pub id: i64,
    /// The security label set this identity stands for. Immutable.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "x-kubernetes-validations" = [
            {"rule": "self == oldSelf", "message": "spec.securityLabels is immutable: an identity never changes its labels"}
        ]
    ))]
    pub security_labels: BTreeMap<String, String>,
}

/// Written by the identities concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// Number of endpoints that use this identity.
    #[serde(default)]
    pub references: i64,
    /// When the last endpoint stopped using this identity (absent while referenced); the
    /// identity is deleted after a grace period from this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_referenced: Option<Time>,
}
