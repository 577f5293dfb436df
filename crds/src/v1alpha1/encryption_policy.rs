//! `EncryptionPolicy` (intent, cluster-scoped): transparent encryption of pod traffic
//! between the selected nodes, with IPsec or WireGuard.
//!
//! The encryption concern generates and rotates keys (IPsec: key `Secret`s and the SPI in
//! `NodeNetwork.spec.encryption`; WireGuard: agents publish their public keys there).

use crate::common::{Condition, conditions_schema};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "EncryptionPolicy",
    plural = "encryptionpolicies",
    shortname = "tencp",
    category = "tendril",
    status = "EncryptionPolicyStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.encryptedNodes"}"#,
    printcolumn = r#"{"name":"Last Rotation","type":"date","jsonPath":".status.lastKeyRotation"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode == 'IPsec' || !has(self.ipsec)", "message": "ipsec settings need mode IPsec"},
    {"rule": "self.mode == 'WireGuard' || !has(self.wireguard)", "message": "wireguard settings need mode WireGuard"}
]))]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPolicySpec {
    /// `IPsec` or `WireGuard`.
    #[schemars(extend("enum" = ["IPsec", "WireGuard"]))]
    pub mode: String,
    /// Nodes whose traffic is encrypted; absent selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// How often keys are rotated (at least 60 s; default 86400).
    #[serde(default = "day")]
    #[schemars(range(min = 60))]
    pub key_rotation_interval_seconds: i64,
    /// IPsec settings (mode `IPsec` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec: Option<IPsecSettings>,
    /// WireGuard settings (mode `WireGuard` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<WireGuardSettings>,
    /// Traffic between a selected node and a node no policy selects (but that runs an
    /// agent): `Encrypt` (the default: that node encrypts to this policy's nodes and they to
    /// it; two unselected nodes still talk in clear) or `Clear` (sent in clear both ways).
    /// The oldest policy that encrypts it takes an unselected node.
    #[serde(default = "encrypt")]
    #[schemars(extend("enum" = ["Encrypt", "Clear"]))]
    pub unselected_nodes: String,
}

fn encrypt() -> String {
    "Encrypt".into()
}

fn day() -> i64 {
    86400
}

/// IPsec settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPsecSettings {
    /// XFRM algorithm: `rfc4106(gcm(aes))` (AEAD, the default), or `cbc(aes)` with
    /// `hmac(sha256)` / `hmac(sha512)` authentication.
    #[serde(default = "gcm")]
    #[schemars(extend("enum" = ["rfc4106(gcm(aes))", "cbc(aes)+hmac(sha256)", "cbc(aes)+hmac(sha512)"]))]
    pub algorithm: String,
    /// Encryption key length in bits (128 or 256, default 128).
    #[serde(default = "key_bits")]
    #[schemars(extend("enum" = [128, 256]))]
    pub key_bits: i32,
}

fn gcm() -> String {
    "rfc4106(gcm(aes))".into()
}

fn key_bits() -> i32 {
    128
}

/// WireGuard settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardSettings {
    /// Keepalive interval towards peers (0 disables; 0–65535).
    #[serde(default)]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive_seconds: i32,
    /// UDP port of the WireGuard device (default 51871).
    #[serde(default = "wg_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: i32,
}

fn wg_port() -> i32 {
    51871
}

/// Written by the encryption concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes that realize encryption under this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_nodes: Option<i64>,
    /// When keys were last rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_key_rotation: Option<Time>,
    /// IPsec: the SPI of the current key (1–15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "currentSPI")]
    pub current_spi: Option<i32>,
    /// WireGuard: the key generation nodes use (raised when a rotation completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<i64>,
    /// WireGuard, while a rotation is under way: the generation every selected node
    /// prepares (next key pair made and known to every peer) before they all switch to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key_epoch: Option<i64>,
    /// The `tendril.dev/rotation-request` annotation value last served (a new value
    /// rotates the keys at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_request: Option<String>,
    /// Per selected node: whether it encrypts to every peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub nodes: Vec<EncryptionNodeState>,
}

/// One selected node's readiness.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionNodeState {
    pub name: String,
    pub ready: bool,
    /// `Ready`, `NoKey` (no public key published yet), `KeyOutdated`, `Unsupported`,
    /// `NoAddress`, `NotRealized`.
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
