//! Pod interface plumbing over rtnetlink.
//!
//! Routing model (the same as Cilium's with endpoint routes, without an ARP responder):
//! - The pod gets a veth end named `ifname` with its address as a host route (`/32`, and
//!   `/128` for IPv6), a link-scope route to the gateway (the first address of the node's
//!   pod CIDR) and a default route via that gateway. A permanent neighbour entry maps the
//!   gateway to the MAC of the host-side veth, so the pod never ARPs/NDPs for it: whatever
//!   it sends leaves through the veth to the node.
//! - The host side `tdr<11 hex>` (hash of container id and interface name) carries no
//!   address; the node has a `/32` (`/128`) route to the pod IP through it and a permanent
//!   neighbour entry for the pod's MAC. The gateway address itself lives on the agent's
//!   `tendril_host` device (see `agent::host`), so the pod can reach it.
//!
//! Namespace work runs on a fresh std thread that enters the target netns with `setns`
//! and drives rtnetlink on its own current-thread runtime; the thread ends with its
//! namespace, so nothing else in the process ever runs in the pod's netns.

use crate::cni::api::PodIp;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// `ENODEV` / `ENOENT` / `ESRCH` as netlink reports them: the object is not there.
const ENODEV: i32 = 19;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        source: rtnetlink::Error,
    },
    #[error("interface {0} already exists in the pod's network namespace")]
    Exists(String),
    #[error("host interface {name} belongs to another attachment ({other})")]
    Collision { name: String, other: String },
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl LinkError {
    fn netlink(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Self {
        let context = context.into();
        move |source| Self::Netlink { context, source }
    }
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Prefix of every host-side pod interface this plugin creates.
pub const HOST_VETH_PREFIX: &str = "tdr";

/// Addresses that are wired to a pod right now in `node_netns`: the node's host route
/// (`/32`, `/128`) to the address goes out through one of our host veths. ADD installs that
/// route with the veth and DEL removes it with the veth, so this is what proves a pod
/// sandbox still uses an address. Blocking.
pub fn wired_pod_addresses(
    node_netns: Option<&Path>,
) -> Result<std::collections::HashSet<IpAddr>, LinkError> {
    run_in(node_netns, |handle| async move {
        let links: Vec<_> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(LinkError::netlink("listing links"))?;
        let host_veths: std::collections::HashSet<u32> = links
            .iter()
            .map(LinkInfo::from_message)
            .filter(|l| l.name.starts_with(HOST_VETH_PREFIX))
            .map(|l| l.index)
            .collect();
        let mut wired = std::collections::HashSet::new();
        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<_> = handle
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(LinkError::netlink("listing routes"))?;
            for route in routes {
                let (mut dst, mut oif) = (None, None);
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
                            dst = Some(IpAddr::V4(*v4));
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
                            dst = Some(IpAddr::V6(*v6));
                        }
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        _ => {}
                    }
                }
                let host_route = |ip: &IpAddr| {
                    let full = if ip.is_ipv4() { 32 } else { 128 };
                    route.header.destination_prefix_length == full
                };
                if let (Some(ip), Some(oif)) = (dst, oif)
                    && host_route(&ip)
                    && host_veths.contains(&oif)
                {
                    wired.insert(ip);
                }
            }
        }
        Ok(wired)
    })
}

/// The host-side interface name of an attachment: `tdr` + 11 hex digits of the FNV-1a
/// hash of `containerID/ifname` (15 characters, the kernel's limit).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{HOST_VETH_PREFIX}{:011x}", hash & ((1 << 44) - 1))
}

/// The alias a host veth carries: which attachment it belongs to. Deletions check it, so
/// even a collision of the 44-bit name hash can never make one pod's DEL or ADD remove
/// another pod's interface.
pub fn owner_tag(container_id: &str, ifname: &str) -> String {
    format!("tendril:{container_id}/{ifname}")
}

/// The alias of `name` if it exists and belongs to another attachment than `owner`.
async fn foreign_owner(
    handle: &Handle,
    name: &str,
    owner: &str,
) -> Result<Option<String>, LinkError> {
    Ok(link_by_name(handle, name)
        .await?
        .and_then(|l| l.alias)
        .filter(|alias| alias != owner))
}

/// One end of the pair as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub up: bool,
    /// `IFLA_IFALIAS`: on host veths, the attachment owning it ([`owner_tag`]).
    pub alias: Option<String>,
}

impl LinkInfo {
    fn from_message(message: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            name: String::new(),
            index: message.header.index,
            mac: [0; 6],
            up: message.header.flags.contains(LinkFlags::Up),
            alias: None,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => info.name = name.clone(),
                LinkAttribute::IfAlias(alias) => info.alias = Some(alias.clone()),
                LinkAttribute::Address(mac) if mac.len() == 6 => info.mac.copy_from_slice(mac),
                _ => {}
            }
        }
        info
    }

    pub fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// What ADD wires up.
#[derive(Clone, Debug)]
pub struct Plan {
    pub netns: PathBuf,
    /// [`owner_tag`] of the attachment.
    pub owner: String,
    pub ifname: String,
    pub host_name: String,
    pub ips: Vec<PodIp>,
    pub mtu: u32,
}

/// The wired attachment.
#[derive(Clone, Debug)]
pub struct Wired {
    pub host: LinkInfo,
    pub pod: LinkInfo,
}

/// Runs `work` with a netlink handle on a fresh thread, inside `netns` if given.
pub fn run_in<T, F, Fut>(netns: Option<&Path>, work: F) -> Result<T, LinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, LinkError>>,
{
    let file = netns
        .map(|path| {
            File::open(path).map_err(|source| LinkError::Netns {
                path: path.display().to_string(),
                source,
            })
        })
        .transpose()?;
    let path = netns.map(|p| p.display().to_string()).unwrap_or_default();
    std::thread::spawn(move || {
        if let Some(file) = &file {
            // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(LinkError::Netns {
                    path,
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(connection);
            work(handle).await
        })
    })
    .join()
    .unwrap_or_else(|_| Err(LinkError::Missing("netlink worker thread panicked".into())))
}

pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkInfo>, LinkError> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(message) => Ok(message.as_ref().map(LinkInfo::from_message)),
        Err(err) if matches!(errno(&err), Some(ENODEV | ENOENT)) => Ok(None),
        Err(err) => Err(LinkError::netlink(format!("looking up {name}"))(err)),
    }
}

/// A link by index, `None` when there is none.
pub async fn link_by_index(handle: &Handle, index: u32) -> Result<Option<LinkInfo>, LinkError> {
    match handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        Ok(message) => Ok(message.as_ref().map(LinkInfo::from_message)),
        Err(err) if matches!(errno(&err), Some(ENODEV | ENOENT)) => Ok(None),
        Err(err) => Err(LinkError::netlink(format!("looking up link {index}"))(err)),
    }
}

/// Deletes a link by name; returns whether it existed.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, LinkError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        Err(err) if matches!(errno(&err), Some(ENODEV | ENOENT)) => Ok(false),
        Err(err) => Err(LinkError::netlink(format!("deleting {name}"))(err)),
    }
}

/// Adds a host route to `ip` (link scope) through interface `index`, replacing any.
pub async fn add_host_route(handle: &Handle, ip: IpAddr, index: u32) -> Result<(), LinkError> {
    let message = match ip {
        IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .output_interface(index)
            .build(),
    };
    handle
        .route()
        .add(message)
        .replace()
        .execute()
        .await
        .map_err(LinkError::netlink(format!("route {ip} dev {index}")))
}

async fn add_permanent_neighbour(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    mac: &[u8; 6],
) -> Result<(), LinkError> {
    handle
        .neighbours()
        .add(index, ip)
        .link_layer_address(mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(LinkError::netlink(format!("neighbour {ip} dev {index}")))
}

/// Creates and configures the attachment. On error, whatever was created is removed.
pub fn setup(plan: &Plan) -> Result<Wired, LinkError> {
    let netns = File::open(&plan.netns).map_err(|source| LinkError::Netns {
        path: plan.netns.display().to_string(),
        source,
    })?;
    let result = setup_inner(plan, netns.as_raw_fd());
    if let Err(err) = &result
        && !matches!(err, LinkError::Collision { .. })
    {
        // Best effort: deleting the host end removes the pod end and every route on both.
        let _ = teardown(&plan.host_name, &plan.owner);
    }
    result
}

fn setup_inner(plan: &Plan, netns_fd: RawFd) -> Result<Wired, LinkError> {
    let (host_name, ifname, mtu) = (plan.host_name.clone(), plan.ifname.clone(), plan.mtu);
    let owner = plan.owner.clone();
    let host = run_in(None, move |handle| async move {
        if let Some(other) = foreign_owner(&handle, &host_name, &owner).await? {
            return Err(LinkError::Collision {
                name: host_name,
                other,
            });
        }
        // A leftover from an earlier, interrupted ADD of the same attachment.
        delete_link(&handle, &host_name).await?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(ifname.clone())
            .mtu(mtu)
            .setns_by_fd(netns_fd)
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_name.clone())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .up()
            .build();
        match handle.link().add(veth).execute().await {
            Ok(()) => {}
            Err(err) if errno(&err) == Some(EEXIST) => return Err(LinkError::Exists(ifname)),
            Err(err) => {
                return Err(LinkError::netlink(format!(
                    "creating veth {host_name}/{ifname}"
                ))(err));
            }
        }
        let link = link_by_name(&handle, &host_name)
            .await?
            .ok_or_else(|| LinkError::Missing(format!("{host_name} vanished after creation")))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(link.index)
                    .alias(owner.clone())
                    .build(),
            )
            .execute()
            .await
            .map_err(LinkError::netlink(format!("tagging {host_name}")))?;
        Ok(LinkInfo {
            alias: Some(owner),
            ..link
        })
    })?;

    let (ifname, ips, host_mac) = (plan.ifname.clone(), plan.ips.clone(), host.mac);
    let pod = run_in(Some(&plan.netns), move |handle| async move {
        let link = link_by_name(&handle, &ifname).await?.ok_or_else(|| {
            LinkError::Missing(format!("{ifname} did not appear in the pod's namespace"))
        })?;
        let index = link.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(LinkError::netlink(format!("setting {ifname} up")))?;
        for ip in &ips {
            let mut request = match ip.address {
                IpAddr::V4(_) => handle.address().add(index, ip.address, 32),
                IpAddr::V6(_) => handle.address().add(index, ip.address, 128),
            };
            if ip.address.is_ipv6() {
                // The address is ours alone (the agent allocated it): skip duplicate detection.
                request
                    .message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request
                .replace()
                .execute()
                .await
                .map_err(LinkError::netlink(format!(
                    "address {} on {ifname}",
                    ip.address
                )))?;
        }
        for ip in &ips {
            add_host_route(&handle, ip.gateway, index).await?;
            let default = match ip.gateway {
                IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(gw)
                    .output_interface(index)
                    .build(),
                IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new()
                    .gateway(gw)
                    .output_interface(index)
                    .build(),
            };
            handle
                .route()
                .add(default)
                .replace()
                .execute()
                .await
                .map_err(LinkError::netlink(format!(
                    "default route via {}",
                    ip.gateway
                )))?;
            add_permanent_neighbour(&handle, index, ip.gateway, &host_mac).await?;
        }
        Ok(link)
    })?;

    let (host_index, ips, pod_mac) = (host.index, plan.ips.clone(), pod.mac);
    run_in(None, move |handle| async move {
        for ip in &ips {
            add_host_route(&handle, ip.address, host_index).await?;
            add_permanent_neighbour(&handle, host_index, ip.address, &pod_mac).await?;
        }
        Ok(())
    })?;
    Ok(Wired { host, pod })
}

/// Removes the attachment's host veth (and with it the pod end and all routes through
/// it). Returns whether it existed; a veth of that name owned by another attachment is
/// left alone.
pub fn teardown(host_name: &str, owner: &str) -> Result<bool, LinkError> {
    let (host_name, owner) = (host_name.to_string(), owner.to_string());
    run_in(None, move |handle| async move {
        if foreign_owner(&handle, &host_name, &owner).await?.is_some() {
            return Ok(false);
        }
        delete_link(&handle, &host_name).await
    })
}

/// CHECK: the list of differences between the kernel and what ADD set up (empty when
/// everything is in place).
pub fn check(plan: &Plan) -> Result<Vec<String>, LinkError> {
    let mut problems = Vec::new();
    let host_name = plan.host_name.clone();
    let host = run_in(None, move |handle| async move {
        link_by_name(&handle, &host_name).await
    })?;
    match &host {
        None => problems.push(format!("host interface {} is missing", plan.host_name)),
        Some(link) if !link.up => {
            problems.push(format!("host interface {} is down", plan.host_name))
        }
        Some(link) if link.alias.as_deref() != Some(plan.owner.as_str()) => problems.push(format!(
            "host interface {} belongs to {:?}",
            plan.host_name, link.alias
        )),
        Some(_) => {}
    }
    let (ifname, ips) = (plan.ifname.clone(), plan.ips.clone());
    let pod_problems = run_in(Some(&plan.netns), move |handle| async move {
        let mut problems = Vec::new();
        let Some(link) = link_by_name(&handle, &ifname).await? else {
            return Ok(vec![format!("interface {ifname} is missing in the pod")]);
        };
        if !link.up {
            problems.push(format!("interface {ifname} is down"));
        }
        let addresses: Vec<IpAddr> = handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .map_ok(|m| {
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(ip),
                    _ => None,
                })
            })
            .try_collect::<Vec<_>>()
            .await
            .map_err(LinkError::netlink("listing addresses"))?
            .into_iter()
            .flatten()
            .collect();
        for ip in &ips {
            if !addresses.contains(&ip.address) {
                problems.push(format!("address {} is missing on {ifname}", ip.address));
            }
            if !has_default_route(&handle, ip.gateway, link.index).await? {
                problems.push(format!(
                    "default route via {} dev {ifname} is missing",
                    ip.gateway
                ));
            }
        }
        Ok(problems)
    });
    match pod_problems {
        Ok(list) => problems.extend(list),
        Err(LinkError::Netns { path, source }) => {
            problems.push(format!("network namespace {path}: {source}"))
        }
        Err(other) => return Err(other),
    }
    Ok(problems)
}

async fn has_default_route(
    handle: &Handle,
    gateway: IpAddr,
    index: u32,
) -> Result<bool, LinkError> {
    let query = match gateway {
        IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let routes: Vec<_> = handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .map_err(LinkError::netlink("listing routes"))?;
    Ok(routes.iter().any(|route| {
        route.header.destination_prefix_length == 0
            && route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
            && route.attributes.iter().any(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(gw)) => IpAddr::V4(*gw) == gateway,
                RouteAttribute::Gateway(RouteAddress::Inet6(gw)) => IpAddr::V6(*gw) == gateway,
                _ => false,
            })
    }))
}

/// `ESRCH` from a route or neighbour delete means it was already gone.
pub fn is_gone(err: &rtnetlink::Error) -> bool {
    matches!(errno(err), Some(ENODEV | ENOENT | ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_fit_ifnamsiz_and_differ() {
        let a = host_veth_name("0123456789abcdef", "eth0");
        let b = host_veth_name("0123456789abcdef", "net1");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("tdr"));
        assert_ne!(a, b);
        assert_eq!(a, host_veth_name("0123456789abcdef", "eth0"));
    }
}
