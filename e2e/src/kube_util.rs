//! Helpers on top of kube-rs: waiting on a watch, applying YAML, polling for what cannot be
//! watched.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::TryStreamExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::runtime::wait::Condition;
use kube::runtime::watcher::watch_object;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// Field manager of everything the harness writes.
pub const FIELD_MANAGER: &str = "tendril-e2e";

/// Waits, on a watch (never a sleep loop), until `cond` holds for object `name` of `api`.
/// `cond` sees `None` while the object does not exist, so `|o| o.is_none()` waits for a
/// deletion; any `kube::runtime::wait::Condition` works too (e.g.
/// `conditions::is_crd_established()`). Returns the object as it was when the condition
/// held (`None` if it held on absence). On timeout the error shows the last state seen.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    cond: impl Condition<K>,
    timeout: Duration,
) -> Result<Option<K>>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    let mut last: Option<Option<K>> = None;
    let watch = async {
        // watch_object retries nothing itself; restart it on watch errors (e.g. an apiserver
        // restart in fault tests) until the timeout.
        loop {
            let stream = watch_object(api.clone(), name);
            futures::pin_mut!(stream);
            loop {
                match stream.try_next().await {
                    Ok(Some(obj)) => {
                        if cond.matches_object(obj.as_ref()) {
                            return obj;
                        }
                        last = Some(obj);
                    }
                    Ok(None) => break,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
    };
    match tokio::time::timeout(timeout, watch).await {
        Ok(obj) => Ok(obj),
        Err(_) => {
            let kind = K::kind(&K::DynamicType::default()).to_string();
            let state = match &last {
                None => "no event received".to_string(),
                Some(None) => "object absent".to_string(),
                Some(Some(o)) => format!("{o:#?}"),
            };
            Err(anyhow!(
                "timed out after {timeout:?} waiting for {kind} {name}; last seen: {state}"
            ))
        }
    }
}

/// Waits until object `name` no longer exists.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    wait_for(api, name, |o: Option<&K>| o.is_none(), timeout)
        .await
        .map(|_| ())
}

/// Polls `f` until it returns `Ok`, for state that cannot be watched (HTTP endpoints,
/// metrics, kernel state). Backs off from 50 ms to 1 s; on timeout returns the last error.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Applies every document of a (multi-document) YAML string with server-side apply
/// (field manager [`FIELD_MANAGER`], forced). Namespaced objects without
/// `metadata.namespace` go to `default_namespace` (an error if it is `None`). Kinds are
/// resolved by discovery, so CRD kinds work once the CRD is established. Returns the objects
/// as the server stored them.
pub async fn apply_yaml(
    client: &Client,
    yaml: &str,
    default_namespace: Option<&str>,
) -> Result<Vec<DynamicObject>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).context("parsing YAML")?;
    let mut out = Vec::new();
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let obj: DynamicObject =
            serde_json::from_value(doc).context("document is not a Kubernetes object")?;
        let types = obj
            .types
            .clone()
            .ok_or_else(|| anyhow!("document without apiVersion/kind"))?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discovering {}/{}", types.api_version, types.kind))?;
        let name = obj.name_any();
        if name.is_empty() {
            bail!("{} without metadata.name", types.kind);
        }
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &ar),
            Scope::Namespaced => {
                let ns = obj
                    .namespace()
                    .or_else(|| default_namespace.map(String::from))
                    .ok_or_else(|| anyhow!("{} {name} needs a namespace", types.kind))?;
                Api::namespaced_with(client.clone(), &ns, &ar)
            }
        };
        let applied = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .with_context(|| format!("applying {} {name}", types.kind))?;
        out.push(applied);
    }
    Ok(out)
}

/// Server-side applies a typed object (field manager [`FIELD_MANAGER`], forced) and returns
/// what the server stored. The object must carry apiVersion/kind (k8s-openapi and kube-derive
/// types serialize them).
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or_else(|| anyhow!("object without metadata.name"))?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .with_context(|| format!("applying {name}"))
}
