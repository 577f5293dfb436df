//! Facts both binaries (and the tests) rely on, defined once: reserved identity numbers,
//! identity ranges, entity names, and the label and annotation names Tendril writes or reads.
//! The datapath's C headers repeat the numbers they need; `datapath/tests/bpf_constants.rs`
//! checks that they agree with these.

/// The unknown identity (no identity known for a source).
pub const IDENTITY_UNKNOWN: i64 = 0;
/// First cluster identity; below it are the reserved ones.
pub const CLUSTER_IDENTITY_MIN: i64 = 256;
/// Last cluster identity (cluster identities travel in 16 bits of the VXLAN VNI's 24).
pub const CLUSTER_IDENTITY_MAX: i64 = 65535;
/// Node-local CIDR identities are `LOCAL_IDENTITY_FLAG | n`: above every cluster identity,
/// never written to the API and never sent over the overlay.
pub const LOCAL_IDENTITY_FLAG: u32 = 1 << 24;
/// Peer `0` of a `ResolvedPolicy` rule: any peer, any address.
pub const ANY_PEER: i64 = 0;

/// The reserved identities, with the numbers Cilium users know (DESIGN §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reserved {
    Host = 1,
    World = 2,
    Unmanaged = 3,
    Health = 4,
    Init = 5,
    RemoteNode = 6,
    KubeApiserver = 7,
    Ingress = 8,
}

impl Reserved {
    pub const ALL: [Reserved; 8] = [
        Reserved::Host,
        Reserved::World,
        Reserved::Unmanaged,
        Reserved::Health,
        Reserved::Init,
        Reserved::RemoteNode,
        Reserved::KubeApiserver,
        Reserved::Ingress,
    ];

    pub const fn id(self) -> i64 {
        self as i64
    }

    /// The id as the datapath stores it.
    pub const fn id32(self) -> u32 {
        self as u32
    }

    pub fn from_id(id: i64) -> Option<Reserved> {
        Reserved::ALL.into_iter().find(|r| r.id() == id)
    }

    /// The entity name (`fromEntities`/`toEntities`) and the `reserved:<name>` label.
    pub const fn name(self) -> &'static str {
        match self {
            Reserved::Host => "host",
            Reserved::World => "world",
            Reserved::Unmanaged => "unmanaged",
            Reserved::Health => "health",
            Reserved::Init => "init",
            Reserved::RemoteNode => "remote-node",
            Reserved::KubeApiserver => "kube-apiserver",
            Reserved::Ingress => "ingress",
        }
    }

    pub fn from_name(name: &str) -> Option<Reserved> {
        Reserved::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Entity `cluster`: every cluster identity plus the reserved ones inside the cluster.
pub const ENTITY_CLUSTER: &str = "cluster";
/// Entity `all`: any peer.
pub const ENTITY_ALL: &str = "all";

/// The entities a rule can name, as in Cilium: every reserved identity, `cluster` and `all`.
pub const ENTITIES: [&str; 10] = [
    Reserved::Host.name(),
    Reserved::RemoteNode.name(),
    Reserved::World.name(),
    ENTITY_CLUSTER,
    Reserved::KubeApiserver.name(),
    ENTITY_ALL,
    Reserved::Health.name(),
    Reserved::Init.name(),
    Reserved::Ingress.name(),
    Reserved::Unmanaged.name(),
];

/// Security label sources (`<source>:<key>`).
pub mod labels {
    /// Labels of reserved identities: `reserved:<name>`.
    pub const SOURCE_RESERVED: &str = "reserved:";
    /// The pod's namespace, always part of its security labels.
    pub const POD_NAMESPACE: &str = "k8s:io.kubernetes.pod.namespace";
    /// The pod's service account.
    pub const POD_SERVICE_ACCOUNT: &str = "k8s:io.kubernetes.pod.serviceaccount";
    /// The labels of the pod's namespace, under this prefix.
    pub const NAMESPACE_LABELS_PREFIX: &str = "k8s:io.tendril.k8s.namespace.labels.";
    /// The label Kubernetes puts on every Namespace with its name.
    pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
    /// On an `Endpoint`: its identity id, for label selection by id.
    pub const IDENTITY: &str = "tendril.dev/identity";
}

/// Annotations Tendril writes.
pub mod annotations {
    /// On a `ResolvedPolicy`: when the policy concern observed the change that produced
    /// this revision (RFC 3339, microseconds, UTC); the agent's implementation-delay
    /// histogram starts there.
    pub const POLICY_CHANGED_AT: &str = "tendril.dev/policy-changed-at";
    /// On an `LBService`: when the change that produced this revision happened (the
    /// EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`, else when the
    /// services concern observed it); the agent's network-programming-duration histogram
    /// starts there, as kube-proxy's does.
    pub const SERVICE_CHANGED_AT: &str = "tendril.dev/service-changed-at";
    /// On a `Service`: `Random` or `Maglev` backend selection for this service.
    pub const SERVICE_LB_ALGORITHM: &str = "service.tendril.dev/lb-algorithm";
}

/// LoadBalancer IP addresses (concern `lbipam`): what users write on a Service and what
/// the concern writes back.
pub mod lbipam {
    /// The `spec.loadBalancerClass` Tendril serves; a Service without a class is served too.
    pub const LOAD_BALANCER_CLASS: &str = "tendril.dev/lb";
    /// Annotation on a Service: the addresses it wants, comma-separated (as Cilium's
    /// `lbipam.cilium.io/ips`); `spec.loadBalancerIP` is honoured as well.
    pub const IPS_ANNOTATION: &str = "lbipam.tendril.dev/ips";
    /// Annotation on a Service: Services with the same key share an address when their
    /// ports do not collide (within one namespace, unless both let the other's in).
    pub const SHARING_KEY_ANNOTATION: &str = "lbipam.tendril.dev/sharing-key";
    /// Annotation on a Service with a sharing key: other namespaces (comma-separated, `*`
    /// for any) whose Services may share its address; both sides must let the other in.
    pub const SHARING_CROSS_NAMESPACE_ANNOTATION: &str =
        "lbipam.tendril.dev/sharing-cross-namespace";
    /// The condition the concern keeps in `Service.status.conditions`.
    pub const REQUEST_SATISFIED: &str = "tendril.dev/IPAMRequestSatisfied";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_and_ids_round_trip() {
        for r in Reserved::ALL {
            assert_eq!(Reserved::from_id(r.id()), Some(r));
            assert_eq!(Reserved::from_name(r.name()), Some(r));
            assert!(ENTITIES.contains(&r.name()));
            assert!(r.id() > IDENTITY_UNKNOWN && r.id() < CLUSTER_IDENTITY_MIN);
        }
        assert_eq!(Reserved::from_id(0), None);
        assert!(i64::from(LOCAL_IDENTITY_FLAG) > CLUSTER_IDENTITY_MAX);
    }
}
