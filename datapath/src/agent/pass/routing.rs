//! Step `routing`: the node's netlink state — the VXLAN device (overlay mode), ip_forward,
//! routes to other nodes' pod CIDRs and to local pods, and which host veth serves which
//! local pod address (the wiring the later steps need). See [`super::kernel`].

use super::kernel::{self, NetlinkPlan, TunnelPlan};
use super::{NodeContext, Pass, Step, StepFailure};
use crate::config::RoutingMode;

pub struct Routing;

impl Step for Routing {
    const NAME: &'static str = "routing";

    async fn run(&mut self, node: &NodeContext, pass: &mut Pass) -> Result<(), StepFailure> {
        let cfg = &node.cfg;
        let desired = &pass.desired;
        let plan = NetlinkPlan {
            node_ip: desired.node_ip,
            tunnel: (cfg.routing_mode == RoutingMode::Overlay).then_some(TunnelPlan {
                port: cfg.tunnel_port,
            }),
            tunnel_device: cfg.tunnel_device.clone(),
            routes: desired.routes.clone(),
            local_ips: desired.local.iter().flat_map(|e| e.ips.clone()).collect(),
            prune: true,
        };
        let netns = cfg.node_netns.clone();
        let outcome = tokio::task::spawn_blocking(move || kernel::converge(netns, plan))
            .await
            .map_err(|e| StepFailure::new("NetlinkFailed", e))?
            .map_err(|e| StepFailure::new("NetlinkFailed", e))?;
        for error in &outcome.errors {
            tracing::warn!(%error, "datapath");
        }
        if outcome.routes_added + outcome.routes_deleted > 0 {
            tracing::info!(
                routes_added = outcome.routes_added,
                routes_deleted = outcome.routes_deleted,
                "routes converged"
            );
        }
        pass.netlink = outcome;
        Ok(())
    }
}
