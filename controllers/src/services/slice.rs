//! [`SliceInfo`]: the EndpointSlice as the operator's cache holds it — the fields the
//! services and bgp concerns read, decoded straight from the watch, node names and zones
//! interned.
//!
//! `k8s_openapi`'s `Endpoint` is 352 bytes inline (its `targetRef` alone 168) before any of
//! its strings: a slice of 20 endpoints held ~9 KiB, and with 10k Services the slice cache
//! was the operator's largest per-Service cost after the LBServices themselves. Here an
//! endpoint is its addresses, its three conditions and two shared names (~0.1 KiB with
//! its address).

use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};
use std::sync::{Arc, LazyLock};
use tendril_runtime::intern::Interner;

/// An EndpointSlice as the operator reads it (same API kind and field names; unknown
/// fields are skipped while decoding).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceInfo {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub address_type: String,
    #[serde(default)]
    pub ports: Option<Vec<EndpointPort>>,
    /// `null` from the apiserver for a slice without endpoints.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub endpoints: Vec<SliceEndpoint>,
}

/// What is read of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default, deserialize_with = "null_as_empty")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default, deserialize_with = "interned")]
    pub node_name: Option<Arc<str>>,
    #[serde(default, deserialize_with = "interned")]
    pub zone: Option<Arc<str>>,
}

impl SliceEndpoint {
    /// `ready` unset counts as ready, as the EndpointSlice API says and kube-proxy does.
    pub fn ready(&self) -> bool {
        self.conditions
            .as_ref()
            .and_then(|c| c.ready)
            .unwrap_or(true)
    }
}

/// The node names and zones of every slice, each held once: they are few (one per node and
/// zone of the cluster) and repeated in every slice.
static NAMES: LazyLock<Interner<str>> = LazyLock::new(Interner::new);

/// The one shared copy of `name`.
pub fn intern(name: &str) -> Arc<str> {
    NAMES.intern(name)
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn interned<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    let name: Option<std::borrow::Cow<'de, str>> = Option::deserialize(d)?;
    Ok(name.map(|n| intern(&n)))
}

slim_resource!(SliceInfo, EndpointSlice);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_is_read_and_shares_names() {
        let json = |name: &str| {
            serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": "ns",
                    "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "node-a", "zone": "z1",
                    "conditions": {"ready": false, "serving": true, "terminating": true},
                    "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "ns"},
                    "hostname": "h"},
                    {"addresses": ["10.0.0.2"]}]
            })
        };
        let a: SliceInfo = serde_json::from_value(json("a")).unwrap();
        let b: SliceInfo = serde_json::from_value(json("b")).unwrap();
        assert_eq!(a.address_type, "IPv4");
        assert_eq!(a.ports.as_ref().unwrap()[0].port, Some(8080));
        let e = &a.endpoints[0];
        assert_eq!(e.addresses, ["10.0.0.1"]);
        assert_eq!(e.node_name.as_deref(), Some("node-a"));
        assert_eq!(e.zone.as_deref(), Some("z1"));
        assert!(!e.ready());
        assert_eq!(e.conditions.as_ref().unwrap().terminating, Some(true));
        assert!(a.endpoints[1].ready(), "unset readiness is ready");
        assert_eq!(a.endpoints[1].node_name, None);
        assert!(
            Arc::ptr_eq(
                a.endpoints[0].node_name.as_ref().unwrap(),
                b.endpoints[0].node_name.as_ref().unwrap()
            ),
            "one copy of a node name"
        );
        let full: EndpointSlice = serde_json::from_value(json("a")).unwrap();
        assert_eq!(SliceInfo::from(&full), a);
        // The apiserver writes `null` for a slice without endpoints (the `kubernetes`
        // Service's, a selector-less Service's).
        let mut empty = json("c");
        empty["endpoints"] = serde_json::Value::Null;
        empty["ports"] = serde_json::Value::Null;
        let c: SliceInfo = serde_json::from_value(empty).unwrap();
        assert!(c.endpoints.is_empty() && c.ports.is_none());
    }
}
