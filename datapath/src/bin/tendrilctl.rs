//! `tendrilctl`: status, endpoints, identities, policy trace and flows of a Tendril cluster.
//! Installed as `kubectl-tendril` on PATH it is also `kubectl tendril ...`.
//!
//! Exit codes: 0 fine, 1 a problem found (a node not Realized, a traced packet denied),
//! 2 bad usage or the cluster / Observer API unreachable.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use tendril_crds::v1alpha1::{Endpoint, Identity, ResolvedPolicy, ResolvedPolicySpec};
use tendril_datapath::agent::pass::policy::ClusterNamedPorts;
use tendril_datapath::bpf::maps::Direction;
use tendril_datapath::ctl::table::{Table, terminal_width};
use tendril_datapath::ctl::trace::{Packet, TraceEndpoint, trace};
use tendril_datapath::ctl::{Output, emit, exit, observe, status};
use tendril_datapath::flows::proto::observer::get_flows_response::ResponseTypes;
use tendril_datapath::flows::proto::observer::observer_client::ObserverClient;

#[derive(Parser, Debug)]
#[command(
    name = "tendrilctl",
    version,
    about = "Inspect a Tendril cluster: status, endpoints, identities, policy trace, flows",
    after_help = "Exit codes: 0 ok, 1 a problem found (node not Realized, packet denied), \
                  2 usage or connection error.\nAs a kubectl plugin: install this binary as \
                  `kubectl-tendril` on PATH and run `kubectl tendril ...`."
)]
struct Cli {
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t)]
    output: Output,
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context.
    #[arg(long, global = true)]
    context: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Operator leadership, agents' realization, map pressure, BGP and egress routes.
    Status {
        #[arg(long, default_value = "tendril-system")]
        lease_namespace: String,
        #[arg(long, default_value = "tendril-operator")]
        lease_name: String,
        /// The agents' metrics port (agent.yaml `metrics.bindAddress`), read at the node
        /// addresses for `tendril_bpf_map_pressure`; 0 skips it.
        #[arg(long, default_value_t = 9962)]
        agent_metrics_port: u16,
        /// `NODE=HOST:PORT`: where that node's agent serves /metrics (instead of the node's
        /// addresses); repeatable.
        #[arg(long, value_parser = node_address)]
        agent_metrics: Vec<(String, String)>,
        /// `HOST:PORT` of the operator's health port: its /readyz decides readiness when the
        /// operator runs without leader election (no Lease).
        #[arg(long)]
        operator_health: Option<String>,
    },
    /// Endpoints (one per pod).
    #[command(subcommand, alias = "ep")]
    Endpoint(EndpointCmd),
    /// Security identities.
    #[command(subcommand, alias = "id")]
    Identity(IdentityCmd),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Flows from an agent's or the relay's Observer API (Hubble's).
    Observe {
        /// host:port of the relay (4245) or an agent (4244).
        #[arg(long, env = "TENDRIL_OBSERVER", default_value = "127.0.0.1:4245")]
        server: String,
        /// Flows from or to this pod (`NS/POD`); repeatable.
        #[arg(long)]
        pod: Vec<String>,
        /// Flows from or to this namespace; repeatable.
        #[arg(short, long)]
        namespace: Vec<String>,
        /// FORWARDED, DROPPED, AUDIT, ...; repeatable.
        #[arg(long)]
        verdict: Vec<String>,
        /// Source or destination port; repeatable.
        #[arg(long)]
        port: Vec<u16>,
        /// tcp, udp, icmp, sctp; repeatable.
        #[arg(long)]
        protocol: Vec<String>,
        /// The last N flows (default 20; with --follow, none before following).
        #[arg(long)]
        last: Option<u64>,
        /// Keep printing new flows.
        #[arg(short, long)]
        follow: bool,
    },
    /// A pinned BPF map of this node in readable form (run on the node, as root).
    Bpf {
        map: tendril_datapath::ctl::bpf::MapName,
        /// The agent's `bpffsRoot` (agent.yaml; `--bpffs-root`, TENDRIL_BPFFS_ROOT).
        #[arg(
            long,
            env = "TENDRIL_BPFFS_ROOT",
            default_value = "/sys/fs/bpf/tendril"
        )]
        bpffs_root: PathBuf,
        /// The node whose maps to read (the agent pins them in `<bpffs-root>/<node>`);
        /// default: the only node pinned there.
        #[arg(long)]
        node: Option<String>,
    },
    /// Shell completions: `tendrilctl completion bash > /etc/bash_completion.d/tendrilctl`.
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
enum EndpointCmd {
    /// Every endpoint (of one namespace with -n).
    List {
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// One endpoint: `NS/POD`, or `POD -n NS`.
    Get {
        name: String,
        #[arg(short, long)]
        namespace: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum IdentityCmd {
    /// Every identity.
    List,
    /// One identity by id.
    Get { id: i64 },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// The verdict the datapath gives a packet and the rule that gives it, from the
    /// Endpoints and ResolvedPolicies. Several --from/--to/--port trace every combination.
    /// Exit 1 when any traced packet is denied.
    Trace {
        /// Source pod `NS/POD`; repeatable or comma-separated.
        #[arg(long, required = true, value_delimiter = ',')]
        from: Vec<String>,
        /// Destination pod `NS/POD`; repeatable or comma-separated.
        #[arg(long, required = true, value_delimiter = ',')]
        to: Vec<String>,
        /// `PORT/PROTO` (TCP, UDP, SCTP), `PORT` (TCP) or `ICMP`; repeatable.
        #[arg(long, required = true, value_delimiter = ',')]
        port: Vec<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::ERROR
            } else {
                exit::OK
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tendrilctl: {e:#}");
            exit::ERROR
        }
    };
    std::process::exit(code);
}

async fn client(cli: &Cli) -> Result<Client> {
    let options = kube::config::KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?
        }
        None => kube::Config::from_kubeconfig(&options)
            .await
            .or_else(|_| kube::Config::incluster())
            .context("no kubeconfig (set --kubeconfig or KUBECONFIG)")?,
    };
    Ok(Client::try_from(config)?)
}

async fn run(cli: Cli) -> Result<i32> {
    let output = cli.output;
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "tendrilctl",
                &mut std::io::stdout(),
            );
            Ok(exit::OK)
        }
        Command::Status {
            lease_namespace,
            lease_name,
            agent_metrics_port,
            agent_metrics,
            operator_health,
        } => {
            let client = client(&cli).await?;
            let st = status::collect(
                &client,
                status::LeaseRef {
                    namespace: lease_namespace,
                    name: lease_name,
                },
                &status::Probes {
                    operator_health: operator_health.clone(),
                    agent_metrics_port: Some(*agent_metrics_port).filter(|p| *p != 0),
                    agent_metrics: agent_metrics.iter().cloned().collect(),
                },
            )
            .await?;
            match output {
                Output::Table => print!("{}", st.render(terminal_width())),
                _ => emit(output, &st, Table::default)?,
            }
            Ok(if st.problems.is_empty() {
                exit::OK
            } else {
                exit::PROBLEM
            })
        }
        Command::Endpoint(cmd) => {
            let client = client(&cli).await?;
            let endpoints: Vec<Endpoint> = match cmd {
                EndpointCmd::List { namespace } => {
                    let api: Api<Endpoint> = match namespace {
                        Some(ns) => Api::namespaced(client, ns),
                        None => Api::all(client),
                    };
                    api.list(&ListParams::default()).await?.items
                }
                EndpointCmd::Get { name, namespace } => {
                    let (ns, name) = split_ref(name, namespace.as_deref())?;
                    let api: Api<Endpoint> = Api::namespaced(client, &ns);
                    match api.get_opt(&name).await? {
                        Some(ep) => vec![ep],
                        None => bail!("no Endpoint {ns}/{name}"),
                    }
                }
            };
            let single = matches!(cmd, EndpointCmd::Get { .. });
            emit_list(output, &endpoints, single, || {
                let mut t = Table::new(&[
                    "NAMESPACE",
                    "NAME",
                    "NODE",
                    "IPS",
                    "IDENTITY",
                    "REALIZED",
                    "POLICY-REV",
                ]);
                for ep in &endpoints {
                    let st = ep.status.clone().unwrap_or_default();
                    let realized = st
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Realized")
                        .map_or("-".to_string(), |c| c.status.clone());
                    t.row(vec![
                        ep.namespace().unwrap_or_default(),
                        ep.name_any(),
                        ep.spec.node.clone(),
                        ep.spec.ips.join(","),
                        ep.spec.identity.map_or("-".into(), |i| i.to_string()),
                        realized,
                        st.realized_policy_revision
                            .map_or("-".into(), |r| r.to_string()),
                    ]);
                }
                t
            })?;
            Ok(exit::OK)
        }
        Command::Identity(cmd) => {
            let client = client(&cli).await?;
            let api: Api<Identity> = Api::all(client);
            let (identities, single) = match cmd {
                IdentityCmd::List => {
                    let mut list = api.list(&ListParams::default()).await?.items;
                    list.sort_by_key(|i| i.spec.id);
                    (list, false)
                }
                IdentityCmd::Get { id } => match api.get_opt(&id.to_string()).await? {
                    Some(i) => (vec![i], true),
                    None => bail!("no Identity {id}"),
                },
            };
            emit_list(output, &identities, single, || {
                let mut t = Table::new(&["ID", "REFERENCES", "LABELS"]);
                for i in &identities {
                    t.row(vec![
                        i.spec.id.to_string(),
                        i.status
                            .as_ref()
                            .map_or("-".into(), |s| s.references.to_string()),
                        i.spec
                            .security_labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                    ]);
                }
                t
            })?;
            Ok(exit::OK)
        }
        Command::Policy(PolicyCmd::Trace { from, to, port }) => {
            let packets: Vec<Packet> = port
                .iter()
                .map(|p| Packet::parse(p).map_err(anyhow::Error::msg))
                .collect::<Result<_>>()?;
            let client = client(&cli).await?;
            policy_trace(client, output, from, to, &packets).await
        }
        Command::Bpf {
            map,
            bpffs_root,
            node,
        } => {
            let base = bpffs_root.as_path();
            let node = match node {
                Some(n) => n.clone(),
                None => {
                    let nodes: Vec<String> = std::fs::read_dir(base)
                        .with_context(|| format!("reading {} (the node's bpffs)", base.display()))?
                        .filter_map(|e| e.ok())
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    match nodes.as_slice() {
                        [one] => one.clone(),
                        [] => bail!("no node's maps under {}", base.display()),
                        many => bail!(
                            "several nodes under {}: pass --node ({})",
                            base.display(),
                            many.join(", ")
                        ),
                    }
                }
            };
            let dir = bpffs_root.join(&node);
            let dump = tendril_datapath::ctl::bpf::dump(&dir, *map)
                .with_context(|| format!("reading the maps in {}", dir.display()))?;
            emit(output, &dump.rows, || dump.table.clone())?;
            Ok(exit::OK)
        }
        Command::Observe {
            server,
            pod,
            namespace,
            verdict,
            port,
            protocol,
            last,
            follow,
        } => {
            let request = observe::request(&observe::Filters {
                pods: pod.clone(),
                namespaces: namespace.clone(),
                verdicts: verdict.clone(),
                ports: port.clone(),
                protocols: protocol.clone(),
                last: *last,
                follow: *follow,
            })
            .map_err(anyhow::Error::msg)?;
            let addr = if server.contains("://") {
                server.clone()
            } else {
                format!("http://{server}")
            };
            let channel = tonic::transport::Endpoint::from_shared(addr)?
                .connect_timeout(std::time::Duration::from_secs(5))
                .connect()
                .await
                .with_context(|| format!("connecting to the Observer API at {server}"))?;
            let mut observer = ObserverClient::new(channel);
            let mut stream = observer.get_flows(request).await?.into_inner();
            while let Some(item) = stream.next().await {
                let item = item?;
                match item.response_types {
                    Some(ResponseTypes::Flow(f)) => match output {
                        Output::Table => println!("{}", observe::line(&f)),
                        Output::Json => println!("{}", observe::to_json(&f)),
                        Output::Yaml => {
                            print!("---\n{}", serde_saphyr::to_string(&observe::to_json(&f))?)
                        }
                    },
                    Some(ResponseTypes::LostEvents(l)) => {
                        eprintln!("lost {} flows ({})", l.num_events_lost, item.node_name)
                    }
                    Some(ResponseTypes::NodeStatus(n)) => {
                        eprintln!("node status: {} {:?}", n.message, n.node_names)
                    }
                    None => {}
                }
            }
            Ok(exit::OK)
        }
    }
}

fn node_address(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((node, addr)) if !node.is_empty() && !addr.is_empty() => {
            Ok((node.to_string(), addr.to_string()))
        }
        _ => Err(format!("{s:?}: expected NODE=HOST:PORT")),
    }
}

/// A list, or its single item for `get`.
fn emit_list<T: Serialize>(
    output: Output,
    items: &[T],
    single: bool,
    render: impl FnOnce() -> Table,
) -> Result<()> {
    if single && output != Output::Table {
        emit(output, &items[0], render)
    } else {
        emit(output, &items, render)
    }
}

/// `NS/NAME`, or `NAME` with `-n NS` (default namespace `default`).
fn split_ref(s: &str, namespace: Option<&str>) -> Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.into(), name.into())),
        Some(_) => bail!("{s:?}: expected NAMESPACE/POD"),
        None => Ok((namespace.unwrap_or("default").to_string(), s.to_string())),
    }
}

async fn policy_trace(
    client: Client,
    output: Output,
    from: &[String],
    to: &[String],
    packets: &[Packet],
) -> Result<i32> {
    let endpoints: Api<Endpoint> = Api::all(client.clone());
    let endpoints = endpoints.list(&ListParams::default()).await?.items;
    let policies: Api<ResolvedPolicy> = Api::all(client);
    let policies: BTreeMap<i64, ResolvedPolicySpec> = policies
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|p| (p.spec.identity, p.spec))
        .collect();
    let cluster_ports =
        ClusterNamedPorts::from_endpoints(endpoints.iter().map(|e| e.spec.named_ports.as_slice()));
    let by_name: BTreeMap<(String, String), &Endpoint> = endpoints
        .iter()
        .map(|e| ((e.namespace().unwrap_or_default(), e.name_any()), e))
        .collect();
    let resolve = |s: &String| -> Result<TraceEndpoint<'_>> {
        let (ns, name) = split_ref(s, None)?;
        let ep = by_name
            .get(&(ns.clone(), name.clone()))
            .with_context(|| format!("no Endpoint {ns}/{name} (is the pod running?)"))?;
        let identity = ep
            .spec
            .identity
            .with_context(|| format!("Endpoint {ns}/{name} has no identity yet"))?;
        Ok(TraceEndpoint {
            name: format!("{ns}/{name}"),
            identity: u32::try_from(identity)?,
            ip: ep
                .spec
                .ips
                .iter()
                .find_map(|ip| ip.parse::<Ipv4Addr>().ok()),
            named_ports: &ep.spec.named_ports,
            policy: policies.get(&identity),
            realized_policy_revision: ep.status.as_ref().and_then(|s| s.realized_policy_revision),
        })
    };
    let sources: Vec<TraceEndpoint<'_>> = from.iter().map(&resolve).collect::<Result<_>>()?;
    let destinations: Vec<TraceEndpoint<'_>> = to.iter().map(&resolve).collect::<Result<_>>()?;
    let mut traces = Vec::new();
    for s in &sources {
        for d in &destinations {
            for p in packets {
                traces.push(trace(s, d, &cluster_ports, *p));
            }
        }
    }
    emit(output, &traces, || {
        let mut t = Table::new(&[
            "FROM",
            "TO",
            "PORT",
            "VERDICT",
            "EGRESS (AT FROM)",
            "INGRESS (AT TO)",
        ]);
        for tr in &traces {
            let side = |v: &Option<tendril_datapath::ctl::trace::DirectionVerdict>, d| {
                v.as_ref().map_or("loopback".to_string(), |v| v.summary(d))
            };
            t.row(vec![
                tr.from.clone(),
                tr.to.clone(),
                tr.port.clone(),
                if tr.allowed { "ALLOWED" } else { "DENIED" }.to_string(),
                side(&tr.egress, Direction::Egress),
                side(&tr.ingress, Direction::Ingress),
            ]);
        }
        t
    })?;
    // One packet: the whole explanation under the table.
    if let (Output::Table, [t]) = (output, traces.as_slice()) {
        println!();
        if t.loopback {
            println!("the same pod: loopback, never judged by policy");
        }
        if let Some(v) = &t.egress {
            println!("{}", v.explain(Direction::Egress, &t.from).join("\n"));
        }
        if let Some(v) = &t.ingress {
            println!("{}", v.explain(Direction::Ingress, &t.to).join("\n"));
        }
    }
    if output == Output::Table {
        let warnings: std::collections::BTreeSet<&String> =
            traces.iter().flat_map(|t| &t.warnings).collect();
        for w in warnings {
            eprintln!("warning: {w}");
        }
    }
    Ok(if traces.iter().all(|t| t.allowed) {
        exit::OK
    } else {
        exit::PROBLEM
    })
}
