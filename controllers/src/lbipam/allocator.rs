//! The LoadBalancer IP allocator: pure values, no Kubernetes client.
//!
//! An [`Allocator`] remembers which Services hold which addresses (more than one Service per
//! address only when they share it). Each [`Allocator::plan`] takes the whole current world
//! — every pool and every Service that wants a LoadBalancer address from Tendril — and
//! brings the holdings in line with it in two phases, Services taken oldest first:
//!
//! 1. Keep or release. A Service keeps an address while it still lies in a pool (any state:
//!    disabled and conflicting pools keep what they gave) that selects the Service, of a
//!    family it asks for, within what it requested (if it requested addresses; else one per
//!    family), and while every older holder of the same address can share it with the
//!    Service. Everything else is released, as is every address of a Service that is gone.
//! 2. Assign. A Service that misses a requested address takes it if it lies in an
//!    enabled pool that selects it and nobody holds it (or every holder can share it); a
//!    Service that misses a family takes, with a sharing key, an address its sharing group
//!    already holds when their ports do not collide, else the lowest free address of the
//!    oldest enabled pool that selects it. What cannot be done is a [`Problem`].
//!
//! Two Services can hold one address only when they carry the same sharing key and the
//! same traffic policy (for `Local`, the same pod selector: the address is announced only
//! where their common backends run), use disjoint ports, and are in one namespace or in two
//! that each lets the other in. The oldest holder wins a collision, so nothing is ever
//! re-shuffled for a newcomer. A sharer may find its group's address only after a younger
//! member took it, so the assign phase goes round again until nothing new can be shared:
//! the outcome is a fixpoint, and planning the same world again changes nothing.
//!
//! Holdings are keyed by address, not by pool, so overlapping pools can never hand one
//! address to two Services that cannot share it. Of two overlapping pools the younger is
//! `Conflicting` and hands out nothing new. After a restart the holdings are rebuilt from
//! what the Services' status says ([`Allocator::restore`]) before the first plan: the same
//! world then plans to exactly the same assignment.

use crate::ipam::pool::Family;
use ipnet::IpNet;
use kube::core::{Selector, SelectorExt};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// (namespace, name) of a Service.
pub type ServiceKey = (String, String);

/// Labels of a Service, with the pseudo-labels pools may select on.
pub type Labels = BTreeMap<String, String>;

/// Pseudo-labels a `serviceSelector` can match besides the Service's own labels (as in
/// Cilium): the Service's namespace and name.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.service.namespace";
pub const NAME_LABEL: &str = "io.kubernetes.service.name";

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn to_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_num(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub first: IpAddr,
    pub last: IpAddr,
}

impl Range {
    /// `first..=last`; `None` when the families differ or `first > last`.
    pub fn new(first: IpAddr, last: IpAddr) -> Option<Range> {
        (family_of(first) == family_of(last) && to_num(first) <= to_num(last))
            .then_some(Range { first, last })
    }

    /// The addresses of `cidr` a pool hands out: without the network and broadcast
    /// addresses unless `first_last` (or the CIDR has only one or two addresses anyway).
    pub fn of_cidr(cidr: IpNet, first_last: bool) -> Range {
        let (first, last) = (to_num(cidr.network()), to_num(cidr.broadcast()));
        let family = family_of(cidr.network());
        if first_last || last - first < 2 {
            Range {
                first: cidr.network(),
                last: cidr.broadcast(),
            }
        } else {
            Range {
                first: from_num(family, first + 1),
                last: from_num(family, last - 1),
            }
        }
    }

    pub fn family(&self) -> Family {
        family_of(self.first)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        family_of(ip) == self.family()
            && (to_num(self.first)..=to_num(self.last)).contains(&to_num(ip))
    }

    pub fn size(&self) -> u128 {
        (to_num(self.last) - to_num(self.first)).saturating_add(1)
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.family() == other.family()
            && to_num(self.first) <= to_num(other.last)
            && to_num(other.first) <= to_num(self.last)
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// Which Services a pool serves.
#[derive(Clone, Debug)]
pub enum PoolSelector {
    /// No `serviceSelector`: every Service.
    All,
    Matching(Selector),
    /// The selector cannot be used (a reported problem): no Service.
    Nothing,
}

/// A pool as the allocator sees it.
#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    /// Creation time (seconds): the older of two overlapping pools wins; ties by name.
    pub created: Option<i64>,
    /// The usable blocks, in the order they are listed; never overlapping one another.
    pub ranges: Vec<Range>,
    /// Why parts of the spec cannot be used (`Valid=False`); such a pool keeps what it
    /// gave out within its usable blocks but hands out nothing new.
    pub problems: Vec<String>,
    pub selector: PoolSelector,
    pub disabled: bool,
}

impl Pool {
    pub fn selects(&self, labels: &Labels) -> bool {
        match &self.selector {
            PoolSelector::All => true,
            PoolSelector::Matching(s) => s.matches(labels),
            PoolSelector::Nothing => false,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    pub fn size(&self) -> u128 {
        self.ranges
            .iter()
            .fold(0u128, |acc, r| acc.saturating_add(r.size()))
    }

    fn order(&self) -> (Option<i64>, &str) {
        (self.created, &self.name)
    }
}

/// Who may share an address with whom: Services with the same key and traffic policy whose
/// ports are disjoint, in one namespace or in two that each lets the other in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sharing {
    pub key: String,
    /// `externalTrafficPolicy: Local` with this pod selector (`None`: `Cluster`).
    pub local_selector: Option<Labels>,
    /// Other namespaces whose Services may share with this one (`*`: any).
    pub cross_namespace: BTreeSet<String>,
}

impl Sharing {
    fn lets_in(&self, namespace: &str) -> bool {
        self.cross_namespace.contains("*") || self.cross_namespace.contains(namespace)
    }
}

/// A Service that wants LoadBalancer addresses from Tendril.
#[derive(Clone, Debug)]
pub struct ServiceRequest {
    pub key: ServiceKey,
    /// Creation time (seconds): older Services win collisions; ties by key.
    pub created: Option<i64>,
    /// Its labels plus [`NAMESPACE_LABEL`] and [`NAME_LABEL`].
    pub labels: Labels,
    /// The families it wants an address of (`spec.ipFamilies`).
    pub families: Vec<Family>,
    /// `false` for `PreferDualStack`: one family is enough when no pool serves the other.
    pub require_all_families: bool,
    /// Addresses asked for by `spec.loadBalancerIP` and the IPs annotation: then exactly
    /// these, whatever the families.
    pub requested: Vec<IpAddr>,
    pub sharing: Option<Sharing>,
    /// (protocol, port) of every port.
    pub ports: BTreeSet<(String, i32)>,
}

impl ServiceRequest {
    fn order(&self) -> (Option<i64>, &ServiceKey) {
        (self.created, &self.key)
    }

    /// Whether `self` and `other` may hold one address.
    pub fn can_share(&self, other: &ServiceRequest) -> bool {
        let (Some(a), Some(b)) = (&self.sharing, &other.sharing) else {
            return false;
        };
        a.key == b.key
            && a.local_selector == b.local_selector
            && self.ports.is_disjoint(&other.ports)
            && (self.key.0 == other.key.0 || (a.lets_in(&other.key.0) && b.lets_in(&self.key.0)))
    }
}

/// Why a Service lacks an address it wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// No enabled pool of this family selects the Service.
    NoPool { family: Family },
    /// Every enabled pool of this family that selects the Service is full.
    Exhausted { family: Family, pools: Vec<String> },
    /// The requested address is in no enabled pool that selects the Service.
    NotInPool { ip: IpAddr },
    /// The requested address is held by a Service it cannot be shared with.
    Taken {
        ip: IpAddr,
        holder: ServiceKey,
        why: &'static str,
    },
}

impl Problem {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::NoPool { .. } => "NoPool",
            Problem::Exhausted { .. } => "PoolExhausted",
            Problem::NotInPool { .. } => "RequestedIPNotInPool",
            Problem::Taken { .. } => "IPAlreadyAllocated",
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NoPool { family } => write!(
                f,
                "no enabled LoadBalancerIPPool with {family} addresses selects this service"
            ),
            Problem::Exhausted { family, pools } => write!(
                f,
                "no free {family} address in pool(s) {}; the service waits until one frees",
                pools.join(", ")
            ),
            Problem::NotInPool { ip } => write!(
                f,
                "requested IP {ip} is in no enabled LoadBalancerIPPool that selects this service"
            ),
            Problem::Taken { ip, holder, why } => write!(
                f,
                "requested IP {ip} is already allocated to service {}/{} ({why})",
                holder.0, holder.1
            ),
        }
    }
}

/// What one plan decided for a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceOutcome {
    /// Its addresses, IPv4 first, ascending.
    pub ips: Vec<IpAddr>,
    pub problems: Vec<Problem>,
}

impl ServiceOutcome {
    pub fn satisfied(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What one plan found for a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolOutcome {
    /// Held addresses inside the pool's blocks.
    pub used: u128,
    /// Addresses the pool's usable blocks hold.
    pub size: u128,
    /// The older pool and blocks this one overlaps (it hands out nothing new).
    pub conflict: Option<String>,
    pub problems: Vec<String>,
    pub disabled: bool,
    /// Services that wait for an address this pool would give if it had one free.
    pub waiting: usize,
}

impl PoolOutcome {
    pub fn available(&self) -> u128 {
        self.size.saturating_sub(self.used)
    }

    /// Whether the pool hands out new addresses.
    pub fn allocates(&self) -> bool {
        !self.disabled && self.conflict.is_none() && self.problems.is_empty()
    }
}

/// What one plan decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub services: BTreeMap<ServiceKey, ServiceOutcome>,
    pub pools: BTreeMap<String, PoolOutcome>,
    /// Addresses given in this plan, with the pool they came from.
    pub assigned: Vec<(ServiceKey, IpAddr, String)>,
    /// Addresses taken back in this plan.
    pub released: Vec<(ServiceKey, IpAddr)>,
}

/// Who holds which address, from one plan to the next.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocator {
    /// Holders of each address (several only when they share it), oldest first.
    holders: BTreeMap<IpAddr, Vec<ServiceKey>>,
    held: BTreeMap<ServiceKey, BTreeSet<IpAddr>>,
}

impl Allocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `key` holds `ips` (from its status, after a restart), unchecked: the
    /// next [`plan`](Self::plan) keeps what is still right and releases the rest.
    pub fn restore(&mut self, key: &ServiceKey, ips: impl IntoIterator<Item = IpAddr>) {
        for ip in ips {
            self.hold(key, ip);
        }
    }

    fn hold(&mut self, key: &ServiceKey, ip: IpAddr) {
        let holders = self.holders.entry(ip).or_default();
        if !holders.contains(key) {
            holders.push(key.clone());
        }
        self.held.entry(key.clone()).or_default().insert(ip);
    }

    /// Every Service's addresses.
    pub fn assignment(&self) -> &BTreeMap<ServiceKey, BTreeSet<IpAddr>> {
        &self.held
    }

    /// The holders of `ip`.
    pub fn holders(&self, ip: IpAddr) -> &[ServiceKey] {
        self.holders.get(&ip).map(Vec::as_slice).unwrap_or_default()
    }

    /// Brings the holdings in line with `pools` and `services` (see the module docs).
    pub fn plan(&mut self, pools: &[Pool], services: &[ServiceRequest]) -> Outcome {
        let mut pools: Vec<&Pool> = pools.iter().collect();
        pools.sort_by(|a, b| a.order().cmp(&b.order()));
        let mut services: Vec<&ServiceRequest> = services.iter().collect();
        services.sort_by(|a, b| a.order().cmp(&b.order()));
        services.dedup_by(|a, b| a.key == b.key);
        let by_key: BTreeMap<&ServiceKey, &ServiceRequest> =
            services.iter().map(|s| (&s.key, *s)).collect();

        let mut out = Outcome::default();
        let conflicts = overlaps(&pools);
        for (i, p) in pools.iter().enumerate() {
            out.pools.insert(
                p.name.clone(),
                PoolOutcome {
                    size: p.size(),
                    conflict: conflicts[i].clone(),
                    problems: p.problems.clone(),
                    disabled: p.disabled,
                    ..Default::default()
                },
            );
        }
        let allocating: Vec<&Pool> = pools
            .iter()
            .copied()
            .filter(|p| out.pools[&p.name].allocates())
            .collect();

        // 1. Keep or release, oldest Service first.
        let previous = std::mem::take(self);
        for (key, ips) in &previous.held {
            if !by_key.contains_key(key) {
                out.released.extend(ips.iter().map(|ip| (key.clone(), *ip)));
            }
        }
        for svc in &services {
            let Some(ips) = previous.held.get(&svc.key) else {
                continue;
            };
            let mut families = BTreeSet::new();
            for &ip in ips {
                let wanted = if svc.requested.is_empty() {
                    svc.families.contains(&family_of(ip)) && !families.contains(&family_of(ip))
                } else {
                    svc.requested.contains(&ip)
                };
                let in_pool = pools
                    .iter()
                    .any(|p| p.contains(ip) && p.selects(&svc.labels));
                let shareable = self
                    .holders(ip)
                    .iter()
                    .all(|h| by_key.get(h).is_some_and(|o| o.can_share(svc)));
                if wanted && in_pool && shareable {
                    families.insert(family_of(ip));
                    self.hold(&svc.key, ip);
                } else {
                    out.released.push((svc.key.clone(), ip));
                }
            }
        }

        // 2. Assign what is missing, oldest Service first.
        let mut lowest_free = BTreeMap::new();
        let mut all_problems;
        loop {
            all_problems = Vec::with_capacity(services.len());
            for o in out.pools.values_mut() {
                o.waiting = 0;
            }
            let assigned_before = out.assigned.len();
            for svc in &services {
                let mut problems = Vec::new();
                if !svc.requested.is_empty() {
                    for &ip in &svc.requested {
                        if self.held.get(&svc.key).is_some_and(|h| h.contains(&ip)) {
                            continue;
                        }
                        let Some(pool) = allocating
                            .iter()
                            .find(|p| p.contains(ip) && p.selects(&svc.labels))
                        else {
                            problems.push(Problem::NotInPool { ip });
                            continue;
                        };
                        match self.collision(ip, svc, &by_key) {
                            Some((holder, why)) => {
                                problems.push(Problem::Taken { ip, holder, why })
                            }
                            None => {
                                self.hold(&svc.key, ip);
                                out.assigned.push((svc.key.clone(), ip, pool.name.clone()));
                            }
                        }
                    }
                } else {
                    let mut family_problems = Vec::new();
                    for &family in &svc.families {
                        let has = self
                            .held
                            .get(&svc.key)
                            .is_some_and(|h| h.iter().any(|ip| family_of(*ip) == family));
                        if has {
                            continue;
                        }
                        let eligible: Vec<&Pool> = allocating
                            .iter()
                            .copied()
                            .filter(|p| {
                                p.selects(&svc.labels)
                                    && p.ranges.iter().any(|r| r.family() == family)
                            })
                            .collect();
                        if eligible.is_empty() {
                            family_problems.push(Problem::NoPool { family });
                            continue;
                        }
                        if let Some((ip, pool)) = self.shared_address(svc, family, &pools, &by_key)
                        {
                            self.hold(&svc.key, ip);
                            out.assigned.push((svc.key.clone(), ip, pool));
                            continue;
                        }
                        match eligible
                            .iter()
                            .find_map(|p| self.first_free(p, &mut lowest_free).map(|ip| (ip, p)))
                        {
                            Some((ip, pool)) => {
                                self.hold(&svc.key, ip);
                                out.assigned.push((svc.key.clone(), ip, pool.name.clone()));
                            }
                            None => {
                                for p in &eligible {
                                    if let Some(o) = out.pools.get_mut(&p.name) {
                                        o.waiting += 1;
                                    }
                                }
                                family_problems.push(Problem::Exhausted {
                                    family,
                                    pools: eligible.iter().map(|p| p.name.clone()).collect(),
                                });
                            }
                        }
                    }
                    // PreferDualStack: a family no pool serves is no problem once another has
                    // an address.
                    let got_one = self.held.get(&svc.key).is_some_and(|h| !h.is_empty());
                    if !svc.require_all_families && got_one {
                        family_problems.retain(|p| !matches!(p, Problem::NoPool { .. }));
                    }
                    problems.extend(family_problems);
                }
                all_problems.push(problems);
            }
            // A Service that shares may find, later in the plan, an address a younger member
            // of its group has just taken: round again while that can happen (nothing is freed
            // while assigning, so this ends), so the next plan over the same world says the same.
            let shared_news = out.assigned[assigned_before..]
                .iter()
                .any(|(k, _, _)| by_key.get(k).is_some_and(|s| s.sharing.is_some()));
            let sharer_waits = services
                .iter()
                .zip(&all_problems)
                .any(|(s, p)| s.sharing.is_some() && !p.is_empty());
            if !(shared_news && sharer_waits) {
                break;
            }
        }
        for (svc, mut problems) in services.iter().zip(all_problems) {
            // Who holds a refused address is told as of the end of the plan (the oldest
            // holder that cannot share), so the next plan over the same world says the same.
            for p in &mut problems {
                if let Problem::Taken { ip, holder, why } = p
                    && let Some((h, w)) = self.collision(*ip, svc, &by_key)
                {
                    (*holder, *why) = (h, w);
                }
            }
            let mut ips: Vec<IpAddr> = self
                .held
                .get(&svc.key)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            ips.sort_by_key(|ip| (family_of(*ip), *ip));
            out.services
                .insert(svc.key.clone(), ServiceOutcome { ips, problems });
        }

        for p in &pools {
            // The blocks of one pool never overlap (its parser drops such a block).
            let used: usize = p
                .ranges
                .iter()
                .map(|r| self.holders.range(r.first..=r.last).count())
                .sum();
            if let Some(o) = out.pools.get_mut(&p.name) {
                o.used = used as u128;
            }
        }
        out
    }

    /// The holder `ip` cannot be shared with by `svc`, and why; `None` when it is free or
    /// every holder can share it.
    fn collision(
        &self,
        ip: IpAddr,
        svc: &ServiceRequest,
        by_key: &BTreeMap<&ServiceKey, &ServiceRequest>,
    ) -> Option<(ServiceKey, &'static str)> {
        // The oldest such holder, whatever order the holders were recorded in.
        let mut holders: Vec<&ServiceKey> = self.holders(ip).iter().collect();
        holders.sort_by_key(|h| (by_key.get(h).and_then(|o| o.created), *h));
        holders.into_iter().find_map(|h| {
            let why = match by_key.get(h) {
                Some(o) if o.can_share(svc) => return None,
                Some(o) if o.sharing.is_none() || svc.sharing.is_none() => "no sharing key",
                Some(o)
                    if o.sharing.as_ref().map(|s| (&s.key, &s.local_selector))
                        != svc.sharing.as_ref().map(|s| (&s.key, &s.local_selector)) =>
                {
                    "different sharing key or traffic policy"
                }
                Some(o) if !o.ports.is_disjoint(&svc.ports) => "their ports overlap",
                Some(_) => "another namespace, not let in by both",
                None => "held",
            };
            Some((h.clone(), why))
        })
    }

    /// The lowest address of `family` that `svc`'s sharing group holds and `svc` may share,
    /// in a pool that selects `svc`, with that pool's name.
    fn shared_address(
        &self,
        svc: &ServiceRequest,
        family: Family,
        pools: &[&Pool],
        by_key: &BTreeMap<&ServiceKey, &ServiceRequest>,
    ) -> Option<(IpAddr, String)> {
        svc.sharing.as_ref()?;
        self.holders.iter().find_map(|(ip, holders)| {
            if family_of(*ip) != family
                || !holders
                    .iter()
                    .all(|h| by_key.get(h).is_some_and(|o| o.can_share(svc)))
            {
                return None;
            }
            let pool = pools
                .iter()
                .find(|p| p.contains(*ip) && p.selects(&svc.labels))?;
            Some((*ip, pool.name.clone()))
        })
    }

    /// The lowest free address of `pool`, blocks in the order listed. `lowest` remembers,
    /// per block, below which address everything is held: while a plan assigns, nothing is
    /// freed, so the search goes on from there instead of from the start of the block
    /// (linear, not quadratic, when thousands of Services arrive at once).
    fn first_free(
        &self,
        pool: &Pool,
        lowest: &mut BTreeMap<(String, usize), u128>,
    ) -> Option<IpAddr> {
        pool.ranges.iter().enumerate().find_map(|(i, r)| {
            let family = r.family();
            let last = to_num(r.last);
            let hint = (pool.name.clone(), i);
            let start = lowest.get(&hint).copied().unwrap_or(to_num(r.first));
            if start > last {
                return None;
            }
            let mut candidate = start;
            let from = from_num(family, start);
            for ip in self.holders.range(from..=r.last).map(|(ip, _)| to_num(*ip)) {
                if ip != candidate {
                    break;
                }
                candidate += 1;
            }
            lowest.insert(hint, candidate);
            (candidate <= last).then(|| from_num(family, candidate))
        })
    }
}

/// For each pool (oldest first), the older pool it overlaps and where.
fn overlaps(pools: &[&Pool]) -> Vec<Option<String>> {
    pools
        .iter()
        .enumerate()
        .map(|(i, p)| {
            pools[..i].iter().find_map(|older| {
                p.ranges.iter().find_map(|a| {
                    older.ranges.iter().find(|b| a.overlaps(b)).map(|b| {
                        format!(
                            "block {a} overlaps block {b} of the older pool {}",
                            older.name
                        )
                    })
                })
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "allocator_tests.rs"]
mod tests;
