//! `services` in config/operator.yaml.

use serde::{Deserialize, Serialize};

/// The `services` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServicesConfig {
    /// Changes of the nodes' reports within this long are one pass of status writes.
    pub status_batch_millis: u64,
    /// A new Service without EndpointSlices waits for them at most this long (from its
    /// creation) before its LBService is written.
    pub slice_wait_millis: u64,
    /// Changes of a Service already written within this long of the first are one
    /// LBService write (a replaced pod: its removal and its successor). 0: each at once.
    pub update_batch_millis: u64,
    /// LBService writes applied at once (at least 1).
    pub writes_in_flight: u32,
    /// A revision every node realizes within this long rewrites no `LBService` status;
    /// one still pending after it turns `Realized` False. 0: every revision is reported
    /// while it is pending.
    pub realize_deadline_millis: u64,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        Self {
            status_batch_millis: 100,
            slice_wait_millis: 1000,
            update_batch_millis: 500,
            writes_in_flight: 16,
            realize_deadline_millis: 10_000,
        }
    }
}

impl ServicesConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.writes_in_flight == 0 {
            return Err("services.writesInFlight must be at least 1".into());
        }
        Ok(())
    }
}
