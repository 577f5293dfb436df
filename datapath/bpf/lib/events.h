/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The `events` ring buffer: policy verdicts of new connections and every
 * drop, read by the agent (datapath/src/bpf/policy.rs: PolicyEvent). A full
 * ring loses the event; the caller counts REASON_EVENT_LOST. */
#pragma once

#include "maps.h"

/* Returns -1 when the ring buffer is full. A BPF subprogram rather than
 * inlined: events are off the fast path, and its prototype puts struct
 * policy_event into the object's BTF (tests/bpf_map_layout.rs checks it). */
static __noinline int event_output(const struct policy_event *ev)
{
	return bpf_ringbuf_output(&events, (void *)ev, sizeof(*ev), 0) < 0 ? -1 : 0;
}

/* A drop outside policy: the reason and what the IPv4 header tells. */
static __always_inline int event_drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	struct policy_event ev = {
		.ts_ns = bpf_ktime_get_ns(),
		.type = EVENT_DROP,
		.reason = reason,
		.dir = dir,
		.ifindex = skb->ifindex,
	};
	struct iphdr ip4;

	if (skb->protocol == bpf_htons(ETH_P_IP) &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip4, sizeof(ip4)) == 0) {
		ev.proto = ip4.protocol;
		ev.saddr = ip4.saddr;
		ev.daddr = ip4.daddr;
	}
	return event_output(&ev);
}
