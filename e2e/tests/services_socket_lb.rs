//! Issue 12, the node side: services translated by the socket LB, with real connections.
//!
//! One dedicated plane, two simulated nodes (real operator, agents, CNI), each node's agent
//! attached to the node's own cgroup (`<cgroup2>/tendril-sim/<node>`); every client process
//! runs in its pod's (or node's) netns and in that cgroup. Backends `web-a` (node 0) and
//! `web-b` (node 1) run echo servers; `client` runs on node 0.
//!
//! The LBServices are written directly by the test (no Service behind them: the services
//! concern leaves hand-written LBServices alone and the agents program them as written), and
//! every change is followed until each node reports `realizedServicesRevision` >= its
//! revision. Checked:
//! - pod → ClusterIP reaches both the same-node and the other-node backend, over TCP and
//!   UDP (connected, and unconnected with the answers shown from the frontend);
//! - node → ClusterIP (a process of the node's host network) is translated too;
//! - a service without backends refuses the connect (ECONNREFUSED), a NodePort answers on
//!   the node's address and on loopback from the node;
//! - ClientIP affinity keeps one client on one backend;
//! - established connections survive a backend removal (and new ones never go to the
//!   removed backend once realized) and an agent restart (SIGKILL) under traffic;
//! - an operator restart (SIGKILL) under traffic to a real Service it translated: nothing
//!   drops, nothing is rewritten, the next change is programmed;
//! - `NodeNetwork` reports `SocketLB=True` and the agent's metrics count the services and
//!   observe their network programming duration (from `tendril.dev/service-changed-at`);
//! - hairpin: a backend reaches itself through its service;
//! - policy is judged on the backend after translation: an egress policy allowing only
//!   web-a passes a service backed by web-a and drops one backed by web-b.
//!
//! Needs root.

mod services_common;

use std::net::IpAddr;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams};
use services_common::*;
use tendril_crds::v1alpha1::{LBService, NodeNetwork};
use tendril_e2e::{eventually, fetch_metrics};

const UDP_IP: &str = "10.96.77.13";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socket_lb_translates_service_connections() -> Result<()> {
    let world = World::start("services-socket-lb").await?;
    let (node0, node1) = (
        world.cluster.nodes[0].name.clone(),
        world.cluster.nodes[1].name.clone(),
    );
    let (a, b, me) = (world.ip("web-a"), world.ip("web-b"), world.ip("client"));

    // Revision 1: a ClusterIP + NodePort service over both backends, one without backends,
    // one with affinity.
    world
        .apply(lb_service(
            "echo",
            1,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(CLUSTER_IP), 80), frontend("NodePort", None, NODE_PORT)],
                "backends": [backend(a, &node0), backend(b, &node1)],
            }),
        ))
        .await?;
    world
        .apply(lb_service(
            "empty",
            2,
            serde_json::json!({ "frontends": [frontend("ClusterIP", Some(EMPTY_IP), 80)] }),
        ))
        .await?;
    world
        .apply(lb_service(
            "sticky",
            3,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(AFFINITY_IP), 80)],
                "backends": [backend(a, &node0), backend(b, &node1)],
                "sessionAffinity": { "clientIP": { "timeoutSeconds": 300 } },
            }),
        ))
        .await?;
    world.wait_realized(3).await?;

    // The node reports its socket LB.
    let api: Api<NodeNetwork> = Api::all(world.env.client());
    for node in &world.cluster.nodes {
        let nn = api.get(&node.name).await?;
        let conditions = nn.status.map(|s| s.conditions).unwrap_or_default();
        let socket_lb = conditions.iter().find(|c| c.type_ == "SocketLB");
        ensure!(
            socket_lb.is_some_and(|c| c.status == "True"),
            "{}: SocketLB condition {socket_lb:?}",
            node.name
        );
        let metrics = fetch_metrics(node.metrics_port).await?;
        ensure!(
            metrics.value("tendril_services_socket_lb_enabled", &[]) == Some(1.0),
            "socket LB metric"
        );
        let programming = metrics
            .value(
                "tendril_services_network_programming_duration_seconds_count",
                &[],
            )
            .unwrap_or(0.0);
        ensure!(
            programming >= 3.0,
            "{}: network programming observed {programming} times",
            node.name
        );
        // The test's three and default/kubernetes (the operator's services concern).
        ensure!(
            metrics.value("tendril_services_programmed", &[]) == Some(4.0),
            "services programmed: {:?}",
            metrics.value("tendril_services_programmed", &[])
        );
    }

    // Pod → ClusterIP: both backends (same node and other node) answer.
    let client = &world.pods["client"];
    for _ in 0..30 {
        ensure!(connect(client, CLUSTER_IP, 80).await?, "ClusterIP refused");
    }
    let (to_a, to_b) = world.accepted(me);
    ensure!(
        to_a + to_b == 30 && to_a > 0 && to_b > 0,
        "30 connects spread over both backends: web-a {to_a}, web-b {to_b}"
    );

    // UDP: the same frontend over UDP reaches both backends (connected sockets, connect4).
    world
        .apply(lb_service(
            "echo-udp",
            4,
            serde_json::json!({
                "frontends": [{ "name": "echo", "type": "ClusterIP", "address": UDP_IP, "port": 53, "protocol": "UDP" }],
                "backends": [
                    { "portName": "echo", "address": a.to_string(), "port": PORT, "protocol": "UDP", "nodeName": node0 },
                    { "portName": "echo", "address": b.to_string(), "port": PORT, "protocol": "UDP", "nodeName": node1 },
                ],
            }),
        ))
        .await?;
    world.wait_realized(4).await?;
    for _ in 0..20 {
        ensure!(
            udp_exchange(client, UDP_IP, 53).await?,
            "UDP ClusterIP: no echo"
        );
    }
    let (udp_a, udp_b) = (
        world.servers["web-a"].udp_received(me),
        world.servers["web-b"].udp_received(me),
    );
    ensure!(
        udp_a + udp_b == 20 && udp_a > 0 && udp_b > 0,
        "20 UDP exchanges spread over both backends: web-a {udp_a}, web-b {udp_b}"
    );

    // Unconnected UDP: each datagram translated, the answers shown from the frontend.
    for _ in 0..5 {
        ensure!(
            udp_sendto_exchange(client, UDP_IP, 53).await?,
            "unconnected UDP: no answer from the frontend address"
        );
    }

    // Node → ClusterIP and NodePort (node address and loopback), from node 0's host network.
    let node = &world.cluster.nodes[0];
    for target in [
        (CLUSTER_IP.to_string(), 80),
        (node.address.to_string(), NODE_PORT),
        ("127.0.0.1".to_string(), NODE_PORT),
        (world.cluster.nodes[1].address.to_string(), NODE_PORT),
    ] {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && echo hi >&3 && read -t 5 l <&3 && [ \"$l\" = hi ]",
            target.0, target.1
        );
        let out = node.exec(&["timeout", "10", "bash", "-c", &script]).await?;
        ensure!(
            out.status.success(),
            "node → {}:{}: {}",
            target.0,
            target.1,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // No backends: refused at connect.
    ensure!(
        !connect(client, EMPTY_IP, 80).await?,
        "a service without backends must refuse"
    );

    // Affinity: one client, one backend.
    let before = world.accepted(me);
    for _ in 0..10 {
        ensure!(
            connect(client, AFFINITY_IP, 80).await?,
            "affinity service refused"
        );
    }
    let after = world.accepted(me);
    let (da, db) = (after.0 - before.0, after.1 - before.1);
    ensure!(
        (da, db) == (10, 0) || (da, db) == (0, 10),
        "affinity: web-a {da}, web-b {db}"
    );

    // Steady connections, then web-b removed: every one keeps echoing, and no new
    // connection reaches web-b once realized.
    let mut steady = Vec::new();
    for _ in 0..6 {
        steady.push(Steady::start(client, CLUSTER_IP, 80)?);
    }
    for s in &mut steady {
        s.wait_more_than(0).await?;
    }
    world
        .apply(lb_service(
            "echo",
            5,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(CLUSTER_IP), 80), frontend("NodePort", None, NODE_PORT)],
                "backends": [backend(a, &node0)],
            }),
        ))
        .await?;
    world.wait_realized(5).await?;
    let before = world.accepted(me);
    for _ in 0..20 {
        ensure!(connect(client, CLUSTER_IP, 80).await?, "ClusterIP refused");
    }
    let after = world.accepted(me);
    ensure!(
        after.1 == before.1 && after.0 == before.0 + 20,
        "after web-b's removal: web-a +{}, web-b +{}",
        after.0 - before.0,
        after.1 - before.1
    );
    for s in &mut steady {
        let n = s.echoes();
        s.wait_more_than(n).await?;
    }

    // Agent restart (SIGKILL) under traffic: established connections keep echoing, new ones
    // keep being translated, while it is down and after.
    let mut world = world;
    let echoes: Vec<u64> = steady.iter().map(Steady::echoes).collect();
    world.cluster.nodes[0].kill_agent();
    for (s, n) in steady.iter_mut().zip(&echoes) {
        s.wait_more_than(*n).await?;
    }
    ensure!(
        connect(&world.pods["client"], CLUSTER_IP, 80).await?,
        "ClusterIP while the agent is down"
    );
    world.cluster.nodes[0].start_agent()?;
    world.cluster.nodes[0]
        .wait_ready(&world.env.client())
        .await?;
    world
        .apply(lb_service(
            "echo",
            6,
            serde_json::json!({
                "frontends": [frontend("ClusterIP", Some(CLUSTER_IP), 80), frontend("NodePort", None, NODE_PORT)],
                "backends": [backend(a, &node0), backend(b, &node1)],
            }),
        ))
        .await?;
    world.wait_realized(6).await?;
    let echoes: Vec<u64> = steady.iter().map(Steady::echoes).collect();
    for (s, n) in steady.iter_mut().zip(&echoes) {
        s.wait_more_than(*n).await?;
    }
    let before = world.accepted(me);
    for _ in 0..20 {
        ensure!(
            connect(&world.pods["client"], CLUSTER_IP, 80).await?,
            "ClusterIP after the restart"
        );
    }
    let after = world.accepted(me);
    ensure!(
        after.1 > before.1 && after.0 > before.0,
        "web-b back after the restart: web-a +{}, web-b +{}",
        after.0 - before.0,
        after.1 - before.1
    );
    drop(steady);

    // The operator killed (SIGKILL) and restarted under live traffic to a Service it
    // translated (a real Service and EndpointSlice): connections keep echoing and new ones
    // connect while it is down; the new process rewrites nothing (same generation and
    // revision, no LBService write counted), and programs the next change.
    let ns = world.env.namespace().to_string();
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: restart, namespace: {ns}}}\n\
             spec: {{ports: [{{port: 80, targetPort: {PORT}, protocol: TCP}}]}}\n"
        ))
        .await?;
    let slice = |endpoints: &[(IpAddr, &str)]| {
        let endpoints: String = endpoints
            .iter()
            .map(|(ip, node)| {
                format!(
                    "- {{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}}}\n"
                )
            })
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: restart-1, namespace: {ns}, labels: {{kubernetes.io/service-name: restart}}}}\n\
             addressType: IPv4\nports: [{{name: \"\", protocol: TCP, port: {PORT}}}]\nendpoints:\n{endpoints}"
        )
    };
    world
        .env
        .apply_yaml(&slice(&[(a, &node0), (b, &node1)]))
        .await?;
    let lbs: Api<LBService> = Api::namespaced(world.env.client(), &ns);
    let translated = |backends: usize| {
        let lbs = lbs.clone();
        async move {
            eventually(TIMEOUT, || async {
                let lb = lbs.get_opt("restart").await?.context("no LBService yet")?;
                ensure!(
                    lb.spec.backends.len() == backends,
                    "{} backends, waiting for {backends}",
                    lb.spec.backends.len()
                );
                Ok(lb)
            })
            .await
        }
    };
    let before = translated(2).await?;
    world.wait_realized(before.spec.revision).await?;
    let services: Api<Service> = Api::namespaced(world.env.client(), &ns);
    let restart_ip = services
        .get("restart")
        .await?
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no clusterIP")?;
    let client = &world.pods["client"];
    let mut steady = vec![
        Steady::start(client, &restart_ip, 80)?,
        Steady::start(client, &restart_ip, 80)?,
    ];
    for s in &mut steady {
        s.wait_more_than(0).await?;
    }
    world.cluster.kill_operator();
    let echoes: Vec<u64> = steady.iter().map(Steady::echoes).collect();
    for (s, n) in steady.iter_mut().zip(&echoes) {
        s.wait_more_than(*n).await?;
    }
    for _ in 0..10 {
        ensure!(
            connect(&world.pods["client"], &restart_ip, 80).await?,
            "a Service while the operator is down"
        );
    }
    world.cluster.start_operator().await?;
    let every_service = services_in_cluster(&world).await?;
    let m = eventually(TIMEOUT, || async {
        let m = fetch_metrics(world.cluster.operator_port).await?;
        let done = m.sum(
            "controller_runtime_reconcile_total",
            &[("controller", "services")],
        );
        ensure!(
            done >= every_service,
            "{done}/{every_service} Services reconciled by the new operator"
        );
        Ok(m)
    })
    .await?;
    ensure!(
        m.value("tendril_services_writes_total", &[]) == Some(0.0),
        "the restarted operator rewrote LBServices: {:?} writes",
        m.value("tendril_services_writes_total", &[])
    );
    let after = lbs.get("restart").await?;
    ensure!(
        (after.metadata.generation, after.spec.revision)
            == (before.metadata.generation, before.spec.revision),
        "LBService rewritten by the restart: generation/revision {:?}/{} -> {:?}/{}",
        before.metadata.generation,
        before.spec.revision,
        after.metadata.generation,
        after.spec.revision
    );
    let echoes: Vec<u64> = steady.iter().map(Steady::echoes).collect();
    for (s, n) in steady.iter_mut().zip(&echoes) {
        s.wait_more_than(*n).await?;
    }
    // The next change: web-b leaves the Service; new connections only reach web-a.
    world.env.apply_yaml(&slice(&[(a, &node0)])).await?;
    let changed = translated(1).await?;
    ensure!(changed.spec.revision > before.spec.revision);
    world.wait_realized(changed.spec.revision).await?;
    let before = world.accepted(me);
    for _ in 0..10 {
        ensure!(
            connect(&world.pods["client"], &restart_ip, 80).await?,
            "the Service after the operator's restart"
        );
    }
    let after = world.accepted(me);
    ensure!(
        after == (before.0 + 10, before.1),
        "after web-b left: web-a +{}, web-b +{}",
        after.0 - before.0,
        after.1 - before.1
    );
    drop(steady);

    // Policy is judged on the backend: an egress policy of `client` that allows only
    // web-a lets connections through a service whose backend is web-a and drops those
    // translated to web-b (the service addresses appear in no policy).
    let ns = world.env.namespace().to_string();
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: only-web-a, namespace: {ns}}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  policyTypes: [Egress]\n\
             \x20 egress:\n  - to: [{{podSelector: {{matchLabels: {{app: web-a}}}}}}]\n\
             \x20   ports: [{{protocol: TCP, port: {PORT}}}]\n"
        ))
        .await?;
    for (name, revision, ip, target, node_name) in [
        ("to-a", 7, "10.96.77.20", a, &node0),
        ("to-b", 8, "10.96.77.21", b, &node1),
    ] {
        world
            .apply(lb_service(
                name,
                revision,
                serde_json::json!({
                    "frontends": [frontend("ClusterIP", Some(ip), 80)],
                    "backends": [backend(target, node_name)],
                }),
            ))
            .await?;
    }
    world.wait_realized(8).await?;
    let client = &world.pods["client"];
    eventually(TIMEOUT, || async {
        let script = "exec 3<>/dev/tcp/10.96.77.21/80";
        let denied = !client
            .exec(&["timeout", "3", "bash", "-c", script])
            .await?
            .status
            .success();
        ensure!(denied, "web-b is still reachable through its service");
        Ok(())
    })
    .await?;
    ensure!(
        connect(client, "10.96.77.20", 80).await?,
        "web-a must stay reachable through its service"
    );
    // Hairpin: web-a reaches itself through its service.
    ensure!(
        connect(&world.pods["web-a"], "10.96.77.20", 80).await?,
        "hairpin through the socket LB"
    );
    Ok(())
}

/// How many Services the plane holds (each one a reconcile of a new operator's first pass).
async fn services_in_cluster(world: &World) -> Result<f64> {
    let all: Api<Service> = Api::all(world.env.client());
    Ok(all.list(&ListParams::default()).await?.items.len() as f64)
}
