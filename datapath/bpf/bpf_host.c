/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* from_netdev: tc ingress on the node's uplink. In native-routing mode
 * packets for local pods arrive here unencapsulated; they are delivered
 * straight into the pod, the sender's identity taken from the ipcache.
 * Everything else (the node's own traffic, VXLAN UDP) goes to the stack
 * untouched and uncounted, so the node's traffic costs one lookup. */

#include "lib/common.h"
#include "lib/endpoint.h"
#include "lib/l4.h"
#include "lib/maps.h"
#include "lib/metrics.h"

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct l4_info l4;
	struct pkt4 pkt;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (parse_ipv4(skb, &pkt) < 0)
		return TC_ACT_OK;
	dst_ep = lookup_endpoint4(pkt.ip4->daddr);
	if (!dst_ep)
		return TC_ACT_OK;
	parse_l4(skb, &pkt, &l4);
	return deliver_local4(skb, &pkt, dst_ep, resolve_identity4(pkt.ip4->saddr), &l4,
			      DIR_INGRESS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
