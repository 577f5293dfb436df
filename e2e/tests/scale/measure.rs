//! What the scale harness measures with: process CPU and RSS, the apiserver's write
//! counters, the operator's reconcile histograms, pod → Endpoint latencies, workqueue peaks.

use super::*;

/// CPU time (user + system) of a process, seconds.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// VmRSS and VmHWM (peak) of a process, MiB.
pub(super) fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Writes (POST, PUT, PATCH, DELETE, APPLY) the apiserver served, by (group, resource).
pub(super) async fn apiserver_writes(
    plane: &ControlPlane,
) -> Result<BTreeMap<(String, String), f64>> {
    let text = plane.kubectl(["get", "--raw", "/metrics"]).await?;
    let m = Metrics::parse(&text);
    let mut out = BTreeMap::new();
    for s in m.matching("apiserver_request_total", &[]) {
        let verb = s.labels.get("verb").map(String::as_str).unwrap_or("");
        if !matches!(verb, "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY") {
            continue;
        }
        let group = s.labels.get("group").cloned().unwrap_or_default();
        let mut resource = s.labels.get("resource").cloned().unwrap_or_default();
        if let Some(sub) = s.labels.get("subresource").filter(|v| !v.is_empty()) {
            resource = format!("{resource}/{sub}");
        }
        *out.entry((group, resource)).or_default() += s.value;
    }
    Ok(out)
}

pub(super) fn writes_delta(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
) -> BTreeMap<(String, String), f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Per concern: reconciles, mean and p99 reconcile time (s) between two scrapes.
pub(super) fn reconcile_times(
    before: &Metrics,
    after: &Metrics,
) -> BTreeMap<String, (f64, f64, f64)> {
    let name = "controller_runtime_reconcile_time_seconds";
    let mut out = BTreeMap::new();
    let controllers: Vec<String> = after
        .matching(&format!("{name}_count"), &[])
        .filter_map(|s| s.labels.get("controller").cloned())
        .collect();
    for c in controllers {
        let l = [("controller", c.as_str())];
        let d = |m: &str| after.sum(m, &l) - before.sum(m, &l);
        let count = d(&format!("{name}_count"));
        if count <= 0.0 {
            continue;
        }
        let mean = d(&format!("{name}_sum")) / count;
        // p99 from the cumulative buckets' deltas: the first bound holding 99%.
        let mut buckets: Vec<(f64, f64)> = after
            .matching(&format!("{name}_bucket"), &l)
            .filter_map(|s| {
                let le = s.labels.get("le")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                let prev = before
                    .matching(&format!("{name}_bucket"), &l)
                    .find(|p| p.labels.get("le") == Some(le))
                    .map_or(0.0, |p| p.value);
                Some((bound, s.value - prev))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let p99 = buckets
            .iter()
            .find(|(_, n)| *n >= 0.99 * count)
            .map_or(f64::NAN, |(b, _)| *b);
        out.insert(c, (count, mean, p99));
    }
    out
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// When each pod was sent, and when its `Endpoint` first carried an identity.
#[derive(Default)]
pub(super) struct Latencies {
    pub(super) created: HashMap<String, Instant>,
    pub(super) endpoint: HashMap<String, Instant>,
}

impl Latencies {
    /// p50, p99, max (s) and how many of `keys` have no Endpoint yet.
    pub(super) fn of(&self, keys: &[String]) -> (f64, f64, f64, usize) {
        let mut v = Vec::new();
        let mut missing = 0;
        for k in keys {
            match (self.created.get(k), self.endpoint.get(k)) {
                (Some(c), Some(e)) => v.push(e.saturating_duration_since(*c).as_secs_f64()),
                _ => missing += 1,
            }
        }
        v.sort_by(f64::total_cmp);
        (
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.last().copied().unwrap_or(f64::NAN),
            missing,
        )
    }
}

/// Records the first time each Endpoint is seen with an identity.
pub(super) async fn watch_endpoints(api: Api<Endpoint>, lat: Arc<Mutex<Latencies>>) {
    let mut stream = watcher(api, watcher::Config::default()).boxed();
    while let Some(ev) = stream.next().await {
        let ep = match ev {
            Ok(watcher::Event::Apply(ep) | watcher::Event::InitApply(ep)) => ep,
            _ => continue,
        };
        if ep.spec.identity.is_none() {
            continue;
        }
        let key = format!(
            "{}/{}",
            ep.metadata.namespace.as_deref().unwrap_or(""),
            ep.metadata.name.as_deref().unwrap_or("")
        );
        lat.lock()
            .unwrap()
            .endpoint
            .entry(key)
            .or_insert_with(Instant::now);
    }
}

/// Samples the operator's RSS and its highest workqueue depth every second.
#[derive(Default, Clone, Copy)]
pub(super) struct Peaks {
    pub(super) queue_depth: f64,
}

pub(super) async fn sample_peaks(port: u16, peaks: Arc<Mutex<Peaks>>) {
    loop {
        if let Ok(m) = fetch_metrics(port).await {
            let depth = m
                .matching("workqueue_depth", &[])
                .map(|s| s.value)
                .fold(0.0, f64::max);
            let mut p = peaks.lock().unwrap();
            p.queue_depth = p.queue_depth.max(depth);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Aborts a task on drop.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A file removed on drop.
pub(super) struct ScratchFile(pub(super) std::path::PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
