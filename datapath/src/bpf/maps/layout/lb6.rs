//! `#[repr(C)]` mirrors of the IPv6 services maps' keys and values (`bpf/lib/lb.h`);
//! re-exported by [`super`], checked by `tests/bpf_map_layout.rs` like the rest. The
//! service value ([`super::LbServiceValue`]) and the maps keyed by backend id or rev-nat
//! index alone (`lb_affinity`, `lb_maglev`) are shared with IPv4.

/// The IPv6 services maps.
pub const LB6_SERVICES: &str = "lb6_services";
pub const LB6_BACKENDS: &str = "lb6_backends";
pub const LB6_REVNAT: &str = "lb6_revnat";
pub const LB6_SOCK_REVNAT: &str = "lb6_sock_revnat";

/// `struct lb6_key`: a frontend (address `::`: a NodePort's wildcard entry) in one scope;
/// `backend_slot` 0 is the service, 1..=count its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6Key {
    /// Network order.
    pub address: [u8; 16],
    /// Network order.
    pub dport: [u8; 2],
    pub backend_slot: u16,
    pub proto: u8,
    pub scope: u8,
    pub pad: [u8; 2],
}

/// `struct lb6_backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6Backend {
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    /// `BE_F_*`.
    pub flags: u8,
}

/// `struct lb6_reverse_nat`: the frontend of a rev-nat index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6ReverseNat {
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

/// `struct lb6_sock_revnat_key`: a translated socket and its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Lb6SockRevnatKey {
    pub cookie: u64,
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub pad: [u8; 6],
}

/// `struct lb6_sock_revnat_value`: the frontend the socket connected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Lb6SockRevnatValue {
    pub address: [u8; 16],
    pub port: [u8; 2],
    pub rev_nat_index: u16,
}

// SAFETY: plain `#[repr(C)]` integers and byte arrays without implicit padding (their sizes
// are checked against the objects' BTF).
unsafe impl aya::Pod for Lb6Key {}
unsafe impl aya::Pod for Lb6Backend {}
unsafe impl aya::Pod for Lb6ReverseNat {}
unsafe impl aya::Pod for Lb6SockRevnatKey {}
unsafe impl aya::Pod for Lb6SockRevnatValue {}
