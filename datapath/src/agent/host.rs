//! The node side of the pod gateway, as Cilium's `cilium_host`/`cilium_net`: a veth pair
//! `tendril_host`/`tendril_net` whose `tendril_host` end holds the gateway address of each
//! pod CIDR (`/32`, `/128`), so packets pods send to their gateway are local to the node
//! (see `cni::link` for the whole routing model). A veth rather than a dummy device: it is
//! in every kernel (the dummy driver is a module that may be missing) and gives the datapath
//! a place to attach programs for host-bound traffic later. Converged by diff: missing
//! addresses are added, addresses of former pod CIDRs removed.

use crate::cni::link::{self, LinkError};
use futures::TryStreamExt;
use rtnetlink::LinkVeth;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use std::net::IpAddr;
use std::path::Path;

pub const HOST_DEVICE: &str = "tendril_host";
/// The other end of the pair.
pub const HOST_PEER: &str = "tendril_net";

/// Makes `tendril_host` (and its peer) exist, be up and hold exactly `gateways`, in
/// `node_netns` (default: the agent's own namespace). Blocking.
pub fn ensure_gateways(node_netns: Option<&Path>, gateways: Vec<IpAddr>) -> Result<(), LinkError> {
    link::run_in(node_netns, move |handle| async move {
        let link = match link::link_by_name(&handle, HOST_DEVICE).await? {
            Some(link) => link,
            None => {
                handle
                    .link()
                    .add(LinkVeth::new(HOST_DEVICE, HOST_PEER).up().build())
                    .execute()
                    .await
                    .map_err(|source| LinkError::Netlink {
                        context: format!("creating {HOST_DEVICE}"),
                        source,
                    })?;
                link::link_by_name(&handle, HOST_DEVICE)
                    .await?
                    .ok_or_else(|| {
                        LinkError::Missing(format!("{HOST_DEVICE} vanished after creation"))
                    })?
            }
        };
        if let Some(peer) = link::link_by_name(&handle, HOST_PEER).await?
            && !peer.up
        {
            handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(peer.index)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|source| LinkError::Netlink {
                    context: format!("setting {HOST_PEER} up"),
                    source,
                })?;
        }
        if !link.up {
            handle
                .link()
                .set(
                    rtnetlink::LinkUnspec::new_with_index(link.index)
                        .up()
                        .build(),
                )
                .execute()
                .await
                .map_err(|source| LinkError::Netlink {
                    context: format!("setting {HOST_DEVICE} up"),
                    source,
                })?;
        }
        let present: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::Netlink {
                context: format!("listing addresses of {HOST_DEVICE}"),
                source,
            })?;
        let address_of = |m: &rtnetlink::packet_route::address::AddressMessage| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        };
        for message in &present {
            let Some(ip) = address_of(message) else {
                continue;
            };
            let ours = gateways.contains(&ip);
            let link_local = matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local());
            if !ours && !link_local {
                handle
                    .address()
                    .del(message.clone())
                    .execute()
                    .await
                    .map_err(|source| LinkError::Netlink {
                        context: format!("removing {ip} from {HOST_DEVICE}"),
                        source,
                    })?;
            }
        }
        for gateway in &gateways {
            if present.iter().any(|m| address_of(m) == Some(*gateway)) {
                continue;
            }
            let prefix = if gateway.is_ipv4() { 32 } else { 128 };
            let mut request = handle.address().add(link.index, *gateway, prefix);
            if gateway.is_ipv6() {
                request
                    .message_mut()
                    .attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            request
                .replace()
                .execute()
                .await
                .map_err(|source| LinkError::Netlink {
                    context: format!("adding {gateway} to {HOST_DEVICE}"),
                    source,
                })?;
        }
        Ok(())
    })
}
