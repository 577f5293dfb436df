//! Simulated nodes and pods: the kubelet and container runtime this test world lacks.
//!
//! - The **underlay** is a network namespace `tdr-underlay-{cluster}` holding a bridge
//!   `br0`; every node joins it with a veth pair and an address from `10.250.{n}.0/24`
//!   (addresses that exist only inside our namespaces).
//! - A **node** is a network namespace `tdr-{node}` (`eth0` on the underlay, `lo` up, IPv4
//!   forwarding on as on any Kubernetes node), a `Node` object (InternalIP = its underlay
//!   address, Ready) and one `tendril-agent` process that stays in the host namespace (to
//!   reach the API server on 127.0.0.1) and configures the node's (`--node-netns`).
//! - A **pod** is what a kubelet with containerd would make of a `Pod` bound to the node:
//!   the `Pod` object (`spec.nodeName`), a sandbox network namespace `tdrp_{ns}_{pod}`, the
//!   real `tendril-cni` run inside the node's namespace with `CNI_COMMAND=ADD`, `CNI_ARGS`
//!   and the network configuration derived from the node's conflist exactly as libcni
//!   does, then `Pod.status` written through the status subresource (Running, podIPs,
//!   hostIP, Ready). Deletion is the kubelet's: graceful delete, CNI `DEL` on sandbox
//!   teardown, then the final delete with grace period 0.
//! - A failed ADD is handled as containerd and the kubelet do: the half-made sandbox is
//!   torn down with DEL (retried until the agent answers) and a new sandbox, with a new
//!   container id, is tried after a short backoff. "Try again later" (code 11, the agent
//!   is down or not ready) is counted in [`SimPod::retries`].
//!
//! Test guards ([`SimNode`], [`SimPod`], [`SimCluster`]) clean up on drop, also on panic;
//! the free functions are what the `tendril-sim` binary (used by `hack/sim-cluster.sh`)
//! builds on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use rand::Rng;
use serde_json::json;
use tendril_crds::v1alpha1::{Endpoint, NodeNetwork};
use tokio::io::AsyncWriteExt;

use crate::{Process, TestEnv, eventually, fetch_metrics, target_bin_dir, wait_for};

/// CNI "try again later": the agent is unreachable or not ready yet.
pub const CNI_TRY_AGAIN: u64 = 11;
/// Every "try again later" answer any sandbox operation of this process has met, counted
/// as it happens (a caller can watch it while the operations are still retrying).
static TRY_AGAIN_ANSWERS: AtomicU64 = AtomicU64::new(0);

/// See [`TRY_AGAIN_ANSWERS`].
pub fn try_again_answers() -> u64 {
    TRY_AGAIN_ANSWERS.load(Ordering::Relaxed)
}

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
const WAIT: Duration = Duration::from_secs(120);
/// How long a kubelet-like caller keeps retrying one sandbox operation.
const SANDBOX_RETRY_FOR: Duration = Duration::from_secs(180);

/// `/var/run/netns/{name}`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The node's network namespace name.
pub fn node_netns(node: &str) -> String {
    format!("tdr-{node}")
}

/// The underlay's network namespace name.
pub fn underlay_netns(cluster: &str) -> String {
    format!("tdr-underlay-{cluster}")
}

/// The sandbox namespace of a pod (`_` cannot occur in Kubernetes names, so this is
/// unambiguous; `hack/pod-exec.sh` relies on it).
pub fn pod_netns(namespace: &str, pod: &str) -> String {
    format!("tdrp_{namespace}_{pod}")
}

/// Runs `ip ARGS…`, returning stdout; fails with stderr.
pub async fn ip(args: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates the namespace unless it exists; returns whether it was created.
pub async fn ensure_netns(name: &str) -> Result<bool> {
    if netns_path(name).exists() {
        return Ok(false);
    }
    match ip(&["netns", "add", name]).await {
        Ok(_) => {}
        // Another caller won the race.
        Err(_) if netns_path(name).exists() => return Ok(false),
        Err(e) => return Err(e),
    }
    ip(&["-n", name, "link", "set", "lo", "up"]).await?;
    Ok(true)
}

/// Deletes a namespace (and with it every interface in it; the peers of its veths go too).
/// Blocking, so that `Drop` can call it; a missing namespace is not an error.
pub fn delete_netns(name: &str) {
    if netns_path(name).exists() {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn link_exists_in(netns: &str, link: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", netns, "link", "show", "dev", link])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The underlay: its namespace with bridge `br0` up. Idempotent.
pub async fn ensure_underlay(cluster: &str) -> Result<String> {
    let ns = underlay_netns(cluster);
    ensure_netns(&ns).await?;
    if !link_exists_in(&ns, "br0") {
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]).await?;
    }
    ip(&["-n", &ns, "link", "set", "br0", "up"]).await?;
    Ok(ns)
}

/// Node `index` (0-based) of underlay subnet `subnet`: `10.250.{subnet}.{index + 10}`.
pub fn node_address(subnet: u8, index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, subnet, index.saturating_add(10))
}

/// The node's namespace joined to the underlay (`eth0` ↔ `n{index}` on `br0`), with
/// `address/24` on `eth0` and forwarding on. Idempotent.
pub async fn ensure_node_netns(
    cluster: &str,
    node: &str,
    index: u8,
    address: Ipv4Addr,
) -> Result<String> {
    let underlay = underlay_netns(cluster);
    let ns = node_netns(node);
    ensure_netns(&ns).await?;
    // A Kubernetes node forwards (the kubelet/runtime set this); pods on one node reach each
    // other through the node's host routes.
    ip(&[
        "netns",
        "exec",
        &ns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
    ])
    .await?;
    let peer = format!("n{index}");
    if !link_exists_in(&ns, "eth0") {
        if link_exists_in(&underlay, &peer) {
            // A leftover of a previous node with this index.
            ip(&["-n", &underlay, "link", "del", &peer]).await?;
        }
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
            &underlay,
        ])
        .await?;
        ip(&["-n", &underlay, "link", "set", &peer, "master", "br0", "up"]).await?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])
        .await?;
    }
    ip(&["-n", &ns, "link", "set", "eth0", "up"]).await?;
    Ok(ns)
}

/// Creates (or updates) the `Node` object and writes its status as a kubelet would:
/// addresses (InternalIP = the underlay address, Hostname) and a Ready condition.
pub async fn ensure_node_object(
    client: &Client,
    node: &str,
    address: Ipv4Addr,
    labels: &BTreeMap<String, String>,
) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = labels.clone();
    labels.insert("kubernetes.io/hostname".into(), node.into());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    let obj: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node, "labels": labels },
    }))?;
    match nodes.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e).with_context(|| format!("creating Node {node}")),
    }
    let now = chrono_now();
    let status = json!({
        "status": {
            "addresses": [
                { "type": "InternalIP", "address": address.to_string() },
                { "type": "Hostname", "address": node },
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "simulated kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux",
                "kubeletVersion": "v1.36.3-sim", "kubeProxyVersion": "",
                "containerRuntimeVersion": "sim://1", "kernelVersion": "", "osImage": "tendril-sim",
                "bootID": "", "machineID": "", "systemUUID": "",
            },
        }
    });
    nodes
        .patch_status(node, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("writing Node {node} status"))
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Waits until the node's `NodeNetwork` reports `Ready=True` (written by its agent).
pub async fn wait_node_network_ready(
    client: &Client,
    node: &str,
    timeout: Duration,
) -> Result<NodeNetwork> {
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    wait_for(
        &networks,
        node,
        |o: Option<&NodeNetwork>| {
            o.and_then(|nn| nn.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        },
        timeout,
    )
    .await?
    .context("NodeNetwork gone")
}

/// The conflist a node's container runtime reads (`/etc/cni/net.d/10-tendril.conflist` on a
/// real node).
pub fn conflist(socket: &Path) -> serde_json::Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "tendril",
        "plugins": [{ "type": "tendril-cni", "agentSocket": socket }],
    })
}

/// What a pod needs of its node: where the plugin runs and how it is configured.
#[derive(Clone, Debug)]
pub struct NodeHandle {
    pub name: String,
    /// The node's underlay address (the pods' hostIP).
    pub address: Ipv4Addr,
    /// The node's network namespace, where the plugin runs (as the kubelet runs in the
    /// node's host namespace).
    pub netns: String,
    /// The node's conflist.
    pub conflist: serde_json::Value,
    /// Directory holding `tendril-cni` (CNI_PATH).
    pub cni_bin_dir: PathBuf,
}

impl NodeHandle {
    /// The one plugin's network configuration as libcni hands it to the plugin: the plugin
    /// entry with the list's `name` and `cniVersion` injected.
    pub fn plugin_config(&self) -> serde_json::Value {
        let mut conf = self.conflist["plugins"][0].clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf
    }
}

/// What one plugin invocation returned.
#[derive(Debug, Clone)]
pub struct CniOutcome {
    pub success: bool,
    /// The result (success) or the error object (failure), `Null` if stdout was empty.
    pub output: serde_json::Value,
}

impl CniOutcome {
    /// The spec's error code, on failure.
    pub fn code(&self) -> Option<u64> {
        (!self.success)
            .then(|| self.output["code"].as_u64())
            .flatten()
    }
}

/// The sandbox identity the runtime passes to the plugin.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: String,
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
}

/// A new random sandbox id, 64 hex characters like containerd's.
pub fn new_container_id() -> String {
    let mut rng = rand::rng();
    (0..64)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).expect("hex digit"))
        .collect()
}

/// Runs `tendril-cni` once, as containerd's libcni would: inside the node's namespace,
/// the environment of the spec, the network configuration on stdin.
pub async fn cni_exec(node: &NodeHandle, command: &str, sandbox: &Sandbox) -> Result<CniOutcome> {
    let plugin = node.cni_bin_dir.join("tendril-cni");
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        sandbox.namespace, sandbox.pod, sandbox.container_id, sandbox.pod_uid
    );
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &node.netns])
        .arg(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.container_id)
        .env("CNI_NETNS", netns_path(&sandbox.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", &node.cni_bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    let conf = serde_json::to_vec(&node.plugin_config())?;
    let mut stdin = child.stdin.take().context("plugin stdin")?;
    stdin.write_all(&conf).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let output = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "tendril-cni {command} printed no JSON: {:?} (stderr {:?})",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?
    };
    Ok(CniOutcome {
        success: out.status.success(),
        output,
    })
}

/// The sandbox's addresses from an ADD result.
pub fn result_ips(result: &serde_json::Value) -> Result<Vec<IpAddr>> {
    result["ips"]
        .as_array()
        .context("ADD result without ips")?
        .iter()
        .map(|ip| {
            let addr = ip["address"].as_str().context("ips[].address")?;
            Ok(addr.split('/').next().unwrap_or(addr).parse()?)
        })
        .collect()
}

/// Sandbox teardown: CNI DEL, retried while the agent cannot answer (as the kubelet keeps
/// retrying a sandbox it failed to stop). Returns the number of "try again" answers.
pub async fn teardown_sandbox(node: &NodeHandle, sandbox: &Sandbox) -> Result<u32> {
    let deadline = Instant::now() + SANDBOX_RETRY_FOR;
    let mut retries = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        let outcome = cni_exec(node, "DEL", sandbox).await?;
        if outcome.success {
            return Ok(retries);
        }
        if Instant::now() >= deadline {
            bail!(
                "DEL {}/{} ({}): {}",
                sandbox.namespace,
                sandbox.pod,
                sandbox.container_id,
                outcome.output
            );
        }
        if outcome.code() == Some(CNI_TRY_AGAIN) {
            retries += 1;
            TRY_AGAIN_ANSWERS.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Sandbox creation as containerd + kubelet do it: namespace, CNI ADD; on failure the
/// sandbox is torn down (DEL) and a new one (new container id) tried after a backoff.
/// Returns the sandbox, its addresses, the number of "try again" answers.
pub async fn setup_sandbox(
    node: &NodeHandle,
    namespace: &str,
    pod: &str,
    pod_uid: &str,
) -> Result<(Sandbox, Vec<IpAddr>, u32)> {
    let netns = pod_netns(namespace, pod);
    ensure_netns(&netns).await?;
    // Removes the namespace if this future fails or is dropped before a sandbox exists.
    let mut guard = NetnsGuard(Some(netns.clone()));
    let deadline = Instant::now() + SANDBOX_RETRY_FOR;
    let mut retries = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        let sandbox = Sandbox {
            container_id: new_container_id(),
            netns: netns.clone(),
            namespace: namespace.into(),
            pod: pod.into(),
            pod_uid: pod_uid.into(),
        };
        let outcome = cni_exec(node, "ADD", &sandbox).await?;
        if outcome.success {
            let ips = result_ips(&outcome.output)?;
            guard.0 = None;
            return Ok((sandbox, ips, retries));
        }
        if outcome.code() == Some(CNI_TRY_AGAIN) {
            retries += 1;
            TRY_AGAIN_ANSWERS.fetch_add(1, Ordering::Relaxed);
        }
        retries += teardown_sandbox(node, &sandbox).await?;
        if Instant::now() >= deadline {
            bail!("ADD {namespace}/{pod}: {}", outcome.output);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Deletes the named namespace on drop unless disarmed (`.0 = None`).
struct NetnsGuard(Option<String>);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(name) = self.0.take() {
            delete_netns(&name);
        }
    }
}

/// Deletes the namespaces test binaries that died without cleaning up left behind:
/// `tdr-node{i}-{pid}-…`, `tdr-underlay-{pid}-…` and `tdrp_e2e-{pid}-…` whose pid is gone.
pub fn sweep_stale_netns() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rest = if let Some(r) = name.strip_prefix("tdrp_e2e-") {
            r
        } else if let Some(r) = name.strip_prefix("tdr-underlay-") {
            r
        } else if let Some(r) = name.strip_prefix("tdr-node") {
            // `{index}-{pid}-…`
            r.split_once('-').map_or("", |(_, r)| r)
        } else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(&name);
        }
    }
}

/// The Pod object a workload controller would create, bound to `node`.
pub fn pod_object(name: &str, node: &str, labels: &BTreeMap<String, String>) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "main",
                "image": "registry.k8s.io/pause:3.10",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
            }],
        },
    }))?)
}

/// Writes the status a kubelet writes once the sandbox has its addresses and the
/// container runs.
pub async fn write_running_status(
    pods: &Api<Pod>,
    name: &str,
    ips: &[IpAddr],
    host_ip: Ipv4Addr,
    container_id: &str,
) -> Result<Pod> {
    let now = chrono_now();
    let condition = |t: &str| json!({ "type": t, "status": "True", "lastTransitionTime": now });
    let status = json!({
        "status": {
            "phase": "Running",
            "hostIP": host_ip.to_string(),
            "hostIPs": [{ "ip": host_ip.to_string() }],
            "podIP": ips.first().map(ToString::to_string),
            "podIPs": ips.iter().map(|ip| json!({ "ip": ip.to_string() })).collect::<Vec<_>>(),
            "startTime": now,
            "conditions": [
                condition("PodReadyToStartContainers"), condition("Initialized"),
                condition("ContainersReady"), condition("Ready"), condition("PodScheduled"),
            ],
            "containerStatuses": [{
                "name": "main", "ready": true, "started": true, "restartCount": 0,
                "image": "registry.k8s.io/pause:3.10", "imageID": "",
                "containerID": format!("sim://{container_id}"),
                "state": { "running": { "startedAt": now } },
            }],
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("writing Pod {name} status"))
}

/// Creates the namespace unless it exists.
pub async fn ensure_namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

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
        Ok(tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.sandbox.netns])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .await?)
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

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A simulated node of a test: namespace on the underlay, Node object, one agent.
/// Dropping it stops the agent and removes the namespace, state and pin directories.
pub struct SimNode {
    pub name: String,
    pub address: Ipv4Addr,
    pub netns: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub bpffs_root: PathBuf,
    pub metrics_port: u16,
    kubeconfig: PathBuf,
    agent: Option<Process>,
    handle: NodeHandle,
}

impl SimNode {
    /// Brings node `index` up on `cluster`'s underlay (which must exist, see
    /// [`ensure_underlay`]) and starts its agent. The Node object is deleted with `env`.
    pub async fn start(env: &TestEnv, cluster: &str, subnet: u8, index: u8) -> Result<SimNode> {
        let name = env.unique_name(&format!("node{index}"));
        let address = node_address(subnet, index);
        let state_dir = std::env::temp_dir().join(format!("tendril-sim-{name}"));
        let bpffs_root = PathBuf::from("/sys/fs/bpf/tendril-sim").join(&name);
        let socket = state_dir.join("cni.sock");
        let mut node = SimNode {
            netns: node_netns(&name),
            address,
            state_dir,
            socket: socket.clone(),
            bpffs_root,
            metrics_port: free_port()?,
            kubeconfig: env.kubeconfig(),
            agent: None,
            handle: NodeHandle {
                name: name.clone(),
                address,
                netns: node_netns(&name),
                conflist: conflist(&socket),
                cni_bin_dir: target_bin_dir(),
            },
            name,
        };
        // From here on Drop cleans up whatever was made.
        std::fs::create_dir_all(&node.state_dir)?;
        std::fs::write(
            node.state_dir.join("10-tendril.conflist"),
            serde_json::to_vec_pretty(&node.handle.conflist)?,
        )?;
        ensure_node_netns(cluster, &node.name, index, address).await?;
        env.delete_on_drop::<Node>(&node.name);
        env.delete_on_drop::<NodeNetwork>(&node.name);
        ensure_node_object(&env.client(), &node.name, address, &BTreeMap::new()).await?;
        node.start_agent()?;
        Ok(node)
    }

    /// What pods need of this node.
    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// Starts the agent (again), with the same state directory, socket and metrics port.
    pub fn start_agent(&mut self) -> Result<()> {
        let agent = Process::builder("tendril-agent")
            .name(format!("tendril-agent-{}", self.name))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--node-name", &self.name])
            .arg("--node-netns")
            .arg(netns_path(&self.netns))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--cni-socket")
            .arg(&self.socket)
            .arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .args([
                "--metrics-bind",
                &format!("127.0.0.1:{}", self.metrics_port),
            ])
            // Test-short: an address restored at start for an Endpoint whose pod is already
            // gone (the garbage collector lags) is released after 10 s, not 5 minutes.
            .args([
                "--ipam-resync-seconds",
                "5",
                "--ipam-leak-grace-seconds",
                "10",
            ])
            .env("RUST_LOG", "info")
            .spawn()?;
        self.agent = Some(agent);
        Ok(())
    }

    /// The running agent, if any.
    pub fn agent(&mut self) -> Option<&mut Process> {
        self.agent.as_mut()
    }

    /// SIGKILL, as a crash: no cleanup of the socket or anything else.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// Waits until the agent reports Ready in the node's NodeNetwork.
    pub async fn wait_ready(&self, client: &Client) -> Result<NodeNetwork> {
        wait_node_network_ready(client, &self.name, WAIT)
            .await
            .with_context(|| {
                self.agent
                    .as_ref()
                    .map(|a| a.log_tail(30))
                    .unwrap_or_default()
            })
    }

    /// `tendril_agent_ips_in_use` from the agent's metrics.
    pub async fn ips_in_use(&self) -> Result<f64> {
        fetch_metrics(self.metrics_port)
            .await?
            .value("tendril_agent_ips_in_use", &[])
            .context("tendril_agent_ips_in_use missing")
    }

    /// Waits until the agent's metrics say `n` addresses are in use.
    pub async fn wait_ips_in_use(&self, n: f64) -> Result<()> {
        eventually(WAIT, || async move {
            let v = self.ips_in_use().await?;
            anyhow::ensure!(v == n, "{v} addresses in use, waiting for {n}");
            Ok(())
        })
        .await
    }

    /// Allocation records on disk (`{state}/ipam/*.json`).
    pub fn allocation_records(&self) -> Result<Vec<PathBuf>> {
        let dir = self.state_dir.join("ipam");
        let mut out = Vec::new();
        if dir.exists() {
            for e in std::fs::read_dir(&dir)? {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "json") {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.stop(Duration::from_secs(10));
        }
        delete_netns(&self.netns);
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
    }
}

/// The underlay namespace of a test, removed on drop.
pub struct Underlay {
    pub cluster: String,
    pub netns: String,
}

impl Underlay {
    pub async fn new(cluster: &str) -> Result<Underlay> {
        let guard = Underlay {
            cluster: cluster.into(),
            netns: underlay_netns(cluster),
        };
        ensure_underlay(cluster).await?;
        Ok(guard)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        delete_netns(&self.netns);
    }
}

/// Settings of a [`SimCluster`].
#[derive(Clone, Debug)]
pub struct SimClusterConfig {
    pub nodes: u8,
    /// The default PodIPPool's IPv4 CIDR and per-node mask size.
    pub pool_cidr: String,
    pub mask_size: u8,
    /// `identities.gcGracePeriodSeconds` of the operator.
    pub identity_grace_seconds: u64,
}

impl Default for SimClusterConfig {
    fn default() -> Self {
        Self {
            nodes: 2,
            pool_cidr: "10.200.0.0/16".into(),
            mask_size: 24,
            identity_grace_seconds: 900,
        }
    }
}

/// N simulated nodes with their agents, the operator (a [`Process`]) and a default
/// `PodIPPool`, on `env`'s plane. The operator's ipam concern writes every NodeNetwork of
/// the plane, so give a cluster a [`crate::ControlPlane::dedicated`] plane.
pub struct SimCluster {
    // Field order is drop order: nodes (agents, namespaces) before the underlay.
    pub nodes: Vec<SimNode>,
    pub operator: Process,
    pub operator_port: u16,
    pub underlay: Underlay,
    config_path: PathBuf,
}

impl SimCluster {
    pub async fn start(env: &TestEnv, config: SimClusterConfig) -> Result<SimCluster> {
        sweep_stale_netns();
        let client = env.client();
        let cluster = format!(
            "{}-{}",
            std::process::id(),
            rand::rng().random_range(0..9999)
        );
        let underlay = Underlay::new(&cluster).await?;
        let pool = format!(
            "apiVersion: tendril.dev/v1alpha1\nkind: PodIPPool\nmetadata: {{name: default}}\n\
             spec: {{ipv4: {{cidrs: [\"{}\"], maskSize: {}}}}}",
            config.pool_cidr, config.mask_size
        );
        env.apply_yaml(&pool).await?;
        env.delete_on_drop::<tendril_crds::v1alpha1::PodIPPool>("default");
        let config_path =
            std::env::temp_dir().join(format!("{}.yaml", env.unique_name("sim-operator")));
        std::fs::write(
            &config_path,
            format!(
                "identities:\n  gcGracePeriodSeconds: {}\n",
                config.identity_grace_seconds
            ),
        )?;
        let operator_port = free_port()?;
        let mut operator = Process::builder("tendril-operator")
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .arg("--config")
            .arg(&config_path)
            .arg("--leader-elect=false")
            .arg("--metrics-bind")
            .arg(format!("127.0.0.1:{operator_port}"))
            .env("RUST_LOG", "info")
            .spawn()?;
        operator.wait_for_log("caches synced", WAIT).await?;
        let mut nodes = Vec::new();
        for i in 0..config.nodes {
            nodes.push(SimNode::start(env, &cluster, 0, i).await?);
        }
        for node in &nodes {
            node.wait_ready(&client).await?;
        }
        Ok(SimCluster {
            nodes,
            operator,
            operator_port,
            underlay,
            config_path,
        })
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
    }
}
