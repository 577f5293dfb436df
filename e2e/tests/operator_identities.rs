//! The endpoints and identities concerns on a real apiserver.
//!
//! Pods are created through the API with `spec.nodeName` on a Node the test creates, and
//! their `status.podIPs` written through the status subresource as a kubelet would. One
//! dedicated plane and one operator (with a 3 s identity grace period). In order: pods get
//! `Endpoint`s with identities; same labels share an identity; a `pod-template-hash`
//! difference does not make a new one; the reserved identities exist; references are
//! counted; a finished pod loses its `Endpoint`; a deleted pod's `Endpoint` goes and its
//! unreferenced identity is collected after the grace period; an identity deleted by hand
//! while in use is replaced. Then a measurement with 1,000
//! pods (printed, not asserted): identity allocations per second and pod → `Endpoint`-with-
//! identity latency p50/p99.

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{Endpoint, Identity};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, eventually, fetch_metrics, free_port, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(90);

async fn start_operator(env: &TestEnv, config: &PathBuf, port: u16) -> Result<Process> {
    let mut op = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--config")
        .arg(config)
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .spawn()?;
    op.wait_for_log("caches synced", TIMEOUT).await?;
    Ok(op)
}

fn pod(name: &str, node: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "main",
                "image": "registry.k8s.io/pause:3.10",
                "ports": [{ "name": "http", "containerPort": 8080 }],
            }],
        },
    }))
    .expect("pod")
}

/// Writes the pod's status as the kubelet would once its sandbox has an address.
async fn set_running(pods: &Api<Pod>, name: &str, ip: &str) -> Result<()> {
    let status = serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn endpoint_with_identity(api: &Api<Endpoint>, name: &str) -> Result<Endpoint> {
    wait_for(
        api,
        name,
        |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.identity.is_some()),
        TIMEOUT,
    )
    .await?
    .context("endpoint")
}

#[tokio::test]
async fn pods_get_endpoints_with_shared_identities_and_gc() -> Result<()> {
    let plane = ControlPlane::dedicated("identities").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let pods: Api<Pod> = env.api();
    let endpoints: Api<Endpoint> = env.api();
    let identities: Api<Identity> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client.clone());

    let node_name = env.unique_name("node");
    env.delete_on_drop::<Node>(&node_name);
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Node", "metadata": { "name": node_name },
            }))?,
        )
        .await?;
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"team": "blue"}}})),
        )
        .await?;

    let port = free_port()?;
    let config = std::env::temp_dir().join(format!("{}.yaml", env.unique_name("id-operator")));
    std::fs::write(
        &config,
        "identities:\n  gcGracePeriodSeconds: 3\n  referencesRefreshSeconds: 0\n",
    )?;
    let mut op = start_operator(&env, &config, port).await?;

    for (name, labels, ip) in [
        (
            "web-1",
            [("app", "web"), ("pod-template-hash", "aaa")],
            "10.1.0.11",
        ),
        (
            "web-2",
            [("app", "web"), ("pod-template-hash", "bbb")],
            "10.1.0.12",
        ),
        (
            "db-1",
            [("app", "db"), ("pod-template-hash", "aaa")],
            "10.1.0.13",
        ),
    ] {
        pods.create(&PostParams::default(), &pod(name, &node_name, &labels))
            .await?;
        set_running(&pods, name, ip).await?;
    }
    let web1 = endpoint_with_identity(&endpoints, "web-1").await?;
    let web2 = endpoint_with_identity(&endpoints, "web-2").await?;
    let db1 = endpoint_with_identity(&endpoints, "db-1").await?;
    let web_id = web1.spec.identity.unwrap();
    let db_id = db1.spec.identity.unwrap();
    println!("identities: web {web_id}, db {db_id}");
    assert_eq!(
        web2.spec.identity,
        Some(web_id),
        "same labels but pod-template-hash share an identity"
    );
    assert_ne!(web_id, db_id);
    assert!(web_id >= 256 && db_id >= 256);

    // The Endpoint carries what the datapath needs, and is owned by its Pod.
    assert_eq!(web1.spec.node, node_name);
    assert_eq!(web1.spec.ips, vec!["10.1.0.11"]);
    assert_eq!(web1.spec.named_ports.len(), 1);
    assert_eq!(web1.spec.named_ports[0].name, "http");
    assert_eq!(web1.spec.service_account, "default");
    assert_eq!(web1.spec.revision, 1);
    let labels = &web1.spec.security_labels;
    assert_eq!(labels.get("k8s:app").map(String::as_str), Some("web"));
    assert_eq!(
        labels
            .get("k8s:io.kubernetes.pod.namespace")
            .map(String::as_str),
        Some(ns.as_str())
    );
    assert_eq!(
        labels
            .get("k8s:io.tendril.k8s.namespace.labels.team")
            .map(String::as_str),
        Some("blue")
    );
    assert!(!labels.keys().any(|k| k.contains("pod-template-hash")));
    assert_eq!(
        web1.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("tendril.dev/identity")),
        Some(&web_id.to_string())
    );
    // The Endpoint names its pod by uid and has no owner reference: the operator, not the
    // garbage collector, deletes it.
    let web1_pod = pods.get("web-1").await?;
    assert_eq!(Some(&web1.spec.pod_uid), web1_pod.metadata.uid.as_ref());
    assert_eq!(web1.metadata.owner_references, None);

    // The Identity objects: named by number, labels as on the Endpoint; reserved ones too.
    let web_identity = identities.get(&web_id.to_string()).await?;
    assert_eq!(web_identity.spec.security_labels, web1.spec.security_labels);
    // Created by the identities concern as it starts, beside the endpoints concern that
    // allocated web's: waited for, not raced.
    eventually(TIMEOUT, || async {
        for reserved in 1..=8 {
            identities.get(&reserved.to_string()).await?;
        }
        Ok(())
    })
    .await?;
    assert_eq!(
        identities.get("2").await?.spec.security_labels,
        BTreeMap::from([("reserved:world".to_string(), String::new())])
    );
    wait_for(
        &identities,
        &web_id.to_string(),
        |o: Option<&Identity>| {
            o.and_then(|i| i.status.as_ref())
                .is_some_and(|s| s.references == 2)
        },
        TIMEOUT,
    )
    .await?;

    // A finished pod no longer has an Endpoint; the identity stays (web-1 uses it).
    pods.patch_status(
        "web-2",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Succeeded"}})),
    )
    .await?;
    wait_deleted(&endpoints, "web-2", TIMEOUT).await?;

    // Deleting a pod removes its Endpoint (the operator deletes it); its
    // identity, now unreferenced, is collected after the 3 s grace period.
    pods.delete("db-1", &DeleteParams::default().grace_period(0))
        .await?;
    wait_deleted(&endpoints, "db-1", TIMEOUT).await?;
    wait_deleted(&identities, &db_id.to_string(), TIMEOUT).await?;
    assert!(identities.get_opt(&web_id.to_string()).await?.is_some());

    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        if m.sum("tendril_identity_gc_total", &[]) < 1.0 {
            bail!("no GC counted yet");
        }
        Ok(m)
    })
    .await?;
    assert!(m.sum("tendril_identity_allocations_total", &[]) >= 2.0);
    assert_eq!(
        m.value("tendril_identities", &[("type", "reserved")]),
        Some(8.0)
    );

    // An Identity deleted by hand while in use: its endpoint gets a new one.
    identities
        .delete(&web_id.to_string(), &DeleteParams::default())
        .await?;
    let web1 = wait_for(
        &endpoints,
        "web-1",
        move |o: Option<&Endpoint>| {
            o.and_then(|e| e.spec.identity)
                .is_some_and(|id| id != web_id)
        },
        TIMEOUT,
    )
    .await?
    .context("endpoint")?;
    let new_id = web1.spec.identity.unwrap_or_default();
    println!("web identity re-created as {new_id}");
    assert_eq!(
        identities
            .get(&new_id.to_string())
            .await?
            .spec
            .security_labels,
        web1.spec.security_labels
    );
    assert_eq!(web1.spec.revision, 2);

    // A pod deleted and re-created under the same name: the Endpoint follows the new pod.
    pods.delete("web-1", &DeleteParams::default().grace_period(0))
        .await?;
    wait_deleted(&pods, "web-1", TIMEOUT).await?;
    let new_pod = pods
        .create(
            &PostParams::default(),
            &pod("web-1", &node_name, &[("app", "web")]),
        )
        .await?;
    set_running(&pods, "web-1", "10.1.0.21").await?;
    let new_uid = new_pod.metadata.uid.clone().unwrap_or_default();
    let web1 = wait_for(
        &endpoints,
        "web-1",
        move |o: Option<&Endpoint>| {
            o.is_some_and(|e| e.spec.ips == ["10.1.0.21"] && e.spec.pod_uid == new_uid)
        },
        TIMEOUT,
    )
    .await?
    .context("endpoint")?;
    assert_eq!(web1.spec.identity, Some(new_id));

    // Measurement: 1,000 pods over 250 label sets (250 new identities).
    measure(&env, &node_name).await?;

    // Measurement: the operator starts with 1,000 pods waiting (250 new label sets) — its
    // own throughput, without the test's pod creation in the way.
    // A pod deleted while no operator runs: the restarted operator's sweep deletes its
    // Endpoint (nothing else would: Endpoints have no owner reference).
    pods.create(
        &PostParams::default(),
        &pod("swept-1", &node_name, &[("app", "web")]),
    )
    .await?;
    set_running(&pods, "swept-1", "10.1.0.31").await?;
    endpoint_with_identity(&endpoints, "swept-1").await?;
    op.stop(Duration::from_secs(10));
    pods.delete("swept-1", &DeleteParams::default().grace_period(0))
        .await?;
    wait_deleted(&pods, "swept-1", TIMEOUT).await?;
    let pods_api: Api<Pod> = env.api();
    let before = Api::<Identity>::all(env.client())
        .list(&Default::default())
        .await?
        .items
        .len();
    futures::stream::iter(0..1000usize)
        .map(|i| {
            let pods = pods_api.clone();
            let node = node_name.clone();
            async move {
                let name = format!("cold-{i}");
                let app = format!("cold-{}", i % 250);
                pods.create(&PostParams::default(), &pod(&name, &node, &[("app", &app)]))
                    .await?;
                set_running(&pods, &name, &format!("10.3.{}.{}", i / 250, i % 250 + 1)).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let start = Instant::now();
    let _op = start_operator(&env, &config, port).await?;
    let started = start.elapsed();
    eventually(Duration::from_secs(300), || async {
        let n = endpoints
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter(|e| {
                e.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("cold-"))
            })
            .filter(|e| e.spec.identity.is_some())
            .count();
        if n < 1000 {
            bail!("{n} cold endpoints so far");
        }
        Ok(())
    })
    .await?;
    let converged = start.elapsed();
    wait_deleted(&endpoints, "swept-1", TIMEOUT)
        .await
        .context("the Endpoint of a pod deleted while the operator was down is swept")?;
    let after = Api::<Identity>::all(env.client())
        .list(&Default::default())
        .await?
        .items
        .len();
    assert_eq!(after - before, 250, "one identity per distinct label set");
    println!(
        "BENCH operator cold start with 1000 waiting pods (250 new label sets): process up and caches synced in {started:.2?}, \
         all Endpoints with identity after {converged:.2?}: {:.0} endpoints/s, {:.0} identity allocations/s",
        1000.0 / (converged - started).as_secs_f64(),
        250.0 / (converged - started).as_secs_f64(),
    );
    let _ = std::fs::remove_file(&config);
    Ok(())
}

async fn measure(env: &TestEnv, node: &str) -> Result<()> {
    const PODS: usize = 1000;
    const LABEL_SETS: usize = 250;
    const CONCURRENCY: usize = 16;
    let pods: Api<Pod> = env.api();
    let endpoints: Api<Endpoint> = env.api();
    let identities_before = Api::<Identity>::all(env.client())
        .list(&Default::default())
        .await?
        .items
        .len();

    // When each Endpoint was first seen with an identity.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let stream = watcher(endpoints, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Ok(Some(ep)) = stream.try_next().await {
                if ep.spec.identity.is_some() {
                    let name = ep.metadata.name.clone().unwrap_or_default();
                    seen.lock()
                        .unwrap()
                        .entry(name)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };

    let start = Instant::now();
    let ready: Vec<(String, Instant)> = futures::stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = format!("bench-{i}");
                let app = format!("bench-{}", i % LABEL_SETS);
                pods.create(
                    &PostParams::default(),
                    &pod(&name, node, &[("app", &app), ("pod-template-hash", "x")]),
                )
                .await?;
                let ip = format!("10.2.{}.{}", i / 250, i % 250 + 1);
                set_running(&pods, &name, &ip).await?;
                anyhow::Ok((name, Instant::now()))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let created = start.elapsed();
    eventually(Duration::from_secs(300), || async {
        let n = seen
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("bench-"))
            .count();
        if n < PODS {
            bail!("{n} endpoints with identity so far");
        }
        Ok(())
    })
    .await?;
    let all_done = start.elapsed();
    watch.abort();
    let seen = seen.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = ready
        .iter()
        .map(|(name, t)| seen[name].saturating_duration_since(*t))
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let identities_after = Api::<Identity>::all(env.client())
        .list(&Default::default())
        .await?
        .items
        .len();
    let allocated = identities_after - identities_before;
    assert_eq!(allocated, LABEL_SETS, "one identity per distinct label set");
    println!(
        "BENCH endpoints/identities: {PODS} pods ({LABEL_SETS} label sets) created+running in {created:.2?}, \
         all Endpoints with identity after {all_done:.2?}; {allocated} identity allocations, \
         {:.0} allocations/s over the run; pod running -> Endpoint with identity: p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        allocated as f64 / all_done.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    Ok(())
}
