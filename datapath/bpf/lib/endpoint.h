/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Delivery into a local pod (to-container), shared by every hook that can
 * find a local destination: ingress policy, TTL, MACs, then a redirect into
 * the pod's network namespace straight from the host-side veth. `dir` labels
 * the forwarding counters (the calling hook's direction); policy drops are
 * counted as ingress, the direction of the policy that dropped. */
#pragma once

#include "eth.h"
#include "maps.h"
#include "metrics.h"
#include "policy.h"

static __always_inline int deliver_local4(struct __sk_buff *skb, struct pkt4 *pkt,
					  const struct endpoint_info *ep, __u32 src_identity,
					  const struct l4_info *l4, __u8 dir)
{
	if (policy_ingress(skb, ep, src_identity, l4) != POLICY_ALLOW)
		return TC_ACT_SHOT;
	if (ipv4_dec_ttl(pkt->ip4) < 0)
		return drop(skb, DROP_TTL_EXCEEDED, dir);
	eth_rewrite(pkt->eth, ep->mac, ep->node_mac);
	metrics_count(skb, REASON_FORWARD_LOCAL, dir);
	/* Into the peer (pod-side) device of the host-side veth, skipping the
	 * host stack and the backlog queue. */
	return bpf_redirect_peer(ep->ifindex, 0);
}
