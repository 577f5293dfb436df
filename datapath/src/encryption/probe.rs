//! What the kernel can do, found by trying it in a scratch network namespace (a thread
//! that unshares its own, so nothing of the node is touched): create a `wireguard` link,
//! install an ESP security association.

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// What the probes found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// `Err`: why the kernel has no WireGuard.
    pub kernel_wireguard: Result<(), String>,
    /// `Err`: why the kernel cannot do ESP.
    pub esp: Result<(), String>,
}

/// Runs both probes in a fresh network namespace.
pub fn probe() -> Capabilities {
    let scratch = std::thread::spawn(|| {
        // SAFETY: unshare of this thread's network namespace only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = format!(
                "no scratch network namespace: {}",
                std::io::Error::last_os_error()
            );
            return Capabilities {
                kernel_wireguard: Err(e.clone()),
                esp: Err(e),
            };
        }
        Capabilities {
            kernel_wireguard: wireguard_link(),
            esp: esp_state(),
        }
    });
    scratch.join().unwrap_or_else(|_| Capabilities {
        kernel_wireguard: Err("probe panicked".into()),
        esp: Err("probe panicked".into()),
    })
}

fn wireguard_link() -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName("wgprobe".into()));
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
            .map_err(|e| format!("creating a wireguard link: {e}"))?;
        let _: Vec<_> = handle
            .link()
            .get()
            .match_name("wgprobe")
            .execute()
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

const NETLINK_XFRM: i32 = 6;
const XFRM_MSG_NEWSA: u16 = 0x10;
const XFRMA_ALG_AEAD: u16 = 18;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 2;
/// `sizeof(struct xfrm_usersa_info)` on 64-bit Linux.
const USERSA_INFO_LEN: usize = 224;

/// An `XFRM_MSG_NEWSA` request: ESP in transport mode between `src` and `dst` (IPv4) with
/// SPI `spi` and AEAD `rfc4106(gcm(aes))` (`key`: 16 key bytes + 4 salt bytes, ICV 128
/// bits) — what the IPsec mode installs per peer and what the probe tries.
pub fn newsa_message(src: [u8; 4], dst: [u8; 4], spi: u32, key: &[u8; 20], seq: u32) -> Vec<u8> {
    let mut info = [0u8; USERSA_INFO_LEN];
    // struct xfrm_usersa_info: sel (56) | id (daddr 16, spi 4, proto 1, pad 3) |
    // saddr (16) | lft (64) | curlft (32) | stats (12) | seq | reqid | family | mode |
    // replay_window | flags | pad.
    info[40..42].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes()); // sel.family
    info[56..60].copy_from_slice(&dst); // id.daddr
    info[72..76].copy_from_slice(&spi.to_be_bytes()); // id.spi
    info[76] = libc::IPPROTO_ESP as u8; // id.proto
    info[80..84].copy_from_slice(&src); // saddr
    // lft: no limits (XFRM_INF) on bytes and packets, soft and hard.
    for i in 0..4 {
        info[96 + 8 * i..104 + 8 * i].copy_from_slice(&u64::MAX.to_ne_bytes());
    }
    info[208..212].copy_from_slice(&spi.to_ne_bytes()); // reqid
    info[212..214].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes()); // family
    info[214] = 0; // XFRM_MODE_TRANSPORT
    info[215] = 32; // replay_window

    // struct xfrm_algo_aead: alg_name[64], alg_key_len (bits), alg_icv_len (bits), key.
    let mut aead = vec![0u8; 72];
    let name = b"rfc4106(gcm(aes))";
    aead[..name.len()].copy_from_slice(name);
    aead[64..68].copy_from_slice(&(key.len() as u32 * 8).to_ne_bytes());
    aead[68..72].copy_from_slice(&128u32.to_ne_bytes());
    aead.extend_from_slice(key);
    let attr_len = 4 + aead.len();
    let padded = attr_len.div_ceil(4) * 4;

    let total = 16 + USERSA_INFO_LEN + padded;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&XFRM_MSG_NEWSA.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&info);
    msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    msg.extend_from_slice(&XFRMA_ALG_AEAD.to_ne_bytes());
    msg.extend_from_slice(&aead);
    msg.resize(total, 0);
    msg
}

/// The kernel's answer to a request: 0 or a negative errno.
fn netlink_ack(reply: &[u8]) -> Result<i32, String> {
    if reply.len() < 20 {
        return Err(format!("short netlink reply ({} bytes)", reply.len()));
    }
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    if kind != NLMSG_ERROR {
        return Err(format!("unexpected netlink reply type {kind}"));
    }
    Ok(i32::from_ne_bytes([
        reply[16], reply[17], reply[18], reply[19],
    ]))
}

fn esp_state() -> Result<(), String> {
    // SAFETY: a plain socket call; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_XFRM,
        )
    };
    if fd < 0 {
        return Err(format!(
            "no XFRM netlink socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let msg = newsa_message([192, 0, 2, 1], [192, 0, 2, 2], 1, &[7; 20], 1);
    // SAFETY: sends our buffer on our socket (the kernel is the default destination).
    let sent = unsafe { libc::send(socket.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(format!(
            "sending XFRM_MSG_NEWSA: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut reply = [0u8; 4096];
    // SAFETY: receives into our buffer.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if n < 0 {
        return Err(format!(
            "reading the XFRM answer: {}",
            std::io::Error::last_os_error()
        ));
    }
    match netlink_ack(&reply[..n as usize])? {
        0 => Ok(()),
        errno => Err(format!(
            "installing an ESP security association (rfc4106(gcm(aes))): {}",
            std::io::Error::from_raw_os_error(-errno)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newsa_message_has_the_kernels_layout() {
        let key = [0xab; 20];
        let msg = newsa_message([10, 0, 0, 1], [10, 0, 0, 2], 3, &key, 9);
        // nlmsghdr + xfrm_usersa_info + one attribute of 4 + 72 + 20 bytes.
        assert_eq!(msg.len(), 16 + 224 + 96);
        assert_eq!(
            u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize,
            msg.len()
        );
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), XFRM_MSG_NEWSA);
        let info = &msg[16..16 + 224];
        assert_eq!(&info[56..60], &[10, 0, 0, 2], "id.daddr");
        assert_eq!(&info[72..76], &3u32.to_be_bytes(), "id.spi, network order");
        assert_eq!(info[76], 50, "id.proto ESP");
        assert_eq!(&info[80..84], &[10, 0, 0, 1], "saddr");
        assert_eq!(u16::from_ne_bytes([info[212], info[213]]), 2, "AF_INET");
        let attr = &msg[16 + 224..];
        assert_eq!(u16::from_ne_bytes([attr[0], attr[1]]), 4 + 72 + 20);
        assert_eq!(u16::from_ne_bytes([attr[2], attr[3]]), XFRMA_ALG_AEAD);
        assert!(attr[4..].starts_with(b"rfc4106(gcm(aes))\0"));
        assert_eq!(u32::from_ne_bytes(attr[68..72].try_into().unwrap()), 160);
        assert_eq!(u32::from_ne_bytes(attr[72..76].try_into().unwrap()), 128);
        assert_eq!(&attr[76..96], &key);
    }

    #[test]
    fn acks_and_errors_are_read_from_nlmsgerr() {
        let mut reply = vec![0u8; 36];
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        reply[16..20].copy_from_slice(&(-93i32).to_ne_bytes());
        assert_eq!(netlink_ack(&reply), Ok(-93));
        assert!(netlink_ack(&reply[..10]).is_err());
    }
}
