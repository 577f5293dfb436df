//! The egress concern on a real apiserver, through `tendril-operator`:
//! `EgressGatewayPolicy` + `Endpoint` + `Node` → `EgressRoute`.
//!
//! One dedicated plane (the concern reads every Node and Endpoint of the cluster). Pods are
//! created and given a status as a kubelet would; the operator's endpoints concern turns
//! them into Endpoints, whose security labels (pod labels, namespace labels) the egress
//! concern selects on. In order: the route carries the selected pods' addresses (not the
//! others'), the canonical destinations and exclusions, a gateway among the labelled Ready
//! nodes with its InternalIP, and the egress IP; the policy is `Ready=True`
//! (`GatewaySelected`) with `status.gatewayNode`. A pod that starts matching joins the
//! route, one deleted leaves it. The gateway node turns NotReady: the other labelled node
//! takes over (time printed), `Ready` says `FailedOver`, a Warning Event `GatewayFailover`
//! and `tendril_egress_gateway_changes_total{reason="NodeNotReady"}` report it; the first
//! node back Ready does not take the policy back (established connections stay put). The
//! gateway loses its label: failover again (`NodeNotSelected`). No node eligible: the route
//! keeps steering with no gateway (the datapath drops rather than leak pod addresses) and
//! `Ready=False NoGatewayNode`. Twelve policies spread over both gateways. An invalid
//! policy (unknown selector operator) is `Valid=False` with an Event and gets no route; a
//! deleted policy's route is deleted.
//!
//! Run `cargo build -p tendril-controllers --bins` first: the test spawns the binary.

mod operator_common;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use operator_common::{TIMEOUT, free_port, wait_until, warning_event};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Instant;
use tendril_crds::v1alpha1::{EgressGatewayPolicy, EgressRoute};
use tendril_e2e::{ControlPlane, Process, TestEnv, fetch_metrics, wait_deleted};

fn start_operator(env: &TestEnv, port: u16) -> Result<Process> {
    Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,tendril_controllers::egress=debug")
        .spawn()
}

/// A Node as a kubelet writes it: labels, InternalIP, Ready.
async fn node(nodes: &Api<Node>, env: &TestEnv, name: &str, ip: &str, gateway: &str) -> Result<()> {
    env.delete_on_drop::<Node>(name);
    let labels = match gateway {
        "" => json!({}),
        g => json!({"egress-gateway": g}),
    };
    let obj: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
    }))?;
    nodes.create(&PostParams::default(), &obj).await?;
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            }})),
        )
        .await?;
    Ok(())
}

async fn set_ready(nodes: &Api<Node>, name: &str, ready: bool) -> Result<()> {
    let status = if ready { "True" } else { "False" };
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": status,
                "reason": "Test", "lastHeartbeatTime": "2026-01-01T00:00:01Z",
                "lastTransitionTime": "2026-01-01T00:00:01Z"}]}}),
            ),
        )
        .await?;
    Ok(())
}

async fn label_node(nodes: &Api<Node>, name: &str, value: Option<&str>) -> Result<()> {
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"egress-gateway": value}}})),
        )
        .await?;
    Ok(())
}

/// A running pod with address `ip` on `node`.
async fn pod(pods: &Api<Pod>, name: &str, node: &str, app: &str, ip: &str) -> Result<()> {
    let obj: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}]},
    }))?;
    pods.create(&PostParams::default(), &obj).await?;
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})),
    )
    .await?;
    Ok(())
}

fn policy(name: &str, team: &str, gateway: &str, extra: Value) -> Result<EgressGatewayPolicy> {
    let mut v = json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "EgressGatewayPolicy",
        "metadata": {"name": name},
        "spec": {
            "selectors": [{"podSelector": {"matchLabels": {"app": "client"}},
                           "namespaceSelector": {"matchLabels": {"team": team}}}],
            "destinationCIDRs": ["192.0.2.77/24"],
            "excludedCIDRs": ["192.0.2.128/25"],
            "egressGateway": {"nodeSelector": {"matchLabels": {"egress-gateway": gateway}},
                              "egressIP": "198.51.100.10"},
        },
    });
    if let (Some(spec), Value::Object(extra)) = (v["spec"].as_object_mut(), extra) {
        spec.extend(extra);
    }
    Ok(serde_json::from_value(v)?)
}

fn condition(p: &EgressGatewayPolicy, type_: &str) -> Option<(String, String, String)> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn gateway(r: &EgressRoute) -> Option<String> {
    r.spec.gateway_node.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policies_become_routes_with_failover() -> Result<()> {
    let plane = ControlPlane::dedicated("egress").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = env.api();
    let policies: Api<EgressGatewayPolicy> = Api::all(client.clone());
    let routes: Api<EgressRoute> = Api::all(client.clone());
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let team = env.unique_name("team");
    let gw_label = env.unique_name("gw");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": team}}})),
        )
        .await?;

    let [gw_a, gw_b, worker] = ["gw-a", "gw-b", "worker"].map(|n| env.unique_name(n));
    node(&nodes, &env, &gw_a, "172.30.0.1", &gw_label).await?;
    node(&nodes, &env, &gw_b, "172.30.0.2", &gw_label).await?;
    node(&nodes, &env, &worker, "172.30.0.3", "").await?;
    pod(&pods, "client-1", &worker, "client", "10.244.3.11").await?;
    pod(&pods, "other", &worker, "server", "10.244.3.12").await?;

    let port = free_port()?;
    let _operator = start_operator(&env, port)?;

    let name = env.unique_name("egp");
    env.delete_on_drop::<EgressGatewayPolicy>(&name);
    policies
        .create(
            &PostParams::default(),
            &policy(&name, &team, &gw_label, json!({}))?,
        )
        .await?;
    let route = wait_until(&routes, &name, "client-1 and a gateway", |r| {
        r.spec.source_ips == ["10.244.3.11"] && r.spec.gateway_node.is_some()
    })
    .await?;
    ensure!(
        route.spec.destination_cidrs == ["192.0.2.0/24"],
        "{:?}",
        route.spec
    );
    ensure!(
        route.spec.excluded_cidrs == ["192.0.2.128/25"],
        "{:?}",
        route.spec
    );
    ensure!(route.spec.egress_ip.as_deref() == Some("198.51.100.10"));
    let first = gateway(&route).unwrap();
    let (other, first_ip) = if first == gw_a {
        (gw_b.clone(), "172.30.0.1")
    } else {
        (gw_a.clone(), "172.30.0.2")
    };
    ensure!(
        route.spec.gateway_ip.as_deref() == Some(first_ip),
        "{:?}",
        route.spec
    );
    ensure!(
        route
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.kind == "EgressGatewayPolicy" && o.controller == Some(true)),
        "route not owned by its policy"
    );
    let want_first = first.clone();
    let p = wait_until(&policies, &name, "Ready and gatewayNode", move |p| {
        condition(p, "Ready").is_some_and(|c| c.0 == "True" && c.1 == "GatewaySelected")
            && p.status.as_ref().and_then(|s| s.gateway_node.clone()) == Some(want_first.clone())
    })
    .await?;
    ensure!(condition(&p, "Valid").is_some_and(|c| c.0 == "True"));
    println!("initial gateway {first} (revision {})", route.spec.revision);

    // Pods join and leave.
    pod(&pods, "client-2", &gw_a, "client", "10.244.1.21").await?;
    wait_until(&routes, &name, "client-2 joins", |r| {
        r.spec.source_ips == ["10.244.1.21", "10.244.3.11"]
    })
    .await?;
    pods.delete("client-1", &DeleteParams::default().grace_period(0))
        .await?;
    wait_until(&routes, &name, "client-1 leaves", |r| {
        r.spec.source_ips == ["10.244.1.21"]
    })
    .await?;

    // Failover: the gateway goes NotReady.
    let started = Instant::now();
    set_ready(&nodes, &first, false).await?;
    let want_other = other.clone();
    let route = wait_until(&routes, &name, "failover to the other gateway", move |r| {
        gateway(r) == Some(want_other.clone())
    })
    .await?;
    println!(
        "failover {first} -> {other} (NodeNotReady): route rewritten after {:?}",
        started.elapsed()
    );
    let p = wait_until(&policies, &name, "FailedOver", |p| {
        condition(p, "Ready").is_some_and(|c| c.1 == "FailedOver")
    })
    .await?;
    let (_, _, message) = condition(&p, "Ready").unwrap();
    ensure!(
        message.contains(&format!("{first} -> {other}")) && message.contains("NodeNotReady"),
        "{message}"
    );
    let note = warning_event(&events, &name, "GatewayFailover").await?;
    ensure!(note.contains("NodeNotReady"), "{note}");
    let metrics = fetch_metrics(port).await?;
    let changes = metrics
        .value(
            "tendril_egress_gateway_changes_total",
            &[("reason", "NodeNotReady")],
        )
        .unwrap_or(0.0);
    ensure!(changes >= 1.0, "gateway changes NodeNotReady: {changes}");

    // The first gateway comes back: the policy stays where it is.
    set_ready(&nodes, &first, true).await?;
    let revision = route.spec.revision;
    // Poke a recompute that must not move the gateway: another pod joins.
    pod(&pods, "client-3", &worker, "client", "10.244.3.13").await?;
    let route = wait_until(&routes, &name, "client-3 joins", |r| {
        r.spec.source_ips.len() == 2
    })
    .await?;
    ensure!(
        gateway(&route) == Some(other.clone()),
        "moved back: {:?}",
        route.spec
    );
    ensure!(
        route.spec.revision == revision + 1,
        "{} after {revision}",
        route.spec.revision
    );

    // The gateway loses its label: back to the first.
    label_node(&nodes, &other, None).await?;
    let want_first = first.clone();
    wait_until(&routes, &name, "failover on unlabel", move |r| {
        gateway(r) == Some(want_first.clone())
    })
    .await?;
    let p = wait_until(&policies, &name, "FailedOver NodeNotSelected", |p| {
        condition(p, "Ready")
            .is_some_and(|c| c.1 == "FailedOver" && c.2.contains("NodeNotSelected"))
    })
    .await?;
    ensure!(p.status.as_ref().and_then(|s| s.gateway_node.clone()) == Some(first.clone()));

    // No node eligible: still steered, no gateway, Ready=False.
    set_ready(&nodes, &first, false).await?;
    let route = wait_until(&routes, &name, "no gateway", |r| gateway(r).is_none()).await?;
    ensure!(
        route.spec.source_ips.len() == 2 && route.spec.gateway_ip.is_none(),
        "{:?}",
        route.spec
    );
    wait_until(&policies, &name, "NoGatewayNode", |p| {
        condition(p, "Ready").is_some_and(|c| c.0 == "False" && c.1 == "NoGatewayNode")
    })
    .await?;
    warning_event(&events, &name, "NoGatewayNode").await?;
    set_ready(&nodes, &first, true).await?;
    label_node(&nodes, &other, Some(&gw_label)).await?;
    let want_first = first.clone();
    wait_until(&routes, &name, "gateway again", move |r| {
        gateway(r) == Some(want_first.clone())
    })
    .await?;

    // Twelve policies spread over the two gateways.
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let spread: Vec<String> = (0..12).map(|i| format!("{name}-spread-{i}")).collect();
    for s in &spread {
        env.delete_on_drop::<EgressGatewayPolicy>(s);
        policies
            .create(
                &PostParams::default(),
                &policy(s, &team, &gw_label, json!({}))?,
            )
            .await?;
    }
    for s in &spread {
        let r = wait_until(&routes, s, "a gateway", |r| gateway(r).is_some()).await?;
        *per_node.entry(gateway(&r).unwrap()).or_default() += 1;
    }
    println!("12 policies over 2 gateways: {per_node:?}");
    ensure!(per_node.len() == 2, "all on one gateway: {per_node:?}");

    // An invalid policy: Valid=False, an Event, no route.
    let bad = env.unique_name("egp-bad");
    env.delete_on_drop::<EgressGatewayPolicy>(&bad);
    let mut bad_policy = policy(&bad, &team, &gw_label, json!({}))?;
    bad_policy.spec.egress_gateway.node_selector = serde_json::from_value(
        json!({"matchExpressions": [{"key": "egress-gateway", "operator": "Sideways"}]}),
    )?;
    policies.create(&PostParams::default(), &bad_policy).await?;
    let p = wait_until(&policies, &bad, "Valid=False", |p| {
        condition(p, "Valid").is_some_and(|c| c.0 == "False")
    })
    .await?;
    let (_, reason, message) = condition(&p, "Valid").unwrap();
    ensure!(
        reason == "InvalidPolicy" && message.contains("nodeSelector"),
        "{reason}: {message}"
    );
    warning_event(&events, &bad, "InvalidPolicy").await?;
    ensure!(
        routes.get_opt(&bad).await?.is_none(),
        "route for an invalid policy"
    );

    // Deleting a policy deletes its route.
    policies.delete(&name, &DeleteParams::default()).await?;
    wait_deleted(&routes, &name, TIMEOUT).await?;
    let metrics = fetch_metrics(port).await?;
    for m in [
        "tendril_egress_routes",
        "tendril_egress_route_writes_total",
        "tendril_egress_invalid_policies",
    ] {
        ensure!(metrics.value(m, &[]).is_some(), "metric {m} missing");
    }
    ensure!(metrics.value("tendril_egress_invalid_policies", &[]) == Some(1.0));
    Ok(())
}
