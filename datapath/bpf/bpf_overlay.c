/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* from_overlay: tc ingress on the collect-metadata VXLAN device. The VNI is
 * the sender's security identity; a local destination gets the packet
 * straight into its pod, anything else (the node itself) goes to the stack
 * with the identity in skb->mark. */

#include "lib/common.h"
#include "lib/encap.h"
#include "lib/endpoint.h"
#include "lib/maps.h"
#include "lib/metrics.h"

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct l4_info l4;
	struct pkt4 pkt;
	long src_identity;

	if (skb->protocol != bpf_htons(ETH_P_IP)) {
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_INGRESS);
		return TC_ACT_OK;
	}
	src_identity = tunnel_source_identity(skb);
	if (src_identity < 0)
		return drop(skb, DROP_TUNNEL_KEY, DIR_INGRESS);
	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_INGRESS);
	parse_l4(&pkt, &l4);

	dst_ep = lookup_endpoint4(pkt.ip4->daddr);
	if (dst_ep)
		return deliver_local4(skb, &pkt, dst_ep, (__u32)src_identity, &l4, DIR_INGRESS);

	/* The inner destination MAC is not the VXLAN device's; claim the packet
	 * for this host so the stack does not discard it as PACKET_OTHERHOST. */
	skb->mark = identity_to_mark((__u32)src_identity);
	bpf_skb_change_type(skb, PACKET_HOST);
	metrics_count(skb, REASON_TO_STACK_HOST, DIR_INGRESS);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
