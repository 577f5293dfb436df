/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The transport tuple of an IPv4 packet (struct l4_info), including the
 * ports of non-first fragments (from ipv4_frags) and the quoted tuple of ICMP
 * errors. */
#pragma once

#include "common.h"
#include "maps.h"

#define IP_MORE_FRAGMENTS 0x2000
#define IP_FRAG_OFFSET 0x1FFF

/* Fills `l4` from the packet; transport headers are read with
 * bpf_skb_load_bytes, so they need not be in the linear area. The first
 * fragment of a fragmented datagram records its ports in ipv4_frags; later
 * fragments (no transport header) take them from there, or none (zero) if
 * the first fragment was not seen. */
static __always_inline void parse_l4(struct __sk_buff *skb, const struct pkt4 *pkt,
				     struct l4_info *l4)
{
	struct iphdr *ip4 = pkt->ip4;
	__u32 off = sizeof(struct ethhdr) + ip4->ihl * 4;
	__u8 icmp_type = 0xFF, inner_type = 0xFF;
	struct frag4_key frag_key = {};
	struct frag4_ports *ports;
	struct iphdr inner;

	__builtin_memset(l4, 0, sizeof(*l4));
	l4->saddr = ip4->saddr;
	l4->daddr = ip4->daddr;
	l4->proto = ip4->protocol;
	if (ip4->frag_off & bpf_htons(IP_FRAG_OFFSET)) {
		frag_key.saddr = ip4->saddr;
		frag_key.daddr = ip4->daddr;
		frag_key.id = ip4->id;
		frag_key.proto = ip4->protocol;
		ports = bpf_map_lookup_elem(&ipv4_frags, &frag_key);
		if (ports) {
			l4->sport = ports->sport;
			l4->dport = ports->dport;
		}
		return;
	}
	if (load_ports(skb, off, l4->proto, &l4->sport, &l4->dport, &icmp_type) < 0)
		return;
	if (ip4->frag_off & bpf_htons(IP_MORE_FRAGMENTS)) {
		struct frag4_ports first = { .sport = l4->sport, .dport = l4->dport };

		frag_key.saddr = ip4->saddr;
		frag_key.daddr = ip4->daddr;
		frag_key.id = ip4->id;
		frag_key.proto = ip4->protocol;
		bpf_map_update_elem(&ipv4_frags, &frag_key, &first, BPF_ANY);
	}
	if (l4->proto == IPPROTO_TCP)
		bpf_skb_load_bytes(skb, off + 13, &l4->tcp_flags, 1);
	if (l4->proto != IPPROTO_ICMP)
		return;
	if (icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_SOURCE_QUENCH &&
	    icmp_type != ICMP_TIME_EXCEEDED && icmp_type != ICMP_PARAMETERPROB)
		return;
	/* The quoted packet: its IP header and the first 8 bytes after it. */
	off += 8;
	if (bpf_skb_load_bytes(skb, off, &inner, sizeof(inner)) < 0 || inner.version != 4 ||
	    inner.ihl < 5)
		return;
	l4->icmp_error = 1;
	l4->inner.saddr = inner.saddr;
	l4->inner.daddr = inner.daddr;
	l4->inner.proto = inner.protocol;
	if (!(inner.frag_off & bpf_htons(0x1FFF)))
		load_ports(skb, off + inner.ihl * 4, inner.protocol, &l4->inner.sport,
			   &l4->inner.dport, &inner_type);
}

