//! The pinned maps, typed.
//!
//! - The layout, re-exported here: the `#[repr(C)]` mirrors of every key and
//!   value in `bpf/lib/maps.h`, the map names and the C constants the Rust side relies on;
//!   `tests/bpf_map_layout.rs` and `tests/bpf_constants.rs` check them against the objects.
//! - [`PinnedMap<K, V>`]: one pinned map keyed as the kernel stores it, with
//!   `converge(desired, prune) -> Report<K>`; [`Report`] and [`Diff`] are its pure half.
//! - One module per map: [`Endpoints`], [`Ipcache`], [`PolicyMaps`] (`policy`,
//!   `policy_state` and `policy_cidrs`, which are written in one order), [`Conntrack`],
//!   [`Metrics`], [`NodeConfigMap`], [`LbMaps`] (the services maps of `bpf/lib/lb.h`), [`EgressMaps`] (`bpf/lib/egress.h`). The `events` ring buffer is opened by
//!   [`crate::bpf::Dataplane::open_events`].

mod any_key;
mod conntrack;
mod egress;
mod endpoints;
mod ipcache;
mod layout;
mod lb;
mod metrics;
mod node_config;
mod pinned;
mod policy;
mod policy_order;
mod reason;
mod report;

pub use any_key::AnyKey;
pub use conntrack::Conntrack;
pub use egress::EgressMaps;
pub use endpoints::Endpoints;
pub use ipcache::Ipcache;
pub use layout::*;
pub use lb::{LbItem, LbMaps, LbState};
pub use metrics::{MetricSample, Metrics};
pub use node_config::NodeConfigMap;
pub(crate) use pinned::open_pin;
pub use pinned::{Backend, DataplaneError, LpmKey, MapKey, MapPressure, PinnedMap};
pub use policy::{PolicyItem, PolicyMaps};
pub use policy_order::{PolicyStep, interim_state_writes, policy_steps, policy_write_order};
pub use reason::*;
pub use report::{Counts, Diff, Failure, MapWriteError, Op, Report, diff};
