/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Socket-level load balancing: cgroup hooks that translate a service
 * frontend to a backend once, when a socket connects (TCP, connected UDP) or
 * sends a datagram (unconnected UDP), for every process in the attached
 * cgroup subtree. No per-packet NAT follows: the kernel sees a connection to
 * the backend, so policy, routing and conntrack judge the backend.
 *
 * connect4 / sendmsg4: frontend → backend (lb_services, lb_backends), with
 *   client-IP affinity keyed by the client's netns cookie, and a record in
 *   lb_sock_revnat (socket cookie, backend → frontend).
 * recvmsg4 / getpeername4: backend → frontend from that record, so the
 *   application sees the address it connected to.
 *
 * cgroup hooks apply per cgroup, not per network namespace: a socket is
 * translated only when its netns is one of this node's (lb_netns, filled by
 * the agent), so several simulated nodes on one machine never translate each
 * other's sockets. A NodePort answers on the node's addresses, on other
 * nodes' addresses (ipcache: host or remote-node) and, from the node's own
 * netns, on loopback (as Cilium's socket LB does). A service without a
 * backend refuses the connect with ECONNREFUSED (kube-proxy's REJECT). */

#include <linux/errno.h>

#include "lib/common.h"
#include "lib/lb.h"
#include "lib/maps.h"

/* What a translation attempt concluded. */
#define XLATE_NONE 0 /* not a service: the socket goes where it was sent */
#define XLATE_DONE 1
#define XLATE_REJECT 2 /* a service without backends */

static __always_inline int is_loopback4(__be32 address)
{
	return (bpf_ntohl(address) >> 24) == 127;
}

/* Where a NodePort may be reached from a socket of this node. */
static __always_inline int nodeport_address(__be32 address, __u8 netns_kind)
{
	struct ipcache_value *info;

	if (is_loopback4(address))
		return netns_kind == NETNS_NODE;
	info = lookup_ipcache4(address);
	return info && (info->identity == IDENTITY_HOST || info->identity == IDENTITY_REMOTE_NODE);
}

static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	__u64 netns_cookie = bpf_get_netns_cookie(ctx);
	__be32 address = ctx->user_ip4;
	__be16 dport = (__be16)ctx->user_port;
	struct lb_affinity_key affinity = {};
	struct lb_sock_revnat_value revnat;
	struct lb_sock_revnat_key revnat_key;
	struct lb4_service *svc, *internal;
	struct lb4_backend *backend;
	__u32 backend_id = 0;
	struct lb4_key key;
	__u64 now = 0;
	__u8 *netns_kind;
	__u8 proto;

	netns_kind = bpf_map_lookup_elem(&lb_netns, &netns_cookie);
	if (!netns_kind)
		return XLATE_NONE;
	if (ctx->protocol == IPPROTO_TCP)
		proto = IPPROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		proto = IPPROTO_UDP;
	else
		return XLATE_NONE;

	__builtin_memset(&key, 0, sizeof(key));
	key.address = address;
	key.dport = dport;
	key.proto = proto;
	key.scope = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&lb_services, &key);
	if (!svc) {
		if (!nodeport_address(address, *netns_kind))
			return XLATE_NONE;
		key.address = 0;
		svc = bpf_map_lookup_elem(&lb_services, &key);
		if (!svc || !(svc->flags & SVC_F_NODEPORT))
			return XLATE_NONE;
	}
	/* A socket of this node is an in-cluster client: the internal scope. */
	if (svc->flags & SVC_F_TWO_SCOPES) {
		key.scope = LB_SCOPE_INTERNAL;
		internal = bpf_map_lookup_elem(&lb_services, &key);
		if (internal)
			svc = internal;
		else
			key.scope = LB_SCOPE_EXTERNAL;
	}
	if (!svc->count)
		return XLATE_REJECT;

	if (svc->flags & SVC_F_AFFINITY) {
		now = bpf_ktime_get_ns();
		affinity.client = netns_cookie;
		affinity.rev_nat_index = svc->rev_nat_index;
		affinity.kind = AFFINITY_BY_NETNS;
		backend_id = lb_affinity_lookup(&affinity, svc, now);
	}
	backend = backend_id ? bpf_map_lookup_elem(&lb_backends, &backend_id) : NULL;
	if (!backend) {
		/* The socket's own cookie spreads a client's connections. */
		__u32 hash = lb_hash3((__u32)bpf_get_socket_cookie(ctx), address, dport, 0);

		backend_id = lb4_select_backend(&key, svc, hash);
		backend = backend_id ? bpf_map_lookup_elem(&lb_backends, &backend_id) : NULL;
		if (!backend)
			return XLATE_REJECT;
		if (svc->flags & SVC_F_AFFINITY)
			lb_affinity_update(&affinity, backend_id, now);
	}

	revnat_key.cookie = bpf_get_socket_cookie(ctx);
	revnat_key.address = backend->address;
	revnat_key.port = backend->port;
	revnat_key.pad = 0;
	revnat.address = address;
	revnat.port = dport;
	revnat.rev_nat_index = svc->rev_nat_index;
	/* An LRU map: a full one evicts the oldest record, it never fails. */
	bpf_map_update_elem(&lb_sock_revnat, &revnat_key, &revnat, BPF_ANY);

	ctx->user_ip4 = backend->address;
	ctx->user_port = backend->port;
	return XLATE_DONE;
}

static __always_inline int sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb_sock_revnat_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__be16)ctx->user_port,
	};
	struct lb_sock_revnat_value *frontend = bpf_map_lookup_elem(&lb_sock_revnat, &key);

	if (frontend) {
		ctx->user_ip4 = frontend->address;
		ctx->user_port = frontend->port;
	}
	return 1;
}

/* 1 lets the call proceed; 0 with bpf_set_retval fails it with that errno. */
static __always_inline int sock4_verdict(int xlate)
{
	if (xlate != XLATE_REJECT)
		return 1;
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(sock4_xlate_fwd(ctx));
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_verdict(sock4_xlate_fwd(ctx));
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_rev(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
