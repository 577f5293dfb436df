//! Ports of a rule and their canonical form: ranges per protocol, coalesced; named ports
//! kept by name; "every port" of a protocol absorbing the rest.

use super::{INVALID_PORT, Invalid};
use std::collections::BTreeSet;
use tendril_crds::v1alpha1::{Protocol, ResolvedPort};

/// Every concrete protocol; a resolved port is always one of these, never `ANY`.
pub(super) const ALL_PROTOCOLS: &[Protocol] = Protocol::Any.expand();

/// A port range of one protocol, or a named port. `start == 0` without a name is every
/// port of the protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Port {
    pub(super) protocol: Protocol,
    pub(super) name: Option<String>,
    pub(super) start: u16,
    pub(super) end: u16,
}

impl Port {
    pub(super) fn range(protocol: Protocol, start: u16, end: u16) -> Self {
        Self {
            protocol,
            name: None,
            start,
            end,
        }
    }

    pub(super) fn named(protocol: Protocol, name: &str) -> Self {
        Self {
            protocol,
            name: Some(name.to_string()),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn is_all(&self) -> bool {
        self.name.is_none() && self.start == 0
    }

    pub(super) fn into_api(self) -> ResolvedPort {
        ResolvedPort {
            port: i32::from(self.start),
            end_port: (self.end > self.start).then_some(i32::from(self.end)),
            name: self.name,
            protocol: self.protocol,
        }
    }
}

/// The ports of a rule: every port and protocol, or a list.
pub(super) enum Ports {
    All,
    Some(Vec<Port>),
}

impl Ports {
    pub(super) fn add(&mut self, other: Ports) {
        match (&mut *self, other) {
            (Ports::All, _) => {}
            (_, Ports::All) => *self = Ports::All,
            (Ports::Some(a), Ports::Some(b)) => a.extend(b),
        }
    }

    /// The canonical list (empty = every port and protocol).
    pub(super) fn into_list(self) -> Vec<Port> {
        match self {
            Ports::All => Vec::new(),
            Ports::Some(list) => normalize_ports(list),
        }
    }
}

/// Sorted; per protocol either "all ports" alone, or coalesced ranges then named ports.
pub(super) fn normalize_ports(mut ports: Vec<Port>) -> Vec<Port> {
    ports.sort();
    ports.dedup();
    let all: BTreeSet<Protocol> = ports
        .iter()
        .filter(|p| p.is_all())
        .map(|p| p.protocol)
        .collect();
    let mut out: Vec<Port> = Vec::with_capacity(ports.len());
    for p in ports {
        if all.contains(&p.protocol) && !p.is_all() {
            continue;
        }
        if let Some(last) = out.last_mut()
            && p.name.is_none()
            && last.name.is_none()
            && last.protocol == p.protocol
            && !last.is_all()
            && u32::from(p.start) <= u32::from(last.end) + 1
        {
            last.end = last.end.max(p.end);
            continue;
        }
        out.push(p);
    }
    out
}

/// The entries of one port spec for each of `protocols`. `port` is a number, a name, or
/// absent (every port); `zero_is_all` lets `"0"` mean every port (Tendril).
pub(super) fn port_entries(
    protocols: &[Protocol],
    port: Option<&str>,
    end_port: Option<i32>,
    at: &str,
    zero_is_all: bool,
) -> Result<Vec<Port>, Invalid> {
    let bad = |m: String| Invalid::new(INVALID_PORT, format!("{at}: {m}"));
    let port = port.map(str::trim).filter(|p| !p.is_empty());
    let (start, end) = match port {
        None => {
            if end_port.is_some() {
                return Err(bad("endPort needs a port".into()));
            }
            (0, 0)
        }
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => {
            let n: u32 = p
                .parse()
                .map_err(|_| bad(format!("port {p} is out of range")))?;
            if n == 0 && zero_is_all {
                if end_port.is_some() {
                    return Err(bad("endPort needs a port from 1 to 65535".into()));
                }
                (0, 0)
            } else if !(1..=65535).contains(&n) {
                return Err(bad(format!("port {p} is not between 1 and 65535")));
            } else {
                let end = match end_port {
                    None => n,
                    Some(e) if e >= n as i32 && e <= 65535 => e as u32,
                    Some(e) => {
                        return Err(bad(format!(
                            "endPort {e} must be between port {n} and 65535"
                        )));
                    }
                };
                (n as u16, end as u16)
            }
        }
        Some(name) => {
            if end_port.is_some() {
                return Err(bad(format!(
                    "named port {name:?} cannot have an endPort (ranges need numbers)"
                )));
            }
            if !is_port_name(name) {
                return Err(bad(format!(
                    "{name:?} is neither a port number nor a port name (lowercase letters, digits and '-', at most 15)"
                )));
            }
            return Ok(protocols.iter().map(|&p| Port::named(p, name)).collect());
        }
    };
    Ok(protocols
        .iter()
        .map(|&p| Port::range(p, start, end))
        .collect())
}

/// An IANA service name, as container port names are.
pub(super) fn is_port_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}
