//! The services concern on a real apiserver and kube-controller-manager (whose
//! EndpointSlice controller turns pods into slices), through `tendril-operator`.
//!
//! In order: a Service with two ready pods gets its `LBService` (frontend, backends with
//! node and zone, owner reference, `service-changed-at`); the nodes' reports, written as an
//! agent would, make it `Realized`; a pod that stops being ready and one that terminates
//! bump the revision (stamped with the slice's trigger time), and the revisions of every
//! service follow one sequence in write order; a change that alters nothing writes nothing;
//! NodePort/LoadBalancer/externalIP frontends; SCTP and a bad algorithm annotation give
//! `Valid=False` and a Warning Event while the TCP port is served; headless, ExternalName,
//! foreign-class services get none, and a service handed to another proxy loses its
//! `LBService`; an orphan and a deleted Service's `LBService` go; one deleted by hand
//! comes back with a higher revision; a restarted operator rewrites nothing and numbers
//! above every stored and every realized revision.
//!
//! Run `cargo build -p tendril-controllers --bins` first: the test spawns the binary.

mod operator_common;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use operator_common::{TIMEOUT, create_node, free_port};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;
use tendril_crds::facts::annotations::{SERVICE_CHANGED_AT, SERVICE_LB_ALGORITHM};
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, apply, eventually, fetch_metrics, wait_deleted, wait_for,
};

const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

fn typed<K: serde::de::DeserializeOwned>(v: Value) -> Result<K> {
    Ok(serde_json::from_value(v)?)
}

/// The operator, with `services.realizeDeadlineMillis` = `deadline_ms`.
fn start_operator(env: &TestEnv, port: u16, deadline_ms: u64) -> Result<Process> {
    let config = std::env::temp_dir().join(format!(
        "{}.yaml",
        env.unique_name(&format!("svc-operator-{deadline_ms}"))
    ));
    std::fs::write(
        &config,
        format!("services:\n  realizeDeadlineMillis: {deadline_ms}\n"),
    )?;
    Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--config")
        .arg(&config)
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,tendril_controllers::services=debug")
        .spawn()
}

fn pod(name: &str, node: &str) -> Result<Pod> {
    typed(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "containers": [{
            "name": "main", "image": "registry.k8s.io/pause:3.10",
            "ports": [{"name": "http", "containerPort": 8080}],
        }]},
    }))
}

/// Writes the pod's status as a kubelet would: running at `ip`, `Ready` as given since
/// `since` (the EndpointSlice controller's trigger time is that transition time).
async fn set_pod_status(
    pods: &Api<Pod>,
    name: &str,
    ip: &str,
    ready: bool,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<()> {
    let now = since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = if ready { "True" } else { "False" };
    let body = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": status, "lastTransitionTime": now}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await?;
    Ok(())
}

/// Deletes pod `name` with `grace` seconds (no kubelet here: a grace period leaves it
/// terminating).
async fn delete_pod(pods: &Api<Pod>, name: &str, grace: i64) -> Result<()> {
    let params = DeleteParams {
        grace_period_seconds: Some(grace as u32),
        ..Default::default()
    };
    pods.delete(name, &params).await?;
    Ok(())
}

/// Writes `realizedServicesRevision` into a NodeNetwork's status as its agent would.
async fn report_realized(nns: &Api<NodeNetwork>, node: &str, revision: i64) -> Result<()> {
    let body = json!({
        "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
        "metadata": {"name": node},
        "status": {"realizedServicesRevision": revision},
    });
    nns.patch_status(
        node,
        &PatchParams::apply("tendril-agent").force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Waits until the LBService `name` satisfies `cond`.
async fn lbs(
    api: &Api<LBService>,
    name: &str,
    what: &str,
    cond: impl Fn(&LBService) -> bool + Send + 'static,
) -> Result<LBService> {
    wait_for(
        api,
        name,
        move |o: Option<&LBService>| o.is_some_and(&cond),
        TIMEOUT,
    )
    .await
    .with_context(|| format!("LBService {name}: {what}"))?
    .context("present")
}

/// (address, port, state, node, zone) of each backend.
type BackendRow = (String, i32, String, Option<String>, Option<String>);

fn backends(lb: &LBService) -> Vec<BackendRow> {
    lb.spec
        .backends
        .iter()
        .map(|b| {
            (
                b.address.clone(),
                b.port,
                b.state.clone(),
                b.node_name.clone(),
                b.zone.clone(),
            )
        })
        .collect()
}

/// (type, address, port, protocol) of each frontend.
fn frontends(lb: &LBService) -> Vec<(String, Option<String>, i32, String)> {
    lb.spec
        .frontends
        .iter()
        .map(|f| {
            (
                f.type_.clone(),
                f.address.clone(),
                f.port,
                f.protocol.clone(),
            )
        })
        .collect()
}

fn condition(lb: &LBService, type_: &str) -> Option<(String, String, String)> {
    let c = lb
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// `Realized=False`, `Pending`, and the message that names no count (it would move with
/// every revision).
fn pending(lb: &LBService) -> bool {
    condition(lb, "Realized").is_some_and(|(s, r, m)| {
        s == "False"
            && r == "Pending"
            && m.starts_with(
                "not every node realizes the service within services.realizeDeadlineMillis",
            )
    })
}

fn changed_at(lb: &LBService) -> Result<chrono::DateTime<chrono::FixedOffset>> {
    let at = lb
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SERVICE_CHANGED_AT))
        .context("service-changed-at annotation")?;
    let fraction = at
        .split_once('.')
        .map(|(_, f)| f.trim_end_matches('Z'))
        .unwrap_or("");
    ensure!(
        at.ends_with('Z') && fraction.len() == 6,
        "{SERVICE_CHANGED_AT}={at}: want RFC 3339 with microseconds, UTC"
    );
    Ok(chrono::DateTime::parse_from_rfc3339(at)?)
}

fn cluster_ip(svc: &Service) -> String {
    svc.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap_or_default()
}

fn node_port(svc: &Service, i: usize) -> Option<i32> {
    svc.spec.as_ref()?.ports.as_ref()?.get(i)?.node_port
}

#[tokio::test]
async fn services_translate_into_lbservices() -> Result<()> {
    let plane = ControlPlane::dedicated("services").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let services: Api<Service> = env.api();
    let pods: Api<Pod> = env.api();
    let slices: Api<EndpointSlice> = env.api();
    let lbsvc: Api<LBService> = env.api();
    let all_lbs: Api<LBService> = Api::all(client.clone());
    let nns: Api<NodeNetwork> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());

    // Two nodes, the second in zone-b (the EndpointSlice controller copies it into slices).
    let n1 = env.unique_name("svc-n1");
    let n2 = env.unique_name("svc-n2");
    create_node(&env, &n1, &[("InternalIP", "192.0.2.1")]).await?;
    create_node(&env, &n2, &[("InternalIP", "192.0.2.2")]).await?;
    env.delete_on_drop::<NodeNetwork>(&n1);
    env.delete_on_drop::<NodeNetwork>(&n2);
    nodes
        .patch(
            &n2,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {ZONE_LABEL: "zone-b"}}})),
        )
        .await?;

    // No deadline: every pending revision is reported (the deadline is exercised after
    // the restart below).
    let port = free_port()?;
    let mut operator = start_operator(&env, port, 0)?;
    operator.wait_for_log("caches synced", TIMEOUT).await?;

    // A ClusterIP Service with two ready pods.
    apply(
        &services,
        &typed(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))?,
    )
    .await?;
    let web_svc = services.get("web").await?;
    let vip = cluster_ip(&web_svc);
    for (name, node, ip) in [("web-1", &n1, "10.244.1.5"), ("web-2", &n2, "10.244.2.5")] {
        pods.create(&PostParams::default(), &pod(name, node)?)
            .await?;
        let since = chrono::Utc::now() - chrono::Duration::seconds(120);
        set_pod_status(&pods, name, ip, true, since).await?;
    }
    let web = lbs(&lbsvc, "web", "two active backends", |lb| {
        lb.spec.backends.len() == 2
    })
    .await?;
    ensure!(
        frontends(&web) == vec![("ClusterIP".into(), Some(vip.clone()), 80, "TCP".into())],
        "frontends: {:?}",
        frontends(&web)
    );
    ensure!(
        backends(&web)
            == vec![
                (
                    "10.244.1.5".into(),
                    8080,
                    "active".into(),
                    Some(n1.clone()),
                    None
                ),
                (
                    "10.244.2.5".into(),
                    8080,
                    "active".into(),
                    Some(n2.clone()),
                    Some("zone-b".into())
                ),
            ],
        "backends: {:?}",
        backends(&web)
    );
    let owners = web.metadata.owner_references.clone().unwrap_or_default();
    ensure!(
        owners.len() == 1
            && owners[0].kind == "Service"
            && owners[0].uid == web_svc.metadata.uid.clone().unwrap_or_default()
            && owners[0].controller == Some(true),
        "owner: {owners:?}"
    );
    changed_at(&web)?;
    let r1 = web.spec.revision;
    ensure!(r1 > 0, "revision {r1}");

    // Nobody realizes it yet; the agents' reports make it Realized.
    let web = lbs(&lbsvc, "web", "Realized=False Pending", pending).await?;
    ensure!(
        condition(&web, "Valid").is_some_and(|(s, _, _)| s == "True"),
        "Valid: {:?}",
        condition(&web, "Valid")
    );
    // One node realizing it is not enough.
    report_realized(&nns, &n1, r1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    lbs(&lbsvc, "web", "still Pending with one node of two", pending).await?;
    report_realized(&nns, &n2, r1 + 1000).await?;
    lbs(&lbsvc, "web", "Realized=True", move |lb| {
        condition(lb, "Realized").is_some_and(|(s, _, _)| s == "True")
    })
    .await?;

    // web-2 is no longer ready (neither serving nor terminating): not a backend, and the
    // write carries the slice's trigger time.
    let since = chrono::Utc::now();
    set_pod_status(&pods, "web-2", "10.244.2.5", false, since).await?;
    let web = lbs(&lbsvc, "web", "one backend", move |lb| {
        lb.spec.backends.len() == 1 && lb.spec.revision > r1
    })
    .await?;
    let r2 = web.spec.revision;
    ensure!(
        backends(&web)[0].0 == "10.244.1.5",
        "backends: {:?}",
        backends(&web)
    );
    let slice_list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await?;
    let triggers: Vec<chrono::DateTime<chrono::FixedOffset>> = slice_list
        .items
        .iter()
        .filter_map(|s| s.metadata.annotations.as_ref()?.get(TRIGGER_TIME).cloned())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
        .collect();
    ensure!(!triggers.is_empty(), "no {TRIGGER_TIME} on web's slices");
    ensure!(
        triggers.contains(&changed_at(&web)?),
        "{SERVICE_CHANGED_AT} {:?} is none of the slices' trigger times {triggers:?}",
        changed_at(&web)?
    );
    // Realized=False again: the nodes report r1 and r1+1000 (n2 "already" realizes r2).
    lbs(&lbsvc, "web", "pending on n1", pending).await?;

    // web-1 terminates (no kubelet: it stays, ready=false, serving, terminating).
    delete_pod(&pods, "web-1", 3600).await?;
    let web = lbs(&lbsvc, "web", "web-1 terminating", move |lb| {
        lb.spec.revision > r2
            && lb
                .spec
                .backends
                .iter()
                .any(|b| b.address == "10.244.1.5" && b.state == "terminating")
    })
    .await?;
    let r3 = web.spec.revision;

    // A second service: its revision continues the one sequence, after every web write.
    apply(
        &services,
        &typed(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api", "namespace": ns},
            "spec": {"selector": {"app": "api"}, "ports": [{"port": 8080}]},
        }))?,
    )
    .await?;
    let api = lbs(&lbsvc, "api", "written", |_| true).await?;
    ensure!(
        api.spec.revision > r3 && api.spec.backends.is_empty(),
        "api: revision {} after web's {r3}, backends {:?}",
        api.spec.revision,
        api.spec.backends
    );
    let ra = api.spec.revision;

    // A change that alters no spec writes nothing. Barrier: a later change of `api` takes
    // the very next number (reconciles of different services may overlap, so this
    // barrier holds in practice; the restart check at the end is the exact one).
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/note": "x"}}})),
        )
        .await?;
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "front"}}})),
        )
        .await?;
    services
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sessionAffinity": "ClientIP"}})),
        )
        .await?;
    let api = lbs(&lbsvc, "api", "affinity", |lb| {
        lb.spec.session_affinity.is_some()
    })
    .await?;
    ensure!(
        api.spec.revision == ra + 1,
        "api revision {} (want {}: the no-op changes of web took no number)",
        api.spec.revision,
        ra + 1
    );
    ensure!(
        lbsvc.get("web").await?.spec.revision == r3,
        "web rewritten by a change of nothing it serves"
    );
    ensure!(
        api.spec
            .session_affinity
            .as_ref()
            .and_then(|a| a.client_ip.as_ref())
            .map(|c| c.timeout_seconds)
            == Some(10800),
        "affinity: {:?}",
        api.spec.session_affinity
    );

    // A pod replaced (web-1 gone, web-3 ready in its place): the removal and the
    // addition are two EndpointSlice changes and one LBService write (one generation),
    // batched within `services.updateBatchMillis`.
    let generation = lbsvc
        .get("web")
        .await?
        .metadata
        .generation
        .unwrap_or_default();
    delete_pod(&pods, "web-1", 0).await?;
    // Far enough apart for the EndpointSlice controller to write them as two changes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    pods.create(&PostParams::default(), &pod("web-3", &n1)?)
        .await?;
    set_pod_status(&pods, "web-3", "10.244.1.7", true, chrono::Utc::now()).await?;
    let web = lbs(&lbsvc, "web", "web-1 replaced by web-3", |lb| {
        backends(lb)
            .iter()
            .map(|b| b.0.as_str())
            .collect::<Vec<_>>()
            == ["10.244.1.7"]
    })
    .await?;
    // Anything still coming would be a second write.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = lbsvc.get("web").await?;
    ensure!(
        web.metadata.generation == Some(generation + 1)
            && after.metadata.generation == web.metadata.generation,
        "a replaced pod took {} LBService writes (generation {generation} → {:?}), not one",
        after.metadata.generation.unwrap_or_default() - generation,
        after.metadata.generation
    );

    // NodePort, LoadBalancer (ingress IP written as a LB controller would) and externalIPs.
    apply(
        &services,
        &typed(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "edge", "namespace": ns},
            "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                     "externalIPs": ["198.51.100.7"], "externalTrafficPolicy": "Local",
                     "loadBalancerSourceRanges": ["203.0.113.0/24"],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?,
    )
    .await?;
    services
        .patch_status(
            "edge",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}}),
            ),
        )
        .await?;
    let edge_svc = services.get("edge").await?;
    let edge = lbs(&lbsvc, "edge", "LoadBalancer frontend", |lb| {
        lb.spec.frontends.iter().any(|f| f.type_ == "LoadBalancer")
    })
    .await?;
    ensure!(
        frontends(&edge)
            == vec![
                (
                    "ClusterIP".into(),
                    Some(cluster_ip(&edge_svc)),
                    80,
                    "TCP".into()
                ),
                (
                    "NodePort".into(),
                    None,
                    node_port(&edge_svc, 0).unwrap_or(-1),
                    "TCP".into()
                ),
                (
                    "LoadBalancer".into(),
                    Some("203.0.113.10".into()),
                    80,
                    "TCP".into()
                ),
                (
                    "ExternalIP".into(),
                    Some("198.51.100.7".into()),
                    80,
                    "TCP".into()
                ),
            ],
        "edge frontends: {:?}",
        frontends(&edge)
    );
    ensure!(
        edge.spec.external_traffic_policy == "Local"
            && edge.spec.health_check_node_port
                == edge_svc
                    .spec
                    .as_ref()
                    .and_then(|s| s.health_check_node_port)
            && edge.spec.health_check_node_port.is_some()
            && edge.spec.load_balancer_source_ranges == vec!["203.0.113.0/24".to_string()],
        "edge: {:?}",
        edge.spec
    );

    // SCTP and a bad algorithm: the TCP port is served, Valid=False names both, an Event.
    apply(
        &services,
        &typed(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "odd", "namespace": ns,
                         "annotations": {SERVICE_LB_ALGORITHM: "fastest"}},
            "spec": {"selector": {"app": "odd"},
                     "ports": [{"name": "tcp", "port": 80},
                               {"name": "sig", "port": 3868, "protocol": "SCTP"}]},
        }))?,
    )
    .await?;
    let odd = lbs(&lbsvc, "odd", "Valid=False", |lb| {
        condition(lb, "Valid").is_some_and(|(s, _, _)| s == "False")
    })
    .await?;
    let (_, reason, message) = condition(&odd, "Valid").unwrap_or_default();
    ensure!(
        reason == "Unsupported"
            && message.contains("\"sig\" (3868/SCTP)")
            && message.contains("fastest"),
        "Valid: {reason}: {message}"
    );
    ensure!(
        frontends(&odd).len() == 1 && frontends(&odd)[0].3 == "TCP" && odd.spec.algorithm.is_none(),
        "odd: {:?}",
        odd.spec
    );
    let events: Api<Event> = env.api();
    eventually(TIMEOUT, || async {
        let list = events.list(&ListParams::default()).await?;
        ensure!(
            list.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("Unsupported")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("odd")
            }),
            "no Warning Event on Service odd"
        );
        Ok(())
    })
    .await?;

    // Not served: headless, ExternalName. A barrier (a new served service written after
    // them) shows they were handled. Another loadBalancerClass is served, as by kube-proxy.
    for (name, spec) in [
        (
            "headless",
            json!({"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]}),
        ),
        (
            "dns",
            json!({"type": "ExternalName", "externalName": "db.example.com"}),
        ),
        (
            "foreign",
            json!({"type": "LoadBalancer", "loadBalancerClass": "example.com/other",
                           "selector": {"app": "web"}, "ports": [{"port": 80}]}),
        ),
    ] {
        apply(
            &services,
            &typed(json!({"apiVersion": "v1", "kind": "Service",
                          "metadata": {"name": name, "namespace": ns}, "spec": spec}))?,
        )
        .await?;
    }
    apply(
        &services,
        &typed(json!({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "barrier", "namespace": ns},
                      "spec": {"ports": [{"port": 80}]}}))?,
    )
    .await?;
    lbs(&lbsvc, "barrier", "written", |_| true).await?;
    for name in ["headless", "dns"] {
        ensure!(
            lbsvc.get_opt(name).await?.is_none(),
            "{name} got an LBService"
        );
    }
    lbs(
        &lbsvc,
        "foreign",
        "served whatever its loadBalancerClass",
        |lb| {
            lb.spec.frontends.iter().any(|f| f.type_ == "ClusterIP")
                && lb.spec.frontends.iter().any(|f| f.type_ == "NodePort")
        },
    )
    .await?;
    // Handed to another proxy: its LBService goes.
    services
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"service.kubernetes.io/service-proxy-name": "other"}}})),
        )
        .await?;
    wait_deleted(&lbsvc, "api", TIMEOUT).await?;

    // An orphan (owned by a Service that is gone) is deleted; so is the LBService of a
    // deleted Service. One written by hand (no Service owner) is the user's and stays.
    apply(
        &lbsvc,
        &typed(
            json!({"apiVersion": "tendril.dev/v1alpha1", "kind": "LBService",
                      "metadata": {"name": "orphan", "namespace": ns,
                                   "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                                        "name": "orphan", "uid": "00000000-0000-0000-0000-000000000001"}]},
                      "spec": {"revision": 1}}),
        )?,
    )
    .await?;
    apply(
        &lbsvc,
        &typed(
            json!({"apiVersion": "tendril.dev/v1alpha1", "kind": "LBService",
                      "metadata": {"name": "by-hand", "namespace": ns},
                      "spec": {"revision": 1}}),
        )?,
    )
    .await?;
    wait_deleted(&lbsvc, "orphan", TIMEOUT).await?;
    services.delete("barrier", &DeleteParams::default()).await?;
    wait_deleted(&lbsvc, "barrier", TIMEOUT).await?;
    ensure!(
        lbsvc.get_opt("by-hand").await?.is_some(),
        "the sweeper deleted an LBService written by hand"
    );
    lbsvc.delete("by-hand", &DeleteParams::default()).await?;

    // Deleted by hand: put back, same content, a higher revision.
    let before = lbsvc.get("edge").await?;
    lbsvc.delete("edge", &DeleteParams::default()).await?;
    let edge_rev = before.spec.revision;
    let edge = lbs(&lbsvc, "edge", "put back", move |lb| {
        lb.spec.revision > edge_rev
    })
    .await?;
    ensure!(
        frontends(&edge) == frontends(&before) && backends(&edge) == backends(&before),
        "put back differently: {:?}",
        edge.spec
    );

    // A burst: 24 Services at once are written several at a time, so revisions commit out
    // of order; once they drain, the highest committedRevision is the highest revision
    // (one number per node still says what is realized).
    futures::future::try_join_all((0..24).map(|i| {
        let services = services.clone();
        let ns = ns.clone();
        async move {
            apply(
                &services,
                &typed(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": format!("burst-{i}"), "namespace": ns},
                    "spec": {"selector": {"app": format!("burst-{i}")}, "ports": [{"port": 80}]},
                }))?,
            )
            .await
        }
    }))
    .await?;
    eventually(TIMEOUT, || async {
        let items = lbsvc.list(&ListParams::default()).await?.items;
        let burst = items
            .iter()
            .filter(|lb| {
                lb.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("burst-"))
            })
            .count();
        ensure!(burst == 24, "{burst}/24 burst LBServices written");
        let highest = items.iter().map(|lb| lb.spec.revision).max();
        let committed = items
            .iter()
            .map(|lb| lb.spec.committed_revision.unwrap_or(lb.spec.revision))
            .max();
        ensure!(
            committed == highest,
            "highest committedRevision {committed:?}, highest revision {highest:?}"
        );
        Ok(())
    })
    .await?;
    // How many drains needed a second write depends on how the writes overlapped.
    let m = fetch_metrics(port).await?;
    println!(
        "burst of 24: {} settled revision(s) published",
        m.value("tendril_services_settled_publishes_total", &[])
            .unwrap_or(0.0)
    );
    for i in 0..24 {
        services
            .delete(&format!("burst-{i}"), &DeleteParams::default())
            .await?;
    }
    eventually(TIMEOUT, || async {
        let left = lbsvc
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|lb| {
                lb.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with("burst-"))
            })
            .count();
        ensure!(left == 0, "{left} burst LBServices left");
        Ok(())
    })
    .await?;

    // Metrics.
    let max_revision = all_lbs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|lb| lb.spec.revision)
        .max()
        .unwrap_or(0);
    let served: Vec<String> = lbsvc
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|lb| lb.metadata.name.clone().unwrap_or_default())
        .collect();
    eventually(TIMEOUT, || async {
        let m = fetch_metrics(port).await?;
        let revision = m.value("tendril_services_revision", &[]);
        ensure!(
            revision.is_some_and(|r| r >= max_revision as f64),
            "tendril_services_revision {revision:?} < {max_revision}"
        );
        // web, edge, odd, foreign here and default/kubernetes.
        let count = m.value("tendril_services_lbservices", &[]);
        ensure!(
            count == Some(5.0),
            "tendril_services_lbservices {count:?} ({served:?})"
        );
        ensure!(
            m.value("tendril_services_invalid", &[]) == Some(1.0),
            "tendril_services_invalid"
        );
        ensure!(
            m.value("tendril_services_writes_total", &[]).unwrap_or(0.0) >= 8.0,
            "writes_total"
        );
        ensure!(
            m.sum("tendril_services_translate_seconds_count", &[]) >= 8.0,
            "translate histogram"
        );
        Ok(())
    })
    .await?;
    operator.stop(Duration::from_secs(10));

    // Restart: nothing rewritten; numbering resumes above every stored revision and every
    // node's realized revision (n2 reports r1 + 1000, above all of them).
    let revisions_before: BTreeMap<String, i64> = all_lbs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|lb| {
            (
                format!(
                    "{}/{}",
                    lb.metadata.namespace.clone().unwrap_or_default(),
                    lb.metadata.name.clone().unwrap_or_default()
                ),
                lb.spec.revision,
            )
        })
        .collect();
    let realized_max = r1 + 1000;
    ensure!(
        revisions_before.values().all(|r| *r < realized_max),
        "the test needs the node's report above every revision: {revisions_before:?}"
    );
    let port = free_port()?;
    let mut operator = start_operator(&env, port, DEADLINE_MS)?;
    operator.wait_for_log("caches synced", TIMEOUT).await?;
    apply(
        &services,
        &typed(json!({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": "after", "namespace": ns},
                      "spec": {"ports": [{"port": 80}]}}))?,
    )
    .await?;
    let after = lbs(&lbsvc, "after", "written after restart", |_| true).await?;
    // Above, not exactly one above: other tests on the shared plane write Services too, and
    // a new Service waits up to `services.sliceWaitMillis` for its slices meanwhile.
    ensure!(
        after.spec.revision > realized_max,
        "first revision after restart {}, want above {realized_max}",
        after.spec.revision,
    );
    // The test's own services (their inputs did not change; the apiserver may still be
    // settling its own `kubernetes` EndpointSlice, which is then rightly rewritten).
    for (key, revision) in &revisions_before {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        if ns != env.namespace() {
            continue;
        }
        let lb = Api::<LBService>::namespaced(client.clone(), ns)
            .get(name)
            .await?;
        ensure!(
            lb.spec.revision == *revision,
            "{key}: revision {} after an operator restart, want {revision}",
            lb.spec.revision
        );
    }
    realize_deadline(&env, &nns, [&n1, &n2], port).await?;
    operator.stop(Duration::from_secs(10));
    Ok(())
}

/// `services.realizeDeadlineMillis` of the restarted operator.
const DEADLINE_MS: u64 = 3000;

/// With a deadline: a revision both nodes realize in time writes no status (Realized stays
/// True, `tendril_services_status_writes_total` does not move); one left pending turns
/// Realized False once the deadline passes.
async fn realize_deadline(
    env: &TestEnv,
    nns: &Api<NodeNetwork>,
    nodes: [&str; 2],
    port: u16,
) -> Result<()> {
    let lbsvc: Api<LBService> = env.api();
    let services: Api<Service> = env.api();
    let service = |ports: &[i32]| {
        typed::<Service>(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "deadline", "namespace": env.namespace()},
            "spec": {"ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "port": p}))
                                       .collect::<Vec<_>>()}}))
    };
    let realize = |revision: i64| async move {
        for node in nodes {
            report_realized(nns, node, revision).await?;
        }
        anyhow::Ok(())
    };
    apply(&services, &service(&[80])?).await?;
    let first = lbs(&lbsvc, "deadline", "written", |_| true).await?;
    realize(first.spec.revision).await?;
    lbs(&lbsvc, "deadline", "Realized=True", |lb| {
        condition(lb, "Realized").is_some_and(|(s, _, _)| s == "True")
    })
    .await?;
    let status_writes = || async move {
        let m = fetch_metrics(port).await?;
        anyhow::Ok(
            m.value("tendril_services_status_writes_total", &[])
                .unwrap_or(0.0),
        )
    };
    // Every LBService (this test's earlier ones too) realizes the reports above: once all
    // show it, their statuses are written and the counter is still.
    let all_lbs: Api<LBService> = Api::all(env.client());
    eventually(TIMEOUT, || async {
        let list = all_lbs.list(&ListParams::default()).await?;
        let pending: Vec<String> = list
            .items
            .iter()
            .filter(|lb| condition(lb, "Realized").is_none_or(|(s, _, _)| s != "True"))
            .map(|lb| lb.metadata.name.clone().unwrap_or_default())
            .collect();
        ensure!(pending.is_empty(), "not Realized yet: {pending:?}");
        Ok(())
    })
    .await?;
    // The operator counts a pass's writes once all of them returned: the apiserver can show
    // them a moment before the counter does.
    let mut before = status_writes().await?;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = status_writes().await?;
        if now == before {
            break;
        }
        before = now;
    }

    // A second port, realized by both nodes at once: nothing to write.
    apply(&services, &service(&[80, 81])?).await?;
    let rev = first.spec.revision;
    let second = lbs(&lbsvc, "deadline", "second revision", move |lb| {
        lb.spec.revision > rev
    })
    .await?;
    realize(second.spec.revision).await?;
    let versions = |list: kube::core::ObjectList<LBService>| {
        list.items
            .into_iter()
            .map(|lb| {
                let key = format!("{}/{}", lb.namespace().unwrap_or_default(), lb.name_any());
                (key, lb.resource_version().unwrap_or_default())
            })
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let versions_before = versions(all_lbs.list(&ListParams::default()).await?);
    tokio::time::sleep(Duration::from_millis(DEADLINE_MS + 1000)).await;
    let lb = lbsvc.get("deadline").await?;
    ensure!(
        condition(&lb, "Realized").is_some_and(|(s, _, _)| s == "True"),
        "a revision realized within the deadline: {:?}",
        lb.status
    );
    let key = format!("{}/deadline", env.namespace());
    let versions_after = versions(all_lbs.list(&ListParams::default()).await?);
    ensure!(
        versions_after.get(&key) == versions_before.get(&key),
        "a revision realized within the deadline wrote a status: {:?}",
        lb.status
    );
    // The counter covers every LBService: it must be still unless another one changed
    // meanwhile (the apiserver settling its own `kubernetes` EndpointSlice gives that one
    // a revision the test's reports do not cover, rightly Pending after the deadline).
    let others_changed: Vec<&String> = versions_after
        .iter()
        .filter(|(k, v)| versions_before.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .collect();
    if others_changed.is_empty() {
        ensure!(
            status_writes().await? == before,
            "a revision realized within the deadline wrote a status (counter moved)"
        );
    } else {
        println!("status counter not compared: meanwhile changed {others_changed:?}");
    }

    // A third, left unrealized: Pending once the deadline passes (and not before).
    // (Timed from before the change: the operator's deadline starts after it.)
    let changed = std::time::Instant::now();
    apply(&services, &service(&[80, 81, 82])?).await?;
    let rev = second.spec.revision;
    lbs(&lbsvc, "deadline", "third revision", move |lb| {
        lb.spec.revision > rev
    })
    .await?;
    lbs(&lbsvc, "deadline", "Pending after the deadline", pending).await?;
    ensure!(
        changed.elapsed() >= Duration::from_millis(DEADLINE_MS),
        "Pending after {:?}, before the {DEADLINE_MS} ms deadline",
        changed.elapsed()
    );
    Ok(())
}
