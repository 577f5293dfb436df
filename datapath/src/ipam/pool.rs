//! The address range of one pod CIDR: which addresses pods may get.
//!
//! Offset 0 is the network address and, in IPv4, the last offset is the broadcast
//! address; neither is handed out. Offset 1 (the first usable address) is the node's pod
//! gateway (see `cni::netconf` for the routing model) and is never given to a pod either.
//! Pods get offsets `2..=last`.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The smallest pod CIDR we accept: network, gateway, at least two pods (and broadcast in v4).
const MAX_PREFIX_V4: u8 = 29;
const MAX_PREFIX_V6: u8 = 126;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error(
        "pod CIDR {0} is too small: at least /{MAX_PREFIX_V4} (IPv4) or /{MAX_PREFIX_V6} (IPv6) is needed"
    )]
    TooSmall(IpNet),
    #[error("pod CIDR {0} has host bits set (did you mean {1}?)")]
    HostBits(IpNet, IpNet),
}

/// One pod CIDR as a range of offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    cidr: IpNet,
    base: u128,
    /// Number of addresses in the CIDR (2^host bits), saturating at `u128::MAX`.
    span: u128,
}

impl Pool {
    pub fn new(cidr: IpNet) -> Result<Self, PoolError> {
        if cidr.trunc() != cidr {
            return Err(PoolError::HostBits(cidr, cidr.trunc()));
        }
        let max = match cidr {
            IpNet::V4(_) => MAX_PREFIX_V4,
            IpNet::V6(_) => MAX_PREFIX_V6,
        };
        if cidr.prefix_len() > max {
            return Err(PoolError::TooSmall(cidr));
        }
        let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
        let span = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        Ok(Self {
            cidr,
            base: to_u128(cidr.network()),
            span,
        })
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    pub fn is_v4(&self) -> bool {
        matches!(self.cidr, IpNet::V4(_))
    }

    /// The node-side gateway of pods in this CIDR: its first usable address.
    pub fn gateway(&self) -> IpAddr {
        self.at(1)
    }

    /// Lowest offset a pod may get.
    pub fn first(&self) -> u128 {
        2
    }

    /// Highest offset a pod may get.
    pub fn last(&self) -> u128 {
        if self.is_v4() {
            self.span - 2
        } else {
            self.span - 1
        }
    }

    /// How many addresses pods may get from this CIDR.
    pub fn capacity(&self) -> u128 {
        self.last() - self.first() + 1
    }

    pub fn at(&self, offset: u128) -> IpAddr {
        from_u128(self.base + offset, self.is_v4())
    }

    /// The offset of `ip` if pods may be given it.
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        let offset = to_u128(ip) - self.base;
        (self.first()..=self.last())
            .contains(&offset)
            .then_some(offset)
    }

    /// The offset after `offset`, wrapping around to the first.
    pub fn next(&self, offset: u128) -> u128 {
        if offset >= self.last() || offset < self.first() {
            self.first()
        } else {
            offset + 1
        }
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 {
        // Offsets of a v4 pool stay below 2^32 by construction.
        IpAddr::V4(Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> Pool {
        Pool::new(s.parse().unwrap()).unwrap()
    }

    #[test]
    fn v4_skips_network_gateway_and_broadcast() {
        let p = pool("10.0.1.0/24");
        assert_eq!(p.gateway(), "10.0.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.at(p.first()), "10.0.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(p.at(p.last()), "10.0.1.254".parse::<IpAddr>().unwrap());
        assert_eq!(p.capacity(), 253);
        assert_eq!(p.offset_of("10.0.1.1".parse().unwrap()), None);
        assert_eq!(p.offset_of("10.0.1.255".parse().unwrap()), None);
        assert_eq!(p.offset_of("10.0.2.5".parse().unwrap()), None);
        assert_eq!(p.offset_of("10.0.1.7".parse().unwrap()), Some(7));
    }

    #[test]
    fn v6_has_no_broadcast() {
        let p = pool("fd00:10:1::/120");
        assert_eq!(p.gateway(), "fd00:10:1::1".parse::<IpAddr>().unwrap());
        assert_eq!(p.at(p.last()), "fd00:10:1::ff".parse::<IpAddr>().unwrap());
        assert_eq!(p.capacity(), 254);
        let big = pool("fd00::/64");
        assert_eq!(big.capacity(), (1u128 << 64) - 2);
    }

    #[test]
    fn next_wraps_around() {
        let p = pool("10.0.0.0/29");
        assert_eq!(p.capacity(), 5);
        assert_eq!(p.next(6), 2);
        assert_eq!(p.next(0), 2);
        assert_eq!(p.next(3), 4);
    }

    #[test]
    fn rejects_tiny_or_unaligned_cidrs() {
        assert!(matches!(
            Pool::new("10.0.0.0/30".parse().unwrap()),
            Err(PoolError::TooSmall(_))
        ));
        assert!(matches!(
            Pool::new("fd00::/127".parse().unwrap()),
            Err(PoolError::TooSmall(_))
        ));
        assert!(matches!(
            Pool::new("10.0.1.5/24".parse().unwrap()),
            Err(PoolError::HostBits(_, _))
        ));
    }
}
