//! Issue 5 end to end: the node datapath reconciler with real packets.
//!
//! One dedicated plane; three simulated nodes (`tendril_e2e::sim`: network namespaces on
//! an underlay bridge, one real `tendril-agent` each), the real operator and CNI plugin,
//! three pods per node. Nothing is configured by hand: the agents create the VXLAN device,
//! routes, map entries and attached programs from the `NodeNetwork`s and `Endpoint`s.
//! Waits poll realized revisions and conditions (`NodeNetwork`/`Endpoint` status), the
//! agents' `/readyz` and logs; never fixed sleeps.
//!
//! Overlay (the default): ICMP, TCP and UDP between every pair of pods, same node and
//! across nodes; traffic between nodes really goes through the tunnel (the programs'
//! `forward_tunnel` counter); a pod added later becomes reachable (latency printed); a
//! deleted pod stops answering and its map entries are gone on every node; each agent is
//! killed and restarted under a fixed-rate cross-node ping and a TCP stream: zero lost
//! packets, the connection survives (counts printed); an agent down while a pod is added
//! and one removed converges after restart: stale entries pruned, live ones untouched.
//!
//! Native routing: two nodes, two pods each, agents run with `--routing-mode native`:
//! every pair connects, routes go via the other node's address, no tunnel device.
//! Needs root.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use kube::Client;
use kube::api::Api;
use tendril_crds::v1alpha1::{Endpoint, NodeNetwork};
use tendril_datapath::bpf::Dataplane;
use tendril_datapath::bpf::maps::{EndpointInfo, IpcacheValue};
use tendril_e2e::sim::{SimCluster, SimClusterConfig, SimNode, SimPod, is_realized, netns_path};
use tendril_e2e::{
    ControlPlane, Process, TestEnv, eventually, fetch_metrics, http_get, wait_deleted, wait_for,
};

const TIMEOUT: Duration = Duration::from_secs(120);
const ECHO_PORT: u16 = 7007;

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_string(), app.to_string())])
}

/// Runs `f` on a fresh thread inside network namespace `netns` (a name under
/// /var/run/netns); only that thread changes namespace.
fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let path = netns_path(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
        // SAFETY: a valid netns descriptor; setns changes only this thread's namespace.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        f()
    })
}

async fn in_netns_async<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let handle = in_netns(netns, f);
    tokio::task::spawn_blocking(move || handle.join())
        .await?
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// TCP and UDP echo servers inside a pod, stopped on drop.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(pod: &SimPod) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp_stop, udp_stop) = (stop.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let tx2 = tx.clone();
        let _tcp = in_netns(&pod.sandbox.netns, move || {
            let listener = TcpListener::bind(("0.0.0.0", ECHO_PORT))?;
            listener.set_nonblocking(true)?;
            let _ = tx.send(Ok(()));
            while !tcp_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false)?;
                        let stop = tcp_stop.clone();
                        std::thread::spawn(move || echo_lines(stream, &stop));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        let _udp = in_netns(&pod.sandbox.netns, move || {
            let socket = UdpSocket::bind(("0.0.0.0", ECHO_PORT))?;
            socket.set_read_timeout(Some(Duration::from_millis(100)))?;
            let _ = tx2.send(Ok(()));
            let mut buf = [0u8; 1500];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    socket.send_to(&buf[..n], from)?;
                }
            }
            Ok(())
        });
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(10))
                .context("echo server did not start")??;
        }
        Ok(Echo { stop })
    }
}

fn echo_lines(stream: TcpStream, stop: &AtomicBool) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(line.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One TCP round trip from `from` to `to`'s echo server.
async fn tcp_check(from: &SimPod, to: IpAddr) -> Result<()> {
    in_netns_async(&from.sandbox.netns, move || {
        let addr = SocketAddr::new(to, ECHO_PORT);
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"hello\n")?;
        let mut buf = [0u8; 6];
        stream.read_exact(&mut buf)?;
        ensure!(&buf == b"hello\n", "echo returned {buf:?}");
        Ok(())
    })
    .await
}

/// One UDP round trip (three tries: UDP may lose the first datagram to neighbour
/// resolution on the way).
async fn udp_check(from: &SimPod, to: IpAddr) -> Result<()> {
    in_netns_async(&from.sandbox.netns, move || {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            socket.send_to(b"datagram", (to, ECHO_PORT))?;
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                ensure!(peer.ip() == to, "answer from {peer}");
                ensure!(&buf[..n] == b"datagram", "echo returned {:?}", &buf[..n]);
                return Ok(());
            }
        }
        bail!("no UDP answer from {to}")
    })
    .await
}

/// ICMP, TCP and UDP between every ordered pair; returns the failures.
async fn mesh(pods: &[&SimPod]) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    let mut checked = 0;
    for from in pods {
        for to in pods {
            if from.name == to.name {
                continue;
            }
            let ip = to.ips[0];
            let what = format!(
                "{}@{} -> {}@{} ({ip})",
                from.name, from.node, to.name, to.node
            );
            if !from.ping(ip).await? {
                failures.push(format!("ICMP {what}"));
            }
            if let Err(e) = tcp_check(from, ip).await {
                failures.push(format!("TCP {what}: {e}"));
            }
            if let Err(e) = udp_check(from, ip).await {
                failures.push(format!("UDP {what}: {e}"));
            }
            checked += 3;
        }
    }
    println!(
        "mesh: {checked} checks between {} pods, {} failed",
        pods.len(),
        failures.len()
    );
    Ok(failures)
}

/// Waits until the node's agent reports the current NodeNetwork generation realized.
async fn wait_node_realized(client: &Client, node: &str) -> Result<NodeNetwork> {
    let api: Api<NodeNetwork> = Api::all(client.clone());
    wait_for(
        &api,
        node,
        |o: Option<&NodeNetwork>| {
            o.is_some_and(|nn| {
                nn.status.as_ref().is_some_and(|s| {
                    s.realized_revision.is_some()
                        && s.realized_revision == nn.metadata.generation
                        && is_realized(&s.conditions)
                })
            })
        },
        TIMEOUT,
    )
    .await
    .with_context(|| format!("NodeNetwork {node} never realized"))?
    .context("NodeNetwork gone")
}

fn pin_dir(node: &SimNode) -> PathBuf {
    node.bpffs_root.join(&node.name)
}

type Maps = (
    BTreeMap<IpAddr, EndpointInfo>,
    BTreeMap<IpNet, IpcacheValue>,
);

fn read_maps(node: &SimNode) -> Result<Maps> {
    let dp = Dataplane::open(&pin_dir(node))?;
    Ok((dp.endpoints.by_ip()?, dp.ipcache.by_prefix()?))
}

/// The programs' per-reason counters of every node, for failure messages.
fn counters(nodes: &[SimNode]) -> String {
    nodes
        .iter()
        .map(|node| {
            let samples = Dataplane::open(&pin_dir(node))
                .and_then(|dp| dp.metrics.samples())
                .map(|samples| {
                    samples
                        .iter()
                        .map(|s| {
                            format!(
                                "{}/{}={}",
                                s.reason.map_or("?", |r| r.as_str()),
                                s.direction.map_or("?", |d| d.as_str()),
                                s.packets
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|e| e.to_string());
            format!("{}: {samples}", node.name)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the agent restarted on `node` logged its first realized pass and `/readyz`
/// answers 200.
async fn wait_agent_converged(node: &mut SimNode) -> Result<()> {
    node.agent()
        .context("agent not running")?
        .wait_for_log("datapath realized", TIMEOUT)
        .await?;
    let port = node.metrics_port;
    eventually(TIMEOUT, || async move {
        let (code, body) = http_get(port, "/readyz").await?;
        ensure!(code == 200, "readyz {code}: {body}");
        Ok(())
    })
    .await
}

async fn metric_sum(node: &SimNode, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    Ok(fetch_metrics(node.metrics_port).await?.sum(name, labels))
}

/// `ping -i 0.02` from `from` to `to` until SIGINT; returns (transmitted, received).
struct Pinger {
    child: tokio::process::Child,
}

impl Pinger {
    fn start(from: &SimPod, to: IpAddr) -> Result<Pinger> {
        let child = tokio::process::Command::new("ip")
            .args(["netns", "exec", &from.sandbox.netns])
            .args(["ping", "-n", "-i", "0.02", "-W", "1"])
            .arg(to.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Pinger { child })
    }

    async fn finish(self) -> Result<(u64, u64)> {
        let pid = self.child.id().context("ping exited early")?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
        let out = self.child.wait_with_output().await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .with_context(|| format!("no ping summary in {text}"))?;
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(2)
            .map(|s| s.parse().unwrap_or(0))
            .collect();
        Ok((numbers[0], numbers[1]))
    }
}

/// A TCP connection from `from` to `to`'s echo server exchanging a line every 20 ms
/// until stopped; counts round trips and errors.
struct Stream {
    stop: Arc<AtomicBool>,
    round_trips: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<Result<()>>,
}

impl Stream {
    fn start(from: &SimPod, to: IpAddr) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let round_trips = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), round_trips.clone());
        let handle = in_netns(&from.sandbox.netns, move || {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddr::new(to, ECHO_PORT),
                Duration::from_secs(5),
            )?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut line = String::new();
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                let sent = format!("line {n}\n");
                stream.write_all(sent.as_bytes())?;
                line.clear();
                reader.read_line(&mut line)?;
                ensure!(line == sent, "stream echoed {line:?} for {sent:?}");
                n += 1;
                r.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        Stream {
            stop,
            round_trips,
            handle,
        }
    }

    fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    fn finish(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
            .context("the TCP stream broke")?;
        Ok(self.round_trips.load(Ordering::Relaxed))
    }
}

#[tokio::test]
async fn overlay_three_nodes_three_pods_each() -> Result<()> {
    let plane = ControlPlane::dedicated("datapath-e2e").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 3,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    for node in &cluster.nodes {
        wait_node_realized(&client, &node.name).await?;
    }
    let mut world = Overlay {
        ns: env.namespace().to_string(),
        client,
        cluster,
        pods: Vec::new(),
        echoes: Vec::new(),
    };
    world.every_pod_reaches_every_pod().await?;
    world.maps_match_the_cluster().await?;
    let (late, late_echo) = world.a_late_pod_becomes_reachable().await?;
    world.a_deleted_pod_is_gone_everywhere().await?;
    world.agent_restarts_disturb_no_traffic().await?;
    world
        .an_agent_down_while_pods_change_converges(late, late_echo)
        .await
}

/// The overlay scenario's world: three nodes, their pods and echo servers.
struct Overlay {
    client: Client,
    ns: String,
    cluster: SimCluster,
    pods: Vec<SimPod>,
    echoes: Vec<Echo>,
}

impl Overlay {
    /// Three pods per node, all realized, echo servers up, every pair connected.
    async fn every_pod_reaches_every_pod(&mut self) -> Result<()> {
        let (client, ns) = (&self.client, &self.ns);
        let started = Instant::now();
        for (n, node) in self.cluster.nodes.iter().enumerate() {
            for p in 0..3 {
                let name = format!("p{n}{p}");
                self.pods.push(
                    SimPod::run(
                        client,
                        node.handle(),
                        ns,
                        &name,
                        &labels(&format!("app{p}")),
                    )
                    .await?,
                );
            }
        }
        for pod in &self.pods {
            pod.wait_realized(client, TIMEOUT).await?;
        }
        println!(
            "9 pods created and realized on 3 nodes in {:.2?}",
            started.elapsed()
        );
        for pod in &self.pods {
            self.echoes.push(Echo::start(pod)?);
        }
        let refs: Vec<&SimPod> = self.pods.iter().collect();
        let failures = mesh(&refs).await?;
        assert!(
            failures.is_empty(),
            "{}\n{}",
            failures.join("\n"),
            counters(&self.cluster.nodes)
        );
        Ok(())
    }

    /// The maps say what the cluster says; cross-node packets went through the tunnel.
    async fn maps_match_the_cluster(&self) -> Result<()> {
        let (cluster, pods) = (&self.cluster, &self.pods);
        for (n, node) in cluster.nodes.iter().enumerate() {
            let (endpoints, ipcache) = read_maps(node)?;
            let local: Vec<IpAddr> = pods
                .iter()
                .filter(|p| p.node == node.name)
                .map(|p| p.ips[0])
                .collect();
            assert_eq!(
                endpoints.keys().copied().collect::<Vec<_>>(),
                {
                    let mut l = local.clone();
                    l.sort();
                    l
                },
                "endpoints map of node {n}"
            );
            for pod in pods {
                let entry = ipcache
                    .get(&IpNet::from(pod.ips[0]))
                    .with_context(|| format!("{} missing from node {n}'s ipcache", pod.ips[0]))?;
                let remote = cluster.nodes.iter().find(|x| x.name == pod.node).unwrap();
                let expected_tunnel = (pod.node != node.name).then_some(remote.address);
                assert_eq!(
                    entry.tunnel_endpoint(),
                    expected_tunnel,
                    "{} on node {n}",
                    pod.ips[0]
                );
            }
            let node_ref = node;
            eventually(TIMEOUT, || async move {
                let tunnelled = metric_sum(
                    node_ref,
                    "tendril_datapath_packets_total",
                    &[("reason", "forward_tunnel")],
                )
                .await?;
                ensure!(tunnelled > 0.0, "no forward_tunnel packets counted yet");
                Ok(())
            })
            .await?;
            let m = fetch_metrics(node.metrics_port).await?;
            ensure!(
                m.value("tendril_bpf_map_pressure", &[("map", "ipcache")])
                    .unwrap_or(0.0)
                    > 0.0,
                "map pressure not reported"
            );
            ensure!(
                m.sum("tendril_datapath_realize_seconds_count", &[]) > 0.0,
                "realize latency not observed"
            );
            ensure!(
                m.sum(
                    "tendril_bpf_map_operations_total",
                    &[
                        ("map", "endpoints"),
                        ("operation", "add"),
                        ("outcome", "success")
                    ]
                ) >= 3.0,
                "map operations not counted"
            );
        }
        Ok(())
    }

    /// A pod added later becomes reachable from every node.
    async fn a_late_pod_becomes_reachable(&self) -> Result<(SimPod, Echo)> {
        let (client, ns, cluster, pods) = (&self.client, &self.ns, &self.cluster, &self.pods);
        let created = Instant::now();
        let late = SimPod::run(
            client,
            cluster.nodes[2].handle(),
            ns,
            "late",
            &labels("late"),
        )
        .await?;
        let late_ip = late.ips[0];
        let prober = &pods[0];
        loop {
            let out = prober
                .exec(&["ping", "-c1", "-W0.1", "-n", &late_ip.to_string()])
                .await?;
            if out.status.success() {
                break;
            }
            ensure!(created.elapsed() < TIMEOUT, "late pod never reachable");
        }
        let reachable = created.elapsed();
        late.wait_realized(client, TIMEOUT).await?;
        println!(
            "late pod: created -> CNI ADD done {:.2?}, -> reachable cross-node {reachable:.2?}, -> Endpoint realized {:.2?}",
            late.added_at - late.created_at,
            created.elapsed()
        );
        let late_echo = Echo::start(&late)?;
        tcp_check(&pods[3], late_ip).await?;
        udp_check(&pods[4], late_ip).await?;
        Ok((late, late_echo))
    }

    /// A deleted pod stops answering; its entries are gone everywhere.
    async fn a_deleted_pod_is_gone_everywhere(&mut self) -> Result<()> {
        let (client, ns, cluster, pods, echoes) = (
            &self.client,
            &self.ns,
            &self.cluster,
            &mut self.pods,
            &mut self.echoes,
        );
        let at = pods.iter().position(|p| p.name == "p11").unwrap();
        let victim = pods.remove(at);
        echoes.remove(at);
        let (victim_ip, victim_name) = (victim.ips[0], victim.name.clone());
        victim.delete(client, cluster.nodes[1].handle()).await?;
        wait_deleted(
            &Api::<Endpoint>::namespaced(client.clone(), ns),
            &victim_name,
            TIMEOUT,
        )
        .await?;
        for node in &cluster.nodes {
            eventually(TIMEOUT, || async move {
                let (endpoints, ipcache) = read_maps(node)?;
                ensure!(
                    !endpoints.contains_key(&victim_ip),
                    "{victim_ip} still in endpoints of {}",
                    node.name
                );
                ensure!(
                    !ipcache.contains_key(&IpNet::from(victim_ip)),
                    "{victim_ip} still in ipcache of {}",
                    node.name
                );
                Ok(())
            })
            .await?;
        }
        ensure!(
            !pods[0].ping(victim_ip).await?,
            "deleted pod {victim_ip} still answers"
        );
        println!("deleted pod {victim_ip}: gone from every node's maps, no answer");
        Ok(())
    }

    /// Restart without disruption: each agent killed and restarted under a cross-node ping
    /// and a TCP stream (node 0 -> node 1, node 1 -> node 2).
    async fn agent_restarts_disturb_no_traffic(&mut self) -> Result<()> {
        let (client, cluster, pods) = (&self.client, &mut self.cluster, &self.pods);
        let ping = Pinger::start(&pods[0], pods[3].ips[0])?;
        let stream = Stream::start(&pods[3], pods[6].ips[0]);
        let mut down_round_trips = Vec::new();
        for i in 0..cluster.nodes.len() {
            let node = &mut cluster.nodes[i];
            node.kill_agent();
            // Traffic flows while the agent is down: the stream makes progress (a poll on
            // its counter, not a sleep).
            let at_kill = stream.round_trips();
            eventually(TIMEOUT, || async {
                let done = stream.round_trips() - at_kill;
                ensure!(done >= 25, "{done} round trips since the kill");
                Ok(())
            })
            .await?;
            down_round_trips.push(stream.round_trips() - at_kill);
            node.start_agent()?;
            wait_agent_converged(node).await?;
            let name = node.name.clone();
            wait_node_realized(client, &name).await?;
        }
        println!("TCP round trips while each agent was down: {down_round_trips:?}");
        let (sent, received) = ping.finish().await?;
        let round_trips = stream.finish()?;
        println!(
            "restarts of 3 agents: ping {sent} sent, {received} received, {} lost; TCP stream {round_trips} round trips, connection intact",
            sent - received
        );
        assert!(
            sent > 0 && sent == received,
            "lost {} of {sent} pings across agent restarts",
            sent - received
        );
        assert!(round_trips > 0);
        Ok(())
    }

    /// Agent of node 2 down while a pod is added there and one is removed (and a remote
    /// pod added): it converges after restart, stale entries pruned, live ones untouched.
    async fn an_agent_down_while_pods_change_converges(
        mut self,
        late: SimPod,
        _late_echo: Echo,
    ) -> Result<()> {
        let (client, ns, cluster, pods, echoes) = (
            &self.client,
            &self.ns,
            &mut self.cluster,
            &mut self.pods,
            &mut self.echoes,
        );
        let node2 = cluster.nodes[2].name.clone();
        let (before_endpoints, _) = read_maps(&cluster.nodes[2])?;
        cluster.nodes[2].kill_agent();
        let remote_new = SimPod::run(
            client,
            cluster.nodes[0].handle(),
            ns,
            "while-down-remote",
            &labels("wd"),
        )
        .await?;
        let handle2 = cluster.nodes[2].handle().clone();
        let added = {
            let (client, ns, handle) = (client.clone(), ns.clone(), handle2.clone());
            tokio::spawn(async move {
                SimPod::run(&client, &handle, &ns, "while-down", &labels("wd")).await
            })
        };
        let at = pods.iter().position(|p| p.name == "p21").unwrap();
        let removed_pod = pods.remove(at);
        echoes.remove(at);
        let removed_ip = removed_pod.ips[0];
        // Force-deleted while its node's agent is down (the kubelet tears the sandbox down
        // later): the Endpoint goes, the restarted agent only sees it missing from its list.
        let pod_api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
        pod_api
            .delete("p21", &kube::api::DeleteParams::default().grace_period(0))
            .await?;
        let endpoints_api: Api<Endpoint> = Api::namespaced(client.clone(), ns);
        wait_deleted(&endpoints_api, "p21", TIMEOUT).await?;
        // The remote pod's Endpoint (identity and all) is complete while the agent is down.
        let remote_ep = Api::<Endpoint>::namespaced(client.clone(), ns);
        wait_for(
            &remote_ep,
            &remote_new.name,
            |o: Option<&Endpoint>| o.is_some_and(|e| e.spec.identity.is_some()),
            TIMEOUT,
        )
        .await?;
        ensure!(
            cluster.nodes[2].agent().is_none(),
            "the agent must still be down"
        );
        cluster.nodes[2].start_agent()?;
        let added = added.await??;
        wait_agent_converged(&mut cluster.nodes[2]).await?;
        added.wait_realized(client, TIMEOUT).await?;
        remote_new.wait_realized(client, TIMEOUT).await?;
        let node = &cluster.nodes[2];
        let (endpoints, ipcache) = eventually(TIMEOUT, || async move {
            let (endpoints, ipcache) = read_maps(node)?;
            ensure!(
                !endpoints.contains_key(&removed_ip),
                "stale {removed_ip} still in endpoints"
            );
            ensure!(
                !ipcache.contains_key(&IpNet::from(removed_ip)),
                "stale {removed_ip} still in ipcache"
            );
            Ok((endpoints, ipcache))
        })
        .await?;
        ensure!(
            endpoints.contains_key(&added.ips[0]),
            "new local pod missing from endpoints"
        );
        ensure!(
            ipcache.contains_key(&IpNet::from(remote_new.ips[0])),
            "new remote pod missing from ipcache"
        );
        for pod in pods.iter().filter(|p| p.node == node2) {
            assert_eq!(
                endpoints.get(&pod.ips[0]),
                before_endpoints.get(&pod.ips[0]),
                "live endpoint {} changed across the restart",
                pod.ips[0]
            );
        }
        let m = fetch_metrics(node.metrics_port).await?;
        let ops = |op: &str| {
            m.sum(
                "tendril_bpf_map_operations_total",
                &[("map", "endpoints"), ("operation", op)],
            )
        };
        println!(
            "agent down while pods changed: after restart endpoints map add={} update={} delete={}",
            ops("add") + 0.0,
            ops("update") + 0.0,
            ops("delete") + 0.0
        );
        assert_eq!(
            (ops("add"), ops("update"), ops("delete")),
            (1.0, 0.0, 1.0),
            "only the new and the removed pod's entries change"
        );
        removed_pod.delete(client, &handle2).await?;
        let _echo = Echo::start(&added)?;
        let remote_echo = Echo::start(&remote_new)?;
        let survivors: Vec<&SimPod> = pods.iter().chain([&added, &remote_new, &late]).collect();
        let failures = mesh(&survivors).await?;
        assert!(
            failures.is_empty(),
            "{}\n{}",
            failures.join("\n"),
            counters(&cluster.nodes)
        );
        drop(remote_echo);
        Ok(())
    }
}

/// Starts `node`'s agent again as the sim does, with `extra` arguments.
fn respawn_agent(env: &TestEnv, node: &mut SimNode, extra: &[&str]) -> Result<Process> {
    node.kill_agent();
    Process::builder("tendril-agent")
        .name(format!("tendril-agent-custom-{}", node.name))
        .arg("--kubeconfig")
        .arg(env.kubeconfig())
        .args(["--node-name", &node.name])
        .arg("--node-netns")
        .arg(netns_path(&node.netns))
        .arg("--state-dir")
        .arg(&node.state_dir)
        .arg("--cni-socket")
        .arg(&node.socket)
        .arg("--bpffs-root")
        .arg(&node.bpffs_root)
        .args([
            "--metrics-bind",
            &format!("127.0.0.1:{}", node.metrics_port),
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .spawn()
}

fn start_native_agent(env: &TestEnv, node: &mut SimNode) -> Result<Process> {
    respawn_agent(env, node, &["--routing-mode", "native"])
}

fn condition(nn: &NodeNetwork, type_: &str) -> Option<(String, String)> {
    nn.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// A full map is an error, never a silent drop: with room for two endpoints, the third
/// pod's entry fails (metric, NodeNetwork `Realized=False` `MapFull`, the Endpoint
/// `Realized=False`); once a pod is gone, it fits and everything is realized again.
#[tokio::test]
async fn a_full_endpoints_map_is_reported() -> Result<()> {
    let plane = ControlPlane::dedicated("datapath-full").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let mut cluster = SimCluster::start(
        &env,
        SimClusterConfig {
            nodes: 1,
            ..SimClusterConfig::default()
        },
    )
    .await?;
    let node = &mut cluster.nodes[0];
    node.kill_agent();
    // The maps were pinned with the default size; a smaller one needs fresh pins.
    std::fs::remove_dir_all(pin_dir(node))?;
    let config = node.state_dir.join("agent-small-maps.yaml");
    std::fs::write(&config, "bpfMapSizes:\n  endpoints: 2\n")?;
    let config = config.display().to_string();
    let mut agent = respawn_agent(&env, node, &["--config", &config])?;
    agent.wait_for_log("datapath realized", TIMEOUT).await?;
    let node = &cluster.nodes[0];

    let ns = env.namespace().to_string();
    let mut pods = Vec::new();
    for p in 0..3 {
        pods.push(
            SimPod::run(
                &client,
                node.handle(),
                &ns,
                &format!("f{p}"),
                &labels("full"),
            )
            .await?,
        );
    }
    let networks: Api<NodeNetwork> = Api::all(client.clone());
    let nn = wait_for(
        &networks,
        &node.name,
        |o: Option<&NodeNetwork>| {
            o.and_then(|nn| condition(nn, "Realized"))
                .is_some_and(|(status, reason)| status == "False" && reason == "MapFull")
        },
        TIMEOUT,
    )
    .await?
    .context("NodeNetwork gone")?;
    println!(
        "full map: NodeNetwork Realized={:?}",
        condition(&nn, "Realized")
    );
    let port = node.metrics_port;
    eventually(TIMEOUT, || async move {
        let m = fetch_metrics(port).await?;
        let full = m.sum(
            "tendril_bpf_map_operations_total",
            &[("map", "endpoints"), ("outcome", "full")],
        );
        ensure!(full >= 1.0, "no full outcome counted");
        let pressure = m.value("tendril_bpf_map_pressure", &[("map", "endpoints")]);
        ensure!(pressure == Some(1.0), "endpoints pressure {pressure:?}");
        Ok(())
    })
    .await?;
    // The two that fit are realized, the third says why it is not.
    let (endpoints, _) = read_maps(node)?;
    assert_eq!(endpoints.len(), 2);
    let left_out = pods
        .iter()
        .find(|p| !endpoints.contains_key(&p.ips[0]))
        .context("every pod in a map of two")?;
    let api: Api<Endpoint> = Api::namespaced(client.clone(), &ns);
    wait_for(
        &api,
        &left_out.name,
        |o: Option<&Endpoint>| {
            o.and_then(|e| e.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Realized" && c.status == "False")
            })
        },
        TIMEOUT,
    )
    .await?;
    for pod in pods.iter().filter(|p| p.name != left_out.name) {
        pod.wait_realized(&client, TIMEOUT).await?;
    }

    // Room again: the left-out pod gets in.
    let left_out_name = left_out.name.clone();
    let at = pods.iter().position(|p| p.name != left_out_name).unwrap();
    pods.remove(at).delete(&client, node.handle()).await?;
    let left_out = pods.iter().find(|p| p.name == left_out_name).unwrap();
    left_out.wait_realized(&client, TIMEOUT).await?;
    wait_node_realized(&client, &node.name).await?;
    let (endpoints, _) = read_maps(node)?;
    assert!(endpoints.contains_key(&left_out.ips[0]));
    println!("full map: recovered once a pod was deleted");
    drop(agent);
    Ok(())
}

#[tokio::test]
async fn native_routing_two_nodes_two_pods_each() -> Result<()> {
    let plane = ControlPlane::dedicated("datapath-native").await?;
    let env = TestEnv::on(plane.clone()).await?;
    let client = env.client();
    let mut cluster = SimCluster::start(&env, SimClusterConfig::default()).await?;
    let mut agents = Vec::new();
    for node in &mut cluster.nodes {
        let mut agent = start_native_agent(&env, node)?;
        agent.wait_for_log("datapath realized", TIMEOUT).await?;
        agents.push(agent);
    }
    for node in &cluster.nodes {
        wait_node_realized(&client, &node.name).await?;
    }
    let ns = env.namespace().to_string();
    let mut pods = Vec::new();
    for (n, node) in cluster.nodes.iter().enumerate() {
        for p in 0..2 {
            pods.push(
                SimPod::run(
                    &client,
                    node.handle(),
                    &ns,
                    &format!("q{n}{p}"),
                    &labels("native"),
                )
                .await?,
            );
        }
    }
    for pod in &pods {
        pod.wait_realized(&client, TIMEOUT).await?;
    }
    let _echoes: Vec<Echo> = pods.iter().map(Echo::start).collect::<Result<_>>()?;
    let refs: Vec<&SimPod> = pods.iter().collect();
    let failures = mesh(&refs).await?;
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        counters(&cluster.nodes)
    );

    let networks: Api<NodeNetwork> = Api::all(client.clone());
    for (n, node) in cluster.nodes.iter().enumerate() {
        let other = &cluster.nodes[1 - n];
        let cidr = networks.get(&other.name).await?.spec.pod_cidrs[0].clone();
        let routes = tendril_e2e::sim::ip(&["-n", &node.netns, "route", "show", &cidr]).await?;
        ensure!(
            routes.contains(&format!("via {}", other.address)) && routes.contains("proto 201"),
            "node {n}: route to {cidr}: {routes}"
        );
        let tunnel = tendril_e2e::sim::ip(&["-n", &node.netns, "-o", "link", "show"]).await?;
        ensure!(
            !tunnel.contains("tendril_vxlan"),
            "tunnel device in native mode: {tunnel}"
        );
        let (_, ipcache) = read_maps(node)?;
        for pod in &pods {
            let entry = ipcache
                .get(&IpNet::from(pod.ips[0]))
                .context("ipcache entry")?;
            ensure!(
                entry.tunnel_endpoint().is_none(),
                "tunnel endpoint in native mode"
            );
        }
    }
    println!("native routing: 2 nodes x 2 pods connected, routes via node addresses");
    drop(agents);
    Ok(())
}
