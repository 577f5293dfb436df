/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Services (the kube-proxy replacement): every load-balancing map's key and
 * value, defined once, and the lookups the socket and tc paths share. The
 * Rust mirrors live in datapath/src/bpf/maps/layout.rs (tests/bpf_map_layout.rs
 * compares both through BTF); the agent's services step writes every map but
 * lb_affinity and lb_sock_revnat, which the programs fill.
 *
 * Shape, as Cilium's lb4/lb6 maps:
 * - lb_services: (frontend address, port, protocol, scope, slot) →
 *   slot 0: the service (backend count, rev-nat index, flags, affinity
 *   timeout); slot 1..count: one backend id each.
 * - lb_backends: backend id → address, port, protocol.
 * - lb_revnat: rev-nat index → the frontend (reverse translation).
 * - lb6_services, lb6_backends, lb6_revnat, lb6_sock_revnat: the same for
 *   IPv6 frontends and backends, in maps of their own (as Cilium) so the IPv4
 *   keys and the tc path that reads them stay as small as they are. Backend
 *   ids and rev-nat indexes are one numbering across both families (the agent
 *   assigns them), so the maps keyed by them alone — lb_affinity, lb_maglev —
 *   serve both families, and a frontend only ever has backends of its own
 *   family.
 * - lb_affinity: (client, rev-nat index) → backend id, last used (LRU).
 * - lb_source_ranges: LPM (rev-nat index, client prefix) → allowed; its IPv6
 *   twin lb6_source_ranges for the ranges of IPv6 frontends.
 * - lb_maglev: (rev-nat index, scope, table slot) → backend id, the Maglev
 *   lookup table of a service (absent: random selection).
 * - lb_netns: netns cookie → present: the network namespaces (the node's and
 *   its pods') whose sockets this node's socket LB translates.
 * - lb_sock_revnat: (socket cookie, backend) → frontend, so recvmsg and
 *   getpeername show the address the application connected to.
 * The service value (struct lb_service) carries no address, so both
 * families' service maps share it. */
#pragma once

#include "common.h"
#include "maps.h"

/* Lookup scopes: external (NodePort/LoadBalancer/externalIP traffic from
 * outside the node; with externalTrafficPolicy=Local only local backends) and
 * internal (in-cluster clients of such a service: every backend). A service
 * has an internal-scope entry only when its scopes differ (SVC_F_TWO_SCOPES). */
#define LB_SCOPE_EXTERNAL 0
#define LB_SCOPE_INTERNAL 1

#define SVC_F_NODEPORT 0x01 /* a NodePort frontend (also its wildcard 0.0.0.0 entry) */
#define SVC_F_EXTERNAL 0x02 /* LoadBalancer IP or externalIP */
#define SVC_F_TWO_SCOPES 0x04 /* an internal-scope entry exists */
#define SVC_F_AFFINITY 0x08 /* client-IP session affinity */
#define SVC_F_SOURCE_RANGES 0x10 /* loadBalancerSourceRanges apply */
#define SVC_F_MAGLEV 0x20 /* Maglev selection (lb_maglev), else random */
#define SVC_F_LOCAL_ONLY 0x40 /* the scope's backends are local only (a Local policy) */
/* An empty scope whose service has backends on other nodes (a Local policy):
 * packets are dropped, not rejected, as kube-proxy does ("has no local
 * endpoints"). */
#define SVC_F_DROP_EMPTY 0x80

struct lb4_key {
	__be32 address; /* 0 for the wildcard NodePort entry */
	__be16 dport;
	__u16 backend_slot; /* 0: the service itself */
	__u8 proto;
	__u8 scope;
	__u8 pad[2];
};

struct lb_service {
	__u32 backend_id; /* slot >= 1 */
	__u16 count; /* slot 0: backends taking new connections (0: reject) */
	__u16 rev_nat_index;
	__u32 affinity_timeout; /* seconds */
	__u8 flags;
	__u8 pad[3];
};

struct lb6_key {
	__be32 address[4]; /* all zero (::) for the wildcard NodePort entry */
	__be16 dport;
	__u16 backend_slot; /* 0: the service itself */
	__u8 proto;
	__u8 scope;
	__u8 pad[2];
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags; /* BE_F_* */
};

/* The backend is on this node. */
#define BE_F_LOCAL 0x01

struct lb6_backend {
	__be32 address[4];
	__be16 port;
	__u8 proto;
	__u8 flags; /* BE_F_* */
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct lb6_reverse_nat {
	__be32 address[4];
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* Client-IP affinity. Socket LB knows no source address at connect: it keys
 * by the client's netns cookie (one pod, one address; as Cilium does). The tc
 * path's IPv6 clients key by their address folded to 64 bits. */
#define AFFINITY_BY_NETNS 1
#define AFFINITY_BY_ADDR6 2
struct lb_affinity_key {
	__u64 client; /* IPv4 address (network order, low 32 bits) or netns cookie */
	__u16 rev_nat_index;
	__u8 kind; /* 0: IPv4 address, AFFINITY_BY_NETNS: netns cookie, AFFINITY_BY_ADDR6 */
	__u8 pad[5];
};

struct lb_affinity_value {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};

/* LPM key: the rev-nat index (+ pad) is always matched, then the prefix. */
#define LB_SRC_RANGE_STATIC_PREFIX 32
struct lb4_src_range_key {
	__u32 prefixlen;
	__u16 rev_nat_index;
	__u16 pad;
	__be32 address;
};

/* The same for IPv6 clients of IPv6 frontends (lb6_source_ranges). */
struct lb6_src_range_key {
	__u32 prefixlen;
	__u16 rev_nat_index;
	__u16 pad;
	__be32 address[4];
};

struct lb_maglev_key {
	__u16 rev_nat_index;
	__u8 scope;
	__u8 pad;
	__u32 slot; /* 0..M-1 */
};

struct lb_sock_revnat_key {
	__u64 cookie; /* bpf_get_socket_cookie */
	__be32 address; /* backend */
	__be16 port;
	__u16 pad;
};

struct lb_sock_revnat_value {
	__be32 address; /* frontend */
	__be16 port;
	__u16 rev_nat_index;
};

struct lb6_sock_revnat_key {
	__u64 cookie;
	__be32 address[4]; /* backend */
	__be16 port;
	__u8 pad[6];
};

struct lb6_sock_revnat_value {
	__be32 address[4]; /* frontend */
	__be16 port;
	__u16 rev_nat_index;
};

/* lb_netns values. */
#define NETNS_NODE 1 /* the node's own namespace (host network) */
#define NETNS_POD 2

#define LB_SERVICES_MAX_ENTRIES 65536
#define LB_BACKENDS_MAX_ENTRIES 65536
#define LB_REVNAT_MAX_ENTRIES 65536
#define LB_AFFINITY_MAX_ENTRIES 65536
#define LB_SOURCE_RANGES_MAX_ENTRIES 4096
#define LB_MAGLEV_MAX_ENTRIES 65536
#define LB_NETNS_MAX_ENTRIES 8192
#define LB_SOCK_REVNAT_MAX_ENTRIES 131072

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb_service);
	__uint(max_entries, LB_SERVICES_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB_BACKENDS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, LB_REVNAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_revnat SEC(".maps");

/* The IPv6 maps: as their IPv4 namesakes, same sizes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb6_key);
	__type(value, struct lb_service);
	__uint(max_entries, LB_SERVICES_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb6_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb6_backend);
	__uint(max_entries, LB_BACKENDS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb6_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb6_reverse_nat);
	__uint(max_entries, LB_REVNAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb6_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb6_sock_revnat_key);
	__type(value, struct lb6_sock_revnat_value);
	__uint(max_entries, LB_SOCK_REVNAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb6_sock_revnat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity_value);
	__uint(max_entries, LB_AFFINITY_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb4_src_range_key);
	__type(value, __u8);
	__uint(max_entries, LB_SOURCE_RANGES_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_source_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lb6_src_range_key);
	__type(value, __u8);
	__uint(max_entries, LB_SOURCE_RANGES_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb6_source_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_maglev_key);
	__type(value, __u32);
	__uint(max_entries, LB_MAGLEV_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, __u8);
	__uint(max_entries, LB_NETNS_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_sock_revnat_key);
	__type(value, struct lb_sock_revnat_value);
	__uint(max_entries, LB_SOCK_REVNAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_sock_revnat SEC(".maps");

/* lb_config: one entry (index 0) written by the agent. */
struct lb_config {
	__u32 maglev_table_size; /* M, prime */
	__u32 hash_seed; /* shared by every agent, so Maglev picks agree across nodes */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct lb_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_config SEC(".maps");

/* The service entry (slot 0) of a frontend in `scope`. */
static __always_inline struct lb_service *lb4_lookup_service(__be32 address, __be16 dport,
							      __u8 proto, __u8 scope)
{
	struct lb4_key key = {
		.address = address,
		.dport = dport,
		.proto = proto,
		.scope = scope,
	};

	return bpf_map_lookup_elem(&lb_services, &key);
}

/* jhash-style mixing of three words (Bob Jenkins' final mix). */
static __always_inline __u32 lb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((-shift) & 31));
}

static __always_inline __u32 lb_hash3(__u32 a, __u32 b, __u32 c, __u32 seed)
{
	a += 0xdeadbeef + seed;
	b += 0xdeadbeef + seed;
	c += 0xdeadbeef + seed;
	c ^= b;
	c -= lb_rol32(b, 14);
	a ^= c;
	a -= lb_rol32(c, 11);
	b ^= a;
	b -= lb_rol32(a, 25);
	c ^= b;
	c -= lb_rol32(b, 16);
	a ^= c;
	a -= lb_rol32(c, 4);
	b ^= a;
	b -= lb_rol32(a, 14);
	c ^= b;
	c -= lb_rol32(b, 24);
	return c;
}

/* The backend id in `slot` (1..count) of the service keyed like `svc_key`. */
static __always_inline __u32 lb4_slot_backend(const struct lb4_key *svc_key, __u16 slot)
{
	struct lb4_key key = *svc_key;
	struct lb_service *entry;

	key.backend_slot = slot;
	entry = bpf_map_lookup_elem(&lb_services, &key);
	return entry ? entry->backend_id : 0;
}

static __always_inline __u32 lb6_slot_backend(const struct lb6_key *svc_key, __u16 slot)
{
	struct lb6_key key = *svc_key;
	struct lb_service *entry;

	key.backend_slot = slot;
	entry = bpf_map_lookup_elem(&lb6_services, &key);
	return entry ? entry->backend_id : 0;
}

/* The family-independent half of picking a backend for a new connection:
 * the Maglev table's backend id when the service has a table (hash of
 * `flow_hash`), else 0 with *slot set to a random slot (1..count) whose
 * backend the caller looks up in its family's service map. 0 and slot 0 when
 * the service has no backend. */
static __always_inline __u32 lb_select(const struct lb_service *svc, __u8 scope,
				       __u32 flow_hash, __u16 *slot)
{
	*slot = 0;
	if (!svc->count)
		return 0;
	if (svc->flags & SVC_F_MAGLEV) {
		__u32 zero = 0;
		struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);

		if (cfg && cfg->maglev_table_size) {
			struct lb_maglev_key mkey = {
				.rev_nat_index = svc->rev_nat_index,
				.scope = scope,
				.slot = flow_hash % cfg->maglev_table_size,
			};
			__u32 *backend_id = bpf_map_lookup_elem(&lb_maglev, &mkey);

			if (backend_id && *backend_id)
				return *backend_id;
		}
		/* No table (yet): random, never a failed connection. */
	}
	*slot = (bpf_get_prandom_u32() % svc->count) + 1;
	return 0;
}

/* Picks a backend id for a new connection (lb_select, then the slot's
 * backend); 0 when the service has no backend. */
static __always_inline __u32 lb4_select_backend(const struct lb4_key *svc_key,
						const struct lb_service *svc, __u32 flow_hash)
{
	__u16 slot;
	__u32 id = lb_select(svc, svc_key->scope, flow_hash, &slot);

	return id ? id : (slot ? lb4_slot_backend(svc_key, slot) : 0);
}

static __always_inline __u32 lb6_select_backend(const struct lb6_key *svc_key,
						const struct lb_service *svc, __u32 flow_hash)
{
	__u16 slot;
	__u32 id = lb_select(svc, svc_key->scope, flow_hash, &slot);

	return id ? id : (slot ? lb6_slot_backend(svc_key, slot) : 0);
}

/* The affinity entry's backend when it is still fresh, else 0. */
static __always_inline __u32 lb_affinity_lookup(const struct lb_affinity_key *key,
						const struct lb_service *svc, __u64 now)
{
	struct lb_affinity_value *value = bpf_map_lookup_elem(&lb_affinity, key);

	if (!value)
		return 0;
	if (now - value->last_used_ns > (__u64)svc->affinity_timeout * 1000000000ULL)
		return 0;
	value->last_used_ns = now;
	return value->backend_id;
}

static __always_inline void lb_affinity_update(const struct lb_affinity_key *key,
					       __u32 backend_id, __u64 now)
{
	struct lb_affinity_value value = { .last_used_ns = now, .backend_id = backend_id };

	bpf_map_update_elem(&lb_affinity, key, &value, BPF_ANY);
}

/* Whether `client` may use the service (loadBalancerSourceRanges). */
static __always_inline int lb4_source_allowed(const struct lb_service *svc, __be32 client)
{
	struct lb4_src_range_key key = {
		.prefixlen = LB_SRC_RANGE_STATIC_PREFIX + 32,
		.rev_nat_index = svc->rev_nat_index,
		.address = client,
	};

	if (!(svc->flags & SVC_F_SOURCE_RANGES))
		return 1;
	return bpf_map_lookup_elem(&lb_source_ranges, &key) != NULL;
}

/* Whether IPv6 `client` may use the service (loadBalancerSourceRanges). */
static __always_inline int lb6_source_allowed(const struct lb_service *svc, const __be32 *client)
{
	struct lb6_src_range_key key = {
		.prefixlen = LB_SRC_RANGE_STATIC_PREFIX + 128,
		.rev_nat_index = svc->rev_nat_index,
	};

	if (!(svc->flags & SVC_F_SOURCE_RANGES))
		return 1;
	__builtin_memcpy(key.address, client, 16);
	return bpf_map_lookup_elem(&lb6_source_ranges, &key) != NULL;
}
