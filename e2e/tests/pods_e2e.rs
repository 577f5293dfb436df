//! Issue 4 end to end: pods get addresses and identities.
//!
//! One dedicated plane; two simulated nodes (network namespaces on an underlay bridge, one
//! real `tendril-agent` each), the real operator (identity grace period 3 s) and a default
//! `PodIPPool`. Pods are created through the API with `spec.nodeName`, their sandboxes set
//! up by the real `tendril-cni` as a kubelet would, their status written as a kubelet
//! would. Checked: every pod's address is from its node's `NodeNetwork.spec.podCIDRs`;
//! `Endpoint`s carry the pod IPs, node and identity; `Identity` objects carry the security
//! labels; equal labels (whatever the pod-template-hash) share an identity, another
//! namespace makes another; pods on one node ping each other; a recreated sandbox gets a
//! new address and the `Endpoint` follows (next revision); deleting a pod runs CNI DEL,
//! frees its address (agent metrics and state dir), removes its host route and `Endpoint`,
//! and its now unreferenced identity is collected after the grace period. Needs root.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use ipnet::IpNet;
use kube::Client;
use kube::api::Api;
use tendril_crds::v1alpha1::{Endpoint, Identity, NodeNetwork};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimPod, ip};
use tendril_e2e::{ControlPlane, TestEnv, wait_deleted, wait_for};

const TIMEOUT: Duration = Duration::from_secs(90);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn endpoint_with_identity(client: &Client, pod: &SimPod) -> Result<Endpoint> {
    let api: Api<Endpoint> = Api::namespaced(client.clone(), &pod.namespace);
    wait_for(
        &api,
        &pod.name,
        |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.identity.is_some()),
        TIMEOUT,
    )
    .await?
    .context("Endpoint gone")
}

#[tokio::test]
async fn pods_get_addresses_endpoints_and_identities() -> Result<()> {
    let plane = ControlPlane::dedicated("pods-e2e").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let other = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            identity_grace_seconds: 3,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);

    // The nodes' pod CIDRs, as the ipam concern wrote them.
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let mut cidrs = Vec::new();
    for node in [n0, n1] {
        let nn = networks.get(&node.name).await?;
        let node_cidrs: Vec<IpNet> = nn
            .spec
            .pod_cidrs
            .iter()
            .map(|c| c.parse())
            .collect::<Result<_, _>>()?;
        assert_eq!(node_cidrs.len(), 1, "{:?}", nn.spec.pod_cidrs);
        cidrs.push(node_cidrs[0]);
    }
    assert_ne!(cidrs[0], cidrs[1], "nodes share a pod CIDR");

    let ns = env.namespace();
    let ns2 = other.namespace();
    let web = |hash: &str| labels(&[("app", "web"), ("pod-template-hash", hash)]);
    let web_a = SimPod::run(&client, n0.handle(), ns, "web-a", &web("aaa")).await?;
    let web_b = SimPod::run(&client, n0.handle(), ns, "web-b", &web("bbb")).await?;
    let web_c = SimPod::run(&client, n1.handle(), ns, "web-c", &web("ccc")).await?;
    let client_pod = SimPod::run(
        &client,
        n0.handle(),
        ns,
        "client",
        &labels(&[("app", "client")]),
    )
    .await?;
    let web_x = SimPod::run(&client, n1.handle(), ns2, "web-x", &web("aaa")).await?;
    let pods = [&web_a, &web_b, &web_c, &client_pod, &web_x];

    // Addresses from the node's own CIDR, all distinct.
    let mut seen = Vec::new();
    for pod in pods {
        let cidr = if pod.node == n0.name {
            cidrs[0]
        } else {
            cidrs[1]
        };
        assert_eq!(pod.ips.len(), 1, "{pod:?}");
        assert!(
            cidr.contains(&pod.ips[0]),
            "{}/{} got {} outside its node's {cidr}",
            pod.namespace,
            pod.name,
            pod.ips[0]
        );
        assert!(
            !seen.contains(&pod.ips[0]),
            "{} handed out twice",
            pod.ips[0]
        );
        seen.push(pod.ips[0]);
    }
    println!(
        "pods: {}",
        pods.iter()
            .map(|p| format!("{}/{}={}@{}", p.namespace, p.name, p.ips[0], p.node))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Endpoints with the pod's IPs, node and an identity; Identity objects with the labels.
    let identities: Api<Identity> = Api::all(client.clone());
    let mut ids = BTreeMap::new();
    for pod in pods {
        let ep = endpoint_with_identity(&client, pod).await?;
        let ips: Vec<IpAddr> = ep
            .spec
            .ips
            .iter()
            .map(|i| i.parse())
            .collect::<Result<_, _>>()?;
        assert_eq!(ips, pod.ips, "Endpoint {}/{}", pod.namespace, pod.name);
        assert_eq!(ep.spec.node, pod.node);
        let id = ep.spec.identity.expect("waited for it");
        assert!(id >= 256, "cluster-local identity expected, got {id}");
        let identity = identities.get(&id.to_string()).await?;
        assert_eq!(identity.spec.security_labels, ep.spec.security_labels);
        let l = &identity.spec.security_labels;
        assert_eq!(
            l.get("k8s:io.kubernetes.pod.namespace").map(String::as_str),
            Some(pod.namespace.as_str())
        );
        assert!(l.contains_key("k8s:app"), "{l:?}");
        assert!(!l.keys().any(|k| k.contains("pod-template-hash")), "{l:?}");
        ids.insert(format!("{}/{}", pod.namespace, pod.name), id);
    }
    let id = |p: &SimPod| ids[&format!("{}/{}", p.namespace, p.name)];
    assert_eq!(id(&web_a), id(&web_b), "same labels, other hash");
    assert_eq!(id(&web_a), id(&web_c), "same labels, other node");
    assert_ne!(id(&web_a), id(&client_pod), "other labels");
    assert_ne!(id(&web_a), id(&web_x), "same labels, other namespace");
    println!("identities: {ids:?}");

    // Same-node connectivity through the node's host routes (cross-node needs the eBPF
    // datapath, issue 5).
    assert!(web_a.ping(web_b.ips[0]).await?, "web-a cannot ping web-b");
    assert!(
        client_pod.ping(web_a.ips[0]).await?,
        "client cannot ping web-a"
    );
    assert!(web_c.ping(web_c.ips[0]).await?, "web-c cannot ping itself");

    // The kubelet recreates a dead sandbox: the old address is freed, the new one from the
    // same node's CIDR, and the Endpoint follows (next revision, same identity).
    let mut web_b = web_b;
    let old_ip = web_b.ips[0];
    let old_endpoint = endpoint_with_identity(&client, &web_b).await?;
    let old_revision = old_endpoint.spec.revision;
    web_b.recreate_sandbox(&client, n0.handle()).await?;
    assert!(cidrs[0].contains(&web_b.ips[0]));
    assert_ne!(
        web_b.ips[0], old_ip,
        "the new sandbox got the old address: the Endpoint check below would prove nothing"
    );
    let api: Api<Endpoint> = Api::namespaced(client.clone(), ns);
    let new_ips = vec![web_b.ips[0].to_string()];
    let ep = wait_for(
        &api,
        &web_b.name,
        |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.ips == new_ips),
        TIMEOUT,
    )
    .await?
    .context("Endpoint gone")?;
    // A recreated Endpoint (another uid) would start again at revision 1: say so, it is a
    // deletion every node saw, not a lost increment.
    assert_eq!(
        ep.spec.revision,
        old_revision + 1,
        "Endpoint before: uid {:?} created {:?}; after: uid {:?} created {:?}; the operator on {}:\n{}",
        old_endpoint.metadata.uid,
        old_endpoint.metadata.creation_timestamp,
        ep.metadata.uid,
        ep.metadata.creation_timestamp,
        web_b.name,
        cluster
            .operator
            .log()
            .lines()
            .filter(|l| l.contains(&web_b.name))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(ep.spec.identity, Some(id(&web_a)));
    assert!(
        web_a.ping(web_b.ips[0]).await?,
        "web-a cannot ping the new web-b"
    );

    // Deleting a pod: CNI DEL frees the address and the host route, the Endpoint goes, and
    // the identity no one else uses is collected after the 3 s grace period.
    n0.wait_ips_in_use(3.0).await?;
    assert_eq!(n0.allocation_records()?.len(), 3);
    let client_ip = client_pod.ips[0];
    let client_id = id(&client_pod);
    let client_name = client_pod.name.clone();
    let retries = client_pod.delete(&client, n0.handle()).await?;
    assert_eq!(retries, 0);
    assert_eq!(
        n0.allocation_records()?.len(),
        2,
        "DEL left the record on disk"
    );
    n0.wait_ips_in_use(2.0).await?;
    let routes = ip(&["-n", &n0.netns, "route", "show", &format!("{client_ip}/32")]).await?;
    assert!(routes.trim().is_empty(), "host route left: {routes}");
    let endpoints: Api<Endpoint> = Api::namespaced(client.clone(), ns);
    wait_deleted(&endpoints, &client_name, TIMEOUT).await?;
    wait_deleted(&identities, &client_id.to_string(), TIMEOUT).await?;
    assert!(
        identities.get_opt(&id(&web_a).to_string()).await?.is_some(),
        "a referenced identity was collected"
    );

    // The rest go the same way; both agents end with nothing allocated.
    for pod in [web_a, web_b] {
        pod.delete(&client, n0.handle()).await?;
    }
    for pod in [web_c, web_x] {
        pod.delete(&client, n1.handle()).await?;
    }
    for node in [n0, n1] {
        node.wait_ips_in_use(0.0).await?;
        assert!(node.allocation_records()?.is_empty());
    }
    Ok(())
}
