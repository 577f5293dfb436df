//! gobgpd's API in Tendril's terms: peers and paths to and from GoBGP's messages, and the
//! calls the reconciler makes. Conversions are pure (and tested); calls are thin.

use super::api::{self, Client, apipb};
use super::desired::{PathSpec, PeerSpec, Speaker};
use futures::StreamExt;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::net::IpAddr;
use tendril_crds::v1alpha1::SessionStatus;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
#[error("gobgpd {operation}: {status}")]
pub struct ApiError {
    pub operation: &'static str,
    pub status: tonic::Status,
}

fn call(operation: &'static str) -> impl FnOnce(tonic::Status) -> ApiError {
    move |status| ApiError { operation, status }
}

/// Seconds gobgpd (restarting) waits for peers' End-of-RIB before it advertises anyway.
const DEFERRAL_SECONDS: u32 = 5;
/// BGP ORIGIN IGP.
const ORIGIN_IGP: u32 = 0;

/// The `Peer` of an `AddPeer` for `peer`. `restarting`: the daemon came back from a
/// restart and this is its first configuration (graceful restart's R and F bits, so peers
/// keep the routes they hold until its End-of-RIB).
pub fn api_peer(peer: &PeerSpec, restarting: bool) -> apipb::Peer {
    let family = match peer.address {
        IpAddr::V4(_) => api::ipv4_unicast(),
        IpAddr::V6(_) => api::ipv6_unicast(),
    };
    let graceful = peer.graceful_restart_seconds.is_some();
    apipb::Peer {
        conf: Some(apipb::PeerConf {
            neighbor_address: peer.address.to_string(),
            peer_asn: peer.peer_asn,
            description: "tendril".into(),
            // gobgpd sets TCP_MD5SIG for the peer on its connecting and listening sockets.
            auth_password: peer
                .password
                .as_ref()
                .map(|p| p.reveal().to_string())
                .unwrap_or_default(),
            ..Default::default()
        }),
        ebgp_multihop: (peer.multihop_ttl > 1).then(|| apipb::EbgpMultihop {
            enabled: true,
            multihop_ttl: u32::from(peer.multihop_ttl),
        }),
        state: None,
        timers: Some(apipb::Timers {
            config: Some(apipb::TimersConfig {
                connect_retry: peer.connect_retry_seconds,
                hold_time: peer.hold_time_seconds,
                keepalive_interval: peer.keepalive_seconds,
            }),
            state: None,
        }),
        transport: Some(apipb::Transport {
            remote_port: u32::from(peer.port),
            ..Default::default()
        }),
        graceful_restart: peer.graceful_restart_seconds.map(|restart_time| {
            apipb::GracefulRestart {
                enabled: true,
                restart_time,
                deferral_time: DEFERRAL_SECONDS,
                local_restarting: restarting,
                ..Default::default()
            }
        }),
        afi_safis: vec![apipb::AfiSafi {
            mp_graceful_restart: graceful.then_some(apipb::MpGracefulRestart {
                config: Some(apipb::MpGracefulRestartConfig { enabled: true }),
            }),
            config: Some(apipb::AfiSafiConfig {
                family: Some(family),
                enabled: true,
            }),
            state: None,
        }],
    }
}

fn nlri(prefix: &IpNet) -> prost_types::Any {
    api::pack(
        "IPAddressPrefix",
        &apipb::IpAddressPrefix {
            prefix_len: u32::from(prefix.prefix_len()),
            prefix: prefix.network().to_string(),
        },
    )
}

/// The `Path` of an `AddPath`/`DeletePath` for `path`: ORIGIN IGP, the next hop left to
/// gobgpd (unspecified: it puts the session's local address), communities.
pub fn api_path(path: &PathSpec) -> apipb::Path {
    let mut pattrs = vec![api::pack(
        "OriginAttribute",
        &apipb::OriginAttribute { origin: ORIGIN_IGP },
    )];
    let family = match path.prefix {
        IpNet::V4(_) => {
            pattrs.push(api::pack(
                "NextHopAttribute",
                &apipb::NextHopAttribute {
                    next_hop: "0.0.0.0".into(),
                },
            ));
            api::ipv4_unicast()
        }
        IpNet::V6(_) => {
            pattrs.push(api::pack(
                "MpReachNLRIAttribute",
                &apipb::MpReachNlriAttribute {
                    family: Some(api::ipv6_unicast()),
                    next_hops: vec!["::".into()],
                    nlris: vec![nlri(&path.prefix)],
                },
            ));
            api::ipv6_unicast()
        }
    };
    if !path.communities.is_empty() {
        pattrs.push(api::pack(
            "CommunitiesAttribute",
            &apipb::CommunitiesAttribute {
                communities: path.communities.clone(),
            },
        ));
    }
    if !path.large_communities.is_empty() {
        pattrs.push(api::pack(
            "LargeCommunitiesAttribute",
            &apipb::LargeCommunitiesAttribute {
                communities: path
                    .large_communities
                    .iter()
                    .map(
                        |&(global_admin, local_data1, local_data2)| apipb::LargeCommunity {
                            global_admin,
                            local_data1,
                            local_data2,
                        },
                    )
                    .collect(),
            },
        ));
    }
    apipb::Path {
        nlri: Some(nlri(&path.prefix)),
        pattrs,
        family: Some(family),
        ..Default::default()
    }
}

/// A path of gobgpd's global RIB as a [`PathSpec`], if this speaker originated it (a path
/// learned from a peer names the peer's address).
pub fn local_path(path: &apipb::Path) -> Option<PathSpec> {
    if path.is_from_external || path.neighbor_ip.parse::<IpAddr>().is_ok() {
        return None;
    }
    let nlri: apipb::IpAddressPrefix = api::unpack("IPAddressPrefix", path.nlri.as_ref()?)?;
    let address: IpAddr = nlri.prefix.parse().ok()?;
    let prefix = IpNet::new(address, u8::try_from(nlri.prefix_len).ok()?).ok()?;
    let mut spec = PathSpec {
        prefix,
        ..PathSpec::default()
    };
    for attr in &path.pattrs {
        if let Some(c) = api::unpack::<apipb::CommunitiesAttribute>("CommunitiesAttribute", attr) {
            spec.communities = c.communities;
            spec.communities.sort_unstable();
        } else if let Some(c) =
            api::unpack::<apipb::LargeCommunitiesAttribute>("LargeCommunitiesAttribute", attr)
        {
            spec.large_communities = c
                .communities
                .iter()
                .map(|l| (l.global_admin, l.local_data1, l.local_data2))
                .collect();
            spec.large_communities.sort_unstable();
        }
    }
    Some(spec)
}

/// The state name of `BGPNodeConfig.status.sessions[].state`.
pub fn state_name(state: i32) -> &'static str {
    use apipb::peer_state::SessionState as S;
    match S::try_from(state).unwrap_or(S::Unknown) {
        S::Unknown | S::Idle => "Idle",
        S::Connect => "Connect",
        S::Active => "Active",
        S::Opensent => "OpenSent",
        S::Openconfirm => "OpenConfirm",
        S::Established => "Established",
    }
}

/// The status of one session from what ListPeer reports of it.
pub fn session_status(peer: &apipb::Peer, local_asn: u32) -> Option<SessionStatus> {
    let conf = peer.conf.as_ref()?;
    let state = peer.state.as_ref();
    let state_name = state.map_or("Idle", |s| state_name(s.session_state));
    let (mut advertised, mut received) = (0u64, 0u64);
    for afi_safi in &peer.afi_safis {
        if let Some(s) = &afi_safi.state {
            advertised += s.advertised;
            received += s.received;
        }
    }
    let established_since = (state_name == "Established")
        .then(|| peer.timers.as_ref()?.state.as_ref()?.uptime.as_ref())
        .flatten()
        .and_then(|t| k8s_openapi::jiff::Timestamp::new(t.seconds, 0).ok())
        .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
    Some(SessionStatus {
        local_asn: i64::from(local_asn),
        peer_address: conf.neighbor_address.clone(),
        peer_asn: i64::from(conf.peer_asn),
        state: state_name.to_string(),
        advertised: i64::try_from(advertised).unwrap_or(i64::MAX),
        received: i64::try_from(received).unwrap_or(i64::MAX),
        established_since,
    })
}

/// The speaker's global settings, `None` before `StartBgp`.
pub async fn global(client: &mut Client) -> Result<Option<Speaker>, ApiError> {
    let response = client
        .get_bgp(apipb::GetBgpRequest {})
        .await
        .map_err(call("GetBgp"))?
        .into_inner();
    Ok(response.global.and_then(|g| {
        (g.asn != 0).then_some(())?;
        Some(Speaker {
            asn: g.asn,
            router_id: g.router_id.parse().ok()?,
        })
    }))
}

pub async fn start(
    client: &mut Client,
    speaker: &Speaker,
    listen_port: i32,
) -> Result<(), ApiError> {
    client
        .start_bgp(apipb::StartBgpRequest {
            global: Some(apipb::Global {
                asn: speaker.asn,
                router_id: speaker.router_id.to_string(),
                listen_port,
                listen_addresses: vec![],
            }),
        })
        .await
        .map_err(call("StartBgp"))?;
    Ok(())
}

pub async fn stop(client: &mut Client) -> Result<(), ApiError> {
    client
        .stop_bgp(apipb::StopBgpRequest {})
        .await
        .map_err(call("StopBgp"))?;
    Ok(())
}

/// Every peer (its prefixes advertised are counted by [`advertised_to`]).
pub async fn peers(client: &mut Client) -> Result<Vec<apipb::Peer>, ApiError> {
    let mut stream = client
        .list_peer(apipb::ListPeerRequest {
            address: String::new(),
            enable_advertised: false,
        })
        .await
        .map_err(call("ListPeer"))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        if let Some(peer) = item.map_err(call("ListPeer"))?.peer {
            out.push(peer);
        }
    }
    Ok(out)
}

pub async fn add_peer(
    client: &mut Client,
    peer: &PeerSpec,
    restarting: bool,
) -> Result<(), ApiError> {
    client
        .add_peer(apipb::AddPeerRequest {
            peer: Some(api_peer(peer, restarting)),
        })
        .await
        .map_err(call("AddPeer"))?;
    Ok(())
}

pub async fn delete_peer(client: &mut Client, address: IpAddr) -> Result<(), ApiError> {
    client
        .delete_peer(apipb::DeletePeerRequest {
            address: address.to_string(),
            interface: String::new(),
        })
        .await
        .map_err(call("DeletePeer"))?;
    Ok(())
}

/// Prefixes in the Adj-RIB-Out of the peer at `address`: what it was sent (ListPeer's own
/// `advertised` count is not that: it counted one more than the Adj-RIB-Out held).
pub async fn advertised_to(client: &mut Client, address: &str) -> Result<i64, ApiError> {
    let family = if address.contains(':') {
        api::ipv6_unicast()
    } else {
        api::ipv4_unicast()
    };
    let mut stream = client
        .list_path(apipb::ListPathRequest {
            table_type: apipb::TableType::AdjOut as i32,
            name: address.to_string(),
            family: Some(family),
        })
        .await
        .map_err(call("ListPath"))?
        .into_inner();
    let mut count = 0i64;
    while let Some(item) = stream.next().await {
        if item.map_err(call("ListPath"))?.destination.is_some() {
            count += 1;
        }
    }
    Ok(count)
}

/// The paths this speaker originates, both families.
pub async fn local_paths(client: &mut Client) -> Result<BTreeMap<IpNet, PathSpec>, ApiError> {
    let mut out = BTreeMap::new();
    for family in [api::ipv4_unicast(), api::ipv6_unicast()] {
        let mut stream = client
            .list_path(apipb::ListPathRequest {
                table_type: apipb::TableType::Global as i32,
                name: String::new(),
                family: Some(family),
            })
            .await
            .map_err(call("ListPath"))?
            .into_inner();
        while let Some(item) = stream.next().await {
            let Some(destination) = item.map_err(call("ListPath"))?.destination else {
                continue;
            };
            for path in destination.paths.iter().filter_map(local_path) {
                out.insert(path.prefix, path);
            }
        }
    }
    Ok(out)
}

pub async fn add_path(client: &mut Client, path: &PathSpec) -> Result<(), ApiError> {
    client
        .add_path(apipb::AddPathRequest {
            table_type: apipb::TableType::Global as i32,
            vrf_id: String::new(),
            path: Some(api_path(path)),
        })
        .await
        .map_err(call("AddPath"))?;
    Ok(())
}

pub async fn delete_path(client: &mut Client, path: &PathSpec) -> Result<(), ApiError> {
    let api_path = api_path(path);
    client
        .delete_path(apipb::DeletePathRequest {
            table_type: apipb::TableType::Global as i32,
            vrf_id: String::new(),
            family: api_path.family,
            path: Some(api_path),
            uuid: vec![],
        })
        .await
        .map_err(call("DeletePath"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::desired::Password;

    fn path(prefix: &str) -> PathSpec {
        PathSpec {
            prefix: prefix.parse().unwrap(),
            communities: vec![0xfde8_0064],
            large_communities: vec![(64512, 1, 2)],
        }
    }

    #[test]
    fn a_path_round_trips_through_gobgps_messages() {
        for prefix in ["198.51.100.7/32", "2001:db8:1::/64"] {
            let spec = path(prefix);
            let api = api_path(&spec);
            // As ListPath reports a local path: no neighbor address.
            let listed = apipb::Path {
                neighbor_ip: "<nil>".into(),
                ..api.clone()
            };
            assert_eq!(local_path(&listed), Some(spec), "{prefix}");
        }
    }

    #[test]
    fn ipv4_paths_carry_an_unspecified_next_hop_and_ipv6_an_mp_reach() {
        let v4 = api_path(&path("10.200.1.0/24"));
        assert_eq!(v4.family, Some(api::ipv4_unicast()));
        let hop: Vec<apipb::NextHopAttribute> = v4
            .pattrs
            .iter()
            .filter_map(|a| api::unpack("NextHopAttribute", a))
            .collect();
        assert_eq!(hop[0].next_hop, "0.0.0.0");
        let v6 = api_path(&path("2001:db8::/64"));
        let mp: Vec<apipb::MpReachNlriAttribute> = v6
            .pattrs
            .iter()
            .filter_map(|a| api::unpack("MpReachNLRIAttribute", a))
            .collect();
        assert_eq!(mp[0].next_hops, ["::"]);
    }

    #[test]
    fn paths_learned_from_peers_are_not_ours() {
        let learned = apipb::Path {
            neighbor_ip: "10.250.0.1".into(),
            is_from_external: true,
            ..api_path(&path("203.0.113.0/24"))
        };
        assert_eq!(local_path(&learned), None);
    }

    #[test]
    fn a_peer_asks_for_graceful_restart_and_its_timers() {
        let spec = PeerSpec {
            address: "10.250.0.1".parse().unwrap(),
            peer_asn: 65000,
            port: 179,
            multihop_ttl: 1,
            connect_retry_seconds: 5,
            hold_time_seconds: 9,
            keepalive_seconds: 3,
            graceful_restart_seconds: Some(30),
            password: None,
        };
        let peer = api_peer(&spec, true);
        assert_eq!(peer.conf.as_ref().unwrap().auth_password, "");
        let signed = api_peer(
            &PeerSpec {
                password: Some(Password::new("s3cret")),
                ..spec.clone()
            },
            false,
        );
        assert_eq!(signed.conf.unwrap().auth_password, "s3cret");
        let gr = peer.graceful_restart.unwrap();
        assert!(gr.enabled && gr.local_restarting);
        assert_eq!(gr.restart_time, 30);
        assert!(peer.ebgp_multihop.is_none());
        let timers = peer.timers.unwrap().config.unwrap();
        assert_eq!((timers.hold_time, timers.keepalive_interval), (9, 3));
        let afi = &peer.afi_safis[0];
        assert!(afi.mp_graceful_restart.is_some());
        assert_eq!(
            afi.config.as_ref().unwrap().family,
            Some(api::ipv4_unicast())
        );
    }

    #[test]
    fn session_state_names_are_the_crds() {
        let peer = apipb::Peer {
            conf: Some(apipb::PeerConf {
                neighbor_address: "10.250.0.1".into(),
                peer_asn: 65000,
                ..Default::default()
            }),
            state: Some(apipb::PeerState {
                session_state: apipb::peer_state::SessionState::Established as i32,
                ..Default::default()
            }),
            timers: Some(apipb::Timers {
                config: None,
                state: Some(apipb::TimersState {
                    uptime: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
            }),
            afi_safis: vec![apipb::AfiSafi {
                state: Some(apipb::AfiSafiState {
                    advertised: 3,
                    received: 1,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let s = session_status(&peer, 64512).unwrap();
        assert_eq!(s.state, "Established");
        assert_eq!((s.advertised, s.received), (3, 1));
        assert!(s.established_since.is_some());
        assert_eq!(state_name(0), "Idle");
        assert_eq!(state_name(4), "OpenSent");
    }
}
