//! A host outside the cluster for the services tests of the tc path: a network namespace
//! on the underlay bridge, in no node's cgroup.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Result;
use tendril_e2e::sim::{delete_netns, ensure_netns, ip};

/// A host outside the cluster: a namespace on the underlay bridge, removed on drop.
pub struct Outside {
    pub netns: String,
}

impl Outside {
    /// `address`/24 on the underlay; LoadBalancer IPs and externalIPs (198.51.100.0/24)
    /// are announced by node 0 at `gateway` (as BGP or L2 would).
    pub async fn start(underlay: &str, address: &str, gateway: &str) -> Result<Outside> {
        // Several per test binary (one per scenario running at once).
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let netns = format!("tdrx-{}-{n}", std::process::id());
        let guard = Outside {
            netns: netns.clone(),
        };
        ensure_netns(&netns).await?;
        let peer = format!("x{}-{n}", std::process::id() % 100_000);
        ip(&[
            "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns",
            underlay,
        ])
        .await?;
        ip(&["-n", underlay, "link", "set", &peer, "master", "br0", "up"]).await?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            gateway,
        ])
        .await?;
        Ok(guard)
    }

    /// `address`/64 on the underlay's IPv6 subnet (no duplicate address detection: usable at
    /// once), and `prefix` (IPv6 LoadBalancer IPs, externalIPs) routed via `gateway`.
    pub async fn add_ipv6(&self, address: &str, prefix: &str, gateway: &str) -> Result<()> {
        let netns = &self.netns;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{address}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .await?;
        ip(&["-n", netns, "-6", "route", "add", prefix, "via", gateway]).await?;
        Ok(())
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        delete_netns(&self.netns);
    }
}
