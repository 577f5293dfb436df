//! Packet directions and metric reasons: the keys of the `metrics` map, mirrored from
//! `bpf/lib/metrics.h` (`datapath/tests/bpf_constants.rs` checks the numbers).

/// Direction of a counted packet, seen from the pod (`DIR_*` in common.h).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress = 1,
    Egress = 2,
}

impl Direction {
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            1 => Some(Self::Ingress),
            2 => Some(Self::Egress),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// `enum metric_reason` of metrics.h. Below 128: forwarding outcomes; from
/// 128: drops.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MetricReason {
    ForwardLocal = 1,
    ForwardTunnel = 2,
    ToStackUnknown = 3,
    ToStackNative = 4,
    ToStackNonIpv4 = 5,
    ToStackHost = 6,
    DeliverViaStack = 7,
    PolicyAudit = 8,
    EventLost = 9,
    LbTranslated = 10,
    LbRejected = 11,
    LbSnatPortReused = 12,
    EgressRedirect = 13,
    EgressSnat = 14,
    EgressSnatPortReused = 15,
    LbClientPortRemapped = 16,
    DropInvalidSource = 130,
    DropInvalidPacket = 131,
    DropTtlExceeded = 132,
    DropPolicy = 133,
    DropNoTunnelDevice = 134,
    DropTunnelKey = 135,
    DropIdentityTooLarge = 136,
    DropNoTunnelEndpoint = 137,
    DropUnsupportedL3 = 138,
    DropPolicyDeny = 139,
    DropLbNoBackend = 140,
    DropLbSourceRange = 141,
    DropLbNoRoute = 142,
    DropLbNat = 143,
    DropEgressNoGateway = 144,
    DropEgressSnat = 145,
    DropEgressUnsupported = 146,
    DropEgressNotGateway = 147,
    /// IPv6 to or from an endpoint with policy, while the node enforces none for IPv6.
    DropIpv6PolicyNotEnforced = 148,
}

impl MetricReason {
    pub const ALL: [Self; 35] = [
        Self::ForwardLocal,
        Self::ForwardTunnel,
        Self::ToStackUnknown,
        Self::ToStackNative,
        Self::ToStackNonIpv4,
        Self::ToStackHost,
        Self::DeliverViaStack,
        Self::PolicyAudit,
        Self::EventLost,
        Self::LbTranslated,
        Self::LbRejected,
        Self::LbSnatPortReused,
        Self::EgressRedirect,
        Self::EgressSnat,
        Self::EgressSnatPortReused,
        Self::LbClientPortRemapped,
        Self::DropInvalidSource,
        Self::DropInvalidPacket,
        Self::DropTtlExceeded,
        Self::DropPolicy,
        Self::DropNoTunnelDevice,
        Self::DropTunnelKey,
        Self::DropIdentityTooLarge,
        Self::DropNoTunnelEndpoint,
        Self::DropUnsupportedL3,
        Self::DropPolicyDeny,
        Self::DropLbNoBackend,
        Self::DropLbSourceRange,
        Self::DropLbNoRoute,
        Self::DropLbNat,
        Self::DropEgressNoGateway,
        Self::DropEgressSnat,
        Self::DropEgressUnsupported,
        Self::DropEgressNotGateway,
        Self::DropIpv6PolicyNotEnforced,
    ];

    pub fn from_raw(raw: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| *reason as u8 == raw)
    }

    pub fn is_drop(self) -> bool {
        self as u8 >= 128
    }

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForwardLocal => "forward_local",
            Self::ForwardTunnel => "forward_tunnel",
            Self::ToStackUnknown => "to_stack_unknown_destination",
            Self::ToStackNative => "to_stack_native_routing",
            Self::ToStackNonIpv4 => "to_stack_non_ipv4",
            Self::ToStackHost => "to_stack_host",
            Self::DeliverViaStack => "deliver_via_stack",
            Self::PolicyAudit => "policy_audit",
            Self::EventLost => "event_lost",
            Self::LbTranslated => "service_translated",
            Self::LbRejected => "service_rejected",
            Self::LbSnatPortReused => "service_snat_port_reused",
            Self::LbClientPortRemapped => "service_client_port_remapped",
            Self::DropLbNoBackend => "service_no_backend",
            Self::DropLbSourceRange => "service_source_range",
            Self::DropLbNoRoute => "service_no_route",
            Self::DropLbNat => "service_nat",
            Self::EgressRedirect => "egress_redirect",
            Self::EgressSnat => "egress_snat",
            Self::EgressSnatPortReused => "egress_snat_port_reused",
            Self::DropEgressNoGateway => "egress_no_gateway",
            Self::DropEgressSnat => "egress_snat_failed",
            Self::DropEgressUnsupported => "egress_unsupported_protocol",
            Self::DropEgressNotGateway => "egress_not_gateway",
            Self::DropIpv6PolicyNotEnforced => "ipv6_policy_not_enforced",
            Self::DropInvalidSource => "invalid_source",
            Self::DropInvalidPacket => "invalid_packet",
            Self::DropTtlExceeded => "ttl_exceeded",
            Self::DropPolicy => "policy_denied",
            Self::DropPolicyDeny => "policy_deny_rule",
            Self::DropNoTunnelDevice => "no_tunnel_device",
            Self::DropTunnelKey => "tunnel_key",
            Self::DropIdentityTooLarge => "identity_too_large",
            Self::DropNoTunnelEndpoint => "no_tunnel_endpoint",
            Self::DropUnsupportedL3 => "unsupported_l3",
        }
    }
}
