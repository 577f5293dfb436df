//! BGP on the node: the agent drives gobgpd (GoBGP, the engine Cilium embeds) through its
//! gRPC API — one daemon per node, in the node's network namespace, supervised by the
//! agent — from the node's `BGPNodeConfig` (written by the operator's BGP concern), and
//! reports each session in `BGPNodeConfig.status` and `tendril_bgp_*`.
//!
//! - [`api`] — the generated client (`proto/gobgp.proto`) over gobgpd's unix socket;
//! - [`desired`] — the spec → the speaker, peers and paths, and the plan of the difference
//!   with what gobgpd holds (pure);
//! - [`speaker`] — peers and paths to and from GoBGP's messages, and the API calls;
//! - [`daemon`] — starting, supervising and stopping gobgpd;
//! - [`node`] — the loop that ties them together and writes the status;
//! - [`metrics`] — `tendril_bgp_*`.

pub mod api;
pub mod daemon;
pub mod desired;
pub mod metrics;
pub mod node;
pub mod speaker;
