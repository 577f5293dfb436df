//! Node-local pod IP allocation.
//!
//! The agent hands each CNI attachment (container id + interface name) one address per
//! family from the node's pod CIDRs (`NodeNetwork.spec.podCIDRs`). Every allocation is on
//! disk before its address is returned (see [`store`]), so a crash or restart can never
//! hand the same address out twice; at start the agent reloads them all and reconciles them
//! with the `Endpoint`s of its node ([`Ipam::reconcile`]).
//!
//! Everything here is synchronous and takes the current time as a value: the agent wraps
//! one `Ipam` in a mutex, tests drive it directly.

mod pool;
mod store;

pub use pool::{Pool, PoolError};
pub use store::LoadReport;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::path::Path;
use store::Store;

/// Longest container id we accept (the spec sets no limit; runtimes use 64 hex chars).
const MAX_CONTAINER_ID: usize = 200;
/// Linux `IFNAMSIZ` - 1.
const MAX_IFNAME: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid attachment: {0}")]
    InvalidAttachment(String),
    #[error("the node has no pod CIDR yet")]
    NoPool,
    #[error("pod CIDR {0} is exhausted")]
    Exhausted(IpNet),
    #[error("invalid pod CIDRs: {0}")]
    InvalidPools(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("allocation state: {0}")]
    Io(#[from] io::Error),
}

/// The CNI identity of a pod interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl Attachment {
    /// Validates as the CNI spec does: a container id is alphanumeric plus `_ . -`, an
    /// interface name at most 15 characters without `/`, `:` or whitespace.
    pub fn new(container_id: &str, ifname: &str) -> Result<Self, IpamError> {
        let id_ok = !container_id.is_empty()
            && container_id.len() <= MAX_CONTAINER_ID
            && container_id
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !id_ok {
            return Err(IpamError::InvalidAttachment(format!(
                "container id {container_id:?}"
            )));
        }
        let if_ok = !ifname.is_empty()
            && ifname.len() <= MAX_IFNAME
            && ifname != "."
            && ifname != ".."
            && ifname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !if_ok {
            return Err(IpamError::InvalidAttachment(format!(
                "interface name {ifname:?}"
            )));
        }
        Ok(Self {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
        })
    }
}

/// One attachment's addresses, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// One address per family, v4 first.
    pub ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Unix seconds.
    pub allocated_at: u64,
    /// Recreated from a live `Endpoint` whose allocation record was missing: it holds the
    /// address until the Endpoint goes away, but no CNI attachment owns it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restored: bool,
}

impl Allocation {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// Who asks for an address, besides the attachment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub netns: Option<String>,
}

/// The pods the cluster says live on this node (from its `Endpoint`s).
#[derive(Clone, Debug, Default)]
pub struct LiveEndpoints {
    /// `(namespace, name, ips)` per Endpoint.
    pub endpoints: Vec<(String, String, Vec<IpAddr>)>,
}

/// What a reconcile changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Addresses of live Endpoints that had no allocation record, now reserved.
    pub restored: Vec<IpAddr>,
    /// Allocations without a live Endpoint, older than the grace window, released.
    pub released: Vec<Allocation>,
}

#[derive(Debug)]
pub struct Ipam {
    pools: Vec<Pool>,
    /// Per pool, the offset handed out last: the search continues after it, so a released
    /// address is not reused at once (helps conntrack and stale peers).
    cursors: Vec<u128>,
    allocations: BTreeMap<Attachment, Allocation>,
    owners: HashMap<IpAddr, Attachment>,
    store: Store,
}

impl Ipam {
    /// Opens the state directory and reloads every allocation in it.
    pub fn open(dir: &Path) -> Result<(Self, LoadReport), IpamError> {
        let store = Store::open(dir)?;
        let (loaded, report) = store.load()?;
        let mut ipam = Self {
            pools: Vec::new(),
            cursors: Vec::new(),
            allocations: BTreeMap::new(),
            owners: HashMap::new(),
            store,
        };
        let mut loaded = loaded;
        // Oldest first, so if two records ever claimed one address the older one keeps it.
        loaded.sort_by_key(|a| a.allocated_at);
        for allocation in loaded {
            if let Some(ip) = allocation
                .ips
                .iter()
                .find(|ip| ipam.owners.contains_key(ip))
            {
                tracing::error!(%ip, container_id = %allocation.container_id, "address recorded twice; keeping the older record");
                ipam.store
                    .remove(&allocation.container_id, &allocation.ifname)?;
                continue;
            }
            ipam.insert(allocation);
        }
        Ok((ipam, report))
    }

    pub fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    /// Sets the node's pod CIDRs (at most one per family). Existing allocations are kept
    /// even if a CIDR changes: they belong to running pods.
    pub fn set_pools(&mut self, cidrs: &[IpNet]) -> Result<(), IpamError> {
        let mut pools: Vec<Pool> = cidrs
            .iter()
            .map(|c| Pool::new(*c))
            .collect::<Result<_, _>>()?;
        if pools.iter().filter(|p| p.is_v4()).count() > 1
            || pools.iter().filter(|p| !p.is_v4()).count() > 1
        {
            return Err(IpamError::InvalidPools(format!(
                "at most one CIDR per family, got {cidrs:?}"
            )));
        }
        pools.sort_by_key(|p| !p.is_v4());
        if pools == self.pools {
            return Ok(());
        }
        self.cursors = pools
            .iter()
            .map(|pool| {
                self.allocations
                    .values()
                    .filter_map(|a| {
                        a.ips
                            .iter()
                            .find_map(|ip| pool.offset_of(*ip))
                            .map(|o| (a.allocated_at, o))
                    })
                    .max()
                    .map_or(pool.last(), |(_, offset)| offset)
            })
            .collect();
        self.pools = pools;
        Ok(())
    }

    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// Returns the attachment's addresses, allocating them on first call. The record is on
    /// disk before this returns.
    pub fn allocate(
        &mut self,
        attachment: &Attachment,
        owner: Owner,
        now: u64,
    ) -> Result<Allocation, IpamError> {
        if let Some(existing) = self.allocations.get(attachment) {
            return Ok(existing.clone());
        }
        if self.pools.is_empty() {
            return Err(IpamError::NoPool);
        }
        let mut ips = Vec::with_capacity(self.pools.len());
        let mut offsets = Vec::with_capacity(self.pools.len());
        for (index, pool) in self.pools.iter().enumerate() {
            let offset = self
                .free_offset(index)
                .ok_or(IpamError::Exhausted(pool.cidr()))?;
            ips.push(pool.at(offset));
            offsets.push(offset);
        }
        let allocation = Allocation {
            container_id: attachment.container_id.clone(),
            ifname: attachment.ifname.clone(),
            ips,
            pod_namespace: owner.pod_namespace,
            pod_name: owner.pod_name,
            netns: owner.netns,
            allocated_at: now,
            restored: false,
        };
        self.store.write(&allocation)?;
        for (cursor, offset) in self.cursors.iter_mut().zip(offsets) {
            *cursor = offset;
        }
        self.insert(allocation.clone());
        Ok(allocation)
    }

    /// Frees the attachment's addresses; releasing an unknown attachment is a no-op.
    pub fn release(&mut self, attachment: &Attachment) -> Result<Option<Allocation>, IpamError> {
        if !self.allocations.contains_key(attachment) {
            // A record may exist on disk that failed to load; removing it is harmless.
            self.store
                .remove(&attachment.container_id, &attachment.ifname)?;
            return Ok(None);
        }
        self.store
            .remove(&attachment.container_id, &attachment.ifname)?;
        let allocation = self.allocations.remove(attachment).expect("checked above");
        for ip in &allocation.ips {
            self.owners.remove(ip);
        }
        Ok(Some(allocation))
    }

    pub fn get(&self, attachment: &Attachment) -> Option<&Allocation> {
        self.allocations.get(attachment)
    }

    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    pub fn owner_of(&self, ip: IpAddr) -> Option<&Attachment> {
        self.owners.get(&ip)
    }

    /// CNI GC: releases every CNI attachment not in `valid` that is older than `grace`
    /// seconds (so an ADD racing the GC keeps its address). Restored records are left to
    /// [`Ipam::reconcile`].
    pub fn gc(
        &mut self,
        valid: &HashSet<Attachment>,
        now: u64,
        grace: u64,
    ) -> Result<Vec<Allocation>, IpamError> {
        let stale: Vec<Attachment> = self
            .allocations
            .iter()
            .filter(|(key, a)| {
                !a.restored && !valid.contains(*key) && now.saturating_sub(a.allocated_at) >= grace
            })
            .map(|(key, _)| key.clone())
            .collect();
        let mut released = Vec::new();
        for key in stale {
            released.extend(self.release(&key)?);
        }
        Ok(released)
    }

    /// Reconciles allocations with the node's live Endpoints.
    ///
    /// With `restore` (the agent's first pass after start), addresses of live Endpoints
    /// that have no record are reserved: the state directory was lost, and the pods using
    /// them still run. Later passes do not restore, because an Endpoint outliving its
    /// pod's DEL for a moment is normal and must not pin the address.
    ///
    /// An allocation is released as leaked (the pod is gone, DEL never came) only if no
    /// live Endpoint uses it, it is older than `grace` seconds (an ADD in flight has no
    /// Endpoint yet) and `attached` says its pod sandbox is gone (the agent checks that
    /// the recorded netns no longer exists), so a slow or absent operator cannot make the
    /// agent free addresses of running pods.
    pub fn reconcile(
        &mut self,
        live: &LiveEndpoints,
        now: u64,
        grace: u64,
        restore: bool,
        attached: impl Fn(&Allocation) -> bool,
    ) -> Result<ReconcileReport, IpamError> {
        let mut report = ReconcileReport::default();
        let live_ips: HashSet<IpAddr> = live
            .endpoints
            .iter()
            .flat_map(|(_, _, ips)| ips.iter().copied())
            .collect();
        let live_pods: HashSet<(&str, &str)> = live
            .endpoints
            .iter()
            .map(|(ns, name, _)| (ns.as_str(), name.as_str()))
            .collect();

        for (namespace, name, ips) in live.endpoints.iter().filter(|_| restore) {
            let missing: Vec<IpAddr> = ips
                .iter()
                .copied()
                .filter(|ip| {
                    !self.owners.contains_key(ip)
                        && self.pools.iter().any(|p| p.offset_of(*ip).is_some())
                })
                .collect();
            if missing.is_empty() {
                continue;
            }
            let allocation = Allocation {
                container_id: format!("endpoint-{namespace}-{name}"),
                ifname: "restored".into(),
                ips: missing.clone(),
                pod_namespace: Some(namespace.clone()),
                pod_name: Some(name.clone()),
                netns: None,
                allocated_at: now,
                restored: true,
            };
            if self.allocations.contains_key(&allocation.attachment()) {
                continue;
            }
            self.store.write(&allocation)?;
            self.insert(allocation);
            report.restored.extend(missing);
        }

        let leaked: Vec<Attachment> = self
            .allocations
            .iter()
            .filter(|(_, a)| {
                let pod_live = matches!((&a.pod_namespace, &a.pod_name), (Some(ns), Some(n)) if live_pods.contains(&(ns.as_str(), n.as_str())));
                let address_live = a.ips.iter().any(|ip| live_ips.contains(ip));
                let old_enough = now.saturating_sub(a.allocated_at) >= grace;
                !pod_live && !address_live && old_enough && !attached(a)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in leaked {
            report.released.extend(self.release(&key)?);
        }
        Ok(report)
    }

    /// Addresses handed out from the current pools.
    pub fn in_use(&self) -> usize {
        self.owners
            .keys()
            .filter(|ip| self.pools.iter().any(|p| p.offset_of(**ip).is_some()))
            .count()
    }

    /// Addresses pods may get in total (saturating).
    pub fn capacity(&self) -> u128 {
        self.pools
            .iter()
            .map(Pool::capacity)
            .fold(0u128, u128::saturating_add)
    }

    /// Whether another attachment can get an address in every family.
    pub fn has_free(&self) -> bool {
        !self.pools.is_empty()
            && self.pools.iter().all(|pool| {
                let used = self
                    .owners
                    .keys()
                    .filter(|ip| pool.offset_of(**ip).is_some())
                    .count() as u128;
                used < pool.capacity()
            })
    }

    fn free_offset(&self, index: usize) -> Option<u128> {
        let pool = &self.pools[index];
        let mut offset = self.cursors[index];
        // Every occupied candidate is a key of `owners`, so a free one turns up within
        // `owners.len() + 1` steps unless the pool is full.
        let bound = pool.capacity().min(self.owners.len() as u128 + 1);
        for _ in 0..bound {
            offset = pool.next(offset);
            if !self.owners.contains_key(&pool.at(offset)) {
                return Some(offset);
            }
        }
        None
    }

    fn insert(&mut self, allocation: Allocation) {
        let key = allocation.attachment();
        for ip in &allocation.ips {
            self.owners.insert(*ip, key.clone());
        }
        self.allocations.insert(key, allocation);
    }
}

#[cfg(test)]
mod tests;
