//! `tendril-relay`: Hubble's Observer API over every agent of the cluster (GetFlows merged
//! in time order, ServerStatus, GetNodes), so `hubble observe` and `hubble status` answer
//! for the whole cluster from one address (Hubble relay's port, 4245).

use clap::Parser;
use std::net::SocketAddr;
use std::process::ExitCode;
use tendril_datapath::flows::{observer, relay};
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
    let shutdown = runtime::shutdown_on_signal();
    let relay = relay::Relay::new(relay::Peers {
        fixed: cli.peers.clone(),
        dns: cli.peer_service.clone(),
    });
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
