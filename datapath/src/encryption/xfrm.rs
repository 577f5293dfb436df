//! IPsec between nodes as XFRM netlink messages (layouts of `linux/xfrm.h`, 64-bit Linux):
//! per peer, ESP security associations in tunnel mode between the node addresses with
//! AEAD `rfc4106(gcm(aes))` and SPI = key id, and policies that send the traffic between
//! the pod CIDRs through them.
//!
//! Which SAs and policies a node holds, and in which order they change (a rotation without
//! a packet left without an SA), is [`super::ipsec`]'s; this module is the bytes.
//!
//! These messages are only sent where the kernel has ESP (probed at start, see
//! [`super::probe`]); on the machines of this project it has not, and the policy says
//! `Unsupported`: the bytes are checked by the unit tests below.

use super::nlmsg::{Message, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;

/// The netlink protocol of the XFRM tables.
pub const NETLINK_XFRM: i32 = 6;
pub const XFRM_MSG_NEWSA: u16 = 0x10;
pub const XFRM_MSG_DELSA: u16 = 0x11;
pub const XFRM_MSG_NEWPOLICY: u16 = 0x13;
pub const XFRM_MSG_DELPOLICY: u16 = 0x14;
pub const XFRM_MSG_UPDPOLICY: u16 = 0x19;
pub const XFRMA_TMPL: u16 = 5;
pub const XFRMA_ALG_AEAD: u16 = 18;

/// `sizeof` of the uapi structures on 64-bit Linux.
pub const SELECTOR_LEN: usize = 56;
pub const USERSA_INFO_LEN: usize = 224;
pub const USERSA_ID_LEN: usize = 24;
pub const USERPOLICY_INFO_LEN: usize = 168;
pub const USERPOLICY_ID_LEN: usize = 64;
pub const USER_TMPL_LEN: usize = 64;
const LIFETIME_CFG_LEN: usize = 64;

const AF_INET: u16 = libc::AF_INET as u16;
const IPPROTO_ESP: u8 = libc::IPPROTO_ESP as u8;
pub const AEAD_NAME: &str = "rfc4106(gcm(aes))";
/// ICV of the AEAD, bits.
pub const ICV_BITS: u32 = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Transport = 0,
    Tunnel = 1,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Direction {
    In = 0,
    Out = 1,
    Fwd = 2,
}

/// One security association: traffic from `src` to `dst` (node addresses) under `spi`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sa {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The key id (also the `reqid`).
    pub spi: u32,
    /// AES key (16 or 32 bytes) followed by the 4-byte salt.
    pub key: Vec<u8>,
    pub mode: Mode,
}

/// `struct xfrm_selector` for IPv4 `src` → `dst`: any protocol and port, or UDP to
/// `udp_dport` only.
fn selector(src: Ipv4Net, dst: Ipv4Net, udp_dport: Option<u16>) -> [u8; SELECTOR_LEN] {
    let mut s = [0u8; SELECTOR_LEN];
    s[0..4].copy_from_slice(&dst.network().octets()); // daddr
    s[16..20].copy_from_slice(&src.network().octets()); // saddr
    if let Some(port) = udp_dport {
        s[32..34].copy_from_slice(&port.to_be_bytes()); // dport
        s[34..36].copy_from_slice(&u16::MAX.to_be_bytes()); // dport_mask
        s[44] = libc::IPPROTO_UDP as u8; // proto
    }
    s[40..42].copy_from_slice(&AF_INET.to_ne_bytes()); // family
    s[42] = dst.prefix_len(); // prefixlen_d
    s[43] = src.prefix_len(); // prefixlen_s
    s
}

/// `struct xfrm_lifetime_cfg` without limits (`XFRM_INF` on bytes and packets).
fn no_limits() -> [u8; LIFETIME_CFG_LEN] {
    let mut l = [0u8; LIFETIME_CFG_LEN];
    for i in 0..4 {
        l[8 * i..8 * i + 8].copy_from_slice(&u64::MAX.to_ne_bytes());
    }
    l
}

/// `struct xfrm_algo_aead`: name[64], key length (bits), ICV length (bits), key.
fn aead(key: &[u8]) -> Vec<u8> {
    let mut a = vec![0u8; 72];
    a[..AEAD_NAME.len()].copy_from_slice(AEAD_NAME.as_bytes());
    a[64..68].copy_from_slice(&(key.len() as u32 * 8).to_ne_bytes());
    a[68..72].copy_from_slice(&ICV_BITS.to_ne_bytes());
    a.extend_from_slice(key);
    a
}

/// `XFRM_MSG_NEWSA` for `sa` (selector left empty: the policies select).
pub fn new_sa(sa: &Sa, seq: u32) -> Vec<u8> {
    let mut info = [0u8; USERSA_INFO_LEN];
    // sel (0..56) stays zero apart from its family.
    info[40..42].copy_from_slice(&AF_INET.to_ne_bytes());
    // id: daddr (56..72), spi (72, network order), proto (76).
    info[56..60].copy_from_slice(&sa.dst.octets());
    info[72..76].copy_from_slice(&sa.spi.to_be_bytes());
    info[76] = IPPROTO_ESP;
    info[80..84].copy_from_slice(&sa.src.octets()); // saddr
    info[96..160].copy_from_slice(&no_limits()); // lft
    // curlft (160..192) and stats (192..204) are the kernel's; seq at 204 unused.
    info[208..212].copy_from_slice(&sa.spi.to_ne_bytes()); // reqid
    info[212..214].copy_from_slice(&AF_INET.to_ne_bytes()); // family
    info[214] = sa.mode as u8;
    info[215] = 32; // replay_window
    let mut m = Message::new(
        XFRM_MSG_NEWSA,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        seq,
        &info,
    );
    m.attr(XFRMA_ALG_AEAD, &aead(&sa.key));
    m.finish()
}

/// `XFRM_MSG_DELSA` of the SA towards `dst` under `spi`.
pub fn del_sa(dst: Ipv4Addr, spi: u32, seq: u32) -> Vec<u8> {
    let mut id = [0u8; USERSA_ID_LEN];
    id[0..4].copy_from_slice(&dst.octets());
    id[16..20].copy_from_slice(&spi.to_be_bytes());
    id[20..22].copy_from_slice(&AF_INET.to_ne_bytes());
    id[22] = IPPROTO_ESP;
    Message::new(XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK, seq, &id).finish()
}

/// A policy: traffic `sel_src` → `sel_dst` (UDP to `udp_dport` only, when set) in `dir`
/// goes through ESP in tunnel mode between `tunnel_src` and `tunnel_dst`, with the SA of
/// `reqid` (0: any).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub dir: Direction,
    pub sel_src: Ipv4Net,
    pub sel_dst: Ipv4Net,
    pub udp_dport: Option<u16>,
    pub tunnel_src: Ipv4Addr,
    pub tunnel_dst: Ipv4Addr,
    pub reqid: u32,
    pub priority: u32,
}

/// `struct xfrm_user_tmpl` of `p`.
fn template(p: &Policy) -> [u8; USER_TMPL_LEN] {
    let mut t = [0u8; USER_TMPL_LEN];
    // id: daddr (0..16), spi (16, 0 = any), proto (20).
    t[0..4].copy_from_slice(&p.tunnel_dst.octets());
    t[20] = IPPROTO_ESP;
    t[24..26].copy_from_slice(&AF_INET.to_ne_bytes()); // family
    t[28..32].copy_from_slice(&p.tunnel_src.octets()); // saddr
    t[44..48].copy_from_slice(&p.reqid.to_ne_bytes()); // reqid
    t[48] = Mode::Tunnel as u8;
    // share 0, optional 0; every algorithm allowed.
    t[52..56].copy_from_slice(&u32::MAX.to_ne_bytes()); // aalgos
    t[56..60].copy_from_slice(&u32::MAX.to_ne_bytes()); // ealgos
    t[60..64].copy_from_slice(&u32::MAX.to_ne_bytes()); // calgos
    t
}

/// `XFRM_MSG_NEWPOLICY` (or `XFRM_MSG_UPDPOLICY`, which replaces the policy of the same
/// selector and direction in one step: the switch) for `p`.
pub fn policy(p: &Policy, update: bool, seq: u32) -> Vec<u8> {
    let mut info = [0u8; USERPOLICY_INFO_LEN];
    info[..SELECTOR_LEN].copy_from_slice(&selector(p.sel_src, p.sel_dst, p.udp_dport));
    info[56..120].copy_from_slice(&no_limits()); // lft
    info[152..156].copy_from_slice(&p.priority.to_ne_bytes());
    info[160] = p.dir as u8;
    // action 0 = XFRM_POLICY_ALLOW, flags 0, share 0.
    let (kind, flags) = if update {
        (XFRM_MSG_UPDPOLICY, NLM_F_REQUEST | NLM_F_ACK)
    } else {
        (
            XFRM_MSG_NEWPOLICY,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
    };
    let mut m = Message::new(kind, flags, seq, &info);
    m.attr(XFRMA_TMPL, &template(p));
    m.finish()
}

/// `XFRM_MSG_DELPOLICY` of the policy of `p`'s selector and direction.
pub fn del_policy(p: &Policy, seq: u32) -> Vec<u8> {
    let mut id = [0u8; USERPOLICY_ID_LEN];
    id[..SELECTOR_LEN].copy_from_slice(&selector(p.sel_src, p.sel_dst, p.udp_dport));
    id[60] = p.dir as u8;
    Message::new(XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK, seq, &id).finish()
}

/// This node and one peer: addresses, and what is encrypted between them: traffic
/// between `local_pods` and `peer_pods` (native routing: the pod CIDRs; the overlay: the
/// node addresses, UDP to the tunnel port `udp_dport`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerLink {
    pub local: Ipv4Addr,
    pub local_pods: Ipv4Net,
    pub peer: Ipv4Addr,
    pub peer_pods: Ipv4Net,
    pub udp_dport: Option<u16>,
}

/// One change to the kernel's XFRM tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    AddSa(Sa),
    /// Adds, or with `update` replaces, a policy.
    SetPolicy {
        policy: Policy,
        update: bool,
    },
    DeleteSa {
        dst: Ipv4Addr,
        spi: u32,
    },
    DeletePolicy(Policy),
}

impl Step {
    pub fn message(&self, seq: u32) -> Vec<u8> {
        match self {
            Step::AddSa(sa) => new_sa(sa, seq),
            Step::SetPolicy { policy: p, update } => policy(p, *update, seq),
            Step::DeleteSa { dst, spi } => del_sa(*dst, *spi, seq),
            Step::DeletePolicy(p) => del_policy(p, seq),
        }
    }
}

/// The policies of a peer, sending with the SA of `reqid`; `in` and `fwd` accept any.
pub fn policies(link: &PeerLink, reqid: u32, priority: u32) -> Vec<Policy> {
    let out = Policy {
        dir: Direction::Out,
        sel_src: link.local_pods,
        sel_dst: link.peer_pods,
        udp_dport: link.udp_dport,
        tunnel_src: link.local,
        tunnel_dst: link.peer,
        reqid,
        priority,
    };
    let inbound = |dir| Policy {
        dir,
        sel_src: link.peer_pods,
        sel_dst: link.local_pods,
        udp_dport: link.udp_dport,
        tunnel_src: link.peer,
        tunnel_dst: link.local,
        reqid: 0,
        priority,
    };
    vec![out, inbound(Direction::In), inbound(Direction::Fwd)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::nlmsg::test_bytes::{u16_at, u32_at};

    fn link() -> PeerLink {
        PeerLink {
            local: Ipv4Addr::new(10, 0, 0, 1),
            local_pods: "10.200.1.0/24".parse().unwrap(),
            peer: Ipv4Addr::new(10, 0, 0, 2),
            peer_pods: "10.200.2.0/24".parse().unwrap(),
            udp_dport: None,
        }
    }

    #[test]
    fn newsa_has_the_usersa_info_layout_and_the_aead_attribute() {
        let key = [0xab; 36]; // AES-256 + salt
        let sa = Sa {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            spi: 3,
            key: key.to_vec(),
            mode: Mode::Tunnel,
        };
        let msg = new_sa(&sa, 9);
        // nlmsghdr + xfrm_usersa_info + XFRMA_ALG_AEAD (4 + 72 + 36).
        assert_eq!(msg.len(), 16 + 224 + 112);
        assert_eq!(u32_at(&msg, 0) as usize, msg.len());
        assert_eq!(u16_at(&msg, 4), XFRM_MSG_NEWSA);
        assert_eq!(u16_at(&msg, 6), 0x1 | 0x4 | 0x400 | 0x200);
        assert_eq!(u32_at(&msg, 8), 9);
        let info = &msg[16..16 + 224];
        assert_eq!(u16_at(info, 40), 2, "sel.family");
        assert_eq!(&info[56..60], &[10, 0, 0, 2], "id.daddr");
        assert_eq!(&info[72..76], &[0, 0, 0, 3], "id.spi, network order");
        assert_eq!(info[76], 50, "id.proto = ESP");
        assert_eq!(&info[80..84], &[10, 0, 0, 1], "saddr");
        assert!(
            info[96..128].iter().all(|b| *b == 0xff),
            "no byte/packet limits"
        );
        assert!(info[128..160].iter().all(|b| *b == 0), "no expiry");
        assert_eq!(u32_at(info, 208), 3, "reqid = SPI");
        assert_eq!(u16_at(info, 212), 2, "family");
        assert_eq!(
            (info[214], info[215]),
            (1, 32),
            "tunnel mode, replay window"
        );
        let attr = &msg[16 + 224..];
        assert_eq!(u16_at(attr, 0), 4 + 72 + 36);
        assert_eq!(u16_at(attr, 2), XFRMA_ALG_AEAD);
        assert!(attr[4..].starts_with(b"rfc4106(gcm(aes))\0"));
        assert_eq!(u32_at(attr, 68), 288, "key bits, salt included");
        assert_eq!(u32_at(attr, 72), 128, "ICV bits");
        assert_eq!(&attr[76..112], &key);
    }

    #[test]
    fn delsa_names_the_sa_by_daddr_spi_and_proto() {
        let msg = del_sa(Ipv4Addr::new(10, 0, 0, 2), 0x0102_0304, 4);
        assert_eq!(msg.len(), 16 + 24);
        assert_eq!(u16_at(&msg, 4), XFRM_MSG_DELSA);
        assert_eq!(u16_at(&msg, 6), 0x1 | 0x4);
        let id = &msg[16..];
        assert_eq!(&id[0..4], &[10, 0, 0, 2]);
        assert!(id[4..16].iter().all(|b| *b == 0));
        assert_eq!(&id[16..20], &[1, 2, 3, 4]);
        assert_eq!(u16_at(id, 20), 2);
        assert_eq!((id[22], id[23]), (50, 0));
    }

    #[test]
    fn a_policy_has_its_selector_direction_and_template() {
        let p = &policies(&link(), 5, 100)[0];
        let msg = policy(p, false, 1);
        // nlmsghdr + xfrm_userpolicy_info + XFRMA_TMPL (4 + 64).
        assert_eq!(msg.len(), 16 + 168 + 68);
        assert_eq!(u16_at(&msg, 4), XFRM_MSG_NEWPOLICY);
        let info = &msg[16..16 + 168];
        assert_eq!(&info[0..4], &[10, 200, 2, 0], "sel.daddr: the peer's pods");
        assert_eq!(&info[16..20], &[10, 200, 1, 0], "sel.saddr: ours");
        assert_eq!(u16_at(info, 40), 2);
        assert_eq!((info[42], info[43], info[44]), (24, 24, 0));
        assert_eq!(u32_at(info, 152), 100, "priority");
        assert_eq!(info[160], 1, "dir out");
        assert_eq!(info[161], 0, "allow");
        let attr = &msg[16 + 168..];
        assert_eq!((u16_at(attr, 0), u16_at(attr, 2)), (68, XFRMA_TMPL));
        let t = &attr[4..];
        assert_eq!(&t[0..4], &[10, 0, 0, 2], "tunnel to the peer");
        assert_eq!(u32_at(t, 16), 0, "any SPI");
        assert_eq!(t[20], 50);
        assert_eq!(u16_at(t, 24), 2);
        assert_eq!(&t[28..32], &[10, 0, 0, 1], "from us");
        assert_eq!(u32_at(t, 44), 5, "the SA of reqid 5");
        assert_eq!(t[48], 1, "tunnel mode");
        assert_eq!(u32_at(t, 56), u32::MAX, "ealgos");
        // The switch replaces it in one message.
        let update = policy(p, true, 2);
        assert_eq!(u16_at(&update, 4), XFRM_MSG_UPDPOLICY);
        assert_eq!(update[16..], msg[16..]);
        // Deleting names the selector and direction.
        let del = del_policy(p, 3);
        assert_eq!(del.len(), 16 + 64);
        assert_eq!(u16_at(&del, 4), XFRM_MSG_DELPOLICY);
        assert_eq!(del[16..16 + 56], info[..56]);
        assert_eq!(del[16 + 60], 1);
    }

    #[test]
    fn inbound_policies_accept_any_reqid_and_mirror_the_outbound_one() {
        let ps = policies(&link(), 5, 100);
        assert_eq!(
            ps.iter().map(|p| p.dir).collect::<Vec<_>>(),
            [Direction::Out, Direction::In, Direction::Fwd]
        );
        for p in &ps[1..] {
            assert_eq!(p.reqid, 0);
            assert_eq!((p.sel_src, p.sel_dst), (ps[0].sel_dst, ps[0].sel_src));
            assert_eq!(
                (p.tunnel_src, p.tunnel_dst),
                (ps[0].tunnel_dst, ps[0].tunnel_src)
            );
        }
    }

    #[test]
    fn an_overlay_selector_takes_udp_to_the_tunnel_port_only() {
        let overlay = PeerLink {
            local_pods: "10.0.0.1/32".parse().unwrap(),
            peer_pods: "10.0.0.2/32".parse().unwrap(),
            udp_dport: Some(8472),
            ..link()
        };
        let p = &policies(&overlay, 5, 100)[0];
        let info = &policy(p, false, 1)[16..16 + 168];
        assert_eq!(&info[32..34], &8472u16.to_be_bytes(), "dport");
        assert_eq!(&info[34..36], &[0xff, 0xff], "dport_mask");
        assert_eq!((info[42], info[43], info[44]), (32, 32, 17), "/32s, UDP");
        assert_eq!(del_policy(p, 2)[16..16 + 56], info[..56]);
    }
}
