//! Types and schema helpers shared by every kind.

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// Schema of a `conditions` list: a map keyed by `type`, so each field manager (the
/// operator's concern, the agent) owns its own condition entries under server-side apply.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "maxItems": 32,
    })
}

/// Schema of a list whose entries are identified by `name`, merged per entry under SSA.
pub fn named_list_schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<T>();
    json_schema!({
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    })
}

/// Schema of a set of strings (each value at most once, merged as a set under SSA).
pub fn string_set_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": { "type": "string" },
        "x-kubernetes-list-type": "set",
    })
}

/// Condition types and reasons used across kinds, so reconcilers and tests agree.
pub mod conditions {
    /// The object is fully realized / usable.
    pub const READY: &str = "Ready";
    /// The intent object was accepted (valid and supported).
    pub const VALID: &str = "Valid";
    /// The datapath on the node realizes the object's current revision.
    pub const REALIZED: &str = "Realized";
}

/// An address of a node, as in `Node.status.addresses`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, `InternalDNS` or `ExternalDNS`.
    #[serde(rename = "type")]
    pub type_: String,
    pub address: String,
}
