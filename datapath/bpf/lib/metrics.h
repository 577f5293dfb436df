/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Per-reason, per-direction packet and byte counters. Reasons below 128 are
 * forwarding outcomes, 128 and above are drops (Cilium's convention). The
 * Rust mirror is `MetricReason` in datapath/src/bpf/maps/layout.rs. */
#pragma once

#include "events.h"
#include "maps.h"

enum metric_reason {
	REASON_FORWARD_LOCAL = 1, /* redirected into a local pod */
	REASON_FORWARD_TUNNEL = 2, /* encapsulated towards another node */
	REASON_TO_STACK_UNKNOWN = 3, /* destination not in the ipcache */
	REASON_TO_STACK_NATIVE = 4, /* known destination without tunnel: routed */
	REASON_TO_STACK_NON_IPV4 = 5, /* ARP, IPv6, ...: left to the stack */
	REASON_TO_STACK_HOST = 6, /* for the node itself */
	REASON_DELIVER_VIA_STACK = 7, /* routed by the host stack into a pod */
	REASON_POLICY_AUDIT = 8, /* policy would drop it; passed in audit mode */
	REASON_EVENT_LOST = 9, /* the events ring buffer was full */
	REASON_LB_TRANSLATED = 10, /* a service packet translated and sent on by the FIB */
	REASON_LB_REJECTED = 11, /* a service without backends answered with RST/ICMP */
	REASON_LB_SNAT_PORT_REUSED = 12, /* an idle connection's SNAT port given to a new one */
	REASON_EGRESS_REDIRECT = 13, /* egress gateway: tunnelled to the gateway node */
	REASON_EGRESS_SNAT = 14, /* egress gateway: SNATed to the egress IP and sent out */
	REASON_EGRESS_SNAT_PORT_REUSED = 15, /* an idle egress connection's port given away */
	REASON_LB_CLIENT_PORT_REMAPPED = 16, /* a kept client address, its port taken: remapped */
	DROP_INVALID_SOURCE = 130, /* source IP not the endpoint's on that veth */
	DROP_INVALID_PACKET = 131,
	DROP_TTL_EXCEEDED = 132,
	DROP_POLICY = 133, /* default deny: no rule allows it */
	DROP_NO_TUNNEL_DEVICE = 134,
	DROP_TUNNEL_KEY = 135, /* setting or reading the tunnel key failed */
	DROP_IDENTITY_TOO_LARGE = 136, /* identity does not fit the 24-bit VNI */
	DROP_NO_TUNNEL_ENDPOINT = 137, /* routed into the overlay, not behind a tunnel */
	DROP_UNSUPPORTED_L3 = 138, /* e.g. IPv6 routed into the overlay */
	DROP_POLICY_DENY = 139, /* an explicit deny rule */
	DROP_LB_NO_BACKEND = 140, /* a service without backends (not rejectable) */
	DROP_LB_SOURCE_RANGE = 141, /* loadBalancerSourceRanges refuse the client */
	DROP_LB_NO_ROUTE = 142, /* no route for a translated packet */
	DROP_LB_NAT = 143, /* a NAT rewrite or entry failed */
	DROP_EGRESS_NO_GATEWAY = 144, /* an egress policy matches, no gateway node is eligible */
	DROP_EGRESS_SNAT = 145, /* egress SNAT failed: no free port, or the rewrite failed */
	DROP_EGRESS_UNSUPPORTED = 146, /* egress gateway traffic other than TCP/UDP */
	DROP_EGRESS_NOT_GATEWAY = 147, /* tunnelled for outside, this node is not its gateway */
	DROP_IPV6_POLICY_NOT_ENFORCED = 148, /* IPv6 of a policy-selected endpoint (lib/ipv6.h) */
};

static __always_inline void metrics_count(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	struct metrics_key key = { .reason = reason, .dir = dir };
	struct metrics_value *value = bpf_map_lookup_elem(&metrics, &key);

	if (value) {
		/* Per-CPU value: no other writer, no atomics needed. */
		value->packets += 1;
		value->bytes += skb->len;
		return;
	}
	struct metrics_value first = { .packets = 1, .bytes = skb->len };
	/* If the map is full the count is lost; the agent watches map pressure. */
	bpf_map_update_elem(&metrics, &key, &first, BPF_NOEXIST);
}

/* Counts and reports a drop; returns the tc verdict. */
static __always_inline int drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	metrics_count(skb, reason, dir);
	if (event_drop(skb, reason, dir) < 0)
		metrics_count(skb, REASON_EVENT_LOST, dir);
	return TC_ACT_SHOT;
}
