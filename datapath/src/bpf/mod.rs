//! The eBPF datapath: the C programs in `datapath/bpf/` (compiled by
//! `build.rs`), their loader, typed mirrors of every map, and convergence of
//! desired state into the maps by diff.
//!
//! - [`loader::Programs`] loads the objects, pins the maps in a node's bpffs
//!   directory and attaches the tc hooks as pinned TCX links.
//! - [`Dataplane`] opens the pinned maps: a struct of typed maps.
//! - [`maps`]: the `#[repr(C)]` key/value types, the generic [`maps::PinnedMap`] and one
//!   module per map.

pub mod dataplane;
pub mod loader;
pub mod maps;
pub mod policy;

pub use dataplane::Dataplane;
pub use loader::{
    AttachError, Hook, LoadError, MapSizes, Programs, SockHook, detach_socket_lb, node_pin_dir,
};
pub use maps::{
    AnyKey, Counts, DataplaneError, Failure, MapPressure, MapWriteError, MetricSample, Op,
    PolicyItem, Report,
};
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
