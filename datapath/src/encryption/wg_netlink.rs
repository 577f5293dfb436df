//! The kernel's WireGuard over generic netlink (`linux/wireguard.h`): the
//! `WG_CMD_SET_DEVICE` message that changes a device's key, port and peers, as `wg set`
//! sends it. Sent by [`super::wg_kernel`] where the kernel has WireGuard (probed at start);
//! the kernels of this project have none, so the bytes are checked by the unit tests
//! below. The message's type is the `wireguard` family id, resolved at run time
//! (`CTRL_CMD_GETFAMILY`).

use super::nlmsg::{Message, NLM_F_ACK, NLM_F_REQUEST};
use super::uapi::{DeviceState, Peer};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

pub const WG_GENL_NAME: &str = "wireguard";
pub const WG_GENL_VERSION: u8 = 1;
pub const WG_CMD_SET_DEVICE: u8 = 1;

pub const WGDEVICE_A_IFNAME: u16 = 2;
pub const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
pub const WGDEVICE_A_FLAGS: u16 = 5;
pub const WGDEVICE_A_LISTEN_PORT: u16 = 6;
pub const WGDEVICE_A_PEERS: u16 = 8;

pub const WGPEER_A_PUBLIC_KEY: u16 = 1;
pub const WGPEER_A_FLAGS: u16 = 3;
pub const WGPEER_A_ENDPOINT: u16 = 4;
pub const WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL: u16 = 5;
pub const WGPEER_A_ALLOWEDIPS: u16 = 9;
pub const WGPEER_F_REMOVE_ME: u32 = 1;
pub const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;

pub const WGALLOWEDIP_A_FAMILY: u16 = 1;
pub const WGALLOWEDIP_A_IPADDR: u16 = 2;
pub const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;

/// `struct sockaddr_in` / `sockaddr_in6` of an endpoint.
fn sockaddr(endpoint: SocketAddr) -> Vec<u8> {
    match endpoint {
        SocketAddr::V4(a) => {
            let mut s = vec![0u8; 16];
            s[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            s[2..4].copy_from_slice(&a.port().to_be_bytes());
            s[4..8].copy_from_slice(&a.ip().octets());
            s
        }
        SocketAddr::V6(a) => {
            let mut s = vec![0u8; 28];
            s[0..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            s[2..4].copy_from_slice(&a.port().to_be_bytes());
            s[4..8].copy_from_slice(&a.flowinfo().to_be_bytes());
            s[8..24].copy_from_slice(&a.ip().octets());
            s[24..28].copy_from_slice(&a.scope_id().to_ne_bytes());
            s
        }
    }
}

/// `WG_CMD_SET_DEVICE` turning `interface` from `current` into `want`, or `None` when they
/// agree: the key and port when they differ, peers gone removed (`WGPEER_F_REMOVE_ME`),
/// peers new or changed set with their allowed IPs replaced. Unchanged peers are not
/// mentioned and `WGDEVICE_F_REPLACE_PEERS` is never sent: the kernel drops every peer,
/// sessions and all, on it. Peers whose endpoint or an allowed IP does not parse are sent
/// without it.
pub fn set_device(
    family: u16,
    interface: &str,
    current: &DeviceState,
    want: &DeviceState,
    seq: u32,
) -> Option<Vec<u8>> {
    let key = want
        .private_key
        .filter(|k| current.private_key.as_ref() != Some(k));
    let port = (want.listen_port != current.listen_port).then_some(want.listen_port);
    let gone: Vec<&[u8; 32]> = current
        .peers
        .keys()
        .filter(|k| !want.peers.contains_key(*k))
        .collect();
    let changed: Vec<(&[u8; 32], &Peer)> = want
        .peers
        .iter()
        .filter(|(k, p)| !current.peers.get(*k).is_some_and(|c| c.same_config(p)))
        .collect();
    if key.is_none() && port.is_none() && gone.is_empty() && changed.is_empty() {
        return None;
    }
    // genlmsghdr: cmd, version, reserved.
    let genl = [WG_CMD_SET_DEVICE, WG_GENL_VERSION, 0, 0];
    let mut m = Message::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, &genl);
    m.string(WGDEVICE_A_IFNAME, interface);
    if let Some(key) = key {
        m.attr(WGDEVICE_A_PRIVATE_KEY, &key);
    }
    if let Some(port) = port {
        m.u16(WGDEVICE_A_LISTEN_PORT, port);
    }
    if gone.is_empty() && changed.is_empty() {
        return Some(m.finish());
    }
    m.nest(WGDEVICE_A_PEERS);
    for key in gone {
        m.nest(0);
        m.attr(WGPEER_A_PUBLIC_KEY, key);
        m.u32(WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME);
        m.end_nest();
    }
    for (key, peer) in changed {
        m.nest(0);
        m.attr(WGPEER_A_PUBLIC_KEY, key);
        m.u32(WGPEER_A_FLAGS, WGPEER_F_REPLACE_ALLOWEDIPS);
        if let Some(endpoint) = peer.endpoint.as_deref().and_then(|e| e.parse().ok()) {
            m.attr(WGPEER_A_ENDPOINT, &sockaddr(endpoint));
        }
        m.u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, peer.keepalive);
        m.nest(WGPEER_A_ALLOWEDIPS);
        for net in peer
            .allowed_ips
            .iter()
            .filter_map(|c| c.parse::<IpNet>().ok())
        {
            m.nest(0);
            match net.addr() {
                IpAddr::V4(a) => {
                    m.u16(WGALLOWEDIP_A_FAMILY, libc::AF_INET as u16);
                    m.attr(WGALLOWEDIP_A_IPADDR, &a.octets());
                }
                IpAddr::V6(a) => {
                    m.u16(WGALLOWEDIP_A_FAMILY, libc::AF_INET6 as u16);
                    m.attr(WGALLOWEDIP_A_IPADDR, &a.octets());
                }
            }
            m.u8(WGALLOWEDIP_A_CIDR_MASK, net.prefix_len());
            m.end_nest();
        }
        m.end_nest(); // allowed IPs
        m.end_nest(); // peer
    }
    m.end_nest(); // peers
    Some(m.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::nlmsg::NLA_F_NESTED;
    use crate::encryption::nlmsg::test_bytes::{u16_at, u32_at};
    use crate::encryption::uapi::Peer;

    /// (type, value) of the attributes in `b`, nested ones with the NESTED flag kept.
    fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 4 <= b.len() {
            let len = usize::from(u16_at(b, at));
            out.push((u16_at(b, at + 2), &b[at + 4..at + len]));
            at += len.div_ceil(4) * 4;
        }
        out
    }

    #[test]
    fn set_device_carries_key_port_and_nested_peers() {
        let mut want = DeviceState {
            private_key: Some([7; 32]),
            listen_port: 51871,
            ..Default::default()
        };
        want.peers.insert(
            [9; 32],
            Peer {
                endpoint: Some("10.0.0.2:51872".into()),
                allowed_ips: vec!["10.0.0.2/32".into(), "10.200.2.0/24".into()],
                keepalive: 25,
                last_handshake: 0,
            },
        );
        let msg = set_device(0x1d, "tendril_wg0", &DeviceState::default(), &want, 5).unwrap();
        assert_eq!(u32_at(&msg, 0) as usize, msg.len());
        assert_eq!(u16_at(&msg, 4), 0x1d, "the family id is the message type");
        assert_eq!(u16_at(&msg, 6), 0x1 | 0x4);
        assert_eq!(&msg[16..20], &[WG_CMD_SET_DEVICE, 1, 0, 0], "genlmsghdr");
        let device = attrs(&msg[20..]);
        let kinds: Vec<u16> = device.iter().map(|a| a.0).collect();
        assert_eq!(
            kinds,
            [
                WGDEVICE_A_IFNAME,
                WGDEVICE_A_PRIVATE_KEY,
                WGDEVICE_A_LISTEN_PORT,
                WGDEVICE_A_PEERS | NLA_F_NESTED
            ]
        );
        assert_eq!(device[0].1, b"tendril_wg0\0");
        assert_eq!(device[1].1, &[7; 32]);
        assert_eq!(device[2].1, &51871u16.to_ne_bytes(), "host order, u16");
        let peers = attrs(device[3].1);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].0, NLA_F_NESTED, "an array entry: type 0, nested");
        let peer = attrs(peers[0].1);
        assert_eq!(peer[0], (WGPEER_A_PUBLIC_KEY, &[9u8; 32][..]));
        assert_eq!(peer[1], (WGPEER_A_FLAGS, &2u32.to_ne_bytes()[..]));
        let (kind, sin) = peer[2];
        assert_eq!(kind, WGPEER_A_ENDPOINT);
        assert_eq!(sin.len(), 16, "sockaddr_in");
        assert_eq!(u16_at(sin, 0), 2);
        assert_eq!(&sin[2..4], &51872u16.to_be_bytes(), "port in network order");
        assert_eq!(&sin[4..8], &[10, 0, 0, 2]);
        assert_eq!(
            peer[3],
            (
                WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL,
                &25u16.to_ne_bytes()[..]
            )
        );
        assert_eq!(peer[4].0, WGPEER_A_ALLOWEDIPS | NLA_F_NESTED);
        let ips = attrs(peer[4].1);
        assert_eq!(ips.len(), 2);
        let second = attrs(ips[1].1);
        assert_eq!(second[0], (WGALLOWEDIP_A_FAMILY, &2u16.to_ne_bytes()[..]));
        assert_eq!(second[1], (WGALLOWEDIP_A_IPADDR, &[10u8, 200, 2, 0][..]));
        assert_eq!(second[2], (WGALLOWEDIP_A_CIDR_MASK, &[24u8][..]));
    }

    #[test]
    fn only_what_differs_is_sent_and_never_replace_peers() {
        let peer = |ips: &[&str]| Peer {
            endpoint: Some("10.0.0.2:51871".into()),
            allowed_ips: ips.iter().map(|s| s.to_string()).collect(),
            keepalive: 0,
            last_handshake: 0,
        };
        let mut current = DeviceState {
            private_key: Some([7; 32]),
            listen_port: 51871,
            ..Default::default()
        };
        current.peers.insert([1; 32], peer(&["10.200.1.0/24"]));
        current.peers.insert([2; 32], peer(&["10.200.2.0/24"]));
        let mut want = current.clone();
        // The kernel's view carries handshakes; they are not configuration.
        current.peers.get_mut(&[1; 32]).unwrap().last_handshake = 99;
        assert_eq!(set_device(0x1d, "wg", &current, &want, 1), None);
        want.peers.remove(&[2; 32]);
        want.peers.insert([3; 32], peer(&["10.200.3.0/24"]));
        let msg = set_device(0x1d, "wg", &current, &want, 2).unwrap();
        let device = attrs(&msg[20..]);
        let kinds: Vec<u16> = device.iter().map(|a| a.0).collect();
        assert_eq!(kinds, [WGDEVICE_A_IFNAME, WGDEVICE_A_PEERS | NLA_F_NESTED]);
        let peers = attrs(device[1].1);
        assert_eq!(peers.len(), 2, "peer 1 unchanged is not mentioned");
        let removed = attrs(peers[0].1);
        assert_eq!(removed[0], (WGPEER_A_PUBLIC_KEY, &[2u8; 32][..]));
        assert_eq!(removed[1], (WGPEER_A_FLAGS, &1u32.to_ne_bytes()[..]));
        let added = attrs(peers[1].1);
        assert_eq!(added[0], (WGPEER_A_PUBLIC_KEY, &[3u8; 32][..]));
        assert_eq!(added[1], (WGPEER_A_FLAGS, &2u32.to_ne_bytes()[..]));
    }

    #[test]
    fn an_ipv6_endpoint_is_a_sockaddr_in6() {
        let s = sockaddr("[fd00::2]:51871".parse().unwrap());
        assert_eq!(s.len(), 28);
        assert_eq!(u16_at(&s, 0), libc::AF_INET6 as u16);
        assert_eq!(&s[2..4], &51871u16.to_be_bytes());
        assert_eq!(s[8], 0xfd);
        assert_eq!(s[23], 2);
    }
}
