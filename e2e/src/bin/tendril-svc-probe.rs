//! `tendril-svc-probe`: the client side of the services conformance matrix and benchmark,
//! a process of its own so a world starts it where a workload runs (a pod's or node's
//! network namespace, the node's cgroup).
//!
//! - `probe`: reads a JSON list of `ProbeRequest`s on stdin, runs their groups concurrently
//!   (the requests of a group, and each one's attempts, in sequence) and prints the `ProbeResult`s as a JSON list.
//! - `latency --to ADDR… --count N`: N TCP connect + close, to the targets in turn, one at a
//!   time; prints the connect latencies in microseconds as a JSON list. A failed connect
//!   fails the run (a latency figure never hides an error).
//!
//! - `wait --to ADDR`: connects until one is answered; prints when (µs since the epoch).
//!
//! Its cgroup is set by who starts it (`services::probe`), before `ip netns exec`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use tendril_e2e::services::probe::{ProbeRequest, run_request};

#[derive(Parser)]
#[command(name = "tendril-svc-probe", about = "Service frontend probes")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Requests on stdin, results on stdout (JSON).
    Probe,
    /// Connect latencies in microseconds (JSON).
    Latency {
        #[arg(long, required = true)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    /// TCP connects (each given 10 ms) to one address until one is answered; prints when
    /// (microseconds since the Unix epoch). Fails after `--timeout-ms`.
    Wait {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 120_000)]
        timeout_ms: u64,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Probe => {
            let mut input = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)?;
            let requests: Vec<ProbeRequest> = serde_json::from_slice(&input)?;
            let mut groups: BTreeMap<usize, Vec<&ProbeRequest>> = BTreeMap::new();
            for r in &requests {
                groups.entry(r.group).or_default().push(r);
            }
            let runs = groups.into_values().map(|group| async move {
                let mut out = Vec::new();
                for r in group {
                    out.push(run_request(r).await);
                }
                out
            });
            let results: Vec<_> = futures::future::join_all(runs)
                .await
                .into_iter()
                .flatten()
                .collect();
            println!("{}", serde_json::to_string(&results)?);
        }
        Cmd::Latency { to, count } => {
            let mut out = Vec::with_capacity(count as usize);
            for i in 0..count as usize {
                let target = to[i % to.len()];
                let start = Instant::now();
                let stream = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(target),
                )
                .await;
                let elapsed = start.elapsed();
                match stream {
                    Ok(Ok(s)) => drop(s),
                    Ok(Err(e)) => bail!("connect {i} to {target}: {e}"),
                    Err(_) => bail!("connect {i} to {target}: no answer within 5 s"),
                }
                out.push(elapsed.as_micros() as u64);
            }
            println!("{}", serde_json::to_string(&out)?);
        }
        Cmd::Wait { to, timeout_ms } => {
            let start = Instant::now();
            loop {
                let attempt = tokio::time::timeout(
                    Duration::from_millis(10),
                    tokio::net::TcpStream::connect(to),
                )
                .await;
                if let Ok(Ok(_)) = attempt {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                    println!("{}", now.as_micros());
                    break;
                }
                if start.elapsed() > Duration::from_millis(timeout_ms) {
                    bail!("{to} not answering after {timeout_ms} ms");
                }
                if let Ok(Err(_)) = attempt {
                    // Refused or unreachable at once: do not spin.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
    Ok(())
}
