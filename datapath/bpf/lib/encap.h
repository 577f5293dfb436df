/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* VXLAN overlay: the source security identity travels in the VNI (the
 * tunnel id of the collect-metadata device), so the receiving node judges
 * ingress policy without looking up the sender's IP. */
#pragma once

#include "maps.h"
#include "metrics.h"

static __always_inline int encap_and_redirect(struct __sk_buff *skb, __be32 tunnel_endpoint,
					      __u32 src_identity, __u8 dir)
{
	struct node_config *cfg = lookup_node_config();
	struct bpf_tunnel_key key = {};

	if (!cfg || !cfg->tunnel_ifindex)
		return drop(skb, DROP_NO_TUNNEL_DEVICE, dir);
	if (src_identity > IDENTITY_MAX_VNI)
		return drop(skb, DROP_IDENTITY_TOO_LARGE, dir);
	key.tunnel_id = src_identity;
	key.remote_ipv4 = bpf_ntohl(tunnel_endpoint);
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return drop(skb, DROP_TUNNEL_KEY, dir);
	metrics_count(skb, REASON_FORWARD_TUNNEL, dir);
	return bpf_redirect(cfg->tunnel_ifindex, 0);
}

/* The sender's identity from the tunnel key, or -1 when the packet carries
 * no tunnel metadata. */
static __always_inline long tunnel_source_identity(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return -1;
	return key.tunnel_id & IDENTITY_MAX_VNI;
}
