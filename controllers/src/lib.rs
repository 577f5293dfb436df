//! tendril-operator: one reconciler per concern on the shared harness of `tendril-runtime`.

/// A slim cache type for a Kubernetes kind (`$slim`, with a `metadata: ObjectMeta` field
/// and `Default` + `Deserialize`): the API identity of `$full`, its metadata, and
/// `From<&$full>` decoding as the watch does (for tests and callers holding a full object).
macro_rules! slim_resource {
    ($slim:ty, $full:ty) => {
        impl k8s_openapi::Resource for $slim {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $slim {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }

        impl From<&$full> for $slim {
            fn from(full: &$full) -> Self {
                serde_json::to_value(full)
                    .and_then(serde_json::from_value)
                    .unwrap_or_default()
            }
        }
    };
}

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
