#!/usr/bin/env bash
# Stops everything hack/up.sh started (simulated nodes, agents, demo pods, operator) and the
# control plane, then deletes the cluster's state ($TENDRIL_RUN: certificates, etcd data,
# logs), so the next hack/up.sh starts a fresh cluster. `--keep-state` keeps the state (the
# next up.sh resumes the same cluster). Builds are kept.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$TENDRIL_ROOT"

keep=false
[[ ${1:-} == --keep-state ]] && keep=true
pids="$TENDRIL_RUN/pids"

# stop_pidfile NAME: the process pids/NAME.pid names (pidfile_pid, hack/lib/common.sh), and
# any process of that name of this run dir without a pid file (a stray: a start that was
# interrupted, or a pid file an older liveness check removed while it was still starting).
stop_pidfile() {
  local name=$1 pid
  pid=$(pidfile_pid "$pids/$name.pid" "$name")
  if [[ -n $pid ]]; then
    log "stopping $name (pid $pid)"
    stop_process "$pid"
  fi
  rm -f "$pids/$name.pid" "$pids/$name.start"
  for pid in $(stray_pids "$name" "$TENDRIL_RUN/"); do
    log "stopping stray $name (pid $pid)"
    stop_process "$pid"
  done
}

# ---------------------------------------------------------------- simulated nodes and agents
# Pods first (CNI DEL needs the agents), then agents, namespaces and Node objects; works
# without a control plane too (then only what lives on this machine is removed).
bash hack/sim-cluster.sh down || true
# ---------------------------------------------------------------- end of simulated nodes

stop_pidfile tendril-relay
stop_pidfile tendril-operator

if $keep; then
  bash hack/control-plane.sh stop
else
  bash hack/control-plane.sh clean
fi
log "down"
