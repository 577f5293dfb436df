/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* from_netdev: tc ingress on the node's uplink. In native-routing mode
 * packets for local pods arrive here unencapsulated; they are delivered
 * straight into the pod, the sender's identity taken from the ipcache.
 *
 * Services from outside the node (lib/lb_nat.h): a packet to a NodePort on a
 * node address, a LoadBalancer IP or an externalIP is translated to a backend
 * (loadBalancerSourceRanges checked, a service without backends rejected with
 * RST / ICMP port unreachable), delivered into a local backend with the
 * client's address, or SNATed to the node's address and sent to a remote one;
 * the answers of SNATed connections are reversed here and sent back out.
 *
 * IPv6 (lib/lb6_nat.h): the same for IPv6 frontends, in a subprogram of its
 * own (state in the IPv6 scratch map); translated packets for local backends
 * are routed by the stack into the pod (its to_container6 judges them), as
 * all IPv6 for local pods is.
 *
 * Everything else (the node's own traffic, VXLAN UDP) goes to the stack
 * untouched and uncounted. */

#include "lib/common.h"
#include "lib/egress.h"
#include "lib/endpoint.h"
#include "lib/l4.h"
#include "lib/lb6_nat.h"
#include "lib/lb_nat.h"
#include "lib/maps.h"
#include "lib/metrics.h"

/* An IPv6 packet from outside: the answer of a SNATed connection reversed and
 * sent back by the FIB; a packet to an IPv6 frontend translated, rejected or
 * refused; anything else (and IPv6 for local pods) to the stack. */
static __noinline int from_netdev6(struct __sk_buff *skb)
{
	struct ipv6_scratch *s = ipv6_scratch_get();
	int rc;

	if (!s || parse_ipv6(skb, &s->l4) < 0)
		return TC_ACT_OK;
	if (s->l4.proto != IPPROTO_TCP && s->l4.proto != IPPROTO_UDP)
		return TC_ACT_OK;
	/* A local pod's (east-west answers are reversed at its to_container6). */
	if (lookup_endpoint6(s->l4.daddr))
		return TC_ACT_OK;
	rc = lb6_reverse(skb, &s->l4);
	if (rc < 0)
		return drop(skb, DROP_LB_NAT, DIR_INGRESS);
	if (rc > 0)
		return lb6_redirect_fib(skb, DIR_INGRESS);
	rc = lb6_forward(skb, &s->l4, 1);
	switch (rc) {
	case LB_PASS:
		return TC_ACT_OK;
	case LB_NO_BACKEND:
		return lb6_reject(skb, &s->l4, DIR_INGRESS);
	case LB_DENIED:
		return drop(skb, DROP_LB_SOURCE_RANGE, DIR_INGRESS);
	case LB_NO_LOCAL_BACKEND:
		return drop(skb, DROP_LB_NO_BACKEND, DIR_INGRESS);
	case LB_TRANSLATED:
		break;
	default:
		return drop(skb, DROP_LB_NAT, DIR_INGRESS);
	}
	if (parse_ipv6(skb, &s->l4) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_INGRESS);
	if (!lookup_endpoint6(s->l4.daddr))
		return lb6_to_remote(skb, IDENTITY_HOST, DIR_INGRESS);
	metrics_count(skb, REASON_DELIVER_VIA_STACK, DIR_INGRESS);
	return TC_ACT_OK;
}

/* A service packet from outside: translated, rejected, or left to the stack. */
static __always_inline int from_netdev_service(struct __sk_buff *skb, struct pkt4 *pkt,
					       struct l4_info *l4)
{
	struct node_config *cfg = lookup_node_config();
	struct endpoint_info *dst_ep;
	struct l4_info translated;
	__be32 client;
	int rc;

	rc = lb4_reverse(skb, l4);
	if (rc < 0)
		return drop(skb, DROP_LB_NAT, DIR_INGRESS);
	if (rc > 0)
		return lb4_redirect_fib(skb, DIR_INGRESS);
	rc = lb4_forward(skb, l4, 1, cfg ? cfg->node_ipv4 : 0);
	switch (rc) {
	case LB_PASS:
		return TC_ACT_OK;
	case LB_NO_BACKEND:
		return lb4_reject(skb, l4, DIR_INGRESS);
	case LB_DENIED:
		return drop(skb, DROP_LB_SOURCE_RANGE, DIR_INGRESS);
	case LB_NO_LOCAL_BACKEND:
		return drop(skb, DROP_LB_NO_BACKEND, DIR_INGRESS);
	case LB_TRANSLATED:
		break;
	default:
		return drop(skb, DROP_LB_NAT, DIR_INGRESS);
	}
	if (parse_ipv4(skb, pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_INGRESS);
	dst_ep = lookup_endpoint4(pkt->ip4->daddr);
	if (!dst_ep)
		return lb4_to_remote(skb, IDENTITY_HOST, DIR_INGRESS);
	client = pkt->ip4->saddr;
	parse_l4(skb, pkt, &translated);
	return deliver_local4(skb, pkt, dst_ep, resolve_identity4(client), &translated,
			      DIR_INGRESS);
}

/* Everything but egress gateway answers; a subprogram, so its stack and
 * egress4_reply's are not added up. */
static __noinline int from_netdev_ipv4(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct l4_info l4;
	struct pkt4 pkt;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (parse_ipv4(skb, &pkt) < 0)
		return TC_ACT_OK;
	dst_ep = lookup_endpoint4(pkt.ip4->daddr);
	parse_l4(skb, &pkt, &l4);
	if (!dst_ep)
		return from_netdev_service(skb, &pkt, &l4);
	return deliver_local4(skb, &pkt, dst_ep, resolve_identity4(pkt.ip4->saddr), &l4,
			      DIR_INGRESS);
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	int rc;

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return from_netdev6(skb);
	/* The answer of a pod's connection SNATed here (lib/egress.h). */
	rc = egress4_reply(skb);
	if (rc != EGRESS_PASS)
		return rc;
	return from_netdev_ipv4(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
