//! Service load balancing on the node: pure pieces the agent's services step builds on.

pub mod health_check;
pub mod maglev;
