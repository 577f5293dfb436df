//! Where a node's WireGuard devices live: the userspace device (a process of the agent's)
//! ([`super::device`], boringtun, configured over the cross-platform socket
//! [`super::uapi`]) or the kernel's ([`super::wg_kernel`], over generic netlink). Both are
//! read as a [`DeviceState`] and changed by what differs from the wanted one, so a peer
//! whose configuration stays keeps its session either way.

use super::uapi::{self, DeviceState};
use super::{device, wg_kernel};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Userspace,
    Kernel,
}

impl Backend {
    /// As published in `status.encryption.wireguardImplementation` and the metric.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Userspace => "userspace",
            Backend::Kernel => "kernel",
        }
    }

    /// Whether `interface` exists (kernel) or answers on its socket (userspace).
    pub fn running(self, netns: Option<&Path>, interface: &str) -> bool {
        match self {
            Backend::Userspace => device::running(interface),
            Backend::Kernel => wg_kernel::running(netns, interface),
        }
    }

    /// Makes `interface` in `netns` (blocking).
    pub fn start(
        self,
        netns: Option<&Path>,
        interface: &str,
        threads: usize,
    ) -> Result<(), String> {
        match self {
            Backend::Userspace => device::start(netns, interface, threads),
            Backend::Kernel => wg_kernel::create(netns, interface),
        }
    }

    pub fn get(self, netns: Option<&Path>, interface: &str) -> std::io::Result<DeviceState> {
        match self {
            Backend::Userspace => uapi::get(interface).inspect_err(|e| deaf(interface, e)),
            Backend::Kernel => wg_kernel::get(netns, interface),
        }
    }

    /// Changes `interface` from `current` to `want`: whether anything was sent.
    pub fn set(
        self,
        netns: Option<&Path>,
        interface: &str,
        current: &DeviceState,
        want: &DeviceState,
    ) -> std::io::Result<bool> {
        match self {
            Backend::Userspace => match uapi::set_request(current, want) {
                Some(request) => uapi::set(interface, &request)
                    .map(|()| true)
                    .inspect_err(|e| deaf(interface, e)),
                None => Ok(false),
            },
            Backend::Kernel => wg_kernel::set(netns, interface, current, want),
        }
    }
}

/// A userspace device that does not answer is replaced: killed now, started again by the
/// next convergence (which the kill's wake-up brings).
fn deaf(interface: &str, error: &std::io::Error) {
    if error.kind() == std::io::ErrorKind::TimedOut {
        tracing::error!(%interface, %error, "the WireGuard device stopped answering; replacing it");
        device::kill(interface);
        device::exited().notify_one();
    }
}
