//! Services conformance: one matrix of real packets ([`matrix`]) run against two worlds
//! behind one trait ([`World`]): the reference, plain routed nodes with a real `kube-proxy`
//! each ([`kube_proxy::KubeProxyWorld`]), and Tendril's simulated cluster
//! ([`tendril::TendrilWorld`]); the same topology in both:
//!
//! ```text
//!  underlay 10.250.0.0/24 (bridge)
//!   ├── node 0 (.10): pods b0, b1 (backends), c0 (client)
//!   ├── node 1 (.11): pod  b2 (backend), c1 (client)
//!   ├── x0 (.100): a client outside the cluster, LB and external IPs routed via node 0
//!   └── x1 (.101): the same via node 1
//! ```
//!
//! Namespaces this module creates are named `kp-{pid}-{rand}-…` (never `tdr-`/`tdrp_`, the
//! sim's), removed on drop and, after a killed run, by [`sweep_stale`].

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result};
use rand::Rng;

use crate::sim::{NETNS_DIR, delete_netns, ensure_netns, ip, join_bridge};

pub mod kube_proxy;
pub mod matrix;
pub mod probe;
pub mod tendril;

pub use matrix::World;

/// Where a client (or a backend) runs: a network namespace and, for worlds whose load
/// balancing hooks cgroups, the cgroup a process there belongs in.
#[derive(Clone, Debug)]
pub struct Spot {
    /// `pod@n0`, `host@n1`, `ext@n0`…
    pub name: String,
    pub netns: String,
    pub cgroup: Option<PathBuf>,
}

impl Spot {
    pub fn new(name: impl Into<String>, netns: impl Into<String>) -> Spot {
        Spot {
            name: name.into(),
            netns: netns.into(),
            cgroup: None,
        }
    }
}

/// Prefix of every namespace of this module: `kp-{pid}-{4 random digits}`.
pub fn netns_prefix() -> String {
    format!(
        "kp-{}-{:04}",
        std::process::id(),
        rand::rng().random_range(0..10000)
    )
}

/// Deletes `kp-{pid}-…` namespaces whose process is gone (a killed run).
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("kp-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(&name);
        }
    }
}

/// Namespaces deleted on drop (in reverse order of creation).
#[derive(Default)]
pub struct NetnsSet(Vec<String>);

impl NetnsSet {
    /// Creates `name` (lo up) and takes charge of it.
    pub async fn add(&mut self, name: &str) -> Result<()> {
        self.0.push(name.to_string());
        ensure_netns(name).await?;
        Ok(())
    }
}

impl Drop for NetnsSet {
    fn drop(&mut self) {
        while let Some(ns) = self.0.pop() {
            delete_netns(&ns);
        }
    }
}

/// LoadBalancer ingress IPs and externalIPs live in these /16s; outside clients route them
/// via their node.
pub const LB_RANGE: &str = "10.252.0.0/16";
pub const EXTERNAL_IP_RANGE: &str = "10.251.0.0/16";
/// A router address on the underlay that nobody answers: nodes have a default route (as
/// real nodes do, so a frontend address is routable before NAT) that leads nowhere.
pub const UNDERLAY_ROUTER: &str = "10.250.0.1";

/// Outside client `index` (address `10.250.0.{100+index}`) joined to `underlay_ns`'s
/// bridge (peer `kx{index}`), routing LB and external IPs via `via`.
pub async fn add_external_client(
    set: &mut NetnsSet,
    underlay_ns: &str,
    name: &str,
    index: u8,
    via: Ipv4Addr,
) -> Result<Ipv4Addr> {
    let address = Ipv4Addr::new(10, 250, 0, 100 + index);
    set.add(name).await?;
    join_bridge(underlay_ns, name, &format!("kx{index}"), address).await?;
    for range in [LB_RANGE, EXTERNAL_IP_RANGE] {
        ip(&[
            "-n",
            name,
            "route",
            "replace",
            range,
            "via",
            &via.to_string(),
        ])
        .await?;
    }
    Ok(address)
}

/// A default route on a node towards [`UNDERLAY_ROUTER`].
pub async fn add_node_default_route(node_ns: &str) -> Result<()> {
    ip(&[
        "-n",
        node_ns,
        "route",
        "replace",
        "default",
        "via",
        UNDERLAY_ROUTER,
        "dev",
        "eth0",
        "onlink",
    ])
    .await
    .map(|_| ())
}

/// Every IPv4 address (but loopback) configured in namespace `ns`.
pub async fn netns_addresses(ns: &str) -> Result<Vec<Ipv4Addr>> {
    let out = ip(&["-n", ns, "-4", "-o", "addr", "show"]).await?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next()?.split('/').next()?.parse::<Ipv4Addr>().ok()
        })
        .filter(|a| !a.is_loopback())
        .collect())
}

/// Runs a command in `ns`, failing with its stderr.
pub async fn netns_exec(ns: &str, cmd: &[&str]) -> Result<String> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running ip netns exec")?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET http://127.0.0.1:{port}{path}` from inside namespace `ns`.
pub async fn netns_http_get(ns: &str, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    let handle =
        crate::traffic::spawn_in_netns(
            ns,
            move || async move { crate::http_get(port, &path).await },
        );
    tokio::task::spawn_blocking(move || {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("http thread panicked"))?
    })
    .await?
}

/// The parsed `/metrics` of a process listening on `127.0.0.1:{port}` inside `ns`.
pub async fn netns_metrics(ns: &str, port: u16) -> Result<crate::Metrics> {
    let (status, body) = netns_http_get(ns, port, "/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics in {ns}: {status}");
    Ok(crate::Metrics::parse(&body))
}
