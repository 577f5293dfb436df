/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Hooks on the host side of each pod veth.
 *
 * from_container (tc ingress): everything a pod sends. A packet to a service
 * frontend the socket LB did not translate (a process outside its cgroup) is
 * translated here (lib/lb_nat.h; policy then judges the backend); answers of
 * translated connections are judged as sent, then get the frontend back as
 * their source (those of north-south ones leave by the FIB). Local destination →
 * straight into that pod; destination behind a tunnel endpoint → VXLAN with
 * the source identity as VNI; anything else → the host stack (native routing,
 * the node itself, the outside world), counted by reason.
 *
 * to_container (tc egress): what the host stack routes into the pod (host
 * traffic, native routing fallbacks), judged by ingress policy.
 *
 * IPv6 in both directions (policy and the IPv6 service path): lib/lxc6.h, in
 * programs of their own reached by a
 * tail call (`ipv6_calls`): the IPv4 hook's stack leaves a subprogram too little
 * room, a tail call starts with a fresh one. A missing entry (never while the
 * agent's pins exist) drops: fail closed. */

#include "lib/common.h"
#include "lib/egress.h"
#include "lib/encap.h"
#include "lib/endpoint.h"
#include "lib/l4.h"
#include "lib/lb_nat.h"
#include "lib/lxc6.h"
#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/policy.h"

/* The IPv6 programs (filled by the loader, pinned so they outlive an agent). */
#define IPV6_CALL_FROM_CONTAINER 0
#define IPV6_CALL_TO_CONTAINER 1
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 2);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipv6_calls SEC(".maps");

SEC("classifier")
int from_container_ipv6(struct __sk_buff *skb)
{
	int rc = from_container6(skb);

	return rc < 0 ? drop(skb, -rc, DIR_EGRESS) : rc;
}

SEC("classifier")
int to_container_ipv6(struct __sk_buff *skb)
{
	int rc = to_container6(skb);

	return rc < 0 ? drop(skb, -rc, DIR_INGRESS) : rc;
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	struct endpoint_info *src_ep, *dst_ep;
	struct ipcache_value *dst_info;
	struct l4_info l4;
	struct pkt4 pkt;
	__u32 dst_identity;
	int translated = 0;
	int reply;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		/* IPv6: lib/ipv6.h, in from_container_ipv6. */
		if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
			bpf_tail_call(skb, &ipv6_calls, IPV6_CALL_FROM_CONTAINER);
			return drop(skb, DROP_IPV6_POLICY_NOT_ENFORCED, DIR_EGRESS);
		}
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_EGRESS);
		return TC_ACT_OK;
	}
	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_EGRESS);

	/* Anti-spoofing: the source must be the endpoint behind this veth. */
	src_ep = lookup_endpoint4(pkt.ip4->saddr);
	if (!src_ep || src_ep->ifindex != skb->ifindex)
		return drop(skb, DROP_INVALID_SOURCE, DIR_EGRESS);
	parse_l4(skb, &pkt, &l4);

	reply = lb4_is_reply(&l4);
	if (!reply) {
		int lb = lb4_forward(skb, &l4, 0, 0);

		if (lb == LB_NO_BACKEND)
			return lb4_reject(skb, &l4, DIR_EGRESS);
		/* One drop site: clang would otherwise keep a pointer into the
		 * context across the branches, which the verifier refuses. */
		if (lb != LB_PASS && lb != LB_TRANSLATED)
			return drop(skb, lb == LB_NO_LOCAL_BACKEND ? DROP_LB_NO_BACKEND : DROP_LB_NAT,
				    DIR_EGRESS);
		if (lb == LB_TRANSLATED) {
			translated = 1;
			if (parse_ipv4(skb, &pkt) < 0)
				return drop(skb, DROP_INVALID_PACKET, DIR_EGRESS);
			parse_l4(skb, &pkt, &l4);
		}
	}

	dst_ep = lookup_endpoint4(pkt.ip4->daddr);
	if (dst_ep) {
		if (policy_egress(skb, src_ep, dst_ep->identity, &l4) != POLICY_ALLOW)
			return TC_ACT_SHOT;
		if (reply) {
			/* Policy at delivery judges the answer as sent, too. */
			if (lb4_reverse(skb, &l4) < 0 || parse_ipv4(skb, &pkt) < 0)
				return drop(skb, DROP_LB_NAT, DIR_EGRESS);
		}
		return deliver_local4(skb, &pkt, dst_ep, src_ep->identity, &l4, DIR_EGRESS);
	}

	dst_info = lookup_ipcache4(pkt.ip4->daddr);
	dst_identity = dst_info ? dst_info->identity : IDENTITY_WORLD;
	if (policy_egress(skb, src_ep, dst_identity, &l4) != POLICY_ALLOW)
		return TC_ACT_SHOT;
	if (reply) {
		if (lb4_reverse(skb, &l4) < 0)
			return drop(skb, DROP_LB_NAT, DIR_EGRESS);
		if ((reply - 1) & LB_NAT_F_NORTH_SOUTH)
			return lb4_redirect_fib(skb, DIR_EGRESS);
		if (parse_ipv4(skb, &pkt) < 0)
			return drop(skb, DROP_INVALID_PACKET, DIR_EGRESS);
		/* A hairpin answer (to the frontend the pod itself was reached
		 * from) goes back into the pod. */
		if ((reply - 1) & LB_NAT_F_HAIRPIN) {
			dst_ep = lookup_endpoint4(pkt.ip4->daddr);
			if (dst_ep)
				return deliver_local4(skb, &pkt, dst_ep, src_ep->identity, &l4,
						      DIR_EGRESS);
		}
	}

	/* Egress gateways (lib/egress.h), once policy has judged: a service
	 * connection (translated, or the answer of one) never leaves through one. */
	if (!reply && !translated) {
		int egress = egress4_from_pod(skb, &l4, src_ep->identity);

		if (egress != EGRESS_PASS)
			return egress;
		/* The subprogram may have moved packet data (it did not here: parsing
		 * the same packet again cannot fail). */
		if (parse_ipv4(skb, &pkt) < 0)
			return TC_ACT_SHOT;
	}

	if (dst_info && dst_info->tunnel_endpoint) {
		if (ipv4_dec_ttl(pkt.ip4) < 0)
			return drop(skb, DROP_TTL_EXCEEDED, DIR_EGRESS);
		return encap_and_redirect(skb, dst_info->tunnel_endpoint, src_ep->identity,
					  DIR_EGRESS);
	}

	/* The host stack routes it; the mark tells later hooks who sent it. */
	skb->mark = identity_to_mark(src_ep->identity);
	if (!dst_info)
		metrics_count(skb, REASON_TO_STACK_UNKNOWN, DIR_EGRESS);
	else if (dst_info->flags & IPCACHE_F_LOCAL_NODE)
		metrics_count(skb, REASON_TO_STACK_HOST, DIR_EGRESS);
	else
		metrics_count(skb, REASON_TO_STACK_NATIVE, DIR_EGRESS);
	return TC_ACT_OK;
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct l4_info l4;
	struct pkt4 pkt;
	__u32 src_identity;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
			bpf_tail_call(skb, &ipv6_calls, IPV6_CALL_TO_CONTAINER);
			return drop(skb, DROP_IPV6_POLICY_NOT_ENFORCED, DIR_INGRESS);
		}
		return TC_ACT_OK;
	}
	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_INGRESS);
	dst_ep = lookup_endpoint4(pkt.ip4->daddr);
	if (!dst_ep)
		return TC_ACT_OK;
	parse_l4(skb, &pkt, &l4);

	src_identity = mark_to_identity(skb->mark);
	if (src_identity == IDENTITY_UNKNOWN)
		src_identity = resolve_identity4(pkt.ip4->saddr);
	if (policy_ingress(skb, dst_ep, src_identity, &l4) != POLICY_ALLOW)
		return TC_ACT_SHOT;
	metrics_count(skb, REASON_DELIVER_VIA_STACK, DIR_INGRESS);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
