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

/* A drop's transport details, its L4 header at `off`: ports, TCP flags, ICMP type
 * and code, loaded straight into the event (no stack: the drop sites' is all used).
 * Read only when a drop is reported, so no packet path parses more. */
static __always_inline void event_l4(struct __sk_buff *skb, struct policy_event *ev, __u32 off)
{
	if (ev->proto == IPPROTO_TCP || ev->proto == IPPROTO_UDP || ev->proto == IPPROTO_SCTP) {
		/* The ports are contiguous in header and event. */
		if (bpf_skb_load_bytes(skb, off, &ev->sport, 4) < 0)
			return;
		ev->sport = bpf_ntohs(ev->sport);
		ev->dport = bpf_ntohs(ev->dport);
		if (ev->proto == IPPROTO_TCP)
			bpf_skb_load_bytes(skb, off + 13, &ev->tcp_flags, 1);
	} else if (ev->proto == IPPROTO_ICMP || ev->proto == IPPROTO_ICMPV6) {
		/* Type and code, contiguous in header and event. */
		bpf_skb_load_bytes(skb, off, &ev->icmp_type, 2);
	}
}

/* The ICMP type and code of the IPv4 packet (after Ethernet) a policy event is about:
 * read at event time, so the per-packet parse (struct l4_info) stays as it is. */
static __always_inline void event_icmp4(struct __sk_buff *skb, struct policy_event *ev)
{
	__be16 frag_off = 0;
	__u8 ihl = 0;

	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ihl, 1) == 0 &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 6, &frag_off, 2) == 0 &&
	    !(frag_off & bpf_htons(0x1FFF)))
		bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + (ihl & 0x0F) * 4, &ev->icmp_type, 2);
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
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 6, &next, 1) == 0) {
		ev->base.proto = next;
		event_l4(skb, &ev->base, sizeof(struct ethhdr) + sizeof(struct ipv6hdr));
	}
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* A drop outside policy: the reason and what the IP and transport headers tell,
 * written straight into the ring (no stack, as event_drop6). */
static __always_inline int event_drop(struct __sk_buff *skb, __u8 reason, __u8 dir)
{
	struct policy_event *ev;
	__be16 frag_off = 0;
	__u32 protocol;
	__u8 ihl = 0;

	/* One read straight off the context: the verifier refuses a context pointer that
	 * the compiler offset earlier and kept in a register. */
	barrier_var(skb);
	protocol = skb->protocol;
	if (protocol == bpf_htons(ETH_P_IPV6))
		return event_drop6(skb, reason, dir);
	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (!ev)
		return -1;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->type = EVENT_DROP;
	ev->reason = reason;
	ev->dir = dir;
	ev->ifindex = skb->ifindex;
	/* Protocol, both addresses (contiguous in header and event); the transport unless
	 * a later fragment, which carries none. */
	if (protocol == bpf_htons(ETH_P_IP) &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ihl, 1) == 0 &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 6, &frag_off, 2) == 0 &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 9, &ev->proto, 1) == 0 &&
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + 12, &ev->saddr, 8) == 0 &&
	    !(frag_off & bpf_htons(0x1FFF)))
		event_l4(skb, ev, sizeof(struct ethhdr) + (ihl & 0x0F) * 4);
	bpf_ringbuf_submit(ev, 0);
	return 0;
}
