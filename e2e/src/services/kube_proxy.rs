//! The reference world: simulated nodes **without** Tendril — a plain routed network of
//! network namespaces — each running a real `kube-proxy` (built by
//! `hack/control-plane-build.sh` from the same Kubernetes module as the test plane).
//!
//! - The underlay is a bridge namespace; node `i` is a namespace on it at
//!   `10.250.0.{10+i}/24` with forwarding on, a default route to a router nobody answers
//!   ([`super::UNDERLAY_ROUTER`]) and a route to every other node's pod CIDR
//!   (`10.244.{j}.0/24`) via that node's underlay address.
//! - A pod is a namespace with `eth0` (`10.244.{i}.{10+k}/32`, default route via
//!   `10.244.{i}.1`, point-to-point like the CNI `ptp` plugin) whose peer `vp{k}` in the
//!   node namespace carries the gateway address and the host route to the pod. The `Pod`
//!   object is bound to the node and its status written as a kubelet does
//!   ([`crate::sim::write_running_status`]), so the EndpointSlice controller builds slices.
//! - `kube-proxy` runs inside the node namespace (`ip netns exec`) with
//!   `--hostname-override` (its `Node` has the InternalIP), `--detect-local-mode=ClusterCIDR
//!   --cluster-cidr=10.244.0.0/16`, `--conntrack-max-per-core=0` (a child namespace cannot
//!   set `nf_conntrack_max`), `--nodeport-addresses=primary` (NodePorts on the InternalIP,
//!   the nftables mode's default, also in iptables mode) and metrics on
//!   `127.0.0.1:`[`METRICS_PORT`] and health on `0.0.0.0:`[`HEALTHZ_PORT`] of the node's
//!   namespace. The apiserver binds the host's 127.0.0.1 only, so each node namespace gets
//!   an [`ApiForwarder`]: a listener on the namespace's own `127.0.0.1:{apiserver port}`
//!   relaying to the host's, so the ordinary admin kubeconfig (and its certificate for
//!   127.0.0.1) works unchanged.
//!
//! Everything — processes, forwarders, namespaces (and with them every iptables/nftables
//! rule and conntrack entry kube-proxy made) — goes on drop, also when a test panics.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use super::{NetnsSet, Spot, World, add_node_default_route, matrix, netns_metrics, netns_prefix};
use crate::sim::{
    ensure_bridge_netns, ensure_node_object, ip, join_bridge, netns_path, pod_object,
    write_running_status,
};
use crate::{Metrics, Process, TestEnv, eventually, k8s_bin_dir};

/// kube-proxy's metrics port inside each node namespace.
pub const METRICS_PORT: u16 = 10249;
/// kube-proxy's health port (`/healthz`, `/livez`) inside each node namespace.
pub const HEALTHZ_PORT: u16 = 10256;
/// The pod network `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// `--proxy-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Nftables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Nftables => "nftables",
        }
    }
}

/// A node of the reference world.
pub struct KpNode {
    pub name: String,
    pub address: Ipv4Addr,
    pub netns: String,
    next_pod: u8,
}

/// A pod of the reference world.
#[derive(Clone, Debug)]
pub struct KpPod {
    pub name: String,
    pub node: usize,
    pub ip: Ipv4Addr,
    pub netns: String,
}

/// Nodes, pods and one kube-proxy per node. See the module docs.
pub struct KubeProxyWorld {
    // Field order is drop order: processes, then forwarders, then namespaces.
    proxies: Vec<Process>,
    forwarders: Vec<ApiForwarder>,
    pub mode: ProxyMode,
    pub nodes: Vec<KpNode>,
    pub pods: BTreeMap<String, KpPod>,
    /// Outside clients: name → (namespace, address).
    pub externals: BTreeMap<String, (String, Ipv4Addr)>,
    pub underlay: String,
    prefix: String,
    client: kube::Client,
    namespace: String,
    netns: NetnsSet,
}

impl KubeProxyWorld {
    /// `nodes` nodes (Node objects deleted with `env`), each with its kube-proxy in `mode`,
    /// synced once.
    pub async fn start(env: &TestEnv, mode: ProxyMode, nodes: usize) -> Result<KubeProxyWorld> {
        super::sweep_stale();
        let prefix = netns_prefix();
        let mut world = KubeProxyWorld {
            proxies: Vec::new(),
            forwarders: Vec::new(),
            mode,
            nodes: Vec::new(),
            pods: BTreeMap::new(),
            externals: BTreeMap::new(),
            underlay: format!("{prefix}-u"),
            prefix,
            client: env.client(),
            namespace: env.namespace().to_string(),
            netns: NetnsSet::default(),
        };
        world.netns.add(&world.underlay.clone()).await?;
        ensure_bridge_netns(&world.underlay).await?;
        for i in 0..nodes {
            let name = env.unique_name(&format!("kp-node{i}"));
            let netns = format!("{}-n{i}", world.prefix);
            let address = Ipv4Addr::new(10, 250, 0, 10 + i as u8);
            world.netns.add(&netns).await?;
            super::netns_exec(&netns, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]).await?;
            join_bridge(&world.underlay, &netns, &format!("n{i}"), address).await?;
            add_node_default_route(&netns).await?;
            env.delete_on_drop::<Node>(&name);
            ensure_node_object(&env.client(), &name, address, &BTreeMap::new()).await?;
            world.nodes.push(KpNode {
                name,
                address,
                netns,
                next_pod: 0,
            });
        }
        for i in 0..nodes {
            for j in 0..nodes {
                if i != j {
                    ip(&[
                        "-n",
                        &world.nodes[i].netns,
                        "route",
                        "replace",
                        &format!("10.244.{j}.0/24"),
                        "via",
                        &world.nodes[j].address.to_string(),
                    ])
                    .await?;
                }
            }
        }
        let api_port = env.plane().apiserver_port();
        for i in 0..nodes {
            let forwarder = ApiForwarder::start(&world.nodes[i].netns, api_port)?;
            world.forwarders.push(forwarder);
            let proxy = world.spawn_proxy(i, env)?;
            world.proxies.push(proxy);
        }
        for i in 0..nodes {
            world.wait_synced(i, Duration::from_secs(120)).await?;
        }
        Ok(world)
    }

    fn spawn_proxy(&self, i: usize, env: &TestEnv) -> Result<Process> {
        let node = &self.nodes[i];
        let mode = self.mode;
        Process::builder(Process::which("ip"))
            .name(format!("kube-proxy-{}-{}", mode.as_str(), node.name))
            .args(["netns", "exec", &node.netns])
            .arg(k8s_bin_dir().join("kube-proxy"))
            .arg("--kubeconfig")
            .arg(env.kubeconfig())
            .args(["--hostname-override", &node.name])
            .args(["--proxy-mode", mode.as_str()])
            .args(["--detect-local-mode", "ClusterCIDR"])
            .args(["--cluster-cidr", CLUSTER_CIDR])
            .args(["--conntrack-max-per-core", "0"])
            .args(["--nodeport-addresses", "primary"])
            .args([
                "--metrics-bind-address",
                &format!("127.0.0.1:{METRICS_PORT}"),
            ])
            .args(["--healthz-bind-address", &format!("0.0.0.0:{HEALTHZ_PORT}")])
            .args(["--v", "2"])
            .spawn()
    }

    /// Stops node `i`'s kube-proxy, removes every rule it wrote (`nft flush ruleset`: the
    /// machine's `iptables` is the nf_tables variant, so this covers both modes) and starts
    /// a new one: what follows is the programming of every service from nothing.
    pub async fn restart_proxy_from_scratch(&mut self, i: usize, env: &TestEnv) -> Result<()> {
        self.proxies[i].stop(Duration::from_secs(10));
        super::netns_exec(&self.nodes[i].netns, &["nft", "flush", "ruleset"]).await?;
        self.proxies[i] = self.spawn_proxy(i, env)?;
        Ok(())
    }

    /// Waits until node `i`'s kube-proxy has synced its rules at least once.
    pub async fn wait_synced(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let ns = self.nodes[i].netns.clone();
        let res = eventually(timeout, || {
            let ns = ns.clone();
            async move {
                let m = netns_metrics(&ns, METRICS_PORT).await?;
                let last = m
                    .value("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[])
                    .unwrap_or(0.0);
                anyhow::ensure!(last > 0.0, "kube-proxy has not synced yet");
                Ok(())
            }
        })
        .await;
        if let Err(e) = res {
            let proxy = &mut self.proxies[i];
            let state = if proxy.is_running() {
                "running".to_string()
            } else {
                format!("exited: {:?}", proxy.try_exit_status())
            };
            bail!(
                "kube-proxy on {} ({state}): {e:#}\n{}",
                self.nodes[i].name,
                proxy.log_tail(40)
            );
        }
        Ok(())
    }

    /// Creates the Pod on node `node` and runs it: namespace, veth, addresses, routes, then
    /// the Running status.
    pub async fn add_pod(
        &mut self,
        name: &str,
        node: usize,
        labels: &BTreeMap<String, String>,
    ) -> Result<KpPod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let n = &mut self.nodes[node];
        let k = n.next_pod;
        n.next_pod += 1;
        let (node_name, node_ns, host_ip) = (n.name.clone(), n.netns.clone(), n.address);
        let pod_ip = Ipv4Addr::new(10, 244, node as u8, 10 + k);
        let gateway = format!("10.244.{node}.1");
        let netns = format!("{}-p{node}-{k}", self.prefix);
        let host_if = format!("vp{k}");
        self.netns.add(&netns).await?;
        ip(&[
            "-n", &netns, "link", "add", "eth0", "type", "veth", "peer", "name", &host_if, "netns",
            &node_ns,
        ])
        .await?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])
        .await?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"]).await?;
        ip(&[
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            &host_if,
        ])
        .await?;
        ip(&["-n", &node_ns, "link", "set", &host_if, "up"]).await?;
        ip(&[
            "-n",
            &node_ns,
            "route",
            "replace",
            &format!("{pod_ip}/32"),
            "dev",
            &host_if,
        ])
        .await?;
        ip(&[
            "-n", &netns, "route", "add", &gateway, "dev", "eth0", "scope", "link",
        ])
        .await?;
        ip(&[
            "-n", &netns, "route", "add", "default", "via", &gateway, "dev", "eth0",
        ])
        .await?;
        pods.create(
            &PostParams::default(),
            &pod_object(name, &node_name, labels)?,
        )
        .await
        .with_context(|| format!("creating Pod {name}"))?;
        write_running_status(
            &pods,
            name,
            &[IpAddr::V4(pod_ip)],
            host_ip,
            &format!("{netns}-c"),
        )
        .await?;
        let pod = KpPod {
            name: name.into(),
            node,
            ip: pod_ip,
            netns,
        };
        self.pods.insert(name.into(), pod.clone());
        Ok(pod)
    }

    /// An outside client `x{index}` on the underlay, routing LB and external IPs via node
    /// `via`.
    pub async fn add_external(&mut self, index: u8, via: usize) -> Result<()> {
        let name = format!("{}-x{index}", self.prefix);
        let address = super::add_external_client(
            &mut self.netns,
            &self.underlay,
            &name,
            index,
            self.nodes[via].address,
        )
        .await?;
        self.externals.insert(format!("x{index}"), (name, address));
        Ok(())
    }

    /// Node `i`'s kube-proxy metrics.
    pub async fn metrics(&self, i: usize) -> Result<Metrics> {
        netns_metrics(&self.nodes[i].netns, METRICS_PORT).await
    }

    /// A spot in node `i`'s own namespace.
    pub fn host_spot(&self, i: usize) -> Spot {
        Spot::new(format!("host@n{i}"), &self.nodes[i].netns)
    }

    /// Fails (with the log) if a kube-proxy exited.
    pub fn check_running(&mut self) -> Result<()> {
        for p in &mut self.proxies {
            if !p.is_running() {
                bail!("{} exited:\n{}", p.name(), p.log_tail(40));
            }
        }
        Ok(())
    }

    /// The last lines of every kube-proxy log.
    pub fn log_tails(&self, n: usize) -> String {
        self.proxies
            .iter()
            .map(|p| format!("── {}\n{}", p.name(), p.log_tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The rules kube-proxy wrote on node `i` (`nft list ruleset` or `iptables-save`).
    pub async fn ruleset(&self, i: usize) -> Result<String> {
        let cmd: &[&str] = match self.mode {
            ProxyMode::Nftables => &["nft", "list", "ruleset"],
            ProxyMode::Iptables => &["iptables-save"],
        };
        super::netns_exec(&self.nodes[i].netns, cmd).await
    }
}

/// Relays connections to `127.0.0.1:{port}` inside a namespace to the host's
/// `127.0.0.1:{port}`: how processes in a node namespace reach the test apiserver. Stopped
/// on drop.
pub struct ApiForwarder {
    stop: watch::Sender<bool>,
    handle: Option<JoinHandle<()>>,
}

impl ApiForwarder {
    pub fn start(netns: &str, port: u16) -> Result<ApiForwarder> {
        let listener = bind_in_netns(netns, port)?;
        let (stop, mut stopped) = watch::channel(false);
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    tokio::select! {
                        _ = stopped.changed() => return,
                        r = listener.accept() => if let Ok((mut inbound, _)) = r {
                            tokio::spawn(async move {
                                if let Ok(mut outbound) =
                                    tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                                {
                                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                        .await;
                                }
                            });
                        },
                    }
                }
            });
        });
        Ok(ApiForwarder {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for ApiForwarder {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A non-blocking listener on `127.0.0.1:{port}` created inside `netns` (a socket keeps
/// the namespace it was created in), from a short-lived thread so no other thread moves.
fn bind_in_netns(netns: &str, port: u16) -> Result<std::net::TcpListener> {
    let path = netns_path(netns);
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        let file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
        // SAFETY: a valid netns descriptor; setns changes only this thread's namespace, and
        // the thread ends right after.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow!("bind thread panicked"))?
}

impl KubeProxyWorld {
    /// The conformance topology ([`super::matrix`]): two nodes, its pods, two outside
    /// clients.
    pub async fn conformance(env: &TestEnv, mode: ProxyMode) -> Result<KubeProxyWorld> {
        let mut world = KubeProxyWorld::start(env, mode, 2).await?;
        for (pod, node) in matrix::topology_pods() {
            world.add_pod(pod, node, &matrix::pod_labels(pod)).await?;
        }
        world.add_external(0, 0).await?;
        world.add_external(1, 1).await?;
        Ok(world)
    }
}

impl World for KubeProxyWorld {
    fn name(&self) -> String {
        format!("kube-proxy ({})", self.mode.as_str())
    }
    fn kube(&self) -> kube::Client {
        self.client.clone()
    }
    fn namespace(&self) -> String {
        self.namespace.clone()
    }
    fn node_address(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].address
    }
    fn pod_spot(&self, pod: &str) -> Spot {
        Spot::new(
            format!("pod@n{}", self.pods[pod].node),
            &self.pods[pod].netns,
        )
    }
    fn host_spot(&self, i: usize) -> Spot {
        Spot::new(format!("host@n{i}"), &self.nodes[i].netns)
    }
    fn external_spot(&self, i: usize) -> Spot {
        Spot::new(format!("ext@n{i}"), &self.externals[&format!("x{i}")].0)
    }
    fn address_owners(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = (0..self.nodes.len())
            .map(|i| (format!("n{i}"), self.nodes[i].netns.clone()))
            .collect();
        out.extend(
            self.pods
                .values()
                .map(|p| (p.name.clone(), p.netns.clone())),
        );
        out.extend(
            self.externals
                .iter()
                .map(|(n, (ns, _))| (n.clone(), ns.clone())),
        );
        out
    }
    async fn wait_programmed(&self) -> Result<()> {
        // kube-proxy reports nothing per change; the matrix's sentinel is the wait.
        Ok(())
    }
}
