/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Every map's key and value, defined once. The Rust mirrors live in
 * datapath/src/bpf/maps.rs; tests/bpf_map_layout.rs compares both through the
 * BTF of the compiled objects. Change a struct here only together with its
 * mirror. All maps are pinned by name in the node's bpffs directory, so the
 * three objects (lxc, overlay, host) share them and an agent restart reopens
 * them. */
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
struct node_config {
	__u32 tunnel_ifindex; /* the collect-metadata VXLAN device */
	__be32 node_ipv4;
	__u32 flags;
	__u32 pad;
};

/* Reserved for issue 6: `policy` (per endpoint: peer identity, port,
 * protocol, direction → verdict), `conntrack`, and the event ring buffer.
 * Their structs go here; lib/policy.h is the only caller. */

#define IPCACHE_MAX_ENTRIES 131072
#define ENDPOINTS_MAX_ENTRIES 8192
#define METRICS_MAX_ENTRIES 1024

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

static __always_inline struct endpoint_info *lookup_endpoint4(__be32 ip4)
{
	struct endpoint_key key = { .family = FAMILY_IPV4 };

	key.addr.ip4 = ip4;
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
