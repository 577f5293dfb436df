//! Network policy testing (issue 6): an independent model of the semantics
//! ([`model`]), real-packet probes and truth tables ([`probe`]), and the upstream netpol
//! e2e topology on simulated nodes ([`world`]).
//!
//! `tests/policy_truth_table.rs` compares probes with the model in the cluster;
//! `tests/policy_model_property.rs` compares the model with the production resolver on
//! random inputs, without a cluster.

pub mod model;
pub mod probe;
pub mod trace;
pub mod world;
