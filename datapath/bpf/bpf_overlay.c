/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Hooks on the collect-metadata VXLAN device.
 *
 * from_overlay (tc ingress): the VNI is the sender's security identity (the
 * sending node's host identity becomes remote-node); a
 * local destination gets the packet straight into its pod, anything else
 * (the node itself) goes to the stack with the identity in skb->mark. Answers
 * of a local pod's translated service connections get the frontend back as
 * their source (lib/lb_nat.h).
 *
 * to_overlay (tc egress): packets the host stack routes into the device
 * (the node's own traffic to remote pods) get their tunnel key from the
 * ipcache; packets from_container already encapsulated pass untouched.
 *
 * IPv6 rides inside the IPv4 underlay: pods' IPv6 reaches the device through
 * the host stack (from_container6 leaves the sender's identity in the mark,
 * lib/ipv6.h), to_overlay puts that identity in the VNI and the inner
 * destination's node (its ipcache entry) in the key; from_overlay hands it to
 * the stack with the VNI's identity in the mark, and the destination pod's
 * to_container6 judges it by that identity. */

#include "lib/common.h"
#include "lib/egress.h"
#include "lib/encap.h"
#include "lib/endpoint.h"
#include "lib/l4.h"
#include "lib/lb6_nat.h"
#include "lib/lb_nat.h"
#include "lib/maps.h"
#include "lib/metrics.h"

/* IPv6 from another node: routed by the stack to the pod's veth, whose
 * to_container6 judges it by the sender's identity from the VNI (the mark
 * survives forwarding within the node's namespace). */
static __noinline int from_overlay6(struct __sk_buff *skb, __u32 src_identity)
{
	struct ipv6_scratch *s = ipv6_scratch_get();
	int rc;

	/* A remote backend's answer to a north-south connection SNATed here
	 * (lib/lb6_nat.h): back to the client by the FIB. */
	if (s && parse_ipv6(skb, &s->l4) == 0 && !lookup_endpoint6(s->l4.daddr)) {
		rc = lb6_reverse(skb, &s->l4);
		if (rc < 0)
			return drop(skb, DROP_LB_NAT, DIR_INGRESS);
		if (rc > 0)
			return lb6_redirect_fib(skb, DIR_INGRESS);
	}
	skb->mark = identity_to_mark(src_identity);
	/* The inner destination MAC is the sender's device's: see from_overlay. */
	bpf_skb_change_type(skb, PACKET_HOST);
	metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_INGRESS);
	return TC_ACT_OK;
}

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	struct endpoint_info *dst_ep;
	struct l4_info l4;
	struct pkt4 pkt;
	long src_identity;
	int rc;

	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6)) {
		metrics_count(skb, REASON_TO_STACK_NON_IPV4, DIR_INGRESS);
		return TC_ACT_OK;
	}
	src_identity = tunnel_source_identity(skb);
	if (src_identity < 0)
		return drop(skb, DROP_TUNNEL_KEY, DIR_INGRESS);
	/* The sending node's own traffic: "host" there is "remote-node" here. */
	if (src_identity == IDENTITY_HOST)
		src_identity = IDENTITY_REMOTE_NODE;
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return from_overlay6(skb, (__u32)src_identity);
	if (parse_ipv4(skb, &pkt) < 0)
		return drop(skb, DROP_INVALID_PACKET, DIR_INGRESS);
	parse_l4(skb, &pkt, &l4);

	dst_ep = lookup_endpoint4(pkt.ip4->daddr);
	if (dst_ep) {
		/* A remote backend's answer to a pod's translated connection: the
		 * frontend becomes its source again; policy judges it as sent. */
		if (lb4_is_reply(&l4) &&
		    (lb4_reverse(skb, &l4) < 0 || parse_ipv4(skb, &pkt) < 0))
			return drop(skb, DROP_LB_NAT, DIR_INGRESS);
		return deliver_local4(skb, &pkt, dst_ep, (__u32)src_identity, &l4, DIR_INGRESS);
	}

	/* A pod's traffic this node is the egress gateway for (lib/egress.h). */
	rc = egress4_from_overlay(skb, &l4);
	if (rc != EGRESS_PASS)
		return rc;

	/* The inner destination MAC is not the VXLAN device's; claim the packet
	 * for this host so the stack does not discard it as PACKET_OTHERHOST. */
	skb->mark = identity_to_mark((__u32)src_identity);
	bpf_skb_change_type(skb, PACKET_HOST);
	metrics_count(skb, REASON_TO_STACK_HOST, DIR_INGRESS);
	return TC_ACT_OK;
}

SEC("classifier")
int to_overlay(struct __sk_buff *skb)
{
	struct ipcache_value *dst_info;
	struct bpf_tunnel_key key = {};
	struct pkt4 pkt;
	__u8 daddr6[16];
	__u32 src_identity;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0)
		return TC_ACT_OK;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (parse_ipv4(skb, &pkt) < 0)
			return drop(skb, DROP_INVALID_PACKET, DIR_EGRESS);
		dst_info = lookup_ipcache4(pkt.ip4->daddr);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		/* The inner destination address, after version .. hop limit and
		 * the source. */
		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 24, daddr6, 16) < 0)
			return drop(skb, DROP_INVALID_PACKET, DIR_EGRESS);
		dst_info = lookup_ipcache6(daddr6);
	} else {
		/* The VXLAN device would discard it for want of a tunnel key. */
		return drop(skb, DROP_UNSUPPORTED_L3, DIR_EGRESS);
	}
	if (!dst_info || !dst_info->tunnel_endpoint)
		return drop(skb, DROP_NO_TUNNEL_ENDPOINT, DIR_EGRESS);
	src_identity = mark_to_identity(skb->mark);
	if (src_identity == IDENTITY_UNKNOWN)
		src_identity = IDENTITY_HOST;
	key.tunnel_id = src_identity;
	key.remote_ipv4 = bpf_ntohl(dst_info->tunnel_endpoint);
	key.tunnel_ttl = 64;
	if (src_identity > IDENTITY_MAX_VNI)
		return drop(skb, DROP_IDENTITY_TOO_LARGE, DIR_EGRESS);
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return drop(skb, DROP_TUNNEL_KEY, DIR_EGRESS);
	metrics_count(skb, REASON_FORWARD_TUNNEL, DIR_EGRESS);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
