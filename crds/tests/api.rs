//! The API crate's own checks: every kind generates a structural CRD with the conventions
//! every Tendril kind follows, the committed manifests are what the types generate, and the
//! example objects round-trip through the Rust types without losing a field.
//!
//! The real apiserver's verdict on the same manifests is `e2e/tests/crd_validation.rs`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use pretty_assertions::assert_eq;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tendril_crds::v1alpha1::*;
use tendril_crds::{all_crds, manifest_file_name, render_crd, render_kustomization};

const KINDS: [&str; 14] = [
    "PodIPPool",
    "LoadBalancerIPPool",
    "NetworkPolicy",
    "ClusterNetworkPolicy",
    "BGPPeeringPolicy",
    "EgressGatewayPolicy",
    "EncryptionPolicy",
    "NodeNetwork",
    "Endpoint",
    "Identity",
    "ResolvedPolicy",
    "LBService",
    "BGPNodeConfig",
    "EgressRoute",
];

/// Desired-state kinds carrying `spec.revision` (NodeNetwork uses `metadata.generation`,
/// see its module). The realization of a `ResolvedPolicy` is reported per endpoint, in
/// `Endpoint.status.realizedPolicyRevision`; the others report `status.realizedRevision`.
const REVISIONED: [&str; 5] = [
    "Endpoint",
    "ResolvedPolicy",
    "LBService",
    "BGPNodeConfig",
    "EgressRoute",
];

const NAMESPACED: [&str; 3] = ["NetworkPolicy", "Endpoint", "LBService"];

/// The formats the apiserver knows; anything else draws an "unrecognized format" warning.
const FORMATS: [&str; 6] = ["int32", "int64", "float", "double", "date-time", "date"];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema_of(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version.schema.as_ref().expect("schema");
    serde_json::to_value(schema.open_api_v3_schema.as_ref().expect("openAPIV3Schema")).unwrap()
}

/// Walks a schema and reports what a structural schema forbids, where it is.
fn structural_problems(schema: &Value, path: &str, problems: &mut Vec<String>) {
    let obj = schema.as_object().expect("schema node is an object");
    let escape = obj.contains_key("x-kubernetes-int-or-string")
        || obj.contains_key("x-kubernetes-preserve-unknown-fields");
    if !obj.contains_key("type") && !escape {
        problems.push(format!("{path}: no type"));
    }
    for forbidden in [
        "$ref",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
    ] {
        if obj.contains_key(forbidden) {
            problems.push(format!("{path}: {forbidden}"));
        }
    }
    if let Some(format) = obj.get("format").and_then(Value::as_str)
        && !FORMATS.contains(&format)
    {
        problems.push(format!("{path}: unknown format {format}"));
    }
    if let Some(rules) = obj
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            if rule
                .get("message")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                problems.push(format!(
                    "{path}: CEL rule {} without a message",
                    rule["rule"]
                ));
            }
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            structural_problems(sub, &format!("{path}.{name}"), problems);
        }
    }
    if let Some(items) = obj.get("items") {
        structural_problems(items, &format!("{path}[]"), problems);
    }
    if let Some(additional) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        structural_problems(additional, &format!("{path}{{}}"), problems);
    }
}

#[test]
fn every_kind_generates_a_structural_crd() {
    let crds = all_crds();
    let kinds: Vec<&str> = crds.iter().map(|c| c.spec.names.kind.as_str()).collect();
    assert_eq!(kinds, KINDS);
    for crd in &crds {
        let mut problems = Vec::new();
        structural_problems(&schema_of(crd), &crd.spec.names.kind, &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

#[test]
fn every_kind_follows_the_tendril_conventions() {
    let mut short_names = BTreeSet::new();
    let mut plurals = BTreeSet::new();
    for crd in all_crds() {
        let kind = crd.spec.names.kind.clone();
        assert_eq!(crd.spec.group, "tendril.dev", "{kind}");
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(format!("{}.tendril.dev", crd.spec.names.plural).as_str())
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["tendril".to_string()][..]),
            "{kind}"
        );
        let shorts = crd.spec.names.short_names.clone().unwrap_or_default();
        assert_eq!(shorts.len(), 1, "{kind} has one short name");
        assert!(
            short_names.insert(shorts[0].clone()),
            "{kind}: short name {} taken",
            shorts[0]
        );
        assert!(plurals.insert(crd.spec.names.plural.clone()));
        let scope = if NAMESPACED.contains(&kind.as_str()) {
            "Namespaced"
        } else {
            "Cluster"
        };
        assert_eq!(crd.spec.scope, scope, "{kind}");

        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let subresources = version.subresources.as_ref().expect("subresources");
        assert!(
            subresources.status.is_some(),
            "{kind} has a status subresource"
        );
        let columns = version
            .additional_printer_columns
            .as_ref()
            .expect("printer columns");
        assert!(columns.len() >= 3, "{kind} has useful printer columns");
        assert!(
            columns
                .iter()
                .any(|c| c.json_path == ".metadata.creationTimestamp")
        );

        let schema = schema_of(&crd);
        let conditions = &schema["properties"]["status"]["properties"]["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{kind} status.conditions"
        );
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert!(
            conditions["items"]["properties"]
                .get("observedGeneration")
                .is_some(),
            "{kind} conditions carry observedGeneration"
        );
        if REVISIONED.contains(&kind.as_str()) {
            let spec = &schema["properties"]["spec"];
            assert_eq!(
                spec["properties"]["revision"]["type"], "integer",
                "{kind} spec.revision"
            );
            assert!(
                spec["required"]
                    .as_array()
                    .unwrap()
                    .contains(&"revision".into()),
                "{kind} spec.revision is required"
            );
        }
        // ResolvedPolicy and LBService say it with a `Realized` condition (an LBService's
        // is judged after a deadline, so a backend change writes no status).
        let realized = schema["properties"]["status"]["properties"].get(match kind.as_str() {
            "ResolvedPolicy" | "LBService" => "conditions",
            _ => "realizedRevision",
        });
        if REVISIONED.contains(&kind.as_str()) || kind == "NodeNetwork" {
            assert!(
                realized.is_some(),
                "{kind} status reports the realized revision"
            );
        }
    }
}

#[test]
fn committed_manifests_are_what_the_types_generate() {
    let dir = crate_dir().join("manifests");
    let crds = all_crds();
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for crd in &crds {
        let file = manifest_file_name(crd);
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_else(|e| {
            panic!("{file}: {e}; run `cargo run -p tendril-crds --bin tendril-crdgen`")
        });
        assert_eq!(
            committed,
            render_crd(crd),
            "{file} is stale; run `cargo run -p tendril-crds --bin tendril-crdgen`"
        );
        // What is committed parses back into the same definition.
        let parsed: CustomResourceDefinition = serde_saphyr::from_str(&committed).unwrap();
        assert_eq!(&parsed, crd);
        expected.insert(file);
    }
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    assert_eq!(kustomization, render_kustomization(&crds));
    expected.insert("kustomization.yaml".into());
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present, expected,
        "crds/manifests holds exactly the generated files"
    );

    // `kubectl apply -k crds/` goes through the root kustomization to manifests/.
    let root: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(crate_dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(root["resources"], serde_json::json!(["manifests"]));
}

/// Every key and value of `original` is in `round_tripped` (which may add defaults).
fn missing_fields(original: &Value, round_tripped: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => missing_fields(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                missing_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn round_trip<K>(file: &str) -> String
where
    K: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let yaml = std::fs::read_to_string(crate_dir().join("examples").join(file)).unwrap();
    let original: Value = serde_saphyr::from_str(&yaml).unwrap();
    let typed: K = serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{file}: {e}"));
    let json = serde_json::to_value(&typed).unwrap();
    let mut missing = Vec::new();
    missing_fields(&original, &json, "", &mut missing);
    assert!(
        missing.is_empty(),
        "{file}: the Rust type drops or changes {missing:?}"
    );
    let again: K = serde_json::from_value(json).unwrap();
    assert_eq!(again, typed, "{file}");
    original["kind"].as_str().unwrap().to_string()
}

#[test]
fn every_example_round_trips_through_its_type() {
    let kinds = vec![
        round_trip::<PodIPPool>("podippool.yaml"),
        round_trip::<LoadBalancerIPPool>("loadbalancerippool.yaml"),
        round_trip::<NetworkPolicy>("networkpolicy.yaml"),
        round_trip::<ClusterNetworkPolicy>("clusternetworkpolicy.yaml"),
        round_trip::<BGPPeeringPolicy>("bgppeeringpolicy.yaml"),
        round_trip::<EgressGatewayPolicy>("egressgatewaypolicy.yaml"),
        round_trip::<EncryptionPolicy>("encryptionpolicy.yaml"),
        round_trip::<NodeNetwork>("nodenetwork.yaml"),
        round_trip::<Endpoint>("endpoint.yaml"),
        round_trip::<Identity>("identity.yaml"),
        round_trip::<ResolvedPolicy>("resolvedpolicy.yaml"),
        round_trip::<LBService>("lbservice.yaml"),
        round_trip::<BGPNodeConfig>("bgpnodeconfig.yaml"),
        round_trip::<EgressRoute>("egressroute.yaml"),
    ];
    assert_eq!(kinds, KINDS);
    let files = std::fs::read_dir(crate_dir().join("examples"))
        .unwrap()
        .count();
    assert_eq!(files, 14, "one example per kind");
}

#[test]
fn status_round_trips_with_the_documented_field_names() {
    let status = PodIPPoolStatus {
        observed_generation: Some(3),
        allocated_cidrs: 4,
        available_cidrs: 252,
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&status).unwrap(),
        serde_json::json!({"observedGeneration": 3, "allocatedCIDRs": 4, "availableCIDRs": 252})
    );
    let status = EndpointStatus {
        realized_revision: Some(4),
        realized_policy_revision: Some(7),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&status).unwrap(),
        serde_json::json!({"realizedRevision": 4, "realizedPolicyRevision": 7})
    );
    let json = serde_json::json!({"references": 2, "lastReferenced": "2026-11-21T19:00:00Z"});
    let status: IdentityStatus = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(status.references, 2);
    assert_eq!(serde_json::to_value(&status).unwrap(), json);
}
