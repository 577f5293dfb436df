//! tendril-operator: one reconciler per concern on a shared harness.
pub mod nodes;
pub mod runtime;
