//! [`free_port`]: a port for a process a test starts (an operator's or agent's metrics, an
//! Observer API, a relay), reserved for the life of the test binary.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use rand::Rng;

use crate::util::cache_dir;

/// Ports handed out by [`free_port`]: below every plane's ports and the kernel's ephemeral
/// range, above the shared plane's (22379/22380/26443 by default).
const FIRST: u16 = 27_000;
const END: u16 = 30_000;

/// The lock files of the ports this test binary holds; the kernel drops the locks when the
/// binary exits, also when it is killed.
static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

/// A port free on 127.0.0.1, for a process a test starts, and nobody else's until this test
/// binary exits.
///
/// Not the kernel's choice of port 0, as it was: that port lies in the ephemeral range, and
/// in the seconds before the process binds it any outgoing connection on the machine may take
/// it as its local port; the bind then fails with "address already in use" (seen in CI as
/// an agent that could not bind its metrics port). Here a port comes from 27000-29999, which
/// only listeners use, and a `flock`ed `~/.cache/tendril/test-ports/single-PORT.lock` keeps
/// every other test binary, and this one, off it.
pub fn free_port() -> Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let end = END.min(ephemeral_low);
    if end <= FIRST + 100 {
        // An unusual range (nearly every port ephemeral): the kernel's choice.
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    }
    let dir = cache_dir().join("test-ports");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let count = end - FIRST;
    let start = rand::rng().random_range(0..count);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..count {
        let port = FIRST + (start + i) % count;
        // Held by a test binary (this one, too: a lock per open file): next.
        let Some(file) = try_lock(&dir.join(format!("single-{port}.lock")))? else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            held.push(file);
            return Ok(port);
        }
    }
    bail!(
        "no free port in {FIRST}-{} (locks in {})",
        end - 1,
        dir.display()
    )
}

/// The lock file `path` (created if missing), `flock`ed exclusively; `None` when another
/// open file holds it. The kernel drops the lock when the file is closed, also when the
/// process is killed.
pub(crate) fn try_lock(path: &Path) -> Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a file descriptor we own.
    let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    Ok(locked.then_some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_and_bindable() -> Result<()> {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect::<Result<_>>()?;
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!((FIRST..END).contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port))?;
        }
        Ok(())
    }
}
