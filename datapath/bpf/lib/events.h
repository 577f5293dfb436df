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

/* The IPv6 twin of event_output; its prototype puts struct policy_event6
 * into the BTF. */
static __noinline __attribute__((unused)) int event_output6(const struct policy_event6 *ev)
{
	return bpf_ringbuf_output(&events, (void *)ev, sizeof(*ev), 0) < 0 ? -1 : 0;
}

/* event_drop of an IPv6 packet, written straight into the ring (no stack: it
 * is inlined into the IPv4 paths' drop sites, whose stack is all used). */
static __always_inline int event_drop6(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	struct policy_event6 *ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	__u8 next = 0;

	if (!ev)
		return -1;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->base.ts_ns = bpf_ktime_get_ns();
	ev->base.type = EVENT_DROP;
	ev->base.reason = reason;
	ev->base.dir = dir;
	ev->base.ifindex = skb->ifindex;
	/* Both addresses (contiguous in header and event), then the next header:
	 * the transport unless extension headers follow. */
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 8, ev->saddr6, 32) == 0 &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 6, &next, 1) == 0)
		ev->base.proto = next;
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* A drop outside policy: the reason and what the IP header tells. */
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

	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return event_drop6(skb, reason, dir);
	if (skb->protocol == bpf_htons(ETH_P_IP) &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip4, sizeof(ip4)) == 0) {
		ev.proto = ip4.protocol;
		ev.saddr = ip4.saddr;
		ev.daddr = ip4.daddr;
	}
	return event_output(&ev);
}
