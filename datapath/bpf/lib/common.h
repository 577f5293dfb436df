/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Definitions shared by every Tendril eBPF program. */
#pragma once

#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
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

/* The tuple the policy hook and conntrack judge on. Ports in host order;
 * ICMP echo request/reply carry the echo id in both ports. An ICMP error
 * (destination unreachable, time exceeded, ...) is judged by the tuple of the
 * packet it quotes, in `inner`. */
struct l4_info {
	__be32 saddr;
	__be32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_error;
	__u8 pad;
	struct {
		__be32 saddr;
		__be32 daddr;
		__u16 sport;
		__u16 dport;
		__u8 proto;
		__u8 pad[3];
	} inner;
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

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

static __always_inline int proto_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

/* Ports (or the ICMP echo id) of the transport header at `off`. TCP, UDP
 * and SCTP keep source and destination port in their first 4 bytes. */
static __always_inline int load_ports(struct __sk_buff *skb, __u32 off, __u8 proto, __u16 *sport,
				      __u16 *dport, __u8 *icmp_type)
{
	__u8 hdr[8];

	if (proto_has_ports(proto)) {
		if (bpf_skb_load_bytes(skb, off, hdr, 4) < 0)
			return -1;
		*sport = ((__u16)hdr[0] << 8) | hdr[1];
		*dport = ((__u16)hdr[2] << 8) | hdr[3];
		return 0;
	}
	if (proto == IPPROTO_ICMP) {
		if (bpf_skb_load_bytes(skb, off, hdr, 8) < 0)
			return -1;
		*icmp_type = hdr[0];
		if (hdr[0] == ICMP_ECHO || hdr[0] == ICMP_ECHOREPLY) {
			*sport = ((__u16)hdr[4] << 8) | hdr[5];
			*dport = *sport;
		}
	}
	return 0;
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
