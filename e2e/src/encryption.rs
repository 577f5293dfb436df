//! Helpers of the encryption scenarios: the shared [`Scene`] (two simulated nodes, a
//! client and an echo server pod, a WireGuard policy), an underlay capture (`tcpdump` on
//! the underlay bridge, stopped on drop) and its analysis, which reads the pcap file
//! itself: what crossed between nodes, whether any of it was clear text or fragmented.

use crate::sim::{SimCluster, SimClusterConfig, SimPod};
use crate::traffic::EchoServer;
use crate::{ControlPlane, TestEnv, eventually, wait_for};
use anyhow::{Context, Result, bail, ensure};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{EncryptionPolicy, NodeNetwork};

pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The echo server's TCP and UDP port.
pub const PORT: u16 = 8080;
pub const MARKER: &str = "TENDRIL-CLEARTEXT-MARKER-7f3a";

/// How the scene's agents route between nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    Overlay,
    Native,
}

/// Two simulated nodes on a dedicated plane, a server pod (TCP and UDP echo on [`PORT`])
/// on node 1 and a client pod on node 0, connected in clear (checked at start).
pub struct Scene {
    // Field order is drop order: the echo server and pods before the cluster and plane.
    _echo: EchoServer,
    pub client: SimPod,
    pub server: SimPod,
    pub server_ip: IpAddr,
    pub cluster: SimCluster,
    pub env: TestEnv,
    pub routing: Routing,
}

pub fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

impl Scene {
    pub async fn start(plane: &str, routing: Routing) -> Result<Scene> {
        let env = TestEnv::on(ControlPlane::dedicated(plane).await?).await?;
        let client = env.client();
        let ns = env.namespace().to_string();
        let agent_args = match routing {
            Routing::Overlay => Vec::new(),
            Routing::Native => vec!["--routing-mode".into(), "native".into()],
        };
        // Native routing is dual-stack: IPv6 pod traffic takes its own routes across the
        // underlay, and must be steered into the device as IPv4's is.
        let pool_ipv6 = (routing == Routing::Native).then(|| ("fd00:240::/104".to_string(), 112));
        let cluster = SimCluster::start(
            &env,
            SimClusterConfig {
                agent_args,
                pool_ipv6,
                ..SimClusterConfig::default()
            },
        )
        .await?;
        let server = SimPod::run(
            &client,
            cluster.nodes[1].handle(),
            &ns,
            "server",
            &labels("server"),
        )
        .await?;
        let pod = SimPod::run(
            &client,
            cluster.nodes[0].handle(),
            &ns,
            "client",
            &labels("client"),
        )
        .await?;
        server.wait_realized(&client, TIMEOUT).await?;
        pod.wait_realized(&client, TIMEOUT).await?;
        let echo = EchoServer::start(&server.sandbox.netns, PORT)?;
        let server_ip = server.ips[0];
        let scene = Scene {
            _echo: echo,
            client: pod,
            server,
            server_ip,
            cluster,
            env,
            routing,
        };
        eventually(TIMEOUT, || async {
            ensure!(
                marker_round_trips(&scene.client, scene.server_ip).await?,
                "no round trip yet"
            );
            Ok(())
        })
        .await?;
        Ok(scene)
    }

    pub fn node_ips(&self) -> Vec<Ipv4Addr> {
        self.cluster.nodes.iter().map(|n| n.address).collect()
    }

    /// Captures on the underlay while the client does `rounds` marker round trips (each
    /// must work), and on a dual-stack scene as many IPv6 TCP and UDP exchanges.
    pub async fn capture_round_trips(&self, rounds: usize) -> Result<Seen> {
        let server6 = self.server.ips.iter().find(|ip| ip.is_ipv6()).copied();
        let _servers = server6
            .map(|_| crate::ipv6::serve6(&self.server))
            .transpose()?;
        let capture = Capture::start(&self.cluster.underlay.netns, "br0")?;
        for _ in 0..rounds {
            ensure!(
                marker_round_trips(&self.client, self.server_ip).await?,
                "marker round trip"
            );
            if let Some(to) = server6 {
                // A probe may miss its 2 s timeout on a loaded machine: a few tries.
                eventually(Duration::from_secs(15), || async {
                    let tcp = crate::ipv6::tcp6(&self.client, to).await?;
                    let udp = crate::ipv6::udp6(&self.client, to).await?;
                    ensure!(tcp && udp, "IPv6 round trips to {to}: TCP {tcp}, UDP {udp}");
                    Ok(())
                })
                .await?;
            }
        }
        capture.finish(&self.node_ips(), MARKER.as_bytes())
    }

    /// Creates a WireGuard policy selecting every node (on [`WIREGUARD_PORT`]) and waits
    /// until it is Ready with both nodes encrypting; its name.
    pub async fn encrypt(&self) -> Result<String> {
        let policies: Api<EncryptionPolicy> = Api::all(self.env.client());
        let name = self.env.unique_name("wg");
        self.env.delete_on_drop::<EncryptionPolicy>(&name);
        let policy: EncryptionPolicy = serde_json::from_value(json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
            "metadata": {"name": name},
            "spec": {"mode": "WireGuard", "keyRotationIntervalSeconds": 86400,
                     "wireguard": {"listenPort": WIREGUARD_PORT}},
        }))?;
        policies.create(&PostParams::default(), &policy).await?;
        policy_ready(&policies, &name, 2).await?;
        eventually(TIMEOUT, || async {
            ensure!(
                marker_round_trips(&self.client, self.server_ip).await?,
                "no encrypted round trip yet"
            );
            Ok(())
        })
        .await?;
        Ok(name)
    }

    /// Pod MTU: a pod made on node 0 while encryption is on gets the MTU the agent
    /// published; a DF ping of exactly that size reaches the server, one byte more fails
    /// locally ("message too long"), and a bulk TCP echo crosses: the capture meanwhile
    /// sees WireGuard only and no IP fragment between the nodes. Returns the pod MTU and
    /// what the capture saw.
    pub async fn check_mtu(&self) -> Result<(u32, Seen)> {
        let client = self.env.client();
        let networks: Api<NodeNetwork> = Api::all(client.clone());
        let node = &self.cluster.nodes[0];
        let published = networks
            .get(&node.name)
            .await?
            .status
            .and_then(|s| s.encryption)
            .context("status.encryption")?;
        let pod_mtu = published.pod_mtu.context("podMtu published")? as u32;
        let device_mtu = published.mtu.context("mtu published")? as u32;
        let big = SimPod::run(
            &client,
            node.handle(),
            self.env.namespace(),
            "big",
            &labels("big"),
        )
        .await?;
        big.wait_realized(&client, TIMEOUT).await?;
        let out = big.exec(&["cat", "/sys/class/net/eth0/mtu"]).await?;
        let mtu: u32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        ensure!(
            mtu == pod_mtu,
            "the new pod's MTU {mtu} is not the published {pod_mtu}"
        );
        let to = self.server_ip.to_string();
        let capture = Capture::start(&self.cluster.underlay.netns, "br0")?;
        // ICMP payload = MTU - IPv4 20 - ICMP 8.
        let ping = |size: u32| {
            let (to, big) = (to.clone(), &big);
            async move {
                let size = size.to_string();
                big.exec(&["ping", "-M", "do", "-c", "1", "-W", "3", "-s", &size, &to])
                    .await
            }
        };
        let ok = ping(mtu - 28).await?;
        ensure!(
            ok.status.success(),
            "DF ping of {mtu} bytes: {}{}",
            String::from_utf8_lossy(&ok.stdout),
            String::from_utf8_lossy(&ok.stderr)
        );
        let too_big = ping(mtu - 27).await?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&too_big.stdout),
            String::from_utf8_lossy(&too_big.stderr)
        );
        ensure!(
            !too_big.status.success() && said.contains("message too long"),
            "a DF ping one byte over the MTU must fail locally: {said}"
        );
        let bulk = 262_144;
        let echoed = big
            .exec(&[
                "bash",
                "-c",
                &format!("head -c {bulk} /dev/urandom | socat -t 3 - TCP:{to}:{PORT} | wc -c"),
            ])
            .await?;
        let echoed: usize = String::from_utf8_lossy(&echoed.stdout).trim().parse()?;
        ensure!(echoed == bulk, "bulk TCP echo: {echoed} of {bulk} bytes");
        let seen = capture.finish(&self.node_ips(), b"")?;
        ensure!(seen.fragments == 0, "fragments on the underlay: {seen:?}");
        ensure!(seen.vxlan == 0 && seen.other.is_empty(), "{seen:?}");
        ensure!(
            seen.largest <= device_mtu + WIREGUARD_IPV4_OVERHEAD,
            "a packet larger than the device MTU plus WireGuard: {seen:?}"
        );
        big.delete(&client, node.handle()).await?;
        Ok((mtu, seen))
    }
}

/// What WireGuard adds on an IPv4 underlay (IPv4 20, UDP 8, WireGuard 32).
pub const WIREGUARD_IPV4_OVERHEAD: u32 = 60;

/// TCP (one line echoed) and UDP (one datagram echoed, through socat: bash reads a UDP
/// socket a byte per datagram) carrying the marker, from `pod` to `to`; whether both round
/// trips worked.
pub async fn marker_round_trips(pod: &SimPod, to: IpAddr) -> Result<bool> {
    let script = format!(
        "exec 3<>/dev/tcp/{to}/{PORT} || exit 3; echo {MARKER}-tcp >&3; \
         read -t 2 line <&3 && [ \"$line\" = {MARKER}-tcp ] || exit 4; \
         [ \"$(echo {MARKER}-udp | socat -t 2 - UDP:{to}:{PORT})\" = {MARKER}-udp ]"
    );
    let out = pod.exec(&["timeout", "5", "bash", "-c", &script]).await?;
    if !out.status.success() {
        eprintln!(
            "marker round trip to {to}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.status.success())
}

/// Waits until policy `name` is Ready with `nodes` encrypted nodes.
pub async fn policy_ready(
    api: &Api<EncryptionPolicy>,
    name: &str,
    nodes: i64,
) -> Result<EncryptionPolicy> {
    wait_for(
        api,
        name,
        |o: Option<&EncryptionPolicy>| {
            o.and_then(|p| p.status.as_ref()).is_some_and(|s| {
                s.encrypted_nodes == Some(nodes)
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        },
        TIMEOUT,
    )
    .await?
    .context("policy gone")
}

/// Checks that `seen` is sealed traffic: WireGuard only between the nodes (at least
/// `min_wireguard` packets), no VXLAN, no marker, nothing else on the underlay.
pub fn ensure_sealed(seen: &Seen, min_wireguard: u64) -> Result<()> {
    ensure!(seen.marker == 0, "marker seen on the underlay: {seen:?}");
    ensure!(seen.vxlan == 0, "VXLAN in clear on the underlay: {seen:?}");
    ensure!(
        seen.ipv6_transport == 0,
        "IPv6 pod traffic in clear on the underlay: {seen:?}"
    );
    ensure!(
        seen.other.is_empty(),
        "other traffic between the nodes: {seen:?}"
    );
    ensure!(
        seen.not_between_nodes == 0,
        "IPv4 on the underlay not between node addresses (pods in clear): {seen:?}"
    );
    ensure!(
        seen.wireguard >= min_wireguard,
        "the round trips went as WireGuard: {seen:?}"
    );
    Ok(())
}

/// `tcpdump -i <interface>` in a namespace (the underlay's `br0`, or a node's uplink
/// `eth0`) writing a pcap file; stopped (SIGTERM, then waited for) by [`Capture::finish`]
/// or on drop, the file removed on drop.
pub struct Capture {
    child: Option<Child>,
    pub path: PathBuf,
}

impl Capture {
    pub fn start(netns: &str, interface: &str) -> Result<Capture> {
        let path = std::env::temp_dir().join(format!(
            "tendril-enc-{}-{}.pcap",
            std::process::id(),
            rand::random::<u32>()
        ));
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", interface, "-n"])
            // Packet-buffered output and no wait in the kernel's ring: otherwise the
            // packets of the last second before SIGTERM never reach the file.
            .args(["-U", "--immediate-mode", "-s", "0", "-w"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting tcpdump (Debian package tcpdump)")?;
        let capture = Capture {
            child: Some(child),
            path,
        };
        // The file header is written once tcpdump listens.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&capture.path).map_or(0, |m| m.len()) < 24 {
            if Instant::now() > deadline {
                bail!("tcpdump did not start within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The socket is attached before the header is written; a little more for BPF.
        std::thread::sleep(Duration::from_millis(300));
        Ok(capture)
    }

    /// Stops the capture and reads what it saw.
    pub fn finish(mut self, nodes: &[Ipv4Addr], marker: &[u8]) -> Result<Seen> {
        self.stop();
        let bytes = std::fs::read(&self.path)?;
        analyze(&bytes, nodes, marker)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What crossed the underlay between two node addresses.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every packet captured.
    pub packets: u64,
    /// IPv4 packets between node addresses.
    pub between_nodes: u64,
    /// Of those: UDP to or from a WireGuard port (the policy's, or the next one used by
    /// even key generations), or a later fragment of a UDP packet.
    pub wireguard: u64,
    /// Of those: VXLAN (clear overlay).
    pub vxlan: u64,
    /// Of those: ESP (IPsec).
    pub esp: u64,
    /// IPv6 TCP or UDP packets on the underlay: the nodes speak IPv4 to each other, so
    /// these are pods' packets in clear.
    pub ipv6_transport: u64,
    /// Everything else between nodes, described.
    pub other: Vec<String>,
    /// Packets whose bytes contain the marker.
    pub marker: u64,
    /// IPv4 packets between nodes that are fragments (more-fragments flag or an offset).
    pub fragments: u64,
    /// The largest IPv4 packet between nodes (total length).
    pub largest: u32,
    /// IPv4 packets on the underlay not between two node addresses (native routing in
    /// clear: pod to pod).
    pub not_between_nodes: u64,
}

pub const WIREGUARD_PORT: u16 = 51871;
const VXLAN_PORT: u16 = 8472;

/// The two ports of a rotation's devices (odd and even key generations).
fn is_wireguard(port: u16) -> bool {
    port == WIREGUARD_PORT || port == WIREGUARD_PORT + 1
}

/// Reads a pcap (Ethernet, microsecond or nanosecond, little endian) file.
pub fn analyze(bytes: &[u8], nodes: &[Ipv4Addr], marker: &[u8]) -> Result<Seen> {
    if bytes.len() < 24 {
        bail!("pcap file of {} bytes", bytes.len());
    }
    let magic = u32::from_le_bytes(bytes[0..4].try_into()?);
    if magic != 0xa1b2c3d4 && magic != 0xa1b23c4d {
        bail!("not a little-endian pcap file (magic {magic:#x})");
    }
    let mut seen = Seen::default();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into()?) as usize;
        let Some(packet) = bytes.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        seen.packets += 1;
        if !marker.is_empty() && packet.windows(marker.len()).any(|w| w == marker) {
            seen.marker += 1;
        }
        if packet.len() >= 54 && packet[12..14] == [0x86, 0xdd] && matches!(packet[20], 6 | 17) {
            seen.ipv6_transport += 1;
            continue;
        }
        if packet.len() < 34 || packet[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &packet[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        if !(nodes.contains(&src) && nodes.contains(&dst)) {
            seen.not_between_nodes += 1;
            if seen.other.len() < 20 && !nodes.contains(&src) && !nodes.contains(&dst) {
                seen.other.push(format!("{src} -> {dst} proto {}", ip[9]));
            }
            continue;
        }
        seen.between_nodes += 1;
        seen.largest = seen
            .largest
            .max(u32::from(u16::from_be_bytes([ip[2], ip[3]])));
        let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
        if flags_offset & 0x3fff != 0 {
            seen.fragments += 1;
        }
        let fragment_offset = flags_offset & 0x1fff;
        let proto = ip[9];
        if proto == 17 && fragment_offset > 0 {
            seen.wireguard += 1;
            continue;
        }
        let ports = ip.get(ihl..ihl + 4).map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        });
        match (proto, ports) {
            (50, _) => seen.esp += 1,
            (17, Some((s, d))) if is_wireguard(s) || is_wireguard(d) => seen.wireguard += 1,
            (17, Some((_, VXLAN_PORT))) => seen.vxlan += 1,
            (p, ports) if seen.other.len() < 20 => seen
                .other
                .push(format!("{src} -> {dst} proto {p} ports {ports:?}")),
            _ => {}
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap(packets: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![0u8; 24];
        out[0..4].copy_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        for p in packets {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        out
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 12];
        p.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        p.extend_from_slice(&ip);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn packets_are_classified_and_the_marker_found() {
        let (a, b) = ([10, 250, 0, 10], [10, 250, 0, 11]);
        let nodes = [Ipv4Addr::from(a), Ipv4Addr::from(b)];
        let file = pcap(&[
            udp(a, b, 40000, WIREGUARD_PORT, b"sealed"),
            udp(b, a, 50000, VXLAN_PORT, b"..MARK.."),
            udp(a, [10, 250, 0, 99], 1, 2, b"MARK"),
        ]);
        let seen = analyze(&file, &nodes, b"MARK").unwrap();
        assert_eq!((seen.between_nodes, seen.wireguard, seen.vxlan), (2, 1, 1));
        assert_eq!(seen.marker, 2, "counted on every packet, node pair or not");
        assert!(seen.other.is_empty());
    }
}
