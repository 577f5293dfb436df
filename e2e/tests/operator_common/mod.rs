//! Helpers shared by the operator_* tests: starting `tendril-operator` processes, Nodes
//! with addresses, reading NodeNetworks and Leases.

#![allow(dead_code)]

use anyhow::{Context as _, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use std::time::Duration;
use tendril_crds::v1alpha1::NodeNetwork;
pub use tendril_e2e::free_port;
use tendril_e2e::{Process, TestEnv, eventually};

pub const TIMEOUT: Duration = Duration::from_secs(90);

/// An operator with leader election on, its Lease `lease` in the test namespace.
pub struct Operator {
    pub process: Process,
    pub port: u16,
    pub identity: String,
}

pub async fn start_operator(
    env: &TestEnv,
    lease: &str,
    identity: &str,
    extra: &[&str],
) -> Result<Operator> {
    let port = free_port()?;
    let mut process = Process::builder("tendril-operator")
        .name(format!("tendril-operator-{identity}"))
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--leader-elect",
            "--lease-name",
            lease,
            "--lease-namespace",
            env.namespace(),
        ])
        .args(["--leader-identity", identity])
        .args(extra)
        .env("RUST_LOG", "info,tendril_controllers=debug")
        .spawn()?;
    process
        .wait_for_log("leader election started", TIMEOUT)
        .await?;
    Ok(Operator {
        process,
        port,
        identity: identity.to_string(),
    })
}

fn node_json(name: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name, "labels": { "tendril.dev/e2e": "operator" } },
    }))
    .expect("node")
}

/// Writes `Node.status.addresses` as a kubelet would.
pub async fn set_addresses(nodes: &Api<Node>, name: &str, addrs: &[(&str, &str)]) -> Result<Node> {
    let addresses: Vec<_> = addrs
        .iter()
        .map(|(t, a)| serde_json::json!({"type": t, "address": a}))
        .collect();
    Ok(nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"addresses": addresses}})),
        )
        .await?)
}

/// Creates a Node (deleted with the env) and sets its addresses.
pub async fn create_node(env: &TestEnv, name: &str, addrs: &[(&str, &str)]) -> Result<Node> {
    let nodes: Api<Node> = env.cluster_api();
    env.delete_on_drop::<Node>(name);
    nodes
        .create(&PostParams::default(), &node_json(name))
        .await?;
    set_addresses(&nodes, name, addrs).await
}

/// Creates a Node, retrying while the API server recovers from a fault.
pub async fn create_node_eventually(
    env: &TestEnv,
    name: &str,
    addrs: &[(&str, &str)],
) -> Result<Node> {
    let nodes: Api<Node> = env.cluster_api();
    env.delete_on_drop::<Node>(name);
    eventually(TIMEOUT, || async {
        match nodes.create(&PostParams::default(), &node_json(name)).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    eventually(TIMEOUT, || set_addresses(&nodes, name, addrs)).await
}

pub fn addresses(nn: &NodeNetwork) -> Vec<(String, String)> {
    nn.spec
        .addresses
        .iter()
        .map(|a| (a.type_.clone(), a.address.clone()))
        .collect()
}

pub fn pairs(addrs: &[(&str, &str)]) -> Vec<(String, String)> {
    addrs
        .iter()
        .map(|(t, a)| (t.to_string(), a.to_string()))
        .collect()
}

/// The `AddressesResolved` condition: (status, reason, message, observedGeneration).
pub fn resolved(nn: &NodeNetwork) -> Option<(String, String, String, Option<i64>)> {
    let c = nn
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "AddressesResolved")?;
    Some((
        c.status.clone(),
        c.reason.clone(),
        c.message.clone(),
        c.observed_generation,
    ))
}

/// True when the NodeNetwork carries `addrs` and a current condition with `status`.
pub fn converged(nn: &NodeNetwork, addrs: &[(&str, &str)], status: &str) -> bool {
    addresses(nn) == pairs(addrs)
        && resolved(nn).is_some_and(|(s, _, _, g)| s == status && g == nn.metadata.generation)
}

pub async fn lease_holder(env: &TestEnv, lease: &str) -> Result<Option<String>> {
    let leases: Api<Lease> = env.api();
    let l = leases.get(lease).await.context("lease")?;
    Ok(l.spec
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty()))
}

/// Waits until object `name` exists and satisfies `cond` (`what`: for the error).
pub async fn wait_until<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    cond: impl Fn(&K) -> bool + Send + 'static,
) -> Result<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    tendril_e2e::wait_for(
        api,
        name,
        move |o: Option<&K>| o.is_some_and(&cond),
        TIMEOUT,
    )
    .await
    .with_context(|| format!("{} {name}: {what}", K::kind(&())))?
    .context("present")
}

/// The note of a Warning Event `reason` about the object named `regarding`, once one exists.
pub async fn warning_event(
    events: &Api<k8s_openapi::api::events::v1::Event>,
    regarding: &str,
    reason: &str,
) -> Result<String> {
    let (regarding, reason) = (regarding.to_string(), reason.to_string());
    eventually(TIMEOUT, || {
        let (events, regarding, reason) = (events.clone(), regarding.clone(), reason.clone());
        async move {
            let list = events.list(&kube::api::ListParams::default()).await?;
            list.items
                .iter()
                .find(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some(reason.as_str())
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(regarding.as_str())
                })
                .map(|e| e.note.clone().unwrap_or_default())
                .with_context(|| format!("no Warning Event {reason} about {regarding}"))
        }
    })
    .await
}
