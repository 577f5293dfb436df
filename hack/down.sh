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

stop_pidfile() {
  local name=$1 comm=$2 f="$pids/$1.pid" pid i
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]]; then
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------- simulated nodes and agents
# Pods first (CNI DEL needs the agents), then agents, namespaces and Node objects; works
# without a control plane too (then only what lives on this machine is removed).
bash hack/sim-cluster.sh down || true
# ---------------------------------------------------------------- end of simulated nodes

stop_pidfile tendril-operator tendril-operato

if $keep; then
  bash hack/control-plane.sh stop
else
  bash hack/control-plane.sh clean
fi
log "down"
