//! Concern `lbipam`: `LoadBalancerIPPool`s → addresses of Services of type LoadBalancer,
//! written to `Service.status.loadBalancer.ingress` (status subresource, server-side apply,
//! field manager `tendril-lbipam`), as Cilium's LB IPAM does.
//!
//! [`allocator`] decides who holds which address (pure values, property-tested) and
//! [`plan`] turns the Kubernetes objects into its inputs and its outcome into statuses;
//! this module is the thin shell: one [`singleton`] reconcile, poked by every change of a
//! Service or a pool, reads both caches whole, plans, and writes what differs from what the
//! caches show.
//!
//! Served: Services of type LoadBalancer whose `spec.loadBalancerClass` is unset or
//! `tendril.dev/lb`; another class is left alone entirely, and so is every Service while no
//! pool exists (dormant, as Cilium's LB IPAM: whatever else writes LoadBalancer addresses
//! keeps doing so). A served Service's ingress is the concern's: addresses someone else
//! wrote there are replaced by the pool's. A Service that stops being
//! served (deleted, another type or class) gives its addresses back; the concern then
//! removes the fields it wrote (ingress and condition) from the status.
//!
//! Restart-safe: the first reconcile of a term waits for both caches, then rebuilds the
//! holdings from every served Service's `status.loadBalancer.ingress` before anything is
//! planned, so nothing already handed out moves or is handed out twice.
//!
//! Reported: the condition `tendril.dev/IPAMRequestSatisfied` on each served Service (a
//! Warning Event whenever it turns False or changes its complaint); `Valid` (False for a
//! block whose start is after its stop, blocks overlapping within the pool, a bad
//! selector), `Conflicting` (overlaps an older pool), `Exhausted`, `Ready`, `usedIPs` and
//! `availableIPs` on each pool (Warning Events when one of the first three goes bad).
//! Metrics: `tendril_lbipam_ips_used{pool}`, `tendril_lbipam_ips_available{pool}`,
//! `tendril_lbipam_allocations_total{pool}`, `tendril_lbipam_releases_total`,
//! `tendril_lbipam_conflicts_total{reason}`, `tendril_lbipam_services_unsatisfied`,
//! `tendril_lbipam_status_writes_total`.

pub mod allocator;
mod metrics;
pub mod plan;

use allocator::{Allocator, Outcome, ServiceKey};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use metrics::{Metrics, PoolLabel, ReasonLabel};
use plan::DesiredService;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use tendril_crds::facts::lbipam::REQUEST_SATISFIED;
use tendril_crds::v1alpha1::LoadBalancerIPPool;
use tendril_runtime::singleton::{self, Singleton};
use tendril_runtime::{self as runtime, DesiredCondition, Reconciler, conditions, events};
use tracing::{debug, info, warn};

/// The concern's name; its field manager is `tendril-lbipam`.
pub const NAME: &str = "lbipam";
/// Status writes in flight at once.
const WRITE_CONCURRENCY: usize = 16;
/// The `action` of the concern's Events.
const EVENT_ACTION: &str = "AllocateLoadBalancerIP";

pub type Error = runtime::ApiError;

struct Lbipam {
    client: kube::Client,
    services: Store<Service>,
    pools: Store<LoadBalancerIPPool>,
    /// `None` until the first reconcile of the term rebuilt it from the Services' status.
    allocator: Mutex<Option<Allocator>>,
    /// Pools with metrics, to drop the series of deleted ones.
    metered_pools: Mutex<BTreeSet<String>>,
    recorder: Recorder,
    metrics: Metrics,
    manager: String,
}

impl Reconciler for Lbipam {
    type Object = Singleton;
    type Error = Error;
    const NAME: &'static str = NAME;

    async fn reconcile(&self, _: Arc<Singleton>) -> Result<Action, Error> {
        // Restoring from a partial list could hand out an address a Service already holds.
        runtime::cache_ready(&self.services, "services").await?;
        runtime::cache_ready(&self.pools, "loadbalancerippools").await?;
        let services = self.services.state();
        let pool_objs = self.pools.state();
        let pools: Vec<_> = pool_objs.iter().map(|p| plan::pool_of(p)).collect();
        let mut requests = Vec::new();
        let mut invalid = BTreeMap::new();
        for svc in services.iter().filter(|s| plan::wants_addresses(s)) {
            let (request, bad) = plan::request_of(svc);
            if !bad.is_empty() {
                invalid.insert(request.key.clone(), bad);
            }
            requests.push(request);
        }
        let out = {
            let mut guard = self.allocator.lock().unwrap_or_else(|p| p.into_inner());
            let allocator = guard.get_or_insert_with(|| restore(&services));
            allocator.plan(&pools, &requests)
        };
        self.report(&out);

        let mut first_error = None;
        if let Err(e) = self.write_services(&services, &out, &invalid).await {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.write_pools(&pool_objs, &out).await {
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(Action::await_change()),
        }
    }
}

/// The holdings the served Services' status shows (in any order: a plan takes Services
/// oldest first and settles any collision among them).
fn restore(services: &[Arc<Service>]) -> Allocator {
    let mut allocator = Allocator::new();
    let mut restored = 0;
    for svc in services.iter().filter(|s| plan::wants_addresses(s)) {
        let ips = plan::ingress_ips(svc);
        restored += ips.len();
        allocator.restore(&plan::key_of(svc), ips);
    }
    info!(
        addresses = restored,
        "LoadBalancer addresses restored from Service status"
    );
    allocator
}

impl Lbipam {
    /// Logs what changed and publishes the counts.
    fn report(&self, out: &Outcome) {
        for (key, ip, pool) in &out.assigned {
            info!(service = %format!("{}/{}", key.0, key.1), %ip, %pool, "LoadBalancer address assigned");
            self.metrics
                .allocations
                .get_or_create(&PoolLabel { pool: pool.clone() })
                .inc();
        }
        for (key, ip) in &out.released {
            info!(service = %format!("{}/{}", key.0, key.1), %ip, "LoadBalancer address released");
            self.metrics.releases.inc();
        }
        let unsatisfied = match out.pools.is_empty() {
            true => 0, // dormant
            false => out.services.values().filter(|o| !o.satisfied()).count(),
        };
        self.metrics.unsatisfied.set(unsatisfied as i64);
        let mut metered = self.metered_pools.lock().unwrap_or_else(|p| p.into_inner());
        for (name, o) in &out.pools {
            let label = PoolLabel { pool: name.clone() };
            let status = plan::pool_status(o);
            self.metrics.used.get_or_create(&label).set(status.used);
            self.metrics
                .available
                .get_or_create(&label)
                .set(status.available);
            metered.insert(name.clone());
        }
        metered.retain(|name| {
            let keep = out.pools.contains_key(name);
            if !keep {
                let label = PoolLabel { pool: name.clone() };
                self.metrics.used.remove(&label);
                self.metrics.available.remove(&label);
            }
            keep
        });
    }

    /// Writes every served Service whose status differs from the plan, and removes the
    /// concern's fields from Services no longer served.
    async fn write_services(
        &self,
        services: &[Arc<Service>],
        out: &Outcome,
        invalid: &BTreeMap<ServiceKey, Vec<String>>,
    ) -> Result<(), kube::Error> {
        let by_key: BTreeMap<ServiceKey, &Arc<Service>> =
            services.iter().map(|s| (plan::key_of(s), s)).collect();
        let mut writes: Vec<(Arc<Service>, Option<DesiredService>)> = Vec::new();
        // Without any pool LB IPAM is dormant (as Cilium's): it leaves LoadBalancer
        // Services to whatever else writes their status, and only takes back its own.
        let dormant = out.pools.is_empty();
        for (key, desired) in plan::desired_services(out, invalid) {
            let Some(svc) = by_key.get(key) else { continue };
            if dormant {
                if plan::has_our_condition(svc) {
                    writes.push(((*svc).clone(), None));
                }
            } else if !desired.is_current(svc) {
                writes.push(((*svc).clone(), Some(desired)));
            }
        }
        for svc in services
            .iter()
            .filter(|s| !plan::wants_addresses(s) && plan::has_our_condition(s))
        {
            if svc.metadata.deletion_timestamp.is_none() {
                writes.push((svc.clone(), None));
            }
        }
        let results = futures::stream::iter(writes)
            .map(|(svc, desired)| async move {
                let res = self.write_service(&svc, desired.as_ref()).await;
                (svc, desired, res)
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let mut first_error = None;
        for (svc, desired, res) in results {
            match res {
                Ok(()) => {
                    if let Some(d) = &desired {
                        self.report_condition(&svc, &d.condition).await;
                    } else {
                        info!(service = %runtime::object_key(svc.as_ref()), "no longer served; LoadBalancer status removed");
                    }
                }
                // Deleted or replaced meanwhile: its own change brings the next reconcile.
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {
                    debug!(service = %runtime::object_key(svc.as_ref()), error = %s.message, "Service changed under us");
                }
                Err(e) => {
                    warn!(service = %runtime::object_key(svc.as_ref()), error = %e, "writing the Service status failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Applies the concern's part of `svc`'s status: its addresses and condition, or
    /// nothing (which releases both) when it is no longer served.
    async fn write_service(
        &self,
        svc: &Service,
        desired: Option<&DesiredService>,
    ) -> Result<(), kube::Error> {
        let api: Api<Service> = Api::namespaced(
            self.client.clone(),
            svc.namespace().as_deref().unwrap_or_default(),
        );
        let mut fields = json!({ "metadata": { "uid": svc.uid() } });
        if let Some(d) = desired {
            let generation = svc.metadata.generation;
            let previous = svc
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_deref())
                .and_then(|c| conditions::find(c, REQUEST_SATISFIED));
            let condition = conditions::merge(previous, &d.condition, generation, Timestamp::now());
            let mut status = json!({ "conditions": [condition] });
            if d.ips.is_empty() {
                // Addresses someone else wrote: taken over, so they go.
                if !plan::ingress_ips(svc).is_empty() {
                    status["loadBalancer"] = json!({ "ingress": [] });
                }
            } else {
                let ingress: Vec<Value> = d
                    .ips
                    .iter()
                    .map(|ip| json!({ "ip": ip.to_string(), "ipMode": "VIP" }))
                    .collect();
                status["loadBalancer"] = json!({ "ingress": ingress });
            }
            fields["status"] = status;
        }
        let body =
            runtime::apply_body::<Service>(&svc.name_any(), svc.namespace().as_deref(), fields);
        runtime::apply_status(&api, &self.manager, &body).await?;
        self.metrics.status_writes.inc();
        Ok(())
    }

    /// A Warning Event (and a count) when a Service's condition turned False or changed
    /// its complaint.
    async fn report_condition(&self, svc: &Service, desired: &DesiredCondition) {
        if desired.status {
            return;
        }
        let previous = svc
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .and_then(|c| conditions::find(c, REQUEST_SATISFIED));
        if previous.is_some_and(|p| {
            p.status == "False" && p.reason == desired.reason && p.message == desired.message
        }) {
            return;
        }
        self.metrics
            .conflicts
            .get_or_create(&ReasonLabel {
                reason: desired.reason.clone(),
            })
            .inc();
        warn!(service = %runtime::object_key(svc), reason = %desired.reason, message = %desired.message, "LoadBalancer address request not satisfied");
        events::publish_warning(
            &self.recorder,
            &svc.object_ref(&()),
            &desired.reason,
            &desired.message,
            EVENT_ACTION,
        )
        .await;
    }

    /// Writes each pool's conditions and counts where they changed, with a Warning Event
    /// for each condition that went bad.
    async fn write_pools(
        &self,
        pools: &[Arc<LoadBalancerIPPool>],
        out: &Outcome,
    ) -> Result<(), kube::Error> {
        let api: Api<LoadBalancerIPPool> = Api::all(self.client.clone());
        for pool in pools {
            let name = pool.name_any();
            let Some(o) = out.pools.get(&name) else {
                continue;
            };
            let desired = plan::pool_status(o);
            let generation = pool.meta().generation;
            let status = pool.status.clone().unwrap_or_default();
            let current = desired
                .conditions
                .iter()
                .all(|d| conditions::is_current(&status.conditions, d, generation))
                && status.used_ips == desired.used
                && status.available_ips == desired.available
                && status.observed_generation == generation;
            if current {
                continue;
            }
            let now = Timestamp::now();
            let conds: Vec<_> = desired
                .conditions
                .iter()
                .map(|d| {
                    conditions::merge(
                        conditions::find(&status.conditions, &d.type_),
                        d,
                        generation,
                        now,
                    )
                })
                .collect();
            let body = runtime::apply_body::<LoadBalancerIPPool>(
                &name,
                None,
                json!({ "status": {
                    "conditions": conds,
                    "observedGeneration": generation,
                    "usedIPs": desired.used,
                    "availableIPs": desired.available,
                }}),
            );
            match runtime::apply_status(&api, &self.manager, &body).await {
                Ok(_) => {
                    self.metrics.status_writes.inc();
                }
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => return Err(e),
            }
            for d in &desired.conditions {
                // Valid=False, Conflicting=True and Exhausted=True are the bad news.
                let bad = match d.type_.as_str() {
                    t if t == conditions::VALID => !d.status,
                    plan::CONFLICTING | plan::EXHAUSTED => d.status,
                    _ => false,
                };
                let was = conditions::find(&status.conditions, &d.type_);
                let news = was.is_none_or(|c| {
                    c.status != if d.status { "True" } else { "False" } || c.message != d.message
                });
                if bad && news {
                    warn!(pool = %name, condition = %d.type_, message = %d.message, "LoadBalancerIPPool problem");
                    events::publish_warning(
                        &self.recorder,
                        &pool.object_ref(&()),
                        &d.reason,
                        &d.message,
                        EVENT_ACTION,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }
}

/// Runs the LB IPAM controller until `ctx.shutdown`.
pub async fn run(ctx: runtime::Context) -> anyhow::Result<()> {
    let client = ctx.client.clone();
    let services = ctx.caches.all::<Service>();
    let pools = ctx.caches.all::<LoadBalancerIPPool>();
    let ready = {
        let (s, p) = (services.store(), pools.store());
        async move {
            runtime::store_ready(&s).await;
            runtime::store_ready(&p).await;
        }
    };
    let controller = singleton::controller(NAME, ready)
        // Only LoadBalancer Services (and those whose status it wrote) concern LB IPAM: a
        // cluster's churn of ClusterIP Services wakes nothing.
        .watches_stream(
            services.trigger().filter(|item| {
                futures::future::ready(item.as_ref().map_or(true, plan::is_relevant))
            }),
            singleton::on_change(NAME, None),
        )
        .watches_stream(pools.trigger(), singleton::on_change(NAME, None));
    let reconciler = Lbipam {
        client: client.clone(),
        services: services.store(),
        pools: pools.store(),
        allocator: Mutex::new(None),
        metered_pools: Mutex::default(),
        recorder: events::recorder(client, "tendril-operator"),
        metrics: Metrics::new(&ctx.metrics),
        manager: runtime::field_manager(NAME),
    };
    runtime::run(controller, reconciler, &ctx).await;
    Ok(())
}
