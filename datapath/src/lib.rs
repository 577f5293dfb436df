//! tendril-agent, tendril-cni and the eBPF datapath.

pub mod agent;
pub mod bgp;
pub mod bpf;
pub mod cni;
pub mod config;
pub mod ctl;
pub mod encryption;
pub mod flows;
pub mod ipam;
pub mod services;
