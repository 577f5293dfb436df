#!/usr/bin/env bash
# Runs a command inside a simulated pod's network namespace (the local cluster has no
# kubelet, so `kubectl exec` cannot).
#
# usage: hack/pod-exec.sh NAMESPACE/POD -- CMD [ARGS…]
#   e.g. hack/pod-exec.sh demo/client -- ping -c1 "$(kubectl get pod -n demo web-1 -o jsonpath='{.status.podIP}')"
#
# The pod's sandbox is the namespace tdrp_NAMESPACE_POD that hack/sim-cluster.sh (through
# tendril-sim) created and handed to tendril-cni. Needs root.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"

usage() { die "usage: $0 NAMESPACE/POD -- CMD [ARGS…]"; }
[[ $# -ge 3 && $1 == */* && $2 == -- ]] || usage
ns=${1%%/*}
pod=${1#*/}
[[ -n $ns && -n $pod && $pod != */* ]] || usage
shift 2
netns="tdrp_${ns}_${pod}"
if [[ ! -e /var/run/netns/$netns ]]; then
  die "no simulated pod $ns/$pod (no network namespace $netns; see hack/sim-cluster.sh status)"
fi
exec ip netns exec "$netns" "$@"
