//! Real packets to service frontends: the backends' name-echo server and the client side,
//! which runs as its own process (`tendril-svc-probe`) so that a world can place it where a
//! workload would run (a pod's or a node's network namespace, and the node's cgroup where
//! socket-level load balancing needs one).
//!
//! - [`NameEcho`]: in a backend's namespace, TCP and UDP on one port; every connection or
//!   datagram is answered with one line `{name} {peer ip}`: who answered and the source
//!   address it saw (so `externalTrafficPolicy: Local` keeping the client's address shows).
//! - [`ProbeRequest`] → `tendril-svc-probe probe` (JSON on stdin) → [`ProbeResult`]: `count`
//!   sequential attempts to one frontend, each a new connection (TCP) or a new socket (UDP),
//!   so each is a new conntrack entry and a new backend choice.
//! - `tendril-svc-probe latency`: connect + close many times, for the benchmark.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::watch;

use super::Spot;
use crate::traffic::spawn_in_netns;

/// One frontend to probe from one place.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// Echoed back in the result.
    pub id: usize,
    /// Requests of one group run one after the other (so one client's session affinity is
    /// never raced by its own concurrent first connections); groups run concurrently.
    pub group: usize,
    pub udp: bool,
    pub to: SocketAddr,
    pub count: u32,
    /// Once some backend answered, attempts go on up to this many (answers take a
    /// millisecond; refusals and timeouts stop at `count`): a random choice among 3
    /// backends misses one in 24 attempts with probability 1.8e-4, in 48 with 1e-8.
    #[serde(default)]
    pub answered_count: u32,
    pub timeout_ms: u64,
    /// Stop after this many attempts in a row got no answer at all (nothing answered yet):
    /// a frontend that drops does not cost `count` timeouts.
    pub give_up_after: u32,
}

/// How the attempts of one [`ProbeRequest`] ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub id: usize,
    /// Backend name → source addresses it reported (with how many answers).
    pub answers: BTreeMap<String, BTreeMap<IpAddr, u32>>,
    /// Refused: TCP RST or ICMP unreachable (ECONNREFUSED, EHOSTUNREACH, ENETUNREACH after
    /// sending).
    pub refused: u32,
    /// No answer within the attempt's timeout.
    pub timeouts: u32,
    /// The local stack refused to send (EPERM: a firewall or a socket hook on the client's
    /// own node dropped the packet before it left).
    pub denied: u32,
    /// Anything else (no route before sending, a malformed answer…), with the first message.
    pub errors: u32,
    pub first_error: Option<String>,
}

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    Answer(String, IpAddr),
    Refused,
    Timeout,
    Denied,
    Error(String),
}

fn classify(e: &std::io::Error) -> Attempt {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | HostUnreachable | NetworkUnreachable => {
            Attempt::Refused
        }
        TimedOut => Attempt::Timeout,
        PermissionDenied => Attempt::Denied,
        _ => Attempt::Error(e.to_string()),
    }
}

fn parse_answer(bytes: &[u8]) -> Attempt {
    let text = String::from_utf8_lossy(bytes);
    let mut words = text.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|w| w.parse::<IpAddr>().ok()),
    ) {
        (Some(name), Some(ip)) => Attempt::Answer(name.to_string(), ip),
        _ => Attempt::Error(format!("malformed answer {text:?}")),
    }
}

/// How long a UDP attempt waits for an answer before it sends again.
const UDP_RESEND: Duration = Duration::from_millis(500);

async fn attempt(udp: bool, to: SocketAddr, timeout: Duration) -> Attempt {
    let run = async {
        if udp {
            let socket = match tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await {
                Ok(s) => s,
                Err(e) => return Attempt::Error(e.to_string()),
            };
            if let Err(e) = socket.connect(to).await {
                return classify(&e);
            }
            // Resent every 0.5 s, as a UDP client retries, until an answer or the timeout.
            let mut buf = [0u8; 256];
            loop {
                if let Err(e) = socket.send(b"who\n").await {
                    return classify(&e);
                }
                match tokio::time::timeout(UDP_RESEND, socket.recv(&mut buf)).await {
                    Ok(Ok(n)) => return parse_answer(&buf[..n]),
                    Ok(Err(e)) => return classify(&e),
                    Err(_) => continue,
                }
            }
        } else {
            let mut stream = match tokio::net::TcpStream::connect(to).await {
                Ok(s) => s,
                Err(e) => return classify(&e),
            };
            // One line, then this side closes first (see NameEcho).
            let mut buf = Vec::with_capacity(128);
            let mut chunk = [0u8; 128];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) => return parse_answer(&buf),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.contains(&b'\n') {
                            return parse_answer(&buf);
                        }
                    }
                    Err(e) => return classify(&e),
                }
            }
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Attempt::Timeout)
}

/// Runs one request (its attempts in sequence): what `tendril-svc-probe probe` does for
/// each request, all requests concurrently.
pub async fn run_request(req: &ProbeRequest) -> ProbeResult {
    let mut out = ProbeResult {
        id: req.id,
        ..ProbeResult::default()
    };
    let mut silent = 0;
    for n in 0..req.count.max(req.answered_count) {
        if n >= req.count && out.answers.is_empty() {
            break;
        }
        match attempt(req.udp, req.to, Duration::from_millis(req.timeout_ms)).await {
            Attempt::Answer(name, ip) => {
                silent = 0;
                *out.answers.entry(name).or_default().entry(ip).or_default() += 1;
            }
            Attempt::Refused => {
                silent = 0;
                out.refused += 1;
            }
            Attempt::Timeout => {
                silent += 1;
                out.timeouts += 1;
            }
            Attempt::Denied => {
                silent = 0;
                out.denied += 1;
            }
            Attempt::Error(e) => {
                out.errors += 1;
                out.first_error.get_or_insert(e);
            }
        }
        if out.answers.is_empty()
            && out.refused == 0
            && out.denied == 0
            && silent >= req.give_up_after
        {
            break;
        }
    }
    out
}

/// `ip netns exec NS tendril-svc-probe`: the probe started in `spot`, in its cgroup. The
/// cgroup is joined before `ip netns exec` runs: that remounts /sys in a mount namespace of
/// its own, where the cgroup2 mount under /sys/fs/cgroup is no longer visible.
fn probe_command(spot: &Spot) -> Command {
    let probe = crate::target_bin_dir().join("tendril-svc-probe");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &spot.netns]).arg(probe);
    crate::sim::place_in_cgroup(&mut cmd, spot.cgroup.as_deref());
    cmd.kill_on_drop(true);
    cmd
}

/// Runs `requests` through `tendril-svc-probe probe` in `spot`; returns the results in
/// request order.
pub async fn run_probe_process(spot: &Spot, requests: &[ProbeRequest]) -> Result<Vec<ProbeResult>> {
    let mut cmd = probe_command(spot);
    cmd.arg("probe")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("spawning tendril-svc-probe (build the e2e bins)")?;
    let mut stdin = child.stdin.take().context("probe stdin")?;
    stdin.write_all(&serde_json::to_vec(requests)?).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "probe in {}: {}: {}",
            spot.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut results: Vec<ProbeResult> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("probe output {:?}", String::from_utf8_lossy(&out.stdout)))?;
    results.sort_by_key(|r| r.id);
    if results.len() != requests.len() {
        bail!("{} results for {} requests", results.len(), requests.len());
    }
    Ok(results)
}

/// Connect latencies (microseconds, in the order measured) of `count` TCP connect + close
/// to `targets` in turn, through `tendril-svc-probe latency` in `spot`.
pub async fn run_latency_process(
    spot: &Spot,
    targets: &[SocketAddr],
    count: u32,
) -> Result<Vec<u64>> {
    let mut cmd = probe_command(spot);
    cmd.arg("latency").arg("--count").arg(count.to_string());
    for t in targets {
        cmd.arg("--to").arg(t.to_string());
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!(
            "latency in {}: {}: {}",
            spot.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// When (since the Unix epoch) a TCP connect from `spot` to `to` was first answered,
/// through `tendril-svc-probe wait` (a new connect every 10 ms until then).
pub async fn run_wait_process(spot: &Spot, to: SocketAddr, timeout: Duration) -> Result<Duration> {
    let mut cmd = probe_command(spot);
    cmd.arg("wait")
        .arg("--to")
        .arg(to.to_string())
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string());
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!(
            "wait in {}: {}: {}",
            spot.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let micros: u64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Duration::from_micros(micros))
}

/// The protocol of a probe, for tables.
pub fn proto_name(udp: bool) -> &'static str {
    if udp { "udp" } else { "tcp" }
}

/// A backend's server: TCP and UDP on `port` in `netns`, answering `{name} {peer ip}` once
/// per connection or datagram. Stopped on drop.
///
/// The client closes a TCP connection first (after the line, or at once), as HTTP clients
/// do, so TIME_WAIT stays with the client. Were it the server's, every backend would keep
/// one for each outside client's tuple, and a client port reused towards another frontend
/// of the same backend (the source is preserved; each frontend is another destination to
/// the client's port choice) meets it: a PAWS-rejected SYN, a retransmission a second
/// later, now and then an attempt past its timeout.
pub struct NameEcho {
    stop: watch::Sender<bool>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl NameEcho {
    pub fn start(netns: &str, name: &str, port: u16) -> Result<NameEcho> {
        let (stop, stopped) = watch::channel(false);
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let name: Arc<str> = name.into();
        let handle = spawn_in_netns(netns, move || async move {
            let bound = async {
                let tcp = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
                let udp = tokio::net::UdpSocket::bind(("0.0.0.0", port)).await?;
                Ok::<_, std::io::Error>((tcp, udp))
            }
            .await;
            let (tcp, udp) = match bound {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(anyhow!("name echo on port {port}: {e}")));
                    return Err(e.into());
                }
            };
            let _ = tx.send(Ok(()));
            let udp_loop = {
                let (name, mut stopped) = (name.clone(), stopped.clone());
                async move {
                    let mut buf = [0u8; 512];
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            r = udp.recv_from(&mut buf) => if let Ok((_, from)) = r {
                                let line = format!("{name} {}\n", from.ip());
                                let _ = udp.send_to(line.as_bytes(), from).await;
                            },
                        }
                    }
                }
            };
            let tcp_loop = {
                let mut stopped = stopped.clone();
                async move {
                    loop {
                        tokio::select! {
                            _ = stopped.changed() => return,
                            r = tcp.accept() => if let Ok((mut stream, from)) = r {
                                let line = format!("{name} {}\n", from.ip());
                                tokio::spawn(async move {
                                    let _ = stream.write_all(line.as_bytes()).await;
                                    let mut rest = [0u8; 64];
                                    let eof = async {
                                        while let Ok(n) = stream.read(&mut rest).await {
                                            if n == 0 {
                                                break;
                                            }
                                        }
                                    };
                                    let _ = tokio::time::timeout(Duration::from_secs(10), eof).await;
                                });
                            },
                        }
                    }
                }
            };
            tokio::join!(udp_loop, tcp_loop);
            Ok(())
        });
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("name echo did not start within 10 s"))??;
        Ok(NameEcho {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for NameEcho {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
