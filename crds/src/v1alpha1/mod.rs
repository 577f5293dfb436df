//! `tendril.dev/v1alpha1`: every kind, one module each.

mod endpoint;
mod identity;
mod node_network;
mod pod_ip_pool;

pub use endpoint::*;
pub use identity::*;
pub use node_network::*;
pub use pod_ip_pool::*;
