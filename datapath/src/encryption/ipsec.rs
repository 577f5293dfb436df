//! IPsec on the node (`NodeNetwork.spec.encryption.mode: IPsec`, where the kernel has ESP):
//! the XFRM states and policies a node must hold, from its spec and the key Secrets the
//! operator makes, and the ordered steps that take the kernel's tables there ([`steps`]).
//!
//! - **Keys.** A generation's Secret holds a random key. Every SA gets its own key, derived
//!   from it with keyed BLAKE2b over the generation and the SA's direction (sending and
//!   receiving node): AES-GCM's nonce is a per-SA counter, so two SAs sharing a key would
//!   repeat nonces (the flaw Cilium fixed by deriving keys per node pair).
//! - **SPIs.** The kernel finds an inbound SA by destination and SPI alone, so each sender
//!   needs an SPI of its own towards a node: the generation's key id (1–15, from the spec)
//!   in the top 4 bits and 28 bits hashed from the sender's address ([`spi_of`]). Two
//!   senders whose hashes collide are reported, never installed over each other.
//! - **Rotation** (the operator's two phases). Prepare: the next generation's SAs are added
//!   beside the current ones (the node then reports the generation prepared). Switch: the
//!   `out` policies are updated in place to the new generation's SA; `in` and `fwd` accept
//!   any SA, so a peer that switches later still gets through. The old generation's SAs go
//!   after the grace period.

use super::nlmsg;
use super::xfrm::{self, Direction, Mode, PeerLink, Policy, Sa, Step, policies};
use crate::cni::link;
use blake2::Blake2bMac512;
use blake2::digest::{FixedOutput, KeyInit, Update};
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The only algorithm this agent installs (the CRD's default).
pub const AEAD: &str = super::xfrm::AEAD_NAME;
/// Priority of Tendril's XFRM policies (lower wins; below the kernel's default 0 ones).
pub const POLICY_PRIORITY: u32 = 100;

/// One key generation as a Secret holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub epoch: i64,
    /// The spec's SPI of the generation (1–15): the top 4 bits of every SPI of it.
    pub key_id: u8,
    /// The Secret's random key.
    pub master: Vec<u8>,
    /// AES key length (16 or 32); each SA key is followed by a 4-byte salt.
    pub key_bytes: usize,
}

impl Generation {
    /// From a key Secret's data (`key`, `keyBits`, `algorithm`).
    pub fn from_secret(
        epoch: i64,
        key_id: u8,
        data: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, String> {
        let text = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        let algorithm = text("algorithm").unwrap_or_else(|| AEAD.into());
        if algorithm != AEAD {
            return Err(format!(
                "algorithm {algorithm} is not supported by this agent (only {AEAD})"
            ));
        }
        let key_bytes = match text("keyBits").as_deref().unwrap_or("128") {
            "128" => 16,
            "256" => 32,
            other => return Err(format!("keyBits {other} is neither 128 nor 256")),
        };
        let master = data.get("key").cloned().unwrap_or_default();
        if master.len() < 32 || master.len() > 64 {
            return Err(format!(
                "the key is {} bytes long (32 to 64 expected)",
                master.len()
            ));
        }
        Ok(Self {
            epoch,
            key_id,
            master,
            key_bytes,
        })
    }
}

fn blake2b(key: &[u8], parts: &[&[u8]]) -> [u8; 64] {
    let mut mac = <Blake2bMac512 as KeyInit>::new_from_slice(key)
        .expect("a BLAKE2b key is 1 to 64 bytes (checked when read)");
    for p in parts {
        mac.update(p);
    }
    mac.finalize_fixed().into()
}

/// The SPI of `sender`'s SAs of the generation with key id `key_id`.
pub fn spi_of(key_id: u8, sender: Ipv4Addr) -> u32 {
    let h = blake2b(b"tendril ipsec spi", &[&sender.octets()]);
    (u32::from(key_id & 0x0f) << 28) | (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) & 0x0fff_ffff)
}

/// The key (AES key and salt) of the SA carrying `src` → `dst` traffic of `g`.
pub fn sa_key(g: &Generation, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let out = blake2b(
        &g.master,
        &[
            b"tendril ipsec sa",
            &g.epoch.to_be_bytes(),
            &src.octets(),
            &dst.octets(),
        ],
    );
    out[..g.key_bytes + 4].to_vec()
}

/// An SA as the kernel keys it: destination and SPI.
pub type SaId = (Ipv4Addr, u32);
/// A policy as the kernel keys it: direction and selector.
pub type PolicyId = (Direction, Ipv4Net, Ipv4Net, Option<u16>);

fn policy_id(p: &Policy) -> PolicyId {
    (p.dir, p.sel_src, p.sel_dst, p.udp_dport)
}

/// XFRM tables: what a node wants, or what this agent installed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub sas: BTreeMap<SaId, Sa>,
    pub policies: BTreeMap<PolicyId, Policy>,
}

impl Tables {
    /// What `step` leaves in the tables once the kernel took it.
    pub fn apply(&mut self, step: &Step) {
        match step {
            Step::AddSa(sa) => {
                self.sas.insert((sa.dst, sa.spi), sa.clone());
            }
            Step::SetPolicy { policy, .. } => {
                self.policies.insert(policy_id(policy), policy.clone());
            }
            Step::DeleteSa { dst, spi } => {
                self.sas.remove(&(*dst, *spi));
            }
            Step::DeletePolicy(p) => {
                self.policies.remove(&policy_id(p));
            }
        }
    }

    /// Whether every SA of `g` that `want` holds is installed.
    pub fn holds_generation(&self, want: &Tables, g: &Generation) -> bool {
        want.sas
            .iter()
            .filter(|((_, spi), _)| spi >> 28 == u32::from(g.key_id))
            .all(|(id, sa)| self.sas.get(id) == Some(sa))
    }
}

/// The tables for `links` with the generation in use, and the next one while a rotation
/// prepares it: per link, both directions' SAs of each generation, and the policies that
/// send with the generation in use.
pub fn want(
    links: &[PeerLink],
    current: &Generation,
    next: Option<&Generation>,
) -> Result<Tables, String> {
    let mut t = Tables::default();
    for link in links {
        for g in std::iter::once(current).chain(next) {
            for (src, dst) in [(link.local, link.peer), (link.peer, link.local)] {
                let sa = Sa {
                    src,
                    dst,
                    spi: spi_of(g.key_id, src),
                    key: sa_key(g, src, dst),
                    mode: Mode::Tunnel,
                };
                match t.sas.get(&(dst, sa.spi)) {
                    Some(other) if other.src != src => {
                        return Err(format!(
                            "{} and {} hash to the same SPI {:#010x} towards {dst}; rotate the keys to move on",
                            other.src, src, sa.spi
                        ));
                    }
                    _ => {
                        t.sas.insert((dst, sa.spi), sa);
                    }
                }
            }
        }
        let reqid = spi_of(current.key_id, link.local);
        for p in policies(link, reqid, POLICY_PRIORITY) {
            t.policies.insert(policy_id(&p), p);
        }
    }
    Ok(t)
}

/// The steps from `installed` to `want`, in an order that never leaves a packet without an
/// SA: missing SAs first, then policies added or switched in place, then policies no
/// longer wanted, then SAs of peers gone; SAs of an older generation of a peer still there
/// only once `retire_old` (the grace period after the switch has passed).
pub fn steps(want: &Tables, installed: &Tables, retire_old: bool) -> Vec<Step> {
    let mut out: Vec<Step> = want
        .sas
        .iter()
        .filter(|(id, sa)| installed.sas.get(id) != Some(sa))
        .map(|(_, sa)| Step::AddSa(sa.clone()))
        .collect();
    out.extend(
        want.policies
            .iter()
            .filter(|(id, p)| installed.policies.get(id) != Some(p))
            .map(|(_, p)| Step::SetPolicy {
                policy: p.clone(),
                update: true,
            }),
    );
    out.extend(
        installed
            .policies
            .iter()
            .filter(|(id, _)| !want.policies.contains_key(id))
            .map(|(_, p)| Step::DeletePolicy(p.clone())),
    );
    let pair_wanted = |sa: &Sa| {
        want.sas
            .values()
            .any(|w| (w.src, w.dst) == (sa.src, sa.dst))
    };
    out.extend(
        installed
            .sas
            .iter()
            .filter(|(id, _)| !want.sas.contains_key(id))
            .filter(|(_, sa)| retire_old || !pair_wanted(sa))
            .map(|((dst, spi), _)| Step::DeleteSa {
                dst: *dst,
                spi: *spi,
            }),
    );
    out
}

/// Takes `steps` in the network namespace `netns` (the agent's own when `None`), in order,
/// stopping at the first the kernel refuses: the steps it took, and the refusal. An SA
/// that exists already (an earlier agent process installed it: same SPI, same derived key)
/// or a deletion of something gone counts as taken.
pub fn apply(
    netns: Option<std::path::PathBuf>,
    steps: Vec<Step>,
) -> (Vec<Step>, Result<(), String>) {
    let taken = link::run_in(netns.as_deref(), move |_| async move {
        let mut done = Vec::new();
        let socket = match nlmsg::Socket::open(xfrm::NETLINK_XFRM) {
            Ok(s) => s,
            Err(e) => return Ok((done, Err(format!("XFRM netlink socket: {e}")))),
        };
        for (seq, step) in steps.into_iter().enumerate() {
            let taken = match socket.request(&step.message(seq as u32 + 1)) {
                Ok(()) => true,
                Err(e) => match (e.raw_os_error(), &step) {
                    (Some(libc::EEXIST), Step::AddSa(_)) => true,
                    (
                        Some(libc::ENOENT | libc::ESRCH),
                        Step::DeleteSa { .. } | Step::DeletePolicy(_),
                    ) => true,
                    _ => return Ok((done, Err(format!("{step:?}: {e}")))),
                },
            };
            if taken {
                done.push(step);
            }
        }
        Ok((done, Ok(())))
    });
    taken.unwrap_or_else(|e| (Vec::new(), Err(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(epoch: i64, key_id: u8) -> Generation {
        Generation {
            epoch,
            key_id,
            master: vec![epoch as u8; 64],
            key_bytes: 16,
        }
    }

    fn link(peer: u8) -> PeerLink {
        PeerLink {
            local: Ipv4Addr::new(10, 0, 0, 1),
            local_pods: "10.200.1.0/24".parse().unwrap(),
            peer: Ipv4Addr::new(10, 0, 0, peer),
            peer_pods: format!("10.200.{peer}.0/24").parse().unwrap(),
            udp_dport: None,
        }
    }

    fn run(installed: &mut Tables, steps: &[Step]) {
        for s in steps {
            installed.apply(s);
        }
    }

    #[test]
    fn every_sa_has_its_own_key_and_each_sender_its_own_spi() {
        let g = generation(1, 1);
        let (a, b, c) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        let keys = [sa_key(&g, a, b), sa_key(&g, b, a), sa_key(&g, c, b)];
        assert_eq!(keys[0].len(), 20, "AES-128 key + salt");
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_eq!(sa_key(&g, a, b), keys[0], "both ends derive the same key");
        assert_ne!(sa_key(&generation(2, 2), a, b), keys[0]);
        assert_eq!(spi_of(3, a) >> 28, 3, "key id in the top 4 bits");
        assert_ne!(spi_of(3, a), spi_of(3, b));
        assert_eq!(spi_of(3, a) & 0x0fff_ffff, spi_of(4, a) & 0x0fff_ffff);
    }

    #[test]
    fn a_node_holds_both_directions_per_peer_and_sends_with_its_own_spi() {
        let g = generation(1, 1);
        let t = want(&[link(2), link(3)], &g, None).unwrap();
        assert_eq!(t.sas.len(), 4);
        assert_eq!(t.policies.len(), 6, "out, in, fwd per peer");
        let local = Ipv4Addr::new(10, 0, 0, 1);
        let out = t
            .policies
            .values()
            .find(|p| p.dir == Direction::Out && p.tunnel_dst == Ipv4Addr::new(10, 0, 0, 3))
            .unwrap();
        assert_eq!(out.reqid, spi_of(1, local), "the SA this node sends with");
        let sa = &t.sas[&(Ipv4Addr::new(10, 0, 0, 3), spi_of(1, local))];
        assert_eq!(sa.key, sa_key(&g, local, Ipv4Addr::new(10, 0, 0, 3)));
        // The peer's SA towards us under its own SPI.
        let inbound = &t.sas[&(local, spi_of(1, Ipv4Addr::new(10, 0, 0, 2)))];
        assert_eq!(inbound.src, Ipv4Addr::new(10, 0, 0, 2));
    }

    #[test]
    fn a_rotation_adds_switches_in_place_and_retires_after_the_grace_period() {
        let (g1, g2) = (generation(1, 1), generation(2, 2));
        let links = [link(2)];
        let mut installed = Tables::default();
        let first = want(&links, &g1, None).unwrap();
        let s = steps(&first, &installed, false);
        assert!(matches!(s[0], Step::AddSa(_)) && matches!(s[1], Step::AddSa(_)));
        assert!(s[2..].iter().all(|s| matches!(s, Step::SetPolicy { .. })));
        run(&mut installed, &s);
        assert!(steps(&first, &installed, true).is_empty(), "converged");

        // Prepare: only the next generation's SAs are added; policies stay.
        let prepared = want(&links, &g1, Some(&g2)).unwrap();
        let s = steps(&prepared, &installed, false);
        assert_eq!(s.len(), 2);
        assert!(
            s.iter()
                .all(|s| matches!(s, Step::AddSa(sa) if sa.spi >> 28 == 2))
        );
        run(&mut installed, &s);
        assert!(installed.holds_generation(&prepared, &g2));

        // Switch: the out policy moves to generation 2 in place; the old SAs stay...
        let switched = want(&links, &g2, None).unwrap();
        let s = steps(&switched, &installed, false);
        assert_eq!(s.len(), 1, "{s:?}");
        let Step::SetPolicy { policy, update } = &s[0] else {
            panic!("{s:?}")
        };
        assert!(*update);
        assert_eq!(
            (policy.dir, policy.reqid),
            (Direction::Out, spi_of(2, Ipv4Addr::new(10, 0, 0, 1)))
        );
        run(&mut installed, &s);
        // ...until the grace period passed.
        let s = steps(&switched, &installed, true);
        assert_eq!(s.len(), 2);
        assert!(
            s.iter()
                .all(|s| matches!(s, Step::DeleteSa { spi, .. } if spi >> 28 == 1))
        );
        run(&mut installed, &s);
        assert_eq!(installed, switched);
    }

    #[test]
    fn a_peer_that_goes_loses_its_policies_then_its_sas_at_once() {
        let g = generation(1, 1);
        let mut installed = Tables::default();
        let first = steps(
            &want(&[link(2), link(3)], &g, None).unwrap(),
            &installed,
            false,
        );
        run(&mut installed, &first);
        let s = steps(&want(&[link(2)], &g, None).unwrap(), &installed, false);
        assert_eq!(s.len(), 5, "{s:?}");
        assert!(s[..3].iter().all(|s| matches!(s, Step::DeletePolicy(_))));
        assert!(s[3..].iter().all(|s| matches!(s, Step::DeleteSa { .. })));
    }

    #[test]
    fn secrets_are_read_strictly() {
        let data = |pairs: &[(&str, &[u8])]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect::<BTreeMap<_, _>>()
        };
        let g = Generation::from_secret(3, 3, &data(&[("key", &[7; 64]), ("keyBits", b"256")]))
            .unwrap();
        assert_eq!((g.key_bytes, g.key_id), (32, 3));
        assert_eq!(
            sa_key(&g, Ipv4Addr::LOCALHOST, Ipv4Addr::BROADCAST).len(),
            36
        );
        let e = Generation::from_secret(1, 1, &data(&[("key", &[7; 8])])).unwrap_err();
        assert!(e.contains("8 bytes"), "{e}");
        let e = Generation::from_secret(
            1,
            1,
            &data(&[("key", &[7; 64]), ("algorithm", b"cbc(aes)")]),
        )
        .unwrap_err();
        assert!(e.contains("not supported"), "{e}");
    }
}
