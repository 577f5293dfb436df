/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Every map's key and value, defined once. The Rust mirrors live in
 * datapath/src/bpf/maps/layout.rs; tests/bpf_map_layout.rs compares both
 * through the BTF of the compiled objects. Change a struct here only together
 * with its mirror. All maps are pinned by name in the node's bpffs directory,
 * so the three objects (lxc, overlay, host) share them and an agent restart
 * reopens them. */
#pragma once

#include "common.h"

/* An IPv4 or IPv6 address: IPv4 uses the first 4 bytes of `addr`. */
union addr {
	__be32 ip4;
	__u8 ip6[16];
};

/* ipcache: every known IP/prefix → security identity and where it lives.
 * LPM key: `prefixlen` counts the bits after it, so family + pad (32 bits)
 * are always matched and the address prefix follows. */
#define IPCACHE_STATIC_PREFIX 32
struct ipcache_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	union addr addr;
};

/* tunnel_endpoint == 0: reachable without the overlay (local node, native
 * routing, world). */
#define IPCACHE_F_LOCAL_NODE 0x01
struct ipcache_value {
	__u32 identity;
	__be32 tunnel_endpoint;
	__u8 flags;
	__u8 encrypt_key; /* reserved for transparent encryption */
	__u16 pad;
};

/* endpoints: local pod IP → how to deliver to it. */
struct endpoint_key {
	__u8 family;
	__u8 pad[3];
	union addr addr;
};

struct endpoint_info {
	__u32 ifindex; /* host-side veth */
	__u32 identity;
	__u16 endpoint_id;
	__u16 flags;
	__u8 mac[6]; /* pod-side MAC */
	__u8 node_mac[6]; /* host-side veth MAC */
};

/* metrics: packets and bytes per reason and direction, per CPU. */
struct metrics_key {
	__u8 reason;
	__u8 dir;
	__u16 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* node_config: one entry (index 0) written by the agent. */
#define NODE_F_TUNNEL 0x01
/* Audit mode: would-be policy drops are counted, reported and passed. */
#define NODE_F_POLICY_AUDIT 0x02
/* IPv6 is judged by policy and conntrack (lib/ipv6.h); unset, IPv6 of
 * policy-selected endpoints fails closed. The agent sets it with the policy
 * maps holding both families' entries. */
#define NODE_F_IPV6_POLICY 0x04
struct node_config {
	__u32 tunnel_ifindex; /* the collect-metadata VXLAN device */
	__be32 node_ipv4;
	__u32 flags;
	__u32 pad;
};

/* node_config6: one entry (index 0) written by the agent: the node's IPv6
 * address (its IPv6 InternalIP, all zero without one), the source of SNATed
 * IPv6 service connections (lib/lb6_nat.h). A map of its own, so node_config
 * keeps the shape pinned by earlier agents. */
struct node_config6 {
	__u8 node_ipv6[16];
};

/* policy: LPM trie of every local endpoint's rules. Every field up to and
 * including peer_identity is always matched (POLICY_STATIC_PREFIX bits after
 * prefixlen); then protocol + pad1 when the entry names a protocol; then a
 * prefix of the destination port (big-endian, so a port range is a set of
 * aligned blocks). */
#define POLICY_STATIC_PREFIX 64
#define POLICY_PROTO_PREFIX (POLICY_STATIC_PREFIX + 16)
#define POLICY_FULL_PREFIX (POLICY_PROTO_PREFIX + 16)
struct policy_key {
	__u32 prefixlen;
	__u16 endpoint_id; /* host order, = endpoint_info.endpoint_id */
	__u8 direction; /* DIR_INGRESS / DIR_EGRESS */
	__u8 pad0;
	__u32 peer_identity; /* host order; 0 = any peer; >= 1<<24 = node-local CIDR identity */
	__u8 protocol; /* IPPROTO_*; only matched when prefixlen >= POLICY_PROTO_PREFIX */
	__u8 pad1;
	__be16 dport;
};

#define POLICY_VERDICT_ALLOW 1
#define POLICY_VERDICT_DENY 2
struct policy_value {
	__u8 verdict;
	__u8 flags;
	__u16 pad;
	__u32 rule_cookie;
};

/* policy_state: endpoint_id → how the endpoint's policy stands. No entry = no
 * policy at all (everything allowed, still conntracked). */
#define POLICY_F_DEFAULT_DENY_INGRESS 0x01
#define POLICY_F_DEFAULT_DENY_EGRESS 0x02
/* Some policy selects the endpoint (sources, rules or a default deny): an
 * empty ResolvedPolicy still has a state, but selects nothing. IPv6 of a
 * selected endpoint fails closed (lib/ipv6.h). */
#define POLICY_F_SELECTED 0x04
/* The endpoint's policy has deny entries in that direction: without any, the
 * first allowing lookup decides, and a new connection skips the others. */
#define POLICY_F_HAS_DENY_INGRESS 0x08
#define POLICY_F_HAS_DENY_EGRESS 0x10
struct policy_state {
	__u32 revision; /* low 32 bits of the ResolvedPolicy revision: the CT epoch */
	__u32 flags;
};

/* policy_cidrs: LPM trie (key: struct ipcache_key) of every prefix some local
 * endpoint's policy names → its node-local CIDR identity (1<<24 | n); IPv4
 * and IPv6 prefixes apart by the key's family. */
#define IDENTITY_LOCAL_FLAG (1U << 24)
struct policy_cidr_value {
	__u32 identity;
	__u32 pad;
};

/* conntrack: LRU hash. dir = the enforcement point that created the entry
 * (DIR_EGRESS at the sender's from-container, DIR_INGRESS at the receiver's
 * delivery); endpoint_id = that endpoint. Ports in host order; ICMP echo uses
 * the echo id as both ports. */
struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 endpoint_id;
};

/* conntrack6: the IPv6 twin of `conntrack` (same value, same rules). */
struct ct6_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 dir;
	__u16 endpoint_id;
};

#define CT_F_SEEN_REPLY 0x01
#define CT_F_CLOSING 0x02 /* TCP: RST, or FIN in both directions */
#define CT_F_AUDIT 0x04 /* admitted only because of audit mode */
#define CT_F_FIN_FORWARD 0x08 /* TCP: FIN seen in the forward direction */
#define CT_F_FIN_REPLY 0x10 /* TCP: FIN seen in the reply direction */
struct ct_value {
	__u64 created_ns; /* bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 last_seen_ns;
	__u32 policy_revision;
	__u8 flags;
	__u8 pad[3];
	__u64 packets;
	/* policy_config.epoch when the entry was last known to match the
	 * endpoint's revision: while it still equals the current epoch, no
	 * policy_state lookup is needed (see policy_enforce). */
	__u32 policy_epoch;
	__u32 pad2;
};

/* policy_config: one entry (index 0) written by the agent's policy step.
 * epoch: bumped after every change of a policy_state revision, so an
 * established connection stamped with the current epoch needs no policy
 * lookup at all. event_mode / event_interval_ns: which allow verdicts reach
 * the events ring (drops and audit verdicts always do). */
#define POLICY_EVENTS_AGGREGATE 0 /* first packet of a flow, then at most every interval */
#define POLICY_EVENTS_ALL 1 /* every new connection */
#define POLICY_EVENTS_DROPS 2 /* no allow verdicts */
struct policy_config {
	__u32 epoch;
	__u32 event_mode;
	__u64 event_interval_ns;
};

/* policy_flows: LRU hash, the last allow verdict reported per flow (an
 * aggregate of connections: the source port is not part of it). */
struct policy_flow_key {
	__u32 peer_identity;
	__u16 endpoint_id;
	__u16 dport; /* host order */
	__u8 dir;
	__u8 proto;
	__u8 verdict;
	__u8 pad;
};

/* events: ring buffer of policy verdicts (new connections) and every drop. */
#define EVENT_DROP 1
#define EVENT_POLICY_VERDICT 2
#define EVENT_VERDICT_ALLOW 1
#define EVENT_VERDICT_DENY 2
#define EVENT_VERDICT_AUDIT 3
#define EVENT_MATCH_NONE 0 /* the endpoint has no policy */
#define EVENT_MATCH_L3 1 /* a rule without ports */
#define EVENT_MATCH_L4 2 /* a rule with protocol/ports */
#define EVENT_MATCH_DEFAULT 3 /* no rule: the default of the direction */
#define EVENT_MATCH_CONNTRACK 4 /* an established connection, re-judged */
struct policy_event {
	__u64 ts_ns;
	__u8 type;
	__u8 reason;
	__u8 dir;
	__u8 proto;
	__u8 verdict;
	__u8 match;
	__u16 endpoint_id;
	__u32 src_identity;
	__u32 dst_identity;
	__be32 saddr;
	__be32 daddr;
	__u16 sport;
	__u16 dport;
	__u32 ifindex;
	__u8 tcp_flags; /* TCP: the header's flags byte (FIN 0x01 .. CWR 0x80) */
	__u8 icmp_type; /* ICMP/ICMPv6: the packet's type and code */
	__u8 icmp_code;
	__u8 pad[5];
};

/* An event about IPv6: saddr/daddr of `base` are zero, the addresses follow.
 * The agent tells the two apart by the record's length. */
struct policy_event6 {
	struct policy_event base;
	__u8 saddr6[16];
	__u8 daddr6[16];
};

/* ipv4_frags: LRU hash, the ports of fragmented datagrams, recorded from
 * their first fragment for the ones that carry no transport header. */
struct frag4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

struct frag4_ports {
	__u16 sport; /* host order */
	__u16 dport;
};

/* ipv6_frags: the same for IPv6 (lib/ipv6.h), keyed by the fragment header's
 * 32-bit identification; the value is a struct frag4_ports too. */
struct frag6_key {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 id;
	__u8 proto; /* the fragment header's next header */
	__u8 pad[3];
};

#define IPCACHE_MAX_ENTRIES 131072
#define ENDPOINTS_MAX_ENTRIES 8192
#define METRICS_MAX_ENTRIES 1024
#define POLICY_MAX_ENTRIES 65536
#define POLICY_STATE_MAX_ENTRIES 8192
#define POLICY_CIDRS_MAX_ENTRIES 16384
#define CONNTRACK_MAX_ENTRIES 262144
#define EVENTS_RING_BYTES (256 * 1024)
#define IPV4_FRAGS_MAX_ENTRIES 8192
#define IPV6_FRAGS_MAX_ENTRIES 8192
#define POLICY_FLOWS_MAX_ENTRIES 65536

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, IPCACHE_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, ENDPOINTS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, struct metrics_key);
	__type(value, struct metrics_value);
	__uint(max_entries, METRICS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} metrics SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct node_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct node_config6);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} node_config6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, POLICY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct policy_state);
	__uint(max_entries, POLICY_STATE_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct policy_cidr_value);
	__uint(max_entries, POLICY_CIDRS_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, CONNTRACK_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct6_key);
	__type(value, struct ct_value);
	__uint(max_entries, CONNTRACK_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RING_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct policy_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct policy_flow_key);
	__type(value, __u64);
	__uint(max_entries, POLICY_FLOWS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag4_key);
	__type(value, struct frag4_ports);
	__uint(max_entries, IPV4_FRAGS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipv4_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag6_key);
	__type(value, struct frag4_ports);
	__uint(max_entries, IPV6_FRAGS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipv6_frags SEC(".maps");

static __always_inline struct endpoint_info *lookup_endpoint4(__be32 ip4)
{
	struct endpoint_key key = { .family = FAMILY_IPV4 };

	key.addr.ip4 = ip4;
	return bpf_map_lookup_elem(&endpoints, &key);
}

static __always_inline struct endpoint_info *lookup_endpoint6(const __u8 *ip6)
{
	struct endpoint_key key = { .family = FAMILY_IPV6 };

	__builtin_memcpy(key.addr.ip6, ip6, 16);
	return bpf_map_lookup_elem(&endpoints, &key);
}

static __always_inline struct ipcache_value *lookup_ipcache4(__be32 ip4)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 32,
		.family = FAMILY_IPV4,
	};

	key.addr.ip4 = ip4;
	return bpf_map_lookup_elem(&ipcache, &key);
}

static __always_inline struct ipcache_value *lookup_ipcache6(const __u8 *ip6)
{
	struct ipcache_key key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 128,
		.family = FAMILY_IPV6,
	};

	__builtin_memcpy(key.addr.ip6, ip6, 16);
	return bpf_map_lookup_elem(&ipcache, &key);
}

static __always_inline struct node_config *lookup_node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&node_config, &zero);
}

/* The identity of an IPv4 source seen from this node: the ipcache's answer,
 * or world for anything it does not know. */
static __always_inline __u32 resolve_identity4(__be32 ip4)
{
	struct ipcache_value *info = lookup_ipcache4(ip4);

	return info ? info->identity : IDENTITY_WORLD;
}
