//! [`AnyKey`]: the key of an entry of any map the agent writes, so that the reports of
//! several maps can sit in one list and still be matched by type.

use std::fmt;

use super::{
    layout::{EgressKey, EndpointKey, IpcacheKey},
    lb::LbItem,
    policy::PolicyItem,
};

/// A key of `endpoints`, of `ipcache` or `policy_cidrs` (a prefix), of the policy maps or
/// of the services maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AnyKey {
    Endpoint(EndpointKey),
    Prefix(IpcacheKey),
    Policy(PolicyItem),
    Lb(LbItem),
    Egress(EgressKey),
}

impl From<EndpointKey> for AnyKey {
    fn from(key: EndpointKey) -> Self {
        Self::Endpoint(key)
    }
}

impl From<IpcacheKey> for AnyKey {
    fn from(key: IpcacheKey) -> Self {
        Self::Prefix(key)
    }
}

impl From<PolicyItem> for AnyKey {
    fn from(key: PolicyItem) -> Self {
        Self::Policy(key)
    }
}

impl From<LbItem> for AnyKey {
    fn from(key: LbItem) -> Self {
        Self::Lb(key)
    }
}

impl From<EgressKey> for AnyKey {
    fn from(key: EgressKey) -> Self {
        Self::Egress(key)
    }
}

impl fmt::Display for AnyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Endpoint(key) => key.fmt(f),
            Self::Prefix(key) => key.fmt(f),
            Self::Policy(key) => key.fmt(f),
            Self::Lb(key) => key.fmt(f),
            Self::Egress(key) => key.fmt(f),
        }
    }
}
