//! Concern `ipam`: `PodIPPool` → `NodeNetwork.spec.podCIDRs` (field manager `tendril-ipam`).
//!
//! [`pool`] is the allocator (pure values); the reconciler is the thin shell around it.

pub mod pool;
