//! `tendrilctl bpf <map>`: the node's pinned maps in readable form, through the same typed
//! readers the agent uses (`crate::bpf::maps`). Run on the node (root, its bpffs).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use serde_json::{Value, json};

use super::identity_name;
use super::table::Table;
use super::trace::protocol_name;
use crate::bpf::maps::{
    self as maps, CT_F_CLOSING, CT_F_SEEN_REPLY, Conntrack, Direction, EgressMaps, Endpoints,
    Ipcache, LbMaps, Metrics, PinnedMap, PolicyMaps,
};
use crate::bpf::policy::{
    POLICY_F_DEFAULT_DENY_EGRESS, POLICY_F_DEFAULT_DENY_INGRESS, PROTO_ANY, Verdict, port_mask,
};

/// The maps `bpf` can dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MapName {
    /// Local pod IP → interface, identity, endpoint id.
    Endpoints,
    /// IP prefix → identity and tunnel endpoint.
    Ipcache,
    /// Policy entries per endpoint (direction, peer, protocol/port block → verdict).
    Policy,
    /// Per-endpoint policy revision and default-deny flags.
    PolicyState,
    /// Policy CIDR → node-local identity.
    PolicyCidrs,
    /// Tracked connections.
    Conntrack,
    /// Packet/byte counters by reason and direction.
    Metrics,
    /// Service frontends (`lb_services` and `lb6_services`): slot 0 is the service, slots ≥ 1
    /// its backends.
    LbServices,
    /// Backend id → address (`lb_backends` and `lb6_backends`).
    LbBackends,
    /// (pod source, destination prefix) → egress gateway and egress IP.
    EgressPolicy,
}

/// A dump: one JSON object per entry and the same as a table.
pub struct Dump {
    pub rows: Vec<Value>,
    pub table: Table,
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads `map` from the pin directory `dir` (`<bpffs>/tendril/<node>`).
pub fn dump(dir: &Path, map: MapName) -> anyhow::Result<Dump> {
    let (header, rows): (&[&str], Vec<(Vec<String>, Value)>) = match map {
        MapName::Endpoints => {
            let m: Endpoints = PinnedMap::open(dir, maps::ENDPOINTS)?;
            let rows = m
                .by_ip()?
                .into_iter()
                .map(|(ip, e)| {
                    (
                        vec![
                            ip.to_string(),
                            e.endpoint_id.to_string(),
                            identity_name(e.identity),
                            e.ifindex.to_string(),
                            mac(e.mac),
                            mac(e.node_mac),
                        ],
                        json!({"ip": ip.to_string(), "endpointId": e.endpoint_id, "identity": e.identity,
                               "ifindex": e.ifindex, "mac": mac(e.mac), "nodeMac": mac(e.node_mac), "flags": e.flags}),
                    )
                })
                .collect();
            (
                &["IP", "ENDPOINT", "IDENTITY", "IFINDEX", "MAC", "NODE MAC"],
                rows,
            )
        }
        MapName::Ipcache => {
            let m: Ipcache = PinnedMap::open(dir, maps::IPCACHE)?;
            let rows = m
                .by_prefix()?
                .into_iter()
                .map(|(net, v)| {
                    let tunnel = v.tunnel_endpoint().map(|t| t.to_string());
                    (
                        vec![
                            net.to_string(),
                            identity_name(v.identity),
                            tunnel.clone().unwrap_or_else(|| "-".into()),
                            v.encrypt_key.to_string(),
                        ],
                        json!({"prefix": net.to_string(), "identity": v.identity,
                               "tunnelEndpoint": tunnel, "flags": v.flags, "encryptKey": v.encrypt_key}),
                    )
                })
                .collect();
            (&["PREFIX", "IDENTITY", "TUNNEL ENDPOINT", "KEY"], rows)
        }
        MapName::Policy | MapName::PolicyState | MapName::PolicyCidrs => {
            let m = PolicyMaps::open(dir)?;
            match map {
                MapName::Policy => {
                    let rows = m
                        .entries()?
                        .into_iter()
                        .map(|(e, v)| {
                            let ports = if e.protocol == PROTO_ANY {
                                "any".to_string()
                            } else if e.port_prefix == 0 {
                                format!("{} all", protocol_name(e.protocol))
                            } else {
                                let last = e.port | !port_mask(e.port_prefix);
                                if last == e.port {
                                    format!("{}/{}", e.port, protocol_name(e.protocol))
                                } else {
                                    format!("{}-{last}/{}", e.port, protocol_name(e.protocol))
                                }
                            };
                            let verdict = match v {
                                Verdict::Allow => "allow",
                                Verdict::Deny => "deny",
                            };
                            (
                                vec![
                                    e.endpoint_id.to_string(),
                                    direction(e.direction).into(),
                                    identity_name(e.peer),
                                    ports.clone(),
                                    verdict.into(),
                                ],
                                json!({"endpointId": e.endpoint_id, "direction": direction(e.direction),
                                       "peer": e.peer, "protocol": e.protocol, "port": e.port,
                                       "portPrefix": e.port_prefix, "ports": ports, "verdict": verdict}),
                            )
                        })
                        .collect();
                    (&["ENDPOINT", "DIRECTION", "PEER", "PORTS", "VERDICT"], rows)
                }
                MapName::PolicyState => {
                    let rows = m
                        .states()?
                        .into_iter()
                        .map(|(id, s)| {
                            let ingress = s.flags & POLICY_F_DEFAULT_DENY_INGRESS != 0;
                            let egress = s.flags & POLICY_F_DEFAULT_DENY_EGRESS != 0;
                            (
                                vec![
                                    id.to_string(),
                                    s.revision.to_string(),
                                    ingress.to_string(),
                                    egress.to_string(),
                                ],
                                json!({"endpointId": id, "revision": s.revision,
                                       "defaultDenyIngress": ingress, "defaultDenyEgress": egress}),
                            )
                        })
                        .collect();
                    (
                        &[
                            "ENDPOINT",
                            "REVISION",
                            "DEFAULT DENY INGRESS",
                            "DEFAULT DENY EGRESS",
                        ],
                        rows,
                    )
                }
                _ => {
                    let rows = m
                        .cidrs()?
                        .into_iter()
                        .map(|(net, id)| {
                            (
                                vec![net.to_string(), identity_name(id)],
                                json!({"prefix": net.to_string(), "identity": id}),
                            )
                        })
                        .collect();
                    (&["PREFIX", "IDENTITY"], rows)
                }
            }
        }
        MapName::Conntrack => {
            let m = Conntrack::open(dir)?;
            let rows = m
                .entries()?
                .into_iter()
                .map(|(k, v)| {
                    let (src, dst) = (
                        format!("{}:{}", Ipv4Addr::from(k.saddr), k.sport),
                        format!("{}:{}", Ipv4Addr::from(k.daddr), k.dport),
                    );
                    let dir = Direction::from_raw(k.dir).map_or("?", direction);
                    let mut state = Vec::new();
                    if v.flags & CT_F_SEEN_REPLY != 0 {
                        state.push("replied");
                    }
                    if v.flags & CT_F_CLOSING != 0 {
                        state.push("closing");
                    }
                    (
                        vec![
                            protocol_name(k.proto).into(),
                            src.clone(),
                            dst.clone(),
                            dir.into(),
                            k.endpoint_id.to_string(),
                            v.packets.to_string(),
                            state.join(","),
                        ],
                        json!({"protocol": k.proto, "source": src, "destination": dst, "direction": dir,
                               "endpointId": k.endpoint_id, "packets": v.packets, "flags": v.flags,
                               "policyRevision": v.policy_revision, "createdNs": v.created_ns,
                               "lastSeenNs": v.last_seen_ns}),
                    )
                })
                .collect();
            (
                &[
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
                    "DIRECTION",
                    "ENDPOINT",
                    "PACKETS",
                    "STATE",
                ],
                rows,
            )
        }
        MapName::Metrics => {
            let m = Metrics::open(dir)?;
            let rows = m
                .samples()?
                .into_iter()
                .map(|s| {
                    let reason = s
                        .reason
                        .map_or_else(|| s.raw_reason.to_string(), |r| r.as_str().to_string());
                    let dir = s.direction.map_or("-", direction);
                    (
                        vec![
                            reason.clone(),
                            dir.into(),
                            s.packets.to_string(),
                            s.bytes.to_string(),
                        ],
                        json!({"reason": reason, "direction": dir, "packets": s.packets, "bytes": s.bytes}),
                    )
                })
                .collect();
            (&["REASON", "DIRECTION", "PACKETS", "BYTES"], rows)
        }
        MapName::LbServices => {
            let m = LbMaps::open(dir)?;
            // Both families' maps, IPv4 first.
            let v4 = m.services()?.into_iter().map(|(k, v)| {
                let address =
                    SocketAddr::from((Ipv4Addr::from(k.address), u16::from_be_bytes(k.dport)));
                (address, k.proto, k.scope, k.backend_slot, v)
            });
            let v6 = m.services6()?.into_iter().map(|(k, v)| {
                let address =
                    SocketAddr::from((Ipv6Addr::from(k.address), u16::from_be_bytes(k.dport)));
                (address, k.proto, k.scope, k.backend_slot, v)
            });
            let rows = v4
                .chain(v6)
                .map(|(address, proto, scope, slot, v)| {
                    let k = (scope, slot);
                    let frontend = format!("{address}/{}", protocol_name(proto));
                    (
                        vec![
                            frontend.clone(),
                            k.0.to_string(),
                            k.1.to_string(),
                            v.backend_id.to_string(),
                            v.count.to_string(),
                            v.rev_nat_index.to_string(),
                            v.flags.to_string(),
                        ],
                        json!({"frontend": frontend, "scope": k.0, "slot": k.1,
                               "backendId": v.backend_id, "count": v.count,
                               "revNatIndex": v.rev_nat_index, "affinityTimeout": v.affinity_timeout,
                               "flags": v.flags}),
                    )
                })
                .collect();
            (
                &[
                    "FRONTEND", "SCOPE", "SLOT", "BACKEND", "COUNT", "REVNAT", "FLAGS",
                ],
                rows,
            )
        }
        MapName::LbBackends => {
            let m = LbMaps::open(dir)?;
            let v4 = m.backends()?.into_iter().map(|(id, b)| {
                let address =
                    SocketAddr::from((Ipv4Addr::from(b.address), u16::from_be_bytes(b.port)));
                (id, address, b.proto, b.flags)
            });
            let v6 = m.backends6()?.into_iter().map(|(id, b)| {
                let address =
                    SocketAddr::from((Ipv6Addr::from(b.address), u16::from_be_bytes(b.port)));
                (id, address, b.proto, b.flags)
            });
            let rows = v4
                .chain(v6)
                .map(|(id, address, proto, flags)| {
                    let address = format!("{address}/{}", protocol_name(proto));
                    (
                        vec![id.to_string(), address.clone(), flags.to_string()],
                        json!({"id": id, "address": address, "flags": flags}),
                    )
                })
                .collect();
            (&["ID", "ADDRESS", "FLAGS"], rows)
        }
        MapName::EgressPolicy => {
            let m = EgressMaps::open(dir)?;
            let rows = m
                .policy()?
                .into_iter()
                .map(|(k, v)| {
                    let (source, destination) = k
                        .to_parts()
                        .map_or(("?".to_string(), "?".to_string()), |(s, d)| {
                            (s.to_string(), d.to_string())
                        });
                    let (gateway, egress_ip) = (
                        Ipv4Addr::from(v.gateway_ip).to_string(),
                        Ipv4Addr::from(v.egress_ip).to_string(),
                    );
                    (
                        vec![
                            source.clone(),
                            destination.clone(),
                            gateway.clone(),
                            egress_ip.clone(),
                        ],
                        json!({"source": source, "destination": destination,
                               "gateway": gateway, "egressIp": egress_ip, "flags": v.flags}),
                    )
                })
                .collect();
            (&["SOURCE", "DESTINATION", "GATEWAY", "EGRESS IP"], rows)
        }
    };
    let mut table = Table::new(header);
    let mut json_rows = Vec::new();
    for (cells, value) in rows {
        table.row(cells);
        json_rows.push(value);
    }
    Ok(Dump {
        rows: json_rows,
        table,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::policy::LOCAL_IDENTITY_FLAG;

    #[test]
    fn identities_read_as_their_kind() {
        assert_eq!(identity_name(0), "any");
        assert_eq!(identity_name(2), "reserved:world");
        assert_eq!(identity_name(6), "reserved:remote-node");
        assert_eq!(identity_name(300), "300");
        assert_eq!(identity_name(LOCAL_IDENTITY_FLAG | 3), "cidr:3");
    }
}
