//! What the kernel can do, found by trying it in a scratch network namespace (a thread
//! that unshares its own, so nothing of the node is touched): create a `wireguard` link,
//! install an ESP security association.

use super::{nlmsg, wg_kernel, xfrm};
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

/// A `wireguard` link, made in the scratch namespace (the thread `run_in` starts inherits
/// it), and the kernel's generic-netlink family the agent would drive it with.
fn wireguard_link() -> Result<(), String> {
    wg_kernel::create(None, "wgprobe")?;
    if !wg_kernel::running(None, "wgprobe") {
        return Err("the wireguard link made is not there".into());
    }
    wg_kernel::probe(None)
        .map(drop)
        .map_err(|e| format!("the wireguard generic-netlink family: {e}"))
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
