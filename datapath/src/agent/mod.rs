//! `tendril-agent`'s node-local state: the pod address allocator behind the CNI socket,
//! and the parts of the process that feed it (the node's `NodeNetwork`, its `Endpoint`s)
//! and report on it (`NodeNetwork.status`, metrics).
//!
//! [`Agent`] is the shared state; [`server`] serves it to the plugin, [`node`] keeps it in
//! step with the cluster, [`host`] owns the node-side gateway device, [`datapath`]
//! converges the kernel (eBPF maps and programs, routes, the VXLAN device).

pub mod driver;
pub mod host;
pub mod metrics;
pub mod node;
pub mod pass;
pub mod server;
pub mod view;

use crate::cni::api::{
    AgentStatus, AllocateRequest, ApiError, AttachmentRef, ErrorKind, GcRequest, PodAddresses,
    PodIp, Request, Response,
};
use crate::ipam::{Attachment, Ipam, IpamError, LiveEndpoints, Owner, ReconcileReport};
use ipnet::IpNet;
use metrics::AgentMetrics;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// The agent's shared state. All methods are synchronous (they may fsync): call them from
/// blocking tasks.
#[derive(Debug)]
pub struct Agent {
    ipam: Mutex<Ipam>,
    /// Set once the pod CIDRs are known and, with Kubernetes, the allocations were
    /// reconciled with the node's Endpoints: until then ADD gets "try again later".
    ready: AtomicBool,
    mtu: u32,
    /// A lower MTU for new pods while something on the node needs room (0: none), set by
    /// the encryption loop while WireGuard is on.
    mtu_cap: Arc<AtomicU32>,
    metrics: AgentMetrics,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Agent {
    pub fn new(ipam: Ipam, mtu: u32, metrics: AgentMetrics) -> Self {
        let agent = Self {
            ipam: Mutex::new(ipam),
            ready: AtomicBool::new(false),
            mtu,
            mtu_cap: Arc::default(),
            metrics,
        };
        agent.observe(&agent.lock());
        agent
    }

    /// The cap on new pods' MTU (see the field), for whoever sets it.
    pub fn mtu_cap(&self) -> Arc<AtomicU32> {
        Arc::clone(&self.mtu_cap)
    }

    fn lock(&self) -> MutexGuard<'_, Ipam> {
        // A panic while holding the lock cannot leave the allocator half-updated in a way
        // the disk disagrees with (disk first, memory second), so keep serving.
        self.ipam
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn observe(&self, ipam: &Ipam) {
        self.metrics.ips_in_use.set(ipam.in_use() as i64);
        self.metrics
            .ip_pool_size
            .set(i64::try_from(ipam.capacity()).unwrap_or(i64::MAX));
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn set_pod_cidrs(&self, cidrs: &[IpNet]) -> Result<(), IpamError> {
        let mut ipam = self.lock();
        ipam.set_pools(cidrs)?;
        self.observe(&ipam);
        Ok(())
    }

    pub fn pod_cidrs(&self) -> Vec<IpNet> {
        self.lock().pools().iter().map(|p| p.cidr()).collect()
    }

    /// The gateway addresses (one per pod CIDR) the node side must hold.
    pub fn gateways(&self) -> Vec<std::net::IpAddr> {
        self.lock().pools().iter().map(|p| p.gateway()).collect()
    }

    /// See [`Ipam::reconcile`]; a pod's sandbox counts as attached while the netns path
    /// recorded at ADD still exists.
    pub fn reconcile(
        &self,
        live: &LiveEndpoints,
        grace: u64,
        restore: bool,
    ) -> Result<ReconcileReport, IpamError> {
        let mut ipam = self.lock();
        let attached = |a: &crate::ipam::Allocation| {
            a.netns
                .as_deref()
                .is_some_and(|p| !p.is_empty() && std::path::Path::new(p).exists())
        };
        let report = ipam.reconcile(live, unix_now(), grace, restore, attached)?;
        self.observe(&ipam);
        Ok(report)
    }

    /// The network namespaces of the node's pods, as the CNI plugin recorded them at ADD.
    pub fn pod_netns_paths(&self) -> Vec<std::path::PathBuf> {
        let mut paths: Vec<std::path::PathBuf> = self
            .lock()
            .allocations()
            .filter_map(|a| a.netns.as_deref())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
            .collect();
        paths.sort();
        paths.dedup();
        paths
    }

    pub fn status(&self) -> AgentStatus {
        let ipam = self.lock();
        let ready = self.is_ready();
        let pools = ipam.pools();
        AgentStatus {
            ready,
            pod_cidrs: pools.iter().map(|p| p.cidr()).collect(),
            in_use: ipam.in_use() as u64,
            capacity: u64::try_from(ipam.capacity()).unwrap_or(u64::MAX),
            has_free: ipam.has_free(),
            message: if ready {
                String::new()
            } else if pools.is_empty() {
                "waiting for the node's pod CIDRs".into()
            } else {
                "reconciling allocations with the node's endpoints".into()
            },
        }
    }

    /// Answers one plugin request.
    pub fn handle(&self, request: Request) -> Response {
        let result = match request {
            Request::Allocate(req) => self.allocate(req),
            Request::Release(req) => self.release(req),
            Request::Check(req) => self.check(req),
            Request::Status => Ok(Response::Status(self.status())),
            Request::Gc(req) => self.gc(req),
        };
        result.unwrap_or_else(Response::Error)
    }

    fn addresses(&self, ipam: &Ipam, ips: &[std::net::IpAddr]) -> PodAddresses {
        let ips = ips
            .iter()
            .filter_map(|ip| {
                let pool = ipam.pools().iter().find(|p| p.cidr().contains(ip))?;
                Some(PodIp {
                    address: *ip,
                    gateway: pool.gateway(),
                })
            })
            .collect();
        let cap = self.mtu_cap.load(Ordering::Relaxed);
        PodAddresses {
            ips,
            mtu: if cap == 0 {
                self.mtu
            } else {
                self.mtu.min(cap)
            },
        }
    }

    fn allocate(&self, req: AllocateRequest) -> Result<Response, ApiError> {
        let attachment = Attachment::new(&req.container_id, &req.ifname).map_err(api_error)?;
        if !self.is_ready() {
            return Err(ApiError {
                kind: ErrorKind::NotReady,
                message: self.status().message,
            });
        }
        let mut ipam = self.lock();
        let owner = Owner {
            pod_namespace: req.pod_namespace,
            pod_name: req.pod_name,
            netns: Some(req.netns),
        };
        let known = ipam.get(&attachment).is_some();
        let result = ipam.allocate(&attachment, owner, unix_now());
        let allocation = result.map_err(|e| {
            self.metrics.allocation("error");
            api_error(e)
        })?;
        if !known {
            self.metrics.allocation("success");
            tracing::info!(container_id = %attachment.container_id, ifname = %attachment.ifname, ips = ?allocation.ips, "allocated");
        }
        self.observe(&ipam);
        Ok(Response::Allocated(self.addresses(&ipam, &allocation.ips)))
    }

    fn release(&self, req: AttachmentRef) -> Result<Response, ApiError> {
        let attachment = Attachment::new(&req.container_id, &req.ifname).map_err(api_error)?;
        let mut ipam = self.lock();
        let released = ipam.release(&attachment).map_err(api_error)?;
        if let Some(allocation) = &released {
            tracing::info!(container_id = %attachment.container_id, ifname = %attachment.ifname, ips = ?allocation.ips, "released");
        }
        self.observe(&ipam);
        Ok(Response::Released {
            ips: released.map(|a| a.ips).unwrap_or_default(),
        })
    }

    fn check(&self, req: AttachmentRef) -> Result<Response, ApiError> {
        let attachment = Attachment::new(&req.container_id, &req.ifname).map_err(api_error)?;
        let ipam = self.lock();
        match ipam.get(&attachment) {
            Some(allocation) => Ok(Response::Checked(self.addresses(&ipam, &allocation.ips))),
            None => Err(ApiError {
                kind: ErrorKind::UnknownAttachment,
                message: format!(
                    "no addresses are recorded for {}/{}",
                    req.container_id, req.ifname
                ),
            }),
        }
    }

    fn gc(&self, req: GcRequest) -> Result<Response, ApiError> {
        let valid: HashSet<Attachment> = req
            .valid_attachments
            .iter()
            .map(|a| Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect();
        let mut ipam = self.lock();
        let released = ipam.gc(&valid, unix_now(), 0).map_err(api_error)?;
        self.observe(&ipam);
        for allocation in &released {
            tracing::info!(container_id = %allocation.container_id, ifname = %allocation.ifname, ips = ?allocation.ips, "released by GC");
        }
        Ok(Response::Collected {
            released: released
                .into_iter()
                .map(|a| AttachmentRef {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect(),
        })
    }
}

fn api_error(error: IpamError) -> ApiError {
    let kind = match &error {
        IpamError::InvalidAttachment(_) => ErrorKind::Invalid,
        IpamError::NoPool => ErrorKind::NotReady,
        IpamError::Exhausted(_) => ErrorKind::Exhausted,
        IpamError::InvalidPools(_) | IpamError::Pool(_) | IpamError::Io(_) => ErrorKind::Internal,
    };
    ApiError {
        kind,
        message: error.to_string(),
    }
}
