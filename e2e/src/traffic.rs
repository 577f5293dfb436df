//! Traffic between pod network namespaces with per-packet accounting, for tests that change
//! policy or restart agents under load.
//!
//! - [`EchoServer`]: TCP and UDP echo on one port inside a namespace; counts, per peer
//!   address, every accepted TCP connection and every received datagram (what got through
//!   to the receiver, whatever the sender saw).
//! - [`TcpFlow`] / [`UdpFlow`]: one long-lived connection (one 5-tuple) sending a numbered
//!   message every `interval` and recording when each was sent and when its echo came back;
//!   [`FlowLog::stats`] turns that into lost/late round trips and the longest silence over a
//!   window. [`TcpFlow::retransmits`] reads the kernel's `tcpi_total_retrans` of the
//!   sender's socket: a TCP segment dropped anywhere on the path shows up there.
//! - [`Prober`]: a new connection (new source port, so a new conntrack entry) every
//!   `interval`, TCP (non-blocking connect) or UDP (fresh socket, one datagram, wait for the
//!   echo), each attempt recorded with its start time and [`Outcome`].
//!
//! Every flow runs on a thread of its own that enters the namespace first and then drives a
//! current-thread tokio runtime, so every socket it opens lives in that namespace. Dropping a
//! flow stops it.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::sim::netns_path;

/// Runs `f` on a new thread inside network namespace `netns` (a name under /var/run/netns),
/// on a current-thread tokio runtime of that thread. Only that thread changes namespace.
pub fn spawn_in_netns<T, F, Fut>(netns: &str, f: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let path = netns_path(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
        // SAFETY: a valid netns descriptor; setns changes only this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })
}

/// Joins a flow's thread, turning a panic into an error.
fn join<T>(handle: JoinHandle<Result<T>>, what: &str) -> Result<T> {
    handle
        .join()
        .map_err(|_| anyhow!("{what} thread panicked"))?
}

/// Waits (blocking, bounded) for a flow thread to report that it started.
fn wait_started<T>(rx: std::sync::mpsc::Receiver<Result<T>>, what: &str) -> Result<T> {
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("{what} did not start within 10 s"))?
}

/// What an [`EchoServer`] received, per peer address.
#[derive(Default)]
struct PeerCounts {
    tcp: Mutex<BTreeMap<IpAddr, u64>>,
    udp: Mutex<BTreeMap<IpAddr, u64>>,
}

fn bump(map: &Mutex<BTreeMap<IpAddr, u64>>, ip: IpAddr) {
    // A dual-stack listener sees IPv4 peers as v4-mapped IPv6 addresses.
    *map.lock()
        .expect("counts lock")
        .entry(ip.to_canonical())
        .or_default() += 1;
}

/// TCP and UDP echo servers on one port inside a namespace, stopped on drop.
pub struct EchoServer {
    stop: watch::Sender<bool>,
    counts: Arc<PeerCounts>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl EchoServer {
    /// Listens on `0.0.0.0:port` (TCP and UDP) inside `netns`; returns once both listen.
    pub fn start(netns: &str, port: u16) -> Result<EchoServer> {
        Self::start_on(netns, "0.0.0.0", port)
    }

    /// Listens on `[::]:port`, IPv4 too (the namespace's `bindv6only` is Linux's default, 0):
    /// for dual-stack pods.
    pub fn start_dual_stack(netns: &str, port: u16) -> Result<EchoServer> {
        Self::start_on(netns, "::", port)
    }

    fn start_on(netns: &str, host: &'static str, port: u16) -> Result<EchoServer> {
        let (stop, stopped) = watch::channel(false);
        let counts = Arc::new(PeerCounts::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let c = counts.clone();
        let handle = spawn_in_netns(netns, move || async move {
            let listener = tokio::net::TcpListener::bind((host, port)).await;
            let socket = tokio::net::UdpSocket::bind((host, port)).await;
            let (listener, socket) = match (listener, socket) {
                (Ok(l), Ok(s)) => (l, s),
                (Err(e), _) | (_, Err(e)) => {
                    let _ = tx.send(Err(anyhow!("echo server on port {port}: {e}")));
                    return Err(e.into());
                }
            };
            let _ = tx.send(Ok(()));
            let udp = {
                let (c, mut stopped) = (c.clone(), stopped.clone());
                async move {
                    let mut buf = [0u8; 2048];
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            r = socket.recv_from(&mut buf) => if let Ok((n, from)) = r {
                                bump(&c.udp, from.ip());
                                let _ = socket.send_to(&buf[..n], from).await;
                            },
                        }
                    }
                }
            };
            let tcp = {
                let mut stopped = stopped.clone();
                async move {
                    let mut conns = JoinSet::new();
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            r = listener.accept() => if let Ok((mut stream, from)) = r {
                                bump(&c.tcp, from.ip());
                                let _ = stream.set_nodelay(true);
                                let mut stopped = stopped.clone();
                                conns.spawn(async move {
                                    let (mut r, mut w) = stream.split();
                                    tokio::select! {
                                        _ = stopped.changed() => {}
                                        _ = tokio::io::copy(&mut r, &mut w) => {}
                                    }
                                });
                            },
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        }
                    }
                }
            };
            tokio::join!(udp, tcp);
            Ok(())
        });
        wait_started(rx, "echo server")?;
        Ok(EchoServer {
            stop,
            counts,
            handle: Some(handle),
        })
    }

    /// TCP connections accepted from `peer` so far.
    pub fn tcp_accepted(&self, peer: IpAddr) -> u64 {
        let map = self.counts.tcp.lock().expect("counts lock");
        map.get(&peer).copied().unwrap_or(0)
    }

    /// UDP datagrams received from `peer` so far.
    pub fn udp_received(&self, peer: IpAddr) -> u64 {
        let map = self.counts.udp.lock().expect("counts lock");
        map.get(&peer).copied().unwrap_or(0)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Send and echo times of every message of one flow.
pub struct FlowLog {
    inner: Mutex<FlowRecord>,
}

#[derive(Default)]
struct FlowRecord {
    /// Indexed by sequence number.
    sent: Vec<Instant>,
    echoed: Vec<Option<Instant>>,
    error: Option<String>,
}

/// A flow over a window of send times, see [`FlowLog::stats`].
#[derive(Clone, Debug, Default)]
pub struct FlowStats {
    /// Messages sent in the window.
    pub sent: u64,
    /// Of those, echoed (at any time).
    pub echoed: u64,
    /// Of those, never echoed.
    pub lost: u64,
    /// Of those, echoed later than the `late` bound.
    pub late: u64,
    /// The longest round trip of the window.
    pub max_rtt: Duration,
    /// The longest time between two consecutive echoes of messages of the window (the
    /// longest silence a user of the connection saw).
    pub longest_gap: Duration,
}

impl std::fmt::Display for FlowStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sent, {} echoed, {} lost, {} late, max rtt {:.1?}, longest gap {:.1?}",
            self.sent, self.echoed, self.lost, self.late, self.max_rtt, self.longest_gap
        )
    }
}

impl FlowLog {
    fn new() -> Arc<FlowLog> {
        Arc::new(FlowLog {
            inner: Mutex::new(FlowRecord::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlowRecord> {
        self.inner.lock().expect("flow log lock")
    }

    fn record_sent(&self, at: Instant) -> u64 {
        let mut r = self.lock();
        r.sent.push(at);
        r.echoed.push(None);
        (r.sent.len() - 1) as u64
    }

    fn record_echo(&self, seq: u64, at: Instant) {
        let mut r = self.lock();
        if let Some(slot) = r.echoed.get_mut(seq as usize) {
            slot.get_or_insert(at);
        }
    }

    fn record_error(&self, e: impl std::fmt::Display) {
        self.lock().error.get_or_insert_with(|| e.to_string());
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.lock().sent.len() as u64
    }

    /// Echoes received so far.
    pub fn echoed(&self) -> u64 {
        self.lock().echoed.iter().flatten().count() as u64
    }

    /// When the latest echo arrived.
    pub fn last_echo(&self) -> Option<Instant> {
        self.lock().echoed.iter().flatten().max().copied()
    }

    /// Echoes that arrived after `t`.
    pub fn echoes_after(&self, t: Instant) -> u64 {
        self.lock()
            .echoed
            .iter()
            .flatten()
            .filter(|e| **e > t)
            .count() as u64
    }

    /// Messages sent after `t`.
    pub fn sent_after(&self, t: Instant) -> u64 {
        self.lock().sent.iter().filter(|s| **s > t).count() as u64
    }

    /// The first error the flow met (a broken connection), if any.
    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    /// Accounting of the messages sent in `[from, to)`; a round trip longer than `late`
    /// counts as late. Call it a little after `to` (lost means "not echoed yet").
    pub fn stats(&self, from: Instant, to: Instant, late: Duration) -> FlowStats {
        let r = self.lock();
        let mut out = FlowStats::default();
        let mut arrivals = Vec::new();
        for (sent, echoed) in r.sent.iter().zip(&r.echoed) {
            if *sent < from || *sent >= to {
                continue;
            }
            out.sent += 1;
            match echoed {
                Some(at) => {
                    out.echoed += 1;
                    let rtt = at.saturating_duration_since(*sent);
                    out.max_rtt = out.max_rtt.max(rtt);
                    if rtt > late {
                        out.late += 1;
                    }
                    arrivals.push(*at);
                }
                None => out.lost += 1,
            }
        }
        arrivals.sort();
        out.longest_gap = arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        out
    }
}

/// The kernel's count of retransmitted segments of a TCP socket.
fn total_retransmits(fd: RawFd) -> Option<u32> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (rc == 0).then_some(info.tcpi_total_retrans)
    }
}

/// A message of a flow: its sequence number, fixed width, newline-terminated.
fn message(seq: u64) -> [u8; 17] {
    let mut buf = [b'\n'; 17];
    buf[..16].copy_from_slice(format!("{seq:016}").as_bytes());
    buf
}

fn parse_message(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes.get(..16)?).ok()?.parse().ok()
}

/// One TCP connection sending a numbered line every `interval` to an echo server and
/// recording each echo. Stopped on drop.
pub struct TcpFlow {
    log: Arc<FlowLog>,
    retransmits: Arc<AtomicU64>,
    local: SocketAddr,
    stop: watch::Sender<bool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl TcpFlow {
    /// Connects from inside `netns` to `to` (failing if that takes over 5 s) and starts
    /// sending.
    pub fn start(netns: &str, to: SocketAddr, interval: Duration) -> Result<TcpFlow> {
        let (stop, mut stopped) = watch::channel(false);
        let log = FlowLog::new();
        let retransmits = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (l, rt) = (log.clone(), retransmits.clone());
        let handle = spawn_in_netns(netns, move || async move {
            let connect =
                tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to))
                    .await;
            let stream = match connect {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(anyhow!("TCP flow to {to}: {e}")));
                    return Ok(());
                }
                Err(_) => {
                    let _ = tx.send(Err(anyhow!("TCP flow to {to}: connect timed out")));
                    return Ok(());
                }
            };
            stream.set_nodelay(true)?;
            let local = stream.local_addr()?;
            let fd = stream.as_raw_fd();
            let _ = tx.send(Ok(local));
            let (reader, mut writer) = stream.into_split();
            let reading = {
                let l = l.clone();
                async move {
                    let mut lines = BufReader::new(reader);
                    let mut line = Vec::with_capacity(32);
                    loop {
                        line.clear();
                        match lines.read_until(b'\n', &mut line).await {
                            Ok(0) => {
                                l.record_error("connection closed by the peer");
                                return;
                            }
                            Ok(_) => match parse_message(&line) {
                                Some(seq) => l.record_echo(seq, Instant::now()),
                                None => l.record_error(format!("bad echo {line:?}")),
                            },
                            Err(e) => {
                                l.record_error(e);
                                return;
                            }
                        }
                    }
                }
            };
            let writing = async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return,
                        _ = tick.tick() => {}
                    }
                    let seq = l.record_sent(Instant::now());
                    if let Err(e) = writer.write_all(&message(seq)).await {
                        l.record_error(e);
                        return;
                    }
                    if let Some(n) = total_retransmits(fd) {
                        rt.store(u64::from(n), Ordering::Relaxed);
                    }
                }
            };
            // The reader lives as long as the writer: when sending stops, so does the flow.
            tokio::select! {
                _ = reading => {}
                _ = writing => {}
            }
            Ok(())
        });
        let local = wait_started(rx, "TCP flow")?;
        Ok(TcpFlow {
            log,
            retransmits,
            local,
            stop,
            handle: Some(handle),
        })
    }

    /// The send/echo record.
    pub fn log(&self) -> &FlowLog {
        &self.log
    }

    /// `tcpi_total_retrans` of the sending socket, as of the latest send.
    pub fn retransmits(&self) -> u64 {
        self.retransmits.load(Ordering::Relaxed)
    }

    /// The flow's own address (source port included).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops sending and returns the log.
    pub fn finish(mut self) -> Result<Arc<FlowLog>> {
        let _ = self.stop.send(true);
        if let Some(handle) = self.handle.take() {
            join(handle, "TCP flow")?;
        }
        Ok(self.log.clone())
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// One UDP "connection" (one socket, one 5-tuple) sending a numbered datagram every
/// `interval` to an echo server and recording each echo. Stopped on drop.
pub struct UdpFlow {
    log: Arc<FlowLog>,
    stop: watch::Sender<bool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl UdpFlow {
    /// Starts sending from inside `netns` to `to`.
    pub fn start(netns: &str, to: SocketAddr, interval: Duration) -> Result<UdpFlow> {
        let (stop, mut stopped) = watch::channel(false);
        let log = FlowLog::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        let handle = spawn_in_netns(netns, move || async move {
            let socket = match bind_udp(to).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(anyhow!("UDP flow to {to}: {e}")));
                    return Ok(());
                }
            };
            let _ = tx.send(Ok(()));
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    _ = stopped.changed() => return Ok(()),
                    _ = tick.tick() => {
                        let seq = l.record_sent(Instant::now());
                        // A refused send (ICMP error of an earlier datagram) is not fatal.
                        let _ = socket.send(&message(seq)).await;
                    }
                    r = socket.recv(&mut buf) => if let Ok(n) = r {
                        match parse_message(&buf[..n]) {
                            Some(seq) => l.record_echo(seq, Instant::now()),
                            None => l.record_error(format!("bad echo {:?}", &buf[..n])),
                        }
                    },
                }
            }
        });
        wait_started(rx, "UDP flow")?;
        Ok(UdpFlow {
            log,
            stop,
            handle: Some(handle),
        })
    }

    /// The send/echo record.
    pub fn log(&self) -> &FlowLog {
        &self.log
    }

    /// Stops sending and returns the log.
    pub fn finish(mut self) -> Result<Arc<FlowLog>> {
        let _ = self.stop.send(true);
        if let Some(handle) = self.handle.take() {
            join(handle, "UDP flow")?;
        }
        Ok(self.log.clone())
    }
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn bind_udp(to: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await?;
    socket.connect(to).await?;
    Ok(socket)
}

/// Which kind of connection a [`Prober`] opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// How one connection attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// TCP: the handshake completed. UDP: the echo came back.
    Through,
    /// Nothing came back within the attempt's timeout.
    Blocked,
    /// A reset or ICMP error came back.
    Refused,
    /// The attempt failed locally (no socket, no route, …).
    Error,
}

/// One attempt: when it started and how it ended.
#[derive(Clone, Copy, Debug)]
pub struct Attempt {
    pub at: Instant,
    pub outcome: Outcome,
}

/// Attempts over a window, by outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeSummary {
    pub attempts: u64,
    pub through: u64,
    pub blocked: u64,
    pub refused: u64,
    pub errors: u64,
}

impl std::fmt::Display for ProbeSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} attempts: {} through, {} blocked, {} refused, {} errors",
            self.attempts, self.through, self.blocked, self.refused, self.errors
        )
    }
}

/// A new connection to `to` every `interval` from inside a namespace; each attempt waits
/// at most `timeout` for its answer. Stopped on drop.
pub struct Prober {
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: watch::Sender<bool>,
    handle: Option<JoinHandle<Result<()>>>,
    pub protocol: Protocol,
    pub to: SocketAddr,
}

impl Prober {
    pub fn start(
        netns: &str,
        to: SocketAddr,
        protocol: Protocol,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Prober> {
        let (stop, mut stopped) = watch::channel(false);
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let a = attempts.clone();
        let handle = spawn_in_netns(netns, move || async move {
            let _ = tx.send(Ok(()));
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut running = JoinSet::new();
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {
                        let a = a.clone();
                        running.spawn(async move {
                            let at = Instant::now();
                            let outcome = attempt(protocol, to, timeout).await;
                            a.lock().expect("attempts lock").push(Attempt { at, outcome });
                        });
                    }
                    Some(_) = running.join_next(), if !running.is_empty() => {}
                }
            }
            // Attempts under way finish (each within its timeout) so none goes uncounted.
            while running.join_next().await.is_some() {}
            Ok(())
        });
        wait_started(rx, "prober")?;
        Ok(Prober {
            attempts,
            stop,
            handle: Some(handle),
            protocol,
            to,
        })
    }

    /// Attempts finished so far.
    pub fn finished(&self) -> u64 {
        self.attempts.lock().expect("attempts lock").len() as u64
    }

    /// Attempts that started in `[from, to)` and have finished, by outcome.
    pub fn summary(&self, from: Instant, to: Instant) -> ProbeSummary {
        let attempts = self.attempts.lock().expect("attempts lock");
        summarize(attempts.iter().filter(|a| a.at >= from && a.at < to))
    }

    /// The attempts that got through, for failure messages.
    pub fn throughs(&self) -> Vec<Instant> {
        let attempts = self.attempts.lock().expect("attempts lock");
        attempts
            .iter()
            .filter(|a| a.outcome == Outcome::Through)
            .map(|a| a.at)
            .collect()
    }

    /// Stops, waits for the attempts under way and returns all of them.
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let _ = self.stop.send(true);
        if let Some(handle) = self.handle.take() {
            join(handle, "prober")?;
        }
        let mut attempts = self.attempts.lock().expect("attempts lock").clone();
        attempts.sort_by_key(|a| a.at);
        Ok(attempts)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Counts attempts by outcome.
pub fn summarize<'a>(attempts: impl IntoIterator<Item = &'a Attempt>) -> ProbeSummary {
    let mut s = ProbeSummary::default();
    for a in attempts {
        s.attempts += 1;
        match a.outcome {
            Outcome::Through => s.through += 1,
            Outcome::Blocked => s.blocked += 1,
            Outcome::Refused => s.refused += 1,
            Outcome::Error => s.errors += 1,
        }
    }
    s
}

async fn attempt(protocol: Protocol, to: SocketAddr, timeout: Duration) -> Outcome {
    match protocol {
        Protocol::Tcp => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(to)).await {
                Ok(Ok(_)) => Outcome::Through,
                Ok(Err(e)) => io_outcome(&e),
                Err(_) => Outcome::Blocked,
            }
        }
        Protocol::Udp => {
            let socket = match bind_udp(to).await {
                Ok(s) => s,
                Err(e) => return io_outcome(&e),
            };
            if let Err(e) = socket.send(b"probe").await {
                return io_outcome(&e);
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
                Ok(Ok(_)) => Outcome::Through,
                Ok(Err(e)) => io_outcome(&e),
                Err(_) => Outcome::Blocked,
            }
        }
    }
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset => {
            Outcome::Refused
        }
        std::io::ErrorKind::TimedOut => Outcome::Blocked,
        _ => Outcome::Error,
    }
}
