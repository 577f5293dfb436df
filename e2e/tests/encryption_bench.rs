//! Benchmark (hack/bench.sh encryption): pod-to-pod across two simulated nodes, in clear
//! (VXLAN) and through the agents' userspace WireGuard devices, in one run: iperf3 TCP
//! throughput, the machine's CPU time per Gbit transferred, and the round-trip latency
//! (ping, p50/p99). Prints figures; asserts nothing about speed.
//!
//! Needs root. Run `cargo build -p tendril-controllers -p tendril-datapath --bins` first.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kube::api::{Api, PostParams};
use serde_json::json;
use tendril_crds::v1alpha1::EncryptionPolicy;
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod};
use tendril_e2e::{ControlPlane, TestEnv, eventually, wait_for};

const TIMEOUT: Duration = Duration::from_secs(120);
const SECONDS: u32 = 5;

/// `iperf3 -s` in a namespace, killed on drop.
struct IperfServer(Child);

impl IperfServer {
    fn start(netns: &str) -> Result<IperfServer> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 (Debian package iperf3)")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(IperfServer(child))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Busy and total jiffies of the whole machine.
fn cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

struct Figures {
    gbits: f64,
    cpu_seconds_per_gbit: f64,
    retransmits: u64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn measure(pod: &SimPod, server: IpAddr) -> Result<Figures> {
    let ticks = 100.0; // USER_HZ
    let (busy0, _) = cpu();
    let out = pod
        .exec(&[
            "iperf3",
            "-c",
            &server.to_string(),
            "-t",
            &SECONDS.to_string(),
            "-J",
        ])
        .await?;
    let (busy1, _) = cpu();
    ensure!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON")?;
    let retransmits = report["end"]["sum_sent"]["retransmits"]
        .as_u64()
        .unwrap_or(0);
    let gbit_total = bits * f64::from(SECONDS) / 1e9;
    let cpu_seconds = (busy1 - busy0) as f64 / ticks;

    let out = pod
        .exec(&["ping", "-q", "-c", "1", &server.to_string()])
        .await?;
    ensure!(out.status.success(), "ping");
    let out = pod
        .exec(&["ping", "-c", "300", "-i", "0.01", &server.to_string()])
        .await?;
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches(" ms").parse().ok())
        .collect();
    ensure!(!rtts.is_empty(), "no ping answers");
    rtts.sort_by(f64::total_cmp);
    let pick = |q: f64| rtts[((rtts.len() - 1) as f64 * q).round() as usize];
    Ok(Figures {
        gbits: bits / 1e9,
        cpu_seconds_per_gbit: cpu_seconds / gbit_total.max(1e-9),
        retransmits,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_against_clear_pod_to_pod() -> Result<()> {
    let plane = ControlPlane::dedicated("encryption-bench").await?;
    let env = TestEnv::on(plane).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let labels = BTreeMap::from([("app".to_string(), "bench".to_string())]);
    let server = SimPod::run(&client, cluster.nodes[1].handle(), &ns, "server", &labels).await?;
    let pod = SimPod::run(&client, cluster.nodes[0].handle(), &ns, "client", &labels).await?;
    server.wait_realized(&client, TIMEOUT).await?;
    pod.wait_realized(&client, TIMEOUT).await?;
    let _iperf = IperfServer::start(&server.sandbox.netns)?;
    let ip = server.ips[0];
    eventually(TIMEOUT, || async {
        let out = pod
            .exec(&["ping", "-c", "1", "-W", "1", &ip.to_string()])
            .await?;
        ensure!(out.status.success(), "no ping");
        Ok(())
    })
    .await?;
    let clear = measure(&pod, ip).await?;

    let policies: Api<EncryptionPolicy> = Api::all(client.clone());
    let name = env.unique_name("bench");
    env.delete_on_drop::<EncryptionPolicy>(&name);
    let policy: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": name}, "spec": {"mode": "WireGuard"},
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    wait_for(
        &policies,
        &name,
        |o: Option<&EncryptionPolicy>| {
            o.and_then(|p| p.status.as_ref())
                .is_some_and(|s| s.encrypted_nodes == Some(2))
        },
        TIMEOUT,
    )
    .await?;
    eventually(TIMEOUT, || async {
        let out = pod
            .exec(&["ping", "-c", "1", "-W", "1", &ip.to_string()])
            .await?;
        ensure!(out.status.success(), "no ping through WireGuard");
        Ok(())
    })
    .await?;
    let sealed = measure(&pod, ip).await?;

    println!(
        "pod to pod across nodes, iperf3 TCP {SECONDS} s, ping 300 x 10 ms (debug or release: see hack/bench.sh)"
    );
    println!(
        "{:<28} {:>10} {:>16} {:>8} {:>9} {:>9}",
        "path", "Gbit/s", "CPU s per Gbit", "retrans", "p50 ms", "p99 ms"
    );
    for (label, f) in [
        ("clear (VXLAN)", &clear),
        ("WireGuard (userspace)", &sealed),
    ] {
        println!(
            "{:<28} {:>10.3} {:>16.3} {:>8} {:>9.3} {:>9.3}",
            label, f.gbits, f.cpu_seconds_per_gbit, f.retransmits, f.p50_ms, f.p99_ms
        );
    }
    println!(
        "encrypted / clear: throughput x{:.3}, CPU per Gbit x{:.2}, added latency p50 {:+.3} ms, p99 {:+.3} ms",
        sealed.gbits / clear.gbits,
        sealed.cpu_seconds_per_gbit / clear.cpu_seconds_per_gbit,
        sealed.p50_ms - clear.p50_ms,
        sealed.p99_ms - clear.p99_ms
    );
    Ok(())
}
