//! Concern `endpoints`: Pod + Namespace → `Endpoint` (field manager `tendril-endpoints`).
//!
//! [`desired`] computes the `Endpoint` a pod should have (pure values).

pub mod desired;
