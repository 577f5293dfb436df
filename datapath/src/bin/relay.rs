//! `tendril-relay`: Hubble's Observer API over every agent of the cluster (GetFlows merged
//! in time order, ServerStatus, GetNodes), so `hubble observe` and `hubble status` answer
//! for the whole cluster from one address (Hubble relay's port, 4245), and the live
//! service map page over the same flows (Hubble UI's port, 12000).

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use tendril_datapath::flows::{observer, relay, servicemap};
use tendril_runtime::{self as runtime, logging};

#[derive(Debug, Parser)]
#[command(
    name = "tendril-relay",
    version,
    about = "Hubble-compatible relay over every Tendril agent"
)]
struct Cli {
    /// Address the relay's Observer API listens on.
    #[arg(long, env = "TENDRIL_RELAY_LISTEN", default_value = "0.0.0.0:4245")]
    listen: SocketAddr,
    /// Address of the service map page and its API, e.g. 0.0.0.0:12000 (Hubble UI's port;
    /// the kustomize base and hack/up.sh set it); `off`: none.
    #[arg(long, env = "TENDRIL_RELAY_UI_LISTEN", default_value = "off")]
    ui_listen: String,
    /// An agent's Observer API, host:port (repeatable).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<String>,
    /// A DNS name:port resolved on every request, each address an agent (the agents'
    /// headless Service in a cluster).
    #[arg(long, env = "TENDRIL_RELAY_PEER_SERVICE", value_name = "NAME:PORT")]
    peer_service: Option<String>,
    /// text | json
    #[arg(long, env = "TENDRIL_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[arg(long, env = "TENDRIL_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format.as_str() {
        "json" => logging::LogFormat::Json,
        "text" => logging::LogFormat::Text,
        other => {
            eprintln!("tendril-relay: --log-format must be text or json, not {other:?}");
            return ExitCode::from(2);
        }
    };
    logging::init(&logging::LoggingConfig {
        format,
        level: cli.log_level.clone(),
    });
    if cli.peers.is_empty() && cli.peer_service.is_none() {
        eprintln!(
            "tendril-relay: name the agents with --peer HOST:PORT or --peer-service NAME:PORT"
        );
        return ExitCode::from(2);
    }
    let ui_listen: Option<SocketAddr> = match cli.ui_listen.as_str() {
        "off" => None,
        addr => match addr.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("tendril-relay: --ui-listen must be HOST:PORT or off, not {addr:?}: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let shutdown = runtime::shutdown_on_signal();
    let relay = relay::Relay::new(relay::Peers {
        fixed: cli.peers.clone(),
        dns: cli.peer_service.clone(),
    });
    if let Some(addr) = ui_listen {
        match servicemap::serve(addr, relay.clone(), shutdown.clone()).await {
            Ok((bound, server)) => {
                tracing::info!(%bound, "serving the service map");
                tokio::spawn(async move {
                    if let Err(e) = server.await {
                        tracing::error!(error = %e, "the service map server failed");
                    }
                });
            }
            Err(e) => {
                eprintln!("tendril-relay: binding the service map on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let (bound, server) = match observer::serve(cli.listen, relay, shutdown).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tendril-relay: binding {}: {e}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(%bound, peers = ?cli.peers, peer_service = ?cli.peer_service, "serving Hubble's Observer API for the cluster");
    match server.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tendril-relay failed");
            ExitCode::FAILURE
        }
    }
}
