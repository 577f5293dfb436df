//! The kernel's WireGuard, driven over generic netlink (`linux/wireguard.h`) where the
//! kernel has it: the `wireguard` family id (`CTRL_CMD_GETFAMILY`), a device's state
//! (`WG_CMD_GET_DEVICE`, a dump whose peers may span several messages) and the change that
//! turns it into the wanted one ([`super::wg_netlink::set_device`]). Devices are links of
//! kind `wireguard` made with rtnetlink, in the node's network namespace.
//!
//! On the machines of this project the kernel has no WireGuard: the family lookup is run
//! against the real kernel by the tests (it answers `ENOENT`), the rest is checked against
//! messages laid out as the kernel lays them out.

use super::nlmsg::{self, Message, NLM_F_ACK, NLM_F_REQUEST};
use super::uapi::{DeviceState, Peer};
use super::wg_netlink::*;
use crate::cni::link::{self, LinkError};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

pub const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const WG_CMD_GET_DEVICE: u8 = 0;
const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;

/// `CTRL_CMD_GETFAMILY` of the `wireguard` family.
pub fn family_request(seq: u32) -> Vec<u8> {
    let mut m = Message::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &[CTRL_CMD_GETFAMILY, 1, 0, 0],
    );
    m.string(CTRL_ATTR_FAMILY_NAME, WG_GENL_NAME);
    m.finish()
}

/// The family id in the controller's answer, or the kernel's error (`ENOENT`: no
/// WireGuard).
pub fn family_from(messages: &[Vec<u8>]) -> std::io::Result<u16> {
    for m in messages {
        if nlmsg::kind(m) == nlmsg::NLMSG_ERROR {
            nlmsg::check(m)?;
            continue;
        }
        for (kind, value) in nlmsg::attributes(m.get(20..).unwrap_or_default()) {
            if kind == CTRL_ATTR_FAMILY_ID && value.len() >= 2 {
                return Ok(u16::from_ne_bytes([value[0], value[1]]));
            }
        }
    }
    Err(std::io::Error::other(
        "no family id in the controller's answer",
    ))
}

/// `WG_CMD_GET_DEVICE` of `interface` (a dump).
pub fn get_request(family: u16, interface: &str, seq: u32) -> Vec<u8> {
    let mut m = Message::new(
        family,
        NLM_F_REQUEST | nlmsg::NLM_F_DUMP,
        seq,
        &[WG_CMD_GET_DEVICE, WG_GENL_VERSION, 0, 0],
    );
    m.string(WGDEVICE_A_IFNAME, interface);
    m.finish()
}

fn endpoint(sockaddr: &[u8]) -> Option<String> {
    let family = u16::from_ne_bytes([*sockaddr.first()?, *sockaddr.get(1)?]);
    let port = u16::from_be_bytes([*sockaddr.get(2)?, *sockaddr.get(3)?]);
    let ip: IpAddr = match i32::from(family) {
        libc::AF_INET => Ipv4Addr::from(<[u8; 4]>::try_from(sockaddr.get(4..8)?).ok()?).into(),
        libc::AF_INET6 => Ipv6Addr::from(<[u8; 16]>::try_from(sockaddr.get(8..24)?).ok()?).into(),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port).to_string())
}

fn allowed_ip(entry: &[u8]) -> Option<String> {
    let (mut family, mut addr, mut mask) = (0u16, None, None);
    for (kind, v) in nlmsg::attributes(entry) {
        match kind {
            WGALLOWEDIP_A_FAMILY if v.len() >= 2 => family = u16::from_ne_bytes([v[0], v[1]]),
            WGALLOWEDIP_A_IPADDR => addr = Some(v),
            WGALLOWEDIP_A_CIDR_MASK => mask = v.first().copied(),
            _ => {}
        }
    }
    let ip: IpAddr = match (i32::from(family), addr?) {
        (libc::AF_INET, a) => Ipv4Addr::from(<[u8; 4]>::try_from(a).ok()?).into(),
        (libc::AF_INET6, a) => Ipv6Addr::from(<[u8; 16]>::try_from(a).ok()?).into(),
        _ => return None,
    };
    Some(format!("{ip}/{}", mask?))
}

/// The device state in a `WG_CMD_GET_DEVICE` dump. A peer whose allowed IPs did not fit
/// one message continues in the next one under the same key.
pub fn parse_device(messages: &[Vec<u8>]) -> std::io::Result<DeviceState> {
    let mut state = DeviceState::default();
    for m in messages {
        match nlmsg::kind(m) {
            nlmsg::NLMSG_ERROR => nlmsg::check(m)?,
            nlmsg::NLMSG_DONE => {}
            _ => parse_device_message(m.get(20..).unwrap_or_default(), &mut state),
        }
    }
    for peer in state.peers.values_mut() {
        peer.allowed_ips.sort();
        peer.allowed_ips.dedup();
    }
    Ok(state)
}

fn parse_device_message(attrs: &[u8], state: &mut DeviceState) {
    for (kind, value) in nlmsg::attributes(attrs) {
        match kind {
            WGDEVICE_A_PRIVATE_KEY => state.private_key = value.try_into().ok(),
            WGDEVICE_A_LISTEN_PORT if value.len() >= 2 => {
                state.listen_port = u16::from_ne_bytes([value[0], value[1]])
            }
            WGDEVICE_A_PEERS => {
                for (_, entry) in nlmsg::attributes(value) {
                    parse_peer(entry, state);
                }
            }
            _ => {}
        }
    }
}

fn parse_peer(entry: &[u8], state: &mut DeviceState) {
    let attrs = nlmsg::attributes(entry);
    let Some(key) = attrs
        .iter()
        .find(|(k, _)| *k == WGPEER_A_PUBLIC_KEY)
        .and_then(|(_, v)| <[u8; 32]>::try_from(*v).ok())
    else {
        return;
    };
    let peer = state.peers.entry(key).or_insert_with(|| Peer {
        endpoint: None,
        allowed_ips: Vec::new(),
        keepalive: 0,
        last_handshake: 0,
    });
    for (kind, v) in attrs {
        match kind {
            WGPEER_A_ENDPOINT => peer.endpoint = endpoint(v),
            WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL if v.len() >= 2 => {
                peer.keepalive = u16::from_ne_bytes([v[0], v[1]])
            }
            // struct __kernel_timespec: seconds first.
            WGPEER_A_LAST_HANDSHAKE_TIME if v.len() >= 8 => {
                peer.last_handshake =
                    i64::from_ne_bytes(v[..8].try_into().unwrap_or_default()).max(0) as u64
            }
            WGPEER_A_ALLOWEDIPS => peer.allowed_ips.extend(
                nlmsg::attributes(v)
                    .into_iter()
                    .filter_map(|(_, e)| allowed_ip(e)),
            ),
            _ => {}
        }
    }
}

/// The `wireguard` family id, asked in `netns`.
fn family(socket: &nlmsg::Socket) -> std::io::Result<u16> {
    family_from(&socket.messages(&family_request(1))?)
}

fn in_netns<T: Send + 'static>(
    netns: Option<&Path>,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    link::run_in(netns, move |_| async move { Ok(work()) })
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

/// Whether the kernel in `netns` has WireGuard: its family id.
pub fn probe(netns: Option<&Path>) -> std::io::Result<u16> {
    in_netns(netns, || family(&nlmsg::Socket::open(NETLINK_GENERIC)?))
}

/// `interface`'s state, read in `netns`.
pub fn get(netns: Option<&Path>, interface: &str) -> std::io::Result<DeviceState> {
    let name = interface.to_string();
    in_netns(netns, move || {
        let socket = nlmsg::Socket::open(NETLINK_GENERIC)?;
        let id = family(&socket)?;
        parse_device(&socket.messages(&get_request(id, &name, 2))?)
    })
}

/// Turns `interface` from `current` into `want` (nothing sent when they agree): whether
/// anything changed.
pub fn set(
    netns: Option<&Path>,
    interface: &str,
    current: &DeviceState,
    want: &DeviceState,
) -> std::io::Result<bool> {
    let name = interface.to_string();
    let (current, want) = (current.clone(), want.clone());
    in_netns(netns, move || {
        let socket = nlmsg::Socket::open(NETLINK_GENERIC)?;
        let id = family(&socket)?;
        match set_device(id, &name, &current, &want, 3) {
            Some(msg) => socket.request(&msg).map(|()| true),
            None => Ok(false),
        }
    })
}

/// Whether a link named `interface` exists in `netns`.
pub fn running(netns: Option<&Path>, interface: &str) -> bool {
    let name = interface.to_string();
    link::run_in(netns, move |handle| async move {
        let found: Result<Vec<LinkMessage>, _> = handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_collect()
            .await;
        Ok(found.is_ok_and(|l| !l.is_empty()))
    })
    .unwrap_or(false)
}

/// Makes the `wireguard` link `interface` in `netns` (left down: the steering brings it up
/// with its MTU).
pub fn create(netns: Option<&Path>, interface: &str) -> Result<(), String> {
    let name = interface.to_string();
    link::run_in(netns, move |handle| async move {
        let mut message = LinkMessage::default();
        message.attributes.push(LinkAttribute::IfName(name.clone()));
        message
            .attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Wireguard,
            )]));
        handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|source| LinkError::Netlink {
                context: format!("creating wireguard link {name}"),
                source,
            })
    })
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::nlmsg::test_bytes::u16_at;

    const WGDEVICE_A_IFINDEX: u16 = 1;

    /// A message as the kernel sends it: header, genlmsghdr, attributes.
    fn kernel_message(kind: u16, build: impl FnOnce(&mut Message)) -> Vec<u8> {
        let mut m = Message::new(kind, 0x2, 1, &[WG_CMD_GET_DEVICE, 1, 0, 0]);
        build(&mut m);
        m.finish()
    }

    fn peer_entry(m: &mut Message, key: u8, ips: &[([u8; 4], u8)], handshake: i64) {
        m.nest(0);
        m.attr(WGPEER_A_PUBLIC_KEY, &[key; 32]);
        let mut sin = vec![0u8; 16];
        sin[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        sin[2..4].copy_from_slice(&51872u16.to_be_bytes());
        sin[4..8].copy_from_slice(&[10, 0, 0, key]);
        m.attr(WGPEER_A_ENDPOINT, &sin);
        m.u16(WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL, 25);
        let mut ts = handshake.to_ne_bytes().to_vec();
        ts.extend_from_slice(&0i64.to_ne_bytes());
        m.attr(WGPEER_A_LAST_HANDSHAKE_TIME, &ts);
        m.nest(WGPEER_A_ALLOWEDIPS);
        for (ip, mask) in ips {
            m.nest(0);
            m.u16(WGALLOWEDIP_A_FAMILY, libc::AF_INET as u16);
            m.attr(WGALLOWEDIP_A_IPADDR, ip);
            m.u8(WGALLOWEDIP_A_CIDR_MASK, *mask);
            m.end_nest();
        }
        m.end_nest();
        m.end_nest();
    }

    #[test]
    fn a_dump_split_over_messages_is_one_device() {
        let first = kernel_message(0x1d, |m| {
            m.u32(WGDEVICE_A_IFINDEX, 7);
            m.attr(WGDEVICE_A_PRIVATE_KEY, &[5; 32]);
            m.u16(WGDEVICE_A_LISTEN_PORT, 51871);
            m.nest(WGDEVICE_A_PEERS);
            peer_entry(m, 2, &[([10, 200, 2, 0], 24)], 1_700_000_000);
            peer_entry(m, 3, &[([10, 0, 0, 3], 32)], 0);
            m.end_nest();
        });
        // The kernel continues peer 3's allowed IPs in the next message.
        let second = kernel_message(0x1d, |m| {
            m.nest(WGDEVICE_A_PEERS);
            peer_entry(m, 3, &[([10, 200, 3, 0], 24)], 0);
            m.end_nest();
        });
        let done = Message::new(nlmsg::NLMSG_DONE, 0x2, 1, &0i32.to_ne_bytes()).finish();
        let state = parse_device(&[first, second, done]).unwrap();
        assert_eq!(state.private_key, Some([5; 32]));
        assert_eq!(state.listen_port, 51871);
        assert_eq!(state.peers.len(), 2);
        let p2 = &state.peers[&[2; 32]];
        assert_eq!(p2.endpoint.as_deref(), Some("10.0.0.2:51872"));
        assert_eq!((p2.keepalive, p2.last_handshake), (25, 1_700_000_000));
        assert_eq!(p2.allowed_ips, ["10.200.2.0/24"]);
        assert_eq!(
            state.peers[&[3; 32]].allowed_ips,
            ["10.0.0.3/32", "10.200.3.0/24"]
        );
    }

    #[test]
    fn the_family_request_names_wireguard_and_errors_are_the_kernels() {
        let msg = family_request(4);
        assert_eq!(u16_at(&msg, 4), GENL_ID_CTRL);
        assert_eq!(&msg[16..20], &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
        let attrs = nlmsg::attributes(&msg[20..]);
        assert_eq!(attrs, [(CTRL_ATTR_FAMILY_NAME, &b"wireguard\0"[..])]);
        let mut reply = Message::new(GENL_ID_CTRL, 0, 4, &[1, 2, 0, 0]);
        reply.string(CTRL_ATTR_FAMILY_NAME, "wireguard");
        reply.u16(CTRL_ATTR_FAMILY_ID, 0x21);
        assert_eq!(family_from(&[reply.finish()]).unwrap(), 0x21);
        let mut error = vec![0u8; 36];
        error[4..6].copy_from_slice(&nlmsg::NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        let e = family_from(&[error]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    /// The real kernel, asked in a scratch namespace: this one has no WireGuard, so the
    /// controller answers ENOENT (a kernel with it answers its id, and the agent drives it).
    #[test]
    fn the_running_kernel_answers_the_family_lookup() {
        let scratch = std::thread::spawn(|| {
            // SAFETY: unshare of this thread's network namespace only.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(nlmsg::Socket::open(NETLINK_GENERIC).and_then(|s| family(&s)))
        })
        .join()
        .unwrap();
        let Some(answer) = scratch else {
            eprintln!("no scratch network namespace (not root): skipped");
            return;
        };
        match answer {
            Ok(id) => assert!(id >= GENL_ID_CTRL, "a dynamic family id: {id}"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}"),
        }
    }
}
