//! tendril-operator: one reconciler per concern on a shared harness.
pub mod endpoints;
pub mod identities;
pub mod ipam;
pub mod nodes;
pub mod policy;
pub mod runtime;
