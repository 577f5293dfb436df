#!/usr/bin/env bash
# `tilt ci` of the Tiltfile in local mode, as hack/test.sh runs it: builds Tilt if needed
# (hack/tilt/build.sh), then brings up the whole local loop (cargo build, control plane, CRDs,
# operator, two simulated nodes with their agents, one pod per node, Prometheus) and succeeds
# once every resource is ready. It runs on its own run directory, ports and node names, so a
# developer's hack/up.sh cluster is never touched, and removes everything it made on exit:
# Tilt stops the processes it ran, this script the namespaces, pins and the control plane.
# When it fails, the logs are kept first (Tilt's output with the operator's and agents' logs,
# the control plane's component logs, a snapshot of the machine's processes, sockets and
# kernel messages) in $TENDRIL_STEP_LOGS (set by hack/test.sh), else
# $TENDRIL_TEST_LOGS/tilt-ci (~/.cache/tendril/test-logs/tilt-ci), and the path is printed.
#
# Environment: TENDRIL_TILT_CI_TIMEOUT (default 20m), TENDRIL_TILT_CI_PORT_BASE (default
# 31000: ports base+1 … base+15), TENDRIL_TILT_CI_RUN (run directory, default
# ~/.cache/tendril/tilt-ci-run) and TENDRIL_TILT_CI_NAME (default tiltci: the simulated
# cluster, its nodes NAME-node-1/2 and the pods' network namespaces): a second checkout
# running beside this one sets its own of each, or waits (runs on one run dir take turns,
# see the lock below). Needs root.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"
cd "$TENDRIL_ROOT"

run="${TENDRIL_TILT_CI_RUN:-$TENDRIL_CACHE/tilt-ci-run}"
# One run at a time per run dir: the cache is per user, not per checkout, so two checkouts'
# suites would otherwise share this run dir, its ports and node names, and each one's cleanup
# would tear down the other's plane. The lock is held by `flock` itself (-o: not inherited by
# Tilt or the components, which may outlive this script) until this script exits.
if [[ ${TENDRIL_TILT_CI_LOCKED:-} != "$run" ]]; then
  mkdir -p "$(dirname "$run")"
  if ! flock -n "$run.lock" true; then
    log "another hack/tilt/ci.sh uses $run: waiting for it (at most 30 min)"
  fi
  TENDRIL_TILT_CI_LOCKED=$run exec flock -o -w 1800 "$run.lock" bash "$TENDRIL_ROOT/hack/tilt/ci.sh" "$@"
fi

tilt=$(bash hack/tilt/build.sh | tail -1)
base=${TENDRIL_TILT_CI_PORT_BASE:-31000}
export TENDRIL_TILT_MODE=local
export TENDRIL_RUN="$run"
keep="${TENDRIL_STEP_LOGS:-$TENDRIL_TEST_LOGS/tilt-ci}"
export TENDRIL_ETCD_PORT=$((base + 1)) TENDRIL_ETCD_PEER_PORT=$((base + 2))
export TENDRIL_APISERVER_PORT=$((base + 3)) TENDRIL_KCM_PORT=$((base + 4))
export TENDRIL_OPERATOR_METRICS_PORT=$((base + 5)) TENDRIL_AGENT_METRICS_PORT=$((base + 6))
export TENDRIL_PROMETHEUS_PORT=$((base + 9))
export TENDRIL_AGENT_OBSERVER_PORT=$((base + 11)) TENDRIL_RELAY_PORT=$((base + 14))
export TENDRIL_SERVICE_MAP_PORT=$((base + 15))
name=${TENDRIL_TILT_CI_NAME:-tiltci}
export TENDRIL_SIM_CLUSTER=$name TENDRIL_SIM_NODES="$name-node-1 $name-node-2"
if [[ $name == tiltci ]]; then
  export TENDRIL_SIM_POD_NAMESPACE=tilt-ci
else
  export TENDRIL_SIM_POD_NAMESPACE=$name
fi
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
# On a failure the logs go to $keep before the run dir is removed; a success leaves nothing.
on_exit() {
  local rc=$?
  if ((rc != 0)); then
    mkdir -p "$keep"
    snapshot_machine "$keep"
    keep_plane_logs "$TENDRIL_RUN" "$keep"
    [[ -f $TENDRIL_RUN/tilt.log ]] && cp -a "$TENDRIL_RUN/tilt.log" "$keep/"
    if [[ -d $TENDRIL_RUN/sim ]]; then
      (cd "$TENDRIL_RUN" && find sim -name '*.json' -exec cp --parents {} "$keep/" \;) 2>/dev/null || true
    fi
    log "tilt ci failed (exit $rc): logs kept in $keep"
  fi
  cleanup
  exit $rc
}
cleanup
# hack/test.sh made $TENDRIL_STEP_LOGS for this run (and writes the step's output there).
[[ -n ${TENDRIL_STEP_LOGS:-} ]] || rm -rf "$keep"
trap on_exit EXIT

start=$(date +%s)
log "tilt ci (local mode, run dir $TENDRIL_RUN, ports $((base + 1))-$((base + 10)))"
mkdir -p "$TENDRIL_RUN"
# Tilt's output holds the operator's and the agents' logs (Tilt runs them): kept on failure.
set +e
"$tilt" ci --port $((base + 10)) --timeout "${TENDRIL_TILT_CI_TIMEOUT:-20m}" 2>&1 | tee "$TENDRIL_RUN/tilt.log"
rc=${PIPESTATUS[0]}
set -e
log "tilt ci finished in $(($(date +%s) - start))s (exit $rc)"
exit $rc
