//! The operator rides out control-plane faults without restarting: kube-apiserver
//! restarted, etcd restarted, and a longer apiserver outage. After each, a new Node gets
//! its NodeNetwork and an address change is followed; the process is the same one
//! throughout, and `/metrics` shows the watch errors, the failed reconciles (a 1 s resync
//! keeps reconciling during the outage) and their retries.
//!
//! A dedicated control plane: only dedicated planes accept fault injection.

mod operator_common;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use operator_common::*;
use std::time::Duration;
use tendril_crds::v1alpha1::NodeNetwork;
use tendril_e2e::{
    Component, ControlPlane, TestEnv, eventually, fetch_metrics, http_get, wait_for,
};

async fn converged_on(
    networks: &Api<NodeNetwork>,
    name: &str,
    addrs: &[(&str, &str)],
) -> Result<()> {
    let want = pairs(addrs);
    wait_for(
        networks,
        name,
        move |o: Option<&NodeNetwork>| {
            o.is_some_and(|nn| addresses(nn) == want && resolved(nn).is_some_and(|r| r.0 == "True"))
        },
        TIMEOUT,
    )
    .await?;
    Ok(())
}

/// A new Node gets its NodeNetwork, and an existing Node's address change is followed.
async fn converges_after_fault(env: &TestEnv, step: &str, existing: &str) -> Result<()> {
    let networks: Api<NodeNetwork> = env.cluster_api();
    let nodes: Api<Node> = env.cluster_api();
    let name = env.unique_name(step);
    let addrs = [("InternalIP", "10.40.1.1")];
    create_node_eventually(env, &name, &addrs).await?;
    env.delete_on_drop::<NodeNetwork>(&name);
    converged_on(&networks, &name, &addrs).await?;
    let moved = format!("10.40.2.{}", step.len());
    let moved = [("InternalIP", moved.as_str())];
    eventually(TIMEOUT, || set_addresses(&nodes, existing, &moved)).await?;
    converged_on(&networks, existing, &moved).await?;
    println!("{step}: converged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_recovers_from_apiserver_and_etcd_restarts() -> Result<()> {
    let plane = ControlPlane::dedicated("op-faults").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let networks: Api<NodeNetwork> = env.cluster_api();
    let lease = "tendril-operator";
    // A short resync, so reconciles run (and fail, and are retried) during the outage.
    let config = std::env::temp_dir().join(format!("{}.yaml", env.unique_name("op-faults")));
    std::fs::write(&config, "nodes:\n  resyncSeconds: 1\n")?;
    let config_arg = config.to_str().context("config path")?;
    let mut op = start_operator(&env, lease, "op-faults", &["--config", config_arg]).await?;
    op.process.wait_for_log("caches synced", TIMEOUT).await?;
    let pid = op.process.pid();

    let n0 = env.unique_name("node");
    let a0 = [("InternalIP", "10.40.0.1")];
    create_node(&env, &n0, &a0).await?;
    env.delete_on_drop::<NodeNetwork>(&n0);
    converged_on(&networks, &n0, &a0).await?;

    plane.restart_apiserver().await?;
    converges_after_fault(&env, "apiserver-restart", &n0).await?;
    assert!(
        op.process.is_running(),
        "operator died on apiserver restart"
    );

    plane.restart_etcd().await?;
    converges_after_fault(&env, "etcd-restart", &n0).await?;
    assert!(op.process.is_running(), "operator died on etcd restart");

    // A longer outage: the apiserver is down while the operator keeps retrying.
    plane.stop_component(Component::Apiserver).await?;
    assert!(http_get(plane.apiserver_port(), "/readyz").await.is_err());
    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(op.port).await?;
        if m.sum("tendril_watch_errors_total", &[("controller", "nodes")]) < 1.0 {
            bail!("no watch error counted yet");
        }
        if m.sum(
            "controller_runtime_reconcile_errors_total",
            &[("controller", "nodes")],
        ) < 1.0
        {
            bail!("no reconcile error counted yet");
        }
        if m.sum("workqueue_retries_total", &[("name", "nodes")]) < 1.0 {
            bail!("no retry counted yet");
        }
        Ok(m)
    })
    .await?;
    println!(
        "during outage: watch errors {}, reconcile errors {}, retries {}",
        m.sum("tendril_watch_errors_total", &[("controller", "nodes")]),
        m.sum(
            "controller_runtime_reconcile_errors_total",
            &[("controller", "nodes")]
        ),
        m.sum("workqueue_retries_total", &[("name", "nodes")]),
    );
    assert!(
        m.sum(
            "controller_runtime_reconcile_errors_total",
            &[("controller", "nodes"), ("error", "transport")]
        ) >= 1.0,
        "errors labelled by kind"
    );
    assert_eq!(
        http_get(op.port, "/healthz").await?.0,
        200,
        "alive during the outage"
    );
    plane.start().await?;
    converges_after_fault(&env, "apiserver-outage", &n0).await?;

    // Same process throughout: never restarted, one startup in its log.
    assert!(op.process.is_running());
    assert_eq!(op.process.pid(), pid);
    let log = op.process.log();
    assert_eq!(log.matches("serving /metrics").count(), 1, "started once");
    let m = fetch_metrics(op.port).await?;
    assert_eq!(
        m.value("leader_election_master_status", &[("name", lease)]),
        Some(1.0)
    );
    assert!(m.sum("tendril_watch_errors_total", &[("controller", "nodes")]) >= 1.0);
    assert!(
        m.sum(
            "controller_runtime_reconcile_total",
            &[("controller", "nodes"), ("result", "success")]
        ) >= 7.0
    );
    assert_eq!(http_get(op.port, "/readyz").await?.0, 200);
    let status = op
        .process
        .stop(Duration::from_secs(30))
        .context("exit status")?;
    assert!(status.success(), "exit: {status}");
    let _ = std::fs::remove_file(&config);
    Ok(())
}
