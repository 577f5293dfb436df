//! Services on the node: what the `lb_*` maps should hold, as pure functions of the
//! `LBService`s, the node's name and addresses, and the ids the maps already hold.
//!
//! - [`desired`]: frontends × scopes → service entries, backends, rev-nat, source ranges and
//!   Maglev tables ([`desired::lb_state`]).
//! - [`ids`]: backend ids and rev-nat indexes, stable across agent restarts (recovered from
//!   the pinned maps) so established connections keep their translation.
//! - [`kernel`]: netns cookies (whose sockets the socket LB translates) and the cgroup2 mount.
//!
//! The Maglev table itself (`maglev.rs`, `maglev_table(backends, m, seed)`) is the lead's;
//! [`desired::MaglevTable`] is the hook it plugs into (the agent's services step passes
//! `None` until it exists, and the programs then fall back to random selection).

pub mod desired;
pub mod ids;
pub mod kernel;
