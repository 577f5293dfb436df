//! The userspace WireGuard device: boringtun's `device` (a TUN interface, its own worker
//! threads, and the standard configuration socket `/var/run/wireguard/<name>.sock`, so
//! `wg show <name>` works), run in a process of its own — the agent binary started as
//! `tendril-agent wireguard-device <interface> <threads> [<netns>]` — inside the node's
//! network namespace.
//!
//! Why a process: boringtun 0.7.1 can panic in its event loop (a listen port set while
//! the socket it opened at creation has a higher descriptor than every one it registered;
//! descriptor numbers depend on what else the process opens and closes, so in the
//! multi-threaded agent it happened in a minority of runs). The panic leaves the device
//! alive but deaf: every later configuration request hangs, and a device in the agent
//! process could never be replaced (its TUN interface stays taken). In its own process a
//! panic aborts the device, the agent is woken and starts a new one; a device that stops
//! answering is killed and replaced the same way; and its descriptors are allocated by one
//! thread, in order, which is what keeps the bug away in the first place.
//!
//! The device lives as long as the agent: its stdin is a pipe the agent never writes to,
//! so the agent's exit (however it ends) closes it and the device exits too. It also
//! stops when its socket file is removed (boringtun's own rule).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{ChildStdin, Command, ExitCode, Stdio};
use std::sync::{LazyLock, Mutex};
use tokio::sync::Notify;

/// `tendril-agent <SUBCOMMAND> ...` runs a device instead of the agent.
pub const SUBCOMMAND: &str = "wireguard-device";

/// What the device process prints on stdout once its device is up.
const READY: &str = "ready";

/// The device processes this agent started, by interface.
static PROCESSES: LazyLock<Mutex<BTreeMap<String, DeviceProcess>>> = LazyLock::new(Mutex::default);

/// Woken when a device process ends without being asked to.
static EXITED: LazyLock<Notify> = LazyLock::new(Notify::new);

struct DeviceProcess {
    pid: u32,
    /// Held, never written: its closing is the device's signal to exit.
    _lifeline: ChildStdin,
}

fn processes() -> std::sync::MutexGuard<'static, BTreeMap<String, DeviceProcess>> {
    PROCESSES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Notified when a device process ended on its own (a crash): the caller converges again,
/// which starts a new one.
pub fn exited() -> &'static Notify {
    &EXITED
}

/// Whether the device's configuration socket answers.
pub fn running(interface: &str) -> bool {
    std::os::unix::net::UnixStream::connect(super::uapi::socket_path(interface)).is_ok()
}

/// Kills the device process of `interface`, if this agent started one: for a device
/// that stopped answering, whose interface a new one needs.
pub fn kill(interface: &str) {
    let Some(process) = processes().remove(interface) else {
        return;
    };
    // SAFETY: kill(2) on a pid of our own child, which is not reaped until its waiter
    // thread collects it, so the pid cannot have been reused.
    unsafe { libc::kill(process.pid as libc::pid_t, libc::SIGKILL) };
    // The interface and the socket go with the process: wait (briefly) until it is
    // reaped, so a new device can take the name.
    for _ in 0..200 {
        // SAFETY: signal 0 only checks for existence.
        if unsafe { libc::kill(process.pid as libc::pid_t, 0) } != 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!(%interface, pid = process.pid, "WireGuard device process killed");
}

/// Starts the device `interface` in `netns` (the agent's own namespace when `None`) with
/// `threads` worker threads, in a process of its own; returns once it is up, or why it is
/// not.
pub fn start(netns: Option<&Path>, interface: &str, threads: usize) -> Result<(), String> {
    // A process of ours that no longer answers still holds the interface.
    kill(interface);
    let exe = std::env::current_exe().map_err(|e| format!("finding the agent binary: {e}"))?;
    let mut command = Command::new(exe);
    command
        .arg(SUBCOMMAND)
        .arg(interface)
        .arg(threads.max(1).to_string());
    if let Some(netns) = netns {
        command.arg(netns);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the WireGuard device process: {e}"))?;
    let mut answer = String::new();
    let read = child
        .stdout
        .take()
        .map(|out| BufReader::new(out).read_line(&mut answer));
    if !matches!(read, Some(Ok(_))) || answer.trim_end() != READY {
        let status = child.wait().map_err(|e| e.to_string())?;
        let why = answer.trim_end();
        return Err(if why.is_empty() {
            format!("the WireGuard device process exited ({status})")
        } else {
            why.to_string()
        });
    }
    let pid = child.id();
    let lifeline = child.stdin.take().expect("stdin is piped");
    processes().insert(
        interface.to_string(),
        DeviceProcess {
            pid,
            _lifeline: lifeline,
        },
    );
    let name = interface.to_string();
    std::thread::Builder::new()
        .name(format!("wg-{interface}"))
        .spawn(move || {
            let status = child.wait();
            let mut processes = processes();
            // Still registered: nobody asked it to stop.
            if processes.get(&name).is_some_and(|p| p.pid == pid) {
                processes.remove(&name);
                drop(processes);
                tracing::error!(interface = %name, pid, status = ?status, "the WireGuard device process ended; a new one will be started");
                EXITED.notify_one();
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The device process: `args` are what follows [`SUBCOMMAND`]. Runs until the agent
/// exits, the socket file is removed, or the device fails.
pub fn process_main(args: &[String]) -> ExitCode {
    // A panic anywhere (boringtun's worker threads included) ends the process: a device
    // with a dead worker is worse than none, which the agent replaces.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let mut stdout = std::io::stdout();
    let mut fail = |message: String| {
        let _ = writeln!(stdout, "{message}");
        ExitCode::FAILURE
    };
    let (interface, threads, netns) = match args {
        [interface, threads, rest @ ..] if rest.len() <= 1 => match threads.parse::<usize>() {
            Ok(t) => (interface.clone(), t, rest.first().cloned()),
            Err(_) => {
                return fail(format!(
                    "{SUBCOMMAND}: threads must be a number, got {threads}"
                ));
            }
        },
        _ => {
            return fail(format!(
                "usage: tendril-agent {SUBCOMMAND} <interface> <threads> [<netns>]"
            ));
        }
    };
    if let Some(path) = &netns {
        let entered = File::open(path).and_then(|f| {
            // SAFETY: setns on a descriptor we own, before any other thread exists: the
            // device's threads start in the node's namespace.
            match unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
        if let Err(e) = entered {
            return fail(format!("entering {path}: {e}"));
        }
    }
    let config = boringtun::device::DeviceConfig {
        n_threads: threads.max(1),
        use_connected_socket: true,
        use_multi_queue: false,
        uapi_fd: -1,
    };
    let mut handle = match boringtun::device::DeviceHandle::new(&interface, config) {
        Ok(h) => h,
        Err(e) => return fail(format!("creating WireGuard device {interface}: {e}")),
    };
    if writeln!(stdout, "{READY}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    std::thread::spawn(move || {
        // EOF (or an error): the agent is gone.
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = std::fs::remove_file(super::uapi::socket_path(&interface));
        std::process::exit(0);
    });
    handle.wait();
    ExitCode::SUCCESS
}
