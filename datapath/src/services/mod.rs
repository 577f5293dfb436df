//! Services on the node: what the `lb_*` maps should hold, as pure functions of the
//! `LBService`s, the node's name and addresses, and the ids the maps already hold.
//!
//! - [`desired`]: frontends × scopes → service entries, backends, rev-nat, source ranges and
//!   Maglev tables ([`desired::lb_state`]).
//! - [`ids`]: backend ids and rev-nat indexes, stable across agent restarts (recovered from
//!   the pinned maps) so established connections keep their translation.
//! - [`kernel`]: netns cookies (whose sockets the socket LB translates) and the cgroup2 mount.
//! - [`maglev`]: the Maglev lookup table every agent builds identically.
//! - [`health_check`]: the health-check node ports of `externalTrafficPolicy: Local` services.

pub mod desired;
pub mod health_check;
pub mod ids;
pub mod kernel;
pub mod maglev;
