//! tendril-operator: one reconciler per concern on the shared harness of `tendril-runtime`.
pub mod config;
pub mod endpoints;
pub mod identities;
pub mod ipam;
pub mod nodes;
pub mod policy;
