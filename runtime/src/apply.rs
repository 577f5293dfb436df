//! Server-side apply under the concern's own field manager.
//!
//! Each concern writes only the fields it owns (`tendril-<concern>`), so several concerns
//! and the agent can share one object (`NodeNetwork`) without read-modify-write races.
//! A patch body names exactly the owned fields: any field left out is released.

use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::fmt::Debug;

/// The field manager of a concern: `tendril-<concern>`.
pub fn field_manager(concern: &str) -> String {
    format!("tendril-{concern}")
}

/// An apply body for `K` named `name` (and `namespace`): `apiVersion`, `kind` and
/// `metadata` filled in, then `fields` (e.g. `{"spec": {...}}` or `{"status": {...}}`)
/// merged at the top level. Extra metadata (labels, ownerReferences) goes in
/// `fields["metadata"]` and is merged with the name.
pub fn apply_body<K>(name: &str, namespace: Option<&str>, fields: Value) -> Value
where
    K: Resource<DynamicType = ()>,
{
    let mut body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
    });
    if let Some(ns) = namespace {
        body["metadata"]["namespace"] = json!(ns);
    }
    if let Value::Object(fields) = fields {
        for (key, value) in fields {
            match (key.as_str(), value) {
                ("metadata", Value::Object(meta)) => {
                    for (k, v) in meta {
                        body["metadata"][k] = v;
                    }
                }
                (_, value) => body[key] = value,
            }
        }
    }
    body
}

/// An owner reference to `owner` with `controller: true` and `blockOwnerDeletion: true`,
/// so the garbage collector deletes the owned object with its owner.
pub fn controller_owner_ref<O>(owner: &O) -> Option<Value>
where
    O: Resource<DynamicType = ()>,
{
    Some(json!({
        "apiVersion": O::api_version(&()),
        "kind": O::kind(&()),
        "name": owner.meta().name.as_ref()?,
        "uid": owner.meta().uid.as_ref()?,
        "controller": true,
        "blockOwnerDeletion": true,
    }))
}

/// Parameters of a forced apply by `manager`: a concern's fields are its own, so it takes
/// them back from anyone who edited them.
pub fn force_params(manager: &str) -> PatchParams {
    PatchParams::apply(manager).force()
}

/// Applies `body` to the object (main resource) as `manager`, forcing ownership.
pub async fn apply<K>(api: &Api<K>, manager: &str, body: &Value) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    api.patch(&name, &force_params(manager), &Patch::Apply(body))
        .await
}

/// Applies `body` to the object's `status` subresource as `manager`, forcing ownership.
pub async fn apply_status<K>(api: &Api<K>, manager: &str, body: &Value) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let name = body["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    api.patch_status(&name, &force_params(manager), &Patch::Apply(body))
        .await
}

/// Deletes the object `name` only if it is still the one with `uid` (not one recreated
/// under the same name meanwhile): `true` when deleted, `false` when it was already gone
/// or replaced (404, 409).
pub async fn delete_exact<K>(api: &Api<K>, name: &str, uid: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// The managers that own any field of `obj` (from `metadata.managedFields`).
pub fn managers<K: Resource>(obj: &K) -> Vec<String> {
    obj.managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    #[test]
    fn body_has_type_name_and_only_given_fields() {
        let body = apply_body::<ConfigMap>(
            "x",
            Some("ns"),
            json!({"metadata": {"labels": {"a": "b"}}, "data": {"k": "v"}}),
        );
        assert_eq!(
            body,
            json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "x", "namespace": "ns", "labels": {"a": "b"}},
                "data": {"k": "v"},
            })
        );
    }

    #[test]
    fn field_manager_is_prefixed() {
        assert_eq!(field_manager("nodes"), "tendril-nodes");
        let p = force_params("tendril-nodes");
        assert!(p.force);
        assert_eq!(p.field_manager.as_deref(), Some("tendril-nodes"));
    }
}
