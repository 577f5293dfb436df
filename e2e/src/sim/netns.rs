//! Network namespaces: the underlay bridge, node namespaces and pod sandboxes' namespaces,
//! created with `ip` and removed on drop, also after a test binary died.

use super::*;

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

pub(crate) fn link_exists_in(netns: &str, link: &str) -> bool {
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
    ensure_bridge_netns(&ns).await?;
    Ok(ns)
}

/// A namespace `ns` holding bridge `br0`, up. Idempotent.
pub async fn ensure_bridge_netns(ns: &str) -> Result<()> {
    ensure_netns(ns).await?;
    if !link_exists_in(ns, "br0") {
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"]).await?;
    }
    ip(&["-n", ns, "link", "set", "br0", "up"]).await?;
    Ok(())
}

/// Joins namespace `ns` to the bridge `br0` of namespace `bridge_ns`: `eth0` in `ns` with
/// `address/24`, its peer `peer` on the bridge. Idempotent.
pub async fn join_bridge(bridge_ns: &str, ns: &str, peer: &str, address: Ipv4Addr) -> Result<()> {
    if !link_exists_in(ns, "eth0") {
        if link_exists_in(bridge_ns, peer) {
            // A leftover of a previous member with this name.
            ip(&["-n", bridge_ns, "link", "del", peer]).await?;
        }
        ip(&[
            "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns",
            bridge_ns,
        ])
        .await?;
        ip(&["-n", bridge_ns, "link", "set", peer, "master", "br0", "up"]).await?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])
        .await?;
    }
    ip(&["-n", ns, "link", "set", "eth0", "up"]).await?;
    Ok(())
}

/// Node `index` (0-based) of underlay subnet `subnet`: `10.250.{subnet}.{index + 10}`.
pub fn node_address(subnet: u8, index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, subnet, index.saturating_add(10))
}

/// Node `index` (0-based) of underlay subnet `subnet`, IPv6:
/// `fd00:250:{subnet}::{index + 10}` (hexadecimal).
pub fn node_address6(subnet: u8, index: u8) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd00,
        0x250,
        subnet.into(),
        0,
        0,
        0,
        0,
        u16::from(index) + 10,
    )
}

/// Adds `address/64` to the node namespace's `eth0` (without duplicate address detection:
/// usable at once; the underlay's addresses are ours alone). Idempotent.
pub async fn add_node_address6(node: &str, address: Ipv6Addr) -> Result<()> {
    let ns = node_netns(node);
    let present = ip(&["-n", &ns, "-6", "addr", "show", "dev", "eth0"]).await?;
    if !present.contains(&format!("{address}/64")) {
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{address}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .await?;
    }
    Ok(())
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
    join_bridge(&underlay, &ns, &format!("n{index}"), address).await?;
    Ok(ns)
}

/// Deletes the named namespace on drop unless disarmed (`.0 = None`).
pub(crate) struct NetnsGuard(pub(crate) Option<String>);

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
