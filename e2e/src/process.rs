//! [`Process`]: a child process (operator, agent, …) owned by a test.
//!
//! - The log (stdout and stderr) goes to the test's log directory,
//!   `~/.cache/tendril/test-logs/{binary}.{test}/{name}-{pid}-{n}-….log` (see
//!   [`crate::test_log_dir`]), where it stays after the process stops; when a test
//!   panics, the guard prints the log's path and tail to the test's stderr.
//! - Dropping the guard, also while unwinding a panic, stops the process group: SIGTERM,
//!   then SIGKILL after 10 s.
//! - A killed test binary cannot run destructors, so the child also gets
//!   `PR_SET_PDEATHSIG=SIGKILL` and a pid file in `~/.cache/tendril/test-procs/`; the first
//!   harness call of a later test binary kills what a dead owner left behind
//!   ([`sweep_stale_processes`]).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{
    cache_dir, owner_alive, owner_tag, process_start_time, target_bin_dir, test_log_dir,
};

/// Builder of a [`Process`]; see [`Process::builder`].
#[derive(Debug, Clone)]
pub struct ProcessBuilder {
    program: PathBuf,
    name: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    current_dir: Option<PathBuf>,
}

/// The command a program runs under, from `TENDRIL_E2E_WRAP_<PROGRAM>` (the file name in
/// upper case, `-` as `_`): a profiler for a benchmark, e.g.
/// `TENDRIL_E2E_WRAP_TENDRIL_OPERATOR="heaptrack -o /tmp/operator"`. The process's pid is
/// then the wrapper's.
fn wrapper(program: &Path) -> Option<Vec<String>> {
    let name = program.file_name()?.to_str()?;
    let var = format!("TENDRIL_E2E_WRAP_{}", name.to_uppercase().replace('-', "_"));
    let words: Vec<String> = std::env::var(var)
        .ok()?
        .split_whitespace()
        .map(String::from)
        .collect();
    (!words.is_empty()).then_some(words)
}

impl ProcessBuilder {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Name used for the log file (default: the program's file name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(dir.into());
        self
    }

    /// Starts the process. Fails if the program does not exist (for workspace binaries:
    /// run `cargo build --workspace --bins` first; `hack/test.sh` does).
    pub fn spawn(self) -> Result<Process> {
        sweep_stale_processes();
        if !self.program.exists() && self.program.components().count() > 1 {
            bail!(
                "{} does not exist (build it: cargo build --workspace --bins)",
                self.program.display()
            );
        }
        let dir = test_log_dir();
        std::fs::create_dir_all(&dir)?;
        let log_path = dir.join(format!("{}.log", crate::unique_name(&self.name)));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = match wrapper(&self.program) {
            Some(wrapper) => {
                let mut cmd = Command::new(&wrapper[0]);
                cmd.args(&wrapper[1..]).arg(&self.program);
                cmd
            }
            None => Command::new(&self.program),
        };
        // Logs go to a file: no ANSI colours (tracing-subscriber honours NO_COLOR).
        cmd.env("NO_COLOR", "1")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        if let Some(d) = &self.current_dir {
            cmd.current_dir(d);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.program.display()))?;
        let pid = child.id();
        let pid_file = procs_dir().join(format!("{}-{pid}.pid", owner_tag()));
        std::fs::create_dir_all(procs_dir())?;
        std::fs::write(
            &pid_file,
            format!("{pid}.{}", process_start_time(pid).unwrap_or(0)),
        )?;
        Ok(Process {
            child,
            name: self.name,
            log_path,
            pid_file,
        })
    }
}

/// A running child process, stopped when dropped. See the module docs.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
    log_path: PathBuf,
    pid_file: PathBuf,
}

impl Process {
    /// A builder for `program`: a bare name (`"tendril-operator"`) is a workspace binary in
    /// cargo's `target/debug`; a path is used as is. For tools on `PATH` pass
    /// [`Process::which`]`("name")`.
    pub fn builder(program: impl AsRef<OsStr>) -> ProcessBuilder {
        let p = Path::new(program.as_ref());
        let program = if p.components().count() == 1 {
            target_bin_dir().join(p)
        } else {
            p.to_path_buf()
        };
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".into());
        ProcessBuilder {
            program,
            name,
            args: Vec::new(),
            env: Vec::new(),
            current_dir: None,
        }
    }

    /// Full path of a program found on `PATH` (falls back to the name itself).
    pub fn which(name: &str) -> PathBuf {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Exit status if it has exited.
    pub fn try_exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill(2) with our own child's pid.
        if unsafe { libc::kill(self.child.id() as i32, signal) } != 0 {
            bail!(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills the process group at once with SIGKILL (a crash, for failover tests) and reaps it.
    pub fn kill(&mut self) {
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// Graceful stop: SIGTERM to the process group, SIGKILL after `grace`; returns the exit
    /// status.
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            self.signal_group(libc::SIGKILL); // leftovers of the group, if any
            return Some(st);
        }
        self.signal_group(libc::SIGCONT);
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.signal_group(libc::SIGKILL);
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group(libc::SIGKILL);
        self.child.wait().ok()
    }

    /// Waits until the log contains `needle` (polls the file); fails early if the process
    /// exits, with the log's tail in the error.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.try_exit_status() {
                bail!(
                    "{} exited ({st}) before logging {needle:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn signal_group(&self, sig: i32) {
        // SAFETY: kill(2) on the process group we created for our child (pgid == its pid).
        unsafe {
            libc::kill(-(self.child.id() as i32), sig);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}) log {} (last 60 lines) ----\n{}\n---- end of {} log ----",
                self.name,
                self.child.id(),
                self.log_path.display(),
                self.log_tail(60),
                self.name
            );
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

fn procs_dir() -> PathBuf {
    cache_dir().join("test-procs")
}

/// Kills processes left behind by test binaries that died without running destructors.
/// Runs once per test binary (the harness calls it on first use).
pub fn sweep_stale_processes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| sweep_dir(&procs_dir()));
}

/// Pid files are `{owner pid}.{owner start}-{child pid}.pid` holding `{child pid}.{child
/// start}`: a file whose owner is gone names a child to kill, if that child still runs.
fn sweep_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".pid") else {
            continue;
        };
        let Some((owner, _)) = stem.rsplit_once('-') else {
            continue;
        };
        if owner_alive(owner) {
            continue;
        }
        if let Ok(child) = std::fs::read_to_string(e.path())
            && owner_alive(child.trim())
            && let Some((pid, _)) = child.trim().split_once('.')
            && let Ok(pid) = pid.parse::<i32>()
        {
            // SAFETY: kill(2) on the group of a process we verified by pid + start time.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn process_logs_and_is_killed_on_drop() {
        let mut p = Process::builder(Process::which("sh"))
            .name("sleeper")
            .args(["-c", "echo hello from $GREETING; exec sleep 600"])
            .env("GREETING", "tendril")
            .spawn()
            .unwrap();
        p.wait_for_log("hello from tendril", Duration::from_secs(10))
            .await
            .unwrap();
        assert!(p.is_running());
        let pid = p.pid();
        let started = process_start_time(pid).expect("child is alive");
        let pid_file = p.pid_file.clone();
        assert!(pid_file.exists());
        drop(p);
        // Killed and reaped by Drop: the pid no longer names our child.
        assert_ne!(process_start_time(pid), Some(started));
        assert!(!pid_file.exists());
    }

    #[tokio::test]
    async fn wait_for_log_fails_fast_when_the_process_exits() {
        let mut p = Process::builder(Process::which("sh"))
            .args(["-c", "echo dying; exit 3"])
            .spawn()
            .unwrap();
        let err = p
            .wait_for_log("never printed", Duration::from_secs(30))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("dying"), "{err}");
    }

    /// A killed test binary's child is found by its pid file and killed; a live owner's is
    /// left alone.
    #[test]
    fn sweep_kills_children_of_dead_owners_only() {
        let dir = std::env::temp_dir().join(crate::unique_name("sweep"));
        std::fs::create_dir_all(&dir).unwrap();
        // Killed on drop, so a failing assertion leaves nothing behind.
        struct Guard(Child);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let spawn = || {
            Guard(
                Command::new("sleep")
                    .arg("600")
                    .process_group(0)
                    .spawn()
                    .unwrap(),
            )
        };
        let (mut orphan_guard, mut owned_guard) = (spawn(), spawn());
        let (orphan, owned) = (&mut orphan_guard.0, &mut owned_guard.0);
        let tag = |pid: u32| format!("{pid}.{}", process_start_time(pid).unwrap());
        // Owner pid 1 with a start time it never had: a dead owner.
        std::fs::write(
            dir.join(format!("1.1-{}.pid", orphan.id())),
            tag(orphan.id()),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{}-{}.pid", owner_tag(), owned.id())),
            tag(owned.id()),
        )
        .unwrap();
        sweep_dir(&dir);
        let status = orphan.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(
            owned.try_wait().unwrap().is_none(),
            "live owner's child was killed"
        );
        assert!(!dir.join(format!("1.1-{}.pid", orphan.id())).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_workspace_binary_is_a_clear_error() {
        let err = Process::builder("no-such-tendril-binary")
            .spawn()
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo build"), "{err}");
    }
}
