//! LB IPAM on a real apiserver, through `tendril-operator`: `LoadBalancerIPPool`s →
//! `Service.status.loadBalancer.ingress`.
//!
//! One dedicated plane (the concern writes the status of every LoadBalancer Service of
//! the cluster). In order: a Service gets the lowest address of its pool, with the
//! condition `tendril.dev/IPAMRequestSatisfied=True`, and the services concern turns that
//! address into a LoadBalancer frontend of its `LBService` (the datapath's input); a
//! requested address is honoured, the same request by another Service is refused
//! (condition + Warning Event), and one outside every pool too; a sharing key puts two
//! Services with disjoint ports on one address and a third with a colliding port on
//! another; a small pool runs out (condition, pool `Exhausted`, Event, metrics) and the
//! waiting Service gets the address freed by a deletion; a Service turned ClusterIP gives
//! its address back (status cleared) and another class is left alone; an address written
//! by someone else on a served Service no pool selects is taken away (`NoPool`); an invalid pool
//! (start after stop) is `Valid=False` and an overlapping younger pool `Conflicting`; the
//! time from Service creation to address in status over 50 Services (printed); the
//! operator killed in the middle of allocating 30 Services and restarted keeps every
//! address it had written, and finishes the rest; finally, an independent check that no
//! address is held by two Services that may not share it.
//!
//! A second test runs the whole path on a simulated two-node cluster (operator, agents,
//! pods wired by tendril-cni): an address from a pool reaches the backend from a client
//! outside the cluster that routes the pool to node 0 (as BGP will announce it), with the
//! time from Service creation to address, to realized on every node, to first connection.
//! It needs root.
//!
//! Run `cargo build -p tendril-controllers --bins` first: the test spawns the binary.

mod operator_common;
mod services_common;

use anyhow::{Context as _, Result, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use operator_common::{TIMEOUT, free_port};
use serde_json::{Value, json};
use services_common::{World, connect_from_netns};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_crds::facts::lbipam::{IPS_ANNOTATION, REQUEST_SATISFIED, SHARING_KEY_ANNOTATION};
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_crds::v1alpha1::{LBService, LoadBalancerIPPool};
use tendril_e2e::services::{LB_RANGE, NetnsSet, add_external_client, netns_prefix};
use tendril_e2e::{ControlPlane, Process, TestEnv, eventually, fetch_metrics, wait_for};

fn start_operator(env: &TestEnv, port: u16) -> Result<Process> {
    Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,tendril_controllers::lbipam=debug")
        .spawn()
}

/// A LoadBalancer Service drawing from the pool labelled `pool`.
fn service(ns: &str, name: &str, pool: &str, annotations: Value, ports: Value) -> Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": {"pool": pool},
                     "annotations": annotations},
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": ports},
    }))?)
}

fn tcp(port: i32) -> Value {
    json!([{"name": "p", "port": port, "protocol": "TCP"}])
}

fn ips(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

/// (status, reason, message) of the concern's condition.
fn satisfied(svc: &Service) -> Option<(String, String, String)> {
    let c = svc
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == REQUEST_SATISFIED)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn pool_condition(p: &LoadBalancerIPPool, type_: &str) -> Option<(String, String, String)> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until object `name` exists and satisfies `cond` (what: for the error).
async fn wait_until<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    cond: impl Fn(&K) -> bool + Send + 'static,
) -> Result<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    wait_for(
        api,
        name,
        move |o: Option<&K>| o.is_some_and(&cond),
        TIMEOUT,
    )
    .await
    .with_context(|| format!("{} {name}: {what}", K::kind(&())))?
    .context("present")
}

async fn wait_svc(
    api: &Api<Service>,
    name: &str,
    what: &str,
    cond: impl Fn(&Service) -> bool + Send + 'static,
) -> Result<Service> {
    wait_until(api, name, what, cond).await
}

async fn wait_pool(
    api: &Api<LoadBalancerIPPool>,
    name: &str,
    what: &str,
    cond: impl Fn(&LoadBalancerIPPool) -> bool + Send + 'static,
) -> Result<LoadBalancerIPPool> {
    wait_until(api, name, what, cond).await
}

async fn wait_ip(api: &Api<Service>, name: &str) -> Result<String> {
    let svc = wait_svc(api, name, "an address", |s| !ips(s).is_empty()).await?;
    Ok(ips(&svc)[0].clone())
}

async fn warning_event(events: &Api<Event>, regarding: &str, reason: &str) -> Result<()> {
    let (regarding, reason) = (regarding.to_string(), reason.to_string());
    eventually(TIMEOUT, || {
        let (events, regarding, reason) = (events.clone(), regarding.clone(), reason.clone());
        async move {
            let list = events.list(&ListParams::default()).await?;
            ensure!(
                list.items.iter().any(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some(reason.as_str())
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(regarding.as_str())
                }),
                "no Warning Event {reason} about {regarding}"
            );
            Ok(())
        }
    })
    .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Stops the watch task when the test ends (before the plane goes away under it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records, on a watch of the namespace's Services, when each first showed an address.
/// The watch backs off on errors: without it, a watch whose apiserver stopped retries in
/// a loop that never yields, and the test's runtime can never shut down.
fn watch_first_address(api: Api<Service>) -> (Arc<Mutex<HashMap<String, Instant>>>, AbortOnDrop) {
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let out = seen.clone();
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if let Ok(svc) = item
                && !ips(&svc).is_empty()
            {
                let name = svc.metadata.name.clone().unwrap_or_default();
                out.lock().unwrap().entry(name).or_insert_with(Instant::now);
            }
        }
    });
    (seen, AbortOnDrop(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_services_get_addresses_from_pools() -> Result<()> {
    let plane = ControlPlane::dedicated("lbipam").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let services: Api<Service> = env.api();
    let pools: Api<LoadBalancerIPPool> = Api::all(client.clone());
    let lbsvc: Api<LBService> = env.api();
    let events: Api<Event> = env.api();
    let default_events: Api<Event> = Api::namespaced(client.clone(), "default");

    let [main, tiny, broken, younger] =
        ["main", "tiny", "broken", "younger"].map(|p| env.unique_name(&format!("lbipp-{p}")));
    let pool = |name: &str, selector: &str, blocks: Value| -> Result<LoadBalancerIPPool> {
        env.delete_on_drop::<LoadBalancerIPPool>(name);
        Ok(serde_json::from_value(json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "LoadBalancerIPPool",
            "metadata": {"name": name},
            "spec": {"blocks": blocks, "serviceSelector": {"matchLabels": {"pool": selector}}},
        }))?)
    };
    let pp = PostParams::default();
    pools
        .create(
            &pp,
            &pool(&main, "main", json!([{"cidr": "198.51.100.0/24"}]))?,
        )
        .await?;
    pools
        .create(
            &pp,
            &pool(
                &tiny,
                "tiny",
                json!([{"start": "203.0.113.10", "stop": "203.0.113.11"}]),
            )?,
        )
        .await?;
    pools
        .create(
            &pp,
            &pool(
                &broken,
                "broken",
                json!([{"start": "192.0.2.9", "stop": "192.0.2.1"}]),
            )?,
        )
        .await?;

    let port = free_port()?;
    let mut operator = start_operator(&env, port)?;
    operator
        .wait_for_log("LoadBalancer addresses restored", TIMEOUT)
        .await?;

    // The lowest address of the pool (not the network address), condition True.
    services
        .create(&pp, &service(&ns, "web", "main", json!({}), tcp(80))?)
        .await?;
    let web = wait_svc(&services, "web", "an address and the condition", |s| {
        !ips(s).is_empty() && satisfied(s).is_some()
    })
    .await?;
    ensure!(ips(&web) == ["198.51.100.1"], "web: {:?}", ips(&web));
    let (status, reason, message) = satisfied(&web).unwrap();
    ensure!(
        status == "True" && reason == "Satisfied" && message == "assigned 198.51.100.1",
        "web condition: {status} {reason} {message}"
    );
    // The services concern serves it: the address is a LoadBalancer frontend of the
    // LBService, which the agents program into the datapath.
    let lb = wait_for(
        &lbsvc,
        "web",
        |o: Option<&LBService>| {
            o.is_some_and(|lb| {
                lb.spec.frontends.iter().any(|f| {
                    f.type_ == "LoadBalancer" && f.address.as_deref() == Some("198.51.100.1")
                })
            })
        },
        TIMEOUT,
    )
    .await
    .context("LBService web with the LoadBalancer frontend")?;
    ensure!(lb.is_some());

    // A requested address is honoured; the same request by another Service is refused,
    // and an address outside every pool too.
    services
        .create(
            &pp,
            &service(
                &ns,
                "fixed",
                "main",
                json!({IPS_ANNOTATION: "198.51.100.200"}),
                tcp(80),
            )?,
        )
        .await?;
    ensure!(wait_ip(&services, "fixed").await? == "198.51.100.200");
    services
        .create(
            &pp,
            &service(
                &ns,
                "thief",
                "main",
                json!({IPS_ANNOTATION: "198.51.100.200"}),
                tcp(443),
            )?,
        )
        .await?;
    let thief = wait_svc(&services, "thief", "refused", |s| {
        satisfied(s).is_some_and(|c| c.0 == "False")
    })
    .await?;
    let (_, reason, message) = satisfied(&thief).unwrap();
    ensure!(
        reason == "IPAlreadyAllocated"
            && message.contains("198.51.100.200")
            && message.contains(&format!("{ns}/fixed")),
        "thief: {reason}: {message}"
    );
    ensure!(ips(&thief).is_empty(), "thief got {:?}", ips(&thief));
    warning_event(&events, "thief", "IPAlreadyAllocated").await?;
    let mut outside = service(&ns, "outside", "main", json!({}), tcp(80))?;
    outside.spec.as_mut().unwrap().load_balancer_ip = Some("192.0.2.77".into());
    services.create(&pp, &outside).await?;
    let outside = wait_svc(&services, "outside", "refused", |s| {
        satisfied(s).is_some_and(|c| c.0 == "False")
    })
    .await?;
    ensure!(
        satisfied(&outside).unwrap().1 == "RequestedIPNotInPool",
        "outside: {:?}",
        satisfied(&outside)
    );
    warning_event(&events, "outside", "RequestedIPNotInPool").await?;

    // Sharing: disjoint ports share, a colliding port does not.
    let key = json!({SHARING_KEY_ANNOTATION: "front"});
    services
        .create(&pp, &service(&ns, "share-a", "main", key.clone(), tcp(80))?)
        .await?;
    let a = wait_ip(&services, "share-a").await?;
    services
        .create(
            &pp,
            &service(
                &ns,
                "share-b",
                "main",
                key.clone(),
                json!([{"port": 53, "protocol": "UDP"}]),
            )?,
        )
        .await?;
    let b = wait_ip(&services, "share-b").await?;
    services
        .create(&pp, &service(&ns, "share-c", "main", key.clone(), tcp(80))?)
        .await?;
    let c = wait_ip(&services, "share-c").await?;
    println!("sharing key front: share-a {a}, share-b {b}, share-c {c}");
    ensure!(a == b, "share-a {a} and share-b {b} should share");
    ensure!(a != c, "share-c {c} collides on port 80 with share-a {a}");

    // Exhaustion: two addresses, three Services; the third waits, the pool says so.
    for name in ["small-1", "small-2", "small-3"] {
        services
            .create(&pp, &service(&ns, name, "tiny", json!({}), tcp(80))?)
            .await?;
    }
    let s1 = wait_ip(&services, "small-1").await?;
    let s2 = wait_ip(&services, "small-2").await?;
    let s3 = wait_svc(&services, "small-3", "exhausted", |s| {
        satisfied(s).is_some_and(|c| c.1 == "PoolExhausted")
    })
    .await?;
    ensure!(ips(&s3).is_empty());
    println!(
        "exhausted: {}",
        satisfied(&s3).map(|c| c.2).unwrap_or_default()
    );
    warning_event(&events, "small-3", "PoolExhausted").await?;
    let p = wait_pool(&pools, &tiny, "Exhausted", |p| {
        pool_condition(p, "Exhausted").is_some_and(|c| c.0 == "True")
            && p.status
                .as_ref()
                .is_some_and(|s| s.used_ips == 2 && s.available_ips == 0)
    })
    .await?;
    ensure!(
        pool_condition(&p, "Ready").is_some_and(|c| c.0 == "False" && c.1 == "Exhausted"),
        "tiny Ready: {:?}",
        pool_condition(&p, "Ready")
    );
    warning_event(&default_events, &tiny, "ServicesWaiting").await?;
    eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        ensure!(
            m.value("tendril_lbipam_ips_used", &[("pool", tiny.as_str())]) == Some(2.0),
            "ips_used of tiny"
        );
        ensure!(
            m.value("tendril_lbipam_ips_available", &[("pool", tiny.as_str())]) == Some(0.0),
            "ips_available of tiny"
        );
        ensure!(
            m.value(
                "tendril_lbipam_conflicts_total",
                &[("reason", "PoolExhausted")]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "conflicts_total PoolExhausted"
        );
        ensure!(
            m.value(
                "tendril_lbipam_allocations_total",
                &[("pool", main.as_str())]
            )
            .unwrap_or(0.0)
                >= 4.0,
            "allocations_total of main"
        );
        Ok(())
    })
    .await?;
    // A deletion frees an address; the waiting Service takes exactly that one.
    services.delete("small-1", &DeleteParams::default()).await?;
    let freed = wait_ip(&services, "small-3").await?;
    ensure!(freed == s1, "small-3 got {freed}, want the freed {s1}");
    ensure!(s1 != s2);
    wait_pool(&pools, &tiny, "no longer exhausted", |p| {
        pool_condition(p, "Exhausted").is_some_and(|c| c.0 == "False")
    })
    .await?;

    // Type change: the address goes back, the concern's status fields with it; a new
    // Service takes it. Another class is left alone.
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "ClusterIP"}})),
        )
        .await?;
    wait_svc(&services, "web", "status cleared", |s| {
        ips(s).is_empty() && satisfied(s).is_none()
    })
    .await?;
    services
        .create(&pp, &service(&ns, "web2", "main", json!({}), tcp(80))?)
        .await?;
    ensure!(wait_ip(&services, "web2").await? == "198.51.100.1");
    let mut foreign = service(&ns, "foreign", "main", json!({}), tcp(80))?;
    foreign.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
    services.create(&pp, &foreign).await?;
    services
        .create(&pp, &service(&ns, "barrier", "main", json!({}), tcp(80))?)
        .await?;
    wait_ip(&services, "barrier").await?;
    let foreign = services.get("foreign").await?;
    ensure!(
        ips(&foreign).is_empty() && satisfied(&foreign).is_none(),
        "another class was touched: {:?}",
        foreign.status
    );

    // A served Service's ingress is LB IPAM's: an address someone else wrote there goes
    // when no pool selects the Service, which is told why.
    services
        .create(&pp, &service(&ns, "handmade", "none", json!({}), tcp(80))?)
        .await?;
    services
        .patch_status(
            "handmade",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.99"}]}}}),
            ),
        )
        .await?;
    wait_svc(
        &services,
        "handmade",
        "taken over: NoPool, no address",
        |s| ips(s).is_empty() && satisfied(s).is_some_and(|c| c.0 == "False" && c.1 == "NoPool"),
    )
    .await?;

    // Pools the concern refuses: start after stop; overlapping an older pool.
    let p = wait_pool(&pools, &broken, "Valid=False", |p| {
        pool_condition(p, "Valid").is_some_and(|c| c.0 == "False")
    })
    .await?;
    let (_, reason, message) = pool_condition(&p, "Valid").unwrap();
    ensure!(
        reason == "InvalidBlocks" && message.contains("start 192.0.2.9 is after stop 192.0.2.1"),
        "broken: {reason}: {message}"
    );
    warning_event(&default_events, &broken, "InvalidBlocks").await?;
    pools
        .create(
            &pp,
            &pool(&younger, "main", json!([{"cidr": "198.51.100.0/28"}]))?,
        )
        .await?;
    let p = wait_pool(&pools, &younger, "Conflicting", |p| {
        pool_condition(p, "Conflicting").is_some_and(|c| c.0 == "True")
    })
    .await?;
    let (_, _, message) = pool_condition(&p, "Conflicting").unwrap();
    ensure!(message.contains(&main), "younger: {message}");

    // Time from creation to address in status, 50 Services created one after the other.
    let (seen, _watch) = watch_first_address(services.clone());
    let mut created = Vec::new();
    for i in 0..50 {
        let name = format!("lat-{i}");
        let svc = service(&ns, &name, "main", json!({}), tcp(80))?;
        created.push((name, Instant::now()));
        services.create(&pp, &svc).await?;
    }
    eventually(TIMEOUT, || async {
        let seen = seen.lock().unwrap();
        let missing = created
            .iter()
            .filter(|(n, _)| !seen.contains_key(n))
            .count();
        ensure!(missing == 0, "{missing} Services without an address");
        Ok(())
    })
    .await?;
    let mut latencies: Vec<Duration> = {
        let seen = seen.lock().unwrap();
        created
            .iter()
            .map(|(n, t)| seen[n].duration_since(*t))
            .collect()
    };
    latencies.sort();
    println!(
        "creation → LoadBalancer address in status, {} Services: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );

    // Restart mid-allocation: 30 Services created while the operator is killed (SIGKILL)
    // after the first addresses appear; every address written before stays, all get one.
    let creator = {
        let services = services.clone();
        let ns = ns.clone();
        tokio::spawn(async move {
            for i in 0..30 {
                let svc = service(&ns, &format!("rs-{i}"), "main", json!({}), tcp(80))?;
                services.create(&PostParams::default(), &svc).await?;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        })
    };
    eventually(TIMEOUT, || async {
        let n = seen
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("rs-"))
            .count();
        ensure!(n >= 5, "{n} rs- Services with an address");
        Ok(())
    })
    .await?;
    operator.kill();
    let before: BTreeMap<String, Vec<String>> = services
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|s| !ips(s).is_empty())
        .map(|s| (s.metadata.name.clone().unwrap_or_default(), ips(s)))
        .collect();
    let rs_before = before.keys().filter(|k| k.starts_with("rs-")).count();
    println!("operator killed with {rs_before}/30 rs- Services addressed");
    creator.await??;
    let port = free_port()?;
    let mut operator = start_operator(&env, port)?;
    operator
        .wait_for_log("LoadBalancer addresses restored", TIMEOUT)
        .await?;
    for i in 0..30 {
        wait_ip(&services, &format!("rs-{i}")).await?;
    }
    let after: BTreeMap<String, Vec<String>> = services
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|s| !ips(s).is_empty())
        .map(|s| (s.metadata.name.clone().unwrap_or_default(), ips(s)))
        .collect();
    for (name, addrs) in &before {
        ensure!(
            after.get(name) == Some(addrs),
            "{name} had {addrs:?} before the restart, {:?} after",
            after.get(name)
        );
    }

    // Independently of the concern: an address held by several Services only when they
    // share a key, in one namespace, with disjoint ports.
    let all = services.list(&ListParams::default()).await?.items;
    let mut holders: BTreeMap<String, Vec<&Service>> = BTreeMap::new();
    for s in &all {
        for ip in ips(s) {
            holders.entry(ip).or_default().push(s);
        }
    }
    let ports = |s: &Service| -> Vec<(String, i32)> {
        s.spec
            .as_ref()
            .and_then(|sp| sp.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.protocol.unwrap_or_default(), p.port))
            .collect()
    };
    let key_of = |s: &Service| {
        s.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SHARING_KEY_ANNOTATION).cloned())
    };
    for (ip, hs) in &holders {
        for (i, x) in hs.iter().enumerate() {
            for y in &hs[i + 1..] {
                let disjoint = ports(x).iter().all(|p| !ports(y).contains(p));
                ensure!(
                    key_of(x).is_some() && key_of(x) == key_of(y) && disjoint,
                    "{ip} held by {:?} and {:?}",
                    x.metadata.name,
                    y.metadata.name
                );
            }
        }
    }
    println!(
        "{} addresses held by {} Services, none twice without sharing",
        holders.len(),
        all.iter().filter(|s| !ips(s).is_empty()).count()
    );
    operator.stop(Duration::from_secs(10));
    Ok(())
}

/// The whole path: pool → Service address → LBService frontend → every agent's maps → a
/// connection from outside the cluster to the address reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_assigned_address_carries_traffic_from_outside() -> Result<()> {
    let world = World::start("lbipam-path").await?;
    let env = &world.env;
    let client = env.client();
    let ns = env.namespace().to_string();
    let services: Api<Service> = env.api();
    let lbsvc: Api<LBService> = env.api();
    let pools: Api<LoadBalancerIPPool> = Api::all(client.clone());
    let nns: Api<NodeNetwork> = Api::all(client.clone());

    // A pool inside the range the outside client routes via node 0.
    let pool = env.unique_name("lbipp-path");
    env.delete_on_drop::<LoadBalancerIPPool>(&pool);
    ensure!(LB_RANGE == "10.252.0.0/16");
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "LoadBalancerIPPool",
                "metadata": {"name": pool},
                "spec": {"blocks": [{"cidr": "10.252.9.0/28"}]},
            }))?,
        )
        .await?;
    let mut externals = NetnsSet::default();
    let outside = format!("{}-lb", netns_prefix());
    add_external_client(
        &mut externals,
        &world.cluster.underlay.netns,
        &outside,
        0,
        world.cluster.nodes[0].address,
    )
    .await?;

    let started = Instant::now();
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": ns},
        "spec": {"type": "LoadBalancer", "selector": {"app": "web-a"},
                 "ports": [{"name": "echo", "port": 80, "targetPort": 8080}]},
    }))?;
    services.create(&PostParams::default(), &svc).await?;
    let address = wait_ip(&services, "echo").await?;
    let to_address = started.elapsed();
    ensure!(address == "10.252.9.1", "echo got {address}");
    let wanted = address.clone();
    let lb = wait_for(
        &lbsvc,
        "echo",
        move |o: Option<&LBService>| {
            o.is_some_and(|lb| {
                !lb.spec.backends.is_empty()
                    && lb.spec.frontends.iter().any(|f| {
                        f.type_ == "LoadBalancer" && f.address.as_deref() == Some(wanted.as_str())
                    })
            })
        },
        TIMEOUT,
    )
    .await?
    .context("LBService echo")?;
    let revision = lb.spec.revision;
    for node in &world.cluster.nodes {
        let name = node.name.clone();
        wait_for(
            &nns,
            &name,
            move |o: Option<&NodeNetwork>| {
                o.and_then(|nn| nn.status.as_ref())
                    .and_then(|s| s.realized_services_revision)
                    .is_some_and(|r| r >= revision)
            },
            TIMEOUT,
        )
        .await
        .with_context(|| format!("{name} realizes revision {revision}"))?;
    }
    let to_realized = started.elapsed();
    ensure!(
        connect_from_netns(&outside, &address, 80).await?,
        "{address}:80 refused from outside"
    );
    let to_connection = started.elapsed();
    let from_outside: std::net::IpAddr = "10.250.0.100".parse()?;
    ensure!(
        world.accepted(from_outside).0 >= 1,
        "web-a saw no connection from the outside client"
    );
    println!(
        "Service creation → address in status {:.0} ms → realized on every node {:.0} ms → first connection from outside {:.0} ms",
        to_address.as_secs_f64() * 1e3,
        to_realized.as_secs_f64() * 1e3,
        to_connection.as_secs_f64() * 1e3,
    );

    // Released: the address goes, and with it the frontend.
    services
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "ClusterIP"}})),
        )
        .await?;
    wait_for(
        &lbsvc,
        "echo",
        |o: Option<&LBService>| {
            o.is_some_and(|lb| lb.spec.frontends.iter().all(|f| f.type_ != "LoadBalancer"))
        },
        TIMEOUT,
    )
    .await
    .context("the LoadBalancer frontend goes with the address")?;
    drop(externals);
    Ok(())
}
