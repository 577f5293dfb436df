//! `tendril-operator`: every cluster-wide concern, run while this replica holds the lease.

use anyhow::Context as _;
use clap::Parser;
use futures::FutureExt;
use std::process::ExitCode;
use std::sync::Arc;
use tendril_controllers::config::{OperatorArgs, OperatorConfig};
use tendril_controllers::{
    Term, bgp, egress, encryption, endpoints, identities, ipam, lbipam, nodes, policy, services,
};
use tendril_runtime::config;
use tendril_runtime::{
    self as runtime, Caches, Concern, Context, Health, Metrics, leader, logging, server,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Every concern of the operator; adding one is one line.
const CONCERNS: &[Concern<Term>] = &[
    Concern {
        name: nodes::NAME,
        run: |ctx, term| nodes::run(ctx, term.config.nodes.clone()).boxed(),
    },
    Concern {
        name: ipam::NAME,
        run: |ctx, term| ipam::run(ctx, term.config.ipam.clone()).boxed(),
    },
    Concern {
        name: identities::NAME,
        run: |ctx, term| {
            identities::run(ctx, term.config.identities.clone(), term.identities.clone()).boxed()
        },
    },
    Concern {
        name: endpoints::NAME,
        run: |ctx, term| {
            endpoints::run(ctx, term.config.identities.clone(), term.identities.clone()).boxed()
        },
    },
    Concern {
        name: policy::NAME,
        run: |ctx, term| policy::run(ctx, term.config.policy.clone()).boxed(),
    },
    Concern {
        name: services::NAME,
        run: |ctx, term| services::run(ctx, term.config.services.clone()).boxed(),
    },
    Concern {
        name: bgp::NAME,
        run: |ctx, term| bgp::run(ctx, term.config.bgp.clone()).boxed(),
    },
    Concern {
        name: lbipam::NAME,
        run: |ctx, _term| lbipam::run(ctx).boxed(),
    },
    Concern {
        name: egress::NAME,
        run: |ctx, term| egress::run(ctx, term.config.egress.clone()).boxed(),
    },
    Concern {
        name: encryption::NAME,
        run: |ctx, term| encryption::run(ctx, term.config.encryption.clone()).boxed(),
    },
];

fn main() -> ExitCode {
    tendril_runtime::process::block_on(operator_main())
}

async fn operator_main() -> ExitCode {
    let args = OperatorArgs::parse();
    let config = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril-operator: {e}");
            return ExitCode::from(2);
        }
    };
    if args.common.print_config {
        print!("{}", config::to_yaml(&config));
        return ExitCode::SUCCESS;
    }
    logging::init(&config.logging);
    match run(args, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "tendril-operator failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: OperatorArgs, config: OperatorConfig) -> anyhow::Result<()> {
    let shutdown = runtime::shutdown_on_signal();
    let metrics = Arc::new(Metrics::new(env!("CARGO_PKG_VERSION")));
    let health = Health::default();
    let (listener, addr) = server::bind(&config.http.bind_address)
        .await
        .with_context(|| format!("binding {}", config.http.bind_address))?;
    info!(%addr, version = env!("CARGO_PKG_VERSION"), "serving /metrics, /healthz, /readyz");
    // The server outlives the controllers so /metrics answers until the lease is released.
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        health.clone(),
        server_stop.clone(),
    ));

    let client = config::kube_client(args.common.kubeconfig.as_deref())
        .await
        .context("building the Kubernetes client")?;
    // One watch per kind for the whole process: the caches outlive every leadership term,
    // so a new term starts from complete stores.
    let caches = Caches::new(client.clone(), &metrics);
    let ctx = Context {
        client,
        caches,
        metrics,
        health,
        backoff: config.backoff.clone(),
        shutdown: shutdown.clone(),
    };
    let identity = args
        .leader_identity
        .clone()
        .unwrap_or_else(leader::default_identity);
    let config = Arc::new(config);
    leader::run_maybe_leader(
        ctx.client.clone(),
        &config.leader_election,
        &identity,
        &ctx.metrics,
        &ctx.health,
        shutdown.clone(),
        |term| {
            let ctx = ctx.with_shutdown(term);
            let term = Arc::new(Term::start(&ctx, config.clone()));
            async move { runtime::run_concerns(CONCERNS, ctx, term).await }
        },
    )
    .await;
    server_stop.cancel();
    server.await??;
    info!("stopped");
    Ok(())
}
