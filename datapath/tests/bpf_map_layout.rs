//! The Rust mirrors in `src/bpf/maps/layout.rs` have the layout of the C structs in
//! `bpf/lib/maps.h`, read from the BTF of the compiled objects (`bpftool btf
//! dump`), i.e. exactly what the programs were compiled against.

mod bpf_support;

use std::{collections::BTreeMap, mem::offset_of};

use tendril_datapath::bpf::{
    loader::{BPF_HOST, BPF_LXC, BPF_OVERLAY, BPF_SOCK},
    maps::*,
};

/// name → (size, [(member, byte offset)]) of every struct in an object's BTF.
fn btf_structs(object: &[u8]) -> BTreeMap<String, (u64, Vec<(String, u64)>)> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), object).unwrap();
    bpf_support::btf_types(file.path())
        .iter()
        .filter(|t| t["kind"] == "STRUCT" && t["name"].is_string())
        .map(|t| {
            let members = t["members"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap().to_string(),
                        m["bits_offset"].as_u64().unwrap() / 8,
                    )
                })
                .collect();
            (
                t["name"].as_str().unwrap().to_string(),
                (t["size"].as_u64().unwrap(), members),
            )
        })
        .collect()
}

macro_rules! layout {
    ($c:literal, $t:ty, [$($field:ident),* $(,)?]) => {
        (
            $c,
            std::mem::size_of::<$t>() as u64,
            vec![$((stringify!($field).to_string(), offset_of!($t, $field) as u64)),*],
        )
    };
}

#[test]
fn rust_mirrors_match_the_c_structs_in_every_object() {
    let expected = [
        layout!("ipcache_key", IpcacheKey, [prefixlen, family, pad, addr]),
        layout!(
            "ipcache_value",
            IpcacheValue,
            [identity, tunnel_endpoint, flags, encrypt_key, pad]
        ),
        layout!("endpoint_key", EndpointKey, [family, pad, addr]),
        layout!(
            "endpoint_info",
            EndpointInfo,
            [ifindex, identity, endpoint_id, flags, mac, node_mac]
        ),
        layout!("metrics_key", MetricsKey, [reason, dir, pad]),
        layout!("metrics_value", MetricsValue, [packets, bytes]),
        layout!(
            "node_config",
            NodeConfig,
            [tunnel_ifindex, node_ipv4, flags, pad]
        ),
        layout!(
            "policy_key",
            PolicyKey,
            [
                prefixlen,
                endpoint_id,
                direction,
                pad0,
                peer_identity,
                protocol,
                pad1,
                dport
            ]
        ),
        layout!(
            "policy_value",
            PolicyValue,
            [verdict, flags, pad, rule_cookie]
        ),
        layout!("policy_state", PolicyState, [revision, flags]),
        layout!("policy_cidr_value", PolicyCidrValue, [identity, pad]),
        layout!(
            "ct_key",
            CtKey,
            [saddr, daddr, sport, dport, proto, dir, endpoint_id]
        ),
        layout!(
            "ct6_key",
            Ct6Key,
            [saddr, daddr, sport, dport, proto, dir, endpoint_id]
        ),
        layout!(
            "ct_value",
            CtValue,
            [
                created_ns,
                last_seen_ns,
                policy_revision,
                flags,
                pad,
                packets,
                policy_epoch,
                pad2
            ]
        ),
        layout!(
            "policy_config",
            PolicyConfig,
            [epoch, event_mode, event_interval_ns]
        ),
        layout!(
            "policy_flow_key",
            PolicyFlowKey,
            [peer_identity, endpoint_id, dport, dir, proto, verdict, pad]
        ),
        layout!("frag4_key", Frag4Key, [saddr, daddr, id, proto, pad]),
        layout!("frag6_key", Frag6Key, [saddr, daddr, id, proto, pad]),
        layout!("frag4_ports", Frag4Ports, [sport, dport]),
        // `type` and `match` are Rust keywords: the mirror names them `kind` and `matched`.
        (
            "policy_event",
            std::mem::size_of::<RawPolicyEvent>() as u64,
            [
                ("ts_ns", offset_of!(RawPolicyEvent, ts_ns)),
                ("type", offset_of!(RawPolicyEvent, kind)),
                ("reason", offset_of!(RawPolicyEvent, reason)),
                ("dir", offset_of!(RawPolicyEvent, dir)),
                ("proto", offset_of!(RawPolicyEvent, proto)),
                ("verdict", offset_of!(RawPolicyEvent, verdict)),
                ("match", offset_of!(RawPolicyEvent, matched)),
                ("endpoint_id", offset_of!(RawPolicyEvent, endpoint_id)),
                ("src_identity", offset_of!(RawPolicyEvent, src_identity)),
                ("dst_identity", offset_of!(RawPolicyEvent, dst_identity)),
                ("saddr", offset_of!(RawPolicyEvent, saddr)),
                ("daddr", offset_of!(RawPolicyEvent, daddr)),
                ("sport", offset_of!(RawPolicyEvent, sport)),
                ("dport", offset_of!(RawPolicyEvent, dport)),
                ("ifindex", offset_of!(RawPolicyEvent, ifindex)),
                ("tcp_flags", offset_of!(RawPolicyEvent, tcp_flags)),
                ("icmp_type", offset_of!(RawPolicyEvent, icmp_type)),
                ("icmp_code", offset_of!(RawPolicyEvent, icmp_code)),
                ("pad", offset_of!(RawPolicyEvent, pad)),
            ]
            .into_iter()
            .map(|(name, offset)| (name.to_string(), offset as u64))
            .collect(),
        ),
    ];
    for (object_name, object) in [
        ("bpf_lxc.o", BPF_LXC),
        ("bpf_overlay.o", BPF_OVERLAY),
        ("bpf_host.o", BPF_HOST),
    ] {
        let structs = btf_structs(object);
        for (name, size, members) in &expected {
            let (c_size, c_members) = structs
                .get(*name)
                .unwrap_or_else(|| panic!("struct {name} missing from the BTF of {object_name}"));
            assert_eq!(c_size, size, "sizeof(struct {name}) in {object_name}");
            assert_eq!(
                c_members, members,
                "members of struct {name} in {object_name}"
            );
        }
    }
    // IPv6 events come from the pods' hooks (lib/ipv6.h) only; the other objects write
    // theirs straight into the ring and carry no BTF of the struct.
    let (name, size, members) = layout!("policy_event6", RawPolicyEvent6, [base, saddr6, daddr6]);
    let structs = btf_structs(BPF_LXC);
    let (c_size, c_members) = structs
        .get(name)
        .expect("struct policy_event6 in the BTF of bpf_lxc.o");
    assert_eq!(
        (c_size, c_members),
        (&size, &members),
        "struct policy_event6"
    );
}

/// The services maps of `bpf/lib/lb.h`, in every object that includes it.
#[test]
fn lb_mirrors_match_the_c_structs() {
    let expected = [
        layout!(
            "lb4_key",
            Lb4Key,
            [address, dport, backend_slot, proto, scope, pad]
        ),
        layout!(
            "lb_service",
            LbServiceValue,
            [
                backend_id,
                count,
                rev_nat_index,
                affinity_timeout,
                flags,
                pad
            ]
        ),
        layout!("lb4_backend", Lb4Backend, [address, port, proto, flags]),
        layout!(
            "lb4_reverse_nat",
            Lb4ReverseNat,
            [address, port, proto, pad]
        ),
        layout!(
            "lb_affinity_key",
            LbAffinityKey,
            [client, rev_nat_index, kind, pad]
        ),
        layout!(
            "lb_affinity_value",
            LbAffinityValue,
            [last_used_ns, backend_id, pad]
        ),
        layout!(
            "lb4_src_range_key",
            Lb4SrcRangeKey,
            [prefixlen, rev_nat_index, pad, address]
        ),
        layout!(
            "lb_maglev_key",
            LbMaglevKey,
            [rev_nat_index, scope, pad, slot]
        ),
        layout!(
            "lb_sock_revnat_key",
            LbSockRevnatKey,
            [cookie, address, port, pad]
        ),
        layout!(
            "lb_sock_revnat_value",
            LbSockRevnatValue,
            [address, port, rev_nat_index]
        ),
        layout!("lb_config", LbConfig, [maglev_table_size, hash_seed]),
        layout!(
            "lb6_key",
            Lb6Key,
            [address, dport, backend_slot, proto, scope, pad]
        ),
        layout!("lb6_backend", Lb6Backend, [address, port, proto, flags]),
        layout!(
            "lb6_reverse_nat",
            Lb6ReverseNat,
            [address, port, proto, pad]
        ),
        layout!(
            "lb6_sock_revnat_key",
            Lb6SockRevnatKey,
            [cookie, address, port, pad]
        ),
        layout!(
            "lb6_sock_revnat_value",
            Lb6SockRevnatValue,
            [address, port, rev_nat_index]
        ),
        layout!(
            "lb6_src_range_key",
            Lb6SrcRangeKey,
            [prefixlen, rev_nat_index, pad, address]
        ),
        layout!("node_config6", NodeConfig6, [node_ipv6]),
    ];
    // The tc path's NAT entries (lib/lb_nat.h, lib/lb6_nat.h), in the tc objects.
    let nat = [
        layout!(
            "lb4_nat_key",
            Lb4NatKey,
            [saddr, daddr, sport, dport, proto, dir, pad]
        ),
        layout!(
            "lb4_nat_entry",
            Lb4NatEntry,
            [
                saddr,
                daddr,
                sport,
                dport,
                backend_id,
                rev_nat_index,
                flags,
                pad,
                last_seen
            ]
        ),
        layout!(
            "lb6_nat_key",
            Lb6NatKey,
            [saddr, daddr, sport, dport, proto, dir, pad]
        ),
        layout!(
            "lb6_nat_entry",
            Lb6NatEntry,
            [
                saddr,
                daddr,
                sport,
                dport,
                backend_id,
                rev_nat_index,
                flags,
                pad,
                last_seen
            ]
        ),
    ];
    // The egress gateway maps (lib/egress.h).
    let egress = [
        layout!("egress_key", EgressKey, [prefixlen, saddr, daddr]),
        layout!(
            "egress_value",
            EgressValue,
            [gateway_ip, egress_ip, flags, pad]
        ),
    ];
    let tc = [
        ("bpf_lxc.o", BPF_LXC),
        ("bpf_overlay.o", BPF_OVERLAY),
        ("bpf_host.o", BPF_HOST),
    ];
    let all = [("bpf_sock.o", BPF_SOCK, &expected[..])]
        .into_iter()
        .chain(tc.iter().map(|(n, o)| (*n, *o, &expected[..])))
        .chain(tc.iter().map(|(n, o)| (*n, *o, &nat[..])))
        .chain(tc.iter().map(|(n, o)| (*n, *o, &egress[..])));
    for (object_name, object, expected) in all {
        let structs = btf_structs(object);
        for (name, size, members) in expected {
            let (c_size, c_members) = structs
                .get(*name)
                .unwrap_or_else(|| panic!("struct {name} missing from the BTF of {object_name}"));
            assert_eq!(c_size, size, "sizeof(struct {name}) in {object_name}");
            assert_eq!(
                c_members, members,
                "members of struct {name} in {object_name}"
            );
        }
    }
    assert_eq!(
        std::mem::size_of::<aya::maps::lpm_trie::Key<Lb4SrcRangePrefix>>(),
        std::mem::size_of::<Lb4SrcRangeKey>()
    );
    assert_eq!(
        std::mem::size_of::<aya::maps::lpm_trie::Key<Lb6SrcRangePrefix>>(),
        std::mem::size_of::<Lb6SrcRangeKey>()
    );
}

#[test]
fn policy_lpm_prefix_is_the_key_after_its_prefixlen() {
    assert_eq!(
        std::mem::size_of::<PolicyPrefix>() + 4,
        std::mem::size_of::<PolicyKey>()
    );
    assert_eq!(
        offset_of!(PolicyPrefix, peer_identity) + 4,
        offset_of!(PolicyKey, peer_identity)
    );
    assert_eq!(
        offset_of!(PolicyPrefix, dport) + 4,
        offset_of!(PolicyKey, dport)
    );
}

#[test]
fn lpm_prefix_is_the_key_after_its_prefixlen() {
    assert_eq!(
        std::mem::size_of::<IpcachePrefix>() + 4,
        std::mem::size_of::<IpcacheKey>()
    );
    assert_eq!(
        offset_of!(IpcachePrefix, family) + 4,
        offset_of!(IpcacheKey, family)
    );
    assert_eq!(
        offset_of!(IpcachePrefix, addr) + 4,
        offset_of!(IpcacheKey, addr)
    );
}
