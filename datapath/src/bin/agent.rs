//! `tendril-agent`: the node datapath reconciler. It allocates pod addresses from the
//! node's pod CIDRs and serves them to `tendril-cni` on a unix socket, and converges the
//! node's kernel state (eBPF maps and programs, routes, VXLAN) to the cluster's desired
//! state (`agent::pass`).
//!
//! Two modes:
//! - with Kubernetes (default): the pod CIDRs come from the node's `NodeNetwork`, the
//!   allocations are reconciled with the node's `Endpoint`s and the agent reports in
//!   `NodeNetwork.status`;
//! - standalone (`--pod-cidr`, repeatable, one per family): no API server at all — the
//!   agent serves the given CIDRs at once. For tests and for bringing a node up by hand.

use anyhow::Context as _;
use clap::Parser;
use ipnet::IpNet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tendril_datapath::agent::driver::LoopTiming;
use tendril_datapath::agent::metrics::AgentMetrics;
use tendril_datapath::agent::node::{self, NodeSyncConfig};
use tendril_datapath::agent::pass::{self, PassConfig, metrics::DatapathMetrics};
use tendril_datapath::agent::view::ClusterView;
use tendril_datapath::agent::{Agent, host, server};
use tendril_datapath::bgp;
use tendril_datapath::config::{AgentArgs, AgentConfig};
use tendril_datapath::encryption::device;
use tendril_datapath::flows;
use tendril_datapath::ipam::Ipam;
use tendril_runtime::config;
use tendril_runtime::{self as runtime, Caches, Health, Metrics, logging, server as http};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "tendril-agent",
    version,
    about = "Tendril's node datapath reconciler"
)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
    /// Standalone mode: serve this pod CIDR without Kubernetes (repeat for dual stack).
    #[arg(long = "pod-cidr", value_name = "CIDR")]
    pod_cidrs: Vec<IpNet>,
    /// Release an allocation no live Endpoint uses only once it is this old (seconds).
    #[arg(long, env = "TENDRIL_IPAM_LEAK_GRACE_SECONDS", default_value_t = 300)]
    ipam_leak_grace_seconds: u64,
    /// The node's network namespace (a path such as /var/run/netns/node1) when the agent
    /// runs outside it, as for simulated nodes: the process stays where it reaches the API
    /// server and configures the node's namespace. Default: the agent's own namespace.
    #[arg(long, env = "TENDRIL_NODE_NETNS", value_name = "PATH")]
    node_netns: Option<std::path::PathBuf>,
    /// Reconcile allocations with Endpoints at least this often (seconds).
    #[arg(long, env = "TENDRIL_IPAM_RESYNC_SECONDS", default_value_t = 60)]
    ipam_resync_seconds: u64,
}

fn main() -> ExitCode {
    // The userspace WireGuard device runs as a process of its own (see its module).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(device::SUBCOMMAND) {
        return device::process_main(&args[2..]);
    }
    tendril_runtime::process::block_on(agent_main())
}

async fn agent_main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.agent.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.agent.common.print_config {
        print!("{}", config::to_yaml(&config));
        return ExitCode::SUCCESS;
    }
    logging::init(&config.logging);
    match run(cli, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "tendril-agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, config: AgentConfig) -> anyhow::Result<()> {
    let shutdown = runtime::shutdown_on_signal();
    let ipam_dir = config.state_dir.join("ipam");
    let (ipam, loaded) =
        Ipam::open(&ipam_dir).with_context(|| format!("opening {}", ipam_dir.display()))?;
    for path in &loaded.corrupt {
        warn!(path = %path.display(), "unreadable allocation record set aside");
    }
    info!(allocations = ipam.allocations().count(), dir = %ipam_dir.display(), "allocations loaded");

    let metrics = Arc::new(Metrics::new(env!("CARGO_PKG_VERSION")));
    let agent = Arc::new(Agent::new(
        ipam,
        config.mtu,
        AgentMetrics::register(&metrics),
    ));
    let health = Health::default();

    let (listener, addr) = http::bind(&config.http.bind_address)
        .await
        .with_context(|| format!("binding {}", config.http.bind_address))?;
    info!(%addr, version = env!("CARGO_PKG_VERSION"), "serving /metrics, /healthz, /readyz, /flows");
    let http_stop = CancellationToken::new();
    let flows = pass::events::FlowLog::new(config.policy.events.recent_flows);
    let app =
        http::router(metrics.clone(), health.clone()).merge(pass::events::router(flows.clone()));
    let http_shutdown = http_stop.clone().cancelled_owned();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(http_shutdown)
            .await
    });

    let socket = server::bind(&config.cni_socket)
        .with_context(|| format!("binding {}", config.cni_socket.display()))?;
    info!(path = %config.cni_socket.display(), "serving the CNI plugin");
    let socket_task = tokio::spawn(server::serve(socket, agent.clone(), shutdown.clone()));

    if cli.pod_cidrs.is_empty() {
        let client = config::kube_client(cli.agent.common.kubeconfig.as_deref())
            .await
            .context("building the Kubernetes client")?;
        // One watch per kind for the whole process, shared by the node sync and the passes.
        let caches = Caches::new(client.clone(), &metrics);
        let view = ClusterView::new(&caches, &config.node_name);
        let sync = NodeSyncConfig {
            node_name: config.node_name.clone(),
            leak_grace: Duration::from_secs(cli.ipam_leak_grace_seconds),
            node_netns: cli.node_netns.clone(),
        };
        let sync_timing = LoopTiming {
            resync: Duration::from_secs(cli.ipam_resync_seconds.max(1)),
            debounce: Duration::ZERO,
            backoff: config.backoff.clone(),
        };
        let pass_cfg = PassConfig {
            node_name: config.node_name.clone(),
            node_netns: cli.node_netns.clone(),
            // Per node, so agents of simulated nodes sharing a bpffs root never share maps.
            pin_dir: config.bpffs_root.join(&config.node_name),
            routing_mode: config.routing_mode,
            tunnel_device: config.tunnel_device.clone(),
            tunnel_port: config.tunnel_port,
            map_sizes: config.bpf_map_sizes,
            timing: config.pass_timing(),
            policy: config.policy.clone(),
            services: config.services.clone(),
        };
        let hubble = start_flows(&config, &view, &metrics, shutdown.clone()).await?;
        let datapath_task = pass::run(
            client.clone(),
            view.clone(),
            DatapathMetrics::register(&metrics),
            health.clone(),
            pass_cfg,
            pass::AgentLinks {
                flows,
                hubble,
                pod_netns: {
                    let agent = agent.clone();
                    Arc::new(move || agent.pod_netns_paths())
                },
            },
            shutdown.clone(),
        );
        let datapath_task = async {
            if let Err(e) = datapath_task.await {
                // Pods keep being served addresses; /readyz reports the datapath check as
                // failing until a restart fixes what broke (e.g. no bpffs, no CAP_BPF).
                error!(error = %e, "the datapath reconciler could not start");
            }
        };
        let bgp_client = client.clone();
        let bgp_task = async {
            if !config.bgp.enabled {
                return;
            }
            let bgp = &config.bgp;
            let cfg = bgp::node::BgpNodeConfig {
                node_name: config.node_name.clone(),
                daemon: bgp::daemon::DaemonConfig {
                    gobgpd: bgp.gobgpd_path.clone(),
                    socket: config.bgp_api_socket(),
                    netns: cli.node_netns.clone(),
                    restart_min: Duration::from_millis(bgp.restart_min_millis),
                    restart_max: Duration::from_millis(bgp.restart_max_millis),
                },
                listen_port: bgp.listen_port,
                secrets_namespace: bgp.secrets_namespace.clone(),
                timing: LoopTiming {
                    resync: Duration::from_secs(bgp.status_interval_seconds),
                    debounce: Duration::from_millis(config.datapath_debounce_millis),
                    backoff: config.backoff.clone(),
                },
            };
            bgp::node::run(
                bgp_client,
                bgp::node::node_config_cache(&caches, &config.node_name),
                bgp::node::secrets_cache(&caches, &bgp.secrets_namespace),
                cfg,
                bgp::metrics::BgpMetrics::register(&metrics),
                shutdown.clone(),
            )
            .await;
        };
        let encryption_task = tendril_datapath::encryption::node::EncryptionNode {
            client: client.clone(),
            node_name: config.node_name.clone(),
            node_netns: cli.node_netns.clone(),
            state_dir: config.state_dir.clone(),
            routing_mode: config.routing_mode,
            tunnel_port: config.tunnel_port,
            config: config.encryption.clone(),
            pod_mtu_cap: agent.mtu_cap(),
            metrics: tendril_datapath::encryption::node::EncryptionMetrics::register(&metrics),
        }
        .run(view.node_networks.clone(), shutdown.clone());
        let node_task = node::run(
            client,
            view,
            agent.clone(),
            health.clone(),
            sync,
            sync_timing,
            shutdown.clone(),
        );
        tokio::join!(datapath_task, node_task, bgp_task, encryption_task);
    } else {
        agent.set_pod_cidrs(&cli.pod_cidrs).context("--pod-cidr")?;
        let (gateways, netns) = (agent.gateways(), cli.node_netns.clone());
        tokio::task::spawn_blocking(move || host::ensure_gateways(netns.as_deref(), gateways))
            .await?
            .context("configuring the gateway device")?;
        agent.set_ready(true);
        info!(pod_cidrs = ?cli.pod_cidrs, "standalone mode: serving pod addresses");
        shutdown.cancelled().await;
    }

    socket_task.await.ok();
    if let Err(e) = std::fs::remove_file(&config.cni_socket) {
        warn!(error = %e, "removing the CNI socket");
    }
    http_stop.cancel();
    http_task.await.ok();
    info!("stopped");
    Ok(())
}

/// Hubble-compatible flows (`flows` in agent.yaml): the ring, the enricher fed by the
/// datapath's event reader, and the Observer gRPC API. Returns the reader's sink.
async fn start_flows(
    config: &AgentConfig,
    view: &ClusterView,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<flows::pipeline::FlowSink>> {
    let cfg = &config.flows;
    if !cfg.enabled {
        return Ok(None);
    }
    let flow_metrics = flows::metrics::FlowMetrics::register(metrics)
        .with_namespace_context(cfg.metrics.namespace_context);
    let ring = flows::ring::FlowRing::new(cfg.ring_size);
    let (sink, queue) = flows::pipeline::queue(cfg.queue_size, flow_metrics.clone());
    let directory = flows::pipeline::DirectoryHandle::default();
    tokio::spawn(directory.clone().follow(view.clone(), shutdown.clone()));
    tokio::spawn(flows::pipeline::enrich(
        queue,
        ring.clone(),
        directory,
        config.node_name.clone(),
        flow_metrics.clone(),
        shutdown.clone(),
    ));
    if !cfg.observer.bind_address.is_empty() {
        let addr: std::net::SocketAddr = cfg
            .observer
            .bind_address
            .parse()
            .context("flows.observer.bindAddress")?;
        let observer =
            flows::observer::AgentObserver::new(ring, config.node_name.clone(), flow_metrics);
        // Flows are for people: an address in use costs the API, never the datapath.
        match flows::observer::serve(addr, observer, shutdown).await {
            Ok((bound, server)) => {
                info!(%bound, "serving Hubble's Observer API");
                tokio::spawn(async move {
                    if let Err(e) = server.await {
                        error!(error = %e, "the Observer API stopped");
                    }
                });
            }
            Err(e) => error!(
                error = %e,
                %addr,
                "the Observer API is not served: binding failed (flows.observer.bindAddress, \
                 --observer-bind); flows are still recorded"
            ),
        }
    }
    Ok(Some(sink))
}
