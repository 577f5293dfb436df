//! What the socket LB needs of the kernel besides maps: the cookies of network namespaces
//! (`lb_netns`: whose sockets this node translates) and where cgroup v2 is mounted (the
//! default attach point).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `SO_NETNS_COOKIE` (Linux 5.14; not in every libc crate version).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace `netns` (a path such as `/var/run/netns/x` or
/// `/proc/self/ns/net`), as `bpf_get_netns_cookie` sees it: read with `SO_NETNS_COOKIE` from a
/// socket made inside it, on a thread of its own (setns changes only the calling thread).
pub fn netns_cookie(netns: &Path) -> io::Result<u64> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: a valid fd of a netns file.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: plain socket(2).
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: fd is a new, owned socket.
                let socket = unsafe { OwnedFd::from_raw_fd(fd) };
                let mut cookie: u64 = 0;
                let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
                // SAFETY: a u64 buffer of the length given.
                let rc = unsafe {
                    libc::getsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        SO_NETNS_COOKIE,
                        (&mut cookie as *mut u64).cast(),
                        &mut len,
                    )
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(cookie)
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns cookie thread panicked")))
    })
}

/// Netns cookies by path, read again only when the file behind a path changes (a pod's
/// sandbox recreated under the same name), so a pass costs no thread per pod.
#[derive(Debug, Default)]
pub struct NetnsCookies {
    known: BTreeMap<PathBuf, ((u64, u64), u64)>,
}

impl NetnsCookies {
    /// The cookies of `paths` (each with its `lb_netns` value); paths that are gone or
    /// unreadable are returned apart with the error.
    pub fn resolve(
        &mut self,
        paths: &[(PathBuf, u8)],
    ) -> (BTreeMap<u64, u8>, Vec<(PathBuf, io::Error)>) {
        let mut cookies = BTreeMap::new();
        let mut errors = Vec::new();
        let mut seen = BTreeMap::new();
        for (path, kind) in paths {
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) => {
                    errors.push((path.clone(), e));
                    continue;
                }
            };
            let id = (meta.dev(), meta.ino());
            let cookie = match self.known.get(path) {
                Some((known_id, cookie)) if *known_id == id => *cookie,
                _ => match netns_cookie(path) {
                    Ok(cookie) => cookie,
                    Err(e) => {
                        errors.push((path.clone(), e));
                        continue;
                    }
                },
            };
            seen.insert(path.clone(), (id, cookie));
            // The node's own namespace wins if a path names it twice.
            let entry = cookies.entry(cookie).or_insert(*kind);
            *entry = (*entry).min(*kind);
        }
        self.known = seen;
        (cookies, errors)
    }
}

/// The mount point of cgroup v2 in `mounts` (the text of /proc/self/mounts): the
/// `cgroup2` line (on a hybrid host, e.g. /sys/fs/cgroup/unified).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
    })
}

/// The cgroup the socket-LB hooks attach to: `configured`, or the cgroup2 mount.
pub fn socket_lb_cgroup(configured: &Path) -> io::Result<PathBuf> {
    if !configured.as_os_str().is_empty() {
        return Ok(configured.to_path_buf());
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    cgroup2_mount(&mounts).ok_or_else(|| io::Error::other("no cgroup2 mount in /proc/self/mounts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn a_netns_has_one_cookie_whatever_the_path() {
        // Needs no privilege: our own namespace, by two paths.
        let own = netns_cookie(Path::new("/proc/self/ns/net")).unwrap();
        let pid = netns_cookie(Path::new(&format!("/proc/{}/ns/net", std::process::id())));
        assert_eq!(own, pid.unwrap());
        assert_ne!(own, 0);
        let mut cookies = NetnsCookies::default();
        let (found, errors) = cookies.resolve(&[
            (PathBuf::from("/proc/self/ns/net"), 2),
            (PathBuf::from("/nonexistent/netns"), 2),
        ]);
        assert_eq!(found, BTreeMap::from([(own, 2)]));
        assert_eq!(errors.len(), 1);
    }
}
