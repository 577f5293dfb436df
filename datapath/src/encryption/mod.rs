//! Transparent encryption on the node (`encryption` in agent.yaml): the agent side of the
//! operator's encryption concern.
//!
//! - At start, [`probe`] finds what the kernel can do (a `wireguard` link and an ESP
//!   security association, each tried in a scratch network namespace), and the WireGuard
//!   implementation is chosen ([`backend`]): `auto` means the kernel's where it has one
//!   ([`wg_kernel`], generic netlink), else the userspace device ([`device`], its own process,
//!   boringtun). The choice and the IPsec capability are published in
//!   `NodeNetwork.status.encryption` and `tendril_encryption_wireguard_implementation`.
//! - When the node's `NodeNetwork.spec.encryption` selects WireGuard, [`node`] keeps the
//!   key pair of the asked generation ([`keys`]: made here, 0600 under the state directory,
//!   only the public key published), configures the device through the standard
//!   configuration protocol ([`uapi`], what `wg` speaks) with one peer per other selected
//!   node, and steers cross-node traffic into it with policy routing ([`routes`]).
//! - Rotation is two-phase and lossless: the next generation's pair is made and its
//!   device (odd and even generations alternate between two devices and two ports) is
//!   configured with every peer's next key while traffic still uses the current one; the
//!   routes switch once the operator says every node is prepared (see [`node`]).
//! - MTU: the devices get the uplink's MTU minus [`routes::WIREGUARD_OVERHEAD`], and new
//!   pods an MTU whose packets (with VXLAN in the overlay) fit through unfragmented.
//! - IPsec, where the kernel has ESP: [`ipsec`] computes the node's security associations
//!   and policies from its spec and the key Secrets (a key per SA, derived), and takes
//!   the kernel's XFRM tables there in an order that leaves no packet without an SA,
//!   rotations included; [`xfrm`] is the bytes. Where the kernel lacks ESP the node
//!   reports it (the policy says `Unsupported` with this node's reason). [`wg_netlink`]
//!   and [`wg_kernel`] are the kernel WireGuard's messages (over [`nlmsg`], unit-tested to
//!   the byte). Neither IPsec nor kernel WireGuard has run on this project's machines
//!   (their kernels have neither).

pub mod backend;
pub mod device;
pub mod ipsec;
pub mod keys;
pub mod nlmsg;
pub mod node;
pub mod probe;
pub mod routes;
pub mod uapi;
pub mod wg_kernel;
pub mod wg_netlink;
pub mod xfrm;

use serde::{Deserialize, Serialize};

/// Which WireGuard implementation the agent uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WireGuardImplementation {
    /// The kernel's where it has WireGuard, else the userspace device.
    #[default]
    Auto,
    /// The kernel module, over generic netlink (refused at start where the kernel has none).
    Kernel,
    /// boringtun, in a device process the agent starts and replaces ([`device`]).
    Userspace,
}

/// `encryption` in agent.yaml.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct EncryptionAgentConfig {
    pub wireguard_implementation: WireGuardImplementation,
    /// Name of the WireGuard interface (and of its socket under /var/run/wireguard/).
    pub interface: String,
    /// MTU of the WireGuard interfaces; 0: the uplink's minus 80 (see
    /// [`routes::WIREGUARD_OVERHEAD`]).
    pub mtu: u32,
    /// Routing table of the peers' pod CIDRs through the device.
    pub pod_route_table: u32,
    /// Routing table of the peers' node addresses for the overlay's UDP packets.
    pub tunnel_route_table: u32,
    /// Priority of the first of the two rules (the second takes the next number).
    pub rule_priority: u32,
    /// Drop, instead of sending in clear, traffic to a selected peer that cannot be
    /// encrypted yet (no key published, device not up).
    pub strict_mode: bool,
    /// Worker threads of the userspace device.
    pub device_threads: usize,
    /// The node's encryption is converged at least this often (seconds).
    pub resync_seconds: u64,
    /// After a key switch, the old generation's device keeps its peers this long (seconds)
    /// for peers that switch later, then forgets them and its key. IPsec: the old
    /// generation's security associations stay this long after the switch.
    pub rotation_grace_seconds: u64,
    /// IPsec: the namespace of the key Secrets the operator makes (operator.yaml
    /// `encryption.ipsecKeysNamespace`); the only Secrets of it the agent reads are those
    /// its node's spec names.
    pub ipsec_keys_namespace: String,
}

impl Default for EncryptionAgentConfig {
    fn default() -> Self {
        Self {
            wireguard_implementation: WireGuardImplementation::Auto,
            interface: "tendril_wg0".into(),
            mtu: 0,
            pod_route_table: 2004,
            tunnel_route_table: 2005,
            rule_priority: 90,
            strict_mode: true,
            device_threads: 2,
            resync_seconds: 10,
            rotation_grace_seconds: 30,
            ipsec_keys_namespace: "tendril-ipsec-keys".into(),
        }
    }
}

impl EncryptionAgentConfig {
    /// The device of key generation `epoch`: odd generations use `interface`, even ones
    /// `interface` + `b`, so a rotation prepares the next generation on the device that is
    /// not in use and switches between two running devices.
    pub fn device_of(&self, epoch: i64) -> String {
        if epoch % 2 == 0 {
            format!("{}b", self.interface)
        } else {
            self.interface.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.interface.is_empty() || self.interface.len() > 14 {
            return Err(format!(
                "encryption.interface {:?} must be 1 to 14 characters (the second device adds a b)",
                self.interface
            ));
        }
        if self.pod_route_table == self.tunnel_route_table
            || [self.pod_route_table, self.tunnel_route_table]
                .iter()
                .any(|t| matches!(t, 0 | 253..=255))
        {
            return Err(
                "encryption.podRouteTable and tunnelRouteTable must differ and not be 0, 253, 254 or 255"
                    .into(),
            );
        }
        Ok(())
    }
}
