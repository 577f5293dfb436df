//! Step `programs`: the tc programs on every local pod's host veth (and the overlay and
//! uplink devices), as pinned TCX links that survive the agent; links of vanished
//! interfaces are pruned. Runs last, so a pod's entries are in the maps before its
//! programs can see its packets.

use super::kernel;
use super::{NodeContext, Pass, Step, StepFailure};

pub struct AttachPrograms;

impl Step for AttachPrograms {
    const NAME: &'static str = "programs";

    async fn run(&mut self, node: &NodeContext, pass: &mut Pass) -> Result<(), StepFailure> {
        let (netns, pin_dir, attacher) = (
            node.cfg.node_netns.clone(),
            node.cfg.pin_dir.clone(),
            node.attacher.clone(),
        );
        let (hooks, present) = (pass.netlink.hooks.clone(), pass.netlink.present.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            kernel::attach(netns, pin_dir, hooks, present, true, attacher)
        })
        .await
        .map_err(|e| StepFailure::new("AttachFailed", e))?
        .map_err(|e| StepFailure::new("AttachFailed", e))?;
        for error in &outcome.errors {
            tracing::warn!(%error, "attaching programs");
        }
        if outcome.links_pruned > 0 {
            tracing::info!(
                links_pruned = outcome.links_pruned,
                "link pins of vanished interfaces removed"
            );
        }
        pass.attached = outcome;
        Ok(())
    }
}
