//! The node's gobgpd: started in the node's network namespace with its API on a unix
//! socket, supervised (restarted with backoff when it exits), stopped when the node no
//! longer runs a speaker.
//!
//! gobgpd keeps its state in memory only: each start is a new *epoch*, and the reconciler
//! configures a new epoch from scratch. The daemon dies with the agent (`PR_SET_PDEATHSIG`):
//! a daemon the agent no longer knows would keep advertising what nobody reconciles. It
//! ends without a NOTIFICATION (SIGKILL) when the agent stops or crashes, so peers with
//! graceful restart keep the node's routes until the next agent's daemon re-advertises
//! them; it ends with one (SIGTERM: gobgpd sends Cease) when the node's speaker is
//! removed, so peers withdraw at once.

use super::metrics::BgpMetrics;
use crate::agent::view::Wake;
use backon::{BackoffBuilder, ExponentialBuilder};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How the daemon is run.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The gobgpd binary.
    pub gobgpd: PathBuf,
    /// Its API socket (`--api-hosts unix://…`).
    pub socket: PathBuf,
    /// The node's network namespace; `None`: the agent's own.
    pub netns: Option<PathBuf>,
    /// First and longest delay between restarts after the daemon exits.
    pub restart_min: Duration,
    pub restart_max: Duration,
}

/// The daemon as the reconciler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonState {
    Stopped,
    /// Running, its API socket open; `epoch` counts the starts of this process.
    Running {
        epoch: u64,
    },
}

/// A daemon running stays up this long before its next exit counts as a new failure
/// series (the restart delay starts again from the shortest).
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a started daemon may take to open its API socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(15);
/// How long gobgpd may take to say goodbye to its peers on SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle of the supervising task.
pub struct Daemon {
    wanted: watch::Sender<bool>,
    state: watch::Receiver<DaemonState>,
}

impl Daemon {
    /// Starts supervising (the daemon itself starts once [`Daemon::want`] asks for it).
    /// Every start and exit touches `wake`; `shutdown` kills the daemon.
    pub fn spawn(
        cfg: DaemonConfig,
        metrics: BgpMetrics,
        wake: Wake,
        shutdown: CancellationToken,
    ) -> Self {
        let (wanted, wanted_rx) = watch::channel(false);
        let (state_tx, state) = watch::channel(DaemonState::Stopped);
        tokio::spawn(supervise(cfg, wanted_rx, state_tx, metrics, wake, shutdown));
        Self { wanted, state }
    }

    /// Whether the node runs a speaker now.
    pub fn want(&self, running: bool) {
        self.wanted
            .send_if_modified(|w| std::mem::replace(w, running) != running);
    }

    pub fn state(&self) -> DaemonState {
        *self.state.borrow()
    }
}

fn restart_backoff(cfg: &DaemonConfig) -> impl Iterator<Item = Duration> + use<> {
    ExponentialBuilder::default()
        .with_min_delay(cfg.restart_min)
        .with_max_delay(cfg.restart_max)
        .with_jitter()
        .without_max_times()
        .build()
}

async fn supervise(
    cfg: DaemonConfig,
    mut wanted: watch::Receiver<bool>,
    state: watch::Sender<DaemonState>,
    metrics: BgpMetrics,
    wake: Wake,
    shutdown: CancellationToken,
) {
    let mut epoch = 0u64;
    let mut delays = restart_backoff(&cfg);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ok = async { wanted.wait_for(|w| *w).await.is_ok() } => if !ok { return },
        }
        let mut child = match start(&cfg).await {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(gobgpd = %cfg.gobgpd.display(), %error, "gobgpd could not be started");
                metrics.daemon_restarts.inc();
                let delay = delays.next().unwrap_or(cfg.restart_max);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        epoch += 1;
        let started = Instant::now();
        tracing::info!(pid = ?child.id(), epoch, socket = %cfg.socket.display(), "gobgpd started");
        metrics.daemon_up.set(1);
        state.send_replace(DaemonState::Running { epoch });
        wake.touch();
        tokio::select! {
            status = child.wait() => {
                metrics.daemon_up.set(0);
                metrics.daemon_restarts.inc();
                state.send_replace(DaemonState::Stopped);
                wake.touch();
                if started.elapsed() >= STABLE_AFTER {
                    delays = restart_backoff(&cfg);
                }
                let delay = delays.next().unwrap_or(cfg.restart_max);
                tracing::warn!(?status, restart_in = ?delay, "gobgpd exited: restarting it (its sessions and paths are re-applied)");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            _ = async { wanted.wait_for(|w| !*w).await.is_ok() } => {
                stop(&mut child).await;
                metrics.daemon_up.set(0);
                state.send_replace(DaemonState::Stopped);
                tracing::info!("gobgpd stopped: the node runs no BGP speaker");
                delays = restart_backoff(&cfg);
            }
            _ = shutdown.cancelled() => {
                // No NOTIFICATION: peers with graceful restart keep the routes.
                let _ = child.kill().await;
                let _ = std::fs::remove_file(&cfg.socket);
                metrics.daemon_up.set(0);
                return;
            }
        }
    }
}

/// SIGTERM (gobgpd closes its sessions with a Cease NOTIFICATION), then SIGKILL.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: a signal to our own child, which has not been reaped (wait not returned).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    if tokio::time::timeout(STOP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// Spawns gobgpd in the node's namespace and waits until its API socket accepts
/// connections.
async fn start(cfg: &DaemonConfig) -> std::io::Result<Child> {
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket left by a daemon that was killed: gobgpd cannot listen while it exists.
    match std::fs::remove_file(&cfg.socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let netns = cfg
        .netns
        .as_deref()
        .map(std::fs::File::open)
        .transpose()
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening the node's netns: {e}")))?;
    let mut command = Command::new(&cfg.gobgpd);
    command
        .arg(format!("--api-hosts=unix://{}", cfg.socket.display()))
        .args(["--pprof-disable", "--log-plain", "--log-level=info"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let parent = std::process::id();
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: only async-signal-safe calls (setns, prctl, getppid, _exit) between fork and
    // exec; the descriptor stays open (owned by `netns`) until spawn returns.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Dies with the agent (see the module docs).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", cfg.gobgpd.display())))?;
    drop(netns);
    forward_logs(&mut child);
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    loop {
        if tokio::net::UnixStream::connect(&cfg.socket).await.is_ok() {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "gobgpd exited before opening its API socket: {status}"
            )));
        }
        if Instant::now() >= deadline {
            let _ = child.kill().await;
            return Err(std::io::Error::other(format!(
                "gobgpd did not open {} within {SOCKET_TIMEOUT:?}",
                cfg.socket.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// gobgpd's log lines into the agent's log (target `gobgpd`).
fn forward_logs(child: &mut Child) {
    fn forward<R: tokio::io::AsyncRead + Unpin + Send + 'static>(reader: R) {
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::info!(target: "gobgpd", "{}", line.trim());
            }
        });
    }
    if let Some(out) = child.stdout.take() {
        forward(out);
    }
    if let Some(err) = child.stderr.take() {
        forward(err);
    }
}

/// The default socket of a node's daemon: `{state_dir}/bgp/gobgpd.sock`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("bgp").join("gobgpd.sock")
}
