//! Prometheus metrics under the names controller-runtime dashboards already know, plus
//! `tendril_` domain metrics, encoded as OpenMetrics text.
//!
//! kube-runtime's `Controller` keeps its scheduler queue private, so the `workqueue_*`
//! families are measured at the edges of the harness and mean:
//! - `workqueue_adds_total`: reconcile requests handed to the harness (kube-runtime has
//!   already de-duplicated triggers for an object that is pending, as a workqueue does);
//! - `workqueue_depth`: requests in flight plus objects whose last reconcile failed and
//!   that wait for their backoff retry;
//! - `workqueue_queue_duration_seconds`: for a retry, how late it started after its
//!   backoff expired (the time it sat in the queue); first-time triggers are not timed,
//!   because their enqueue time is not visible outside kube-runtime;
//! - `workqueue_work_duration_seconds`: time spent in reconcile;
//! - `workqueue_retries_total`: requeues after an error (rate-limited requeues).

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::{
    counter::Counter,
    family::Family,
    gauge::Gauge,
    histogram::{Histogram, exponential_buckets},
    info::Info,
};
use prometheus_client::registry::{Metric, Registry};
use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub controller: String,
    /// `success`, `error` or `requeue` (success with an explicit requeue).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    /// The error's [`MetricLabel`](super::MetricLabel).
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NameLabel {
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

fn duration_histogram() -> Histogram {
    // 1ms .. ~65s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric of one binary; cloneable handles, one registry.
pub struct Metrics {
    registry: Mutex<Registry>,
    domain: Mutex<HashMap<String, Box<dyn Any + Send + Sync>>>,
    reconcile_total: Family<ResultLabels, Counter>,
    reconcile_errors_total: Family<ErrorLabels, Counter>,
    reconcile_time_seconds: Family<ControllerLabel, Histogram, fn() -> Histogram>,
    workqueue_depth: Family<NameLabel, Gauge>,
    workqueue_adds_total: Family<NameLabel, Counter>,
    workqueue_queue_duration_seconds: Family<NameLabel, Histogram, fn() -> Histogram>,
    workqueue_work_duration_seconds: Family<NameLabel, Histogram, fn() -> Histogram>,
    workqueue_retries_total: Family<NameLabel, Counter>,
    leader_election_master_status: Family<NameLabel, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry with the harness's families and `tendril_build_info{version}`.
    pub fn new(version: &str) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Mutex::new(Registry::default()),
            domain: Mutex::default(),
            reconcile_total: Family::default(),
            reconcile_errors_total: Family::default(),
            reconcile_time_seconds: Family::new_with_constructor(duration_histogram),
            workqueue_depth: Family::default(),
            workqueue_adds_total: Family::default(),
            workqueue_queue_duration_seconds: Family::new_with_constructor(duration_histogram),
            workqueue_work_duration_seconds: Family::new_with_constructor(duration_histogram),
            workqueue_retries_total: Family::default(),
            leader_election_master_status: Family::default(),
        };
        // prometheus-client appends `_total` to counters and `_info` to infos.
        registry.register(
            "controller_runtime_reconcile",
            "Total number of reconciliations per controller",
            m.reconcile_total.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_errors",
            "Total number of reconciliation errors per controller and kind of error",
            m.reconcile_errors_total.clone(),
        );
        registry.register(
            "controller_runtime_reconcile_time_seconds",
            "Length of time per reconciliation per controller",
            m.reconcile_time_seconds.clone(),
        );
        registry.register(
            "workqueue_depth",
            "Current depth of workqueue (in-flight reconciles plus objects waiting for a retry)",
            m.workqueue_depth.clone(),
        );
        registry.register(
            "workqueue_adds",
            "Total number of adds handled by workqueue (de-duplicated reconcile requests)",
            m.workqueue_adds_total.clone(),
        );
        registry.register(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested (retries)",
            m.workqueue_queue_duration_seconds.clone(),
        );
        registry.register(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            m.workqueue_work_duration_seconds.clone(),
        );
        registry.register(
            "workqueue_retries",
            "Total number of retries handled by workqueue",
            m.workqueue_retries_total.clone(),
        );
        registry.register(
            "leader_election_master_status",
            "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master",
            m.leader_election_master_status.clone(),
        );
        registry.register(
            "tendril_build",
            "Build information of this binary",
            Info::new(VersionLabel {
                version: version.to_string(),
            }),
        );
        *m.registry.lock().expect("registry lock") = registry;
        m
    }

    /// The metric registered under `name`, registering `make()` the first time. Calling it
    /// again (e.g. when a concern restarts after regaining leadership) returns the same
    /// handle. `name` excludes the suffix prometheus-client adds (`_total` for counters).
    ///
    /// # Panics
    /// If `name` was registered before with a different metric type.
    pub fn domain<M>(&self, name: &str, help: &str, make: impl FnOnce() -> M) -> M
    where
        M: Metric + Clone + Send + Sync + 'static,
    {
        let mut domain = self.domain.lock().expect("domain lock");
        if let Some(existing) = domain.get(name) {
            return existing
                .downcast_ref::<M>()
                .unwrap_or_else(|| panic!("metric {name} registered twice with different types"))
                .clone();
        }
        let metric = make();
        self.registry
            .lock()
            .expect("registry lock")
            .register(name, help, metric.clone());
        domain.insert(name.to_string(), Box::new(metric.clone()));
        metric
    }

    /// The handles of one controller.
    pub fn controller(&self, name: &str) -> ControllerMetrics {
        let c = ControllerLabel {
            controller: name.to_string(),
        };
        let n = NameLabel {
            name: name.to_string(),
        };
        // Touch every series so dashboards see zeros before the first event.
        for result in ["success", "error", "requeue"] {
            self.reconcile_total
                .get_or_create(&ResultLabels {
                    controller: name.to_string(),
                    result: result.to_string(),
                })
                .get();
        }
        ControllerMetrics {
            name: name.to_string(),
            reconcile_total: self.reconcile_total.clone(),
            reconcile_errors_total: self.reconcile_errors_total.clone(),
            reconcile_time: self.reconcile_time_seconds.get_or_create(&c).clone(),
            depth: self.workqueue_depth.get_or_create(&n).clone(),
            adds: self.workqueue_adds_total.get_or_create(&n).clone(),
            queue_duration: self
                .workqueue_queue_duration_seconds
                .get_or_create(&n)
                .clone(),
            work_duration: self
                .workqueue_work_duration_seconds
                .get_or_create(&n)
                .clone(),
            retries: self.workqueue_retries_total.get_or_create(&n).clone(),
        }
    }

    /// `leader_election_master_status{name}`: 1 while this process holds the lease.
    pub fn leader(&self, lease: &str) -> Gauge {
        self.leader_election_master_status
            .get_or_create(&NameLabel {
                name: lease.to_string(),
            })
            .clone()
    }

    /// The OpenMetrics exposition, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry lock"))
            .expect("writing to a String");
        out
    }
}

/// The metric handles of one controller (label values bound).
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    name: String,
    reconcile_total: Family<ResultLabels, Counter>,
    reconcile_errors_total: Family<ErrorLabels, Counter>,
    reconcile_time: Histogram,
    pub depth: Gauge,
    pub adds: Counter,
    pub queue_duration: Histogram,
    pub work_duration: Histogram,
    pub retries: Counter,
}

impl ControllerMetrics {
    /// Starts timing one reconcile; the returned guard records it when dropped, so every
    /// exit path (including a panic or a cancelled future) is counted and timed.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.adds.inc();
        ReconcileTimer {
            metrics: self.clone(),
            start: Instant::now(),
            result: "error",
        }
    }

    pub fn error(&self, label: &str) {
        self.reconcile_errors_total
            .get_or_create(&ErrorLabels {
                controller: self.name.clone(),
                error: label.to_string(),
            })
            .inc();
    }
}

/// Observes `controller_runtime_reconcile_time_seconds` and
/// `controller_runtime_reconcile_total{result}` on drop.
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: ControllerMetrics,
    start: Instant,
    result: &'static str,
}

impl ReconcileTimer {
    /// Sets the `result` label (`success`, `requeue` or `error`, the default).
    pub fn set_result(&mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        self.metrics.reconcile_time.observe(secs);
        self.metrics.work_duration.observe(secs);
        self.metrics
            .reconcile_total
            .get_or_create(&ResultLabels {
                controller: self.metrics.name.clone(),
                result: self.result.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_controller_runtime_names_and_eof() {
        let m = Metrics::new("1.2.3");
        let c = m.controller("nodes");
        {
            let mut t = c.reconcile_started();
            t.set_result("success");
        }
        {
            let _t = c.reconcile_started();
            c.error("kube_api");
        }
        c.retries.inc();
        m.leader("tendril-operator").set(1);
        let g: Gauge = m.domain("tendril_nodes", "Nodes known", Gauge::default);
        g.set(3);
        // the same handle comes back on the second registration
        let g2: Gauge = m.domain("tendril_nodes", "Nodes known", Gauge::default);
        g2.inc();

        let text = m.encode();
        for needle in [
            "# TYPE controller_runtime_reconcile counter",
            "controller_runtime_reconcile_total{controller=\"nodes\",result=\"success\"} 1",
            "controller_runtime_reconcile_total{controller=\"nodes\",result=\"error\"} 1",
            "controller_runtime_reconcile_errors_total{controller=\"nodes\",error=\"kube_api\"} 1",
            "# TYPE controller_runtime_reconcile_time_seconds histogram",
            "controller_runtime_reconcile_time_seconds_count{controller=\"nodes\"} 2",
            "workqueue_depth{name=\"nodes\"} 0",
            "workqueue_adds_total{name=\"nodes\"} 2",
            "workqueue_queue_duration_seconds_count{name=\"nodes\"} 0",
            "workqueue_work_duration_seconds_count{name=\"nodes\"} 2",
            "workqueue_retries_total{name=\"nodes\"} 1",
            "leader_election_master_status{name=\"tendril-operator\"} 1",
            "tendril_build_info{version=\"1.2.3\"} 1",
            "tendril_nodes 4",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // Every sample line belongs to a family announced by a TYPE line.
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                families.iter().any(|f| line.starts_with(f)),
                "sample without family: {line}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "different types")]
    fn domain_metric_type_clash_panics() {
        let m = Metrics::new("0");
        let _: Gauge = m.domain("tendril_x", "x", Gauge::default);
        let _: Counter = m.domain("tendril_x", "x", Counter::default);
    }
}
