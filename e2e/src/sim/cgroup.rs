//! Per-node cgroup v2 subtrees for the socket LB: cgroup hooks apply per cgroup, not per
//! network namespace, so each simulated node's agent attaches its socket-LB programs to
//! `<cgroup2>/tendril-sim/<node>` and every process the simulation runs in the node's or
//! its pods' namespaces is placed there before it execs. Removed with the node (its
//! processes killed first), also when a test fails; [`sweep_stale_cgroups`] removes those a
//! dead test binary left.

use super::*;
use std::os::unix::ffi::OsStrExt as _;

/// Under the cgroup2 mount.
const SIM_CGROUPS: &str = "tendril-sim";

/// `<cgroup2 mount>/tendril-sim`, `None` without cgroup v2.
pub fn sim_cgroup_root() -> Option<PathBuf> {
    // The `cgroup2` line of the mount table (on a hybrid host /sys/fs/cgroup/unified).
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let mount = mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
    })?;
    Some(mount.join(SIM_CGROUPS))
}

/// Creates the node's cgroup; `None` without cgroup v2 (the agent then reports its socket
/// LB as failed).
pub fn create_node_cgroup(node: &str) -> Result<Option<PathBuf>> {
    let Some(root) = sim_cgroup_root() else {
        return Ok(None);
    };
    let dir = root.join(node);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
    Ok(Some(dir))
}

/// Kills every process in the cgroup (they are the simulation's own), then removes it.
pub fn remove_node_cgroup(dir: &Path) {
    for _ in 0..50 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        for pid in &pids {
            // SAFETY: kill(2) on a pid read from our own cgroup.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Makes `cmd` move itself into `cgroup` between fork and exec, so it and its children
/// start there (a socket belongs to the cgroup of the process that made it).
pub fn place_in_cgroup(cmd: &mut tokio::process::Command, cgroup: Option<&Path>) {
    let Some(cgroup) = cgroup else { return };
    let mut path = cgroup.join("cgroup.procs").as_os_str().as_bytes().to_vec();
    path.push(0);
    // SAFETY: the closure only calls async-signal-safe functions (open, write, close) on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Removes the node cgroups of test binaries that died without cleaning up
/// (`node{i}-{pid}-…` whose pid is gone).
pub fn sweep_stale_cgroups() {
    let Some(root) = sim_cgroup_root() else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("node") else {
            continue;
        };
        let pid = rest
            .split_once('-')
            .and_then(|(_, r)| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            remove_node_cgroup(&e.path());
        }
    }
}
