//! The userspace WireGuard device: boringtun's `device` (a TUN interface, its own worker
//! threads, and the standard configuration socket `/var/run/wireguard/<name>.sock`, so
//! `wg show <name>` works), created inside the node's network namespace and kept running
//! for the agent's lifetime. It stops when its socket file is removed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Whether the device's configuration socket answers.
pub fn running(interface: &str) -> bool {
    std::os::unix::net::UnixStream::connect(super::uapi::socket_path(interface)).is_ok()
}

/// Starts the device `interface` in `netns` (the agent's own namespace when `None`) on a
/// thread that lives as long as the device; returns once it is up, or why it is not.
pub fn start(netns: Option<&Path>, interface: &str, threads: usize) -> Result<(), String> {
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    let name = interface.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("wg-{interface}"))
        .spawn(move || {
            if let Some(path) = &netns {
                let entered = File::open(path).map_err(|e| e.to_string()).and_then(|f| {
                    // SAFETY: setns on a descriptor we own; it changes only this thread
                    // (and the device's worker threads it spawns) .
                    match unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } {
                        0 => Ok(()),
                        _ => Err(std::io::Error::last_os_error().to_string()),
                    }
                });
                if let Err(e) = entered {
                    let _ = tx.send(Err(format!("entering {}: {e}", path.display())));
                    return;
                }
            }
            let config = boringtun::device::DeviceConfig {
                n_threads: threads.max(1),
                use_connected_socket: true,
                use_multi_queue: false,
                uapi_fd: -1,
            };
            match boringtun::device::DeviceHandle::new(&name, config) {
                Ok(mut handle) => {
                    let _ = tx.send(Ok(()));
                    handle.wait();
                    tracing::warn!(interface = %name, "the WireGuard device stopped");
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("creating WireGuard device {name}: {e}")));
                }
            }
        })
        .map_err(|e| e.to_string())?;
    rx.recv()
        .map_err(|_| "the device thread ended".to_string())?
}
