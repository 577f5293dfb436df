//! `ResolvedPolicy` (desired state, cluster-scoped): everything the policies say about one
//! subject identity, resolved to numeric peer identities, CIDRs and port ranges. One per
//! subject identity; its name is the identity's decimal id.
//!
//! Written by the policy concern (field manager `tendril-policy`) from `NetworkPolicy`,
//! `ClusterNetworkPolicy`, `networking.k8s.io/NetworkPolicy` and `Identity`. The agent
//! programs it into the per-endpoint policy map of every local endpoint with that identity
//! and reports the revision in `Endpoint.status.realizedPolicyRevision`.
//!
//! Semantics the datapath implements: a deny entry wins over an allow entry; in a direction
//! with `defaultDeny` set, traffic no allow entry matches is dropped, otherwise it is allowed.
//! Peer identity `0` stands for any peer; an entry without ports covers every port and protocol.

use crate::common::{Condition, conditions_schema};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "tendril.dev",
    version = "v1alpha1",
    kind = "ResolvedPolicy",
    plural = "resolvedpolicies",
    shortname = "trp",
    category = "tendril",
    status = "ResolvedPolicyStatus",
    derive = "Default",
    derive = "PartialEq",
    validation = Rule::new("self.metadata.name == string(self.spec.identity)").message("the name of a ResolvedPolicy must be its subject identity in decimal"),
    printcolumn = r#"{"name":"Identity","type":"integer","jsonPath":".spec.identity"}"#,
    printcolumn = r#"{"name":"Default Deny Ingress","type":"boolean","jsonPath":".spec.defaultDeny.ingress"}"#,
    printcolumn = r#"{"name":"Default Deny Egress","type":"boolean","jsonPath":".spec.defaultDeny.egress"}"#,
    printcolumn = r#"{"name":"Revision","type":"integer","jsonPath":".spec.revision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPolicySpec {
    /// The subject identity the entries apply to. Immutable.
    #[schemars(
        range(min = 1, max = 65535),
        extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": "spec.identity is immutable"}])
    )]
    pub identity: i64,
    /// Increases on every change of this spec; endpoints report the one they enforce.
    #[schemars(range(min = 0))]
    pub revision: i64,
    /// Which directions drop traffic that no allow entry matches.
    #[serde(default)]
    pub default_deny: ResolvedDefaultDeny,
    /// Entries for traffic into the subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16384), extend("x-kubernetes-list-type" = "atomic"))]
    pub ingress: Vec<ResolvedRule>,
    /// Entries for traffic out of the subject.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16384), extend("x-kubernetes-list-type" = "atomic"))]
    pub egress: Vec<ResolvedRule>,
    /// The policies these entries come from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub sources: Vec<PolicySource>,
}

/// Whether a direction is in default deny.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedDefaultDeny {
    #[serde(default)]
    pub ingress: bool,
    #[serde(default)]
    pub egress: bool,
}

/// Peers × ports × verdict.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedRule {
    pub verdict: Verdict,
    /// Peer identities (`0` = any peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 0, max = 65535)), extend("x-kubernetes-list-type" = "atomic"))]
    pub peers: Vec<i64>,
    /// Peer CIDRs outside the cluster; each node derives node-local CIDR identities from them.
    /// (Validated at the source policies; no CEL here, whose cost would scale with every rule.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(max = 43)), extend("x-kubernetes-list-type" = "atomic"))]
    pub cidrs: Vec<String>,
    /// Ports the entry covers; empty means every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "atomic"))]
    pub ports: Vec<ResolvedPort>,
}

/// A port range and protocol; a named port is kept by name and resolved per endpoint by the agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPort {
    /// First port (0 with no `name` = every port of `protocol`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 65535))]
    pub port: i32,
    /// Last port of the range (absent = just `port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    /// A named port, resolved against the endpoint's `namedPorts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 15))]
    pub name: Option<String>,
    pub protocol: Protocol,
}

/// What a rule does with the traffic it matches. `Allow` or `Deny`.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "Allow",
            Verdict::Deny => "Deny",
        }
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Verdict::Allow, Verdict::Deny]
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown verdict {s:?} (Allow or Deny)"))
    }
}

/// The protocol of a port: `TCP`, `UDP`, `SCTP` or `ANY` (all three).
// Variants in the order their names sort: the resolver's canonical form relies on it.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Any,
    Sctp,
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    /// The protocols a port of this protocol covers.
    pub const fn expand(self) -> &'static [Protocol] {
        match self {
            Protocol::Any => &[Protocol::Sctp, Protocol::Tcp, Protocol::Udp],
            Protocol::Sctp => &[Protocol::Sctp],
            Protocol::Tcp => &[Protocol::Tcp],
            Protocol::Udp => &[Protocol::Udp],
        }
    }

    /// The IANA protocol number (`None` for `ANY`).
    pub const fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Sctp => Some(132),
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Any => "ANY",
            Protocol::Sctp => "SCTP",
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    /// Parses a protocol name as written in policies (`TCP`, `UDP`, `SCTP`, `ANY`).
    pub fn parse(name: &str) -> Option<Protocol> {
        [Protocol::Any, Protocol::Sctp, Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Protocol::parse(s).ok_or_else(|| format!("unknown protocol {s:?} (TCP, UDP, SCTP or ANY)"))
    }
}

/// The kind of policy a `ResolvedPolicy` entry came from: `NetworkPolicy` (tendril.dev),
/// `ClusterNetworkPolicy` or `KubernetesNetworkPolicy` (networking.k8s.io).
// Variants in the order their names sort, as the sources are sorted.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    JsonSchema,
)]
pub enum PolicySourceKind {
    ClusterNetworkPolicy,
    KubernetesNetworkPolicy,
    #[default]
    NetworkPolicy,
}

impl PolicySourceKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            PolicySourceKind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            PolicySourceKind::KubernetesNetworkPolicy => "KubernetesNetworkPolicy",
            PolicySourceKind::NetworkPolicy => "NetworkPolicy",
        }
    }
}

impl std::fmt::Display for PolicySourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy that contributed entries.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySource {
    pub kind: PolicySourceKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The source object's `metadata.generation` that was resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

/// Written by the policy concern.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
