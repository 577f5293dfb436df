//! Issue 12 benchmark, operator side: the services concern at 1k and 10k Services.
//!
//! For each size, on a dedicated plane: N selector-less Services (one TCP port) and one
//! hand-written EndpointSlice each (two ready endpoints on two Nodes), created before the
//! operator starts. Then:
//! - translate (pure): the translation of the N Services and slices in this process,
//!   without any API (µs per Service);
//! - cold start: operator spawned → every LBService written (N + the `kubernetes` one),
//!   as `tendril_services_writes_total` shows it (polled: resolution ≤ 1 s), and the
//!   operator's own translate histogram (mean µs per reconcile);
//! - realize: both NodeNetworks report the highest revision (as agents would) → every
//!   LBService shows `Realized=True` (listed, polled), and how many status writes that took;
//! - steady state: 20 times, one endpoint of one slice becomes not ready → its LBService
//!   carries a higher revision (seen on a watch started after the patch returned): p50 and
//!   max;
//! - operator RSS with N LBServices;
//! - restart: a new operator process → every Service reconciled
//!   (`controller_runtime_reconcile_total{controller="services"}`), and it fails the run if
//!   any LBService was rewritten (a reshuffle).
//!
//! Each size runs once per `services.writesInFlight` of `TENDRIL_SERVICES_SCALE_WRITES`
//! (default `1,16`: one write at a time, the baseline, and the default pipeline), and the
//! table gives the cold start as a ratio to the baseline of the same size.
//!
//! Prints a table; asserts nothing about speed. `TENDRIL_SERVICES_SCALE=1000,10000` picks
//! the sizes. Not part of the suite: `hack/bench.sh services-operator`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tendril_controllers::services::{SliceInfo, translate};
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_e2e::{ControlPlane, Process, TestEnv, eventually, fetch_metrics, wait_for};

mod operator_common;
use operator_common::{create_node, free_port};

const CREATE_CONCURRENCY: usize = 32;
const STEADY_CHANGES: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(1800);

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("s{i}")},
           "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
}

fn slice(i: usize, n1: &str, n2: &str, ready: bool) -> Value {
    let ip = |k: usize| format!("10.{}.{}.{}", 100 + k, (i / 256) % 256, i % 256);
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
    "metadata": {"name": format!("s{i}-x"), "labels": {"kubernetes.io/service-name": format!("s{i}")}},
    "addressType": "IPv4",
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    "endpoints": [
        {"addresses": [ip(0)], "nodeName": n1, "conditions": {"ready": ready}},
        {"addresses": [ip(1)], "nodeName": n2, "conditions": {"ready": true}},
    ]})
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn metric(m: &tendril_e2e::Metrics, name: &str) -> f64 {
    m.value(name, &[]).unwrap_or(0.0)
}

/// Translation alone, in this process: µs per Service.
fn translate_only(n: usize) -> Result<f64> {
    let services: Vec<Service> = (0..n)
        .map(|i| {
            let mut s = service(i);
            s["metadata"]["namespace"] = "bench".into();
            s["spec"]["clusterIP"] = format!("10.96.{}.{}", i / 250, i % 250 + 1).into();
            serde_json::from_value(s)
        })
        .collect::<Result<_, _>>()?;
    let slices: Vec<SliceInfo> = (0..n)
        .map(|i| serde_json::from_value(slice(i, "n1", "n2", true)))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    let mut backends = 0;
    for (svc, sl) in services.iter().zip(&slices) {
        let t = translate::translate(svc, [sl], |_| None)
            .map_err(|s| anyhow::anyhow!("skipped: {s}"))?;
        backends += t.spec.backends.len();
    }
    let took = started.elapsed();
    ensure!(backends == 2 * n, "{backends} backends");
    Ok(took.as_secs_f64() * 1e6 / n as f64)
}

/// A file removed on drop (the operator's config of one run).
struct ScratchFile(std::path::PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Figures {
    n: usize,
    writes_in_flight: u32,
    translate_us: f64,
    create_s: f64,
    cold_s: f64,
    operator_translate_us: f64,
    realize_s: f64,
    status_writes: f64,
    steady_p50_ms: f64,
    steady_max_ms: f64,
    rss_mib: f64,
    restart_s: f64,
}

async fn run_size(n: usize, writes_in_flight: u32) -> Result<Figures> {
    let translate_us = translate_only(n)?;
    let plane = ControlPlane::dedicated(&format!("svc-scale-{n}-{writes_in_flight}")).await?;
    let config = ScratchFile(std::env::temp_dir().join(format!(
        "tendril-scale-operator-{}-{n}-{writes_in_flight}.yaml",
        std::process::id()
    )));
    std::fs::write(
        &config.0,
        format!("services:\n  writesInFlight: {writes_in_flight}\n"),
    )?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let n1 = env.unique_name("scale-n1");
    let n2 = env.unique_name("scale-n2");
    create_node(&env, &n1, &[("InternalIP", "192.0.2.1")]).await?;
    create_node(&env, &n2, &[("InternalIP", "192.0.2.2")]).await?;
    env.delete_on_drop::<NodeNetwork>(&n1);
    env.delete_on_drop::<NodeNetwork>(&n2);

    let services: Api<Service> = env.api();
    let slices: Api<EndpointSlice> = env.api();
    let started = Instant::now();
    let results: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            let (n1, n2) = (n1.clone(), n2.clone());
            async move {
                services
                    .create(&PostParams::default(), &serde_json::from_value(service(i))?)
                    .await?;
                slices
                    .create(
                        &PostParams::default(),
                        &serde_json::from_value(slice(i, &n1, &n2, true))?,
                    )
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let create_s = started.elapsed().as_secs_f64();

    // Cold start.
    let port = free_port()?;
    let started = Instant::now();
    let mut operator = Process::builder("tendril-operator")
        .arg("--config")
        .arg(&config.0)
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .spawn()?;
    let want = (n + 1) as f64;
    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        let written = metric(&m, "tendril_services_writes_total");
        ensure!(written >= want, "{written}/{want} LBServices written");
        Ok(m)
    })
    .await?;
    let cold_s = started.elapsed().as_secs_f64();
    let operator_translate_us = m.sum("tendril_services_translate_seconds_sum", &[]) * 1e6
        / m.sum("tendril_services_translate_seconds_count", &[])
            .max(1.0);

    // Every node realizes the highest revision: every status says Realized. The nodes
    // report the newest revision on every round, as agents keep up with the writes (the
    // cold start's last writes may still be landing).
    let lbs: Api<LBService> = Api::all(client.clone());
    let before = metric(&m, "tendril_services_status_writes_total");
    let nns: Api<NodeNetwork> = Api::all(client.clone());
    let started = Instant::now();
    eventually(TIMEOUT, || async {
        let list = lbs.list(&ListParams::default()).await?;
        let max = list
            .items
            .iter()
            .map(|l| l.spec.revision)
            .max()
            .unwrap_or(0);
        for node in [&n1, &n2] {
            let body = json!({"apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
                              "metadata": {"name": node},
                              "status": {"realizedServicesRevision": max}});
            nns.patch_status(
                node,
                &PatchParams::apply("tendril-agent").force(),
                &Patch::Apply(&body),
            )
            .await?;
        }
        let pending = list
            .items
            .iter()
            .filter(|l| {
                !l.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Realized" && c.status == "True")
                })
            })
            .count();
        ensure!(pending == 0, "{pending} LBServices not Realized");
        Ok(())
    })
    .await?;
    let realize_s = started.elapsed().as_secs_f64();
    let status_writes = metric(
        &fetch_metrics(port).await?,
        "tendril_services_status_writes_total",
    ) - before;

    // Steady state: one endpoint of one slice becomes not ready (a different service each
    // time: 7919 is prime, so the indices are distinct).
    let lbsvc: Api<LBService> = Api::namespaced(client.clone(), &ns);
    let mut samples = Vec::new();
    for k in 0..STEADY_CHANGES {
        let i = (k * 7919) % n;
        let name = format!("s{i}");
        let old = lbsvc.get(&name).await?.spec.revision;
        let started = Instant::now();
        slices
            .patch(
                &format!("s{i}-x"),
                &PatchParams::default(),
                &Patch::Merge(slice(i, &n1, &n2, false)),
            )
            .await?;
        wait_for(
            &lbsvc,
            &name,
            move |o: Option<&LBService>| o.is_some_and(|l| l.spec.revision > old),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("{name} after a slice change"))?;
        samples.push(started.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    let rss_mib = rss_kib(operator.pid()).unwrap_or(0) as f64 / 1024.0;
    operator.stop(Duration::from_secs(10));

    // Restart: every Service reconciled again, nothing rewritten.
    let port = free_port()?;
    let started = Instant::now();
    let mut operator = Process::builder("tendril-operator")
        .arg("--config")
        .arg(&config.0)
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .spawn()?;
    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        let done = m.sum(
            "controller_runtime_reconcile_total",
            &[("controller", "services")],
        );
        ensure!(done >= want, "{done}/{want} Services reconciled");
        Ok(m)
    })
    .await?;
    let restart_s = started.elapsed().as_secs_f64();
    let restart_writes = metric(&m, "tendril_services_writes_total");
    ensure!(
        restart_writes == 0.0,
        "{restart_writes} LBServices rewritten after a restart"
    );
    operator.stop(Duration::from_secs(10));
    Ok(Figures {
        n,
        writes_in_flight,
        translate_us,
        create_s,
        cold_s,
        operator_translate_us,
        realize_s,
        status_writes,
        steady_p50_ms: samples[samples.len() / 2],
        steady_max_ms: samples[samples.len() - 1],
        rss_mib,
        restart_s,
    })
}

#[tokio::test]
async fn services_operator_at_scale() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("TENDRIL_SERVICES_SCALE")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let writes: Vec<u32> = std::env::var("TENDRIL_SERVICES_SCALE_WRITES")
        .unwrap_or_else(|_| "1,16".into())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for n in sizes {
        for &w in &writes {
            let f = run_size(n, w).await?;
            eprintln!(
                "services={} in flight={w} done: cold {:.1}s, realize {:.1}s",
                f.n, f.cold_s, f.realize_s
            );
            rows.push(f);
        }
    }
    // The cold start against one write at a time, same size (the first row of each size
    // when `1` is not measured).
    let baseline = |n: usize| {
        rows.iter()
            .filter(|f| f.n == n)
            .min_by_key(|f| f.writes_in_flight)
            .map_or(f64::NAN, |f| f.cold_s)
    };
    println!(
        "\n{:>8} {:>9} {:>12} {:>10} {:>12} {:>8} {:>14} {:>11} {:>13} {:>10} {:>10} {:>8} {:>10}",
        "services",
        "in flight",
        "translate µs",
        "create s",
        "cold start s",
        "× base",
        "op translate µs",
        "realize s",
        "status writes",
        "change p50",
        "change max",
        "RSS MiB",
        "restart s"
    );
    for f in &rows {
        println!(
            "{:>8} {:>9} {:>12.1} {:>10.1} {:>12.1} {:>8.2} {:>14.1} {:>11.1} {:>13.0} {:>8.0}ms {:>8.0}ms {:>8.0} {:>10.1}",
            f.n,
            f.writes_in_flight,
            f.translate_us,
            f.create_s,
            f.cold_s,
            f.cold_s / baseline(f.n),
            f.operator_translate_us,
            f.realize_s,
            f.status_writes,
            f.steady_p50_ms,
            f.steady_max_ms,
            f.rss_mib,
            f.restart_s
        );
    }
    Ok(())
}
