/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* IPv6 at a pod's veth: judged by the same policy as IPv4.
 *
 * - Neighbour discovery and MLD (link-local control: RS/RA/NS/NA/redirect with
 *   hop limit 255, MLD with hop limit 1) always pass, so links work; so do the
 *   ICMPv6 errors RFC 4890 §4.3.1 says must not be dropped (destination
 *   unreachable, packet too big, time exceeded code 0, parameter problem
 *   codes 1 and 2), so path MTU discovery and errors work.
 * - Anything else leaving a pod (from_container6) must carry the address of
 *   the endpoint behind that veth (anti-spoofing, as for IPv4), and anything
 *   entering one (to_container6) must be for a known endpoint address.
 * - With NODE_F_IPV6_POLICY (the agent's policy maps hold IPv6): conntrack in
 *   `conntrack6` (an established flow costs one lookup, replies and related
 *   errors pass), then the same `policy` lookups as IPv4 (identity, protocol,
 *   port, direction: policy_decide_key) with the IPv6 prefixes of
 *   `policy_cidrs`. Packets leave for the host stack with the sender's
 *   identity in the mark, as IPv4 routed through the stack does; the stack
 *   routes them (also into local pods, whose to_container6 judges ingress).
 * - Without it (a node whose IPv6 policy is not ready): fail closed. IPv6 of
 *   an endpoint some policy selects (POLICY_F_SELECTED) is dropped as
 *   DROP_IPV6_POLICY_NOT_ENFORCED, counted and reported (audit mode: counted
 *   as REASON_POLICY_AUDIT, reported with verdict audit, passed); an endpoint
 *   without policy allows everything anyway, so its IPv6 passes.
 *
 * The agent reports which in NodeNetwork status (condition IPv6Policy). The
 * pod hooks' IPv6 bodies are in lib/lxc6.h (bpf_lxc.c's IPv6 programs, reached
 * by tail call); the large state lives in a per-CPU scratch map. The IPv4 path is
 * untouched. A non-first fragment (no transport header) is judged with the
 * ports its first fragment carried (ipv6_frags, as ipv4_frags for IPv4), or
 * none (zero) if that was not seen. */
#pragma once

#include "common.h"
#include "conntrack.h"
#include "events.h"
#include "maps.h"
#include "metrics.h"
#include "policy.h"

#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define ICMPV6_MLD_QUERY 130
#define ICMPV6_MLD_REPORT 131
#define ICMPV6_MLD_DONE 132
#define ICMPV6_ROUTER_SOLICIT 133
#define ICMPV6_NDISC_REDIRECT 137
#define ICMPV6_MLD2_REPORT 143
/* Extension headers skipped before the transport header; more → unparsed. */
#define IPV6_MAX_EXTHDRS 4
#define IPV6_FRAG_OFFSET_MASK 0xFFF8
#define IPV6_FRAG_MORE 0x01

/* The tuple IPv6 is judged on: struct l4_info with 128-bit addresses. */
struct l4_info6 {
	__u8 saddr[16];
	__u8 daddr[16];
	__u16 sport; /* host order; the echo id for ICMPv6 echo */
	__u16 dport;
	__u8 proto; /* the upper layer after extension headers */
	__u8 tcp_flags;
	__u8 icmp_error; /* an ICMPv6 error quoting `inner` */
	__u8 icmp_type; /* 0xFF: not ICMPv6 */
	__u8 icmp_code;
	__u8 hop_limit;
	/* Offset of the transport header from the frame's start; 0 in a later
	 * fragment (none there). The tc service path rewrites it (lib/lb6_nat.h). */
	__u16 l4_off;
	struct {
		__u8 saddr[16];
		__u8 daddr[16];
		__u16 sport;
		__u16 dport;
		__u8 proto;
		__u8 pad[3];
	} inner;
};

/* Everything an IPv6 hook keeps while judging one packet: in a per-CPU map,
 * not on the stack (see the top). */
struct ipv6_scratch {
	struct l4_info6 l4;
	struct ct6_key fwd;
	struct ct6_key rev;
	struct policy_event6 ev;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ipv6_scratch);
	__uint(max_entries, 1);
} ipv6_scratch SEC(".maps");

static __always_inline struct ipv6_scratch *ipv6_scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ipv6_scratch, &zero);
}

/* Ports of the transport header at `off` (TCP, UDP and SCTP keep both in
 * their first 4 bytes; ICMPv6 echo: the id as both); the ICMPv6 type/code. */
static __always_inline int load_ports6(struct __sk_buff *skb, __u32 off, __u8 proto, __u16 *sport,
				       __u16 *dport, __u8 *icmp_type, __u8 *icmp_code)
{
	__u8 hdr[8];

	if (proto_has_ports(proto)) {
		if (bpf_skb_load_bytes(skb, off, hdr, 4) < 0)
			return -1;
		*sport = ((__u16)hdr[0] << 8) | hdr[1];
		*dport = ((__u16)hdr[2] << 8) | hdr[3];
	} else if (proto == IPPROTO_ICMPV6) {
		if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
			return -1;
		*icmp_type = hdr[0];
		*icmp_code = hdr[1];
		if (hdr[0] == ICMPV6_ECHO_REQUEST || hdr[0] == ICMPV6_ECHO_REPLY) {
			*sport = ((__u16)hdr[4] << 8) | hdr[5];
			*dport = *sport;
		}
	}
	return 0;
}

static __always_inline int icmp6_is_error(__u8 type)
{
	return type >= ICMPV6_DEST_UNREACH && type <= ICMPV6_PARAMPROB;
}

/* The ipv6_frags key of the fragmented datagram `l4` belongs to. */
static __always_inline void frag6_key_fill(struct frag6_key *key, const struct l4_info6 *l4,
					   const __u8 *id)
{
	__builtin_memcpy(key->saddr, l4->saddr, 16);
	__builtin_memcpy(key->daddr, l4->daddr, 16);
	__builtin_memcpy(&key->id, id, 4);
	key->proto = l4->proto;
}

/* Returns 0 when `skb` holds an IPv6 header after Ethernet; fills `l4`. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct l4_info6 *l4)
{
	__u32 off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	struct frag6_key frag_key = {};
	struct frag4_ports *ports;
	__u8 frag_more = 0;
	__u8 frag_id[4] = {};
	__u8 hdr[8];
	__u8 next;
	int i;

	__builtin_memset(l4, 0, sizeof(*l4));
	l4->icmp_type = 0xFF;
	/* Version .. hop limit, then both addresses (contiguous in header and l4). */
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), hdr, 8) < 0 || (hdr[0] >> 4) != 6 ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 8, l4->saddr, 32) < 0)
		return -1;
	l4->hop_limit = hdr[7];
	next = hdr[6];
#pragma unroll
	for (i = 0; i < IPV6_MAX_EXTHDRS; i++) {
		if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS)
			break;
		if (bpf_skb_load_bytes(skb, off, hdr, 2) < 0)
			return -1;
		next = hdr[0];
		off += ((__u32)hdr[1] + 1) * 8;
	}
	if (next == IPPROTO_FRAGMENT) {
		if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
			return -1;
		next = hdr[0];
		off += 8;
		l4->proto = next;
		__builtin_memcpy(frag_id, &hdr[4], 4);
		/* A later fragment has no transport header: the first one's ports. */
		if ((((__u16)hdr[2] << 8) | hdr[3]) & IPV6_FRAG_OFFSET_MASK) {
			frag6_key_fill(&frag_key, l4, frag_id);
			ports = bpf_map_lookup_elem(&ipv6_frags, &frag_key);
			if (ports) {
				l4->sport = ports->sport;
				l4->dport = ports->dport;
			}
			return 0;
		}
		frag_more = hdr[3] & IPV6_FRAG_MORE;
	}
	l4->proto = next;
	l4->l4_off = off;
	if (load_ports6(skb, off, next, &l4->sport, &l4->dport, &l4->icmp_type, &l4->icmp_code) < 0)
		return 0;
	if (frag_more) {
		struct frag4_ports first = { .sport = l4->sport, .dport = l4->dport };

		frag6_key_fill(&frag_key, l4, frag_id);
		bpf_map_update_elem(&ipv6_frags, &frag_key, &first, BPF_ANY);
	}
	if (next == IPPROTO_TCP)
		bpf_skb_load_bytes(skb, off + 13, &l4->tcp_flags, 1);
	if (next != IPPROTO_ICMPV6 || !icmp6_is_error(l4->icmp_type))
		return 0;
	/* The quoted packet: its IPv6 header, then (without extension headers)
	 * the first bytes of its transport header. */
	off += 8;
	if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0 || (hdr[0] >> 4) != 6 ||
	    bpf_skb_load_bytes(skb, off + 8, l4->inner.saddr, 32) < 0)
		return 0;
	l4->icmp_error = 1;
	l4->inner.proto = hdr[6];
	load_ports6(skb, off + sizeof(struct ipv6hdr), hdr[6], &l4->inner.sport, &l4->inner.dport,
		    &hdr[0], &hdr[1]);
	return 0;
}

/* Neighbour discovery and MLD: what a link needs to work. The hop limits are
 * the ones their receivers require (RFC 4861 §6.1, RFC 3810 §5), so routed
 * traffic cannot pose as either. */
static __always_inline int ipv6_is_link_control(const struct l4_info6 *l4)
{
	if (l4->proto != IPPROTO_ICMPV6)
		return 0;
	if (l4->icmp_type >= ICMPV6_ROUTER_SOLICIT && l4->icmp_type <= ICMPV6_NDISC_REDIRECT)
		return l4->hop_limit == 255;
	if ((l4->icmp_type >= ICMPV6_MLD_QUERY && l4->icmp_type <= ICMPV6_MLD_DONE) ||
	    l4->icmp_type == ICMPV6_MLD2_REPORT)
		return l4->hop_limit == 1;
	return 0;
}

/* The ICMPv6 errors a firewall must not drop (RFC 4890 §4.3.1): path MTU
 * discovery and error reporting depend on them. */
static __always_inline int ipv6_is_must_pass_error(const struct l4_info6 *l4)
{
	if (l4->proto != IPPROTO_ICMPV6)
		return 0;
	switch (l4->icmp_type) {
	case ICMPV6_DEST_UNREACH:
	case ICMPV6_PKT_TOOBIG:
		return 1;
	case ICMPV6_TIME_EXCEED:
		return l4->icmp_code == 0;
	case ICMPV6_PARAMPROB:
		return l4->icmp_code == 1 || l4->icmp_code == 2;
	}
	return 0;
}

/* Whether the node judges IPv6 by policy (NODE_F_IPV6_POLICY). */
static __always_inline int ipv6_policy_enforced(void)
{
	struct node_config *cfg = lookup_node_config();

	return cfg && (cfg->flags & NODE_F_IPV6_POLICY);
}

/* The identity of an IPv6 address seen from this node (world if unknown). */
static __always_inline __u32 resolve_identity6(const __u8 *ip6)
{
	struct ipcache_value *info = lookup_ipcache6(ip6);

	return info ? info->identity : IDENTITY_WORLD;
}

/* The event of the packet in `s->l4` at (ep, dir), in `s->ev`, sent. */
static __always_inline void ipv6_report(struct __sk_buff *skb, struct ipv6_scratch *s,
					const struct endpoint_info *ep, __u8 dir, __u32 peer,
					__u8 type, __u8 reason, __u8 verdict, __u8 match, __u64 now)
{
	struct policy_event6 *ev = &s->ev;

	__builtin_memset(ev, 0, sizeof(*ev));
	__builtin_memcpy(ev->saddr6, s->l4.saddr, 16);
	__builtin_memcpy(ev->daddr6, s->l4.daddr, 16);
	ev->base.ts_ns = now;
	ev->base.type = type;
	ev->base.reason = reason;
	ev->base.dir = dir;
	ev->base.proto = s->l4.proto;
	ev->base.verdict = verdict;
	ev->base.match = match;
	ev->base.endpoint_id = ep->endpoint_id;
	ev->base.src_identity = dir == DIR_INGRESS ? peer : ep->identity;
	ev->base.dst_identity = dir == DIR_INGRESS ? ep->identity : peer;
	ev->base.sport = s->l4.sport;
	ev->base.dport = s->l4.dport;
	ev->base.ifindex = skb->ifindex;
	ev->base.tcp_flags = s->l4.tcp_flags;
	if (s->l4.proto == IPPROTO_ICMPV6) {
		ev->base.icmp_type = s->l4.icmp_type;
		ev->base.icmp_code = s->l4.icmp_code;
	}
	if (event_output6(ev) < 0)
		metrics_count(skb, REASON_EVENT_LOST, dir);
}

/* The verdict for IPv6 of local endpoint `ep` at enforcement point `dir` on a
 * node that does not enforce IPv6 policy: TC_ACT_OK when it has no policy (or
 * in audit mode), else TC_ACT_SHOT, reported. */
static __always_inline int ipv6_fail_closed(struct __sk_buff *skb, struct ipv6_scratch *s,
					    const struct endpoint_info *ep, __u32 peer, __u8 dir)
{
	__u16 endpoint_id = ep->endpoint_id;
	struct policy_state *state;
	struct node_config *cfg;
	__u8 audit;

	state = bpf_map_lookup_elem(&policy_state, &endpoint_id);
	if (!state || !(state->flags & POLICY_F_SELECTED))
		return TC_ACT_OK;
	cfg = lookup_node_config();
	audit = cfg && (cfg->flags & NODE_F_POLICY_AUDIT);
	ipv6_report(skb, s, ep, dir, peer, audit ? EVENT_POLICY_VERDICT : EVENT_DROP,
		    DROP_IPV6_POLICY_NOT_ENFORCED,
		    audit ? EVENT_VERDICT_AUDIT : EVENT_VERDICT_DENY, EVENT_MATCH_DEFAULT,
		    bpf_ktime_get_ns());
	if (audit) {
		metrics_count(skb, REASON_POLICY_AUDIT, dir);
		return TC_ACT_OK;
	}
	metrics_count(skb, DROP_IPV6_POLICY_NOT_ENFORCED, dir);
	return TC_ACT_SHOT;
}

static __always_inline void ct6_key_fill(struct ct6_key *key, const __u8 *saddr,
					 const __u8 *daddr, __u16 sport, __u16 dport, __u8 proto,
					 __u8 dir, __u16 endpoint_id)
{
	__builtin_memcpy(key->saddr, saddr, 16);
	__builtin_memcpy(key->daddr, daddr, 16);
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->dir = dir;
	key->endpoint_id = endpoint_id;
}

/* ct_lookup4 for IPv6 (lib/conntrack.h): `s->fwd` receives the key a new
 * entry of this packet would have. */
static __always_inline int ct_lookup6(struct ipv6_scratch *s, __u8 dir, __u16 endpoint_id,
				      __u32 epoch, int audit, __u64 now, struct ct_value **entry)
{
	const struct l4_info6 *l4 = &s->l4;
	__u8 opposite = dir_opposite(dir);
	struct ct_value *found;

	*entry = NULL;
	if (l4->icmp_error) {
		/* About a packet this endpoint sent, or a reply it sent. */
		ct6_key_fill(&s->rev, l4->inner.saddr, l4->inner.daddr, l4->inner.sport,
			     l4->inner.dport, l4->inner.proto, opposite, endpoint_id);
		found = bpf_map_lookup_elem(&conntrack6, &s->rev);
		if (found)
			goto related;
		ct6_key_fill(&s->rev, l4->inner.daddr, l4->inner.saddr, l4->inner.dport,
			     l4->inner.sport, l4->inner.proto, dir, endpoint_id);
		found = bpf_map_lookup_elem(&conntrack6, &s->rev);
		if (found)
			goto related;
	}
	ct6_key_fill(&s->fwd, l4->saddr, l4->daddr, l4->sport, l4->dport, l4->proto, dir,
		     endpoint_id);
	found = bpf_map_lookup_elem(&conntrack6, &s->fwd);
	if (found) {
		ct_touch(found, l4->proto, l4->tcp_flags, now, 0);
		*entry = found;
		return ct_forward_state(found, l4->proto, l4->tcp_flags, epoch, audit);
	}
	ct6_key_fill(&s->rev, l4->daddr, l4->saddr, l4->dport, l4->sport, l4->proto, opposite,
		     endpoint_id);
	found = bpf_map_lookup_elem(&conntrack6, &s->rev);
	if (found) {
		ct_touch(found, l4->proto, l4->tcp_flags, now, 1);
		return CT_REPLY;
	}
	return CT_NEW;
related:
	return ct_related(found, now);
}

/* policy_enforce (lib/policy.h) for the IPv6 packet in `s->l4`. */
static __always_inline int policy_enforce6(struct __sk_buff *skb, struct ipv6_scratch *s,
					   const struct endpoint_info *ep, __u8 dir, __u32 peer)
{
	struct policy_decision d = {};
	struct node_config *cfg = lookup_node_config();
	/* Read before policy_state, as policy_enforce does. */
	struct policy_config *pcfg = lookup_policy_config();
	__u32 epoch = pcfg ? pcfg->epoch : 0;
	int audit = cfg && (cfg->flags & NODE_F_POLICY_AUDIT);
	__u16 endpoint_id = ep->endpoint_id;
	const struct l4_info6 *l4 = &s->l4;
	struct ipcache_key cidr_key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 128,
		.family = FAMILY_IPV6,
	};
	struct policy_state *state = NULL;
	struct ct_value *entry;
	__u64 now = bpf_ktime_get_ns();
	__u32 revision = 0;
	__u8 ct_flags = 0;
	int ct;

	ct = ct_lookup6(s, dir, endpoint_id, epoch, audit, now, &entry);
	if (ct_admits(&ct, entry, endpoint_id, epoch, &state, &revision))
		return POLICY_ALLOW;

	__builtin_memcpy(cidr_key.addr.ip6, dir == DIR_INGRESS ? l4->saddr : l4->daddr, 16);
	policy_decide_key(state, endpoint_id, dir, peer, &cidr_key, l4->proto, l4->dport, &d);
	if (ct == CT_STALE)
		d.match = EVENT_MATCH_CONNTRACK;
	if (d.verdict == EVENT_VERDICT_DENY) {
		if (!audit) {
			if (ct == CT_STALE)
				bpf_map_delete_elem(&conntrack6, &s->fwd);
			metrics_count(skb, d.reason, dir);
			ipv6_report(skb, s, ep, dir, peer, EVENT_DROP, d.reason, d.verdict, d.match,
				    now);
			return POLICY_DENY;
		}
		d.verdict = EVENT_VERDICT_AUDIT;
		ct_flags = CT_F_AUDIT;
		metrics_count(skb, REASON_POLICY_AUDIT, dir);
	}
	if (ct == CT_STALE && entry) {
		ct_restamp(entry, revision, epoch, l4->proto, l4->tcp_flags, ct_flags);
	} else if (!l4->icmp_error && ct_starts_connection(l4->proto, l4->tcp_flags)) {
		ct_create(&conntrack6, &s->fwd, revision, epoch, ct_flags, now);
	}
	if (state && (d.verdict == EVENT_VERDICT_AUDIT ||
		      policy_allow_reported(pcfg, ep, dir, peer, l4->proto, l4->dport, d.verdict,
					    now)))
		ipv6_report(skb, s, ep, dir, peer, EVENT_POLICY_VERDICT, d.reason, d.verdict,
			    d.match, now);
	return POLICY_ALLOW;
}

/* Judges the IPv6 packet in `s` at (ep, dir): by policy when the node
 * enforces IPv6 policy, else fail closed. A tc verdict. A subprogram: its
 * policy state and the service path's (lib/lb6_nat.h) are not added up on the
 * hooks' stack. */
static __noinline __attribute__((unused)) int ipv6_judge(struct __sk_buff *skb,
							 struct ipv6_scratch *s,
							 const struct endpoint_info *ep,
							 __u32 peer, __u8 dir)
{
	if (!ipv6_policy_enforced())
		return ipv6_fail_closed(skb, s, ep, peer, dir);
	return policy_enforce6(skb, s, ep, dir, peer) == POLICY_ALLOW ? TC_ACT_OK : TC_ACT_SHOT;
}
