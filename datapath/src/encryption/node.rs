//! The node's encryption loop: converges the devices, their peers and the steering rules
//! to `NodeNetwork.spec.encryption`, and publishes `status.encryption` (field manager
//! [`FIELD_MANAGER`]). Runs on every change of the node's `NodeNetwork` and every
//! `resyncSeconds` (which also restarts a device that stopped).
//!
//! Key rotation without a lost packet. Changing a WireGuard device's private key drops all
//! its sessions, and a handshake from a static key the responder does not know is ignored,
//! so the generations alternate between two devices (`device_of`, [`port_of`]):
//! - prepare (`spec.nextKeyEpoch` set): the next pair is made and the standby device gets
//!   it with every peer's next key (`peers[].nextPublicKey`) and endpoint port; once every
//!   peer is there, `status.preparedKeyEpoch` says so. Traffic still uses the other device.
//! - switch (`spec.keyEpoch` raised by the operator when every node is prepared): the
//!   prepared device is the one in use, its configuration unchanged; the routes are
//!   replaced in place to point at it. Its first packet to a peer starts a handshake the
//!   peer's prepared device accepts; peers still on the old generation keep reaching this
//!   node's old device, which keeps its peers for `rotationGraceSeconds`, after which its
//!   peers are removed and its key overwritten.

use super::backend::Backend;
use super::probe::Capabilities;
use super::routes::{self, SteeringPlan};
use super::uapi::{DeviceState, Peer};
use super::{EncryptionAgentConfig, WireGuardImplementation, ipsec, keys, xfrm};
use crate::agent::view::{Wake, wake_on};
use crate::config::RoutingMode;
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tendril_crds::v1alpha1::{NodeEncryption, NodeEncryptionStatus, NodeNetwork};
use tendril_runtime::caches::Cache;
use tendril_runtime::{Metrics, apply_body, apply_status};
use tokio_util::sync::CancellationToken;

pub const FIELD_MANAGER: &str = "tendril-agent-encryption";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImplementationLabel {
    implementation: String,
}

/// The agent's encryption metrics.
#[derive(Clone)]
pub struct EncryptionMetrics {
    implementation: Family<ImplementationLabel, Gauge>,
    peers: Gauge,
    held_peers: Gauge,
    rotations: Counter,
    handshakes: Gauge,
}

impl EncryptionMetrics {
    pub fn register(m: &Metrics) -> Self {
        Self {
            implementation: m.domain(
                "tendril_encryption_wireguard_implementation",
                "The WireGuard implementation in use (1 for kernel or userspace)",
                Family::<ImplementationLabel, Gauge>::default,
            ),
            peers: m.domain(
                "tendril_encryption_peers",
                "WireGuard peers configured with a key",
                Gauge::default,
            ),
            held_peers: m.domain(
                "tendril_encryption_held_peers",
                "Selected peers whose traffic is dropped (strict mode) because it cannot be encrypted yet",
                Gauge::default,
            ),
            rotations: m.domain(
                "tendril_encryption_key_rotations",
                "Key pairs made for a new key generation",
                Counter::default,
            ),
            handshakes: m.domain(
                "tendril_encryption_peers_with_handshake",
                "WireGuard peers with a completed handshake",
                Gauge::default,
            ),
        }
    }
}

/// What the loop needs of the agent.
pub struct EncryptionNode {
    pub client: kube::Client,
    pub node_name: String,
    pub node_netns: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub routing_mode: RoutingMode,
    pub tunnel_port: u16,
    pub config: EncryptionAgentConfig,
    /// The MTU new pods get is capped while WireGuard is on (see [`pod_mtu`]).
    pub pod_mtu_cap: Arc<AtomicU32>,
    pub metrics: EncryptionMetrics,
}

/// Bytes the overlay adds (outer IPv4 20, UDP 8, VXLAN 8, inner Ethernet 14).
const VXLAN_OVERHEAD: u32 = 50;

/// The largest pod MTU whose packets cross the WireGuard device of MTU `device_mtu`
/// unfragmented: in the overlay a whole VXLAN packet goes through the device.
pub fn pod_mtu(device_mtu: u32, overlay: bool) -> u32 {
    if overlay {
        device_mtu - VXLAN_OVERHEAD
    } else {
        device_mtu
    }
}

/// The implementation to use, or why none can be: `auto` is the kernel's where it has
/// WireGuard, else the userspace device.
pub fn choose(wanted: WireGuardImplementation, caps: &Capabilities) -> Result<Backend, String> {
    match (wanted, &caps.kernel_wireguard) {
        (WireGuardImplementation::Userspace, _) | (WireGuardImplementation::Auto, Err(_)) => {
            Ok(Backend::Userspace)
        }
        (WireGuardImplementation::Auto | WireGuardImplementation::Kernel, Ok(())) => {
            Ok(Backend::Kernel)
        }
        (WireGuardImplementation::Kernel, Err(e)) => Err(format!(
            "kernel WireGuard asked for, but the kernel has none ({e})"
        )),
    }
}

/// One selected peer as this node uses it.
struct PeerPlan {
    key: Option<[u8; 32]>,
    next_key: Option<[u8; 32]>,
    allowed_ips: Vec<String>,
    cidrs: Vec<IpNet>,
    address: Option<Ipv4Addr>,
}

fn peer_plans(spec: &NodeEncryption) -> Vec<PeerPlan> {
    spec.peers
        .iter()
        .map(|p| {
            let address: Option<IpAddr> = p.address.parse().ok();
            let mut allowed: Vec<IpNet> = p
                .allowed_ips
                .iter()
                .filter_map(|c| c.parse::<IpNet>().ok())
                .map(|n| n.trunc())
                .collect();
            allowed.sort();
            PeerPlan {
                key: p.public_key.as_deref().and_then(keys::unbase64),
                next_key: p.next_public_key.as_deref().and_then(keys::unbase64),
                allowed_ips: allowed.iter().map(|n| n.to_string()).collect(),
                cidrs: allowed
                    .iter()
                    .filter(|n| Some(n.addr()) != address || n.prefix_len() < n.max_prefix_len())
                    .copied()
                    .collect(),
                address: match address {
                    Some(IpAddr::V4(a)) => Some(a),
                    _ => None,
                },
            }
        })
        .collect()
}

/// The device in use and the standby one (the other generation's).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Devices {
    active: String,
    standby: String,
}

/// When the generation in use last changed in this process: the old device keeps
/// answering for `rotationGraceSeconds` after it (peers that switch later still send to
/// it).
#[derive(Default)]
struct SwitchClock {
    epoch: i64,
    at: Option<Instant>,
}

impl SwitchClock {
    fn observe(&mut self, epoch: i64) {
        if self.epoch != 0 && self.epoch != epoch {
            self.at = Some(Instant::now());
        }
        self.epoch = epoch;
    }

    fn within(&self, grace: Duration) -> bool {
        self.at.is_some_and(|at| at.elapsed() < grace)
    }
}

/// The port of key generation `epoch`'s device: `listen_port` for odd generations, the
/// next port for even ones (the two devices of a rotation listen side by side).
pub fn port_of(listen_port: u16, epoch: i64) -> u16 {
    match (epoch % 2 == 0, listen_port) {
        (false, p) => p,
        (true, 65535) => 65534,
        (true, p) => p + 1,
    }
}

/// A device's configuration for `pair` with the peers' keys of its generation; which
/// peers have one.
fn device_state<'a>(
    pair: &keys::KeyPair,
    port: u16,
    peers: impl Iterator<Item = (&'a PeerPlan, Option<[u8; 32]>)>,
    keepalive: u16,
) -> (DeviceState, Vec<bool>) {
    let mut want = DeviceState {
        private_key: Some(pair.private()),
        listen_port: port,
        ..Default::default()
    };
    let own = pair.public();
    let keyed = peers
        .map(|(p, key)| match key {
            Some(key) if key != own => {
                want.peers.insert(
                    key,
                    Peer {
                        endpoint: p.address.map(|a| SocketAddr::from((a, port)).to_string()),
                        allowed_ips: p.allowed_ips.clone(),
                        keepalive,
                        last_handshake: 0,
                    },
                );
                true
            }
            _ => false,
        })
        .collect();
    (want, keyed)
}

/// What IPsec encrypts between this node and each peer: native routing, the pod CIDRs
/// pairwise; the overlay, the tunnel's UDP packets between the node addresses.
fn ipsec_links(
    local: Ipv4Addr,
    local_pods: &[Ipv4Net],
    peers: &[PeerPlan],
    overlay_port: Option<u16>,
) -> Vec<xfrm::PeerLink> {
    let mut links = Vec::new();
    for (peer, plan) in peers.iter().filter_map(|p| Some((p.address?, p))) {
        match overlay_port {
            Some(port) => links.push(xfrm::PeerLink {
                local,
                local_pods: Ipv4Net::from(local),
                peer,
                peer_pods: Ipv4Net::from(peer),
                udp_dport: Some(port),
            }),
            None => {
                for (mine, theirs) in local_pods.iter().flat_map(|m| {
                    plan.cidrs.iter().filter_map(move |t| match t {
                        IpNet::V4(t) => Some((*m, *t)),
                        IpNet::V6(_) => None,
                    })
                }) {
                    links.push(xfrm::PeerLink {
                        local,
                        local_pods: mine,
                        peer,
                        peer_pods: theirs,
                        udp_dport: None,
                    });
                }
            }
        }
    }
    links
}

fn node_ipv4(nn: &NodeNetwork) -> Option<Ipv4Addr> {
    nn.spec
        .addresses
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

impl EncryptionNode {
    /// Probes, then converges until `shutdown`.
    pub async fn run(self, networks: Cache<NodeNetwork>, shutdown: CancellationToken) {
        let caps = tokio::task::spawn_blocking(super::probe::probe)
            .await
            .unwrap_or_else(|_| Capabilities {
                kernel_wireguard: Err("probe failed".into()),
                esp: Err("probe failed".into()),
            });
        let implementation = choose(self.config.wireguard_implementation, &caps);
        tracing::info!(
            kernel_wireguard = ?caps.kernel_wireguard,
            esp = ?caps.esp,
            implementation = ?implementation,
            "encryption capabilities probed"
        );
        if let Ok(i) = &implementation {
            self.metrics
                .implementation
                .get_or_create(&ImplementationLabel {
                    implementation: i.name().to_string(),
                })
                .set(1);
        }
        let wake = Wake::default();
        let name = self.node_name.clone();
        wake_on(&networks, &wake, move |nn: &NodeNetwork| {
            kube::ResourceExt::name_any(nn) == name
        });
        let store = networks.store();
        tendril_runtime::store_ready(&store).await;
        let mut last: Option<NodeEncryptionStatus> = None;
        let mut switch = SwitchClock::default();
        // What this process installed in the kernel's XFRM tables.
        let mut ipsec_tables = ipsec::Tables::default();
        let resync = Duration::from_secs(self.config.resync_seconds.max(1));
        loop {
            let nn = store.get(&ObjectRef::new(&self.node_name));
            let status = match &nn {
                Some(nn) => {
                    self.converge(nn, &caps, &implementation, &mut switch, &mut ipsec_tables)
                        .await
                }
                None => None,
            };
            if let (Some(nn), Some(status)) = (&nn, status)
                && last.as_ref() != Some(&status)
            {
                match self.publish(nn, &status).await {
                    Ok(()) => last = Some(status),
                    Err(e) => tracing::warn!(error = %e, "publishing the encryption status"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = super::device::exited().notified() => {}
                _ = tokio::time::sleep(resync) => {}
            }
        }
    }

    async fn publish(
        &self,
        nn: &NodeNetwork,
        status: &NodeEncryptionStatus,
    ) -> Result<(), kube::Error> {
        let api = Api::<NodeNetwork>::all(self.client.clone());
        let mut body = apply_body::<NodeNetwork>(
            &kube::ResourceExt::name_any(nn),
            None,
            json!({"status": {"encryption": status}}),
        );
        body["metadata"]["uid"] = json!(kube::ResourceExt::uid(nn));
        apply_status(&api, FIELD_MANAGER, &body).await.map(|_| ())
    }

    /// Converges the node to its spec; the status to publish.
    async fn converge(
        &self,
        nn: &NodeNetwork,
        caps: &Capabilities,
        implementation: &Result<Backend, String>,
        switch: &mut SwitchClock,
        ipsec_tables: &mut ipsec::Tables,
    ) -> Option<NodeEncryptionStatus> {
        let mut status = NodeEncryptionStatus {
            wireguard_implementation: implementation.as_ref().ok().map(|i| i.name().to_string()),
            ipsec_supported: Some(caps.esp.is_ok()),
            ipsec_unsupported_reason: caps.esp.clone().err(),
            ..Default::default()
        };
        let spec = nn.spec.encryption.clone();
        let peers = spec.as_ref().map(peer_plans).unwrap_or_default();
        let wireguard = spec.as_ref().filter(|s| s.mode == "WireGuard");
        // Peers whose traffic goes through the device; strict mode blackholes the rest.
        let mut keyed: Vec<bool> = vec![false; peers.len()];
        let mut problem: Option<String> = None;
        let mut devices = Devices {
            active: self.config.device_of(1),
            standby: self.config.device_of(2),
        };
        let backend = implementation
            .as_ref()
            .copied()
            .unwrap_or(Backend::Userspace);
        let netns = self.node_netns.as_deref();
        match (wireguard, implementation) {
            (Some(spec), Ok(backend)) => {
                match self
                    .converge_device(*backend, spec, &peers, &mut status, switch)
                    .await
                {
                    Ok((k, d)) => (keyed, devices) = (k, d),
                    Err(e) => problem = Some(e),
                }
            }
            (Some(_), Err(e)) => problem = Some(e.clone()),
            (None, _) => {
                if let Some(s) = &spec {
                    match &caps.esp {
                        Err(e) => problem = Some(format!("IPsec unsupported on this node: {e}")),
                        Ok(()) => {
                            match self
                                .converge_ipsec(s, nn, &peers, &mut status, switch, ipsec_tables)
                                .await
                            {
                                Ok(()) => {
                                    keyed = peers.iter().map(|p| p.address.is_some()).collect()
                                }
                                Err(e) => problem = Some(format!("IPsec: {e}")),
                            }
                        }
                    }
                } else {
                    // Deselected: no peer keeps a session.
                    for d in [&devices.active, &devices.standby] {
                        if backend.running(netns, d) {
                            let _ = self.configure(backend, d, &DeviceState::default(), true);
                        }
                    }
                }
            }
        }
        // IPsec needs no steering: its policies select the traffic (and hold it back while
        // an SA is missing).
        let steering: Vec<_> = peers
            .iter()
            .zip(&keyed)
            .filter(|_| wireguard.is_some())
            .map(|(p, k)| (p.cidrs.clone(), p.address, *k))
            .collect();
        let (rules, routes) = routes::plan_routes(
            self.config.pod_route_table,
            self.config.tunnel_route_table,
            self.config.rule_priority,
            (self.routing_mode == RoutingMode::Overlay).then_some(self.tunnel_port),
            self.config.strict_mode && wireguard.is_some(),
            &steering,
        );
        let plan = SteeringPlan {
            standby: backend
                .running(netns, &devices.standby)
                .then(|| devices.standby.clone()),
            interface: devices.active,
            mtu: self.config.mtu,
            node_ip: node_ipv4(nn),
            tables: [self.config.pod_route_table, self.config.tunnel_route_table],
            rules,
            routes,
        };
        let netns = self.node_netns.clone();
        match tokio::task::spawn_blocking(move || routes::converge(netns, plan)).await {
            Ok(Ok(o)) => {
                if o.changed > 0 {
                    tracing::info!(changes = o.changed, "encryption routes converged");
                }
                // New pods get an MTU whose packets need no fragmentation on the way
                // through the device (pods made before keep theirs).
                let cap = match (wireguard.is_some() && o.mtu > 0, self.routing_mode) {
                    (true, mode) => pod_mtu(o.mtu, mode == RoutingMode::Overlay),
                    (false, _) => 0,
                };
                if self.pod_mtu_cap.swap(cap, Ordering::Relaxed) != cap {
                    tracing::info!(device_mtu = o.mtu, pod_mtu_cap = cap, "pod MTU cap set");
                }
                if o.mtu > 0 {
                    status.mtu = Some(o.mtu as i32);
                    status.pod_mtu = Some(cap as i32);
                }
                if let Some(p) = o.rp_filter_problem {
                    problem = problem.or(Some(p));
                }
            }
            Ok(Err(e)) => problem = problem.or(Some(format!("routes: {e}"))),
            Err(e) => problem = problem.or(Some(format!("routes: {e}"))),
        }
        let held = if self.config.strict_mode && wireguard.is_some() {
            keyed.iter().filter(|k| !**k).count()
        } else {
            0
        };
        self.metrics.held_peers.set(held as i64);
        self.metrics
            .peers
            .set(keyed.iter().filter(|k| **k).count() as i64);
        if problem.is_none() && held > 0 {
            problem = Some(format!(
                "{held} peers have no public key yet (their traffic is held back)"
            ));
        }
        status.peers = spec
            .as_ref()
            .map(|_| keyed.iter().filter(|k| **k).count() as i32);
        status.ready = spec.is_some() && problem.is_none();
        status.message = problem;
        Some(status)
    }

    /// Starts `interface` unless it runs.
    async fn ensure_device(&self, backend: Backend, interface: &str) -> Result<(), String> {
        if backend.running(self.node_netns.as_deref(), interface) {
            return Ok(());
        }
        let (netns, threads, name) = (
            self.node_netns.clone(),
            self.config.device_threads,
            interface.to_string(),
        );
        tokio::task::spawn_blocking(move || backend.start(netns.as_deref(), &name, threads))
            .await
            .map_err(|e| e.to_string())??;
        tracing::info!(%interface, implementation = backend.name(), "WireGuard device started");
        Ok(())
    }

    /// The key pairs, both devices and their peers (see [`Devices`]). Which peers the
    /// device in use sends to.
    async fn converge_device(
        &self,
        backend: Backend,
        spec: &NodeEncryption,
        peers: &[PeerPlan],
        status: &mut NodeEncryptionStatus,
        switch: &mut SwitchClock,
    ) -> Result<(Vec<bool>, Devices), String> {
        let ring = keys::converge(
            &self.state_dir,
            spec.key_epoch.unwrap_or(1),
            spec.next_key_epoch,
        )
        .map_err(|e| format!("key files under {}: {e}", self.state_dir.display()))?;
        if ring.made > 0 {
            self.metrics.rotations.inc_by(ring.made as u64);
            tracing::info!(
                epoch = ring.active.epoch,
                next = ?ring.next.as_ref().map(|n| n.epoch),
                "new WireGuard key pair"
            );
        }
        status.public_key = Some(ring.active.public_base64());
        status.key_epoch = Some(ring.active.epoch);
        status.key_created = Some(ring.active.created.clone());
        switch.observe(ring.active.epoch);
        let listen_port = spec.listen_port.unwrap_or(51871) as u16;
        let keepalive = spec
            .persistent_keepalive_seconds
            .unwrap_or(0)
            .clamp(0, 65535) as u16;
        let devices = Devices {
            active: self.config.device_of(ring.active.epoch),
            standby: self.config.device_of(ring.active.epoch + 1),
        };
        self.ensure_device(backend, &devices.active).await?;
        let (want, keyed) = device_state(
            &ring.active,
            port_of(listen_port, ring.active.epoch),
            peers.iter().map(|p| (p, p.key)),
            keepalive,
        );
        let handshakes = self.configure(backend, &devices.active, &want, false)?;
        self.metrics.handshakes.set(handshakes as i64);
        if let Some(next) = &ring.next {
            // Prepare: the next pair on the standby device with every peer's next key, so
            // either side may start using the new generation first.
            status.next_public_key = Some(next.public_base64());
            status.next_key_epoch = Some(next.epoch);
            self.ensure_device(backend, &devices.standby).await?;
            let (want, next_keyed) = device_state(
                next,
                port_of(listen_port, next.epoch),
                peers.iter().map(|p| (p, p.next_key)),
                keepalive,
            );
            self.configure(backend, &devices.standby, &want, false)?;
            if next_keyed.iter().all(|k| *k) {
                status.prepared_key_epoch = Some(next.epoch);
            }
        } else if backend.running(self.node_netns.as_deref(), &devices.standby)
            && !switch.within(Duration::from_secs(self.config.rotation_grace_seconds))
        {
            // The old generation's device after the grace period: no peer, and its
            // private key overwritten by a throwaway one.
            let current = backend
                .get(self.node_netns.as_deref(), &devices.standby)
                .map_err(|e| format!("reading {}: {e}", devices.standby))?;
            if !current.peers.is_empty() {
                let throwaway = keys::KeyPair::generate(0).map_err(|e| e.to_string())?;
                let want = DeviceState {
                    private_key: Some(throwaway.private()),
                    listen_port: current.listen_port,
                    ..Default::default()
                };
                self.configure(backend, &devices.standby, &want, false)?;
                tracing::info!(interface = %devices.standby, "old key generation retired");
            }
        }
        Ok((keyed, devices))
    }

    /// IPsec: the SAs and policies of the spec's generations (see [`ipsec`]); what the
    /// kernel took is remembered in `tables`.
    async fn converge_ipsec(
        &self,
        spec: &NodeEncryption,
        nn: &NodeNetwork,
        peers: &[PeerPlan],
        status: &mut NodeEncryptionStatus,
        switch: &mut SwitchClock,
        tables: &mut ipsec::Tables,
    ) -> Result<(), String> {
        let local = node_ipv4(nn).ok_or("the node has no IPv4 InternalIP")?;
        let epoch = spec.key_epoch.unwrap_or(1);
        let current = self
            .generation(epoch, spec.spi, spec.key_secret.as_deref())
            .await?;
        let next = match spec.next_key_epoch {
            Some(e) => Some(
                self.generation(e, spec.next_spi, spec.next_key_secret.as_deref())
                    .await?,
            ),
            None => None,
        };
        let local_pods: Vec<Ipv4Net> = nn
            .spec
            .pod_cidrs
            .iter()
            .filter_map(|c| c.parse::<Ipv4Net>().ok())
            .collect();
        let overlay = (self.routing_mode == RoutingMode::Overlay).then_some(self.tunnel_port);
        let links = ipsec_links(local, &local_pods, peers, overlay);
        let want = ipsec::want(&links, &current, next.as_ref())?;
        switch.observe(epoch);
        let retire = !switch.within(Duration::from_secs(self.config.rotation_grace_seconds));
        let steps = ipsec::steps(&want, tables, retire);
        if !steps.is_empty() {
            let netns = self.node_netns.clone();
            let (done, result) = tokio::task::spawn_blocking(move || ipsec::apply(netns, steps))
                .await
                .map_err(|e| e.to_string())?;
            for step in &done {
                tables.apply(step);
            }
            tracing::info!(steps = done.len(), epoch, "IPsec tables converged");
            result?;
        }
        status.key_epoch = Some(epoch);
        if let Some(n) = next.as_ref().filter(|n| tables.holds_generation(&want, n)) {
            status.next_key_epoch = Some(n.epoch);
            status.prepared_key_epoch = Some(n.epoch);
        }
        Ok(())
    }

    /// Generation `epoch` with key id `spi` from the key Secret `secret`.
    async fn generation(
        &self,
        epoch: i64,
        spi: Option<u8>,
        secret: Option<&str>,
    ) -> Result<ipsec::Generation, String> {
        let (Some(spi), Some(secret)) = (spi, secret) else {
            return Err(format!(
                "the spec names no SPI and key Secret for generation {epoch}"
            ));
        };
        let namespace = &self.config.ipsec_keys_namespace;
        let found = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get(secret)
            .await
            .map_err(|e| format!("reading the key Secret {namespace}/{secret}: {e}"))?;
        let data = found
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        ipsec::Generation::from_secret(epoch, spi, &data)
            .map_err(|e| format!("key Secret {namespace}/{secret}: {e}"))
    }

    /// Sets what differs from `want` on the device; the peers with a handshake.
    fn configure(
        &self,
        backend: Backend,
        interface: &str,
        want: &DeviceState,
        keep_key: bool,
    ) -> Result<usize, String> {
        let netns = self.node_netns.as_deref();
        let current = backend
            .get(netns, interface)
            .map_err(|e| format!("reading {interface}: {e}"))?;
        let mut want = want.clone();
        if keep_key {
            want.private_key = current.private_key;
            want.listen_port = current.listen_port;
        }
        if backend
            .set(netns, interface, &current, &want)
            .map_err(|e| format!("configuring {interface}: {e}"))?
        {
            tracing::info!(%interface, peers = want.peers.len(), "WireGuard device configured");
        }
        Ok(current
            .peers
            .values()
            .filter(|p| p.last_handshake > 0)
            .count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_the_kernels_wireguard_where_there_is_one() {
        let caps = |kernel: bool| Capabilities {
            kernel_wireguard: if kernel {
                Ok(())
            } else {
                Err("no module".into())
            },
            esp: Err("no ESP".into()),
        };
        use WireGuardImplementation::*;
        assert_eq!(choose(Auto, &caps(true)), Ok(Backend::Kernel));
        assert_eq!(choose(Auto, &caps(false)), Ok(Backend::Userspace));
        assert_eq!(choose(Userspace, &caps(true)), Ok(Backend::Userspace));
        assert_eq!(choose(Kernel, &caps(true)), Ok(Backend::Kernel));
        let refused = choose(Kernel, &caps(false)).unwrap_err();
        assert!(refused.contains("no module"), "{refused}");
    }

    #[test]
    fn generations_alternate_between_two_devices_and_ports() {
        let config = EncryptionAgentConfig::default();
        assert_eq!(config.device_of(1), "tendril_wg0");
        assert_eq!(config.device_of(2), "tendril_wg0b");
        assert_eq!(config.device_of(3), "tendril_wg0");
        assert_eq!(port_of(51871, 1), 51871);
        assert_eq!(port_of(51871, 2), 51872);
        assert_eq!(port_of(51871, 5), 51871);
        assert_eq!(port_of(65535, 2), 65534, "no port 0");
    }

    #[test]
    fn a_pod_packet_fits_the_device_with_its_encapsulation() {
        // 1500-byte uplink → device 1420; overlay adds VXLAN's 50.
        assert_eq!(pod_mtu(1420, true), 1370);
        assert_eq!(pod_mtu(1420, false), 1420);
    }

    #[test]
    fn a_device_is_configured_with_the_peers_keys_of_its_generation() {
        let pair = keys::KeyPair::generate(2).unwrap();
        let plan = |key: Option<[u8; 32]>| PeerPlan {
            key: Some([1; 32]),
            next_key: key,
            allowed_ips: vec!["10.200.2.0/24".into()],
            cidrs: Vec::new(),
            address: Some(Ipv4Addr::new(10, 0, 0, 2)),
        };
        let peers = [plan(Some([2; 32])), plan(None), plan(Some(pair.public()))];
        let (want, keyed) = device_state(&pair, 51872, peers.iter().map(|p| (p, p.next_key)), 0);
        assert_eq!(
            keyed,
            [true, false, false],
            "no key, or our own: not a peer"
        );
        assert_eq!(want.listen_port, 51872);
        assert_eq!(want.private_key, Some(pair.private()));
        let peer = &want.peers[&[2; 32]];
        assert_eq!(
            peer.endpoint.as_deref(),
            Some("10.0.0.2:51872"),
            "the peer's device of the same generation"
        );
    }

    #[test]
    fn the_old_device_is_kept_for_the_grace_period_after_a_switch() {
        let mut clock = SwitchClock::default();
        clock.observe(1);
        assert!(
            !clock.within(Duration::from_secs(30)),
            "a start is no switch"
        );
        clock.observe(2);
        assert!(clock.within(Duration::from_secs(30)));
        assert!(!clock.within(Duration::ZERO));
    }
}
