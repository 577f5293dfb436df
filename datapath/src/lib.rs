//! tendril-agent, tendril-cni and the eBPF datapath.
