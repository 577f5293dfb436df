//! The container runtime's side of CNI: the network configuration derived from the node's
//! conflist as libcni does, `tendril-cni` exec'd with the CNI environment, sandbox set-up
//! and teardown with the retries containerd and the kubelet do.

use super::*;

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
    /// The node's cgroup (socket LB): processes in the node's and its pods' namespaces run
    /// there. `None`: not placed (the agent's socket LB then covers them only if attached
    /// higher up).
    pub cgroup: Option<PathBuf>,
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
