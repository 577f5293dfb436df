//! The BGP concern on a real apiserver, through `tendril-operator`: nodes, NodeNetworks
//! (pod CIDRs written as the IPAM concern would), Services (LoadBalancer ingress written as
//! LB IPAM would), hand-written EndpointSlices and `BGPPeeringPolicy`s in; the exact
//! `BGPNodeConfig` of every node out.
//!
//! In order: a policy selecting two of three nodes gives each exactly its sessions and
//! prefixes (pod CIDR, LB IPs, external IPs with communities; an
//! `externalTrafficPolicy: Local` LB IP only where a ready backend runs), owned by the Node,
//! and the policy's status says how many nodes it selects; readiness moving between nodes
//! moves the Local prefix; a change that alters nothing writes nothing; a Service LB IP
//! change reaches the configs (timed: p50 printed); a deleted Service is withdrawn; a node
//! losing its label loses its config; a conflicting second policy gives `Valid=False`
//! (Conflict) on both and an Event and leaves the configs as they were; a config deleted by
//! hand comes back with a higher revision; a restarted operator rewrites nothing.
//!
//! Run `cargo build -p tendril-controllers --bins` first: the test spawns the binary.

mod operator_common;

use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use operator_common::{TIMEOUT, create_node, free_port};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{
    Advertisement, AdvertisementSource, BGP_CHANGED_AT_ANNOTATION, BGPNeighbor, BGPNodeConfig,
    BGPNodeConfigSpec, BGPPeeringPolicy, GracefulRestart, NodeNetwork, NodeRouter,
};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, apply, eventually, fetch_metrics, wait_deleted, wait_for,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// LB IP changes timed for the propagation figure.
const LB_CHANGES: usize = 20;

fn typed<K: serde::de::DeserializeOwned>(v: Value) -> Result<K> {
    Ok(serde_json::from_value(v)?)
}

fn start_operator(env: &TestEnv, port: u16) -> Result<Process> {
    Process::builder("tendril-operator")
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .arg("--leader-elect=false")
        .arg("--metrics-bind")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info,tendril_controllers::bgp=debug")
        .spawn()
}

/// Waits until the BGPNodeConfig `name` satisfies `cond`.
async fn config(
    api: &Api<BGPNodeConfig>,
    name: &str,
    what: &str,
    cond: impl Fn(&BGPNodeConfig) -> bool + Send + 'static,
) -> Result<BGPNodeConfig> {
    wait_for(
        api,
        name,
        move |o: Option<&BGPNodeConfig>| o.is_some_and(&cond),
        TIMEOUT,
    )
    .await
    .with_context(|| format!("BGPNodeConfig {name}: {what}"))?
    .context("present")
}

async fn policy_status(
    api: &Api<BGPPeeringPolicy>,
    name: &str,
    what: &str,
    cond: impl Fn(&BGPPeeringPolicy) -> bool + Send + 'static,
) -> Result<BGPPeeringPolicy> {
    wait_for(
        api,
        name,
        move |o: Option<&BGPPeeringPolicy>| o.is_some_and(&cond),
        TIMEOUT,
    )
    .await
    .with_context(|| format!("BGPPeeringPolicy {name}: {what}"))?
    .context("present")
}

/// (status, reason, message) of the policy's `Valid` condition.
fn valid(p: &BGPPeeringPolicy) -> Option<(String, String, String)> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Valid")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn prefixes(c: &BGPNodeConfig) -> Vec<String> {
    c.spec
        .routers
        .iter()
        .flat_map(|r| r.advertisements.iter().map(|a| a.prefix.clone()))
        .collect()
}

/// Writes `status.loadBalancer.ingress` as LB IPAM would.
async fn set_ingress(services: &Api<Service>, name: &str, ips: &[&str]) -> Result<()> {
    let ingress: Vec<Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    services
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": ingress}}})),
        )
        .await?;
    Ok(())
}

/// An EndpointSlice of `service` (no selector: nothing else writes it) with one endpoint
/// per (node, ready).
fn slice(ns: &str, service: &str, endpoints: &[(&str, bool)]) -> Result<EndpointSlice> {
    let eps: Vec<Value> = endpoints
        .iter()
        .enumerate()
        .map(|(i, (node, ready))| {
            json!({"addresses": [format!("10.244.9.{}", i + 1)], "nodeName": node,
                   "conditions": {"ready": ready}})
        })
        .collect();
    typed(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": ns,
                     "labels": {SERVICE_NAME_LABEL: service,
                                "endpointslice.kubernetes.io/managed-by": "e2e.tendril.dev"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }))
}

fn lb_service(ns: &str, name: &str, local: bool, announce: bool) -> Result<Service> {
    let mut labels = serde_json::Map::new();
    if announce {
        labels.insert("announce".into(), json!("bgp"));
    }
    typed(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"type": "LoadBalancer",
                 "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
}

fn neighbor() -> BGPNeighbor {
    BGPNeighbor {
        peer_address: "192.0.2.1".into(),
        peer_asn: 64513,
        peer_port: 179,
        ebgp_multihop_ttl: 1,
        connect_retry_time_seconds: 120,
        hold_time_seconds: 9,
        keep_alive_time_seconds: 3,
        graceful_restart: Some(GracefulRestart {
            enabled: true,
            restart_time_seconds: 120,
        }),
        auth_secret_ref: Some("rack1-bgp-password".into()),
    }
}

fn service_ad(prefix: &str, source: AdvertisementSource, svc: &str) -> Advertisement {
    Advertisement {
        prefix: prefix.into(),
        source,
        services: vec![svc.into()],
        communities: vec!["65000:200".into()],
        large_communities: vec![],
    }
}

fn pod_cidr_ad(prefix: &str) -> Advertisement {
    Advertisement {
        prefix: prefix.into(),
        source: AdvertisementSource::PodCIDR,
        services: vec![],
        communities: vec!["65000:100".into()],
        large_communities: vec!["65000:1:2".into()],
    }
}

fn expected(node: &str, router_id: &str, advertisements: Vec<Advertisement>) -> BGPNodeConfigSpec {
    BGPNodeConfigSpec {
        node_name: node.into(),
        revision: 0,
        routers: vec![NodeRouter {
            local_asn: 64512,
            router_id: router_id.into(),
            neighbors: vec![neighbor()],
            advertisements,
        }],
    }
}

fn without_revision(spec: &BGPNodeConfigSpec) -> BGPNodeConfigSpec {
    BGPNodeConfigSpec {
        revision: 0,
        ..spec.clone()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test]
async fn bgp_policies_translate_into_node_configs() -> Result<()> {
    let plane = ControlPlane::dedicated("bgp").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let ns = env.namespace().to_string();
    let services: Api<Service> = env.api();
    let slices: Api<EndpointSlice> = env.api();
    let nns: Api<NodeNetwork> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let configs: Api<BGPNodeConfig> = Api::all(client.clone());
    let policies: Api<BGPPeeringPolicy> = Api::all(client.clone());

    // Three nodes, two in rack r1; pod CIDRs as the IPAM concern writes them.
    let n1 = env.unique_name("bgp-n1");
    let n2 = env.unique_name("bgp-n2");
    let n3 = env.unique_name("bgp-n3");
    for (i, (name, rack)) in [(&n1, "r1"), (&n2, "r1"), (&n3, "r2")]
        .into_iter()
        .enumerate()
    {
        create_node(
            &env,
            name,
            &[("InternalIP", &format!("172.18.0.{}", i + 2))],
        )
        .await?;
        env.delete_on_drop::<NodeNetwork>(name);
        env.delete_on_drop::<BGPNodeConfig>(name);
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"rack": rack}}})),
            )
            .await?;
        nns.patch(
            name,
            &PatchParams::apply("e2e-ipam").force(),
            &Patch::Apply(json!({
                "apiVersion": "tendril.dev/v1alpha1", "kind": "NodeNetwork",
                "metadata": {"name": name},
                "spec": {"podCIDRs": [format!("10.244.{}.0/24", i + 1)]},
            })),
        )
        .await?;
    }

    // web: Cluster policy, an LB IP and an external IP; local: Local policy, its only
    // ready backend on n2; quiet: not selected by the policy.
    let mut web = lb_service(&ns, "web", false, true)?;
    web.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.10".into()]);
    apply(&services, &web).await?;
    apply(&services, &lb_service(&ns, "local", true, true)?).await?;
    apply(&services, &lb_service(&ns, "quiet", false, false)?).await?;
    set_ingress(&services, "web", &["198.51.100.10"]).await?;
    set_ingress(&services, "local", &["198.51.100.20"]).await?;
    set_ingress(&services, "quiet", &["198.51.100.30"]).await?;
    apply(&slices, &slice(&ns, "local", &[(&n1, false), (&n2, true)])?).await?;

    let port = free_port()?;
    let mut operator = start_operator(&env, port)?;
    operator.wait_for_log("caches synced", TIMEOUT).await?;

    let policy_name = env.unique_name("rack1");
    env.delete_on_drop::<BGPPeeringPolicy>(&policy_name);
    let policy_body = |name: &str, peer_asn: i64| {
        json!({
            "apiVersion": "tendril.dev/v1alpha1", "kind": "BGPPeeringPolicy",
            "metadata": {"name": name},
            "spec": {
                "nodeSelector": {"matchLabels": {"rack": "r1"}},
                "virtualRouters": [{
                    "localASN": 64512,
                    "advertisements": [
                        {"advertisementType": "PodCIDR",
                         "communities": {"standard": ["65000:100"], "large": ["65000:1:2"]}},
                        {"advertisementType": "Service",
                         "addresses": ["LoadBalancerIP", "ExternalIP"],
                         "selector": {"matchLabels": {"announce": "bgp"}},
                         "communities": {"standard": ["65000:200"]}},
                    ],
                    "neighbors": [{
                        "peerAddress": "192.0.2.1/32", "peerASN": peer_asn,
                        "holdTimeSeconds": 9, "keepAliveTimeSeconds": 3,
                        "gracefulRestart": {"enabled": true},
                        "authSecretRef": "rack1-bgp-password",
                    }],
                }],
            },
        })
    };
    apply(
        &policies,
        &typed::<BGPPeeringPolicy>(policy_body(&policy_name, 64513))?,
    )
    .await?;

    // Exactly these configs: n1 without the Local service's LB IP, n2 with it, n3 none.
    let web_key = format!("{ns}/web");
    let local_key = format!("{ns}/local");
    let want_n1 = expected(
        &n1,
        "172.18.0.2",
        vec![
            pod_cidr_ad("10.244.1.0/24"),
            service_ad(
                "198.51.100.10/32",
                AdvertisementSource::LoadBalancerIP,
                &web_key,
            ),
            service_ad("203.0.113.10/32", AdvertisementSource::ExternalIP, &web_key),
        ],
    );
    let want_n2 = expected(
        &n2,
        "172.18.0.3",
        vec![
            pod_cidr_ad("10.244.2.0/24"),
            service_ad(
                "198.51.100.10/32",
                AdvertisementSource::LoadBalancerIP,
                &web_key,
            ),
            service_ad(
                "198.51.100.20/32",
                AdvertisementSource::LoadBalancerIP,
                &local_key,
            ),
            service_ad("203.0.113.10/32", AdvertisementSource::ExternalIP, &web_key),
        ],
    );
    let c1 = {
        let want = want_n1.clone();
        config(&configs, &n1, "the n1 config", move |c| {
            without_revision(&c.spec) == want
        })
        .await?
    };
    let c2 = {
        let want = want_n2.clone();
        config(&configs, &n2, "the n2 config", move |c| {
            without_revision(&c.spec) == want
        })
        .await?
    };
    for c in [&c1, &c2] {
        ensure!(c.spec.revision >= 1, "revision {}", c.spec.revision);
        let owners = c.metadata.owner_references.clone().unwrap_or_default();
        ensure!(
            owners.len() == 1 && owners[0].kind == "Node" && owners[0].name == c.spec.node_name,
            "owner of {}: {owners:?}",
            c.spec.node_name
        );
        ensure!(
            c.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(BGP_CHANGED_AT_ANNOTATION)),
            "no {BGP_CHANGED_AT_ANNOTATION}"
        );
    }
    ensure!(
        configs.get_opt(&n3).await?.is_none(),
        "n3 is not selected but has a config"
    );
    let p = policy_status(&policies, &policy_name, "selects 2 nodes", |p| {
        p.status.as_ref().and_then(|s| s.selected_nodes) == Some(2)
            && valid(p).is_some_and(|(s, _, _)| s == "True")
    })
    .await?;
    ensure!(
        p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation,
        "observedGeneration: {:?}",
        p.status
    );

    // The Local service's ready backend moves from n2 to n1: so does its LB IP.
    apply(&slices, &slice(&ns, "local", &[(&n1, true), (&n2, false)])?).await?;
    let c1b = config(&configs, &n1, "the Local LB IP on n1", |c| {
        prefixes(c).contains(&"198.51.100.20/32".to_string())
    })
    .await?;
    let c2b = config(&configs, &n2, "the Local LB IP withdrawn from n2", |c| {
        !prefixes(c).contains(&"198.51.100.20/32".to_string())
    })
    .await?;
    ensure!(
        c2b.spec.revision == c2.spec.revision + 1,
        "n2 revision {} after one change from {}",
        c2b.spec.revision,
        c2.spec.revision
    );

    // A change BGP does not read (an annotation on a Service; a not-ready endpoint moving)
    // writes nothing: the next real change is exactly one revision up.
    services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"note": "irrelevant"}}})),
        )
        .await?;
    apply(&slices, &slice(&ns, "local", &[(&n1, true), (&n3, false)])?).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = configs.get(&n2).await?.spec.revision;
    ensure!(
        before == c2b.spec.revision,
        "n2 rewritten by a no-op: {before}"
    );
    let n1_revision = configs.get(&n1).await?.spec.revision;
    ensure!(
        n1_revision == c1b.spec.revision,
        "n1 rewritten by a no-op: {n1_revision}"
    );

    // LB IP changes of `web`: time from the Service status write to both configs.
    let mut took = Vec::new();
    for i in 0..LB_CHANGES {
        let ip = format!("198.51.100.{}", 100 + i);
        let prefix = format!("{ip}/32");
        let started = Instant::now();
        set_ingress(&services, "web", &[&ip]).await?;
        for n in [&n1, &n2] {
            let prefix = prefix.clone();
            config(&configs, n, "the new web LB IP", move |c| {
                let p = prefixes(c);
                p.contains(&prefix) && !p.contains(&"198.51.100.10/32".to_string())
            })
            .await?;
        }
        took.push(started.elapsed());
    }
    took.sort();
    println!(
        "BGP: Service LB IP change -> both BGPNodeConfigs updated: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over {LB_CHANGES} changes (debounce 50 ms included)",
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        percentile(&took, 0.9).as_secs_f64() * 1e3,
        took.last().unwrap().as_secs_f64() * 1e3,
    );
    let c2 = configs.get(&n2).await?;
    ensure!(
        c2.spec.revision == before + LB_CHANGES as i64,
        "n2 revision {} after {LB_CHANGES} changes from {before}",
        c2.spec.revision
    );

    // A deleted Service is withdrawn.
    services.delete("web", &DeleteParams::default()).await?;
    let last_web = format!("198.51.100.{}/32", 100 + LB_CHANGES - 1);
    for n in [&n1, &n2] {
        let last_web = last_web.clone();
        config(&configs, n, "web withdrawn", move |c| {
            let p = prefixes(c);
            !p.contains(&last_web) && !p.contains(&"203.0.113.10/32".to_string())
        })
        .await?;
    }

    // n2 loses its label: its config goes, the policy selects one node.
    nodes
        .patch(
            &n2,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"rack": "r9"}}})),
        )
        .await?;
    wait_deleted(&configs, &n2, TIMEOUT)
        .await
        .context("n2's config after it lost its label")?;
    policy_status(&policies, &policy_name, "selects 1 node", |p| {
        p.status.as_ref().and_then(|s| s.selected_nodes) == Some(1)
    })
    .await?;

    // A second policy defines the same peer with another ASN: both invalid, an Event, n1
    // left as it was.
    let c1 = configs.get(&n1).await?;
    let other = env.unique_name("rack1-other");
    env.delete_on_drop::<BGPPeeringPolicy>(&other);
    apply(
        &policies,
        &typed::<BGPPeeringPolicy>(policy_body(&other, 65099))?,
    )
    .await?;
    for name in [&policy_name, &other] {
        policy_status(&policies, name, "Valid=False Conflict", |p| {
            valid(p).is_some_and(|(s, r, m)| {
                s == "False" && r == "Conflict" && m.contains("peer 192.0.2.1")
            })
        })
        .await?;
    }
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(TIMEOUT, || async {
        let list = events.list(&ListParams::default()).await?;
        ensure!(
            list.items.iter().any(|e| {
                e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some("Conflict")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(other.as_str())
            }),
            "no Conflict Event on policy {other}"
        );
        Ok(())
    })
    .await?;
    // A Service change meanwhile is not applied to the held node.
    set_ingress(&services, "local", &["198.51.100.21"]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = configs.get(&n1).await?;
    ensure!(
        held.spec == c1.spec,
        "a held node's config changed: {:?} -> {:?}",
        c1.spec,
        held.spec
    );
    policies.delete(&other, &DeleteParams::default()).await?;
    policy_status(&policies, &policy_name, "Valid again", |p| {
        valid(p).is_some_and(|(s, _, _)| s == "True")
    })
    .await?;
    let c1 = config(&configs, &n1, "the change made while held", |c| {
        prefixes(c).contains(&"198.51.100.21/32".to_string())
    })
    .await?;

    // Deleted by hand: back, with a higher revision.
    configs.delete(&n1, &DeleteParams::default()).await?;
    let revision = c1.spec.revision;
    let back = config(&configs, &n1, "put back", move |c| {
        c.spec.revision > revision
    })
    .await?;
    ensure!(
        without_revision(&back.spec) == without_revision(&c1.spec),
        "put back differently: {:?}",
        back.spec
    );

    let metrics = fetch_metrics(port).await?;
    ensure!(
        metrics.value("tendril_bgp_node_configs", &[]) == Some(1.0),
        "tendril_bgp_node_configs: {:?}",
        metrics.value("tendril_bgp_node_configs", &[])
    );
    ensure!(
        metrics.value("tendril_bgp_advertisements", &[("source", "PodCIDR")]) == Some(1.0),
        "advertisements: {:?}",
        metrics.value("tendril_bgp_advertisements", &[("source", "PodCIDR")])
    );
    ensure!(
        metrics.sum("tendril_bgp_node_config_writes_total", &[]) >= 1.0,
        "no writes counted"
    );
    operator.stop(Duration::from_secs(10));

    // A restarted operator rewrites nothing: the next change is exactly one revision up.
    let revision = configs.get(&n1).await?.spec.revision;
    let mut operator = start_operator(&env, free_port()?)?;
    operator.wait_for_log("caches synced", TIMEOUT).await?;
    set_ingress(&services, "local", &["198.51.100.22"]).await?;
    let after = config(&configs, &n1, "the change after a restart", |c| {
        prefixes(c).contains(&"198.51.100.22/32".to_string())
    })
    .await?;
    ensure!(
        after.spec.revision == revision + 1,
        "revision {} after a restart and one change, want {}",
        after.spec.revision,
        revision + 1
    );
    operator.stop(Duration::from_secs(10));
    Ok(())
}
