//! One watch per kind per process, for the agent: counted by the apiserver itself
//! (`apiserver_longrunning_requests{verb="WATCH"}`) on a plane of its own where the agent is
//! the only client of Tendril's kinds, and by the agent's registry
//! (`tendril_cache_watches{group,kind,scope}`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, ensure};
use tendril_e2e::sim::{SimNode, Underlay};
use tendril_e2e::{ControlPlane, Metrics, TestEnv, eventually, fetch_metrics};

const TIMEOUT: Duration = Duration::from_secs(60);

/// In-flight WATCH requests per resource of `group`, from the apiserver's /metrics.
async fn apiserver_watches(plane: &ControlPlane, group: &str) -> Result<BTreeMap<String, f64>> {
    let text = plane.kubectl(["get", "--raw", "/metrics"]).await?;
    let metrics = Metrics::parse(&text);
    let mut out = BTreeMap::new();
    for s in metrics.matching(
        "apiserver_longrunning_requests",
        &[("verb", "WATCH"), ("group", group)],
    ) {
        *out.entry(s.labels["resource"].clone()).or_default() += s.value;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_watches_each_kind_once() -> Result<()> {
    let plane = ControlPlane::dedicated("agent-watches").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let cluster = env.unique_name("aw");
    // Removed on drop, also when the test fails.
    let underlay = Underlay::new(&cluster).await?;
    let node = SimNode::start(&env, &cluster, 1, 0).await?;

    // The agent's registry: one watch per kind (and the apiserver's own slice).
    let expected_registry = [
        ("NodeNetwork", "all"),
        ("Endpoint", "all"),
        ("Identity", "all"),
        ("ResolvedPolicy", "all"),
        ("LBService", "all"),
        ("EgressRoute", "all"),
        ("BGPNodeConfig", "own-node"),
        ("EndpointSlice", "default/kubernetes"),
        // The BGP peers' passwords: the Secrets of bgp.secretsNamespace only.
        ("Secret", "tendril-bgp-secrets"),
    ];
    let port = node.metrics_port;
    // Caches register as the agent's steps first read them (the node-scoped ones once the
    // node is known): waited for, all of them, not only the first.
    let registry: Metrics = eventually(TIMEOUT, || async move {
        let m = fetch_metrics(port).await?;
        for (kind, scope) in expected_registry {
            let v = m.value("tendril_cache_watches", &[("kind", kind), ("scope", scope)]);
            ensure!(v == Some(1.0), "{kind}/{scope}: {v:?} watches");
        }
        Ok(m)
    })
    .await?;
    let total = registry.sum("tendril_cache_watches", &[]);
    ensure!(
        total == expected_registry.len() as f64,
        "{total} watches in the registry:\n{}",
        registry
            .text
            .lines()
            .filter(|l| l.starts_with("tendril_cache_watches"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The apiserver's count: exactly one WATCH per Tendril kind the agent reads, nothing
    // else of Tendril's is watched on this plane.
    let watches = eventually(TIMEOUT, || {
        let plane = &plane;
        async move {
            let w = apiserver_watches(plane, "tendril.dev").await?;
            // Watches open one by one after the agent starts: wait for all seven.
            let opened = [
                "bgpnodeconfigs",
                "egressroutes",
                "endpoints",
                "identities",
                "lbservices",
                "nodenetworks",
                "resolvedpolicies",
            ]
            .iter()
            .all(|r| w.get(*r).copied().unwrap_or(0.0) >= 1.0);
            ensure!(opened, "watches not all open yet: {w:?}");
            Ok(w)
        }
    })
    .await?;
    let expected: BTreeMap<String, f64> = [
        "bgpnodeconfigs",
        "egressroutes",
        "endpoints",
        "identities",
        "lbservices",
        "nodenetworks",
        "resolvedpolicies",
    ]
    .into_iter()
    .map(|r| (r.to_string(), 1.0))
    .collect();
    let open: BTreeMap<String, f64> = watches.into_iter().filter(|(_, v)| *v > 0.0).collect();
    ensure!(
        open == expected,
        "WATCH requests per tendril.dev resource: {open:?}, expected one each: {expected:?}"
    );
    println!("apiserver WATCH requests of the agent per tendril.dev resource: {open:?}");
    drop(node);
    drop(underlay);
    Ok(())
}
