//! `tendril-sim`: the simulated nodes and kubelet of the local cluster (`hack/sim-cluster.sh`).
//!
//! The same code the e2e tests run ([`tendril_e2e::sim`]), as subcommands a script can call:
//! nodes (underlay, node namespaces, Node objects), pods (Pod object, sandbox through the
//! real `tendril-cni`, kubelet-written status; deletion with CNI DEL) and the demo
//! workloads. Agents are started by the script, between `nodes-up` and `demo-up`.
//! Every command is idempotent. State lives in `--run-dir` (`$TENDRIL_RUN/sim`):
//! `{node}/node.json`, `{node}/10-tendril.conflist`, `pods/{namespace}_{pod}.json`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tendril_e2e::sim::{self, NodeHandle, Sandbox};

#[derive(Debug, Parser)]
#[command(
    name = "tendril-sim",
    about = "Simulated nodes and kubelet for the local cluster"
)]
struct Cli {
    /// Admin kubeconfig of the cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Where node and pod state is kept.
    #[arg(long, env = "TENDRIL_SIM_DIR")]
    run_dir: PathBuf,
    /// Names the underlay namespace (`tdr-underlay-{cluster}`).
    #[arg(long, default_value = "local")]
    cluster: String,
    /// Directory holding tendril-cni (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Underlay, node namespaces (joined to it) and Node objects; prints `NAME ADDRESS`.
    NodesUp {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Waits until each node's agent reports Ready in its NodeNetwork.
    WaitReady {
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Removes node namespaces and Node objects, then the underlay.
    NodesDown {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Runs one pod on a node as a kubelet would (no-op if it already runs).
    PodAdd {
        /// NAMESPACE/NAME
        pod: String,
        #[arg(long)]
        node: String,
        /// KEY=VALUE (repeatable)
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Deletes one pod as a kubelet would (graceful delete, CNI DEL, final delete).
    PodDel {
        /// NAMESPACE/NAME
        pod: String,
    },
    /// The demo workloads: app=web and app=client pods in namespaces demo and demo-2,
    /// spread over the given nodes.
    DemoUp {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Deletes every pod this tool runs (CNI DEL first).
    PodsDown,
    /// Lists the pods this tool runs: NAMESPACE/NAME NODE IP NETNS.
    Pods,
}

/// `{run}/{node}/node.json`.
#[derive(Debug, Serialize, Deserialize)]
struct NodeState {
    name: String,
    index: u8,
    address: Ipv4Addr,
    netns: String,
}

/// `{run}/pods/{ns}_{pod}.json`: what the kubelet remembers of a sandbox.
#[derive(Debug, Serialize, Deserialize)]
struct PodState {
    namespace: String,
    name: String,
    uid: String,
    node: String,
    container_id: String,
    netns: String,
    ips: Vec<IpAddr>,
}

struct Sim {
    client: Client,
    run_dir: PathBuf,
    cluster: String,
    bin_dir: PathBuf,
}

impl Sim {
    fn node_dir(&self, node: &str) -> PathBuf {
        self.run_dir.join(node)
    }

    fn pods_dir(&self) -> PathBuf {
        self.run_dir.join("pods")
    }

    fn pod_file(&self, ns: &str, name: &str) -> PathBuf {
        self.pods_dir().join(format!("{ns}_{name}.json"))
    }

    fn handle(&self, node: &str) -> Result<NodeHandle> {
        let dir = self.node_dir(node);
        let state: NodeState = read_json(&dir.join("node.json"))
            .with_context(|| format!("node {node} is not up (tendril-sim nodes-up {node})"))?;
        let conflist = read_json(&dir.join("10-tendril.conflist"))?;
        Ok(NodeHandle {
            name: state.name,
            address: state.address,
            netns: state.netns,
            conflist,
            cni_bin_dir: self.bin_dir.clone(),
            // The local cluster's agents attach the socket LB to the cgroup2 root
            // (config/agent.yaml): every process is covered, the netns check separates nodes.
            cgroup: None,
        })
    }

    async fn nodes_up(&self, nodes: &[String]) -> Result<()> {
        sim::ensure_underlay(&self.cluster).await?;
        for (i, node) in nodes.iter().enumerate() {
            let index = u8::try_from(i).context("too many nodes")?;
            let address = sim::node_address(0, index);
            let netns = sim::ensure_node_netns(&self.cluster, node, index, address).await?;
            // Dual-stack underlay, as SimNode's: IPv6 pods' native routing needs it.
            let address6 = sim::node_address6(0, index);
            sim::add_node_address6(node, address6).await?;
            let dir = self.node_dir(node);
            std::fs::create_dir_all(&dir)?;
            write_json(
                &dir.join("node.json"),
                &NodeState {
                    name: node.clone(),
                    index,
                    address,
                    netns,
                },
            )?;
            write_json(
                &dir.join("10-tendril.conflist"),
                &sim::conflist(&dir.join("cni.sock")),
            )?;
            sim::ensure_node_object_with(
                &self.client,
                node,
                &[address.into(), address6.into()],
                &BTreeMap::new(),
            )
            .await?;
            println!("{node} {address} {address6}");
        }
        Ok(())
    }

    async fn nodes_down(&self, nodes: &[String]) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        for node in nodes {
            sim::delete_netns(&sim::node_netns(node));
            match api.delete(node, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e).with_context(|| format!("deleting Node {node}")),
            }
            let dir = self.node_dir(node);
            let _ = std::fs::remove_file(dir.join("node.json"));
            let _ = std::fs::remove_file(dir.join("10-tendril.conflist"));
        }
        sim::delete_netns(&sim::underlay_netns(&self.cluster));
        Ok(())
    }

    async fn pod_add(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let file = self.pod_file(ns, name);
        if let Ok(state) = read_json::<PodState>(&file) {
            let current = pods.get_opt(name).await?;
            let same = current
                .as_ref()
                .is_some_and(|p| p.uid().as_deref() == Some(&state.uid));
            if same && sim::netns_path(&state.netns).exists() {
                println!(
                    "{ns}/{name} already runs on {} with {:?}",
                    state.node, state.ips
                );
                return Ok(());
            }
            // A half-gone pod (e.g. the namespaces were lost): tear it down, start over.
            self.pod_del(ns, name).await?;
        }
        let handle = self.handle(node)?;
        sim::ensure_namespace(&self.client, ns).await?;
        let pod = match pods.get_opt(name).await? {
            // Bound to this node but without a sandbox (e.g. `down` ran without an API
            // server): a kubelet starts a sandbox for it.
            Some(existing)
                if existing.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                    && existing.metadata.deletion_timestamp.is_none() =>
            {
                sim::SimPod::start(&self.client, &handle, &existing, std::time::Instant::now())
                    .await?
            }
            Some(other) => bail!(
                "{ns}/{name} exists (uid {}) on another node or terminating; delete it first",
                other.uid().unwrap_or_default()
            ),
            None => sim::SimPod::run(&self.client, &handle, ns, name, labels).await?,
        };
        std::fs::create_dir_all(self.pods_dir())?;
        write_json(
            &file,
            &PodState {
                namespace: ns.into(),
                name: name.into(),
                uid: pod.uid.clone(),
                node: node.into(),
                container_id: pod.sandbox.container_id.clone(),
                netns: pod.sandbox.netns.clone(),
                ips: pod.ips.clone(),
            },
        )?;
        println!("{ns}/{name} runs on {node} with {:?}", pod.ips);
        // The sandbox outlives this process.
        pod.keep();
        Ok(())
    }

    async fn pod_del(&self, ns: &str, name: &str) -> Result<()> {
        let file = self.pod_file(ns, name);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let Ok(state) = read_json::<PodState>(&file) else {
            bail!("{ns}/{name} is not run by tendril-sim");
        };
        let sandbox = Sandbox {
            container_id: state.container_id.clone(),
            netns: state.netns.clone(),
            namespace: ns.into(),
            pod: name.into(),
            pod_uid: state.uid.clone(),
        };
        let uid_only = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: Some(state.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        ignore_gone(pods.delete(name, &uid_only).await)?;
        match self.handle(&state.node) {
            Ok(handle) => {
                sim::teardown_sandbox(&handle, &sandbox).await?;
            }
            Err(e) => eprintln!("{ns}/{name}: no CNI DEL ({e:#})"),
        }
        sim::delete_netns(&state.netns);
        ignore_gone(pods.delete(name, &uid_only.grace_period(0)).await)?;
        std::fs::remove_file(&file)?;
        println!("{ns}/{name} deleted");
        Ok(())
    }

    fn pod_states(&self) -> Result<Vec<PodState>> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(self.pods_dir()) {
            for e in dir {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "json") {
                    out.push(read_json(&p)?);
                }
            }
        }
        out.sort_by(|a: &PodState, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(out)
    }
}

fn ignore_gone<T>(r: Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn split_pod(pod: &str) -> Result<(&str, &str)> {
    pod.split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
        .with_context(|| format!("{pod:?}: expected NAMESPACE/NAME"))
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

/// The demo: web and client pods in two namespaces, same labels in both, spread over the
/// nodes (web on every node, so same-node and cross-node pairs exist).
fn demo_pods(nodes: &[String]) -> Vec<(&'static str, String, String, &'static str)> {
    let n = |i: usize| nodes[i % nodes.len()].clone();
    vec![
        ("demo", "web-1".into(), n(0), "web"),
        ("demo", "web-2".into(), n(1), "web"),
        ("demo", "client".into(), n(0), "client"),
        ("demo-2", "web-1".into(), n(1), "web"),
        ("demo-2", "client".into(), n(1), "client"),
    ]
}

async fn run(cli: Cli) -> Result<()> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&cli.kubeconfig)?,
        &Default::default(),
    )
    .await?;
    let bin_dir = match cli.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf(),
    };
    let sim = Sim {
        client: Client::try_from(config)?,
        run_dir: cli.run_dir,
        cluster: cli.cluster,
        bin_dir,
    };
    std::fs::create_dir_all(&sim.run_dir)?;
    match cli.command {
        Cmd::NodesUp { nodes } => sim.nodes_up(&nodes).await,
        Cmd::WaitReady {
            timeout_seconds,
            nodes,
        } => {
            for node in &nodes {
                sim::wait_node_network_ready(
                    &sim.client,
                    node,
                    Duration::from_secs(timeout_seconds),
                )
                .await?;
                println!("{node} ready");
            }
            Ok(())
        }
        Cmd::NodesDown { nodes } => sim.nodes_down(&nodes).await,
        Cmd::PodAdd { pod, node, labels } => {
            let (ns, name) = split_pod(&pod)?;
            sim.pod_add(ns, name, &node, &parse_labels(&labels)?).await
        }
        Cmd::PodDel { pod } => {
            let (ns, name) = split_pod(&pod)?;
            sim.pod_del(ns, name).await
        }
        Cmd::DemoUp { nodes } => {
            for (ns, name, node, app) in demo_pods(&nodes) {
                let labels = BTreeMap::from([
                    ("app".to_string(), app.to_string()),
                    ("tier".to_string(), "demo".to_string()),
                ]);
                sim.pod_add(ns, &name, &node, &labels).await?;
            }
            Ok(())
        }
        Cmd::PodsDown => {
            for p in sim.pod_states()? {
                sim.pod_del(&p.namespace, &p.name).await?;
            }
            Ok(())
        }
        Cmd::Pods => {
            for p in sim.pod_states()? {
                let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
                println!(
                    "{}/{} {} {} {}",
                    p.namespace,
                    p.name,
                    p.node,
                    ips.join(","),
                    p.netns
                );
            }
            Ok(())
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tendril-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
