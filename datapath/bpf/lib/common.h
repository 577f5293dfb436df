/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Definitions shared by every Tendril eBPF program. */
#pragma once

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Address families as the kernel numbers them (AF_INET, AF_INET6). */
#define FAMILY_IPV4 2
#define FAMILY_IPV6 10

/* Reserved security identities (DESIGN §4); cluster identities start at 256. */
#define IDENTITY_UNKNOWN 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2
#define IDENTITY_UNMANAGED 3
#define IDENTITY_HEALTH 4
#define IDENTITY_INIT 5
#define IDENTITY_REMOTE_NODE 6
#define IDENTITY_KUBE_APISERVER 7
#define IDENTITY_INGRESS 8
/* The VXLAN VNI carries the source identity: 24 bits. */
#define IDENTITY_MAX_VNI 0xFFFFFF

/* Direction, seen from the endpoint (pod). */
#define DIR_INGRESS 1
#define DIR_EGRESS 2

/* skb->mark carries the source identity when a packet is handed to the host
 * stack, so the to-container hook can judge it without an ipcache lookup.
 * Same encoding as Cilium's MARK_MAGIC_IDENTITY: magic in bits 8..11,
 * identity bits 0..15 in bits 16..31, identity bits 16..23 in bits 0..7. */
#define MARK_MAGIC_IDENTITY 0x0F00
#define MARK_MAGIC_MASK 0x0F00

static __always_inline __u32 identity_to_mark(__u32 identity)
{
	return MARK_MAGIC_IDENTITY | ((identity & 0xFFFF) << 16) |
	       ((identity >> 16) & 0xFF);
}

static __always_inline __u32 mark_to_identity(__u32 mark)
{
	if ((mark & MARK_MAGIC_MASK) != MARK_MAGIC_IDENTITY)
		return IDENTITY_UNKNOWN;
	return (mark >> 16) | ((mark & 0xFF) << 16);
}

/* Transport information the policy hook judges on (host byte order). */
struct l4_info {
	__u8 proto;
	__u16 sport;
	__u16 dport;
};

/* An IPv4 packet whose Ethernet and IP headers are in the linear area.
 * Pointers are valid until the next helper that may move packet data. */
struct pkt4 {
	struct ethhdr *eth;
	struct iphdr *ip4;
	void *data_end;
};

/* Returns 0 when `skb` holds a well-formed IPv4 header after Ethernet. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt4 *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u32 need = sizeof(struct ethhdr) + sizeof(struct iphdr);

	if (data + need > data_end) {
		if (bpf_skb_pull_data(skb, need) < 0)
			return -1;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + need > data_end)
			return -1;
	}
	pkt->eth = data;
	pkt->ip4 = data + sizeof(struct ethhdr);
	pkt->data_end = data_end;
	if (pkt->ip4->version != 4 || pkt->ip4->ihl < 5)
		return -1;
	return 0;
}

/* Ports of the first fragment of TCP/UDP; zero for anything else. */
static __always_inline void parse_l4(const struct pkt4 *pkt, struct l4_info *l4)
{
	struct iphdr *ip4 = pkt->ip4;
	void *l4h = (void *)ip4 + ip4->ihl * 4;

	l4->proto = ip4->protocol;
	l4->sport = 0;
	l4->dport = 0;
	/* Non-first fragments carry no ports. */
	if (ip4->frag_off & bpf_htons(0x1FFF))
		return;
	if (ip4->protocol == IPPROTO_TCP || ip4->protocol == IPPROTO_UDP) {
		/* Source and destination ports sit at the same offsets in TCP and UDP. */
		struct udphdr *uh = l4h;

		if ((void *)(uh + 1) > pkt->data_end)
			return;
		l4->sport = bpf_ntohs(uh->source);
		l4->dport = bpf_ntohs(uh->dest);
	}
}

/* Decrements the TTL as a router does (ip_decrease_ttl), with the
 * incremental checksum update of RFC 1624. Returns -1 when the TTL expires. */
static __always_inline int ipv4_dec_ttl(struct iphdr *ip4)
{
	__u32 check = ip4->check;

	if (ip4->ttl <= 1)
		return -1;
	check += bpf_htons(0x0100);
	ip4->check = (__u16)(check + (check >= 0xFFFF));
	ip4->ttl--;
	return 0;
}
