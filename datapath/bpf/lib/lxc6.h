/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The IPv6 bodies of a pod veth's hooks (bpf_lxc.c's from_container_ipv6 and
 * to_container_ipv6): policy as lib/ipv6.h describes, and the tc service path
 * of lib/lb6_nat.h for what the socket LB did not translate.
 *
 * - from_container6: a packet to an IPv6 frontend is translated before policy
 *   judges it (policy sees the backend), one to a service without backends is
 *   rejected back into the pod. A backend's answer is judged as sent; answers
 *   of north-south connections then get the frontend back and leave by the
 *   FIB, hairpin answers get it and go back into the pod by the stack.
 * - to_container6: the answer of a pod's translated connection (from a local
 *   or remote backend, routed by the stack) is judged as sent, then gets the
 *   frontend back as its source on its way into the pod. */
#pragma once

#include "ipv6.h"
#include "lb6_nat.h"

/* from_container's IPv6: a tc verdict, or -reason for a drop the caller
 * reports. */
static __noinline int from_container6(struct __sk_buff *skb)
{
	struct ipv6_scratch *s = ipv6_scratch_get();
	struct ipcache_value *dst_info;
	struct endpoint_info *src_ep;
	__u32 dst_identity;
	int rc, reply;

	if (!s)
		return -DROP_INVALID_PACKET;
	if (parse_ipv6(skb, &s->l4) < 0)
		return -DROP_INVALID_PACKET;
	if (ipv6_is_link_control(&s->l4)) {
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_EGRESS);
		return TC_ACT_OK;
	}
	src_ep = lookup_endpoint6(s->l4.saddr);
	if (!src_ep || src_ep->ifindex != skb->ifindex)
		return -DROP_INVALID_SOURCE;
	reply = lb6_is_reply(&s->l4);
	if (!reply) {
		rc = lb6_forward(skb, &s->l4, 0);
		if (rc == LB_NO_BACKEND)
			return lb6_reject(skb, &s->l4, DIR_EGRESS);
		if (rc != LB_PASS && rc != LB_TRANSLATED)
			return rc == LB_NO_LOCAL_BACKEND ? -DROP_LB_NO_BACKEND : -DROP_LB_NAT;
		if (rc == LB_TRANSLATED && parse_ipv6(skb, &s->l4) < 0)
			return -DROP_INVALID_PACKET;
	}
	dst_info = lookup_ipcache6(s->l4.daddr);
	dst_identity = dst_info ? dst_info->identity : IDENTITY_WORLD;
	if (!ipv6_is_must_pass_error(&s->l4)) {
		rc = ipv6_judge(skb, s, src_ep, dst_identity, DIR_EGRESS);
		if (rc != TC_ACT_OK)
			return rc;
	}
	/* Other answers are reversed at the client's to_container6. */
	if (reply && ((reply - 1) & (LB_NAT_F_NORTH_SOUTH | LB_NAT_F_HAIRPIN))) {
		if (lb6_reverse(skb, &s->l4) < 0)
			return -DROP_LB_NAT;
		if ((reply - 1) & LB_NAT_F_NORTH_SOUTH)
			return lb6_redirect_fib(skb, DIR_EGRESS);
	}
	/* The host stack routes it; the mark tells to_container6 (or, across
	 * nodes, to_overlay: the VNI) who sent it, also when this node does not
	 * judge IPv6, so a pod is never taken for the node itself. */
	skb->mark = identity_to_mark(src_ep->identity);
	if (!ipv6_policy_enforced()) {
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_EGRESS);
		return TC_ACT_OK;
	}
	if (!dst_info)
		metrics_count(skb, REASON_TO_STACK_UNKNOWN, DIR_EGRESS);
	else if (dst_info->flags & IPCACHE_F_LOCAL_NODE)
		metrics_count(skb, REASON_TO_STACK_HOST, DIR_EGRESS);
	else
		metrics_count(skb, REASON_TO_STACK_NATIVE, DIR_EGRESS);
	return TC_ACT_OK;
}

/* to_container's IPv6, returning as from_container6 does. A destination that
 * is no known endpoint address (a link-local or multicast one) cannot be
 * matched to its endpoint's policy: dropped, as IPv6 the node cannot judge. */
static __noinline int to_container6(struct __sk_buff *skb)
{
	struct ipv6_scratch *s = ipv6_scratch_get();
	struct endpoint_info *dst_ep;
	__u32 src_identity;
	int rc;

	if (!s)
		return -DROP_INVALID_PACKET;
	if (parse_ipv6(skb, &s->l4) < 0)
		return -DROP_INVALID_PACKET;
	if (ipv6_is_link_control(&s->l4))
		return TC_ACT_OK;
	dst_ep = lookup_endpoint6(s->l4.daddr);
	if (!dst_ep)
		return -DROP_IPV6_POLICY_NOT_ENFORCED;
	if (!ipv6_is_must_pass_error(&s->l4)) {
		src_identity = mark_to_identity(skb->mark);
		if (src_identity == IDENTITY_UNKNOWN)
			src_identity = resolve_identity6(s->l4.saddr);
		rc = ipv6_judge(skb, s, dst_ep, src_identity, DIR_INGRESS);
		if (rc != TC_ACT_OK)
			return rc;
	}
	if (lb6_reverse(skb, &s->l4) < 0)
		return -DROP_LB_NAT;
	metrics_count(skb, REASON_DELIVER_VIA_STACK, DIR_INGRESS);
	return TC_ACT_OK;
}
