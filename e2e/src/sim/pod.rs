//! [`SimPod`]: a pod on a simulated node, from `Pod` object to a wired sandbox, and back.

use super::*;

/// A pod the simulated kubelet runs. Dropping it without [`SimPod::delete`] removes its
/// sandbox namespace (best effort; the Pod object goes with the test's namespace).
#[derive(Debug)]
pub struct SimPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub sandbox: Sandbox,
    pub ips: Vec<IpAddr>,
    /// The node's cgroup, where the pod's processes run (socket LB).
    pub cgroup: Option<PathBuf>,
    /// "Try again later" answers from the plugin while setting the pod up.
    pub retries: u32,
    /// When the Pod object was created (before the API call).
    pub created_at: Instant,
    /// When the plugin's ADD had returned the addresses.
    pub added_at: Instant,
    /// When the Running status with the addresses had been written.
    pub running_at: Instant,
    deleted: bool,
}

/// Whether `conditions` hold `Realized=True`, as the agent writes it on Endpoints and
/// NodeNetworks.
pub fn is_realized(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == "Realized" && c.status == "True")
}

impl SimPod {
    /// Waits until the pod's agent reports its Endpoint (identity included) realized.
    pub async fn wait_realized(&self, client: &Client, timeout: Duration) -> Result<Endpoint> {
        let api: Api<Endpoint> = Api::namespaced(client.clone(), &self.namespace);
        wait_for(
            &api,
            &self.name,
            |o: Option<&Endpoint>| {
                o.is_some_and(|ep| {
                    ep.spec.identity.is_some()
                        && ep.status.as_ref().is_some_and(|s| {
                            s.realized_revision == Some(ep.spec.revision)
                                && is_realized(&s.conditions)
                        })
                })
            },
            timeout,
        )
        .await
        .with_context(|| format!("Endpoint {}/{} never realized", self.namespace, self.name))?
        .context("Endpoint gone")
    }

    /// Waits until some policy selects the pod (its identity's ResolvedPolicy has a source)
    /// and its node has realized that policy for it (`realizedPolicyRevision`).
    pub async fn wait_policy_realized(
        &self,
        client: &Client,
        endpoint: &Endpoint,
        timeout: Duration,
    ) -> Result<()> {
        let identity = endpoint.spec.identity.context("the pod has no identity")?;
        let policies: Api<tendril_crds::v1alpha1::ResolvedPolicy> = Api::all(client.clone());
        let rp = wait_for(
            &policies,
            &identity.to_string(),
            |o: Option<&tendril_crds::v1alpha1::ResolvedPolicy>| {
                o.is_some_and(|rp| !rp.spec.sources.is_empty())
            },
            timeout,
        )
        .await?
        .context("ResolvedPolicy gone")?;
        let endpoints: Api<Endpoint> = Api::namespaced(client.clone(), &self.namespace);
        wait_for(
            &endpoints,
            &self.name,
            |o: Option<&Endpoint>| {
                o.and_then(|ep| ep.status.as_ref())
                    .and_then(|s| s.realized_policy_revision)
                    .is_some_and(|r| r >= rp.spec.revision)
            },
            timeout,
        )
        .await?;
        Ok(())
    }
    /// Creates the Pod on `node` and runs it: sandbox, CNI ADD, Running status.
    pub async fn run(
        client: &Client,
        node: &NodeHandle,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<SimPod> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let created_at = Instant::now();
        let pod = pods
            .create(
                &PostParams::default(),
                &pod_object(name, &node.name, labels)?,
            )
            .await
            .with_context(|| format!("creating Pod {namespace}/{name}"))?;
        SimPod::start(client, node, &pod, created_at).await
    }

    /// Runs an existing Pod bound to `node`, as a kubelet does with a Pod it finds without
    /// a sandbox: sandbox, CNI ADD, Running status.
    pub async fn start(
        client: &Client,
        node: &NodeHandle,
        pod: &Pod,
        created_at: Instant,
    ) -> Result<SimPod> {
        let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
        let (namespace, name) = (namespace.as_str(), name.as_str());
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let uid = pod.uid().unwrap_or_default();
        let (sandbox, ips, retries) = setup_sandbox(node, namespace, name, &uid).await?;
        let added_at = Instant::now();
        let mut sim = SimPod {
            namespace: namespace.into(),
            name: name.into(),
            uid,
            node: node.name.clone(),
            sandbox,
            ips,
            cgroup: node.cgroup.clone(),
            retries,
            created_at,
            added_at,
            running_at: added_at,
            deleted: false,
        };
        write_running_status(
            &pods,
            name,
            &sim.ips,
            node.address,
            &sim.sandbox.container_id,
        )
        .await?;
        sim.running_at = Instant::now();
        Ok(sim)
    }

    /// What the kubelet does when a pod's sandbox died: tear it down (CNI DEL), start a new
    /// one (new container id, CNI ADD, so usually a new address) and write the new status.
    pub async fn recreate_sandbox(&mut self, client: &Client, node: &NodeHandle) -> Result<()> {
        self.retries += teardown_sandbox(node, &self.sandbox).await?;
        delete_netns(&self.sandbox.netns);
        let (sandbox, ips, retries) =
            setup_sandbox(node, &self.namespace, &self.name, &self.uid).await?;
        self.added_at = Instant::now();
        self.sandbox = sandbox;
        self.ips = ips;
        self.retries += retries;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        write_running_status(
            &pods,
            &self.name,
            &self.ips,
            node.address,
            &self.sandbox.container_id,
        )
        .await?;
        self.running_at = Instant::now();
        Ok(())
    }

    /// Leaves the sandbox in place when the guard goes (for a pod that must outlive this
    /// process, as `tendril-sim` runs them).
    pub fn keep(mut self) {
        self.deleted = true;
    }

    /// Runs `cmd` inside the pod's network namespace.
    pub async fn exec(&self, cmd: &[&str]) -> Result<std::process::Output> {
        Ok(self.command(cmd).stdin(Stdio::null()).output().await?)
    }

    /// Starts `cmd` inside the pod's network namespace (and its node's cgroup) with piped
    /// stdout, killed on drop.
    pub fn spawn(&self, cmd: &[&str]) -> Result<tokio::process::Child> {
        Ok(self
            .command(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?)
    }

    /// `ip netns exec <sandbox> cmd…`, placed in the node's cgroup before it execs.
    fn command(&self, cmd: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &self.sandbox.netns])
            .args(cmd);
        place_in_cgroup(&mut command, self.cgroup.as_deref());
        command
    }

    /// Whether one ICMP echo to `ip` is answered within 5 s.
    pub async fn ping(&self, ip: IpAddr) -> Result<bool> {
        let ip = ip.to_string();
        Ok(self
            .exec(&["ping", "-c1", "-W5", "-n", &ip])
            .await?
            .status
            .success())
    }

    /// The kubelet's deletion: graceful delete, sandbox teardown (CNI DEL, retried while
    /// the agent cannot answer), namespace removed, final delete (grace 0, this pod's uid).
    /// Returns the "try again" answers of the teardown.
    pub async fn delete(mut self, client: &Client, node: &NodeHandle) -> Result<u32> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let uid_only = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match pods.delete(&self.name, &uid_only).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e).context("deleting Pod"),
        }
        let retries = teardown_sandbox(node, &self.sandbox).await?;
        delete_netns(&self.sandbox.netns);
        self.deleted = true;
        match pods.delete(&self.name, &uid_only.grace_period(0)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e).context("final delete of Pod"),
        }
        Ok(retries)
    }
}

impl Drop for SimPod {
    fn drop(&mut self) {
        if !self.deleted {
            delete_netns(&self.sandbox.netns);
        }
    }
}
