//! One watch per kind per process: the operator opens exactly one WATCH for each kind its
//! concerns read, however many concerns read it. Counted twice, independently: by the
//! apiserver (`apiserver_longrunning_requests{verb="WATCH"}`, before and after the operator
//! starts, on a plane of its own), and by the operator's cache registry
//! (`tendril_cache_watches{group,kind,scope}`).

mod operator_common;

use anyhow::{Result, bail};
use operator_common::*;
use std::collections::BTreeMap;
use std::time::Duration;
use tendril_e2e::{Component, ControlPlane, Metrics, TestEnv, eventually, fetch_metrics, http_get};

/// (API group, resource) → open WATCH requests.
type Watches = BTreeMap<(String, String), i64>;

/// Every kind the operator's concerns read: (group, resource, kind).
const READ: &[(&str, &str, &str)] = &[
    ("", "nodes", "Node"),
    ("", "pods", "Pod"),
    ("", "namespaces", "Namespace"),
    ("networking.k8s.io", "networkpolicies", "NetworkPolicy"),
    ("tendril.dev", "nodenetworks", "NodeNetwork"),
    ("tendril.dev", "endpoints", "Endpoint"),
    ("tendril.dev", "identities", "Identity"),
    ("tendril.dev", "networkpolicies", "NetworkPolicy"),
    (
        "tendril.dev",
        "clusternetworkpolicies",
        "ClusterNetworkPolicy",
    ),
    ("tendril.dev", "resolvedpolicies", "ResolvedPolicy"),
    ("tendril.dev", "podippools", "PodIPPool"),
    ("", "services", "Service"),
    ("discovery.k8s.io", "endpointslices", "EndpointSlice"),
    ("tendril.dev", "lbservices", "LBService"),
    ("tendril.dev", "bgppeeringpolicies", "BGPPeeringPolicy"),
    ("tendril.dev", "bgpnodeconfigs", "BGPNodeConfig"),
    ("tendril.dev", "loadbalancerippools", "LoadBalancerIPPool"),
    (
        "tendril.dev",
        "egressgatewaypolicies",
        "EgressGatewayPolicy",
    ),
    ("tendril.dev", "egressroutes", "EgressRoute"),
    ("tendril.dev", "encryptionpolicies", "EncryptionPolicy"),
];

async fn apiserver_watches(plane: &ControlPlane) -> Result<Watches> {
    let text = plane.kubectl(["get", "--raw", "/metrics"]).await?;
    let metrics = Metrics::parse(&text);
    let mut out = Watches::new();
    for s in metrics.matching("apiserver_longrunning_requests", &[("verb", "WATCH")]) {
        let label = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
        *out.entry((label("group"), label("resource"))).or_default() += s.value as i64;
    }
    Ok(out)
}

/// The apiserver's watch counts once two samples a few seconds apart agree.
async fn settled_watches(plane: &ControlPlane) -> Result<Watches> {
    let mut last = apiserver_watches(plane).await?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = apiserver_watches(plane).await?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    bail!("the apiserver's watch counts never settled: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_watches_each_kind_once() -> Result<()> {
    let plane = ControlPlane::dedicated("op-watches").await?;
    let env = TestEnv::on(plane.clone()).await?;
    // The controller manager's informers watch most of these kinds too, and start some of
    // them late (after discovery): without it only the apiserver's own watches remain.
    plane.stop_component(Component::ControllerManager).await?;
    let before = settled_watches(&plane).await?;

    let op = start_operator(&env, "tendril-operator", "op-watches", &[]).await?;
    // Ready: every concern's controller has synced, so every watch is open.
    eventually(TIMEOUT, || async {
        match http_get(op.port, "/readyz").await? {
            (200, _) => Ok(()),
            (status, body) => bail!("/readyz {status}: {body}"),
        }
    })
    .await?;
    let after = settled_watches(&plane).await?;

    let delta: Watches = after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 0)
        .collect();
    println!(
        "WATCHES opened by the operator, per (group, resource), from apiserver_longrunning_requests:"
    );
    for ((group, resource), n) in &delta {
        println!("WATCHES  {group:>20} {resource:<24} {n}");
    }
    for (group, resource, _) in READ {
        let n = delta
            .get(&(group.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0);
        assert_eq!(n, 1, "{group}/{resource}: {n} watches; all: {delta:?}");
    }
    let extra: Vec<_> = delta
        .iter()
        .filter(|((g, r), _)| !READ.iter().any(|(rg, rr, _)| rg == g && rr == r))
        .collect();
    assert!(
        extra.is_empty(),
        "watches of kinds no concern reads: {extra:?}"
    );

    // The registry agrees: one cluster-wide watch per kind, nothing else.
    let metrics = fetch_metrics(op.port).await?;
    let mut registry: Vec<(String, String, String, f64)> = metrics
        .matching("tendril_cache_watches", &[])
        .map(|s| {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            (l("group"), l("kind"), l("scope"), s.value)
        })
        .collect();
    registry.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut want: Vec<(String, String, String, f64)> = READ
        .iter()
        .map(|(g, _, k)| (g.to_string(), k.to_string(), "all".to_string(), 1.0))
        .collect();
    want.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(registry, want, "tendril_cache_watches");
    Ok(())
}
