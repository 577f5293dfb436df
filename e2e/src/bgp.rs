//! A top-of-rack router for BGP tests: a network namespace on a simulated cluster's
//! underlay running BIRD 2 — an implementation independent of the GoBGP the agents drive —
//! peering with the nodes, and what the tests read from it: BIRD's own `birdc` output.
//!
//! The router offers the nodes one prefix of its own ([`OFFERED_PREFIX`], so a node has
//! something to receive), installs the routes it learns into its kernel table with
//! `merge paths on` (ECMP across nodes advertising the same prefix) and forwards, so a
//! client namespace behind it ([`Client`]) reaches what the nodes advertise.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

use crate::Process;
use crate::sim::{delete_netns, ensure_netns, ip, join_bridge};

/// What the router offers its peers.
pub const OFFERED_PREFIX: &str = "203.0.113.0/24";

/// Timers of the router's sessions; the nodes' side comes from their BGPNodeConfig.
#[derive(Clone, Debug)]
pub struct RouterTimers {
    pub hold_seconds: u32,
    pub keepalive_seconds: u32,
}

/// A BGP peer of the router.
#[derive(Clone, Debug)]
pub struct RouterPeer {
    /// The BIRD protocol name (`node0`).
    pub name: String,
    pub address: Ipv4Addr,
    pub asn: u32,
    /// TCP MD5 password of the session (BIRD's `password`), or none.
    pub password: Option<String>,
}

/// The router: its namespace and its BIRD, removed/stopped on drop.
pub struct BirdRouter {
    pub netns: String,
    pub address: Ipv4Addr,
    pub asn: u32,
    dir: PathBuf,
    bird: Option<Process>,
}

impl BirdRouter {
    /// `netns` joined to `underlay`'s bridge with `address/24`, forwarding on, BIRD
    /// started and peering with `peers`.
    pub async fn start(
        underlay: &str,
        netns: &str,
        address: Ipv4Addr,
        asn: u32,
        peers: &[RouterPeer],
        timers: &RouterTimers,
    ) -> Result<BirdRouter> {
        let dir = std::env::temp_dir().join(format!("tendril-bird-{netns}"));
        let mut router = BirdRouter {
            netns: netns.to_string(),
            address,
            asn,
            dir: dir.clone(),
            bird: None,
        };
        std::fs::create_dir_all(&dir)?;
        ensure_netns(netns).await?;
        let peer_link = format!("r{}", std::process::id() % 100_000);
        join_bridge(underlay, netns, &peer_link, address).await?;
        ip(&[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ])
        .await?;
        let config = dir.join("bird.conf");
        std::fs::write(&config, bird_config(address, asn, peers, timers))?;
        let check = tokio::process::Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&config)
            .output()
            .await
            .context("running bird -p (Debian package bird2)")?;
        if !check.status.success() {
            bail!(
                "bird -p rejects the router's configuration: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let bird = Process::builder(Process::which("ip"))
            .name(format!("bird-{netns}"))
            .args(["netns", "exec", netns, "bird", "-f", "-c"])
            .arg(&config)
            .arg("-s")
            .arg(router.socket())
            .spawn()?;
        router.bird = Some(bird);
        crate::eventually(Duration::from_secs(20), || async {
            router.birdc(&["show", "status"]).await.map(|_| ())
        })
        .await?;
        Ok(router)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    /// `birdc ARGS…` against this router's BIRD; its output.
    pub async fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = tokio::process::Command::new("birdc")
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .await
            .context("running birdc")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.contains("Unable to connect") {
            bail!(
                "birdc {}: {text}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    /// Protocol name → the `Info` column of `birdc show protocols` (`Established`, …).
    pub async fn protocols(&self) -> Result<BTreeMap<String, String>> {
        Ok(parse_protocols(&self.birdc(&["show", "protocols"]).await?))
    }

    /// Prefix → next hops of the BGP routes in BIRD's table (`birdc show route all`).
    pub async fn routes(&self) -> Result<BTreeMap<Ipv4Net, BTreeSet<Ipv4Addr>>> {
        Ok(parse_routes(
            &self
                .birdc(&["show", "route", "all", "where", "source", "=", "RTS_BGP"])
                .await?,
        ))
    }

    /// BIRD's whole log so far.
    pub fn log(&self) -> String {
        self.bird.as_ref().map(|b| b.log()).unwrap_or_default()
    }

    /// Whether BIRD is helping `protocol`'s neighbor through a graceful restart (it keeps
    /// the neighbor's routes, stale, until its End-of-RIB or the restart time).
    pub async fn graceful_restart_active(&self, protocol: &str) -> Result<bool> {
        Ok(self
            .birdc(&["show", "protocols", "all", protocol])
            .await?
            .contains("Neighbor graceful restart active"))
    }

    /// The BIRD log so far (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        self.bird
            .as_ref()
            .map(|b| b.log_tail(n))
            .unwrap_or_default()
    }
}

impl Drop for BirdRouter {
    fn drop(&mut self) {
        if let Some(mut bird) = self.bird.take() {
            bird.stop(Duration::from_secs(5));
        }
        delete_netns(&self.netns);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// BIRD 2's configuration of the router.
pub fn bird_config(
    address: Ipv4Addr,
    asn: u32,
    peers: &[RouterPeer],
    timers: &RouterTimers,
) -> String {
    let mut conf = format!(
        "log stderr all;\n\
         # Sessions' state changes and events (graceful restart) into the log.\n\
         debug protocols {{ states, events }};\n\
         router id {address};\n\
         protocol device {{ scan time 10; }}\n\
         protocol static offered {{\n  ipv4;\n  route {OFFERED_PREFIX} blackhole;\n}}\n\
         # Learned routes into the kernel, several next hops of one prefix as one ECMP route.\n\
         protocol kernel {{\n  ipv4 {{ import none; export where source = RTS_BGP; }};\n  merge paths on;\n}}\n\
         template bgp tendril_node {{\n\
         \x20 local {address} as {asn};\n\
         \x20 ipv4 {{ import all; export where proto = \"offered\"; }};\n\
         \x20 graceful restart on;\n\
         \x20 hold time {hold};\n\
         \x20 keepalive time {keepalive};\n\
         \x20 connect retry time 1;\n\
         \x20 connect delay time 1;\n\
         \x20 error wait time 1, 5;\n\
         }}\n",
        hold = timers.hold_seconds,
        keepalive = timers.keepalive_seconds,
    );
    for peer in peers {
        // Test passwords are plain words: no quoting needed.
        let password = peer
            .password
            .as_ref()
            .map(|p| format!(" password \"{p}\";"))
            .unwrap_or_default();
        conf.push_str(&format!(
            "protocol bgp {} from tendril_node {{ neighbor {} as {};{password} }}\n",
            peer.name, peer.address, peer.asn
        ));
    }
    conf
}

/// `birdc show protocols`: name → Info (the last column; empty when there is none).
pub fn parse_protocols(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Name Proto Table State Since(date/time, 1 column) Info…
        if cols.len() >= 5 && cols[1] == "BGP" {
            out.insert(cols[0].to_string(), cols[5..].join(" "));
        }
    }
    out
}

/// `birdc show route all`: prefix → next hops (`via A on IF` lines of its routes).
pub fn parse_routes(text: &str) -> BTreeMap<Ipv4Net, BTreeSet<Ipv4Addr>> {
    let mut out: BTreeMap<Ipv4Net, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    let mut current: Option<Ipv4Net> = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .or(current.filter(|_| line.is_empty()));
            if let Some(prefix) = current {
                out.entry(prefix).or_default();
            }
            continue;
        }
        let trimmed = line.trim_start();
        if let (Some(prefix), Some(rest)) = (current, trimmed.strip_prefix("via "))
            && let Some(hop) = rest.split_whitespace().next().and_then(|h| h.parse().ok())
        {
            out.entry(prefix).or_default().insert(hop);
        }
    }
    out
}

/// A host behind the router: its namespace, `10.99.0.2/24` with the router (`10.99.0.1`)
/// as its default gateway; removed on drop.
pub struct Client {
    pub netns: String,
    pub address: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub subnet: Ipv4Net,
}

impl Client {
    pub async fn start(router: &BirdRouter, netns: &str) -> Result<Client> {
        let client = Client {
            netns: netns.to_string(),
            address: Ipv4Addr::new(10, 99, 0, 2),
            gateway: Ipv4Addr::new(10, 99, 0, 1),
            subnet: "10.99.0.0/24".parse()?,
        };
        ensure_netns(netns).await?;
        ip(&[
            "-n",
            &router.netns,
            "link",
            "add",
            "client0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        ])
        .await?;
        ip(&[
            "-n",
            &router.netns,
            "addr",
            "add",
            &format!("{}/24", client.gateway),
            "dev",
            "client0",
        ])
        .await?;
        ip(&["-n", &router.netns, "link", "set", "client0", "up"]).await?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{}/24", client.address),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", netns, "link", "set", "eth0", "up"]).await?;
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &client.gateway.to_string(),
        ])
        .await?;
        Ok(client)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        delete_netns(&self.netns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_password_is_rendered_in_its_protocol() {
        let peer = |name: &str, password: Option<&str>| RouterPeer {
            name: name.into(),
            address: Ipv4Addr::new(10, 250, 0, 10),
            asn: 64512,
            password: password.map(String::from),
        };
        let timers = RouterTimers {
            hold_seconds: 9,
            keepalive_seconds: 3,
        };
        let conf = bird_config(
            Ipv4Addr::new(10, 250, 0, 1),
            65000,
            &[peer("node0", Some("s3cret")), peer("node1", None)],
            &timers,
        );
        assert!(
            conf.contains(
                "protocol bgp node0 from tendril_node { neighbor 10.250.0.10 as 64512; password \"s3cret\"; }"
            ),
            "{conf}"
        );
        assert!(
            conf.contains(
                "protocol bgp node1 from tendril_node { neighbor 10.250.0.10 as 64512; }"
            ),
            "{conf}"
        );
    }

    #[test]
    fn birdc_output_is_read() {
        let protocols = "BIRD 2.0.12 ready.\n\
            Name       Proto      Table      State  Since         Info\n\
            device1    Device     ---        up     04:51:55.321  \n\
            node0      BGP        ---        up     04:51:56.443  Established   \n\
            node1      BGP        ---        start  04:51:55.321  Active        Socket: Connection refused\n";
        let p = parse_protocols(protocols);
        assert_eq!(p["node0"], "Established");
        assert!(p["node1"].starts_with("Active"));
        let routes = "BIRD 2.0.12 ready.\n\
            Table master4:\n\
            10.200.0.0/24        unicast [node0 04:51:56.443] * (100) [AS64512i]\n\
            \tvia 10.250.0.10 on eth0\n\
            \tType: BGP univ\n\
            \tBGP.next_hop: 10.250.0.10\n\
            198.51.100.10/32     unicast [node0 04:51:56.443] * (100) [AS64512i]\n\
            \tvia 10.250.0.10 on eth0\n\
            \tType: BGP univ\n\
            \x20                    unicast [node1 04:51:57.001] (100) [AS64512i]\n\
            \tvia 10.250.0.11 on eth0\n\
            \tType: BGP univ\n";
        let r = parse_routes(routes);
        let ecmp: Vec<String> = r[&"198.51.100.10/32".parse().unwrap()]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ecmp, ["10.250.0.10", "10.250.0.11"]);
        assert_eq!(r[&"10.200.0.0/24".parse().unwrap()].len(), 1);
    }
}
