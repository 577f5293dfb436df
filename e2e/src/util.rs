//! Paths, unique names and process liveness shared by the harness modules.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;

/// Root of the repository (the harness runs `hack/` scripts and reads `crds/manifests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e crate lives inside the repository")
        .to_path_buf()
}

/// `$TENDRIL_CACHE`, else `$XDG_CACHE_HOME/tendril`, else `~/.cache/tendril` (as `hack/lib/common.sh`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TENDRIL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("tendril")
}

/// The control-plane binaries built by `hack/control-plane-build.sh` (kubectl 1.36 among them).
pub fn k8s_bin_dir() -> PathBuf {
    cache_dir().join("k8s-1.36.3").join("bin")
}

/// Cargo's target profile directory holding the workspace binaries (`target/debug`), found
/// from the running test executable (`target/debug/deps/NAME-HASH`), else from
/// `$CARGO_TARGET_DIR`.
pub fn target_bin_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(deps) = exe.parent()
        && deps.file_name().is_some_and(|n| n == "deps")
        && let Some(profile) = deps.parent()
    {
        return profile.to_path_buf();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("target"));
    target.join("debug")
}

/// Where the logs that explain a failure are kept: `$TENDRIL_TEST_LOGS`, else
/// `~/.cache/tendril/test-logs` (as `hack/lib/common.sh`). Nothing of the harness deletes
/// what is there except a rerun of the same test replacing its own directory.
pub fn test_logs_root() -> PathBuf {
    std::env::var_os("TENDRIL_TEST_LOGS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("test-logs"))
}

/// The log directory of the running test, `{root}/{binary}.{test}` (e.g.
/// `control_plane.dedicated_plane_restarts_components_and_keeps_data`; `::` in a test path
/// becomes `.`): logs of the [`crate::Process`]es it spawns and of its
/// [`crate::ControlPlane::dedicated`] planes. The test is found by the name of the current
/// thread, which libtest gives the test (a `#[tokio::test]` body runs on it); elsewhere (a
/// tokio worker, a binary's `main`) it is that thread's name. On first use by this process
/// the directory of the test's previous run, if any, becomes `{binary}.{test}.prev` (the one
/// before that is dropped), so a rerun never takes the logs of the failure it reruns.
/// `hack/test.sh` removes the directories of the tests that passed.
pub fn test_log_dir() -> PathBuf {
    static SEEN: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed").replace("::", ".");
    let dir = test_logs_root().join(format!("{}.{}", binary_name(), sanitize(&test)));
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.contains(&dir) {
        if dir.exists() {
            let mut prev = dir.clone().into_os_string();
            prev.push(".prev");
            let _ = std::fs::remove_dir_all(&prev);
            let _ = std::fs::rename(&dir, &prev);
        }
        seen.push(dir.clone());
    }
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The running executable's name without cargo's `-HASH` suffix (`control_plane`).
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into());
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() >= 8 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem,
    }
}

/// A file-name-safe version of `s`: letters, digits, `_`, `-` and `.` kept, the rest `_`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Copies the files of `from` (not recursively) into `to`, creating it; returns how many
/// were copied. For keeping a plane's logs before its run dir is deleted.
pub fn copy_files(from: &Path, to: &Path) -> std::io::Result<usize> {
    std::fs::create_dir_all(to)?;
    let mut n = 0;
    for e in std::fs::read_dir(from)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
            n += 1;
        }
    }
    Ok(n)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique across tests, test binaries and runs, valid as a DNS-1123 label (and so as
/// a Kubernetes object or namespace name): `{prefix}-{pid}-{counter}-{4 random chars}`.
/// The prefix is lowercased, non-alphanumerics become `-`, and it is cut to 36 characters.
pub fn unique_name(prefix: &str) -> String {
    let mut p: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(36)
        .collect();
    while p.ends_with('-') {
        p.pop();
    }
    while p.starts_with('-') {
        p.remove(0);
    }
    if p.is_empty() {
        p.push('x');
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut rng = rand::rng();
    let suffix: String = (0..4)
        .map(|_| {
            let i = rng.random_range(0..36u8);
            (if i < 10 { b'0' + i } else { b'a' + i - 10 }) as char
        })
        .collect();
    format!("{p}-{}-{n}-{suffix}", std::process::id())
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/PID/stat`): with the
/// pid it identifies a process even after the pid is reused.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `pid.starttime` of this process: the owner tag written into pid files and namespace labels.
pub fn owner_tag() -> String {
    let pid = std::process::id();
    format!("{pid}.{}", process_start_time(pid).unwrap_or(0))
}

/// Whether the process an owner tag (`pid.starttime`) names is still alive.
pub fn owner_alive(tag: &str) -> bool {
    let Some((pid, start)) = tag.split_once('.') else {
        return false;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_dns_labels_and_distinct() {
        let a = unique_name("My_Test.Case");
        let b = unique_name("My_Test.Case");
        assert_ne!(a, b);
        assert!(a.starts_with("my-test-case-"), "{a}");
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        let long = unique_name(&"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
        assert!(unique_name("--").starts_with("x-"));
    }

    /// libtest names the thread after the test: that is the directory, under the binary.
    #[test]
    fn test_log_dir_is_named_after_the_binary_and_the_test() {
        let dir = test_log_dir();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            name,
            "tendril_e2e.util.tests.test_log_dir_is_named_after_the_binary_and_the_test"
        );
        assert!(dir.is_dir());
        assert_eq!(dir.parent(), Some(test_logs_root().as_path()));
        std::fs::remove_dir_all(&dir).unwrap();
        let _ = std::fs::remove_dir_all(format!("{}.prev", dir.display()));
    }

    #[test]
    fn own_owner_tag_is_alive_and_garbage_is_not() {
        assert!(owner_alive(&owner_tag()));
        assert!(!owner_alive("1.1"));
        assert!(!owner_alive("nonsense"));
        assert!(!owner_alive(&format!("{}.0", u32::MAX)));
    }
}
