//! The CNI side: the spec's data types, the agent↔plugin protocol, pod interface plumbing
//! and the plugin's commands.

pub mod api;
pub mod link;
pub mod plugin;
pub mod spec;
