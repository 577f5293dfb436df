//! [`TestEnv`]: what one test gets: a client, a namespace of its own, cleanup on drop.

use std::fmt::Debug;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, ObjectMeta, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;

use crate::plane::{E2E_LABEL, OWNER_LABEL};
use crate::util::{k8s_bin_dir, owner_tag};
use crate::{ControlPlane, apply_yaml, wait_for};

/// One test's slice of a control plane. Create it first thing in a test; drop it (or let it
/// go out of scope) at the end: the namespace and everything registered with
/// [`TestEnv::delete_on_drop`] are deleted, also when the test panics.
pub struct TestEnv {
    plane: Arc<ControlPlane>,
    client: Client,
    namespace: String,
    cleanups: Mutex<Vec<(String, String)>>,
}

impl TestEnv {
    /// On the shared plane (started on first use, CRDs established): a fresh client and a
    /// namespace `e2e-{pid}-{n}-{rand}` whose `default` ServiceAccount exists (so Pods can be
    /// created at once).
    pub async fn new() -> Result<TestEnv> {
        TestEnv::on(ControlPlane::shared().await?).await
    }

    /// The same on a given plane (e.g. a [`ControlPlane::dedicated`] one).
    pub async fn on(plane: Arc<ControlPlane>) -> Result<TestEnv> {
        crate::process::sweep_stale_processes();
        let client = plane.client().await?;
        let namespace = crate::unique_name("e2e");
        let ns_api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.clone()),
                labels: Some(
                    [
                        (E2E_LABEL.to_string(), "true".to_string()),
                        (OWNER_LABEL.to_string(), owner_tag()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        ns_api
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {namespace}"))?;
        // From here on Drop cleans up, even if the wait below fails.
        let env = TestEnv {
            plane,
            client,
            namespace,
            cleanups: Mutex::new(Vec::new()),
        };
        let sa: Api<ServiceAccount> = Api::namespaced(env.client.clone(), &env.namespace);
        wait_for(
            &sa,
            "default",
            |o: Option<&ServiceAccount>| o.is_some(),
            Duration::from_secs(60),
        )
        .await?;
        Ok(env)
    }

    /// The admin client (system:masters) of this test.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// This test's namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn plane(&self) -> &Arc<ControlPlane> {
        &self.plane
    }

    /// Path of the admin kubeconfig (to hand to an operator or agent process).
    pub fn kubeconfig(&self) -> PathBuf {
        self.plane.kubeconfig()
    }

    /// `Api` for a namespaced kind in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// `Api` for a cluster-scoped kind.
    pub fn cluster_api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope>,
        K::DynamicType: Default,
    {
        Api::all(self.client.clone())
    }

    /// [`crate::unique_name`].
    pub fn unique_name(&self, prefix: &str) -> String {
        crate::unique_name(prefix)
    }

    /// [`crate::apply_yaml`] with this test's namespace as the default namespace.
    pub async fn apply_yaml(&self, yaml: &str) -> Result<Vec<DynamicObject>> {
        apply_yaml(&self.client, yaml, Some(&self.namespace)).await
    }

    /// Registers a cluster-scoped object (a Node, a NodeNetwork, a ClusterNetworkPolicy…) to
    /// be deleted when the env drops. Namespaced objects need not be registered: the
    /// namespace goes with everything in it.
    pub fn delete_on_drop<K>(&self, name: &str)
    where
        K: Resource,
        K::DynamicType: Default,
    {
        let dt = K::DynamicType::default();
        let group = K::group(&dt);
        let resource = if group.is_empty() {
            K::plural(&dt).to_string()
        } else {
            format!("{}.{}", K::plural(&dt), group)
        };
        self.cleanups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((resource, name.to_string()));
    }

    /// Waits, on a watch, for `cond` on object `name` of `api` ([`crate::wait_for`]).
    pub async fn wait_for<K>(
        &self,
        api: &Api<K>,
        name: &str,
        cond: impl kube::runtime::wait::Condition<K>,
        timeout: Duration,
    ) -> Result<Option<K>>
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
        K::DynamicType: Default,
    {
        wait_for(api, name, cond, timeout).await
    }
}

impl Drop for TestEnv {
    /// Best effort and without the async runtime (a `Drop` cannot await, and the test's
    /// runtime may be unwinding): kubectl deletes without waiting for finalization.
    fn drop(&mut self) {
        let kubectl = k8s_bin_dir().join("kubectl");
        let kubeconfig = self.plane.kubeconfig();
        let mut targets: Vec<(String, String)> = self
            .cleanups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        targets.push(("namespaces".into(), self.namespace.clone()));
        for (resource, name) in targets {
            let _ = Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args([
                    "delete",
                    &resource,
                    &name,
                    "--ignore-not-found",
                    "--wait=false",
                    "--request-timeout=10s",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
