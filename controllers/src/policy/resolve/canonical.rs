//! Rules and their canonical form (see the module doc of [`super`]): equal inputs give
//! equal rule lists whatever their order.

use super::ports::{Port, Ports, normalize_ports};
use ipnet::IpNet;
use std::collections::BTreeMap;
use tendril_crds::facts::ANY_PEER;
use tendril_crds::v1alpha1::{ResolvedRule, Verdict};

/// A rule: `verdict` for traffic with a peer in `peers` or an address in `cidrs`, on
/// `ports` (empty = all). Field order is the canonical sort order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Rule {
    pub(super) verdict: Verdict,
    pub(super) peers: Vec<i64>,
    pub(super) cidrs: Vec<IpNet>,
    pub(super) ports: Vec<Port>,
}

impl Rule {
    pub(super) fn any_port(verdict: Verdict, peers: Vec<i64>, cidrs: Vec<IpNet>) -> Self {
        Self {
            verdict,
            peers,
            cidrs,
            ports: Vec::new(),
        }
    }

    pub(super) fn matches_nothing(&self) -> bool {
        self.peers.is_empty() && self.cidrs.is_empty()
    }

    pub(super) fn into_api(self) -> ResolvedRule {
        ResolvedRule {
            verdict: self.verdict,
            peers: self.peers,
            cidrs: self.cidrs.iter().map(ToString::to_string).collect(),
            ports: self.ports.into_iter().map(Port::into_api).collect(),
        }
    }
}

/// Canonical peers and CIDRs: sorted, deduplicated, any-peer absorbs the rest, CIDRs
/// aggregated (covered prefixes dropped, sibling prefixes joined).
pub(super) fn normalize_peers(peers: &mut Vec<i64>, cidrs: &mut Vec<IpNet>) {
    peers.sort_unstable();
    peers.dedup();
    if peers.first() == Some(&ANY_PEER) {
        peers.truncate(1);
        cidrs.clear();
    } else if !cidrs.is_empty() {
        *cidrs = IpNet::aggregate(cidrs);
        cidrs.sort();
    }
}

/// Peer identities and CIDRs of a rule being merged.
pub(super) type PeerSet = (Vec<i64>, Vec<IpNet>);

/// The canonical form of a rule list (see the module doc).
pub(super) fn canonical(rules: Vec<Rule>) -> Vec<Rule> {
    let mut rules: Vec<Rule> = rules
        .into_iter()
        .map(|mut r| {
            normalize_peers(&mut r.peers, &mut r.cidrs);
            r.ports = normalize_ports(r.ports);
            r
        })
        .filter(|r| !r.matches_nothing())
        .collect();
    loop {
        // Same verdict and ports: one rule for the union of the peers.
        let mut by_ports: BTreeMap<(Verdict, Vec<Port>), PeerSet> = BTreeMap::new();
        for r in rules {
            let e = by_ports.entry((r.verdict, r.ports)).or_default();
            e.0.extend(r.peers);
            e.1.extend(r.cidrs);
        }
        let merged: Vec<Rule> = by_ports
            .into_iter()
            .map(|((verdict, ports), (mut peers, mut cidrs))| {
                normalize_peers(&mut peers, &mut cidrs);
                Rule {
                    verdict,
                    peers,
                    cidrs,
                    ports,
                }
            })
            .collect();
        let before = merged.len();
        // Same verdict and peers: one rule for the union of the ports.
        let mut by_peers: BTreeMap<(Verdict, Vec<i64>, Vec<IpNet>), Ports> = BTreeMap::new();
        for r in merged {
            let ports = if r.ports.is_empty() {
                Ports::All
            } else {
                Ports::Some(r.ports)
            };
            match by_peers.entry((r.verdict, r.peers, r.cidrs)) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(ports);
                }
                std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().add(ports),
            }
        }
        rules = by_peers
            .into_iter()
            .map(|((verdict, peers, cidrs), ports)| Rule {
                verdict,
                peers,
                cidrs,
                ports: ports.into_list(),
            })
            .collect();
        if rules.len() == before {
            break;
        }
    }
    rules.sort();
    rules
}
