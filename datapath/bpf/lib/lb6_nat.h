/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The tc service path for IPv6: lib/lb_nat.h's per-packet DNAT (and SNAT) with
 * reverse NAT, for IPv6 frontends (lb6_services) and backends (lb6_backends).
 * Same scheme: lb6_nat (LRU) holds a forward and a reply entry per translated
 * connection; a connection keeps its backend for its lifetime; north-south
 * connections to remote backends (externalTrafficPolicy=Cluster) are SNATed to
 * the node's IPv6 address (node_config6) from the same port range; source
 * ranges (lb6_source_ranges), Local policies, hairpin and the reject of a
 * service without backends (TCP RST, ICMPv6 port unreachable) as for IPv4.
 *
 * IPv6 has no header checksum: a changed address is folded into the
 * transport checksum only (its pseudo-header covers both addresses). The
 * transport header is found after extension headers (lib/ipv6.h's parse);
 * a later fragment (no transport header) is not translated.
 *
 * Where it runs: bpf_host.c's from_netdev (traffic from outside the node, and
 * the answers of SNATed connections), bpf_overlay.c's from_overlay (those
 * answers in overlay mode) and the pod hooks of lib/lxc6.h. Translated
 * packets to local backends are routed by the stack into the pod (whose
 * to_container6 judges them, as all IPv6 into pods); answers leave by the
 * FIB. */
#pragma once

#include "common.h"
#include "encap.h"
#include "ipv6.h"
#include "lb.h"
#include "lb_nat_common.h"
#include "maps.h"
#include "metrics.h"

/* Ports in network order. */
struct lb6_nat_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* LB_NAT_FORWARD / LB_NAT_REPLY */
	__u16 pad;
};

struct lb6_nat_entry {
	__be32 saddr[4]; /* rewrite to */
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u32 backend_id;
	__u16 rev_nat_index;
	__u8 flags; /* LB_NAT_F_* */
	__u8 pad;
	__u32 last_seen; /* seconds of CLOCK_MONOTONIC, when a packet last used it */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb6_nat_key);
	__type(value, struct lb6_nat_entry);
	__uint(max_entries, LB_NAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb6_nat SEC(".maps");

struct lb6_tuple {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u16 l4_off;
};

/* The IPv6 part of a reject (after the Ethernet header). */
struct lb6_reject_frame {
	struct ipv6hdr ip;
	union {
		struct tcphdr tcp;
		struct {
			__u8 type;
			__u8 code;
			__sum16 checksum;
			__u32 unused;
			/* The quoted packet: its IPv6 header and first 8 bytes. */
			struct ipv6hdr ip;
			__u8 l4[8];
		} icmp;
	};
};

/* What a translation keeps while it works on one packet: in a per-CPU map,
 * as lib/ipv6.h's scratch, so the pod hooks' stack (their policy state, then
 * this) stays within the verifier's 512 bytes. */
struct lb6_scratch {
	struct lb6_tuple t;
	struct lb6_nat_entry fwd;
	struct lb6_nat_entry rev;
	struct lb6_nat_key key;
	struct lb6_nat_key peer;
	struct lb6_key svc_key;
	struct lb6_reject_frame frame;
	struct {
		struct in6_addr saddr;
		struct in6_addr daddr;
		__be32 len;
		__u8 zero[3];
		__u8 nexthdr;
	} pseudo;
	struct ipv6hdr orig;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct lb6_scratch);
	__uint(max_entries, 1);
} lb6_scratch SEC(".maps");

static __always_inline struct lb6_scratch *lb6_scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&lb6_scratch, &zero);
}

static __always_inline int ip6_equal(const __be32 *a, const __be32 *b)
{
	return !((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]));
}

static __always_inline void ip6_set(__be32 *dst, const __be32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int lb6_tuple_of(const struct l4_info6 *l4, struct lb6_tuple *t)
{
	if ((l4->proto != IPPROTO_TCP && l4->proto != IPPROTO_UDP) || !l4->l4_off)
		return -1;
	__builtin_memcpy(t->saddr, l4->saddr, 16);
	__builtin_memcpy(t->daddr, l4->daddr, 16);
	t->sport = bpf_htons(l4->sport);
	t->dport = bpf_htons(l4->dport);
	t->proto = l4->proto;
	t->l4_off = l4->l4_off;
	return 0;
}

static __always_inline void lb6_nat_key_fill(struct lb6_nat_key *key, const __be32 *saddr,
					     const __be32 *daddr, __be16 sport, __be16 dport,
					     __u8 proto, __u8 dir)
{
	ip6_set(key->saddr, saddr);
	ip6_set(key->daddr, daddr);
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->dir = dir;
	key->pad = 0;
}

/* lb4_nat_peer_key for IPv6: the other direction's key of `e`'s connection. */
static __always_inline void lb6_nat_peer_key(struct lb6_nat_key *key,
					     const struct lb6_nat_entry *e, __u8 proto, __u8 dir)
{
	lb6_nat_key_fill(key, e->daddr, e->saddr, e->dport, e->sport, proto,
			 dir == LB_NAT_FORWARD ? LB_NAT_REPLY : LB_NAT_FORWARD);
}

/* nat4_touch for IPv6; `peer` is room for the other direction's key. */
static __always_inline void lb6_nat_touch(struct lb6_nat_entry *e, const struct l4_info6 *l4,
					  __u8 dir, struct lb6_nat_key *peer_key)
{
	__u32 now = lb_now_s();

	if (e->last_seen != now)
		e->last_seen = now;
	if (l4->proto == IPPROTO_TCP && (l4->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) &&
	    !(e->flags & LB_NAT_F_CLOSING)) {
		struct lb6_nat_entry *peer;

		e->flags |= LB_NAT_F_CLOSING;
		lb6_nat_peer_key(peer_key, e, l4->proto, dir);
		peer = bpf_map_lookup_elem(&lb6_nat, peer_key);
		if (peer)
			peer->flags |= LB_NAT_F_CLOSING;
	}
}

static __always_inline int lb6_nat_idle(const struct lb6_nat_entry *e, __u8 proto, __u32 now)
{
	return lb_nat_idle(e->flags, e->last_seen, proto, now);
}

/* Rewrites the addresses and ports of the packet from `from` to `to`. The
 * addresses' change reaches the transport checksum through its pseudo-header
 * (one bpf_csum_diff over both). Packet pointers are invalid afterwards. */
static __always_inline int lb6_rewrite(struct __sk_buff *skb, const struct lb6_tuple *from,
				       const struct lb6_nat_entry *to)
{
	__u32 l3 = sizeof(struct ethhdr), l4 = from->l4_off, csum_off;
	__u64 l4_flags;
	__s64 sum = 0;

	if (from->proto == IPPROTO_TCP) {
		csum_off = l4 + offsetof(struct tcphdr, check);
		l4_flags = 0;
	} else {
		csum_off = l4 + offsetof(struct udphdr, check);
		l4_flags = BPF_F_MARK_MANGLED_0;
	}
	if (!ip6_equal(from->saddr, to->saddr)) {
		sum = bpf_csum_diff((__be32 *)from->saddr, 16, (__be32 *)to->saddr, 16, 0);
		if (sum < 0 || bpf_skb_store_bytes(skb, l3 + offsetof(struct ipv6hdr, saddr),
						   to->saddr, 16, 0) < 0)
			return -1;
	}
	if (!ip6_equal(from->daddr, to->daddr)) {
		sum = bpf_csum_diff((__be32 *)from->daddr, 16, (__be32 *)to->daddr, 16,
				    (__wsum)sum);
		if (sum < 0 || bpf_skb_store_bytes(skb, l3 + offsetof(struct ipv6hdr, daddr),
						   to->daddr, 16, 0) < 0)
			return -1;
	}
	if (sum && bpf_l4_csum_replace(skb, csum_off, 0, sum, l4_flags | BPF_F_PSEUDO_HDR) < 0)
		return -1;
	if (from->sport != to->sport) {
		if (bpf_l4_csum_replace(skb, csum_off, from->sport, to->sport, l4_flags | 2) < 0 ||
		    bpf_skb_store_bytes(skb, l4, &to->sport, 2, 0) < 0)
			return -1;
	}
	if (from->dport != to->dport) {
		if (bpf_l4_csum_replace(skb, csum_off, from->dport, to->dport, l4_flags | 2) < 0 ||
		    bpf_skb_store_bytes(skb, l4 + 2, &to->dport, 2, 0) < 0)
			return -1;
	}
	return 0;
}

/* lb4_service_of for IPv6: a NodePort is found on a node address (ipcache:
 * host) through its wildcard (::) entry. */
static __always_inline struct lb_service *lb6_service_of(const struct lb6_tuple *t,
							  int scope_internal,
							  struct lb6_key *key)
{
	struct lb_service *svc, *internal;

	__builtin_memset(key, 0, sizeof(*key));
	ip6_set(key->address, t->daddr);
	key->dport = t->dport;
	key->proto = t->proto;
	key->scope = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&lb6_services, key);
	if (!svc) {
		struct ipcache_value *info = lookup_ipcache6((const __u8 *)t->daddr);

		if (!info || info->identity != IDENTITY_HOST)
			return NULL;
		__builtin_memset(key->address, 0, sizeof(key->address));
		svc = bpf_map_lookup_elem(&lb6_services, key);
		if (!svc || !(svc->flags & SVC_F_NODEPORT))
			return NULL;
	}
	if (scope_internal && (svc->flags & SVC_F_TWO_SCOPES)) {
		key->scope = LB_SCOPE_INTERNAL;
		internal = bpf_map_lookup_elem(&lb6_services, key);
		if (internal)
			return internal;
		key->scope = LB_SCOPE_EXTERNAL;
	}
	return svc;
}

static __always_inline __u32 ip6_fold(const __be32 *a)
{
	return a[0] ^ a[1] ^ a[2] ^ a[3];
}

/* lb4_pick for IPv6. */
static __always_inline struct lb6_backend *lb6_pick(const struct lb6_key *key,
						    const struct lb_service *svc,
						    const struct lb6_tuple *t, __u32 *backend_id)
{
	struct lb_affinity_key affinity = {};
	struct lb6_backend *backend = NULL;
	__u64 now = 0;
	__u32 id = 0;

	if (svc->flags & SVC_F_AFFINITY) {
		now = bpf_ktime_get_ns();
		affinity.client = ((__u64)(t->saddr[0] ^ t->saddr[1]) << 32) |
				  (t->saddr[2] ^ t->saddr[3]);
		affinity.kind = AFFINITY_BY_ADDR6;
		affinity.rev_nat_index = svc->rev_nat_index;
		id = lb_affinity_lookup(&affinity, svc, now);
		if (id)
			backend = bpf_map_lookup_elem(&lb6_backends, &id);
	}
	if (!backend) {
		__u32 zero = 0, seed = 0;
		struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);

		if (cfg)
			seed = cfg->hash_seed;
		id = lb6_select_backend(key, svc,
					lb_hash3(ip6_fold(t->saddr), ip6_fold(t->daddr),
						 ((__u32)t->sport << 16) | t->dport, seed ^ t->proto));
		if (!id)
			return NULL;
		backend = bpf_map_lookup_elem(&lb6_backends, &id);
		if (backend && (svc->flags & SVC_F_AFFINITY))
			lb_affinity_update(&affinity, id, now);
	}
	*backend_id = id;
	return backend;
}

/* Whether reply entry `held` belongs to the connection of tuple `t`. */
static __always_inline int lb6_held_by(const struct lb6_nat_entry *held,
				       const struct lb6_tuple *t)
{
	return ip6_equal(held->daddr, t->saddr) && held->dport == t->sport &&
	       ip6_equal(held->saddr, t->daddr) && held->sport == t->dport;
}

/* nat4_snat_port for IPv6, in lb6_nat: a source port on `snat_addr` towards
 * the backend, free, this tuple's own, or idle long enough. 0 when none. */
static __always_inline __be16 lb6_snat_port(struct __sk_buff *skb, struct lb6_scratch *s,
					    const __be32 *snat_addr,
					    const struct lb6_backend *backend, __u8 dir)
{
	const struct lb6_tuple *t = &s->t;
	__u32 hash = lb_hash3(ip6_fold(t->saddr), ((__u32)t->sport << 16) | t->dport,
			      ip6_fold(t->daddr), 0);
	__u32 now = lb_now_s();
	int i;

	for (i = 0; i < LB_SNAT_PORT_TRIES; i++) {
		__be16 port = bpf_htons(LB_SNAT_PORT_MIN + (hash + i * 7919) % LB_SNAT_PORT_RANGE);
		struct lb6_nat_entry *held, *holder;

		lb6_nat_key_fill(&s->key, backend->address, snat_addr, backend->port, port,
				 t->proto, LB_NAT_REPLY);
		held = bpf_map_lookup_elem(&lb6_nat, &s->key);
		if (!held || lb6_held_by(held, t))
			return port;
		if (!lb6_nat_idle(held, t->proto, now))
			continue;
		lb6_nat_peer_key(&s->peer, held, t->proto, LB_NAT_REPLY);
		holder = bpf_map_lookup_elem(&lb6_nat, &s->peer);
		if (holder && ip6_equal(holder->saddr, snat_addr) && holder->sport == port &&
		    ip6_equal(holder->daddr, backend->address) && holder->dport == backend->port) {
			if (!lb6_nat_idle(holder, t->proto, now))
				continue;
			bpf_map_delete_elem(&lb6_nat, &s->peer);
		}
		metrics_count(skb, REASON_LB_SNAT_PORT_REUSED, dir);
		return port;
	}
	return 0;
}

/* lb4_reply_clash for IPv6, of the connection `s->t` → `s->fwd`. */
static __always_inline int lb6_reply_clash(struct lb6_scratch *s)
{
	const struct lb6_nat_entry *fwd = &s->fwd;
	struct lb6_nat_entry *held;

	lb6_nat_key_fill(&s->key, fwd->daddr, fwd->saddr, fwd->dport, fwd->sport, s->t.proto,
			 LB_NAT_REPLY);
	held = bpf_map_lookup_elem(&lb6_nat, &s->key);
	if (!held || lb6_held_by(held, &s->t))
		return 0;
	return !lb6_nat_idle(held, s->t.proto, lb_now_s());
}

/* nat4_create for IPv6: both directions of the new connection `s->t` →
 * `s->fwd`. */
static __always_inline int lb6_nat_create(struct lb6_scratch *s)
{
	const struct lb6_tuple *t = &s->t;
	const struct lb6_nat_entry *fwd = &s->fwd;
	struct lb6_nat_entry *rev = &s->rev;

	__builtin_memset(rev, 0, sizeof(*rev));
	ip6_set(rev->saddr, t->daddr);
	ip6_set(rev->daddr, t->saddr);
	rev->sport = t->dport;
	rev->dport = t->sport;
	rev->backend_id = fwd->backend_id;
	rev->rev_nat_index = fwd->rev_nat_index;
	rev->flags = fwd->flags;
	rev->last_seen = fwd->last_seen;
	lb6_nat_key_fill(&s->key, fwd->daddr, fwd->saddr, fwd->dport, fwd->sport, t->proto,
			 LB_NAT_REPLY);
	if (bpf_map_update_elem(&lb6_nat, &s->key, rev, BPF_ANY) < 0)
		return -1;
	lb6_nat_key_fill(&s->key, t->saddr, t->daddr, t->sport, t->dport, t->proto,
			 LB_NAT_FORWARD);
	return bpf_map_update_elem(&lb6_nat, &s->key, fwd, BPF_ANY);
}

/* The node's IPv6 address (node_config6), or NULL without one. */
static __always_inline const __be32 *lb6_node_address(void)
{
	__u32 zero = 0;
	struct node_config6 *cfg = bpf_map_lookup_elem(&node_config6, &zero);
	const __be32 *a;

	if (!cfg)
		return NULL;
	a = (const __be32 *)cfg->node_ipv6;
	return (a[0] | a[1] | a[2] | a[3]) ? a : NULL;
}

/* lb4_forward for IPv6 (LB_* verdicts). A subprogram whose state lives in
 * lb6_scratch. */
static __noinline __attribute__((unused)) int lb6_forward(struct __sk_buff *skb,
							  const struct l4_info6 *l4,
							  int north_south)
{
	struct lb6_scratch *s = lb6_scratch_get();
	struct lb6_nat_entry *known, *fwd;
	struct lb6_backend *backend;
	struct lb_service *svc;
	struct lb6_tuple *t;
	__u32 backend_id = 0;
	__u8 dir = north_south ? DIR_INGRESS : DIR_EGRESS;

	if (!s)
		return LB_ERROR;
	t = &s->t;
	fwd = &s->fwd;
	if (lb6_tuple_of(l4, t) < 0)
		return LB_PASS;
	lb6_nat_key_fill(&s->key, t->saddr, t->daddr, t->sport, t->dport, t->proto,
			 LB_NAT_FORWARD);
	known = bpf_map_lookup_elem(&lb6_nat, &s->key);
	/* As lb4_forward: only a SYN on a closed tuple (or whose backend is gone)
	 * is judged afresh. */
	if (known && (t->proto != IPPROTO_TCP ||
		      (l4->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN ||
		      (!(known->flags & LB_NAT_F_CLOSING) &&
		       bpf_map_lookup_elem(&lb6_backends, &known->backend_id)))) {
		lb6_nat_touch(known, l4, LB_NAT_FORWARD, &s->peer);
		return lb6_rewrite(skb, t, known) < 0 ? LB_ERROR : LB_TRANSLATED;
	}
	svc = lb6_service_of(t, !north_south, &s->svc_key);
	if (!svc)
		return LB_PASS;
	if (north_south && !lb6_source_allowed(svc, t->saddr))
		return LB_DENIED;
	if (!svc->count)
		return (svc->flags & SVC_F_DROP_EMPTY) ? LB_NO_LOCAL_BACKEND : LB_NO_BACKEND;
	backend = lb6_pick(&s->svc_key, svc, t, &backend_id);
	if (!backend)
		return LB_NO_BACKEND;
	__builtin_memset(fwd, 0, sizeof(*fwd));
	ip6_set(fwd->saddr, t->saddr);
	fwd->sport = t->sport;
	ip6_set(fwd->daddr, backend->address);
	fwd->dport = backend->port;
	fwd->backend_id = backend_id;
	fwd->rev_nat_index = svc->rev_nat_index;
	fwd->last_seen = lb_now_s();
	if (!north_south && ip6_equal(backend->address, t->saddr)) {
		/* Hairpin: the pod sees the frontend as its peer. */
		ip6_set(fwd->saddr, t->daddr);
		fwd->flags |= LB_NAT_F_HAIRPIN;
	}
	if (north_south) {
		const __be32 *node = lb6_node_address();

		fwd->flags |= LB_NAT_F_NORTH_SOUTH;
		/* Replies of a remote backend must come back here to be reversed. */
		if (!(backend->flags & BE_F_LOCAL) && node) {
			__be16 port = lb6_snat_port(skb, s, node, backend, dir);

			if (!port)
				return LB_ERROR;
			ip6_set(fwd->saddr, node);
			fwd->sport = port;
			fwd->flags |= LB_NAT_F_SNAT;
		}
	}
	/* The client's address is kept; its port is remapped on a clash. */
	if (!(fwd->flags & LB_NAT_F_SNAT) && lb6_reply_clash(s)) {
		__be16 port = lb6_snat_port(skb, s, fwd->saddr, backend, dir);

		if (!port)
			return LB_ERROR;
		fwd->sport = port;
		metrics_count(skb, REASON_LB_CLIENT_PORT_REMAPPED, dir);
	}
	if (lb6_nat_create(s) < 0)
		return LB_ERROR;
	return lb6_rewrite(skb, t, fwd) < 0 ? LB_ERROR : LB_TRANSLATED;
}

/* lb4_is_reply for IPv6: the reply entry's flags + 1, or 0. */
static __always_inline int lb6_is_reply(const struct l4_info6 *l4)
{
	struct lb6_scratch *s = lb6_scratch_get();
	struct lb6_nat_entry *rev;

	if (!s || lb6_tuple_of(l4, &s->t) < 0)
		return 0;
	lb6_nat_key_fill(&s->key, s->t.saddr, s->t.daddr, s->t.sport, s->t.dport, s->t.proto,
			 LB_NAT_REPLY);
	rev = bpf_map_lookup_elem(&lb6_nat, &s->key);
	return rev ? rev->flags + 1 : 0;
}

/* lb4_reverse for IPv6: the entry's flags + 1 when rewritten, 0 when the
 * packet answers no translated connection, -1 on error. */
static __noinline __attribute__((unused)) int lb6_reverse(struct __sk_buff *skb,
							  const struct l4_info6 *l4)
{
	struct lb6_scratch *s = lb6_scratch_get();
	struct lb6_nat_entry *rev;

	if (!s || lb6_tuple_of(l4, &s->t) < 0)
		return 0;
	lb6_nat_key_fill(&s->key, s->t.saddr, s->t.daddr, s->t.sport, s->t.dport, s->t.proto,
			 LB_NAT_REPLY);
	rev = bpf_map_lookup_elem(&lb6_nat, &s->key);
	if (!rev)
		return 0;
	lb6_nat_touch(rev, l4, LB_NAT_REPLY, &s->peer);
	if (lb6_rewrite(skb, &s->t, rev) < 0)
		return -1;
	return rev->flags + 1;
}

/* The IPv6 header in the linear area, or NULL. */
static __always_inline struct ipv6hdr *lb6_pull_ipv6(struct __sk_buff *skb)
{
	const __u32 need = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	void *data, *data_end;

	if (bpf_skb_pull_data(skb, need) < 0)
		return NULL;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + need > data_end)
		return NULL;
	return data + sizeof(struct ethhdr);
}

/* lb4_redirect_fib for IPv6: the hop limit decremented as a router does. */
static __always_inline int lb6_redirect_fib(struct __sk_buff *skb, __u8 dir)
{
	struct bpf_fib_lookup fib = {};
	struct ipv6hdr *ip6 = lb6_pull_ipv6(skb);
	long rc;

	if (!ip6)
		return drop(skb, DROP_INVALID_PACKET, dir);
	if (ip6->hop_limit <= 1)
		return drop(skb, DROP_TTL_EXCEEDED, dir);
	ip6->hop_limit--;
	fib.family = FAMILY_IPV6;
	fib.l4_protocol = ip6->nexthdr;
	fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(skb, DROP_LB_NO_ROUTE, dir);
	metrics_count(skb, REASON_LB_TRANSLATED, dir);
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

/* lb4_to_remote for IPv6: through the overlay when the backend is behind a
 * tunnel endpoint, else by the FIB (native routing). */
static __always_inline int lb6_to_remote(struct __sk_buff *skb, __u32 src_identity, __u8 dir)
{
	struct ipcache_value *info;
	struct ipv6hdr *ip6 = lb6_pull_ipv6(skb);

	if (!ip6)
		return drop(skb, DROP_INVALID_PACKET, dir);
	info = lookup_ipcache6((const __u8 *)&ip6->daddr);
	if (info && info->tunnel_endpoint) {
		if (ip6->hop_limit <= 1)
			return drop(skb, DROP_TTL_EXCEEDED, dir);
		ip6->hop_limit--;
		return encap_and_redirect(skb, info->tunnel_endpoint, src_identity, dir);
	}
	return lb6_redirect_fib(skb, dir);
}

/* lb4_reject for IPv6: a TCP SYN is answered with RST|ACK, a UDP datagram
 * with ICMPv6 destination unreachable (port unreachable), out of the device
 * it came in on. Anything else, and packets with extension headers, are
 * dropped. */
static __noinline __attribute__((unused)) int lb6_reject(struct __sk_buff *skb,
							 const struct l4_info6 *l4, __u8 dir)
{
	const __u32 l3 = sizeof(struct ethhdr), l4_off = l3 + sizeof(struct ipv6hdr);
	struct lb6_scratch *s = lb6_scratch_get();
	struct lb6_reject_frame *f;
	struct ethhdr eth;
	__u8 orig_l4[8];
	__u8 mac[ETH_ALEN];
	__u32 len, sum;

	if (!s || l4->l4_off != l4_off || bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, l3, &s->orig, sizeof(s->orig)) < 0 ||
	    bpf_skb_load_bytes(skb, l4_off, orig_l4, sizeof(orig_l4)) < 0)
		return drop(skb, DROP_LB_NO_BACKEND, dir);
	f = &s->frame;
	__builtin_memset(f, 0, sizeof(*f));
	__builtin_memset(&s->pseudo, 0, sizeof(s->pseudo));
	if (l4->proto == IPPROTO_TCP) {
		struct tcphdr *in = (struct tcphdr *)orig_l4;
		__u32 seq;

		if ((l4->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN ||
		    bpf_skb_load_bytes(skb, l4_off + 4, &seq, 4) < 0)
			return drop(skb, DROP_LB_NO_BACKEND, dir);
		f->tcp.source = in->dest;
		f->tcp.dest = in->source;
		f->tcp.ack_seq = bpf_htonl(bpf_ntohl(seq) + 1);
		f->tcp.doff = 5;
		f->tcp.rst = 1;
		f->tcp.ack = 1;
		len = sizeof(struct tcphdr);
		s->pseudo.nexthdr = IPPROTO_TCP;
	} else if (l4->proto == IPPROTO_UDP) {
		f->icmp.type = ICMPV6_DEST_UNREACH;
		f->icmp.code = 4; /* port unreachable */
		f->icmp.ip = s->orig;
		__builtin_memcpy(f->icmp.l4, orig_l4, sizeof(orig_l4));
		len = 8 + sizeof(struct ipv6hdr) + 8;
		s->pseudo.nexthdr = IPPROTO_ICMPV6;
	} else {
		return drop(skb, DROP_LB_NO_BACKEND, dir);
	}
	__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	f->ip.version = 6;
	f->ip.hop_limit = 64;
	f->ip.nexthdr = s->pseudo.nexthdr;
	f->ip.payload_len = bpf_htons(len);
	f->ip.saddr = s->orig.daddr;
	f->ip.daddr = s->orig.saddr;
	/* The transport checksum covers the pseudo-header (RFC 8200 §8.1). */
	s->pseudo.saddr = f->ip.saddr;
	s->pseudo.daddr = f->ip.daddr;
	s->pseudo.len = bpf_htonl(len);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&s->pseudo, sizeof(s->pseudo), 0);
	if (l4->proto == IPPROTO_TCP) {
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&f->tcp, sizeof(f->tcp), sum);
		f->tcp.check = csum_fold32(sum);
	} else {
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&f->icmp, sizeof(f->icmp), sum);
		f->icmp.checksum = csum_fold32(sum);
	}
	len += sizeof(struct ipv6hdr);
	if (bpf_skb_change_tail(skb, l3 + len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, l3, f, len, 0) < 0)
		return drop(skb, DROP_LB_NO_BACKEND, dir);
	metrics_count(skb, REASON_LB_REJECTED, dir);
	return bpf_redirect(skb->ifindex, 0);
}
