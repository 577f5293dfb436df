#!/usr/bin/env bash
# `tilt ci` of the Tiltfile in local mode, as hack/test.sh runs it: builds Tilt if needed
# (hack/tilt/build.sh), then brings up the whole local loop (cargo build, control plane, CRDs,
# operator, two simulated nodes with their agents, one pod per node, Prometheus) and succeeds
# once every resource is ready. It runs on its own run directory, ports and node names, so a
# developer's hack/up.sh cluster is never touched, and removes everything it made on exit:
# Tilt stops the processes it ran, this script the namespaces, pins and the control plane.
#
# Environment: TENDRIL_TILT_CI_TIMEOUT (default 20m), TENDRIL_TILT_CI_PORT_BASE (default
# 31000: ports base+1 … base+10). Needs root.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
cd "$TENDRIL_ROOT"

tilt=$(bash hack/tilt/build.sh | tail -1)
base=${TENDRIL_TILT_CI_PORT_BASE:-31000}
export TENDRIL_TILT_MODE=local
export TENDRIL_RUN="$TENDRIL_CACHE/tilt-ci-run"
export TENDRIL_ETCD_PORT=$((base + 1)) TENDRIL_ETCD_PEER_PORT=$((base + 2))
export TENDRIL_APISERVER_PORT=$((base + 3)) TENDRIL_KCM_PORT=$((base + 4))
export TENDRIL_OPERATOR_METRICS_PORT=$((base + 5)) TENDRIL_AGENT_METRICS_PORT=$((base + 6))
export TENDRIL_PROMETHEUS_PORT=$((base + 9))
export TENDRIL_SIM_CLUSTER=tiltci TENDRIL_SIM_NODES="tiltci-node-1 tiltci-node-2"
export TENDRIL_SIM_POD_NAMESPACE=tilt-ci
unset KUBECONFIG

cleanup() {
  local f n
  for f in "$TENDRIL_RUN"/sim/pods/*.json; do
    [[ -e $f ]] && ip netns del "$(jq -r .netns "$f")" 2>/dev/null || true
  done
  for n in $TENDRIL_SIM_NODES; do
    ip netns del "tdr-$n" 2>/dev/null || true
    rm -rf "/sys/fs/bpf/tendril-sim/$n"
  done
  ip netns del "tdr-underlay-$TENDRIL_SIM_CLUSTER" 2>/dev/null || true
  bash hack/control-plane.sh clean >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT

start=$(date +%s)
log "tilt ci (local mode, run dir $TENDRIL_RUN, ports $((base + 1))-$((base + 10)))"
rc=0
"$tilt" ci --port $((base + 10)) --timeout "${TENDRIL_TILT_CI_TIMEOUT:-20m}" || rc=$?
log "tilt ci finished in $(($(date +%s) - start))s (exit $rc)"
exit $rc
