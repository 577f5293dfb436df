//! Issue 17: the identity space driven to its configured limit, with churn.
//!
//! One dedicated plane (so no other test's identities share the small range) and one
//! operator handing out 10 cluster ids (`identities.clusterIdMax: 265`), warning at 80%,
//! with a 2 s grace period and retries capped at 1 s. Each pod has a label set of its own.
//! In order:
//! - 7 pods: `Identity/1` says `IdentitySpaceAvailable=True` with 7 of 10 (the count in the
//!   message is refreshed within 10 s), the metrics 7 of 10;
//! - the 8th: `False`/`NearlyExhausted` (before the limit), the metrics 8 of 10;
//! - the 9th and 10th: `Exhausted`;
//! - an 11th: no identity — its reconciles fail with `identities_exhausted`;
//! - churn, 6 rounds: the oldest pod is deleted; once its Endpoint is gone, the waiting pod
//!   gets the id identity garbage collection frees within the bound (1 s debounce, the
//!   grace period and the 1 s retry cap; asserted ≤ 20 s here on a shared machine); then a
//!   new label set waits in its place.
//!
//! The time each reclaim took is printed.

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{Endpoint, Identity};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, eventually, fetch_metrics, free_port, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const CAPACITY: usize = 10;
const GRACE_SECS: u64 = 2;
/// What one reclaim (last Endpoint of an identity gone → the waiting pod has the id) may
/// take here: the bound, 1 s debounce + 2 s grace + 1 s retry cap + a few API round trips,
/// with room for a machine shared with other builds.
const RECLAIM_BOUND: Duration = Duration::from_secs(20);
const CHURN_ROUNDS: usize = 6;

fn pod(name: &str, node: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": name } },
        "spec": {
            "nodeName": node,
            "containers": [{ "name": "main", "image": "registry.k8s.io/pause:3.10" }],
        },
    }))?)
}

/// Creates the pod and writes its status as a kubelet would.
async fn start_pod(pods: &Api<Pod>, node: &str, k: usize) -> Result<String> {
    let name = format!("set-{k}");
    pods.create(&PostParams::default(), &pod(&name, node)?)
        .await?;
    let ip = format!("10.1.{}.{}", k / 250, k % 250 + 1);
    let status = serde_json::json!({
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
    });
    pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(name)
}

async fn identity_of(endpoints: &Api<Endpoint>, name: &str, timeout: Duration) -> Result<i64> {
    let ep = wait_for(
        endpoints,
        name,
        |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.identity.is_some()),
        timeout,
    )
    .await?
    .with_context(|| format!("Endpoint {name}"))?;
    Ok(ep.spec.identity.unwrap_or_default())
}

/// Waits until `IdentitySpaceAvailable` on `Identity/1` has `reason` and says `count` (the
/// count in the message is refreshed at most every 10 s; the reason at once).
async fn space_condition(
    identities: &Api<Identity>,
    reason: &str,
    count: &str,
) -> Result<(String, String)> {
    let host = wait_for(
        identities,
        "1",
        |o: Option<&Identity>| {
            o.and_then(|i| i.status.as_ref())
                .and_then(|s| {
                    s.conditions
                        .iter()
                        .find(|c| c.type_ == "IdentitySpaceAvailable")
                })
                .is_some_and(|c| c.reason == reason && c.message.contains(count))
        },
        TIMEOUT,
    )
    .await?
    .context("Identity/1")?;
    let c = host
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "IdentitySpaceAvailable")
        .context("condition")?;
    Ok((c.status, c.message))
}

async fn space_metrics(port: u16, used: usize) -> Result<()> {
    eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        let (u, s) = (
            m.value("tendril_identity_space_used", &[]),
            m.value("tendril_identity_space_size", &[]),
        );
        ensure!(
            u == Some(used as f64) && s == Some(CAPACITY as f64),
            "space metrics {u:?} of {s:?}, want {used} of {CAPACITY}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn identity_space_exhaustion_warns_first_and_recovers_through_gc() -> Result<()> {
    let plane = ControlPlane::dedicated("identity-exhaustion").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let pods: Api<Pod> = env.api();
    let endpoints: Api<Endpoint> = env.api();
    let identities: Api<Identity> = Api::all(client.clone());

    let node = env.unique_name("node");
    env.delete_on_drop::<Node>(&node);
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Node", "metadata": { "name": node },
            }))?,
        )
        .await?;

    let port = free_port()?;
    let config = std::env::temp_dir().join(format!("{}.yaml", env.unique_name("id-exhaust")));
    std::fs::write(
        &config,
        format!(
            "identities:\n  gcGracePeriodSeconds: {GRACE_SECS}\n  clusterIdMax: {}\n  spaceWarningPercent: 80\n\
             backoff:\n  baseMillis: 200\n  maxMillis: 1000\n",
            255 + CAPACITY
        ),
    )?;
    let mut op = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--config")
        .arg(&config)
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .spawn()?;
    op.wait_for_log("caches synced", TIMEOUT).await?;
    let _ = std::fs::remove_file(&config);

    // Below the warning: Available.
    let mut live = VecDeque::new();
    for k in 0..7 {
        live.push_back(start_pod(&pods, &node, k).await?);
    }
    for name in &live {
        identity_of(&endpoints, name, TIMEOUT).await?;
    }
    let (status, message) = space_condition(&identities, "Available", "7 of 10").await?;
    assert_eq!(status, "True");
    assert!(message.contains("7 of 10"), "{message}");
    space_metrics(port, 7).await?;

    // 80%: the warning comes before the limit, while allocation still works.
    live.push_back(start_pod(&pods, &node, 7).await?);
    identity_of(&endpoints, "set-7", TIMEOUT).await?;
    let (status, message) = space_condition(&identities, "NearlyExhausted", "8 of 10").await?;
    assert_eq!(status, "False");
    assert!(message.contains("8 of 10"), "{message}");
    space_metrics(port, 8).await?;

    // The last two ids.
    for k in 8..10 {
        live.push_back(start_pod(&pods, &node, k).await?);
    }
    let mut ids = Vec::new();
    for name in &live {
        ids.push(identity_of(&endpoints, name, TIMEOUT).await?);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids,
        (256..266).collect::<Vec<i64>>(),
        "every id of the range, once"
    );
    let (status, _) = space_condition(&identities, "Exhausted", "10 of 10").await?;
    assert_eq!(status, "False");
    space_metrics(port, 10).await?;

    // An 11th label set gets no identity: its reconciles fail, visibly.
    let mut waiting = start_pod(&pods, &node, 10).await?;
    eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        let failed = m.sum(
            "controller_runtime_reconcile_errors_total",
            &[
                ("controller", "endpoints"),
                ("error", "identities_exhausted"),
            ],
        );
        ensure!(failed > 0.0, "no identities_exhausted error yet");
        Ok(())
    })
    .await?;
    ensure!(
        endpoints.get_opt(&waiting).await?.is_none(),
        "{waiting} has an Endpoint although every id is taken"
    );

    // Churn: each deleted pod frees an id after the grace period; the waiting pod takes it.
    let mut took = Vec::new();
    for round in 0..CHURN_ROUNDS {
        let oldest = live.pop_front().context("no pod left")?;
        let freed = identity_of(&endpoints, &oldest, TIMEOUT).await?;
        pods.delete(&oldest, &DeleteParams::default().grace_period(0))
            .await?;
        // Kubernetes' garbage collector removes the Endpoint with its Pod (owner reference;
        // on a fresh plane its first pass can take ~30 s); the clock starts when the last
        // reference to the identity is gone.
        wait_deleted(&endpoints, &oldest, TIMEOUT).await?;
        let started = Instant::now();
        let id = identity_of(&endpoints, &waiting, RECLAIM_BOUND)
            .await
            .with_context(|| format!("round {round}: {waiting} got no identity in time"))?;
        took.push(started.elapsed());
        assert_eq!(id, freed, "the only free id is the one just collected");
        let identity = identities.get(&id.to_string()).await?;
        assert_eq!(
            identity
                .spec
                .security_labels
                .get("k8s:app")
                .map(String::as_str),
            Some(waiting.as_str()),
            "the reused id stands for the new label set"
        );
        live.push_back(waiting);
        waiting = start_pod(&pods, &node, 11 + round).await?;
    }
    // Allocation is stuck again until the next collection, and the condition still says so.
    let (_, message) = space_condition(&identities, "Exhausted", "10 of 10").await?;
    assert!(message.contains("10 of 10"), "{message}");
    let max = took.iter().max().copied().unwrap_or_default();
    println!(
        "identity reclaim (Endpoint gone → waiting pod has the freed id), {} rounds: {:?}; max {:.1}s, grace {GRACE_SECS}s",
        took.len(),
        took.iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        max.as_secs_f64()
    );
    op.stop(Duration::from_secs(10));
    Ok(())
}
