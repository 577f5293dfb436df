//! The encryption concern's metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tendril_runtime as runtime;

pub(super) struct Metrics {
    pub(super) selected_nodes: Gauge,
    pub(super) encrypted_nodes: Gauge,
    pub(super) invalid_policies: Gauge,
    pub(super) rotations: Counter,
    pub(super) node_writes: Counter,
    pub(super) key_secrets: Gauge,
    pub(super) key_secrets_made: Counter,
}

impl Metrics {
    pub(super) fn new(m: &runtime::Metrics) -> Self {
        Self {
            selected_nodes: m.domain(
                "tendril_encryption_selected_nodes",
                "Nodes an EncryptionPolicy selects",
                Gauge::default,
            ),
            encrypted_nodes: m.domain(
                "tendril_encryption_encrypted_nodes",
                "Selected nodes whose agents encrypt to every peer with the current key generation",
                Gauge::default,
            ),
            invalid_policies: m.domain(
                "tendril_encryption_invalid_policies",
                "EncryptionPolicies with Valid=False (their nodes keep what they had)",
                Gauge::default,
            ),
            rotations: m.domain(
                "tendril_encryption_key_rotations",
                "Key generations started (interval elapsed or rotation requested)",
                Counter::default,
            ),
            node_writes: m.domain(
                "tendril_encryption_node_writes",
                "NodeNetwork spec.encryption writes",
                Counter::default,
            ),
            key_secrets: m.domain(
                "tendril_encryption_ipsec_key_secrets",
                "IPsec key Secrets in use (the current generation, the next while rotating, the previous while a node still uses it)",
                Gauge::default,
            ),
            key_secrets_made: m.domain(
                "tendril_encryption_ipsec_keys_made",
                "IPsec key Secrets made (one per policy and key generation)",
                Counter::default,
            ),
        }
    }
}
