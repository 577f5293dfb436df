//! `tendril.dev/v1alpha1`: every kind, one module each.

mod bgp_node_config;
mod bgp_peering_policy;
mod egress_gateway_policy;
mod egress_route;
mod encryption_policy;
mod endpoint;
mod identity;
mod lb_service;
mod load_balancer_ip_pool;
mod network_policy;
mod node_network;
mod pod_ip_pool;
mod resolved_policy;

pub use bgp_node_config::*;
pub use bgp_peering_policy::*;
pub use egress_gateway_policy::*;
pub use egress_route::*;
pub use encryption_policy::*;
pub use endpoint::*;
pub use identity::*;
pub use lb_service::*;
pub use load_balancer_ip_pool::*;
pub use network_policy::*;
pub use node_network::*;
pub use pod_ip_pool::*;
pub use resolved_policy::*;
