//! Simulated nodes and pods: the kubelet and container runtime this test world lacks.
//!
//! - The **underlay** is a network namespace `tdr-underlay-{cluster}` holding a bridge
//!   `br0`; every node joins it with a veth pair and an address from `10.250.{n}.0/24`
//!   (addresses that exist only inside our namespaces); a [`SimNode`] also gets an IPv6
//!   address from `fd00:250:{n}::/64` (dual-stack underlay: native routing of IPv6 pods
//!   needs an IPv6 next hop).
//! - A **node** is a network namespace `tdr-{node}` (`eth0` on the underlay, `lo` up, IPv4
//!   forwarding on as on any Kubernetes node), a `Node` object (InternalIPs = its underlay
//!   addresses, Ready) and one `tendril-agent` process that stays in the host namespace (to
//!   reach the API server on 127.0.0.1) and configures the node's (`--node-netns`).
//! - A **pod** is what a kubelet with containerd would make of a `Pod` bound to the node:
//!   the `Pod` object (`spec.nodeName`), a sandbox network namespace `tdrp_{ns}_{pod}`, the
//!   real `tendril-cni` run inside the node's namespace with `CNI_COMMAND=ADD`, `CNI_ARGS`
//!   and the network configuration derived from the node's conflist exactly as libcni
//!   does, then `Pod.status` written through the status subresource (Running, podIPs,
//!   hostIP, Ready). Deletion is the kubelet's: graceful delete, CNI `DEL` on sandbox
//!   teardown, then the final delete with grace period 0.
//! - A failed ADD is handled as containerd and the kubelet do: the half-made sandbox is
//!   torn down with DEL (retried until the agent answers) and a new sandbox, with a new
//!   container id, is tried after a short backoff. "Try again later" (code 11, the agent
//!   is down or not ready) is counted in [`SimPod::retries`].
//!
//! - **Socket LB**: each node has a cgroup v2 subtree (`<cgroup2>/tendril-sim/<node>`) its
//!   agent attaches the socket-LB hooks to; [`SimPod::exec`], [`SimPod::spawn`] and
//!   [`SimNode::exec`] place their processes there before exec ([`place_in_cgroup`]).
//!
//! Test guards ([`SimNode`], [`SimPod`], [`SimCluster`]) clean up on drop, also on panic;
//! the free functions are what the `tendril-sim` binary (used by `hack/sim-cluster.sh`)
//! builds on.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Client, ResourceExt};
use rand::Rng;
use serde_json::json;
use tendril_crds::v1alpha1::{Endpoint, NodeNetwork};
use tokio::io::AsyncWriteExt;

use crate::{Process, TestEnv, eventually, fetch_metrics, free_port, target_bin_dir, wait_for};

/// CNI "try again later": the agent is unreachable or not ready yet.
pub const CNI_TRY_AGAIN: u64 = 11;
/// Every "try again later" answer any sandbox operation of this process has met, counted
/// as it happens (a caller can watch it while the operations are still retrying).
static TRY_AGAIN_ANSWERS: AtomicU64 = AtomicU64::new(0);

/// See [`TRY_AGAIN_ANSWERS`].
pub fn try_again_answers() -> u64 {
    TRY_AGAIN_ANSWERS.load(Ordering::Relaxed)
}

/// Where `ip netns` keeps its namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";
const WAIT: Duration = Duration::from_secs(120);
/// How long a kubelet-like caller keeps retrying one sandbox operation.
const SANDBOX_RETRY_FOR: Duration = Duration::from_secs(180);

mod cgroup;
mod cluster;
mod cni;
mod kubelet;
mod netns;
mod node;
mod pod;

pub use cgroup::*;
pub use cluster::*;
pub use cni::*;
pub use kubelet::*;
pub use netns::*;
pub use node::*;
pub use pod::*;
