//! The eBPF datapath: the C programs in `datapath/bpf/` (compiled by
//! `build.rs`), their loader, typed mirrors of every map, and convergence of
//! desired state into the maps by diff.
//!
//! - [`loader::Programs`] loads the objects, pins the maps in a node's bpffs
//!   directory and attaches the tc hooks as pinned TCX links.
//! - [`converge::Dataplane`] opens the pinned maps and converges them.
//! - [`maps`] holds the `#[repr(C)]` key/value types.

pub mod converge;
pub mod loader;
pub mod maps;
pub mod policy;

pub use converge::{
    ConvergeFailure, ConvergeReport, Dataplane, DataplaneError, MapPressure, MapWriteError,
    MetricSample,
};
pub use loader::{AttachError, Hook, LoadError, MapSizes, Programs, node_pin_dir};
pub use policy::{
    EventKind, EventVerdict, PolicyEntry, PolicyEvent, PolicyMatch, PolicyState, Verdict,
    monotonic_now_ns, port_range_prefixes, propagate_denies,
};

#[cfg(test)]
mod tests {
    /// The agent keeps both in async tasks.
    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<super::Dataplane>();
        send_sync::<super::Programs>();
    }
}
