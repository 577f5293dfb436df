//! The IPAM concern on a real apiserver: `PodIPPool` → `NodeNetwork.spec.podCIDRs`.
//!
//! One dedicated control plane and one operator (IPAM writes every `NodeNetwork` of the
//! cluster, so it must not share a plane with another test's operator). The scenario runs
//! in order: two nodes get distinct dual-stack CIDRs; a third waits on an exhausted pool
//! (condition, Event, metric); a mask-size change is refused by the apiserver and a
//! shrink under allocations by the reconciler (Valid=False, nothing re-addressed); after an
//! operator restart every allocation is the same; deleting a node frees its CIDRs and the
//! waiting node gets exactly those.

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::path::PathBuf;
use std::time::Duration;
use tendril_crds::v1alpha1::{NodeNetwork, PodIPPool};
use tendril_e2e::{ControlPlane, Process, TestEnv, eventually, fetch_metrics, free_port, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

fn write_config(name: &str, text: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn start_operator(env: &TestEnv, config: &PathBuf, port: u16) -> Result<Process> {
    let mut op = Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--config")
        .arg(config)
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,tendril_controllers=debug")
        .spawn()?;
    op.wait_for_log("caches synced", TIMEOUT).await?;
    Ok(op)
}

fn node(name: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": name },
    }))
    .expect("node")
}

fn cidrs(nn: &NodeNetwork) -> Vec<String> {
    nn.spec.pod_cidrs.clone()
}

fn condition(pool: &PodIPPool, type_: &str) -> Option<(String, String, String)> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_cidrs(api: &Api<NodeNetwork>, name: &str, n: usize) -> Result<Vec<String>> {
    let nn = wait_for(
        api,
        name,
        move |o: Option<&NodeNetwork>| o.is_some_and(|nn| nn.spec.pod_cidrs.len() == n),
        TIMEOUT,
    )
    .await?
    .context("NodeNetwork")?;
    Ok(cidrs(&nn))
}

#[tokio::test]
async fn pod_ip_pools_assign_stable_node_cidrs() -> Result<()> {
    let plane = ControlPlane::dedicated("ipam").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let pools: Api<PodIPPool> = Api::all(client.clone());

    // IPAM patches NodeNetworks with a uid precondition so that it never creates one; check
    // the apiserver honours that for server-side apply of an absent object.
    let ghost = serde_json::json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
        "metadata": { "name": "ghost-node", "uid": "6c1f4c6e-0000-4000-8000-000000000000" },
        "spec": { "podCIDRs": ["10.200.0.0/24"] },
    });
    let res = networks
        .patch(
            "ghost-node",
            &PatchParams::apply("tendril-ipam").force(),
            &Patch::Apply(&ghost),
        )
        .await;
    assert!(res.is_err(), "apply with a uid created {res:?}");
    assert!(networks.get_opt("ghost-node").await?.is_none());

    // Two blocks per family.
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "PodIPPool",
                "metadata": { "name": "default" },
                "spec": {
                    "ipv4": { "cidrs": ["10.100.0.0/24", "10.100.1.0/24"], "maskSize": 24 },
                    "ipv6": { "cidrs": ["fd00:100::/63"], "maskSize": 64 },
                },
            }))?,
        )
        .await?;
    let port = free_port()?;
    let config = write_config(
        &env.unique_name("ipam-operator"),
        "ipam:\n  defaultPool: default\n",
    )?;
    let mut op = start_operator(&env, &config, port).await?;

    let names: Vec<String> = (0..4).map(|i| env.unique_name(&format!("n{i}"))).collect();
    for n in &names {
        env.delete_on_drop::<Node>(n);
    }
    for n in &names[..2] {
        nodes.create(&PostParams::default(), &node(n)).await?;
    }
    let a = wait_cidrs(&networks, &names[0], 2).await?;
    let b = wait_cidrs(&networks, &names[1], 2).await?;
    println!("node CIDRs: {} {a:?}, {} {b:?}", names[0], names[1]);
    assert_ne!(a[0], b[0]);
    assert_ne!(a[1], b[1]);
    for c in a.iter().chain(&b) {
        assert!(
            c.starts_with("10.100.") || c.starts_with("fd00:100:"),
            "{c}"
        );
    }
    let nn = networks.get(&names[0]).await?;
    assert_eq!(nn.spec.pod_ip_pool.as_deref(), Some("default"));
    let ipam_fields = nn
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some("tendril-ipam"));
    assert!(
        ipam_fields,
        "podCIDRs written by field manager tendril-ipam"
    );

    // Third node: the pool is exhausted; it waits, nothing is over-allocated.
    nodes
        .create(&PostParams::default(), &node(&names[2]))
        .await?;
    let pool = wait_for(
        &pools,
        "default",
        |o: Option<&PodIPPool>| {
            o.and_then(|p| condition(p, "Exhausted"))
                .is_some_and(|(s, _, _)| s == "True")
        },
        TIMEOUT,
    )
    .await?
    .context("pool")?;
    let status = pool.status.clone().unwrap_or_default();
    assert_eq!(status.allocated_cidrs, 4);
    assert_eq!(status.available_cidrs, 0);
    assert_eq!(
        condition(&pool, "Ready").map(|c| c.1),
        Some("Exhausted".to_string())
    );
    assert!(networks.get(&names[2]).await?.spec.pod_cidrs.is_empty());
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let exhausted_event = eventually(TIMEOUT, || async {
        let list = events.list(&ListParams::default()).await?;
        list.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("PoolExhausted")
                    && e.involved_object.name.as_deref() == Some("default")
            })
            .context("no PoolExhausted event yet")
    })
    .await?;
    println!("event: {:?}", exhausted_event.message);
    let metrics = eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        if m.sum("tendril_ipam_exhaustions_total", &[("pool", "default")]) < 1.0 {
            bail!("no exhaustion counted yet");
        }
        Ok(m)
    })
    .await?;
    assert_eq!(
        metrics.value(
            "tendril_ipam_cidrs_allocated",
            &[("pool", "default"), ("family", "ipv4")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metrics.value(
            "tendril_ipam_cidrs_available",
            &[("pool", "default"), ("family", "ipv6")]
        ),
        Some(0.0)
    );

    // A mask-size change is refused by the apiserver (CEL transition rule).
    let err = pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ipv4": {"maskSize": 25}}})),
        )
        .await
        .expect_err("maskSize change must be refused");
    assert!(err.to_string().contains("maskSize is immutable"), "{err}");

    // Shrinking the pool under its allocations is refused by the reconciler.
    pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ipv4": {"cidrs": ["10.100.0.0/24"]}}})),
        )
        .await?;
    let pool = wait_for(
        &pools,
        "default",
        |o: Option<&PodIPPool>| {
            o.and_then(|p| condition(p, "Valid"))
                .is_some_and(|(s, _, _)| s == "False")
        },
        TIMEOUT,
    )
    .await?
    .context("pool")?;
    let (_, reason, message) = condition(&pool, "Valid").unwrap_or_default();
    println!("refusal: {reason}: {message}");
    assert_eq!(reason, "WouldReaddressPods");
    assert!(message.contains("10.100.1.0/24"), "{message}");
    assert_eq!(wait_cidrs(&networks, &names[0], 2).await?, a);
    assert_eq!(wait_cidrs(&networks, &names[1], 2).await?, b);
    pools
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ipv4": {"cidrs": ["10.100.0.0/24", "10.100.1.0/24"]}}})),
        )
        .await?;
    wait_for(
        &pools,
        "default",
        |o: Option<&PodIPPool>| {
            o.and_then(|p| condition(p, "Valid"))
                .is_some_and(|(s, _, _)| s == "True")
        },
        TIMEOUT,
    )
    .await?;

    // Restart: the allocator is rebuilt from the NodeNetworks; nothing moves.
    op.stop(Duration::from_secs(10));
    let mut op = start_operator(&env, &config, port).await?;
    op.wait_for_log("pool allocations restored", TIMEOUT)
        .await?;
    assert_eq!(networks.get(&names[0]).await?.spec.pod_cidrs, a);
    assert_eq!(networks.get(&names[1]).await?.spec.pod_cidrs, b);
    assert!(networks.get(&names[2]).await?.spec.pod_cidrs.is_empty());

    // Deleting a node frees its CIDRs (its NodeNetwork goes with it), and the waiting node
    // gets exactly those.
    nodes.delete(&names[0], &Default::default()).await?;
    let c = wait_cidrs(&networks, &names[2], 2).await?;
    assert_eq!(c, a, "the waiting node takes the freed blocks");
    assert_eq!(networks.get(&names[1]).await?.spec.pod_cidrs, b);
    wait_for(
        &pools,
        "default",
        |o: Option<&PodIPPool>| {
            o.and_then(|p| condition(p, "Exhausted"))
                .is_some_and(|(s, _, _)| s == "False")
        },
        TIMEOUT,
    )
    .await?;
    // Deleting the pool leaves every node its CIDRs; a new pool over the same space never
    // hands those out again.
    pools.delete("default", &Default::default()).await?;
    pools
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "PodIPPool",
                "metadata": { "name": "second" },
                "spec": {
                    "ipv4": { "cidrs": ["10.100.0.0/23", "10.100.2.0/24"], "maskSize": 24 },
                    "ipv6": { "cidrs": ["fd00:100::/62"], "maskSize": 64 },
                },
            }))?,
        )
        .await?;
    nodes
        .create(&PostParams::default(), &node(&names[3]))
        .await?;
    let d = wait_cidrs(&networks, &names[3], 2).await?;
    println!("after pool re-creation: {} {d:?}", names[3]);
    assert_eq!(d, vec!["10.100.2.0/24", "fd00:100:0:2::/64"]);
    assert_eq!(networks.get(&names[1]).await?.spec.pod_cidrs, b);
    assert_eq!(networks.get(&names[2]).await?.spec.pod_cidrs, a);
    op.stop(Duration::from_secs(10));
    let _ = std::fs::remove_file(&config);
    Ok(())
}
