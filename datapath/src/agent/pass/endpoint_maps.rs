//! Step `endpoint maps`: `endpoints` (local pod address → veth, MAC, identity, endpoint
//! id), `ipcache` (every address and prefix the node knows → identity and tunnel endpoint)
//! and `node_config` (tunnel device, node address, flags) with `node_config6` (the node's
//! IPv6 address), converged by diff and pruned
//! (the pass runs only with complete caches).

use super::{MapGroup, MapOutcome, NodeContext, Pass, Step, StepFailure};
use crate::bpf::AnyKey;
use crate::bpf::maps::{
    self, EndpointInfo, NODE_F_IPV6_POLICY, NODE_F_POLICY_AUDIT, NODE_F_TUNNEL, NodeConfig,
    NodeConfig6,
};
use crate::config::PolicyEnforcementConfig;
use std::collections::BTreeMap;
use std::net::IpAddr;

pub struct EndpointMaps;

/// What the endpoint maps should hold, from the desired state and the routing step's
/// wiring. A pod whose veth is not wired yet is left out (pending), not guessed.
fn desired_endpoints(pass: &Pass) -> BTreeMap<IpAddr, EndpointInfo> {
    let mut endpoints = BTreeMap::new();
    for ep in &pass.desired.local {
        for ip in &ep.ips {
            let Some(w) = pass.netlink.wiring.get(ip) else {
                continue;
            };
            endpoints.insert(
                *ip,
                EndpointInfo {
                    ifindex: w.ifindex,
                    identity: ep.identity,
                    endpoint_id: ep.endpoint_id,
                    flags: 0,
                    mac: w.pod_mac,
                    node_mac: w.host_mac,
                },
            );
        }
    }
    endpoints
}

fn desired_node_config(pass: &Pass, policy: &PolicyEnforcementConfig) -> NodeConfig {
    let tunnel = pass.netlink.tunnel_ifindex;
    NodeConfig {
        tunnel_ifindex: tunnel.unwrap_or(0),
        node_ipv4: pass.desired.node_ip.map_or([0; 4], |ip| ip.octets()),
        flags: if tunnel.is_some() { NODE_F_TUNNEL } else { 0 }
            | if policy.audit_mode {
                NODE_F_POLICY_AUDIT
            } else {
                0
            }
            | if policy.ipv6 { NODE_F_IPV6_POLICY } else { 0 },
        pad: 0,
    }
}

impl Step for EndpointMaps {
    const NAME: &'static str = "endpoint maps";

    async fn run(&mut self, node: &NodeContext, pass: &mut Pass) -> Result<(), StepFailure> {
        let endpoints = desired_endpoints(pass);
        let ipcache = pass.desired.ipcache.clone();
        let node_config = desired_node_config(pass, &node.cfg.policy);
        let node_config6 = NodeConfig6 {
            node_ipv6: pass.desired.node_ip6.map_or([0; 16], |ip| ip.octets()),
        };
        let metrics = node.metrics.clone();
        let (endpoints, ipcache, node_config_error) = node
            .with_dataplane(move |dp| {
                let endpoints = dp.endpoints.converge(&endpoints, true)?;
                metrics.observe_converge(maps::ENDPOINTS, &endpoints);
                let ipcache = dp.ipcache.converge(&ipcache, true)?;
                metrics.observe_converge(maps::IPCACHE, &ipcache);
                let node_config_error = dp
                    .node_config
                    .set(&node_config)
                    .and_then(|_| dp.node_config.set6(&node_config6))
                    .err()
                    .map(|e| e.to_string());
                Ok::<_, crate::bpf::DataplaneError>((endpoints, ipcache, node_config_error))
            })
            .await?
            .map_err(|e| StepFailure::new("MapReadFailed", e))?;
        pass.maps.push(MapOutcome {
            map: maps::ENDPOINTS,
            group: MapGroup::Forwarding,
            report: endpoints.map_keys(AnyKey::from),
        });
        pass.maps.push(MapOutcome {
            map: maps::IPCACHE,
            group: MapGroup::Forwarding,
            report: ipcache.map_keys(AnyKey::from),
        });
        pass.node_config_error = node_config_error;
        Ok(())
    }
}
