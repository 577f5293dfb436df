/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The policy hook. Every path calls policy_egress() for traffic leaving a
 * local pod and policy_ingress() for traffic entering one, with the peer's
 * security identity and the L4 tuple. Issue 6 puts the `policy` and
 * `conntrack` lookups here; until then every flow is allowed, so the
 * programs' control flow does not change when enforcement arrives. */
#pragma once

#include "maps.h"

#define POLICY_ALLOW 0
#define POLICY_DENY 1

static __always_inline int policy_egress(const struct endpoint_info *src_ep, __u32 dst_identity,
					 const struct l4_info *l4)
{
	(void)src_ep;
	(void)dst_identity;
	(void)l4;
	return POLICY_ALLOW;
}

static __always_inline int policy_ingress(const struct endpoint_info *dst_ep, __u32 src_identity,
					  const struct l4_info *l4)
{
	(void)dst_ep;
	(void)src_identity;
	(void)l4;
	return POLICY_ALLOW;
}
