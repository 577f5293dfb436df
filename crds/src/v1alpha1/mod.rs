//! `tendril.dev/v1alpha1`: every kind, one module each.

mod node_network;

pub use node_network::*;
