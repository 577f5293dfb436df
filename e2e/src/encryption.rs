//! Helpers of the encryption scenarios: an underlay capture (`tcpdump` on the underlay
//! bridge, stopped on drop) and its analysis, which reads the pcap file itself: what
//! crossed between nodes, whether any of it was clear text.

use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// Of those: UDP to or from the WireGuard port, or a later fragment of a UDP packet.
    pub wireguard: u64,
    /// Of those: VXLAN (clear overlay).
    pub vxlan: u64,
    /// Everything else between nodes, described.
    pub other: Vec<String>,
    /// Packets whose bytes contain the marker.
    pub marker: u64,
}

pub const WIREGUARD_PORT: u16 = 51871;
const VXLAN_PORT: u16 = 8472;

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
        if packet.len() < 34 || packet[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &packet[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        if !(nodes.contains(&src) && nodes.contains(&dst)) {
            continue;
        }
        seen.between_nodes += 1;
        let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
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
            (17, Some((s, d))) if s == WIREGUARD_PORT || d == WIREGUARD_PORT => seen.wireguard += 1,
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
