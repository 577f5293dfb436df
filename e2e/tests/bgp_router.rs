//! Issue 13, the node side: each simulated node's agent runs gobgpd and peers with a
//! top-of-rack router on the underlay running BIRD 2 (an independent implementation);
//! everything is asserted from BIRD's own `birdc` output.
//!
//! Two nodes (`services_common`'s world: backends `web-a` on node 0, `web-b` on node 1).
//! The BGPNodeConfigs are written by the test, as the operator's BGP concern would write
//! them (it leaves configs no Node owns alone): node 0 advertises its pod CIDR, the
//! Cluster-policy LB IP and the Local-policy LB IP (its local backend `web-a` is the only
//! one); node 1 its pod CIDR and the Cluster LB IP. Checked, in order:
//! - sessions Established at BIRD, and in `BGPNodeConfig.status` (realized revision, the
//!   router's offered prefix received, prefixes advertised) and `tendril_bgp_*`;
//! - each pod CIDR via its node only; the Cluster LB IP via both nodes (ECMP: one kernel
//!   route with two next hops at the router), the Local LB IP via node 0 only;
//! - a client namespace behind the router reaches both LB IPs, answered by the backends;
//! - time from a BGPNodeConfig change to the route at BIRD (added and withdrawn), p50;
//! - an advertisement removed is withdrawn (ECMP shrinks to one next hop);
//! - gobgpd killed: the agent restarts it and re-applies; graceful restart keeps node 0's
//!   routes at BIRD all along;
//! - the agent killed (its gobgpd dies with it): BIRD keeps node 0's routes past the hold
//!   time (graceful restart), the restarted agent re-establishes and re-advertises;
//! - node 1 disappears from the underlay (link down, no TCP close): its routes are
//!   withdrawn once the hold time expires; back, they return;
//! - node 0's BGPNodeConfig deleted: gobgpd stops with a Cease, BIRD withdraws at once.
//!
//! A second scenario drives the same world from intent: a `LoadBalancerIPPool`, a
//! `BGPPeeringPolicy` and LoadBalancer `Service`s, through the operator's LB IPAM, BGP and
//! services concerns to the agents and BIRD: pod CIDRs, a Cluster Service's LB IP via both
//! nodes, a Local one via the node with its backend only, the client reaching both; for new
//! Services the time to the LB IP in status, to the route at BIRD and to the first answered
//! connection from the client; the withdrawal when the pool shrinks and when a Service is
//! deleted.
//!
//! A third scenario gives node 0's session a TCP MD5 password (BIRD's `password`, the
//! agent's from a Secret of `tendril-bgp-secrets`): without the Secret the peer is held
//! back with `Realized=False PasswordSecretMissing` naming it; with BIRD's password the
//! session is Established; a wrong password takes it down and keeps it down; the Secret
//! fixed brings it back. The passwords appear nowhere in the status.
//!
//! The scenarios run one after the other (each measures timings).
//!
//! Needs root, `gobgpd` and `bird2` (hack/install-prereqs.sh).

mod services_common;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ipnet::Ipv4Net;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service};
use kube::api::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use services_common::*;
use tendril_crds::v1alpha1::{BGPNodeConfig, BGPPeeringPolicy, LoadBalancerIPPool, NodeNetwork};
use tendril_e2e::bgp::{BirdRouter, Client, OFFERED_PREFIX, RouterPeer, RouterTimers};
use tendril_e2e::sim::ip;
use tendril_e2e::{eventually, fetch_metrics};

const ROUTER_ASN: u32 = 65000;
const NODE_ASN: u32 = 64512;
const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const CLUSTER_LB_IP: &str = "198.51.100.10";
const LOCAL_LB_IP: &str = "198.51.100.11";
const HOLD: u32 = 9;
const KEEPALIVE: u32 = 3;
const RESTART_TIME: u32 = 60;
const WAIT: Duration = Duration::from_secs(90);
const FIELD_MANAGER: &str = "bgp-router-test";
/// Prefixes added (then withdrawn) one at a time to time the node → router path.
const LATENCY_SAMPLES: u8 = 10;

fn host(ip: &str) -> Ipv4Net {
    format!("{ip}/32").parse().unwrap()
}

/// The BGPNodeConfig of `node` (router id `address`) advertising `prefixes`.
fn node_config(
    node: &str,
    address: Ipv4Addr,
    revision: i64,
    prefixes: &[(Ipv4Net, &str)],
) -> serde_json::Value {
    let advertisements: Vec<serde_json::Value> = prefixes
        .iter()
        .map(|(prefix, source)| {
            let mut a = serde_json::json!({ "prefix": prefix.to_string(), "source": source });
            if *source == "LoadBalancerIP" {
                a["communities"] = serde_json::json!(["65000:100"]);
            }
            a
        })
        .collect();
    serde_json::json!({
        "apiVersion": "tendril.dev/v1alpha1",
        "kind": "BGPNodeConfig",
        "metadata": { "name": node },
        "spec": {
            "nodeName": node,
            "revision": revision,
            "routers": [{
                "localASN": NODE_ASN,
                "routerID": address.to_string(),
                "neighbors": [{
                    "peerAddress": ROUTER_IP.to_string(),
                    "peerASN": ROUTER_ASN,
                    "holdTimeSeconds": HOLD,
                    "keepAliveTimeSeconds": KEEPALIVE,
                    "connectRetryTimeSeconds": 1,
                    "gracefulRestart": { "enabled": true, "restartTimeSeconds": RESTART_TIME },
                }],
                "advertisements": advertisements,
            }],
        },
    })
}

/// `gobgp ARGS…` against a node's gobgpd (its API socket in the agent's state directory):
/// what the daemon itself says, for failure messages.
async fn gobgp(state_dir: &std::path::Path, args: &[&str]) -> String {
    let socket = state_dir.join("bgp").join("gobgpd.sock");
    match tokio::process::Command::new("gobgp")
        .arg("--target")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .await
    {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("gobgp: {e}"),
    }
}

/// A node's BGP state as the test drives it.
struct NodeBgp {
    name: String,
    state_dir: std::path::PathBuf,
    address: Ipv4Addr,
    pod_cidr: Ipv4Net,
    prefixes: Vec<(Ipv4Net, &'static str)>,
    revision: i64,
}

impl NodeBgp {
    async fn apply(&mut self, api: &Api<BGPNodeConfig>) -> Result<()> {
        self.revision += 1;
        let mut prefixes = vec![(self.pod_cidr, "PodCIDR")];
        prefixes.extend(self.prefixes.iter().cloned());
        prefixes.sort();
        api.patch(
            &self.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(node_config(
                &self.name,
                self.address,
                self.revision,
                &prefixes,
            )),
        )
        .await?;
        Ok(())
    }

    /// Until the agent reports this revision realized with its session Established.
    async fn wait_realized(&self, api: &Api<BGPNodeConfig>) -> Result<BGPNodeConfig> {
        eventually(WAIT, || async {
            let config = api.get(&self.name).await?;
            let status = config.status.clone().unwrap_or_default();
            ensure!(
                status.realized_revision == Some(self.revision)
                    && status.established_sessions == Some(1),
                "{}: realized {:?} of {}, established {:?}, conditions {:?}",
                self.name,
                status.realized_revision,
                self.revision,
                status.established_sessions,
                status.conditions
            );
            Ok(config)
        })
        .await
    }
}

/// Until `check` holds for BIRD's routes (prefix → next hops).
async fn wait_routes(
    router: &BirdRouter,
    what: &str,
    timeout: Duration,
    check: impl Fn(&std::collections::BTreeMap<Ipv4Net, BTreeSet<Ipv4Addr>>) -> bool,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let routes = router.routes().await?;
        if check(&routes) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!(
                "{what}: not within {timeout:?}; BIRD's routes: {routes:?}\nprotocols: {:?}\n{}",
                router.protocols().await.ok(),
                router.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn via(
    routes: &std::collections::BTreeMap<Ipv4Net, BTreeSet<Ipv4Addr>>,
    prefix: &Ipv4Net,
) -> BTreeSet<Ipv4Addr> {
    routes.get(prefix).cloned().unwrap_or_default()
}

async fn wait_established(router: &BirdRouter, names: &[&str]) -> Result<()> {
    eventually(WAIT, || async {
        let protocols = router.protocols().await?;
        for name in names {
            let info = protocols.get(*name).map(String::as_str).unwrap_or("");
            ensure!(info == "Established", "{name}: {info:?} ({protocols:?})");
        }
        Ok(())
    })
    .await
}

/// Until BIRD no longer keeps `protocol`'s routes as stale: the restarted speaker sent its
/// routes and End-of-RIB.
async fn wait_graceful_restart_done(router: &BirdRouter, protocol: &str) -> Result<()> {
    eventually(WAIT, || async {
        ensure!(
            !router.graceful_restart_active(protocol).await?,
            "{protocol}: graceful restart still active at BIRD"
        );
        Ok(())
    })
    .await
}

/// The pid of the gobgpd the agent `agent_pid` started (its child).
fn gobgpd_child(agent_pid: u32) -> Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if comm.ends_with("(gobgpd") && ppid == Some(agent_pid) {
            return Ok(pid);
        }
    }
    bail!("no gobgpd child of agent {agent_pid}")
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// One scenario at a time: each starts a cluster and measures timings.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The router on `world`'s underlay peering with both nodes, and a client behind it that
/// both nodes route back to.
async fn router_and_client(world: &World) -> Result<(BirdRouter, Client)> {
    let addresses = [
        world.cluster.nodes[0].address,
        world.cluster.nodes[1].address,
    ];
    let router = BirdRouter::start(
        &world.cluster.underlay.netns,
        &format!("tdrb-{}", std::process::id()),
        ROUTER_IP,
        ROUTER_ASN,
        &[
            RouterPeer {
                name: "node0".into(),
                address: addresses[0],
                asn: NODE_ASN,
                password: None,
            },
            RouterPeer {
                name: "node1".into(),
                address: addresses[1],
                asn: NODE_ASN,
                password: None,
            },
        ],
        &RouterTimers {
            hold_seconds: HOLD,
            keepalive_seconds: KEEPALIVE,
        },
    )
    .await?;
    let outside = Client::start(&router, &format!("tdrc-{}", std::process::id())).await?;
    // The nodes' way back to the client (a node's default gateway would be the router).
    for node in &world.cluster.nodes {
        ip(&[
            "-n",
            &node.netns,
            "route",
            "add",
            &outside.subnet.to_string(),
            "via",
            &ROUTER_IP.to_string(),
        ])
        .await?;
    }
    Ok((router, outside))
}

/// The IPv4 pod CIDR of `node`.
async fn pod_cidr(networks: &Api<NodeNetwork>, node: &str) -> Result<Ipv4Net> {
    networks
        .get(node)
        .await?
        .spec
        .pod_cidrs
        .iter()
        .find_map(|c| c.parse().ok())
        .context("no IPv4 pod CIDR")
}

/// One TCP exchange from `netns` that must complete within 300 ms: a SYN lost before the
/// path is ready is tried again at once rather than after TCP's 1 s retransmission.
async fn answered_quickly(netns: &str, ip: &str, port: u16) -> Result<bool> {
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} || exit 3; echo hello >&3; read -t 1 line <&3 && [ \"$line\" = hello ]"
    );
    let out = tokio::process::Command::new("ip")
        .args([
            "netns", "exec", netns, "timeout", "0.3", "bash", "-c", &script,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    Ok(out.status.success())
}

/// LB IPAM's pool in the policy scenario.
const POOL: &str = "198.51.100.0/26";

/// A LoadBalancer Service `name` (label `announce: bgp`) for the pods `app`, asking LB IPAM
/// for `ip` (annotation `lbipam.tendril.dev/ips`) or for any address of the pool.
async fn apply_service(
    world: &World,
    name: &str,
    app: &str,
    traffic_policy: &str,
    ip: Option<&str>,
) -> Result<()> {
    let annotations = ip
        .map(|ip| {
            format!(
                "annotations: {{\"{}\": \"{ip}\"}}, ",
                tendril_crds::facts::lbipam::IPS_ANNOTATION
            )
        })
        .unwrap_or_default();
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, {annotations}labels: {{announce: bgp}}}}\n\
             spec:\n  type: LoadBalancer\n  externalTrafficPolicy: {traffic_policy}\n  selector: {{app: {app}}}\n\
             \x20 ports: [{{name: echo, port: 80, targetPort: {PORT}, protocol: TCP}}]\n"
        ))
        .await?;
    Ok(())
}

/// Until LB IPAM wrote an address into the Service's status: that address.
async fn wait_ingress(services: &Api<Service>, name: &str) -> Result<String> {
    wait_ingress_in(services, name, "0.0.0.0/0").await
}

/// Until the Service's status holds an address of `block`: that address.
async fn wait_ingress_in(services: &Api<Service>, name: &str, block: &str) -> Result<String> {
    let block: Ipv4Net = block.parse()?;
    let deadline = Instant::now() + WAIT;
    loop {
        let svc = services.get_status(name).await?;
        let ip = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.into_iter().find_map(|i| i.ip))
            .filter(|ip| ip.parse().is_ok_and(|a: Ipv4Addr| block.contains(&a)));
        if let Some(ip) = ip {
            return Ok(ip);
        }
        ensure!(
            Instant::now() < deadline,
            "{name}: no LB IP of {block} in status"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bird_learns_service_addresses_from_a_peering_policy() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let world = World::start("bgp-policy").await?;
    let client = world.env.client();
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let configs: Api<BGPNodeConfig> = Api::all(client.clone());
    let services: Api<Service> = Api::namespaced(client.clone(), world.env.namespace());
    let (addr0, addr1) = (
        world.cluster.nodes[0].address,
        world.cluster.nodes[1].address,
    );
    let (router, outside) = router_and_client(&world).await?;
    let (cidr0, cidr1) = (
        pod_cidr(&networks, &world.node_name(0)).await?,
        pod_cidr(&networks, &world.node_name(1)).await?,
    );

    // web-a (node 0) behind a Cluster Service, web-b (node 1) behind a Local one.
    for (name, app, policy) in [
        ("lb-cluster", "web-a", "Cluster"),
        ("lb-local", "web-b", "Local"),
    ] {
        let ip = if name == "lb-cluster" {
            CLUSTER_LB_IP
        } else {
            LOCAL_LB_IP
        };
        apply_service(&world, name, app, policy, Some(ip)).await?;
    }
    // LB IPAM (the operator's lbipam concern) hands out the addresses from this pool.
    let pool = world.env.unique_name("pool");
    world.env.delete_on_drop::<LoadBalancerIPPool>(&pool);
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: tendril.dev/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: {pool}}}\n\
             spec:\n  blocks: [{{cidr: {POOL}}}]\n  serviceSelector: {{matchLabels: {{announce: bgp}}}}\n"
        ))
        .await?;
    for (name, ip) in [("lb-cluster", CLUSTER_LB_IP), ("lb-local", LOCAL_LB_IP)] {
        let got = wait_ingress(&services, name).await?;
        ensure!(got == ip, "{name}: LB IPAM gave {got}, it asked for {ip}");
    }
    let policy = world.env.unique_name("rack");
    world.env.delete_on_drop::<BGPPeeringPolicy>(&policy);
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: tendril.dev/v1alpha1\nkind: BGPPeeringPolicy\nmetadata: {{name: {policy}}}\n\
             spec:\n  virtualRouters:\n  - localASN: {NODE_ASN}\n    exportPodCIDR: true\n\
             \x20   serviceSelector: {{matchLabels: {{announce: bgp}}}}\n\
             \x20   neighbors:\n    - peerAddress: {ROUTER_IP}/32\n      peerASN: {ROUTER_ASN}\n\
             \x20     holdTimeSeconds: {HOLD}\n      keepAliveTimeSeconds: {KEEPALIVE}\n\
             \x20     connectRetryTimeSeconds: 1\n\
             \x20     gracefulRestart: {{enabled: true, restartTimeSeconds: {RESTART_TIME}}}\n"
        ))
        .await?;

    wait_established(&router, &["node0", "node1"]).await?;
    wait_routes(&router, "policy: pod CIDRs and LB IPs", WAIT, |r| {
        via(r, &cidr0) == BTreeSet::from([addr0])
            && via(r, &cidr1) == BTreeSet::from([addr1])
            && via(r, &host(CLUSTER_LB_IP)) == BTreeSet::from([addr0, addr1])
            && via(r, &host(LOCAL_LB_IP)) == BTreeSet::from([addr1])
    })
    .await?;
    println!("policy: BIRD:\n{}", router.birdc(&["show", "route"]).await?);
    for node in 0..2 {
        let name = world.node_name(node);
        eventually(WAIT, || async {
            let c = configs.get(&name).await?;
            let realized = c.status.as_ref().and_then(|s| s.realized_revision);
            ensure!(
                realized == Some(c.spec.revision),
                "{name}: realized {realized:?} of revision {}",
                c.spec.revision
            );
            Ok(())
        })
        .await?;
    }

    // The client behind the router reaches both Services.
    for ip in [CLUSTER_LB_IP, LOCAL_LB_IP] {
        for _ in 0..5 {
            ensure!(
                eventually(Duration::from_secs(30), || connect_from_netns(
                    &outside.netns,
                    ip,
                    80
                ))
                .await?,
                "{ip} refused"
            );
        }
    }

    // A new Service → its LB IP in status (LB IPAM) → the route at BIRD via both nodes
    // (BGP concern, agents, gobgpd) → the first connection of the client behind the router
    // answered by a backend (services concern and datapath too).
    let (mut to_status, mut to_route, mut to_connect) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..5u8 {
        let name = format!("lb-new-{i}");
        let t = Instant::now();
        apply_service(&world, &name, "web-a", "Cluster", None).await?;
        let ip = wait_ingress(&services, &name).await?;
        to_status.push(t.elapsed());
        let prefix = host(&ip);
        wait_routes(&router, "new Service's LB IP", WAIT, |r| {
            via(r, &prefix) == BTreeSet::from([addr0, addr1])
        })
        .await?;
        to_route.push(t.elapsed());
        while !answered_quickly(&outside.netns, &ip, 80).await? {
            ensure!(t.elapsed() < WAIT, "the client never reached {ip}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        to_connect.push(t.elapsed());
    }
    let p50 = |v: &[Duration]| percentile(v, 0.5);
    println!(
        "policy: Service created → LB IP in status p50 {:?} (max {:?}) → route at BIRD via both nodes p50 {:?} (max {:?}) → first answered connection from the client p50 {:?} (max {:?}; 300 ms attempts), 5 Services",
        p50(&to_status),
        percentile(&to_status, 1.0),
        p50(&to_route),
        percentile(&to_route, 1.0),
        p50(&to_connect),
        percentile(&to_connect, 1.0)
    );

    // The pool shrinks away from the Services' addresses: LB IPAM takes them back (the two
    // that asked for one get none), BIRD withdraws them.
    let t = Instant::now();
    world
        .env
        .apply_yaml(&format!(
            "apiVersion: tendril.dev/v1alpha1\nkind: LoadBalancerIPPool\nmetadata: {{name: {pool}}}\n\
             spec:\n  blocks: [{{cidr: 198.51.100.128/26}}]\n  serviceSelector: {{matchLabels: {{announce: bgp}}}}\n"
        ))
        .await?;
    wait_routes(
        &router,
        "address outside the shrunk pool withdrawn",
        WAIT,
        |r| !r.contains_key(&host(CLUSTER_LB_IP)),
    )
    .await?;
    println!(
        "policy: pool shrunk → the address it no longer holds withdrawn at BIRD after {:?}",
        t.elapsed()
    );

    // A Service deleted: its address (one of the shrunk pool's, advertised) withdrawn.
    let moved = host(&wait_ingress_in(&services, "lb-new-0", "198.51.100.128/26").await?);
    wait_routes(&router, "moved address advertised", WAIT, |r| {
        via(r, &moved) == BTreeSet::from([addr0, addr1])
    })
    .await?;
    let t = Instant::now();
    services
        .delete("lb-new-0", &DeleteParams::default())
        .await?;
    wait_routes(&router, "deleted Service withdrawn", WAIT, |r| {
        !r.contains_key(&moved)
    })
    .await?;
    println!(
        "policy: Service deleted → its LB IP withdrawn at BIRD after {:?}",
        t.elapsed()
    );
    drop(outside);
    drop(router);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bird_learns_and_forgets_what_the_nodes_advertise() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut world = World::start("bgp-router").await?;
    let client = world.env.client();
    let configs: Api<BGPNodeConfig> = Api::all(client.clone());
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let (node0, node1) = (world.node_name(0), world.node_name(1));
    for name in [&node0, &node1] {
        world.env.delete_on_drop::<BGPNodeConfig>(name);
    }
    let addresses = [
        world.cluster.nodes[0].address,
        world.cluster.nodes[1].address,
    ];
    let (addr0, addr1) = (addresses[0], addresses[1]);

    let (router, outside) = router_and_client(&world).await?;

    // The services behind the LB IPs (the services datapath serves LB IPs arriving at a node).
    let (a, b) = (world.ip("web-a"), world.ip("web-b"));
    world
        .apply(lb_service(
            "lb-cluster",
            1,
            serde_json::json!({
                "frontends": [frontend("LoadBalancer", Some(CLUSTER_LB_IP), 80)],
                "backends": [backend(a, &node0), backend(b, &node1)],
            }),
        ))
        .await?;
    world
        .apply(lb_service(
            "lb-local",
            2,
            serde_json::json!({
                "frontends": [frontend("LoadBalancer", Some(LOCAL_LB_IP), 80)],
                "backends": [backend(a, &node0)],
                "externalTrafficPolicy": "Local",
            }),
        ))
        .await?;
    world.wait_realized(2).await?;

    let mut nodes = Vec::new();
    for (i, name) in [&node0, &node1].into_iter().enumerate() {
        let pod_cidr = pod_cidr(&networks, name).await?;
        let mut prefixes = vec![(host(CLUSTER_LB_IP), "LoadBalancerIP")];
        if i == 0 {
            prefixes.push((host(LOCAL_LB_IP), "LoadBalancerIP"));
        }
        nodes.push(NodeBgp {
            name: name.clone(),
            state_dir: world.cluster.nodes[i].state_dir.clone(),
            address: addresses[i],
            pod_cidr,
            prefixes,
            revision: 0,
        });
    }
    let started = Instant::now();
    for node in &mut nodes {
        node.apply(&configs).await?;
    }

    // Sessions, as BIRD and the agents see them.
    wait_established(&router, &["node0", "node1"]).await?;
    println!(
        "sessions Established at BIRD {:?} after the BGPNodeConfigs were written",
        started.elapsed()
    );
    for node in &nodes {
        let config = node.wait_realized(&configs).await?;
        let status = config.status.unwrap_or_default();
        let session = &status.sessions[0];
        ensure!(
            session.peer_address == ROUTER_IP.to_string()
                && session.state == "Established"
                && session.established_since.is_some(),
            "{}: {session:?}",
            node.name
        );
        eventually(WAIT, || async {
            let s = configs.get(&node.name).await?.status.unwrap_or_default();
            let session = s.sessions.first().cloned().unwrap_or_default();
            if session.received != 1 || session.advertised != 1 + node.prefixes.len() as i64 {
                bail!(
                    "{}: received {} (the router offers {OFFERED_PREFIX}), advertised {}; \
                     gobgpd's adj-out:\n{}",
                    node.name,
                    session.received,
                    session.advertised,
                    gobgp(
                        &node.state_dir,
                        &["neighbor", &ROUTER_IP.to_string(), "adj-out"]
                    )
                    .await
                );
            }
            Ok(())
        })
        .await?;
    }
    let metrics = fetch_metrics(world.cluster.nodes[0].metrics_port).await?;
    let peer = [("peer_address", "10.250.0.1")];
    ensure!(
        metrics.value("tendril_bgp_sessions", &[("state", "Established")]) == Some(1.0)
            && metrics.value("tendril_bgp_session_established", &peer) == Some(1.0)
            && metrics.value("tendril_bgp_prefixes_advertised", &peer) == Some(3.0)
            && metrics.value("tendril_bgp_prefixes_received", &peer) == Some(1.0)
            && metrics.value("tendril_bgp_daemon_up", &[]) == Some(1.0),
        "node 0's tendril_bgp_* metrics:\n{}",
        metrics
            .text
            .lines()
            .filter(|l| l.starts_with("tendril_bgp"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Routes at BIRD: pod CIDRs via their node, the Cluster LB IP via both (ECMP), the
    // Local LB IP via the node with the local backend only.
    let (cidr0, cidr1) = (nodes[0].pod_cidr, nodes[1].pod_cidr);
    wait_routes(&router, "pod CIDRs and LB IPs", WAIT, |r| {
        via(r, &cidr0) == BTreeSet::from([addr0])
            && via(r, &cidr1) == BTreeSet::from([addr1])
            && via(r, &host(CLUSTER_LB_IP)) == BTreeSet::from([addr0, addr1])
            && via(r, &host(LOCAL_LB_IP)) == BTreeSet::from([addr0])
    })
    .await?;
    let detail = router
        .birdc(&["show", "route", "all", "for", CLUSTER_LB_IP])
        .await?;
    ensure!(
        detail.contains("BGP.community: (65000,100)"),
        "communities at BIRD:\n{detail}"
    );
    let kernel = ip(&["-n", &router.netns, "route", "show", CLUSTER_LB_IP]).await?;
    ensure!(
        kernel.contains(&format!("nexthop via {addr0}"))
            && kernel.contains(&format!("nexthop via {addr1}")),
        "the router's kernel route to the Cluster LB IP is not ECMP over both nodes: {kernel}"
    );
    println!("BIRD:\n{}", router.birdc(&["show", "route"]).await?);

    // A client behind the router reaches the LB IPs; the Local one keeps its address.
    let client_ip = IpAddr::V4(outside.address);
    for _ in 0..10 {
        ensure!(
            connect_from_netns(&outside.netns, CLUSTER_LB_IP, 80).await?,
            "Cluster LB IP refused"
        );
    }
    let before = world.accepted(client_ip).0;
    for _ in 0..5 {
        ensure!(
            connect_from_netns(&outside.netns, LOCAL_LB_IP, 80).await?,
            "Local LB IP refused"
        );
    }
    ensure!(
        world.accepted(client_ip).0 >= before + 5,
        "web-a did not see the client's own address on the Local LB IP"
    );

    // Time from a BGPNodeConfig change to the route at BIRD, added and withdrawn.
    let (mut added, mut withdrawn) = (Vec::new(), Vec::new());
    for i in 0..LATENCY_SAMPLES {
        let prefix = host(&format!("198.51.100.{}", 100 + i));
        nodes[0].prefixes.push((prefix, "LoadBalancerIP"));
        let t = Instant::now();
        nodes[0].apply(&configs).await?;
        wait_routes(&router, "added prefix", WAIT, |r| r.contains_key(&prefix)).await?;
        added.push(t.elapsed());
        nodes[0].prefixes.retain(|(p, _)| *p != prefix);
        let t = Instant::now();
        nodes[0].apply(&configs).await?;
        wait_routes(&router, "withdrawn prefix", WAIT, |r| {
            !r.contains_key(&prefix)
        })
        .await?;
        withdrawn.push(t.elapsed());
    }
    println!(
        "BGPNodeConfig change → route at BIRD ({LATENCY_SAMPLES} samples): added p50 {:?} max {:?}; withdrawn p50 {:?} max {:?}",
        percentile(&added, 0.5),
        percentile(&added, 1.0),
        percentile(&withdrawn, 0.5),
        percentile(&withdrawn, 1.0)
    );

    // An advertisement removed from one node: ECMP shrinks to the other.
    nodes[1].prefixes.clear();
    nodes[1].apply(&configs).await?;
    let took = wait_routes(&router, "Cluster LB IP withdrawn by node 1", WAIT, |r| {
        via(r, &host(CLUSTER_LB_IP)) == BTreeSet::from([addr0])
    })
    .await?;
    println!("node 1's Cluster LB IP withdrawn at BIRD after {took:?}");
    nodes[1]
        .prefixes
        .push((host(CLUSTER_LB_IP), "LoadBalancerIP"));
    nodes[1].apply(&configs).await?;
    wait_routes(&router, "Cluster LB IP back on node 1", WAIT, |r| {
        via(r, &host(CLUSTER_LB_IP)) == BTreeSet::from([addr0, addr1])
    })
    .await?;

    // gobgpd killed: restarted and re-applied; graceful restart keeps the routes at BIRD.
    let agent_pid = world.cluster.nodes[0].agent().context("agent")?.pid();
    let daemon = gobgpd_child(agent_pid)?;
    let restarts_before = fetch_metrics(world.cluster.nodes[0].metrics_port)
        .await?
        .value("tendril_bgp_daemon_restarts_total", &[])
        .unwrap_or(0.0);
    // SAFETY: a signal to a process this test found as the agent's child.
    unsafe { libc::kill(daemon as i32, libc::SIGKILL) };
    let t = Instant::now();
    let mut missing = 0u32;
    loop {
        let routes = router.routes().await?;
        if via(&routes, &cidr0) != BTreeSet::from([addr0])
            || !via(&routes, &host(LOCAL_LB_IP)).contains(&addr0)
        {
            missing += 1;
        }
        let restarted = gobgpd_child(agent_pid).is_ok_and(|pid| pid != daemon);
        if restarted
            && router
                .protocols()
                .await?
                .get("node0")
                .is_some_and(|i| i == "Established")
            && t.elapsed() > Duration::from_secs(2)
        {
            break;
        }
        ensure!(
            t.elapsed() < WAIT,
            "node 0's session did not come back after gobgpd was killed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        missing == 0,
        "node 0's routes were missing at BIRD {missing} times while gobgpd restarted"
    );
    println!(
        "gobgpd killed: session back after {:?}, node 0's routes kept at BIRD throughout",
        t.elapsed()
    );
    ensure!(
        router
            .log()
            .contains("node0: Neighbor graceful restart detected"),
        "BIRD did not go through a graceful restart of node0:\n{}",
        router.log_tail(30)
    );
    wait_graceful_restart_done(&router, "node0").await?;
    println!(
        "gobgpd killed: BIRD's graceful restart of node0 done {:?} after the kill (the new daemon's End-of-RIB)",
        t.elapsed()
    );
    eventually(WAIT, || async {
        let m = fetch_metrics(world.cluster.nodes[0].metrics_port).await?;
        let restarts = m
            .value("tendril_bgp_daemon_restarts_total", &[])
            .unwrap_or(0.0);
        ensure!(
            restarts > restarts_before,
            "tendril_bgp_daemon_restarts_total {restarts}"
        );
        Ok(())
    })
    .await?;
    wait_routes(
        &router,
        "node 0's routes after the daemon restart",
        WAIT,
        |r| {
            via(r, &cidr0) == BTreeSet::from([addr0])
                && via(r, &host(LOCAL_LB_IP)) == BTreeSet::from([addr0])
        },
    )
    .await?;

    // The agent killed (its gobgpd dies with it, no NOTIFICATION): BIRD keeps node 0's
    // routes past the hold time, as graceful restart promises.
    world.cluster.nodes[0].kill_agent();
    let down = Instant::now();
    eventually(WAIT, || async {
        let protocols = router.protocols().await?;
        let info = protocols.get("node0").cloned().unwrap_or_default();
        ensure!(info != "Established", "node0 still {info}");
        Ok(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(u64::from(HOLD) + 3).saturating_sub(down.elapsed()))
        .await;
    let routes = router.routes().await?;
    ensure!(
        via(&routes, &cidr0) == BTreeSet::from([addr0])
            && via(&routes, &host(LOCAL_LB_IP)) == BTreeSet::from([addr0]),
        "node 0's routes not kept by graceful restart {:?} after its agent stopped: {routes:?}",
        down.elapsed()
    );
    println!(
        "agent stopped: node 0's routes still at BIRD after {:?} (hold time {HOLD} s)",
        down.elapsed()
    );
    world.cluster.nodes[0].start_agent()?;
    wait_established(&router, &["node0"]).await?;
    nodes[0].wait_realized(&configs).await?;
    wait_graceful_restart_done(&router, "node0").await?;
    println!(
        "agent restarted: session Established again {:?} after it stopped",
        down.elapsed()
    );

    // Node 1 vanishes from the underlay: no TCP close, the hold timer withdraws its routes.
    let port1 = "n1";
    ip(&[
        "-n",
        &world.cluster.underlay.netns,
        "link",
        "set",
        port1,
        "down",
    ])
    .await?;
    let took = wait_routes(
        &router,
        "node 1's routes withdrawn after the hold time",
        WAIT,
        |r| !r.contains_key(&cidr1) && via(r, &host(CLUSTER_LB_IP)) == BTreeSet::from([addr0]),
    )
    .await?;
    // BIRD starts its hold timer up to a quarter short (RFC 4271's jitter) from the last
    // keepalive, which came up to one keepalive interval before the link went down.
    let earliest = Duration::from_secs_f64(f64::from(HOLD) * 0.75 - f64::from(KEEPALIVE));
    ensure!(
        took >= earliest.saturating_sub(Duration::from_millis(500))
            && took <= Duration::from_secs(u64::from(HOLD) + 3),
        "node 1's routes went after {took:?}: not what a {HOLD} s hold time explains"
    );
    ensure!(
        router.log().contains("node1: Error: Hold timer expired"),
        "BIRD did not withdraw node 1's routes for its hold timer:\n{}",
        router.log_tail(30)
    );
    println!(
        "node 1 gone from the underlay: its routes withdrawn at BIRD after {took:?} (hold time {HOLD} s)"
    );
    ip(&[
        "-n",
        &world.cluster.underlay.netns,
        "link",
        "set",
        port1,
        "up",
    ])
    .await?;
    wait_established(&router, &["node1"]).await?;
    wait_routes(&router, "node 1's routes back", WAIT, |r| {
        via(r, &cidr1) == BTreeSet::from([addr1])
    })
    .await?;

    // Node 0's BGPNodeConfig deleted: gobgpd stops with a Cease, BIRD withdraws at once.
    configs.delete(&node0, &DeleteParams::default()).await?;
    let took = wait_routes(&router, "node 0's routes withdrawn", WAIT, |r| {
        !r.contains_key(&cidr0) && !r.contains_key(&host(LOCAL_LB_IP))
    })
    .await?;
    ensure!(
        took < Duration::from_secs(u64::from(HOLD)),
        "withdrawn only after {took:?}"
    );
    println!("node 0's BGPNodeConfig deleted: its routes withdrawn at BIRD after {took:?}");
    eventually(WAIT, || async {
        let m = fetch_metrics(world.cluster.nodes[0].metrics_port).await?;
        ensure!(
            m.value("tendril_bgp_daemon_up", &[]) == Some(0.0),
            "gobgpd still up"
        );
        Ok(())
    })
    .await?;
    drop(outside);
    drop(router);
    Ok(())
}

/// The agent's `bgp.secretsNamespace` (its default).
const SECRETS_NAMESPACE: &str = "tendril-bgp-secrets";
const PASSWORD: &str = "tor-md5-secret";

/// The password Secret `name` holding `password`, created or replaced.
async fn apply_password(secrets: &Api<Secret>, name: &str, password: &str) -> Result<()> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some([("password".to_string(), ByteString(password.into()))].into()),
        ..Secret::default()
    };
    secrets
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
    Ok(())
}

/// The kernel's count of TCP segments with a wrong MD5 signature in `netns`
/// (`TcpExt: TCPMD5Failure` of /proc/net/netstat).
async fn md5_failures(netns: &str) -> Result<u64> {
    let text = ip(&["netns", "exec", netns, "cat", "/proc/net/netstat"]).await?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no TcpExt in /proc/net/netstat of {netns}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "TCPMD5Failure")
        .context("no TCPMD5Failure counter")?
        .1
        .parse()
        .context("TCPMD5Failure")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_with_a_password_comes_up_only_with_the_routers_password() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let world = World::start("bgp-router").await?;
    let client = world.env.client();
    let configs: Api<BGPNodeConfig> = Api::all(client.clone());
    let node0 = world.node_name(0);
    world.env.delete_on_drop::<BGPNodeConfig>(&node0);
    let address = world.cluster.nodes[0].address;
    let router = BirdRouter::start(
        &world.cluster.underlay.netns,
        &format!("tdrp-{}", std::process::id()),
        ROUTER_IP,
        ROUTER_ASN,
        &[RouterPeer {
            name: "node0".into(),
            address,
            asn: NODE_ASN,
            password: Some(PASSWORD.into()),
        }],
        &RouterTimers {
            hold_seconds: HOLD,
            keepalive_seconds: KEEPALIVE,
        },
    )
    .await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            SECRETS_NAMESPACE,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": { "name": SECRETS_NAMESPACE },
            })),
        )
        .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SECRETS_NAMESPACE);
    let secret = world.env.unique_name("tor");

    // The peer names a Secret that does not exist yet: held back, the Secret named.
    let mut config = node_config(&node0, address, 1, &[]);
    config["spec"]["routers"][0]["neighbors"][0]["authSecretRef"] = serde_json::json!(secret);
    configs
        .patch(
            &node0,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(config),
        )
        .await?;
    let missing = format!("{SECRETS_NAMESPACE}/{secret} does not exist");
    eventually(WAIT, || async {
        let status = configs.get(&node0).await?.status.unwrap_or_default();
        let realized = status.conditions.iter().find(|c| c.type_ == "Realized");
        ensure!(
            realized.is_some_and(|c| c.status == "False"
                && c.reason == "PasswordSecretMissing"
                && c.message.contains(&missing))
                && status.sessions.first().is_some_and(|s| s.state == "Idle"),
            "{node0}: conditions {:?}, sessions {:?}",
            status.conditions,
            status.sessions
        );
        Ok(())
    })
    .await?;

    // BIRD's password in the Secret: Established.
    let t = Instant::now();
    apply_password(&secrets, &secret, PASSWORD).await?;
    wait_established(&router, &["node0"]).await?;
    println!(
        "password Secret created: session Established at BIRD after {:?}",
        t.elapsed()
    );
    let status = |configs: Api<BGPNodeConfig>, node: String| async move {
        Ok::<_, anyhow::Error>(configs.get(&node).await?.status.unwrap_or_default())
    };
    eventually(WAIT, || async {
        let s = status(configs.clone(), node0.clone()).await?;
        ensure!(
            s.realized_revision == Some(1) && s.established_sessions == Some(1),
            "{node0}: {s:?}"
        );
        Ok(())
    })
    .await?;

    // A wrong password: gobgpd's peer is replaced, the router's kernel drops its
    // connection attempts (bad MD5 signature) and the session stays down.
    let wrong = "not-the-routers";
    let failures_before = md5_failures(&router.netns).await?;
    apply_password(&secrets, &secret, wrong).await?;
    eventually(WAIT, || async {
        let info = router
            .protocols()
            .await?
            .remove("node0")
            .unwrap_or_default();
        ensure!(info != "Established", "node0 still {info}");
        Ok(())
    })
    .await?;
    // gobgpd tried with the wrong password (its first connect comes 5-10 s after the peer
    // is added) and the router's kernel refused the signature.
    eventually(WAIT, || async {
        let failures = md5_failures(&router.netns).await?;
        ensure!(
            failures > failures_before,
            "no TCP MD5 failure at the router yet ({failures})"
        );
        Ok(())
    })
    .await?;
    let info = router
        .protocols()
        .await?
        .remove("node0")
        .unwrap_or_default();
    ensure!(
        info != "Established",
        "node0 Established with a wrong password"
    );
    let s = status(configs.clone(), node0.clone()).await?;
    ensure!(
        s.established_sessions == Some(0)
            && s.sessions.first().is_some_and(|s| s.state != "Established"),
        "{node0} with a wrong password: {s:?}"
    );
    let printed = serde_json::to_string(&configs.get(&node0).await?)?;
    ensure!(
        !printed.contains(PASSWORD) && !printed.contains(wrong),
        "a password in the BGPNodeConfig: {printed}"
    );
    println!("wrong password: node0 at BIRD {info:?}, not Established");

    // The Secret fixed: Established again.
    let t = Instant::now();
    apply_password(&secrets, &secret, PASSWORD).await?;
    wait_established(&router, &["node0"]).await?;
    println!(
        "password Secret fixed: session Established at BIRD after {:?}",
        t.elapsed()
    );
    secrets.delete(&secret, &DeleteParams::default()).await?;
    drop(router);
    Ok(())
}
