//! What the kernel can do, found by trying it in a scratch network namespace (a thread
//! that unshares its own, so nothing of the node is touched): create a `wireguard` link,
//! install an ESP security association.

use super::{nlmsg, xfrm};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use std::net::Ipv4Addr;
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
    let msg = xfrm::new_sa(
        &xfrm::Sa {
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(192, 0, 2, 2),
            spi: 1,
            key: vec![7; 20],
            mode: xfrm::Mode::Transport,
        },
        1,
    );
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
    match nlmsg::ack(&reply[..n as usize])? {
        0 => Ok(()),
        errno => Err(format!(
            "installing an ESP security association (rfc4106(gcm(aes))): {}",
            std::io::Error::from_raw_os_error(-errno)
        )),
    }
}
