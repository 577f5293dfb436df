//! What the node's BGP speaker should be, from its `BGPNodeConfig` (pure), and the
//! difference between that and what gobgpd holds (pure): the reconciler only reads, calls
//! these, and applies the plan.

use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use tendril_crds::v1alpha1::{BGPNeighbor, BGPNodeConfigSpec};

/// The speaker's global settings (`StartBgp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Speaker {
    pub asn: u32,
    pub router_id: Ipv4Addr,
}

/// One session to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub address: IpAddr,
    pub peer_asn: u32,
    pub port: u16,
    /// 1: directly connected (no eBGP multihop).
    pub multihop_ttl: u8,
    pub connect_retry_seconds: u64,
    pub hold_time_seconds: u64,
    pub keepalive_seconds: u64,
    /// Graceful restart (RFC 4724) with this restart time, or off.
    pub graceful_restart_seconds: Option<u32>,
    /// TCP MD5 signature (RFC 2385) with this password, or none.
    pub password: Option<Password>,
}

/// A peer's TCP MD5 password. Its `Debug` does not show it: it never reaches a log line,
/// an Event, a metric or a status.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The password itself, for gobgpd's `PeerConf.auth_password` only.
    pub fn reveal(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Why the password of an `authSecretRef` cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordMissing {
    /// No Secret of that name in the secrets namespace.
    Secret,
    /// The Secret has no key `password`.
    Key,
    /// The key holds nothing, bytes that are not UTF-8, or more than the kernel's
    /// [`MAX_PASSWORD_BYTES`].
    Unusable,
    /// The namespace's Secrets are not listed (yet): the agent's Role there is missing, or
    /// the apiserver has not answered.
    NotListed,
}

/// The longest TCP MD5 key Linux takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_PASSWORD_BYTES: usize = 80;

/// The key of a password Secret that holds the password.
pub const PASSWORD_KEY: &str = "password";

/// The `Realized=False` reason while a peer's password cannot be read.
pub const PASSWORD_SECRET_MISSING: &str = "PasswordSecretMissing";

/// One path the node originates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathSpec {
    pub prefix: IpNet,
    /// Standard communities (RFC 1997), as `asn << 16 | value`, sorted.
    pub communities: Vec<u32>,
    /// Large communities (RFC 8092), sorted.
    pub large_communities: Vec<(u32, u32, u32)>,
}

/// The node's whole BGP intent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBgp {
    pub revision: i64,
    pub speaker: Speaker,
    pub peers: BTreeMap<IpAddr, PeerSpec>,
    pub paths: BTreeMap<IpNet, PathSpec>,
    /// Peers whose password cannot be read, with why (naming the Secret, never a value):
    /// not opened, and a session gobgpd already holds is left as it is (its Secret may be
    /// being replaced), until the Secret is there.
    pub held_back: BTreeMap<IpAddr, HeldBack>,
}

/// A peer that is not opened while its password cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldBack {
    pub peer_asn: u32,
    /// Why, naming the Secret (never a value).
    pub problem: String,
}

/// Why a `BGPNodeConfig` cannot be realized: the `Realized=False` reason and message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

impl Invalid {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The speaker a spec asks for; `Ok(None)` for a spec without routers (nothing to run).
/// `password` reads the password of an `authSecretRef` (a Secret of `secrets_namespace`).
///
/// One gobgpd per node holds one global ASN and one RIB that every peer is offered, so a
/// node runs one router: a spec with several is refused as a whole (advertising one
/// router's prefixes to another's peers would be wrong, silently).
pub fn desired(
    spec: &BGPNodeConfigSpec,
    secrets_namespace: &str,
    password: impl Fn(&str) -> Result<Password, PasswordMissing>,
) -> Result<Option<DesiredBgp>, Invalid> {
    let router = match spec.routers.as_slice() {
        [] => return Ok(None),
        [router] => router,
        routers => {
            let asns: Vec<String> = routers.iter().map(|r| r.local_asn.to_string()).collect();
            return Err(Invalid::new(
                "MultipleRouters",
                format!(
                    "the node runs one BGP speaker, but its BGPNodeConfig asks for routers with \
                     local ASNs {}: select the node with one virtual router per BGPPeeringPolicy",
                    asns.join(", ")
                ),
            ));
        }
    };
    let asn = asn(router.local_asn, "localASN")?;
    let router_id: Ipv4Addr = router.router_id.parse().map_err(|_| {
        Invalid::new(
            "InvalidSpec",
            format!("routerID {:?} is not an IPv4 address", router.router_id),
        )
    })?;
    let mut peers = BTreeMap::new();
    let mut held_back = BTreeMap::new();
    for neighbor in &router.neighbors {
        let mut peer = peer(neighbor)?;
        if peers.contains_key(&peer.address) || held_back.contains_key(&peer.address) {
            return Err(Invalid::new(
                "InvalidSpec",
                format!("peer {} is listed twice", neighbor.peer_address),
            ));
        }
        if let Some(secret) = &neighbor.auth_secret_ref {
            match password(secret) {
                Ok(p) => peer.password = Some(p),
                Err(missing) => {
                    let why = match missing {
                        PasswordMissing::Secret => "does not exist",
                        PasswordMissing::Key => "has no key \"password\"",
                        PasswordMissing::Unusable => {
                            "holds an empty, non-UTF-8 or longer than 80 bytes \"password\""
                        }
                        PasswordMissing::NotListed => {
                            "cannot be read: the agent has not listed that namespace's Secrets \
                             (its Role there, deploy/kustomize/base/bgp-secrets.yaml, missing?)"
                        }
                    };
                    let problem = format!(
                        "peer {}: its password Secret {secrets_namespace}/{secret} {why}",
                        peer.address
                    );
                    held_back.insert(
                        peer.address,
                        HeldBack {
                            peer_asn: peer.peer_asn,
                            problem,
                        },
                    );
                    continue;
                }
            }
        }
        peers.insert(peer.address, peer);
    }
    let mut paths = BTreeMap::new();
    for advertisement in &router.advertisements {
        let prefix: IpNet = advertisement.prefix.parse().map_err(|_| {
            Invalid::new(
                "InvalidSpec",
                format!("advertisement {:?} is not a CIDR", advertisement.prefix),
            )
        })?;
        // The network address: 10.0.0.1/24 is advertised as 10.0.0.0/24, as BGP carries it.
        let prefix = prefix.trunc();
        let mut communities = advertisement
            .communities
            .iter()
            .map(|c| standard_community(c))
            .collect::<Result<Vec<u32>, Invalid>>()?;
        communities.sort_unstable();
        communities.dedup();
        let mut large_communities = advertisement
            .large_communities
            .iter()
            .map(|c| large_community(c))
            .collect::<Result<Vec<_>, Invalid>>()?;
        large_communities.sort_unstable();
        large_communities.dedup();
        paths.insert(
            prefix,
            PathSpec {
                prefix,
                communities,
                large_communities,
            },
        );
    }
    Ok(Some(DesiredBgp {
        revision: spec.revision,
        speaker: Speaker { asn, router_id },
        peers,
        paths,
        held_back,
    }))
}

/// `65000:100` → `65000 << 16 | 100` (RFC 1997's encoding, as GoBGP carries it).
pub fn standard_community(value: &str) -> Result<u32, Invalid> {
    let parts: Option<Vec<u16>> = value.split(':').map(|p| p.parse().ok()).collect();
    match parts.as_deref() {
        Some(&[asn, local]) => Ok(u32::from(asn) << 16 | u32::from(local)),
        _ => Err(Invalid::new(
            "InvalidSpec",
            format!("community {value:?} is not ASN:value (both 0-65535)"),
        )),
    }
}

/// `65000:1:2` → (65000, 1, 2).
pub fn large_community(value: &str) -> Result<(u32, u32, u32), Invalid> {
    let parts: Option<Vec<u32>> = value.split(':').map(|p| p.parse().ok()).collect();
    match parts.as_deref() {
        Some(&[global, local1, local2]) => Ok((global, local1, local2)),
        _ => Err(Invalid::new(
            "InvalidSpec",
            format!("large community {value:?} is not ASN:value:value (each 0-4294967295)"),
        )),
    }
}

fn asn(value: i64, field: &str) -> Result<u32, Invalid> {
    u32::try_from(value)
        .ok()
        .filter(|a| *a > 0)
        .ok_or_else(|| Invalid::new("InvalidSpec", format!("{field} {value} is not an ASN")))
}

/// `192.0.2.1` or `192.0.2.1/32` (as Cilium writes it).
pub fn peer_address(value: &str) -> Option<IpAddr> {
    let host = value.split_once('/').map_or(value, |(ip, len)| {
        let full = if ip.contains(':') { "128" } else { "32" };
        if len == full { ip } else { "" }
    });
    host.parse().ok()
}

/// The peer without its password (`desired` reads it).
fn peer(neighbor: &BGPNeighbor) -> Result<PeerSpec, Invalid> {
    let address = peer_address(&neighbor.peer_address).ok_or_else(|| {
        Invalid::new(
            "InvalidSpec",
            format!(
                "peerAddress {:?} is not an IP address",
                neighbor.peer_address
            ),
        )
    })?;
    let seconds = |v: i32| u64::try_from(v).unwrap_or(0);
    Ok(PeerSpec {
        address,
        peer_asn: asn(neighbor.peer_asn, "peerASN")?,
        port: u16::try_from(neighbor.peer_port).unwrap_or(179),
        multihop_ttl: u8::try_from(neighbor.ebgp_multihop_ttl.clamp(1, 255)).unwrap_or(1),
        connect_retry_seconds: seconds(neighbor.connect_retry_time_seconds),
        hold_time_seconds: seconds(neighbor.hold_time_seconds),
        keepalive_seconds: seconds(neighbor.keep_alive_time_seconds),
        graceful_restart_seconds: neighbor
            .graceful_restart
            .as_ref()
            .filter(|gr| gr.enabled)
            .map(|gr| u32::try_from(gr.restart_time_seconds).unwrap_or(120)),
        password: None,
    })
}

/// What to change in gobgpd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sessions to open.
    pub add_peers: Vec<PeerSpec>,
    /// Sessions whose settings changed: deleted and added again (the session resets).
    pub replace_peers: Vec<PeerSpec>,
    pub delete_peers: Vec<IpAddr>,
    /// Paths to originate, new or with changed attributes (an AddPath replaces the path of
    /// the same prefix).
    pub add_paths: Vec<PathSpec>,
    pub delete_paths: Vec<PathSpec>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// The difference between `desired` and what gobgpd holds: `held_peers` (ListPeer), of
/// which `applied` are the settings this agent gave it (a peer the daemon holds without a
/// record was not set by this process: it is replaced), and `held_paths` (ListPath, the
/// paths it originates). Held-back peers are neither opened nor closed.
pub fn plan(
    desired: &DesiredBgp,
    held_peers: &BTreeSet<IpAddr>,
    applied: &BTreeMap<IpAddr, PeerSpec>,
    held_paths: &BTreeMap<IpNet, PathSpec>,
) -> Plan {
    let mut plan = Plan::default();
    for (address, peer) in &desired.peers {
        if !held_peers.contains(address) {
            plan.add_peers.push(peer.clone());
        } else if applied.get(address) != Some(peer) {
            plan.replace_peers.push(peer.clone());
        }
    }
    plan.delete_peers = held_peers
        .iter()
        .filter(|a| !desired.peers.contains_key(a) && !desired.held_back.contains_key(a))
        .copied()
        .collect();
    for (prefix, path) in &desired.paths {
        if held_paths.get(prefix) != Some(path) {
            plan.add_paths.push(path.clone());
        }
    }
    plan.delete_paths = held_paths
        .iter()
        .filter(|(prefix, _)| !desired.paths.contains_key(prefix))
        .map(|(_, path)| path.clone())
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_crds::v1alpha1::{Advertisement, AdvertisementSource, GracefulRestart, NodeRouter};

    fn neighbor(address: &str, asn: i64) -> BGPNeighbor {
        BGPNeighbor {
            peer_address: address.into(),
            peer_asn: asn,
            peer_port: 179,
            ebgp_multihop_ttl: 1,
            connect_retry_time_seconds: 5,
            hold_time_seconds: 9,
            keep_alive_time_seconds: 3,
            graceful_restart: Some(GracefulRestart {
                enabled: true,
                restart_time_seconds: 30,
            }),
            auth_secret_ref: None,
        }
    }

    fn spec(routers: Vec<NodeRouter>) -> BGPNodeConfigSpec {
        BGPNodeConfigSpec {
            node_name: "n1".into(),
            revision: 7,
            routers,
        }
    }

    fn router(asn: i64, neighbors: Vec<BGPNeighbor>, prefixes: &[&str]) -> NodeRouter {
        NodeRouter {
            local_asn: asn,
            router_id: "10.250.0.10".into(),
            neighbors,
            advertisements: prefixes
                .iter()
                .map(|p| Advertisement {
                    prefix: p.to_string(),
                    source: AdvertisementSource::LoadBalancerIP,
                    ..Advertisement::default()
                })
                .collect(),
        }
    }

    /// `desired` for specs that name no Secret.
    fn without_secrets(spec: &BGPNodeConfigSpec) -> Result<Option<DesiredBgp>, Invalid> {
        desired(spec, "tendril-bgp-secrets", |name| {
            panic!("no Secret is read here, but {name} was")
        })
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_spec_without_routers_runs_no_speaker() {
        assert_eq!(without_secrets(&spec(vec![])), Ok(None));
    }

    #[test]
    fn one_router_becomes_the_speaker_its_peers_and_paths() {
        let d = without_secrets(&spec(vec![router(
            64512,
            vec![neighbor("10.250.0.1/32", 65000)],
            &["10.200.1.0/24", "198.51.100.7/32", "10.200.1.9/24"],
        )]))
        .unwrap()
        .unwrap();
        assert_eq!(d.revision, 7);
        assert_eq!(
            d.speaker,
            Speaker {
                asn: 64512,
                router_id: "10.250.0.10".parse().unwrap()
            }
        );
        let peer = &d.peers[&"10.250.0.1".parse::<IpAddr>().unwrap()];
        assert_eq!(peer.peer_asn, 65000);
        assert_eq!(peer.graceful_restart_seconds, Some(30));
        assert_eq!((peer.hold_time_seconds, peer.keepalive_seconds), (9, 3));
        // Host bits are dropped: two spellings of one prefix are one path.
        let prefixes: Vec<IpNet> = d.paths.keys().copied().collect();
        assert_eq!(prefixes, [net("10.200.1.0/24"), net("198.51.100.7/32")]);
    }

    #[test]
    fn communities_are_encoded_as_gobgp_carries_them() {
        let mut r = router(64512, vec![], &["198.51.100.7/32"]);
        r.advertisements[0].communities = vec!["65000:100".into(), "1:2".into()];
        r.advertisements[0].large_communities = vec!["4200000000:1:2".into()];
        let d = without_secrets(&spec(vec![r])).unwrap().unwrap();
        let path = &d.paths[&net("198.51.100.7/32")];
        assert_eq!(path.communities, [0x0001_0002, 65000 << 16 | 100]);
        assert_eq!(path.large_communities, [(4_200_000_000, 1, 2)]);
        assert_eq!(
            standard_community("65536:1").unwrap_err().reason,
            "InvalidSpec"
        );
        assert!(large_community("1:2").is_err());
    }

    #[test]
    fn a_password_is_read_from_its_secret_and_never_printed() {
        let mut n = neighbor("10.250.0.1", 65000);
        n.auth_secret_ref = Some("tor-1".into());
        let d = desired(
            &spec(vec![router(64512, vec![n], &[])]),
            "tendril-bgp-secrets",
            |name| {
                assert_eq!(name, "tor-1");
                Ok(Password::new("s3cret"))
            },
        )
        .unwrap()
        .unwrap();
        let peer = &d.peers[&"10.250.0.1".parse::<IpAddr>().unwrap()];
        assert_eq!(peer.password.as_ref().map(Password::reveal), Some("s3cret"));
        assert!(d.held_back.is_empty());
        let printed = format!("{peer:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
    }

    #[test]
    fn a_peer_whose_password_cannot_be_read_is_held_back_alone() {
        let mut missing = neighbor("10.250.0.1", 65000);
        missing.auth_secret_ref = Some("gone".into());
        let mut keyless = neighbor("10.250.0.2", 65000);
        keyless.auth_secret_ref = Some("no-key".into());
        let plain = neighbor("10.250.0.3", 65000);
        let d = desired(
            &spec(vec![router(64512, vec![missing, keyless, plain], &[])]),
            "tendril-bgp-secrets",
            |name| match name {
                "gone" => Err(PasswordMissing::Secret),
                _ => Err(PasswordMissing::Key),
            },
        )
        .unwrap()
        .unwrap();
        let a1: IpAddr = "10.250.0.1".parse().unwrap();
        let a2: IpAddr = "10.250.0.2".parse().unwrap();
        let a3: IpAddr = "10.250.0.3".parse().unwrap();
        // The peer without a password is opened; the other two are named with their Secret.
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), [a3]);
        assert_eq!(
            d.held_back[&a1].problem,
            "peer 10.250.0.1: its password Secret tendril-bgp-secrets/gone does not exist"
        );
        assert!(
            d.held_back[&a2]
                .problem
                .contains("tendril-bgp-secrets/no-key has no key \"password\""),
            "{}",
            d.held_back[&a2].problem
        );
        // A held-back session gobgpd already holds is neither replaced nor closed.
        let p = plan(
            &d,
            &[a1, a3].into(),
            &BTreeMap::from([(a3, d.peers[&a3].clone())]),
            &BTreeMap::new(),
        );
        assert!(p.is_empty(), "{p:?}");
        // A neighbor listed twice is refused even when one of them is held back.
        let mut twice = neighbor("10.250.0.1", 65000);
        twice.auth_secret_ref = Some("gone".into());
        let err = desired(
            &spec(vec![router(
                64512,
                vec![twice, neighbor("10.250.0.1", 65000)],
                &[],
            )]),
            "tendril-bgp-secrets",
            |_| Err(PasswordMissing::Secret),
        )
        .unwrap_err();
        assert_eq!(err.reason, "InvalidSpec");
    }

    #[test]
    fn a_changed_password_replaces_the_session() {
        let mut n = neighbor("10.250.0.1", 65000);
        n.auth_secret_ref = Some("tor-1".into());
        let with = |password: &'static str| {
            desired(
                &spec(vec![router(64512, vec![n.clone()], &[])]),
                "tendril-bgp-secrets",
                move |_| Ok(Password::new(password)),
            )
            .unwrap()
            .unwrap()
        };
        let (old, new) = (with("old"), with("new"));
        let a1: IpAddr = "10.250.0.1".parse().unwrap();
        let p = plan(&new, &[a1].into(), &old.peers, &BTreeMap::new());
        assert_eq!(p.replace_peers, [new.peers[&a1].clone()]);
        assert!(plan(&new, &[a1].into(), &new.peers, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn several_routers_are_refused_with_their_asns() {
        let err = without_secrets(&spec(vec![
            router(64512, vec![], &[]),
            router(64513, vec![], &[]),
        ]))
        .unwrap_err();
        assert_eq!(err.reason, "MultipleRouters");
        assert!(err.message.contains("64512, 64513"), "{}", err.message);
    }

    #[test]
    fn bad_addresses_are_named() {
        let err = without_secrets(&spec(vec![router(
            64512,
            vec![neighbor("10.250.0.1/24", 65000)],
            &[],
        )]))
        .unwrap_err();
        assert_eq!(err.reason, "InvalidSpec");
        assert!(err.message.contains("10.250.0.1/24"), "{}", err.message);
        assert_eq!(peer_address("2001:db8::1/128"), "2001:db8::1".parse().ok());
        assert_eq!(peer_address("2001:db8::1/64"), None);
    }

    #[test]
    fn the_plan_is_the_difference() {
        let d = without_secrets(&spec(vec![router(
            64512,
            vec![neighbor("10.250.0.1", 65000), neighbor("10.250.0.2", 65000)],
            &["10.200.1.0/24", "198.51.100.7/32"],
        )]))
        .unwrap()
        .unwrap();
        let a1: IpAddr = "10.250.0.1".parse().unwrap();
        let a2: IpAddr = "10.250.0.2".parse().unwrap();
        let stale: IpAddr = "10.250.0.3".parse().unwrap();

        // A fresh daemon: everything is added.
        let fresh = plan(&d, &BTreeSet::new(), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(fresh.add_peers.len(), 2);
        assert_eq!(fresh.add_paths.len(), 2);
        assert!(fresh.delete_peers.is_empty() && fresh.delete_paths.is_empty());

        // Converged: nothing to do.
        let held: BTreeSet<IpAddr> = [a1, a2].into();
        let applied = d.peers.clone();
        assert!(plan(&d, &held, &applied, &d.paths).is_empty());

        // A changed timer replaces that session only; a peer held without a record of
        // ours is replaced; a stale peer and a stale path go.
        let mut changed = applied.clone();
        changed.get_mut(&a1).unwrap().hold_time_seconds = 90;
        changed.remove(&a2);
        let held: BTreeSet<IpAddr> = [a1, a2, stale].into();
        let mut held_paths = d.paths.clone();
        let gone = PathSpec {
            prefix: net("198.51.100.9/32"),
            ..PathSpec::default()
        };
        held_paths.insert(gone.prefix, gone.clone());
        held_paths.remove(&net("10.200.1.0/24"));
        let p = plan(&d, &held, &changed, &held_paths);
        let replaced: Vec<IpAddr> = p.replace_peers.iter().map(|p| p.address).collect();
        assert_eq!(replaced, [a1, a2]);
        assert!(p.add_peers.is_empty());
        assert_eq!(p.delete_peers, [stale]);
        assert_eq!(p.delete_paths, [gone]);
        let added: Vec<IpNet> = p.add_paths.iter().map(|p| p.prefix).collect();
        assert_eq!(added, [net("10.200.1.0/24")]);

        // Changed communities re-add the path.
        let mut tagged = d.paths.clone();
        tagged.get_mut(&net("198.51.100.7/32")).unwrap().communities = vec![0xfde8_0001];
        let p = plan(&d, &[a1, a2].into(), &applied, &tagged);
        assert_eq!(p.add_paths.len(), 1);
    }
}
