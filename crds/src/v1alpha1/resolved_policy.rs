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
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = port_list::keep_former_field)]
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
    /// Ports the entry covers; empty means every port and protocol. Written as one string,
    /// `portSet` ([`port_list`]): the API server handles a 10,000-port string in
    /// milliseconds where a list of 10,000 objects took it most of a second per write.
    /// Read from `portSet` or from the former `ports` list of objects (objects written by
    /// an older operator; the schema keeps that field, so they keep their ports, and the
    /// next apply replaces it with `portSet`).
    #[serde(
        rename = "portSet",
        default,
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "port_list::serialize"
    )]
    #[schemars(schema_with = "port_list::schema")]
    pub ports: Vec<ResolvedPort>,
}

/// A rule as stored: `portSet` from this operator on, `ports` from older ones (or both,
/// if another field manager left `ports`: `portSet` is the one this operator wrote).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRule {
    verdict: Verdict,
    #[serde(default)]
    peers: Vec<i64>,
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default, deserialize_with = "port_list::deserialize")]
    port_set: Vec<ResolvedPort>,
    #[serde(default)]
    ports: Vec<ResolvedPort>,
}

impl<'de> Deserialize<'de> for ResolvedRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stored = StoredRule::deserialize(d)?;
        Ok(ResolvedRule {
            verdict: stored.verdict,
            peers: stored.peers,
            cidrs: stored.cidrs,
            ports: if stored.port_set.is_empty() {
                stored.ports
            } else {
                stored.port_set
            },
        })
    }
}

/// `ResolvedRule.ports` on the wire: groups separated by one space, each `PROTOCOL:` and
/// its items separated by commas, in the list's order (consecutive ports of one protocol
/// share a group); an item is `N` (one port; `0` = every port of the protocol), `N-M` (a
/// range) or a port name (which always has a letter). For example
/// `TCP:80,443,8000-8080 UDP:53 ANY:dns`. About 6 bytes a port instead of ~32 as objects.
/// A rule stored with the former list of objects (`ports`) still reads.
pub mod port_list {
    use super::{Protocol, ResolvedPort};
    use schemars::{Schema, SchemaGenerator, json_schema};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::fmt::Write as _;

    /// What the API server checks (one regular expression, linear in the length).
    pub const PATTERN: &str = "^(ANY|SCTP|TCP|UDP):[0-9A-Za-z-]+(,[0-9A-Za-z-]+)*( (ANY|SCTP|TCP|UDP):[0-9A-Za-z-]+(,[0-9A-Za-z-]+)*)*$";

    /// Adds the former field `ports` (a list of objects) to a rule's schema: objects
    /// stored with it keep their ports on read (the API server prunes what the schema
    /// does not name) and stay typed for server-side apply.
    pub fn keep_former_field(schema: &mut Schema) {
        let former = json_schema!({
            "type": "array",
            "x-kubernetes-list-type": "atomic",
            "description": "The former form of `portSet` (a list of objects), written by older operators; read, never written.",
            "items": {
                "type": "object",
                "required": ["protocol"],
                "properties": {
                    "port": {"type": "integer", "format": "int32", "minimum": 0.0, "maximum": 65535.0},
                    "endPort": {"type": "integer", "format": "int32", "nullable": true, "minimum": 1.0, "maximum": 65535.0},
                    "name": {"type": "string", "nullable": true, "maxLength": 15},
                    "protocol": {"type": "string", "enum": ["ANY", "SCTP", "TCP", "UDP"]},
                },
            },
        });
        if let Some(properties) = schema.get_mut("properties").and_then(|p| p.as_object_mut()) {
            properties.insert("ports".into(), former.into());
        }
    }

    pub fn schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "description": "Ports the entry covers; absent (and no `ports`) means every port and protocol. Groups separated by a space, each `PROTOCOL:` (TCP, UDP, SCTP or ANY) and comma-separated items: `N` (one port; 0 = every port of the protocol), `N-M` (a range) or a port name, e.g. `TCP:80,443,8000-8080 UDP:53 ANY:dns`.",
        })
    }

    /// The wire form of `ports`.
    pub fn encode(ports: &[ResolvedPort]) -> String {
        let mut out = String::with_capacity(ports.len() * 7);
        let mut group = None;
        for p in ports {
            if group == Some(p.protocol) {
                out.push(',');
            } else {
                if group.is_some() {
                    out.push(' ');
                }
                out.push_str(p.protocol.as_str());
                out.push(':');
                group = Some(p.protocol);
            }
            match (&p.name, p.end_port) {
                (Some(name), _) => out.push_str(name),
                (None, Some(end)) => {
                    let _ = write!(out, "{}-{end}", p.port);
                }
                (None, None) => {
                    let _ = write!(out, "{}", p.port);
                }
            }
        }
        out
    }

    /// The ports of a wire form, with what is wrong in it.
    pub fn decode(text: &str) -> Result<Vec<ResolvedPort>, String> {
        let mut out = Vec::new();
        for group in text.split(' ').filter(|g| !g.is_empty()) {
            let (protocol, items) = group
                .split_once(':')
                .ok_or_else(|| format!("port group {group:?} has no `PROTOCOL:`"))?;
            let protocol: Protocol = protocol.parse()?;
            for item in items.split(',') {
                out.push(decode_item(protocol, item)?);
            }
        }
        Ok(out)
    }

    fn decode_item(protocol: Protocol, item: &str) -> Result<ResolvedPort, String> {
        let number = |s: &str| {
            s.parse::<i32>()
                .ok()
                .filter(|n| (0..=65535).contains(n))
                .ok_or_else(|| format!("port {s:?} is not a number from 0 to 65535"))
        };
        let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if numeric(item) {
            return Ok(ResolvedPort {
                port: number(item)?,
                end_port: None,
                name: None,
                protocol,
            });
        }
        if let Some((start, end)) = item.split_once('-')
            && numeric(start)
            && numeric(end)
        {
            return Ok(ResolvedPort {
                port: number(start)?,
                end_port: Some(number(end)?),
                name: None,
                protocol,
            });
        }
        if item.is_empty() || !item.bytes().any(|b| b.is_ascii_alphabetic()) {
            return Err(format!("port item {item:?} is neither N, N-M nor a name"));
        }
        Ok(ResolvedPort {
            port: 0,
            end_port: None,
            name: Some(item.to_string()),
            protocol,
        })
    }

    pub fn serialize<S: Serializer>(ports: &[ResolvedPort], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode(ports))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ResolvedPort>, D::Error> {
        decode(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn port(
        protocol: Protocol,
        port: i32,
        end_port: Option<i32>,
        name: Option<&str>,
    ) -> ResolvedPort {
        ResolvedPort {
            port,
            end_port,
            name: name.map(str::to_string),
            protocol,
        }
    }

    #[test]
    fn ports_travel_as_one_string_and_come_back_in_order() {
        let ports = vec![
            port(Protocol::Tcp, 80, None, None),
            port(Protocol::Tcp, 8000, Some(8080), None),
            port(Protocol::Udp, 0, None, None),
            port(Protocol::Any, 0, None, Some("http-alt")),
            port(Protocol::Any, 0, None, Some("8080-web")),
            port(Protocol::Tcp, 443, Some(443), None),
        ];
        let text = port_list::encode(&ports);
        assert_eq!(
            text,
            "TCP:80,8000-8080 UDP:0 ANY:http-alt,8080-web TCP:443-443"
        );
        assert_eq!(port_list::decode(&text).unwrap(), ports);
        let rule = ResolvedRule {
            verdict: Verdict::Allow,
            peers: vec![1],
            cidrs: vec![],
            ports: ports.clone(),
        };
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(json["portSet"], serde_json::json!(text));
        assert!(json.get("ports").is_none());
        assert_eq!(serde_json::from_value::<ResolvedRule>(json).unwrap(), rule);
        // No ports: no field (every port and protocol).
        let every = ResolvedRule::default();
        assert!(
            serde_json::to_value(&every)
                .unwrap()
                .get("portSet")
                .is_none()
        );
    }

    #[test]
    fn the_former_list_of_objects_still_reads() {
        let rule: ResolvedRule = serde_json::from_value(serde_json::json!({
            "verdict": "Allow",
            "ports": [{"port": 80, "protocol": "TCP"}, {"name": "dns", "protocol": "UDP"}],
        }))
        .unwrap();
        assert_eq!(
            rule.ports,
            vec![
                port(Protocol::Tcp, 80, None, None),
                port(Protocol::Udp, 0, None, Some("dns"))
            ]
        );
    }

    #[test]
    fn the_string_wins_over_a_former_list_left_beside_it() {
        let rule: ResolvedRule = serde_json::from_value(serde_json::json!({
            "verdict": "Deny",
            "portSet": "UDP:53",
            "ports": [{"port": 80, "protocol": "TCP"}],
        }))
        .unwrap();
        assert_eq!(rule.ports, vec![port(Protocol::Udp, 53, None, None)]);
    }

    #[test]
    fn a_malformed_port_string_says_what_is_wrong() {
        for (text, says) in [
            ("80", "no `PROTOCOL:`"),
            ("XTP:80", "unknown protocol"),
            ("TCP:70000", "0 to 65535"),
            ("TCP:80,", "neither N, N-M nor a name"),
            ("TCP:1-2-3", "neither N, N-M nor a name"),
        ] {
            let err = port_list::decode(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
