/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The tc service path: per-packet DNAT (and SNAT) with reverse NAT, for what the
 * socket LB does not see: traffic from outside the node (NodePort on a node
 * address, LoadBalancer IPs, externalIPs, at the uplink's from_netdev) and pod
 * traffic sent to a frontend by a process outside the socket LB's cgroup (at
 * from_container).
 *
 * lb_nat (LRU) holds two entries per translated connection: the forward one,
 * keyed by the tuple as the client sent it, says what to rewrite it to; the
 * reply one, keyed by the tuple the backend answers with, says what to
 * rewrite the answer to. A connection keeps its backend for its lifetime,
 * whatever later happens to the service: established connections survive a
 * backend change, only new ones see it.
 *
 * North-south to a remote backend (externalTrafficPolicy=Cluster) is SNATed to
 * the node's address so the reply comes back through this node; a local
 * backend (and every Local-policy backend) sees the client's address, with
 * its port remapped only when another connection holds that tuple. A pod
 * reaching itself through a service (hairpin) sees the frontend address as
 * the source of its own connection. */
#pragma once

#include "common.h"
#include "encap.h"
#include "lb.h"
#include "lb_nat_common.h"
#include "maps.h"
#include "metrics.h"

/* Ports in network order. */
struct lb4_nat_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* LB_NAT_FORWARD / LB_NAT_REPLY */
	__u16 pad;
};

struct lb4_nat_entry {
	__be32 saddr; /* rewrite to */
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 backend_id;
	__u16 rev_nat_index;
	__u8 flags;
	__u8 pad;
	__u32 last_seen; /* seconds of CLOCK_MONOTONIC, when a packet last used it */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_nat_key);
	__type(value, struct lb4_nat_entry);
	__uint(max_entries, LB_NAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_nat SEC(".maps");

/* The tuple of a TCP/UDP packet, as the NAT map keys it. */
struct lb4_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
};

static __always_inline int lb4_tuple_of(const struct l4_info *l4, struct lb4_tuple *t)
{
	if (l4->proto != IPPROTO_TCP && l4->proto != IPPROTO_UDP)
		return -1;
	t->saddr = l4->saddr;
	t->daddr = l4->daddr;
	t->sport = bpf_htons(l4->sport);
	t->dport = bpf_htons(l4->dport);
	t->proto = l4->proto;
	return 0;
}

static __always_inline void lb4_nat_key_fill(struct lb4_nat_key *key, __be32 saddr, __be32 daddr,
					     __be16 sport, __be16 dport, __u8 proto, __u8 dir)
{
	key->saddr = saddr;
	key->daddr = daddr;
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->dir = dir;
	key->pad = 0;
}

/* The key of the other direction's entry of the connection `e` belongs to: an
 * entry says what its packets become, which is the tuple the other side sends
 * with, reversed. */
static __always_inline void lb4_nat_peer_key(struct lb4_nat_key *key, const struct lb4_nat_entry *e,
					     __u8 proto, __u8 dir)
{
	lb4_nat_key_fill(key, e->daddr, e->saddr, e->dport, e->sport, proto,
			 dir == LB_NAT_FORWARD ? LB_NAT_REPLY : LB_NAT_FORWARD);
}

/* A packet used entry `e` (of direction `dir`) of NAT map `nat` (lb_nat, or
 * egress_nat of lib/egress.h, which shares the layout): its idle time restarts
 * (written at most once a second), and a FIN or RST marks both directions
 * closing. */
static __always_inline void nat4_touch(void *nat, struct lb4_nat_entry *e,
				       const struct l4_info *l4, __u8 dir)
{
	__u32 now = lb_now_s();

	if (e->last_seen != now)
		e->last_seen = now;
	if (l4->proto == IPPROTO_TCP && (l4->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) &&
	    !(e->flags & LB_NAT_F_CLOSING)) {
		struct lb4_nat_entry *peer;
		struct lb4_nat_key key;

		e->flags |= LB_NAT_F_CLOSING;
		lb4_nat_peer_key(&key, e, l4->proto, dir);
		peer = bpf_map_lookup_elem(nat, &key);
		if (peer)
			peer->flags |= LB_NAT_F_CLOSING;
	}
}

static __always_inline void lb4_nat_touch(struct lb4_nat_entry *e, const struct l4_info *l4,
					  __u8 dir)
{
	nat4_touch(&lb_nat, e, l4, dir);
}

/* Whether entry `e` has been idle long enough to give its SNAT port away. */
static __always_inline int lb4_nat_idle(const struct lb4_nat_entry *e, __u8 proto, __u32 now)
{
	return lb_nat_idle(e->flags, e->last_seen, proto, now);
}

/* Rewrites the IPv4 addresses and ports of the packet from `from` to `to`,
 * with incremental checksum updates. Packet pointers are invalid afterwards. */
static __always_inline int lb4_rewrite(struct __sk_buff *skb, const struct lb4_tuple *from,
				       const struct lb4_nat_entry *to)
{
	__u8 ihl_byte;
	__u32 l3 = sizeof(struct ethhdr), l4, csum_off;
	__u64 l4_flags;

	if (bpf_skb_load_bytes(skb, l3, &ihl_byte, 1) < 0)
		return -1;
	l4 = l3 + (ihl_byte & 0x0F) * 4;
	if (from->proto == IPPROTO_TCP) {
		csum_off = l4 + offsetof(struct tcphdr, check);
		l4_flags = 0;
	} else {
		csum_off = l4 + offsetof(struct udphdr, check);
		/* A UDP checksum of 0 means none: leave it so. */
		l4_flags = BPF_F_MARK_MANGLED_0;
	}
	if (from->saddr != to->saddr) {
		if (bpf_l4_csum_replace(skb, csum_off, from->saddr, to->saddr,
					l4_flags | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), from->saddr,
					to->saddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, l3 + offsetof(struct iphdr, saddr), &to->saddr, 4,
					0) < 0)
			return -1;
	}
	if (from->daddr != to->daddr) {
		if (bpf_l4_csum_replace(skb, csum_off, from->daddr, to->daddr,
					l4_flags | BPF_F_PSEUDO_HDR | 4) < 0 ||
		    bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), from->daddr,
					to->daddr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, l3 + offsetof(struct iphdr, daddr), &to->daddr, 4,
					0) < 0)
			return -1;
	}
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

/* The service a packet is addressed to, in `scope_internal` for in-cluster
 * senders. A NodePort is found on a node address (ipcache: host) through its
 * wildcard entry. `key` receives the key of the scope found. */
static __always_inline struct lb_service *lb4_service_of(const struct lb4_tuple *t,
							  int scope_internal,
							  struct lb4_key *key)
{
	struct lb_service *svc, *internal;

	__builtin_memset(key, 0, sizeof(*key));
	key->address = t->daddr;
	key->dport = t->dport;
	key->proto = t->proto;
	key->scope = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&lb_services, key);
	if (!svc) {
		struct ipcache_value *info = lookup_ipcache4(t->daddr);

		if (!info || info->identity != IDENTITY_HOST)
			return NULL;
		key->address = 0;
		svc = bpf_map_lookup_elem(&lb_services, key);
		if (!svc || !(svc->flags & SVC_F_NODEPORT))
			return NULL;
	}
	if (scope_internal && (svc->flags & SVC_F_TWO_SCOPES)) {
		key->scope = LB_SCOPE_INTERNAL;
		internal = bpf_map_lookup_elem(&lb_services, key);
		if (internal)
			return internal;
		key->scope = LB_SCOPE_EXTERNAL;
	}
	return svc;
}

/* Picks the backend of a new connection: the client's affinity entry while it
 * is fresh, else Maglev or random. NULL when the service has none. */
static __always_inline struct lb4_backend *lb4_pick(const struct lb4_key *key,
						    const struct lb_service *svc,
						    const struct lb4_tuple *t, __u32 *backend_id)
{
	struct lb_affinity_key affinity = {};
	struct lb4_backend *backend = NULL;
	__u64 now = 0;
	__u32 id = 0;

	if (svc->flags & SVC_F_AFFINITY) {
		now = bpf_ktime_get_ns();
		affinity.client = t->saddr;
		affinity.rev_nat_index = svc->rev_nat_index;
		id = lb_affinity_lookup(&affinity, svc, now);
		if (id)
			backend = bpf_map_lookup_elem(&lb_backends, &id);
	}
	if (!backend) {
		__u32 zero = 0, seed = 0;
		struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);

		if (cfg)
			seed = cfg->hash_seed;
		id = lb4_select_backend(key, svc,
					lb_hash3(t->saddr, t->daddr,
						 ((__u32)t->sport << 16) | t->dport, seed ^ t->proto));
		if (!id)
			return NULL;
		backend = bpf_map_lookup_elem(&lb_backends, &id);
		if (backend && (svc->flags & SVC_F_AFFINITY))
			lb_affinity_update(&affinity, id, now);
	}
	*backend_id = id;
	return backend;
}

/* A SNAT source port on `snat_addr` towards `peer`:`peer_port` in NAT map `nat`,
 * from a hash of the client's tuple, among `range` ports from `min`: one no
 * connection holds, one this very tuple held before (a new connection on it),
 * or one whose connection has been idle long enough (lb4_nat_idle; its forward
 * entry is removed, so a late packet of it starts afresh instead of being sent
 * with another connection's port; counted as `reused_reason`). 0 when none of
 * the tries is free. */
static __always_inline __be16 nat4_snat_port(void *nat, struct __sk_buff *skb,
					     const struct lb4_tuple *t, __be32 snat_addr,
					     __be32 peer, __be16 peer_port, __u32 min, __u32 range,
					     __u8 reused_reason, __u8 dir)
{
	__u32 hash = lb_hash3(t->saddr, ((__u32)t->sport << 16) | t->dport, t->daddr, 0);
	__u32 now = lb_now_s();
	int i;

	for (i = 0; i < LB_SNAT_PORT_TRIES; i++) {
		__be16 port = bpf_htons(min + (hash + i * 7919) % range);
		struct lb4_nat_entry *held, *holder;
		struct lb4_nat_key reply, forward;

		lb4_nat_key_fill(&reply, peer, snat_addr, peer_port, port, t->proto, LB_NAT_REPLY);
		held = bpf_map_lookup_elem(nat, &reply);
		if (!held)
			return port;
		if (held->daddr == t->saddr && held->dport == t->sport && held->saddr == t->daddr &&
		    held->sport == t->dport)
			return port;
		if (!lb4_nat_idle(held, t->proto, now))
			continue;
		lb4_nat_peer_key(&forward, held, t->proto, LB_NAT_REPLY);
		holder = bpf_map_lookup_elem(nat, &forward);
		if (holder && holder->saddr == snat_addr && holder->sport == port &&
		    holder->daddr == peer && holder->dport == peer_port) {
			if (!lb4_nat_idle(holder, t->proto, now))
				continue;
			bpf_map_delete_elem(nat, &forward);
		}
		metrics_count(skb, reused_reason, dir);
		return port;
	}
	return 0;
}

/* The SNAT port of a north-south connection to a remote backend (SNAT happens
 * to packets from outside, at the uplink's ingress). */
static __always_inline __be16 lb4_snat_port(struct __sk_buff *skb, const struct lb4_tuple *t,
					    __be32 node, const struct lb4_backend *backend)
{
	return nat4_snat_port(&lb_nat, skb, t, node, backend->address, backend->port,
			      LB_SNAT_PORT_MIN, LB_SNAT_PORT_RANGE, REASON_LB_SNAT_PORT_REUSED,
			      DIR_INGRESS);
}

/* Whether a live connection of another frontend already answers with the tuple
 * `fwd` would give this one at the backend: the same client address and port
 * sent to two frontends of one backend (a client's kernel picks its ephemeral
 * port per destination, so that happens) would be one connection to the
 * backend, and the second one's SYN would meet the first's socket. */
static __always_inline int lb4_reply_clash(const struct lb4_tuple *t,
					   const struct lb4_nat_entry *fwd)
{
	struct lb4_nat_entry *held;
	struct lb4_nat_key reply;

	lb4_nat_key_fill(&reply, fwd->daddr, fwd->saddr, fwd->dport, fwd->sport, t->proto,
			 LB_NAT_REPLY);
	held = bpf_map_lookup_elem(&lb_nat, &reply);
	if (!held)
		return 0;
	if (held->daddr == t->saddr && held->dport == t->sport && held->saddr == t->daddr &&
	    held->sport == t->dport)
		return 0;
	return !lb4_nat_idle(held, t->proto, lb_now_s());
}

/* Records both directions of a new translated connection in NAT map `nat`:
 * `t` (as sent) → `fwd`; the peer's answer → back to what the client expects. */
static __always_inline int nat4_create(void *nat, const struct lb4_tuple *t,
				       const struct lb4_nat_entry *fwd)
{
	struct lb4_nat_entry rev = {
		.saddr = t->daddr,
		.daddr = t->saddr,
		.sport = t->dport,
		.dport = t->sport,
		.backend_id = fwd->backend_id,
		.rev_nat_index = fwd->rev_nat_index,
		.flags = fwd->flags,
		.last_seen = fwd->last_seen,
	};
	struct lb4_nat_key key;

	lb4_nat_key_fill(&key, fwd->daddr, fwd->saddr, fwd->dport, fwd->sport, t->proto,
			 LB_NAT_REPLY);
	if (bpf_map_update_elem(nat, &key, &rev, BPF_ANY) < 0)
		return -1;
	lb4_nat_key_fill(&key, t->saddr, t->daddr, t->sport, t->dport, t->proto, LB_NAT_FORWARD);
	return bpf_map_update_elem(nat, &key, fwd, BPF_ANY);
}

static __always_inline int lb4_nat_create(const struct lb4_tuple *t,
					  const struct lb4_nat_entry *fwd)
{
	return nat4_create(&lb_nat, t, fwd);
}

/* Forward translation of a packet to a frontend. `north_south`: it came from
 * outside the node (external scope, source ranges, SNAT for remote backends);
 * otherwise an in-cluster pod sent it (internal scope, no SNAT). */
static __always_inline int lb4_forward(struct __sk_buff *skb, const struct l4_info *l4,
				       int north_south, __be32 node_ip)
{
	struct lb4_nat_entry fwd = {}, *known;
	struct lb4_backend *backend;
	struct lb4_nat_key key;
	struct lb_service *svc;
	struct lb4_key svc_key;
	struct lb4_tuple t;
	__u32 backend_id = 0;

	if (lb4_tuple_of(l4, &t) < 0)
		return LB_PASS;
	lb4_nat_key_fill(&key, t.saddr, t.daddr, t.sport, t.dport, t.proto, LB_NAT_FORWARD);
	known = bpf_map_lookup_elem(&lb_nat, &key);
	/* A SYN on a closed tuple is a new connection, judged afresh below; any
	 * other packet (a retransmitted SYN too) keeps its backend while it exists:
	 * a retransmission sent elsewhere would meet the first backend's SYN-ACK
	 * with another backend's RST. */
	if (known && (t.proto != IPPROTO_TCP ||
		      (l4->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN ||
		      (!(known->flags & LB_NAT_F_CLOSING) &&
		       bpf_map_lookup_elem(&lb_backends, &known->backend_id)))) {
		lb4_nat_touch(known, l4, LB_NAT_FORWARD);
		return lb4_rewrite(skb, &t, known) < 0 ? LB_ERROR : LB_TRANSLATED;
	}
	svc = lb4_service_of(&t, !north_south, &svc_key);
	if (!svc)
		return LB_PASS;
	if (north_south && !lb4_source_allowed(svc, t.saddr))
		return LB_DENIED;
	if (!svc->count)
		return (svc->flags & SVC_F_DROP_EMPTY) ? LB_NO_LOCAL_BACKEND : LB_NO_BACKEND;
	backend = lb4_pick(&svc_key, svc, &t, &backend_id);
	if (!backend)
		return LB_NO_BACKEND;
	fwd.saddr = t.saddr;
	fwd.sport = t.sport;
	fwd.daddr = backend->address;
	fwd.dport = backend->port;
	fwd.backend_id = backend_id;
	fwd.rev_nat_index = svc->rev_nat_index;
	fwd.last_seen = lb_now_s();
	if (!north_south && backend->address == t.saddr) {
		/* Hairpin: the pod would drop a packet from its own address (a
		 * martian); it sees the frontend as the peer instead. */
		fwd.saddr = t.daddr;
		fwd.flags |= LB_NAT_F_HAIRPIN;
	}
	if (north_south) {
		fwd.flags |= LB_NAT_F_NORTH_SOUTH;
		/* Replies of a remote backend must come back here to be reversed. */
		if (!(backend->flags & BE_F_LOCAL) && node_ip) {
			__be16 port = lb4_snat_port(skb, &t, node_ip, backend);

			if (!port)
				return LB_ERROR;
			fwd.saddr = node_ip;
			fwd.sport = port;
			fwd.flags |= LB_NAT_F_SNAT;
		}
	}
	/* The client's address is kept; its port is remapped on a clash, as
	 * netfilter's NAT does for a tuple already in use. */
	if (!(fwd.flags & LB_NAT_F_SNAT) && lb4_reply_clash(&t, &fwd)) {
		__u8 dir = north_south ? DIR_INGRESS : DIR_EGRESS;
		__be16 port = nat4_snat_port(&lb_nat, skb, &t, fwd.saddr, backend->address,
					     backend->port, LB_SNAT_PORT_MIN, LB_SNAT_PORT_RANGE,
					     REASON_LB_SNAT_PORT_REUSED, dir);

		if (!port)
			return LB_ERROR;
		fwd.sport = port;
		metrics_count(skb, REASON_LB_CLIENT_PORT_REMAPPED, dir);
	}
	if (lb4_nat_create(&t, &fwd) < 0)
		return LB_ERROR;
	return lb4_rewrite(skb, &t, &fwd) < 0 ? LB_ERROR : LB_TRANSLATED;
}

/* Whether the packet answers a translated connection (without rewriting it):
 * the entry's flags + 1, or 0. */
static __always_inline int lb4_is_reply(const struct l4_info *l4)
{
	struct lb4_nat_entry *rev;
	struct lb4_nat_key key;
	struct lb4_tuple t;

	if (lb4_tuple_of(l4, &t) < 0)
		return 0;
	lb4_nat_key_fill(&key, t.saddr, t.daddr, t.sport, t.dport, t.proto, LB_NAT_REPLY);
	rev = bpf_map_lookup_elem(&lb_nat, &key);
	return rev ? rev->flags + 1 : 0;
}

/* Reverse translation of a backend's answer. Returns the entry's flags + 1
 * when rewritten (so 0 means: not a translated connection), -1 on error. */
static __always_inline int lb4_reverse(struct __sk_buff *skb, const struct l4_info *l4)
{
	struct lb4_nat_entry *rev;
	struct lb4_nat_key key;
	struct lb4_tuple t;

	if (lb4_tuple_of(l4, &t) < 0)
		return 0;
	lb4_nat_key_fill(&key, t.saddr, t.daddr, t.sport, t.dport, t.proto, LB_NAT_REPLY);
	rev = bpf_map_lookup_elem(&lb_nat, &key);
	if (!rev)
		return 0;
	lb4_nat_touch(rev, l4, LB_NAT_REPLY);
	if (lb4_rewrite(skb, &t, rev) < 0)
		return -1;
	return rev->flags + 1;
}

/* Sends a rewritten packet out towards its (new) destination by the FIB: the
 * stack would take a packet whose source is one of its own addresses for a
 * martian. */
static __always_inline int lb4_redirect_fib(struct __sk_buff *skb, __u8 dir)
{
	struct bpf_fib_lookup fib = {};
	struct pkt4 pkt;
	long rc;

	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, dir);
	if (ipv4_dec_ttl(pkt.ip4) < 0)
		return drop(skb, DROP_TTL_EXCEEDED, dir);
	fib.family = FAMILY_IPV4;
	fib.l4_protocol = pkt.ip4->protocol;
	fib.tot_len = bpf_ntohs(pkt.ip4->tot_len);
	fib.ipv4_src = pkt.ip4->saddr;
	fib.ipv4_dst = pkt.ip4->daddr;
	fib.ifindex = skb->ifindex;
	/* As if forwarded from the device it came in on (the output mode would take
	 * that device for the output interface). */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return drop(skb, DROP_LB_NO_ROUTE, dir);
	metrics_count(skb, REASON_LB_TRANSLATED, dir);
	return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
}

/* Sends a rewritten packet to a remote backend: through the overlay when the
 * backend is behind a tunnel endpoint, else by the FIB (native routing). */
static __always_inline int lb4_to_remote(struct __sk_buff *skb, __u32 src_identity, __u8 dir)
{
	struct ipcache_value *info;
	struct pkt4 pkt;

	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, dir);
	info = lookup_ipcache4(pkt.ip4->daddr);
	if (info && info->tunnel_endpoint) {
		if (ipv4_dec_ttl(pkt.ip4) < 0)
			return drop(skb, DROP_TTL_EXCEEDED, dir);
		return encap_and_redirect(skb, info->tunnel_endpoint, src_identity, dir);
	}
	return lb4_redirect_fib(skb, dir);
}

/* The IPv4 part of a reject (after the Ethernet header, stored apart so every
 * field is aligned for the checksum helpers). */
struct lb4_reject_frame {
	struct iphdr ip;
	union {
		struct tcphdr tcp;
		struct {
			__u8 type;
			__u8 code;
			__sum16 checksum;
			__u32 unused;
			/* The quoted packet: its IP header and first 8 bytes. */
			struct iphdr ip;
			__u8 l4[8];
		} icmp;
	};
};

/* Answers a packet to a service without backends as kube-proxy's REJECT does:
 * a TCP SYN with RST|ACK, a UDP datagram with ICMP port unreachable, sent
 * back out of the device it came in on. Anything else is dropped. */
static __always_inline int lb4_reject(struct __sk_buff *skb, const struct l4_info *l4, __u8 dir)
{
	struct lb4_reject_frame f = {};
	struct ethhdr eth;
	struct iphdr orig;
	__u8 orig_l4[8];
	__u32 len, sum;
	struct {
		__be32 saddr;
		__be32 daddr;
		__u8 zero;
		__u8 proto;
		__be16 len;
	} pseudo;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &orig, sizeof(orig)) < 0 ||
	    orig.ihl != 5 ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(orig), orig_l4,
			       sizeof(orig_l4)) < 0)
		return drop(skb, DROP_LB_NO_BACKEND, dir);
	if (l4->proto == IPPROTO_TCP) {
		struct tcphdr *in = (struct tcphdr *)orig_l4;
		__u32 seq;

		if ((l4->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return drop(skb, DROP_LB_NO_BACKEND, dir);
		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + sizeof(orig) + 4, &seq, 4) < 0)
			return drop(skb, DROP_LB_NO_BACKEND, dir);
		f.tcp.source = in->dest;
		f.tcp.dest = in->source;
		f.tcp.ack_seq = bpf_htonl(bpf_ntohl(seq) + 1);
		f.tcp.doff = 5;
		f.tcp.rst = 1;
		f.tcp.ack = 1;
		len = sizeof(struct iphdr) + sizeof(struct tcphdr);
	} else if (l4->proto == IPPROTO_UDP) {
		f.icmp.type = ICMP_DEST_UNREACH;
		f.icmp.code = 3; /* port unreachable */
		f.icmp.ip = orig;
		__builtin_memcpy(f.icmp.l4, orig_l4, sizeof(orig_l4));
		len = sizeof(struct iphdr) + 8 + sizeof(struct iphdr) + 8;
	} else {
		return drop(skb, DROP_LB_NO_BACKEND, dir);
	}
	{
		__u8 mac[ETH_ALEN];

		__builtin_memcpy(mac, eth.h_dest, ETH_ALEN);
		__builtin_memcpy(eth.h_dest, eth.h_source, ETH_ALEN);
		__builtin_memcpy(eth.h_source, mac, ETH_ALEN);
	}
	f.ip.version = 4;
	f.ip.ihl = 5;
	f.ip.ttl = 64;
	f.ip.protocol = l4->proto == IPPROTO_TCP ? IPPROTO_TCP : IPPROTO_ICMP;
	f.ip.tot_len = bpf_htons(len);
	f.ip.saddr = orig.daddr;
	f.ip.daddr = orig.saddr;
	f.ip.check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)&f.ip, sizeof(f.ip), 0));
	if (l4->proto == IPPROTO_TCP) {
		pseudo.saddr = f.ip.saddr;
		pseudo.daddr = f.ip.daddr;
		pseudo.zero = 0;
		pseudo.proto = IPPROTO_TCP;
		pseudo.len = bpf_htons(sizeof(struct tcphdr));
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
		sum = bpf_csum_diff(NULL, 0, (__be32 *)&f.tcp, sizeof(f.tcp), sum);
		f.tcp.check = csum_fold32(sum);
	} else {
		f.icmp.checksum = csum_fold32(
			bpf_csum_diff(NULL, 0, (__be32 *)&f.icmp, sizeof(f.icmp), 0));
	}
	if (bpf_skb_change_tail(skb, sizeof(struct ethhdr) + len, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &f, len, 0) < 0)
		return drop(skb, DROP_LB_NO_BACKEND, dir);
	metrics_count(skb, REASON_LB_REJECTED, dir);
	return bpf_redirect(skb->ifindex, 0);
}
