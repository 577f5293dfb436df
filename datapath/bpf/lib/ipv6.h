/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* IPv6 at a pod's veth while the node does not enforce IPv6 policy: fail
 * closed. The IPv4 programs judge every packet against policy; IPv6 has no
 * policy lookups yet, so instead of letting it pass unjudged:
 *
 * - neighbour discovery and MLD (link-local control: RS/RA/NS/NA/redirect with
 *   hop limit 255, MLD with hop limit 1) always pass, so links work;
 * - anything else leaving a pod (from_container6) must carry the address of
 *   the endpoint behind that veth (anti-spoofing, as for IPv4), and anything
 *   entering one (to_container6) must be for a known endpoint address;
 * - IPv6 of an endpoint some policy selects (POLICY_F_SELECTED) is dropped as
 *   DROP_IPV6_POLICY_NOT_ENFORCED, counted and reported (audit mode: counted as
 *   REASON_POLICY_AUDIT, reported with verdict audit, passed); an endpoint
 *   without policy allows everything anyway, so its IPv6 passes.
 *
 * The agent reports this in NodeNetwork status (condition IPv6Policy). Only
 * the non-IPv4 branches of bpf_lxc.c call in here: the IPv4 path is untouched. */
#pragma once

#include "common.h"
#include "events.h"
#include "maps.h"
#include "metrics.h"

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

/* What the fail-closed check needs of an IPv6 packet besides what its event
 * carries (addresses, protocol, ports: parsed straight into the event, so the
 * subprogram's stack, which adds to the IPv4 hook's in the verifier's count,
 * holds one copy). */
struct pkt6_meta {
	__u8 hop_limit;
	__u8 icmp_type;
};

/* Returns 0 when `skb` holds an IPv6 header after Ethernet; fills the
 * addresses, protocol (the upper layer after extension headers) and ports
 * (host order; the echo id for ICMPv6 echo) of `ev`. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct policy_event6 *ev,
				      struct pkt6_meta *meta)
{
	__u32 off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	__u8 hdr[8];
	__u8 next;
	int i;

	__builtin_memset(ev, 0, sizeof(*ev));
	meta->icmp_type = 0xFF;
	/* Version .. hop limit, then both addresses (contiguous in header and event). */
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), hdr, 8) < 0 || (hdr[0] >> 4) != 6 ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 8, ev->saddr6, 32) < 0)
		return -1;
	meta->hop_limit = hdr[7];
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
		/* A later fragment has no transport header. */
		if ((((__u16)hdr[2] << 8) | hdr[3]) & IPV6_FRAG_OFFSET_MASK) {
			ev->base.proto = next;
			return 0;
		}
	}
	ev->base.proto = next;
	if (proto_has_ports(next)) {
		if (bpf_skb_load_bytes(skb, off, hdr, 4) < 0)
			return 0;
		ev->base.sport = ((__u16)hdr[0] << 8) | hdr[1];
		ev->base.dport = ((__u16)hdr[2] << 8) | hdr[3];
		if (next == IPPROTO_TCP)
			bpf_skb_load_bytes(skb, off + 13, &ev->base.tcp_flags, 1);
	} else if (next == IPPROTO_ICMPV6) {
		if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
			return 0;
		meta->icmp_type = hdr[0];
		ev->base.icmp_type = hdr[0];
		ev->base.icmp_code = hdr[1];
		if (hdr[0] == ICMPV6_ECHO_REQUEST || hdr[0] == ICMPV6_ECHO_REPLY) {
			ev->base.sport = ((__u16)hdr[4] << 8) | hdr[5];
			ev->base.dport = ev->base.sport;
		}
	}
	return 0;
}

/* Neighbour discovery and MLD: what a link needs to work. The hop limits are
 * the ones their receivers require (RFC 4861 §6.1, RFC 3810 §5), so routed
 * traffic cannot pose as either. */
static __always_inline int ipv6_is_link_control(__u8 proto, const struct pkt6_meta *meta)
{
	if (proto != IPPROTO_ICMPV6)
		return 0;
	if (meta->icmp_type >= ICMPV6_ROUTER_SOLICIT && meta->icmp_type <= ICMPV6_NDISC_REDIRECT)
		return meta->hop_limit == 255;
	if ((meta->icmp_type >= ICMPV6_MLD_QUERY && meta->icmp_type <= ICMPV6_MLD_DONE) ||
	    meta->icmp_type == ICMPV6_MLD2_REPORT)
		return meta->hop_limit == 1;
	return 0;
}

/* The identity of an IPv6 address seen from this node (world if unknown). */
static __always_inline __u32 resolve_identity6(const __u8 *ip6)
{
	struct ipcache_value *info = lookup_ipcache6(ip6);

	return info ? info->identity : IDENTITY_WORLD;
}

/* The verdict for IPv6 of local endpoint `ep` at enforcement point `dir`:
 * TC_ACT_OK when it has no policy (or in audit mode), else TC_ACT_SHOT, the
 * verdict reported with the event `ev` parse_ipv6 filled. */
static __always_inline int ipv6_fail_closed(struct __sk_buff *skb, struct policy_event6 *ev,
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
	ev->base.ts_ns = bpf_ktime_get_ns();
	ev->base.type = audit ? EVENT_POLICY_VERDICT : EVENT_DROP;
	ev->base.reason = DROP_IPV6_POLICY_NOT_ENFORCED;
	ev->base.dir = dir;
	ev->base.verdict = audit ? EVENT_VERDICT_AUDIT : EVENT_VERDICT_DENY;
	ev->base.match = EVENT_MATCH_DEFAULT;
	ev->base.endpoint_id = endpoint_id;
	ev->base.src_identity = dir == DIR_INGRESS ? peer : ep->identity;
	ev->base.dst_identity = dir == DIR_INGRESS ? ep->identity : peer;
	ev->base.ifindex = skb->ifindex;
	if (event_output6(ev) < 0)
		metrics_count(skb, REASON_EVENT_LOST, dir);
	if (audit) {
		metrics_count(skb, REASON_POLICY_AUDIT, dir);
		return TC_ACT_OK;
	}
	metrics_count(skb, DROP_IPV6_POLICY_NOT_ENFORCED, dir);
	return TC_ACT_SHOT;
}

/* from_container's IPv6: a tc verdict, or -reason for a drop the caller
 * reports (drop() from here would stack its event on top of this frame). A
 * subprogram, so the IPv4 path's code and stack stay as they are. */
static __noinline int from_container6(struct __sk_buff *skb)
{
	struct endpoint_info *src_ep;
	struct policy_event6 ev;
	struct pkt6_meta meta;
	int rc;

	if (parse_ipv6(skb, &ev, &meta) < 0)
		return -DROP_INVALID_PACKET;
	if (ipv6_is_link_control(ev.base.proto, &meta)) {
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_EGRESS);
		return TC_ACT_OK;
	}
	src_ep = lookup_endpoint6(ev.saddr6);
	if (!src_ep || src_ep->ifindex != skb->ifindex)
		return -DROP_INVALID_SOURCE;
	rc = ipv6_fail_closed(skb, &ev, src_ep, resolve_identity6(ev.daddr6), DIR_EGRESS);
	if (rc == TC_ACT_OK)
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_EGRESS);
	return rc;
}

/* to_container's IPv6, returning as from_container6 does. A destination that
 * is no known endpoint address (a link-local or multicast one) cannot be
 * matched to its endpoint's policy: dropped, as IPv6 the node cannot judge. */
static __noinline int to_container6(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct policy_event6 ev;
	struct pkt6_meta meta;
	__u32 src_identity;
	int rc;

	if (parse_ipv6(skb, &ev, &meta) < 0)
		return -DROP_INVALID_PACKET;
	if (ipv6_is_link_control(ev.base.proto, &meta))
		return TC_ACT_OK;
	dst_ep = lookup_endpoint6(ev.daddr6);
	if (!dst_ep)
		return -DROP_IPV6_POLICY_NOT_ENFORCED;
	src_identity = mark_to_identity(skb->mark);
	if (src_identity == IDENTITY_UNKNOWN)
		src_identity = resolve_identity6(ev.saddr6);
	rc = ipv6_fail_closed(skb, &ev, dst_ep, src_identity, DIR_INGRESS);
	if (rc == TC_ACT_OK)
		metrics_count(skb, REASON_DELIVER_VIA_STACK, DIR_INGRESS);
	return rc;
}
