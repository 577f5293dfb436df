//! Leader election between operator replicas on a real apiserver: only the Lease holder
//! runs controllers and writes; when it dies (SIGKILL) the standby takes over after the
//! lease expires; when it stops cleanly (SIGTERM) it exits 0, releases the Lease and the
//! standby takes over. Short lease (6 s, renewed 2 s before expiry) so the test is quick.
//!
//! A dedicated control plane: the operators write every NodeNetwork of the cluster.

mod operator_common;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::coordination::v1::Lease;
use operator_common::*;
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_e2e::{ControlPlane, TestEnv, eventually, fetch_metrics, http_get, wait_for};

const TIMING: [&str; 4] = [
    "--lease-duration-seconds",
    "6",
    "--renew-grace-seconds",
    "2",
];

async fn wait_holder(env: &TestEnv, lease: &str, identity: &str) -> Result<()> {
    let leases: kube::Api<Lease> = env.api();
    let want = identity.to_string();
    wait_for(
        &leases,
        lease,
        move |o: Option<&Lease>| {
            o.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_ref())
                == Some(&want)
        },
        TIMEOUT,
    )
    .await?;
    Ok(())
}

async fn reconciles(port: u16) -> Result<f64> {
    let m = fetch_metrics(port).await?;
    Ok(m.sum(
        "controller_runtime_reconcile_total",
        &[("controller", "nodes")],
    ))
}

async fn leader_gauge(port: u16, lease: &str) -> Result<Option<f64>> {
    let m = fetch_metrics(port).await?;
    Ok(m.value("leader_election_master_status", &[("name", lease)]))
}

async fn converges(env: &TestEnv, name: &str, addrs: &[(&str, &str)]) -> Result<NodeNetwork> {
    let networks: kube::Api<NodeNetwork> = env.cluster_api();
    create_node(env, name, addrs).await?;
    env.delete_on_drop::<NodeNetwork>(name);
    let owned: Vec<(String, String)> = pairs(addrs);
    wait_for(
        &networks,
        name,
        move |o: Option<&NodeNetwork>| {
            o.is_some_and(|nn| {
                addresses(nn) == owned && resolved(nn).is_some_and(|r| r.0 == "True")
            })
        },
        TIMEOUT,
    )
    .await?
    .context("NodeNetwork")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over() -> Result<()> {
    let plane = ControlPlane::dedicated("op-leader").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let lease = "tendril-operator";

    let mut a = start_operator(&env, lease, "op-a", &TIMING).await?;
    a.process.wait_for_log("became leader", TIMEOUT).await?;
    a.process.wait_for_log("caches synced", TIMEOUT).await?;
    let mut b = start_operator(&env, lease, "op-b", &TIMING).await?;
    wait_holder(&env, lease, "op-a").await?;

    // The leader reconciles; the standby is ready but runs no controller.
    let n1 = env.unique_name("node");
    let nn = converges(&env, &n1, &[("InternalIP", "10.30.0.1")]).await?;
    let managers: Vec<_> = nn
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().all(|m| m == "tendril-nodes"),
        "{managers:?}"
    );
    assert!(reconciles(a.port).await? >= 1.0);
    assert_eq!(leader_gauge(a.port, lease).await?, Some(1.0));
    assert_eq!(
        reconciles(b.port).await?,
        0.0,
        "the standby must not reconcile"
    );
    assert_eq!(leader_gauge(b.port, lease).await?, Some(0.0));
    assert_eq!(
        http_get(b.port, "/readyz").await?.0,
        200,
        "a standby is ready"
    );
    assert!(
        a.process.log().contains("reconcile{"),
        "leader log shows reconciles"
    );
    assert!(
        !b.process.log().contains("reconcile{"),
        "standby log: {}",
        b.process.log()
    );
    assert!(!b.process.log().contains("became leader"));

    // The leader crashes: the standby takes over once the lease expires.
    let crashed = Instant::now();
    a.process.kill();
    wait_holder(&env, lease, "op-b").await?;
    println!(
        "takeover after SIGKILL of the leader: {:?} (lease 6s)",
        crashed.elapsed()
    );
    b.process.wait_for_log("became leader", TIMEOUT).await?;
    let n2 = env.unique_name("node");
    converges(&env, &n2, &[("InternalIP", "10.30.0.2")]).await?;
    eventually(TIMEOUT, || async {
        if reconciles(b.port).await? < 1.0 {
            bail!("new leader has not reconciled yet");
        }
        Ok(())
    })
    .await?;
    assert_eq!(leader_gauge(b.port, lease).await?, Some(1.0));

    // A clean stop exits 0 and releases the lease; the new standby takes it when it next
    // checks (kube-lease-manager standbys check at the lease's expiry).
    let mut c = start_operator(&env, lease, "op-c", &TIMING).await?;
    let stopped = Instant::now();
    let status = b
        .process
        .stop(Duration::from_secs(30))
        .context("exit status")?;
    assert!(status.success(), "leader exit on SIGTERM: {status}");
    wait_holder(&env, lease, "op-c").await?;
    println!(
        "handover after SIGTERM of the leader: {:?}",
        stopped.elapsed()
    );
    c.process.wait_for_log("became leader", TIMEOUT).await?;
    let n3 = env.unique_name("node");
    converges(&env, &n3, &[("InternalIP", "10.30.0.3")]).await?;
    assert_eq!(leader_gauge(c.port, lease).await?, Some(1.0));
    c.process.stop(Duration::from_secs(30));
    Ok(())
}
