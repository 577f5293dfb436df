/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* What both families' tc service paths (lib/lb_nat.h, lib/lb6_nat.h) share:
 * the NAT entries' directions and flags, SNAT port range and idle times, the
 * verdicts of a forward translation. */
#pragma once

#include "common.h"

#define LB_NAT_FORWARD 1
#define LB_NAT_REPLY 2

/* The flags of an entry (lb4_nat_entry, lb6_nat_entry). */
#define LB_NAT_F_SNAT 0x01 /* the source was rewritten to the node's address */
#define LB_NAT_F_NORTH_SOUTH 0x02 /* from outside the node: replies leave by the FIB */
#define LB_NAT_F_HAIRPIN 0x04 /* a pod reaching itself: its source became the frontend */
/* A FIN or RST passed either way: a SYN on this tuple is a new connection (any
 * other SYN is a retransmission and keeps its backend). */
#define LB_NAT_F_CLOSING 0x08

#define LB_NAT_MAX_ENTRIES 262144
/* SNAT source ports of north-south connections to remote backends: 61000-65535,
 * above Linux's default ephemeral range (ip_local_port_range 32768-60999). In that
 * range a node's own socket towards a backend could hold the same 4-tuple as an
 * SNATed connection, and its answers would be reverse-NATed away from it (the
 * services conformance matrix caught it). */
#define LB_SNAT_PORT_MIN 61000
#define LB_SNAT_PORT_RANGE 4536
#define LB_SNAT_PORT_TRIES 8
/* Idle seconds after which a connection's SNAT port may serve another one: a
 * closed TCP connection after the backend's TIME_WAIT (60 s on Linux), an open
 * one after Cilium's TCP connection lifetime (6 h), UDP after 60 s. Nothing else
 * reclaims them: lb_nat (lb6_nat) is an LRU, and without this ports would be reused only
 * when the map is full. */
#define LB_NAT_IDLE_CLOSED_S 60
#define LB_NAT_IDLE_TCP_S 21600
#define LB_NAT_IDLE_UDP_S 60

static __always_inline __u32 lb_now_s(void)
{
	return bpf_ktime_get_ns() / 1000000000ULL;
}

/* Whether an entry (its flags, when last used) has been idle long enough to
 * give its SNAT port away. */
static __always_inline int lb_nat_idle(__u8 flags, __u32 last_seen, __u8 proto, __u32 now)
{
	__u32 idle = now - last_seen;

	if (proto != IPPROTO_TCP)
		return idle >= LB_NAT_IDLE_UDP_S;
	if (flags & LB_NAT_F_CLOSING)
		return idle >= LB_NAT_IDLE_CLOSED_S;
	return idle >= LB_NAT_IDLE_TCP_S;
}

/* What lb4_forward / lb6_forward decided. */
#define LB_PASS 0 /* not a service: carry on */
#define LB_TRANSLATED 1 /* rewritten: re-parse, then route to the (new) destination */
#define LB_NO_BACKEND 2 /* a service without backends: reject */
#define LB_DENIED 3 /* loadBalancerSourceRanges refuse the client */
#define LB_ERROR 4
#define LB_NO_LOCAL_BACKEND 5 /* a Local policy, backends only elsewhere: drop */

/* One's-complement fold of a bpf_csum_diff sum. */
static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return (__u16)~sum;
}
