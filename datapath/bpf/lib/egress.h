/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Egress gateways (EgressRoute objects, programmed by the agent's egress step).
 *
 * Source node (from_container): after egress policy has judged the packet, a
 * pod's traffic to a destination outside the cluster that an EgressRoute
 * selects (egress_policy: LPM on source pod /32 + destination prefix; an
 * excludedCIDRs entry is a longer prefix flagged EGRESS_F_EXCLUDED) is
 * tunnelled to the route's gateway node, the pod's identity in the VNI. A
 * route without gateway drops the traffic rather than let it out with the
 * pod's address. Cluster-internal destinations are never steered: anything
 * the ipcache knows with another identity than world, and the prefixes of
 * egress_exempt (every node's pod CIDRs and addresses, the service CIDRs),
 * whatever the route says.
 *
 * Gateway node (from_overlay; its own pods' traffic reaches it there too,
 * tunnelled to its own address): the connection is SNATed to the egress IP with a port from egress_nat (its own
 * LRU NAT table, same layout and helpers as lb_nat) and sent out by the FIB.
 * The answers, at the uplink (from_netdev), are reverse-translated and
 * tunnelled to the pod's node, which delivers them (policy judges them as the
 * answers of the pod's own connection). */
#pragma once

#include "common.h"
#include "encap.h"
#include "endpoint.h"
#include "l4.h"
#include "lb_nat.h"
#include "maps.h"
#include "metrics.h"

/* egress_policy: bits after prefixlen: the source (always all 32), then a
 * prefix of the destination. */
#define EGRESS_STATIC_PREFIX 32
struct egress_key {
	__u32 prefixlen;
	__be32 saddr;
	__be32 daddr;
};

/* egress_value.flags */
#define EGRESS_F_EXCLUDED 0x01 /* an excludedCIDRs prefix: the normal path */
struct egress_value {
	__be32 gateway_ip; /* the gateway node's underlay address; 0: none, drop */
	__be32 egress_ip; /* the source address the gateway SNATs to */
	__u32 flags;
	__u32 pad;
};

#define EGRESS_POLICY_MAX_ENTRIES 16384
#define EGRESS_EXEMPT_MAX_ENTRIES 4096
#define EGRESS_NAT_MAX_ENTRIES 65536
/* Egress SNAT ports: below Linux's default ephemeral range (32768-60999), where
 * the node's own sockets take theirs when the egress IP is the node's address,
 * and below lb_nat's 61000-65535. */
#define EGRESS_SNAT_PORT_MIN 10000
#define EGRESS_SNAT_PORT_RANGE 22768

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct egress_key);
	__type(value, struct egress_value);
	__uint(max_entries, EGRESS_POLICY_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} egress_policy SEC(".maps");

/* Prefixes never steered nor SNATed (key: struct ipcache_key; value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, __u32);
	__uint(max_entries, EGRESS_EXEMPT_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} egress_exempt SEC(".maps");

/* A plain hash, not an LRU: a full table must refuse new connections (counted
 * as egress_snat_failed, reported by the agent), never evict live ones. The
 * agent removes idle connections (lb4_nat_idle's timeouts). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_nat_key);
	__type(value, struct lb4_nat_entry);
	__uint(max_entries, EGRESS_NAT_MAX_ENTRIES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} egress_nat SEC(".maps");

/* What an egress function returns when the packet is none of its business; any
 * other value is the tc verdict. */
#define EGRESS_PASS -1

/* Whether `daddr` is outside the cluster: not known to the ipcache with an
 * identity other than world, and in none of the egress_exempt prefixes. */
static __always_inline int egress4_is_external(__be32 daddr)
{
	struct ipcache_key exempt = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 32,
		.family = FAMILY_IPV4,
	};
	struct ipcache_value *known = lookup_ipcache4(daddr);

	if (known && known->identity != IDENTITY_WORLD)
		return 0;
	exempt.addr.ip4 = daddr;
	return !bpf_map_lookup_elem(&egress_exempt, &exempt);
}

/* The route for `saddr` → `daddr`, NULL when none applies (no route, an
 * excluded prefix, a cluster-internal destination). */
static __always_inline struct egress_value *egress4_lookup(__be32 saddr, __be32 daddr)
{
	struct egress_key key = {
		.prefixlen = EGRESS_STATIC_PREFIX + 32,
		.saddr = saddr,
		.daddr = daddr,
	};
	struct egress_value *v;

	if (!egress4_is_external(daddr))
		return NULL;
	v = bpf_map_lookup_elem(&egress_policy, &key);
	if (!v || (v->flags & EGRESS_F_EXCLUDED))
		return NULL;
	return v;
}

/* On the gateway: SNATs the connection to `egress_ip` and sends it out by the
 * FIB. */
static __always_inline int egress4_snat(struct __sk_buff *skb, const struct l4_info *l4,
					__be32 egress_ip, __u8 dir)
{
	struct lb4_nat_entry fwd = {}, *known;
	struct lb4_nat_key key;
	struct lb4_tuple t;
	__be16 port;

	if (lb4_tuple_of(l4, &t) < 0)
		return drop(skb, DROP_EGRESS_UNSUPPORTED, dir);
	lb4_nat_key_fill(&key, t.saddr, t.daddr, t.sport, t.dport, t.proto, LB_NAT_FORWARD);
	known = bpf_map_lookup_elem(&egress_nat, &key);
	/* A connection keeps its port (and egress IP) while its entry lives; a SYN
	 * on a closed tuple starts afresh. */
	if (known && known->saddr == egress_ip &&
	    (t.proto != IPPROTO_TCP ||
	     (l4->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN ||
	     !(known->flags & LB_NAT_F_CLOSING))) {
		nat4_touch(&egress_nat, known, l4, LB_NAT_FORWARD);
		if (lb4_rewrite(skb, &t, known) < 0)
			return drop(skb, DROP_EGRESS_SNAT, dir);
	} else {
		port = nat4_snat_port(&egress_nat, skb, &t, egress_ip, t.daddr, t.dport,
				      EGRESS_SNAT_PORT_MIN, EGRESS_SNAT_PORT_RANGE,
				      REASON_EGRESS_SNAT_PORT_REUSED, dir);
		if (!port)
			return drop(skb, DROP_EGRESS_SNAT, dir);
		fwd.saddr = egress_ip;
		fwd.sport = port;
		fwd.daddr = t.daddr;
		fwd.dport = t.dport;
		fwd.flags = LB_NAT_F_SNAT;
		fwd.last_seen = lb_now_s();
		if (nat4_create(&egress_nat, &t, &fwd) < 0 || lb4_rewrite(skb, &t, &fwd) < 0)
			return drop(skb, DROP_EGRESS_SNAT, dir);
	}
	metrics_count(skb, REASON_EGRESS_SNAT, dir);
	return lb4_redirect_fib(skb, dir);
}

/* Whether this node is `v`'s gateway. */
static __always_inline int egress4_is_gateway(const struct egress_value *v)
{
	struct node_config *cfg = lookup_node_config();

	return cfg && cfg->node_ipv4 && cfg->node_ipv4 == v->gateway_ip;
}

/* The entry points below are BPF subprograms (not inlined): their drop sites
 * stay out of the big tc programs, where clang would otherwise keep a pointer
 * into the context across branches, which the verifier refuses. They change
 * packet data: a caller re-parses after EGRESS_PASS. */

/* from_container, after egress policy: tunnels a local pod's packet to its
 * gateway. A gateway's own pods go through the overlay too, to its own
 * address: the SNAT then happens in one place (from_overlay), and this
 * program's stack stays within the limit. */
static __noinline __attribute__((unused)) int
egress4_from_pod(struct __sk_buff *skb, const struct l4_info *l4, __u32 src_identity)
{
	struct egress_value *v = egress4_lookup(l4->saddr, l4->daddr);
	struct pkt4 pkt;
	__be32 gateway;

	if (!v)
		return EGRESS_PASS;
	if (!v->gateway_ip)
		return drop(skb, DROP_EGRESS_NO_GATEWAY, DIR_EGRESS);
	gateway = v->gateway_ip;
	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_EGRESS);
	if (ipv4_dec_ttl(pkt.ip4) < 0)
		return drop(skb, DROP_TTL_EXCEEDED, DIR_EGRESS);
	metrics_count(skb, REASON_EGRESS_REDIRECT, DIR_EGRESS);
	return encap_and_redirect(skb, gateway, src_identity, DIR_EGRESS);
}

/* from_overlay, for a packet not addressed to a local pod: SNATs it when this
 * node is the gateway of its route. Nothing else crosses the overlay towards
 * the outside, so a packet for outside the cluster this node is not (or no
 * longer) the gateway of is dropped: a source node still steering to a former
 * gateway must not make it send the pod's address out. */
static __noinline __attribute__((unused)) int egress4_from_overlay(struct __sk_buff *skb, const struct l4_info *l4)
{
	struct egress_value *v = egress4_lookup(l4->saddr, l4->daddr);

	if (v && egress4_is_gateway(v))
		return egress4_snat(skb, l4, v->egress_ip, DIR_INGRESS);
	if (egress4_is_external(l4->daddr))
		return drop(skb, DROP_EGRESS_NOT_GATEWAY, DIR_INGRESS);
	return EGRESS_PASS;
}

/* from_netdev: an answer to an egress connection gets the pod's address and
 * port back and goes to the pod's node through the overlay (this node's own
 * pods too, to its own address: delivery and ingress policy happen in one
 * place, from_overlay, and this program's stack stays within the limit). */
static __noinline __attribute__((unused)) int egress4_reply(struct __sk_buff *skb)
{
	struct ipcache_value *info;
	struct lb4_nat_entry *rev;
	struct node_config *cfg;
	struct lb4_nat_key key;
	struct l4_info l4_buf;
	struct l4_info *l4 = &l4_buf;
	struct lb4_tuple t;
	struct pkt4 pkt;
	__be32 node;

	if (skb->protocol != bpf_htons(ETH_P_IP) || parse_ipv4(skb, &pkt) < 0)
		return EGRESS_PASS;
	parse_l4(skb, &pkt, l4);
	if (lb4_tuple_of(l4, &t) < 0)
		return EGRESS_PASS;
	lb4_nat_key_fill(&key, t.saddr, t.daddr, t.sport, t.dport, t.proto, LB_NAT_REPLY);
	rev = bpf_map_lookup_elem(&egress_nat, &key);
	if (!rev)
		return EGRESS_PASS;
	nat4_touch(&egress_nat, rev, l4, LB_NAT_REPLY);
	if (lb4_rewrite(skb, &t, rev) < 0 || parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_EGRESS_SNAT, DIR_INGRESS);
	if (ipv4_dec_ttl(pkt.ip4) < 0)
		return drop(skb, DROP_TTL_EXCEEDED, DIR_INGRESS);
	info = lookup_ipcache4(pkt.ip4->daddr);
	cfg = lookup_node_config();
	node = info ? info->tunnel_endpoint : 0;
	if (!node && info && cfg)
		node = cfg->node_ipv4;
	if (!node)
		return drop(skb, DROP_NO_TUNNEL_ENDPOINT, DIR_INGRESS);
	return encap_and_redirect(skb, node, IDENTITY_WORLD, DIR_INGRESS);
}
