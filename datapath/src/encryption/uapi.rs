//! The cross-platform WireGuard configuration protocol (the one `wg` speaks to userspace
//! implementations): `get=1` / `set=1` over `/var/run/wireguard/<interface>.sock`, keys
//! in hex. The agent configures its device through it exactly as `wg set` would.

use super::keys::{hex, unhex};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

pub fn socket_path(interface: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{interface}.sock"))
}

/// A peer as the device has it (or should have it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    pub endpoint: Option<String>,
    /// Sorted CIDRs.
    pub allowed_ips: Vec<String>,
    pub keepalive: u16,
    /// Non-zero once a handshake happened. Not configuration.
    pub last_handshake: u64,
}

impl Peer {
    /// The endpoint is left out: the device follows a peer that roams, and replacing the
    /// peer for that would end its session.
    pub fn same_config(&self, other: &Peer) -> bool {
        self.allowed_ips == other.allowed_ips && self.keepalive == other.keepalive
    }
}

/// The device's configuration: private key, port, peers by public key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: u16,
    pub peers: BTreeMap<[u8; 32], Peer>,
}

/// How long the device may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn exchange(interface: &str, request: &str) -> std::io::Result<Vec<String>> {
    let mut stream = UnixStream::connect(socket_path(interface))?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        // A read timeout surfaces as EAGAIN ("Resource temporarily unavailable"): say what
        // it means.
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the device did not answer within {}s ({} lines read)",
                    ANSWER_TIMEOUT.as_secs(),
                    lines.len()
                ),
            ),
            _ => e,
        })?;
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    match lines.last().and_then(|l| l.strip_prefix("errno=")) {
        Some("0") => Ok(lines),
        Some(errno) => Err(std::io::Error::other(format!(
            "the device answered errno={errno}"
        ))),
        None => Err(std::io::Error::other("the device gave no answer")),
    }
}

/// Parses a `get=1` answer.
pub fn parse(lines: &[String]) -> DeviceState {
    let mut state = DeviceState::default();
    let mut peer: Option<([u8; 32], Peer)> = None;
    for line in lines {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match (k, peer.as_mut()) {
            ("private_key", _) => state.private_key = unhex(v),
            ("listen_port", _) => state.listen_port = v.parse().unwrap_or(0),
            ("public_key", _) => {
                if let Some((key, p)) = peer.take() {
                    state.peers.insert(key, p);
                }
                peer = unhex(v).map(|k| (k, Peer::default()));
            }
            ("endpoint", Some((_, p))) => p.endpoint = Some(v.to_string()),
            ("allowed_ip", Some((_, p))) => p.allowed_ips.push(v.to_string()),
            ("persistent_keepalive_interval", Some((_, p))) => p.keepalive = v.parse().unwrap_or(0),
            // The kernel writes the time of the handshake, boringtun the seconds since it:
            // either way the line means a handshake happened.
            ("last_handshake_time_sec", Some((_, p))) => {
                p.last_handshake = v.parse::<u64>().unwrap_or(0).max(1)
            }
            _ => {}
        }
    }
    if let Some((key, p)) = peer {
        state.peers.insert(key, p);
    }
    for p in state.peers.values_mut() {
        p.allowed_ips.sort();
    }
    state
}

pub fn get(interface: &str) -> std::io::Result<DeviceState> {
    Ok(parse(&exchange(interface, "get=1\n\n")?))
}

/// The `set=1` body turning `current` into `want`, or `None` when nothing differs. A
/// changed peer is removed and added again (the userspace device cannot modify one in
/// place); unchanged peers are not mentioned, so their sessions are kept.
pub fn set_request(current: &DeviceState, want: &DeviceState) -> Option<String> {
    let mut body = String::new();
    if want.private_key.is_some() && current.private_key != want.private_key {
        body += &format!(
            "private_key={}\n",
            hex(&want.private_key.unwrap_or_default())
        );
    }
    if want.listen_port != current.listen_port {
        body += &format!("listen_port={}\n", want.listen_port);
    }
    for key in current.peers.keys() {
        let stays = want
            .peers
            .get(key)
            .is_some_and(|w| w.same_config(&current.peers[key]));
        if !stays {
            body += &format!("public_key={}\nremove=true\n", hex(key));
        }
    }
    for (key, peer) in &want.peers {
        if current.peers.get(key).is_some_and(|c| c.same_config(peer)) {
            continue;
        }
        body += &format!("public_key={}\n", hex(key));
        if let Some(endpoint) = &peer.endpoint {
            body += &format!("endpoint={endpoint}\n");
        }
        body += &format!("persistent_keepalive_interval={}\n", peer.keepalive);
        for ip in &peer.allowed_ips {
            body += &format!("allowed_ip={ip}\n");
        }
    }
    (!body.is_empty()).then(|| format!("set=1\n{body}\n"))
}

pub fn set(interface: &str, request: &str) -> std::io::Result<()> {
    exchange(interface, request).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn peer(ips: &[&str]) -> Peer {
        Peer {
            endpoint: Some("10.0.0.2:51871".into()),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            keepalive: 0,
            last_handshake: 0,
        }
    }

    #[test]
    fn a_get_answer_parses_into_peers() {
        let lines: Vec<String> = [
            &format!("private_key={}", hex(&key(1))),
            "listen_port=51871",
            &format!("public_key={}", hex(&key(2))),
            "endpoint=10.0.0.2:51871",
            "allowed_ip=10.200.2.0/24",
            "allowed_ip=10.0.0.2/32",
            "last_handshake_time_sec=17",
            "persistent_keepalive_interval=5",
            "errno=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let state = parse(&lines);
        assert_eq!(state.private_key, Some(key(1)));
        assert_eq!(state.listen_port, 51871);
        let p = &state.peers[&key(2)];
        assert_eq!(p.allowed_ips, ["10.0.0.2/32", "10.200.2.0/24"]);
        assert_eq!((p.keepalive, p.last_handshake), (5, 17));
    }

    #[test]
    fn only_what_differs_is_set_and_a_changed_peer_is_replaced() {
        let mut current = DeviceState {
            private_key: Some(key(1)),
            listen_port: 51871,
            ..Default::default()
        };
        current.peers.insert(key(2), peer(&["10.200.2.0/24"]));
        current.peers.insert(key(3), peer(&["10.200.3.0/24"]));
        let mut want = current.clone();
        // A handshake is not configuration.
        want.peers.get_mut(&key(2)).unwrap().last_handshake = 99;
        assert_eq!(set_request(&current, &want), None);

        want.peers.remove(&key(3));
        want.peers
            .insert(key(2), peer(&["10.200.2.0/24", "10.0.0.2/32"]));
        want.peers.insert(key(4), peer(&["10.200.4.0/24"]));
        let body = set_request(&current, &want).unwrap();
        assert!(body.starts_with("set=1\n") && body.ends_with("\n\n"));
        assert!(body.contains(&format!("public_key={}\nremove=true\n", hex(&key(3)))));
        assert!(body.contains(&format!("public_key={}\nremove=true\n", hex(&key(2)))));
        assert!(body.contains(&format!("public_key={}\nendpoint=", hex(&key(4)))));
        assert!(!body.contains("private_key"));
        // Rotation: only the private key line.
        let mut rotated = current.clone();
        rotated.private_key = Some(key(9));
        assert_eq!(
            set_request(&current, &rotated).unwrap(),
            format!("set=1\nprivate_key={}\n\n", hex(&key(9)))
        );
    }
}
