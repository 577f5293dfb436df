//! `NodeNetwork`: one per Node, the object the node-scoped concerns write into.
//!
//! Several reconcilers share its spec, each owning its own fields with its own field
//! manager (`tendril-nodes`: addresses; `tendril-ipam`: podCIDRs; `tendril-encryption`:
//! encryption). Because several managers write the spec, its revision is
//! `metadata.generation`; the agent reports the generation it realized in
//! `status.realizedRevision`.

use crate::common::{Condition, NodeAddress, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "NodeNetwork",
    plural = "nodenetworks",
    shortname = "nn",
    category = "tendril",
    status = "NodeNetworkStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Internal IP","type":"string","jsonPath":".spec.addresses[?(@.type==\"InternalIP\")].address"}"#,
    printcolumn = r#"{"name":"Pod CIDRs","type":"string","jsonPath":".spec.podCIDRs"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Realized","type":"integer","jsonPath":".status.realizedRevision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkSpec {
    /// The node's addresses, copied from `Node.status.addresses` (field manager `tendril-nodes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub addresses: Vec<NodeAddress>,
    /// Pod CIDRs allocated to this node, at most one per IP family (field manager `tendril-ipam`).
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 2),
        extend("x-kubernetes-list-type" = "atomic"),
        extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "every pod CIDR must be a CIDR such as 10.0.1.0/24"}])
    )]
    pub pod_cidrs: Vec<String>,
    /// The `PodIPPool` the pod CIDRs come from.
    #[serde(default, rename = "podIPPool", skip_serializing_if = "Option::is_none")]
    pub pod_ip_pool: Option<String>,
    /// Transparent encryption parameters of this node (field manager `tendril-encryption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<NodeEncryption>,
}

/// How traffic to and from this node is encrypted (field manager `tendril-encryption`, from
/// the `EncryptionPolicy` that selects the node).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEncryption {
    /// `IPsec` or `WireGuard`.
    #[schemars(extend("enum" = ["IPsec", "WireGuard"]))]
    pub mode: String,
    /// The `EncryptionPolicy` that selects this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// IPsec: the security parameter index currently in use (1–15, rotated on key change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 15), extend("format" = "int32"))]
    pub spi: Option<u8>,
    /// IPsec: name of the `Secret` holding the key of generation `keyEpoch` (in the IPsec
    /// keys namespace both the operator and the agents are configured with, by default
    /// `tendril-ipsec-keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret: Option<String>,
    /// IPsec, during a rotation: the security parameter index of generation `nextKeyEpoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 15), extend("format" = "int32"))]
    pub next_spi: Option<u8>,
    /// IPsec, during a rotation: the `Secret` holding the key of generation `nextKeyEpoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key_secret: Option<String>,
    /// WireGuard: this node's public key (base64) as its agent published it in
    /// `status.encryption.publicKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    /// Key generation the node's keys must be at: the agent makes a new key pair when the
    /// one it has is of an older generation (rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<i64>,
    /// During a rotation, the generation being prepared (keyEpoch + 1): the agent makes its
    /// next key pair, publishes `status.encryption.nextPublicKey`, and configures its
    /// standby device with the peers' next keys while still sending with the current ones.
    /// Once every selected node is prepared, `keyEpoch` becomes this generation and the
    /// agents switch (WireGuard: lossless, see the agent's `encryption::node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key_epoch: Option<i64>,
    /// WireGuard: UDP port of every selected node's device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<i32>,
    /// WireGuard: keepalive towards the peers (seconds, 0 off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive_seconds: Option<i32>,
    /// The other selected nodes: traffic to their pods is encrypted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub peers: Vec<EncryptionPeer>,
}

/// A node traffic is encrypted to.
#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPeer {
    /// The peer's node name.
    pub node: String,
    /// The peer's underlay address (the encrypted packets' destination).
    pub address: String,
    /// Inner destinations sent to (and accepted from) this peer: its pod CIDRs and its
    /// node address (the overlay's outer packets).
    #[serde(default, rename = "allowedIPs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub allowed_ips: Vec<String>,
    /// WireGuard: the peer's public key (base64) of generation `keyEpoch`; absent until its
    /// agent published one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// WireGuard, during a rotation: the peer's public key of generation `nextKeyEpoch`,
    /// once its agent published it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
}

/// What the node's agent can do and has done for encryption (field manager
/// `tendril-agent-encryption`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEncryptionStatus {
    /// WireGuard implementation in use: `kernel` (netlink) or `userspace` (embedded
    /// device), chosen at start from what the kernel has unless configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_implementation: Option<String>,
    /// Whether the kernel can do IPsec (ESP), probed at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec_supported: Option<bool>,
    /// Why IPsec cannot be used on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipsec_unsupported_reason: Option<String>,
    /// WireGuard: this node's public key (base64). The private key never leaves the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    /// Generation of the key pair in use (see `spec.encryption.keyEpoch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_epoch: Option<i64>,
    /// When the key pair in use was made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_created: Option<String>,
    /// During a rotation: the public key of the next generation (made, not used yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_public_key: Option<String>,
    /// Generation of `nextPublicKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key_epoch: Option<i64>,
    /// The next generation this node is ready to switch to: its standby device holds the
    /// next key of every peer, so it accepts their handshakes with either key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared_key_epoch: Option<i64>,
    /// MTU of the WireGuard device (the uplink's minus 80 unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<i32>,
    /// MTU given to pods made while encryption is on: their packets (in the overlay, with
    /// the VXLAN header) fit the device unfragmented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_mtu: Option<i32>,
    /// Peers configured with a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<i32>,
    /// Whether the node encrypts to every peer of its spec.
    #[serde(default)]
    pub ready: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Written by the node's agent (`tendril-agent`) and, for its own condition types, by the
/// nodes concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the node's datapath realizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_revision: Option<i64>,
    /// The highest `LBService` `spec.revision` whose service (and every lower revision) the
    /// node's maps realize; see `LBService`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realized_services_revision: Option<i64>,
    /// Version of the agent running on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Addresses the agent uses on the node (underlay, tunnel endpoint).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub addresses: Vec<NodeAddress>,
    /// Encryption capabilities and state of the node's agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<NodeEncryptionStatus>,
}
