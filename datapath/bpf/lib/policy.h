/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Policy enforcement. Every path calls policy_egress() for traffic leaving a
 * local pod (at from-container) and policy_ingress() for traffic entering one
 * (at delivery, or at to-container for what the stack routes), with the
 * peer's security identity and the packet's tuple.
 *
 * Per packet: conntrack first. A reply or related ICMP error of a tracked
 * connection, or a forward packet stamped with the current policy epoch
 * (policy_config), passes without any policy lookup; one stamped with an older
 * epoch is compared with its endpoint's revision (policy_state) once, then
 * stamped again. Otherwise (new connection, or stale
 * revision) the policy decides: three LPM lookups in `policy` — the peer's
 * identity, the node-local CIDR identity of the peer's address (from
 * `policy_cidrs`), and 0 (any peer); any DENY wins, else any ALLOW allows,
 * else the endpoint's default for the direction. An endpoint without a
 * `policy_state` entry has no policy: everything passes (still tracked).
 * In audit mode (NODE_F_POLICY_AUDIT) a would-be drop is counted as
 * REASON_POLICY_AUDIT, reported with verdict audit, and passes.
 *
 * Events: drops and audit verdicts are always reported; allow verdicts as
 * policy_config.event_mode says (by default aggregated per flow: the first
 * connection of (endpoint, direction, peer, protocol, port), then at most one
 * per event_interval_ns), so the ring buffer is off the new-connection path. */
#pragma once

#include "conntrack.h"
#include "events.h"
#include "maps.h"
#include "metrics.h"

/* What policy_egress/policy_ingress return: pass, or a drop already counted
 * and reported (the caller returns TC_ACT_SHOT). */
#define POLICY_ALLOW 0
#define POLICY_DENY 1

/* policy_value.flags: the entry names a protocol (an L4 rule). */
#define POLICY_VALUE_F_L4 0x01

struct policy_decision {
	__u8 verdict; /* EVENT_VERDICT_* */
	__u8 match; /* EVENT_MATCH_* */
	__u8 reason; /* drop reason when denied */
};

/* One LPM lookup; returns the match kind of an entry found, 0 for none. */
static __always_inline __u8 policy_lookup(struct policy_key *key, __u32 peer, __u8 *verdict)
{
	struct policy_value *value;

	key->peer_identity = peer;
	value = bpf_map_lookup_elem(&policy, key);
	if (!value)
		return 0;
	*verdict = value->verdict;
	return (value->flags & POLICY_VALUE_F_L4) ? EVENT_MATCH_L4 : EVENT_MATCH_L3;
}

/* Both families: `cidr_key` holds the peer's address (the policy_cidrs key
 * of its family), `proto` and `dport` (host order) the packet's. */
static __always_inline void policy_decide_key(const struct policy_state *state, __u16 endpoint_id,
					      __u8 dir, __u32 peer_identity,
					      const struct ipcache_key *cidr_key, __u8 proto,
					      __u16 dport, struct policy_decision *d)
{
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX,
		.endpoint_id = endpoint_id,
		.direction = dir,
		.protocol = proto,
	};
	struct policy_cidr_value *cidr;
	__u8 allow = 0, match, verdict = 0;
	__u32 deny_flag, has_deny;

	if (!state) {
		d->verdict = EVENT_VERDICT_ALLOW;
		d->match = EVENT_MATCH_NONE;
		return;
	}
	if (proto_has_ports(proto))
		key.dport = bpf_htons(dport);
	has_deny = state->flags &
		   (dir == DIR_INGRESS ? POLICY_F_HAS_DENY_INGRESS : POLICY_F_HAS_DENY_EGRESS);

	match = policy_lookup(&key, peer_identity, &verdict);
	if (match) {
		if (verdict == POLICY_VERDICT_DENY)
			goto deny;
		allow = match;
		/* No deny to find in the other lookups. */
		if (!has_deny)
			goto allowed;
	}
	cidr = bpf_map_lookup_elem(&policy_cidrs, cidr_key);
	if (cidr) {
		match = policy_lookup(&key, cidr->identity, &verdict);
		if (match) {
			if (verdict == POLICY_VERDICT_DENY)
				goto deny;
			if (!allow)
				allow = match;
		}
	}
	match = policy_lookup(&key, IDENTITY_UNKNOWN, &verdict);
	if (match) {
		if (verdict == POLICY_VERDICT_DENY)
			goto deny;
		if (!allow)
			allow = match;
	}
	if (allow) {
allowed:
		d->verdict = EVENT_VERDICT_ALLOW;
		d->match = allow;
		return;
	}
	deny_flag = dir == DIR_INGRESS ? POLICY_F_DEFAULT_DENY_INGRESS : POLICY_F_DEFAULT_DENY_EGRESS;
	d->match = EVENT_MATCH_DEFAULT;
	if (state->flags & deny_flag) {
		d->verdict = EVENT_VERDICT_DENY;
		d->reason = DROP_POLICY;
	} else {
		d->verdict = EVENT_VERDICT_ALLOW;
	}
	return;
deny:
	d->verdict = EVENT_VERDICT_DENY;
	d->match = match;
	d->reason = DROP_POLICY_DENY;
}

static __always_inline void policy_decide(const struct policy_state *state, __u16 endpoint_id,
					  __u8 dir, __u32 peer_identity, __be32 peer_addr,
					  const struct l4_info *l4, struct policy_decision *d)
{
	struct ipcache_key cidr_key = {
		.prefixlen = IPCACHE_STATIC_PREFIX + 32,
		.family = FAMILY_IPV4,
	};

	cidr_key.addr.ip4 = peer_addr;
	policy_decide_key(state, endpoint_id, dir, peer_identity, &cidr_key, l4->proto, l4->dport,
			  d);
}

static __always_inline struct policy_config *lookup_policy_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&policy_config, &zero);
}

/* Whether an allow verdict is reported (aggregation, see the top). */
static __always_inline int policy_allow_reported(const struct policy_config *pcfg,
						 const struct endpoint_info *ep, __u8 dir,
						 __u32 peer, __u8 proto, __u16 dport,
						 __u8 verdict, __u64 now)
{
	struct policy_flow_key key = {
		.peer_identity = peer,
		.endpoint_id = ep->endpoint_id,
		.dport = dport,
		.dir = dir,
		.proto = proto,
		.verdict = verdict,
	};
	__u64 *last;

	if (!pcfg || pcfg->event_mode == POLICY_EVENTS_ALL)
		return 1;
	if (pcfg->event_mode == POLICY_EVENTS_DROPS)
		return 0;
	last = bpf_map_lookup_elem(&policy_flows, &key);
	if (last && now - *last < pcfg->event_interval_ns)
		return 0;
	if (last)
		*last = now;
	else
		bpf_map_update_elem(&policy_flows, &key, &now, BPF_ANY);
	return 1;
}

static __always_inline void policy_report(struct __sk_buff *skb, const struct l4_info *l4,
					  const struct endpoint_info *ep, __u8 dir, __u32 peer,
					  __u8 type, __u8 reason, const struct policy_decision *d,
					  __u64 now)
{
	struct policy_event ev = {
		.ts_ns = now,
		.type = type,
		.reason = reason,
		.dir = dir,
		.proto = l4->proto,
		.verdict = d->verdict,
		.match = d->match,
		.endpoint_id = ep->endpoint_id,
		.src_identity = dir == DIR_INGRESS ? peer : ep->identity,
		.dst_identity = dir == DIR_INGRESS ? ep->identity : peer,
		.saddr = l4->saddr,
		.daddr = l4->daddr,
		.sport = l4->sport,
		.dport = l4->dport,
		.ifindex = skb->ifindex,
		.tcp_flags = l4->proto == IPPROTO_TCP ? l4->tcp_flags : 0,
	};

	if (l4->proto == IPPROTO_ICMP)
		event_icmp4(skb, &ev);
	if (event_output(&ev) < 0)
		metrics_count(skb, REASON_EVENT_LOST, dir);
}

/* After the conntrack lookup `*ct` (either family): whether the packet passes without a
 * policy lookup (an established flow, a reply, a related error, or an entry stamped under
 * an older epoch whose revision still holds: it is stamped with `epoch`). Otherwise the
 * endpoint's policy state and revision are in `*state` and `*revision`, and `*ct` is
 * CT_STALE when the entry must be judged again. */
static __always_inline int ct_admits(int *ct, struct ct_value *entry, __u16 endpoint_id,
				     __u32 epoch, struct policy_state **state, __u32 *revision)
{
	if (*ct == CT_ESTABLISHED || *ct == CT_REPLY || *ct == CT_RELATED)
		return 1;
	*state = bpf_map_lookup_elem(&policy_state, &endpoint_id);
	*revision = *state ? (*state)->revision : 0;
	if (*ct == CT_CHECK) {
		if (entry && entry->policy_revision == *revision) {
			entry->policy_epoch = epoch;
			return 1;
		}
		*ct = CT_STALE;
	}
	return 0;
}

/* Judges the packet at the enforcement point (ep, dir); `peer` is the other
 * side's identity. */
static __always_inline int policy_enforce(struct __sk_buff *skb, const struct endpoint_info *ep,
					  __u8 dir, __u32 peer, const struct l4_info *l4)
{
	struct policy_decision d = {};
	struct node_config *cfg = lookup_node_config();
	/* Read before policy_state: the agent bumps the epoch after the revisions,
	 * so an entry is never stamped with an epoch newer than the revision it
	 * was compared with. */
	struct policy_config *pcfg = lookup_policy_config();
	__u32 epoch = pcfg ? pcfg->epoch : 0;
	int audit = cfg && (cfg->flags & NODE_F_POLICY_AUDIT);
	__u16 endpoint_id = ep->endpoint_id;
	struct policy_state *state = NULL;
	struct ct_value *entry;
	__u64 now = bpf_ktime_get_ns();
	__u32 revision = 0;
	struct ct_key key;
	__u8 ct_flags = 0;
	int ct;

	__builtin_memset(&key, 0, sizeof(key));
	ct = ct_lookup4(l4, dir, endpoint_id, epoch, audit, now, &key, &entry);
	if (ct_admits(&ct, entry, endpoint_id, epoch, &state, &revision))
		return POLICY_ALLOW;

	policy_decide(state, endpoint_id, dir, peer, dir == DIR_INGRESS ? l4->saddr : l4->daddr, l4,
		      &d);
	if (ct == CT_STALE)
		d.match = EVENT_MATCH_CONNTRACK;
	if (d.verdict == EVENT_VERDICT_DENY) {
		if (!audit) {
			if (ct == CT_STALE)
				bpf_map_delete_elem(&conntrack, &key);
			metrics_count(skb, d.reason, dir);
			policy_report(skb, l4, ep, dir, peer, EVENT_DROP, d.reason, &d, now);
			return POLICY_DENY;
		}
		d.verdict = EVENT_VERDICT_AUDIT;
		ct_flags = CT_F_AUDIT;
		metrics_count(skb, REASON_POLICY_AUDIT, dir);
	}
	if (ct == CT_STALE && entry) {
		ct_restamp(entry, revision, epoch, l4->proto, l4->tcp_flags, ct_flags);
	} else if (!l4->icmp_error && ct_starts_connection(l4->proto, l4->tcp_flags)) {
		ct_create(&conntrack, &key, revision, epoch, ct_flags, now);
	}
	/* reason: 0 for an allow; the drop reason audit mode waived. */
	if (state && (d.verdict == EVENT_VERDICT_AUDIT ||
		      policy_allow_reported(pcfg, ep, dir, peer, l4->proto, l4->dport, d.verdict,
					    now)))
		policy_report(skb, l4, ep, dir, peer, EVENT_POLICY_VERDICT, d.reason, &d, now);
	return POLICY_ALLOW;
}

static __always_inline int policy_egress(struct __sk_buff *skb, const struct endpoint_info *src_ep,
					 __u32 dst_identity, const struct l4_info *l4)
{
	return policy_enforce(skb, src_ep, DIR_EGRESS, dst_identity, l4);
}

static __always_inline int policy_ingress(struct __sk_buff *skb, const struct endpoint_info *dst_ep,
					  __u32 src_identity, const struct l4_info *l4)
{
	return policy_enforce(skb, dst_ep, DIR_INGRESS, src_identity, l4);
}
