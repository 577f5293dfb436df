/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Connection tracking per enforcement point. An entry is created by the
 * first allowed packet of a connection at one point (dir, endpoint): its
 * forward tuple, keyed with that point's direction. At the same endpoint the
 * replies travel the opposite direction, so a packet is a reply when its
 * reversed tuple is known under the opposite direction. Entries carry the
 * policy revision they were judged under: a forward packet under another
 * revision is judged again (CT_STALE). The revision is only compared when the
 * node's policy epoch moved since the entry was stamped (CT_CHECK), so an
 * established packet costs one conntrack lookup and no policy lookup. Expiry is the agent's garbage
 * collection (Dataplane::conntrack_gc) on last_seen_ns. */
#pragma once

#include "maps.h"

#define CT_NEW 0
#define CT_ESTABLISHED 1 /* forward packet, judged under the current revision */
#define CT_REPLY 2
#define CT_RELATED 3 /* ICMP error about a tracked connection */
#define CT_STALE 4 /* forward packet judged under another revision (or audit) */
#define CT_CHECK 5 /* forward packet stamped with an older epoch: compare its revision */

/* last_seen_ns is written at most this often per entry: the shortest
 * timeout the GC applies is 10 s. */
#define CT_TOUCH_INTERVAL_NS 1000000000ULL

static __always_inline __u8 dir_opposite(__u8 dir)
{
	return dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS;
}

static __always_inline void ct_key_fill(struct ct_key *key, __be32 saddr, __be32 daddr,
					__u16 sport, __u16 dport, __u8 proto, __u8 dir,
					__u16 endpoint_id)
{
	key->saddr = saddr;
	key->daddr = daddr;
	key->sport = sport;
	key->dport = dport;
	key->proto = proto;
	key->dir = dir;
	key->endpoint_id = endpoint_id;
}

/* Both families: `proto` and `tcp_flags` of the packet. */
static __always_inline void ct_touch(struct ct_value *entry, __u8 proto, __u8 tcp_flags, __u64 now,
				     int reply)
{
	__u8 flags = entry->flags;

	if (reply)
		flags |= CT_F_SEEN_REPLY;
	if (proto == IPPROTO_TCP) {
		/* A half-closed connection may still carry data the other way. */
		if (tcp_flags & TCP_FLAG_FIN)
			flags |= reply ? CT_F_FIN_REPLY : CT_F_FIN_FORWARD;
		if ((tcp_flags & TCP_FLAG_RST) ||
		    (flags & (CT_F_FIN_FORWARD | CT_F_FIN_REPLY)) ==
			    (CT_F_FIN_FORWARD | CT_F_FIN_REPLY))
			flags |= CT_F_CLOSING;
	}
	if (flags != entry->flags)
		entry->flags = flags;
	if (now - entry->last_seen_ns > CT_TOUCH_INTERVAL_NS)
		entry->last_seen_ns = now;
	entry->packets += 1;
}

/* The state of a forward packet whose entry was found (both families). */
static __always_inline int ct_forward_state(const struct ct_value *found, __u8 proto,
					    __u8 tcp_flags, __u32 epoch, int audit)
{
	if ((found->flags & CT_F_AUDIT) && !audit)
		return CT_STALE;
	/* A new SYN on a closed tuple starts a new connection. */
	if ((found->flags & CT_F_CLOSING) && proto == IPPROTO_TCP &&
	    (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return CT_STALE;
	/* No revision changed since the entry was judged (or last checked):
	 * established without looking at policy_state. */
	if (found->policy_epoch == epoch)
		return CT_ESTABLISHED;
	return CT_CHECK;
}

/* An ICMP error about the connection of `found`. */
static __always_inline int ct_related(struct ct_value *found, __u64 now)
{
	if (now - found->last_seen_ns > CT_TOUCH_INTERVAL_NS)
		found->last_seen_ns = now;
	return CT_RELATED;
}

/* The entry of a connection judged again (CT_STALE) and admitted: stamped
 * with the revision and epoch it was judged under, `ct_flags` its audit state. */
static __always_inline void ct_restamp(struct ct_value *entry, __u32 revision, __u32 epoch,
				       __u8 proto, __u8 tcp_flags, __u8 ct_flags)
{
	entry->policy_revision = revision;
	entry->policy_epoch = epoch;
	/* A SYN reusing a closed tuple starts afresh. */
	if (proto == IPPROTO_TCP && (tcp_flags & TCP_FLAG_SYN))
		entry->flags = ct_flags;
	else
		entry->flags = (entry->flags & ~CT_F_AUDIT) | ct_flags;
}

/* Looks the packet up at the enforcement point (dir, endpoint_id). `fwd`
 * receives the key a new entry of this packet would have; `entry` the
 * forward entry of an established or stale connection. */
static __always_inline int ct_lookup4(const struct l4_info *l4, __u8 dir, __u16 endpoint_id,
				      __u32 epoch, int audit, __u64 now, struct ct_key *fwd,
				      struct ct_value **entry)
{
	__u8 opposite = dir_opposite(dir);
	struct ct_value *found;
	struct ct_key rev;

	*entry = NULL;
	__builtin_memset(&rev, 0, sizeof(rev));
	if (l4->icmp_error) {
		/* About a packet this endpoint sent (the quoted tuple is the
		 * forward tuple of the opposite point) ... */
		ct_key_fill(&rev, l4->inner.saddr, l4->inner.daddr, l4->inner.sport,
			    l4->inner.dport, l4->inner.proto, opposite, endpoint_id);
		found = bpf_map_lookup_elem(&conntrack, &rev);
		if (found)
			goto related;
		/* ... or about a reply it sent on a connection judged here. */
		ct_key_fill(&rev, l4->inner.daddr, l4->inner.saddr, l4->inner.dport,
			    l4->inner.sport, l4->inner.proto, dir, endpoint_id);
		found = bpf_map_lookup_elem(&conntrack, &rev);
		if (found)
			goto related;
	}
	ct_key_fill(fwd, l4->saddr, l4->daddr, l4->sport, l4->dport, l4->proto, dir, endpoint_id);
	found = bpf_map_lookup_elem(&conntrack, fwd);
	if (found) {
		ct_touch(found, l4->proto, l4->tcp_flags, now, 0);
		*entry = found;
		return ct_forward_state(found, l4->proto, l4->tcp_flags, epoch, audit);
	}
	ct_key_fill(&rev, l4->daddr, l4->saddr, l4->dport, l4->sport, l4->proto, opposite,
		    endpoint_id);
	found = bpf_map_lookup_elem(&conntrack, &rev);
	if (found) {
		ct_touch(found, l4->proto, l4->tcp_flags, now, 1);
		return CT_REPLY;
	}
	return CT_NEW;
related:
	return ct_related(found, now);
}

/* Whether a packet without conntrack state may start tracking: anything but TCP, and
 * TCP only with a bare SYN. A mid-stream TCP segment without state (its entry was
 * removed because policy now denies it, or it predates the programs) is judged by
 * policy on its own and never tracked: tracking it would let the other side's
 * packets pass as replies of a connection policy denied. */
static __always_inline int ct_starts_connection(__u8 proto, __u8 tcp_flags)
{
	if (proto != IPPROTO_TCP)
		return 1;
	return (tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* `map`: conntrack (struct ct_key) or conntrack6 (struct ct6_key). */
static __always_inline void ct_create(void *map, const void *key, __u32 revision, __u32 epoch,
					 __u8 flags, __u64 now)
{
	struct ct_value value = {
		.created_ns = now,
		.last_seen_ns = now,
		.policy_revision = revision,
		.policy_epoch = epoch,
		.flags = flags,
		.packets = 1,
	};

	/* An LRU map evicts the least recently used entry when full. */
	bpf_map_update_elem(map, key, &value, BPF_ANY);
}
