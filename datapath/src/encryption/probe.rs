//! What the kernel can do, found by trying it in a scratch network namespace (a thread
//! that unshares its own, so nothing of the node is touched): create a `wireguard` link,
//! install an ESP security association.

use super::{nlmsg, xfrm};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use std::net::Ipv4Addr;

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

fn esp_state() -> Result<(), String> {
    let socket = nlmsg::Socket::open(xfrm::NETLINK_XFRM)
        .map_err(|e| format!("no XFRM netlink socket: {e}"))?;
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
    socket
        .request(&msg)
        .map_err(|e| format!("installing an ESP security association (rfc4106(gcm(aes))): {e}"))
}
