/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
#pragma once

#include "common.h"

static __always_inline void eth_rewrite(struct ethhdr *eth, const __u8 *dst, const __u8 *src)
{
	__builtin_memcpy(eth->h_dest, dst, ETH_ALEN);
	__builtin_memcpy(eth->h_source, src, ETH_ALEN);
}
