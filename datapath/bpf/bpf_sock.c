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
 * connect6 / sendmsg6 / recvmsg6 / getpeername6: the same for IPv6 sockets
 *   and frontends (lb6_services, lb6_backends, lb6_sock_revnat). What does not
 *   depend on the family — whose socket it is, the reject, affinity, Maglev —
 *   is one set of helpers both paths call. An IPv6 socket connecting to an
 *   IPv4-mapped address (::ffff:a.b.c.d) is translated by the IPv4 path (the
 *   kernel connects it over IPv4; its unconnected datagrams reach sendmsg4).
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

/* The socket being translated: its netns and protocol. */
struct sock_client {
	__u64 netns_cookie;
	__u64 now; /* ns, read once affinity needs it */
	struct lb_affinity_key affinity;
	__u8 netns_kind; /* NETNS_NODE / NETNS_POD */
	__u8 proto;
};

/* Whether this node translates the socket (its netns is in lb_netns, TCP or
 * UDP); fills `c`. */
static __always_inline int sock_client_of(struct bpf_sock_addr *ctx, struct sock_client *c)
{
	__u8 *netns_kind;

	__builtin_memset(c, 0, sizeof(*c));
	c->netns_cookie = bpf_get_netns_cookie(ctx);
	netns_kind = bpf_map_lookup_elem(&lb_netns, &c->netns_cookie);
	if (!netns_kind)
		return 0;
	c->netns_kind = *netns_kind;
	if (ctx->protocol == IPPROTO_TCP)
		c->proto = IPPROTO_TCP;
	else if (ctx->protocol == IPPROTO_UDP)
		c->proto = IPPROTO_UDP;
	else
		return 0;
	return 1;
}

/* The backend id the client's affinity record holds for `svc` when fresh,
 * else 0. Keyed by netns cookie: a socket has no source address at connect. */
static __always_inline __u32 sock_affinity_backend(struct sock_client *c,
						   const struct lb_service *svc)
{
	if (!(svc->flags & SVC_F_AFFINITY))
		return 0;
	c->now = bpf_ktime_get_ns();
	c->affinity.client = c->netns_cookie;
	c->affinity.rev_nat_index = svc->rev_nat_index;
	c->affinity.kind = AFFINITY_BY_NETNS;
	return lb_affinity_lookup(&c->affinity, svc, c->now);
}

static __always_inline void sock_affinity_remember(const struct sock_client *c,
						   const struct lb_service *svc, __u32 backend_id)
{
	if (svc->flags & SVC_F_AFFINITY)
		lb_affinity_update(&c->affinity, backend_id, c->now);
}

/* The socket's own cookie spreads a client's connections. */
static __always_inline __u32 sock_flow_hash(struct bpf_sock_addr *ctx, __u32 address,
					    __be16 dport)
{
	return lb_hash3((__u32)bpf_get_socket_cookie(ctx), address, dport, 0);
}

/* A socket of this node is an in-cluster client: the internal scope of a
 * service with two. `internal` is that scope's entry, if any; *scope is set to
 * the scope used. */
static __always_inline struct lb_service *sock_scope(struct lb_service *svc,
						     struct lb_service *internal, __u8 *scope)
{
	if (internal) {
		*scope = LB_SCOPE_INTERNAL;
		return internal;
	}
	*scope = LB_SCOPE_EXTERNAL;
	return svc;
}

/* A NodePort answers on this node's addresses and other nodes' (ipcache: host
 * or remote-node) and, from the node's own netns, on loopback. */
static __always_inline int nodeport_identity(const struct ipcache_value *info)
{
	return info && (info->identity == IDENTITY_HOST || info->identity == IDENTITY_REMOTE_NODE);
}

static __always_inline int nodeport_address4(__be32 address, __u8 netns_kind)
{
	if ((bpf_ntohl(address) >> 24) == 127)
		return netns_kind == NETNS_NODE;
	return nodeport_identity(lookup_ipcache4(address));
}

static __always_inline int nodeport_address6(const __be32 *address, __u8 netns_kind)
{
	if (!address[0] && !address[1] && !address[2] && address[3] == bpf_htonl(1))
		return netns_kind == NETNS_NODE;
	return nodeport_identity(lookup_ipcache6((const __u8 *)address));
}

/* The service a socket of `c` reaches at `key` (address, port, protocol
 * filled; scope set to the one looked up), NodePort wildcard included. */
static __always_inline struct lb_service *sock4_service(struct lb4_key *key,
							 const struct sock_client *c)
{
	struct lb_service *svc = bpf_map_lookup_elem(&lb_services, key);

	if (!svc) {
		if (!nodeport_address4(key->address, c->netns_kind))
			return NULL;
		key->address = 0;
		svc = bpf_map_lookup_elem(&lb_services, key);
		if (!svc || !(svc->flags & SVC_F_NODEPORT))
			return NULL;
	}
	if (!(svc->flags & SVC_F_TWO_SCOPES))
		return svc;
	key->scope = LB_SCOPE_INTERNAL;
	return sock_scope(svc, bpf_map_lookup_elem(&lb_services, key), &key->scope);
}

static __always_inline struct lb_service *sock6_service(struct lb6_key *key,
							 const struct sock_client *c)
{
	struct lb_service *svc = bpf_map_lookup_elem(&lb6_services, key);

	if (!svc) {
		if (!nodeport_address6(key->address, c->netns_kind))
			return NULL;
		__builtin_memset(key->address, 0, sizeof(key->address));
		svc = bpf_map_lookup_elem(&lb6_services, key);
		if (!svc || !(svc->flags & SVC_F_NODEPORT))
			return NULL;
	}
	if (!(svc->flags & SVC_F_TWO_SCOPES))
		return svc;
	key->scope = LB_SCOPE_INTERNAL;
	return sock_scope(svc, bpf_map_lookup_elem(&lb6_services, key), &key->scope);
}

/* The IPv4 translation of a socket connecting to *daddr:ctx->user_port: the
 * backend in *daddr and ctx->user_port. IPv4 sockets, and IPv6 ones connecting
 * to an IPv4-mapped address (::ffff:a.b.c.d, which the kernel then connects
 * over IPv4), both use it. */
static __always_inline int sock4_xlate(struct bpf_sock_addr *ctx, __be32 *daddr)
{
	__be32 address = *daddr;
	__be16 dport = (__be16)ctx->user_port;
	struct lb_sock_revnat_value revnat;
	struct lb_sock_revnat_key revnat_key;
	struct sock_client c;
	struct lb4_backend *backend;
	struct lb_service *svc;
	__u32 backend_id;
	struct lb4_key key;

	if (!sock_client_of(ctx, &c))
		return XLATE_NONE;
	__builtin_memset(&key, 0, sizeof(key));
	key.address = address;
	key.dport = dport;
	key.proto = c.proto;
	key.scope = LB_SCOPE_EXTERNAL;
	svc = sock4_service(&key, &c);
	if (!svc)
		return XLATE_NONE;
	if (!svc->count)
		return XLATE_REJECT;

	backend_id = sock_affinity_backend(&c, svc);
	backend = backend_id ? bpf_map_lookup_elem(&lb_backends, &backend_id) : NULL;
	if (!backend) {
		backend_id = lb4_select_backend(&key, svc, sock_flow_hash(ctx, address, dport));
		backend = backend_id ? bpf_map_lookup_elem(&lb_backends, &backend_id) : NULL;
		if (!backend)
			return XLATE_REJECT;
		sock_affinity_remember(&c, svc, backend_id);
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

	*daddr = backend->address;
	ctx->user_port = backend->port;
	return XLATE_DONE;
}

static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	__be32 address = ctx->user_ip4;
	int xlate = sock4_xlate(ctx, &address);

	if (xlate == XLATE_DONE)
		ctx->user_ip4 = address;
	return xlate;
}

static __always_inline int is_v4_mapped(const __be32 *address)
{
	return !address[0] && !address[1] && address[2] == bpf_htonl(0xffff);
}

static __always_inline int sock6_xlate_fwd(struct bpf_sock_addr *ctx)
{
	struct lb6_sock_revnat_value revnat;
	struct lb6_sock_revnat_key revnat_key;
	struct sock_client c;
	struct lb6_backend *backend;
	struct lb_service *svc;
	__u32 backend_id;
	struct lb6_key key;

	if (!sock_client_of(ctx, &c))
		return XLATE_NONE;
	__builtin_memset(&key, 0, sizeof(key));
	/* user_ip6 is read a word at a time (the verifier's rule for ctx). */
	key.address[0] = ctx->user_ip6[0];
	key.address[1] = ctx->user_ip6[1];
	key.address[2] = ctx->user_ip6[2];
	key.address[3] = ctx->user_ip6[3];
	if (is_v4_mapped(key.address)) {
		__be32 address = key.address[3];
		int xlate = sock4_xlate(ctx, &address);

		if (xlate == XLATE_DONE)
			ctx->user_ip6[3] = address;
		return xlate;
	}
	key.dport = (__be16)ctx->user_port;
	key.proto = c.proto;
	key.scope = LB_SCOPE_EXTERNAL;
	__builtin_memcpy(revnat.address, key.address, sizeof(revnat.address));
	revnat.port = key.dport;
	svc = sock6_service(&key, &c);
	if (!svc)
		return XLATE_NONE;
	if (!svc->count)
		return XLATE_REJECT;

	backend_id = sock_affinity_backend(&c, svc);
	backend = backend_id ? bpf_map_lookup_elem(&lb6_backends, &backend_id) : NULL;
	if (!backend) {
		__u32 hash = sock_flow_hash(ctx, revnat.address[3] ^ revnat.address[2], revnat.port);

		backend_id = lb6_select_backend(&key, svc, hash);
		backend = backend_id ? bpf_map_lookup_elem(&lb6_backends, &backend_id) : NULL;
		if (!backend)
			return XLATE_REJECT;
		sock_affinity_remember(&c, svc, backend_id);
	}

	__builtin_memset(&revnat_key, 0, sizeof(revnat_key));
	revnat_key.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(revnat_key.address, backend->address, sizeof(revnat_key.address));
	revnat_key.port = backend->port;
	revnat.rev_nat_index = svc->rev_nat_index;
	bpf_map_update_elem(&lb6_sock_revnat, &revnat_key, &revnat, BPF_ANY);

	ctx->user_ip6[0] = backend->address[0];
	ctx->user_ip6[1] = backend->address[1];
	ctx->user_ip6[2] = backend->address[2];
	ctx->user_ip6[3] = backend->address[3];
	ctx->user_port = backend->port;
	return XLATE_DONE;
}

/* Backend → frontend of a translated IPv4 socket (or IPv4-mapped address):
 * *address and ctx->user_port rewritten when the socket has a record. */
static __always_inline int sock4_revnat(struct bpf_sock_addr *ctx, __be32 *address)
{
	struct lb_sock_revnat_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = *address,
		.port = (__be16)ctx->user_port,
	};
	struct lb_sock_revnat_value *frontend = bpf_map_lookup_elem(&lb_sock_revnat, &key);

	if (!frontend)
		return 0;
	*address = frontend->address;
	ctx->user_port = frontend->port;
	return 1;
}

static __always_inline int sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	__be32 address = ctx->user_ip4;

	if (sock4_revnat(ctx, &address))
		ctx->user_ip4 = address;
	return 1;
}

static __always_inline int sock6_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb6_sock_revnat_value *frontend;
	struct lb6_sock_revnat_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.cookie = bpf_get_socket_cookie(ctx);
	key.address[0] = ctx->user_ip6[0];
	key.address[1] = ctx->user_ip6[1];
	key.address[2] = ctx->user_ip6[2];
	key.address[3] = ctx->user_ip6[3];
	if (is_v4_mapped(key.address)) {
		__be32 address = key.address[3];

		if (sock4_revnat(ctx, &address))
			ctx->user_ip6[3] = address;
		return 1;
	}
	key.port = (__be16)ctx->user_port;
	frontend = bpf_map_lookup_elem(&lb6_sock_revnat, &key);
	if (frontend) {
		ctx->user_ip6[0] = frontend->address[0];
		ctx->user_ip6[1] = frontend->address[1];
		ctx->user_ip6[2] = frontend->address[2];
		ctx->user_ip6[3] = frontend->address[3];
		ctx->user_port = frontend->port;
	}
	return 1;
}

/* 1 lets the call proceed; 0 with bpf_set_retval fails it with that errno. */
static __always_inline int sock_verdict(int xlate)
{
	if (xlate != XLATE_REJECT)
		return 1;
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock4_xlate_fwd(ctx));
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock4_xlate_fwd(ctx));
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

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock6_xlate_fwd(ctx));
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_verdict(sock6_xlate_fwd(ctx));
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_rev(ctx);
}

SEC("cgroup/getpeername6")
int sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock6_xlate_rev(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
