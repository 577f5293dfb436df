//! tendril-operator: one reconciler per concern on the shared harness of `tendril-runtime`.
pub mod bgp;
pub mod config;
pub mod egress;
pub mod encryption;
pub mod endpoints;
pub mod identities;
pub mod ipam;
pub mod lbipam;
pub mod nodes;
pub mod policy;
pub mod services;

use config::OperatorConfig;
use identities::allocator::IdentityAllocator;
use std::sync::Arc;
use tendril_runtime::Context;

/// What the concerns of one leadership term share: the configuration and the identity
/// allocator. The endpoints concern allocates through it and the identities concern
/// collects garbage with the same index, so it never deletes an id this process just
/// handed out. A new term starts a new allocator (numbering after the highest id it finds).
#[derive(Debug)]
pub struct Term {
    pub config: Arc<OperatorConfig>,
    pub identities: IdentityAllocator,
}

impl Term {
    /// The shared state of the term whose context is `ctx` (ends with `ctx.shutdown`).
    pub fn start(ctx: &Context, config: Arc<OperatorConfig>) -> Self {
        Self {
            identities: IdentityAllocator::start(ctx, config.identities.cluster_id_max),
            config,
        }
    }
}
