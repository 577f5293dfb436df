//! Real packets for the truth table: TCP and UDP servers inside pods, concurrent probes
//! from every pod, and the table upstream's netpol e2e prints (rows = from, cols = to,
//! `.` = connected, `X` = not).
//!
//! Every pod gets one thread that enters its network namespace and runs a current-thread
//! tokio runtime there, so every socket it makes lives in the pod. A probe is allowed when
//! a TCP handshake completes or a UDP datagram is echoed back. Anything else — timeout,
//! connection refused, ICMP unreachable — counts as not reachable: the servers always
//! listen, so a refusal can only mean the path is broken (refusals are counted separately
//! for the report). A failing probe is retried twice with fresh sockets (new source port)
//! and longer timeouts, so a datagram lost to neighbour resolution is not a false deny.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::sync::watch;

use super::model::Protocol;
use crate::traffic::spawn_in_netns;

/// Timeouts of the first try and the two retries of a failing probe.
pub const TRY_TIMEOUTS: [Duration; 3] = [
    Duration::from_millis(300),
    Duration::from_millis(300),
    Duration::from_millis(400),
];

const PAYLOAD: &[u8] = b"tendril-probe";

/// Whether this kernel has SCTP (`socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)` works).
pub fn sctp_supported() -> bool {
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        true
    } else {
        false
    }
}

/// TCP and UDP servers on some ports inside one pod; stopped on drop.
pub struct Servers {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Servers {
    /// Listens on `0.0.0.0:{port}` for TCP (accepts and closes) and UDP (echoes) on each
    /// port, inside `netns`; returns once every socket is bound.
    pub fn start(netns: &str, ports: &[u16]) -> Result<Servers> {
        let (stop, mut stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let ports = ports.to_vec();
        let thread = spawn_in_netns(netns, move || async move {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            let bound: Result<()> = async {
                for &port in &ports {
                    tcp.push(TcpListener::bind(("0.0.0.0", port)).await?);
                    udp.push(UdpSocket::bind(("0.0.0.0", port)).await?);
                }
                Ok(())
            }
            .await;
            let failed = bound.is_err();
            let _ = ready_tx.send(bound);
            if failed {
                return Ok(());
            }
            let mut tasks = tokio::task::JoinSet::new();
            for listener in tcp {
                tasks.spawn(async move {
                    loop {
                        // Accept and close: the handshake is what the probe measures.
                        if let Ok((stream, _)) = listener.accept().await {
                            drop(stream);
                        }
                    }
                });
            }
            for socket in udp {
                tasks.spawn(async move {
                    let mut buf = [0u8; 256];
                    loop {
                        if let Ok((n, from)) = socket.recv_from(&mut buf).await {
                            let _ = socket.send_to(&buf[..n], from).await;
                        }
                    }
                });
            }
            let _ = stopped.wait_for(|s| *s).await;
            tasks.abort_all();
            Ok(())
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .context("servers did not start")??;
        Ok(Servers {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One pod as a probe source or target.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub name: String,
    pub netns: String,
    pub ip: IpAddr,
}

/// A port and protocol probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProto {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for PortProto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.protocol, self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Reached,
    Refused,
    Failed,
}

async fn probe_once(target: SocketAddr, protocol: Protocol, timeout: Duration) -> Outcome {
    let refused = |e: &std::io::Error| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Outcome::Refused
        } else {
            Outcome::Failed
        }
    };
    match protocol {
        Protocol::Tcp => {
            let Ok(socket) = TcpSocket::new_v4() else {
                return Outcome::Failed;
            };
            match tokio::time::timeout(timeout, socket.connect(target)).await {
                Ok(Ok(_)) => Outcome::Reached,
                Ok(Err(e)) => refused(&e),
                Err(_) => Outcome::Failed,
            }
        }
        Protocol::Udp => {
            let attempt = async {
                let socket = UdpSocket::bind(("0.0.0.0", 0)).await?;
                socket.connect(target).await?;
                socket.send(PAYLOAD).await?;
                let mut buf = [0u8; 64];
                let n = socket.recv(&mut buf).await?;
                Ok::<bool, std::io::Error>(&buf[..n] == PAYLOAD)
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(true)) => Outcome::Reached,
                Ok(Ok(false)) => Outcome::Failed,
                Ok(Err(e)) => refused(&e),
                Err(_) => Outcome::Failed,
            }
        }
        // Never asked for: the caller probes SCTP only where the kernel has it, and then
        // needs an SCTP prober this module does not have yet.
        Protocol::Sctp => Outcome::Failed,
    }
}

/// Observed (or expected) reachability: per port/protocol, `cells[from][to]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub names: Vec<String>,
    pub cells: BTreeMap<PortProto, Vec<Vec<bool>>>,
}

impl Table {
    /// A table filled by `f(from, to, port/protocol)`.
    pub fn from_fn(
        names: Vec<String>,
        keys: &[PortProto],
        mut f: impl FnMut(usize, usize, PortProto) -> bool,
    ) -> Table {
        let n = names.len();
        let cells = keys
            .iter()
            .map(|&k| {
                let grid = (0..n)
                    .map(|from| (0..n).map(|to| f(from, to, k)).collect())
                    .collect();
                (k, grid)
            })
            .collect();
        Table { names, cells }
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.cells.values().map(|g| g.len() * g.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cells where `self` (expected) and `observed` differ:
    /// (port/protocol, from, to, expected).
    pub fn differences(&self, observed: &Table) -> Vec<(PortProto, usize, usize, bool)> {
        let mut out = Vec::new();
        for (k, grid) in &self.cells {
            let other = observed.cells.get(k);
            for (from, row) in grid.iter().enumerate() {
                for (to, &want) in row.iter().enumerate() {
                    let got = other.and_then(|g| g.get(from)?.get(to).copied());
                    if got != Some(want) {
                        out.push((*k, from, to, want));
                    }
                }
            }
        }
        out
    }

    /// One grid as upstream prints it (rows = from, cols = to).
    pub fn render(&self, key: PortProto) -> String {
        let Some(grid) = self.cells.get(&key) else {
            return format!("{key}: not probed\n");
        };
        render_grid(&self.names, |from, to| {
            if grid[from][to] { "." } else { "X" }.to_string()
        })
    }

    /// Expected, observed and their comparison for every port/protocol that differs.
    pub fn render_mismatch(&self, observed: &Table) -> String {
        let mut out = String::new();
        for (k, grid) in &self.cells {
            let Some(other) = observed.cells.get(k) else {
                let _ = writeln!(out, "{k}: not observed");
                continue;
            };
            if grid == other {
                continue;
            }
            let _ = writeln!(out, "{k} expected:\n{}", self.render(*k));
            let _ = writeln!(out, "{k} observed:\n{}", observed.render(*k));
            let cmp = render_grid(&self.names, |from, to| {
                if grid[from][to] == other[from][to] {
                    "."
                } else {
                    "X"
                }
                .to_string()
            });
            let _ = writeln!(out, "{k} comparison (X = mismatch):\n{cmp}");
        }
        out
    }
}

fn render_grid(names: &[String], cell: impl Fn(usize, usize) -> String) -> String {
    let width = names.iter().map(String::len).max().unwrap_or(1).max(1);
    let mut out = String::new();
    let _ = write!(out, "{:width$}", "");
    for n in names {
        let _ = write!(out, " {n:>width$}");
    }
    out.push('\n');
    for (from, n) in names.iter().enumerate() {
        let _ = write!(out, "{n:width$}");
        for to in 0..names.len() {
            let _ = write!(out, " {:>width$}", cell(from, to));
        }
        out.push('\n');
    }
    out
}

/// Statistics of one probe round.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeStats {
    pub probes: usize,
    pub retried: usize,
    pub refused: usize,
}

/// Probes every ordered pair of `endpoints` (self included) on every port/protocol,
/// concurrently: one thread per source pod, all its probes at once, failing ones retried
/// twice. Returns the observed table (names = endpoint names).
pub async fn probe_all(endpoints: &[Endpoint], keys: &[PortProto]) -> Result<(Table, ProbeStats)> {
    let targets: Arc<Vec<IpAddr>> = Arc::new(endpoints.iter().map(|e| e.ip).collect());
    let keys: Arc<Vec<PortProto>> = Arc::new(keys.to_vec());
    let mut handles = Vec::new();
    for src in endpoints {
        let (targets, keys) = (targets.clone(), keys.clone());
        handles.push(spawn_in_netns(&src.netns, move || async move {
            // (to, key) → outcome
            let mut results: BTreeMap<(usize, PortProto), Outcome> = BTreeMap::new();
            let mut pending: Vec<(usize, PortProto)> = (0..targets.len())
                .flat_map(|to| keys.iter().map(move |&k| (to, k)))
                .collect();
            let mut retried = 0;
            for (attempt, timeout) in TRY_TIMEOUTS.iter().enumerate() {
                if attempt > 0 {
                    retried += pending.len();
                }
                let round = futures::future::join_all(pending.iter().map(|&(to, k)| {
                    let addr = SocketAddr::new(targets[to], k.port);
                    async move { ((to, k), probe_once(addr, k.protocol, *timeout).await) }
                }))
                .await;
                pending.clear();
                for (what, outcome) in round {
                    if outcome != Outcome::Reached {
                        pending.push(what);
                    }
                    results.insert(what, outcome);
                }
                if pending.is_empty() {
                    break;
                }
            }
            Ok((results, retried))
        }));
    }
    let joined = tokio::task::spawn_blocking(move || {
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })
    .await??;
    let n = endpoints.len();
    let mut stats = ProbeStats::default();
    let mut cells: BTreeMap<PortProto, Vec<Vec<bool>>> =
        keys.iter().map(|&k| (k, vec![vec![false; n]; n])).collect();
    for (from, (results, retried)) in joined.into_iter().enumerate() {
        stats.retried += retried;
        for ((to, k), outcome) in results {
            stats.probes += 1;
            if outcome == Outcome::Refused {
                stats.refused += 1;
            }
            if let Some(grid) = cells.get_mut(&k) {
                grid[from][to] = outcome == Outcome::Reached;
            }
        }
    }
    Ok((
        Table {
            names: endpoints.iter().map(|e| e.name.clone()).collect(),
            cells,
        },
        stats,
    ))
}
