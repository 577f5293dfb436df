//! What a kubelet writes: the `Node` object, `Pod` objects bound to a node and their
//! status, and the waits on what the agent reports back.

use super::*;

/// Creates (or updates) the `Node` object and writes its status as a kubelet would:
/// addresses (InternalIP = the underlay address, Hostname) and a Ready condition.
pub async fn ensure_node_object(
    client: &Client,
    node: &str,
    address: Ipv4Addr,
    labels: &BTreeMap<String, String>,
) -> Result<Node> {
    ensure_node_object_with(client, node, &[IpAddr::V4(address)], labels).await
}

/// [`ensure_node_object`] with several `InternalIP`s (IPv4 first, as a dual-stack kubelet
/// reports them).
pub async fn ensure_node_object_with(
    client: &Client,
    node: &str,
    internal_ips: &[IpAddr],
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
            "addresses": internal_ips
                .iter()
                .map(|ip| json!({ "type": "InternalIP", "address": ip.to_string() }))
                .chain([json!({ "type": "Hostname", "address": node })])
                .collect::<Vec<_>>(),
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

pub(crate) fn chrono_now() -> String {
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
