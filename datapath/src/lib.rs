//! tendril-agent, tendril-cni and the eBPF datapath.

pub mod bpf;
pub mod agent;
pub mod cni;
pub mod ipam;
