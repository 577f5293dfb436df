#!/usr/bin/env bash
# Simulated nodes, agents and demo pods on the running local control plane.
#
# usage: hack/sim-cluster.sh up|down|status
#   up      two simulated nodes (network namespaces tdr-tendril-node-{1,2} joined by a
#           bridge in tdr-underlay-local, addresses 10.250.0.10-11), their Node objects,
#           one tendril-agent per node (--node-netns), the default PodIPPool (unless one
#           exists) and the demo pods: app=web and app=client in namespaces demo and demo-2,
#           created through the API with spec.nodeName, their sandboxes set up by the real
#           tendril-cni as a kubelet would and their status written as a kubelet would.
#           Idempotent: what runs is kept; an agent is restarted when its binary was rebuilt.
#   down    deletes the pods (CNI DEL first), stops the agents, removes the namespaces and
#           the Node objects.
#   status  nodes, agents, pods; exit 1 unless every agent runs.
#
# Needs: the control plane (hack/control-plane.sh start), the CRDs, tendril-operator running
# (it gives the nodes their pod CIDRs and the pods their Endpoints and identities), the
# workspace binaries (cargo build --workspace --bins), root. Logs in $TENDRIL_RUN/logs,
# pid files in $TENDRIL_RUN/pids, node and pod state in $TENDRIL_RUN/sim.
# Environment: TENDRIL_AGENT_METRICS_PORT (first agent's metrics port, default 9964; the
# next node uses the next port), TENDRIL_AGENT_OBSERVER_PORT (first agent's Observer API
# port for Hubble flows, default 4250, the next node the next port; hack/up.sh puts
# tendril-relay in front of them on 4245).
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$TENDRIL_ROOT"

NODES=(tendril-node-1 tendril-node-2)
logs="$TENDRIL_RUN/logs"
pids="$TENDRIL_RUN/pids"
simdir="$TENDRIL_RUN/sim"
bin="$CARGO_TARGET_DIR/debug"
first_port=${TENDRIL_AGENT_METRICS_PORT:-9964}
first_observer_port=${TENDRIL_AGENT_OBSERVER_PORT:-4250}

# `down` also works without a control plane: it then removes only what lives on this machine.
have_plane=false
if [[ -f $TENDRIL_RUN/kubeconfig ]]; then
  have_plane=true
  KUBECONFIG=$(bash hack/control-plane.sh kubeconfig | tail -1)
  export KUBECONFIG
elif [[ ${1:-} != down ]]; then
  die "no local control plane (run hack/up.sh)"
fi
export TENDRIL_SIM_DIR="$simdir"

sim() { "$bin/tendril-sim" --cluster local "$@"; }

# By pid and start time (pidfile_pid, hack/lib/common.sh): an agent still starting is never
# taken for one that exited; a killed agent lingering as a zombie is not running.
agent_pid() { pidfile_pid "$pids/tendril-agent-$1.pid" tendril-agent; }

stop_agent() {
  local node=$1 pid i
  pid=$(agent_pid "$node")
  [[ -n $pid ]] || return 0
  log "stopping tendril-agent for $node (pid $pid)"
  stop_process "$pid"
  rm -f "$pids/tendril-agent-$node.pid" "$pids/tendril-agent-$node.start"
}

start_agent() {
  local node=$1 port=$2 observer_port=$3 pid
  pid=$(agent_pid "$node")
  if [[ -n $pid && $bin/tendril-agent -nt $pids/tendril-agent-$node.pid ]]; then
    log "agent binary rebuilt: restarting the agent of $node"
    stop_agent "$node"
    pid=""
  fi
  [[ -z $pid ]] || return 0
  if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
    die "port $port is in use (set TENDRIL_AGENT_METRICS_PORT)"
  fi
  log "starting tendril-agent for $node (metrics :$port, log: $logs/agent-$node.log)"
  mkdir -p "$logs" "$pids" "$simdir/$node"
  printf '\n==== %s starting tendril-agent\n' "$(date -u +%FT%TZ)" >>"$logs/agent-$node.log"
  spawn_detached "$pids/tendril-agent-$node.pid" "$logs/agent-$node.log" env NO_COLOR=1 \
    "$bin/tendril-agent" --config config/agent.yaml --kubeconfig "$KUBECONFIG" \
    --node-name "$node" --node-netns "/var/run/netns/tdr-$node" \
    --state-dir "$simdir/$node" --cni-socket "$simdir/$node/cni.sock" \
    --bpffs-root "/sys/fs/bpf/tendril-sim/$node" \
    --metrics-bind "127.0.0.1:$port" --observer-bind "127.0.0.1:$observer_port"
}

cmd_up() {
  for b in tendril-sim tendril-agent tendril-cni; do
    [[ -x $bin/$b ]] || die "$bin/$b missing (cargo build --workspace --bins)"
  done
  if ! kubectl get podippools.tendril.dev default >/dev/null 2>&1; then
    log "creating the default PodIPPool (10.244.0.0/16, a /24 per node)"
    kubectl apply --server-side --field-manager=tendril-sim -f - >/dev/null <<'EOF'
apiVersion: tendril.dev/v1alpha1
kind: PodIPPool
metadata:
  name: default
spec:
  ipv4:
    cidrs: ["10.244.0.0/16"]
    maskSize: 24
EOF
  fi
  log "simulated nodes: ${NODES[*]}"
  sim nodes-up "${NODES[@]}" >/dev/null
  # The underlay namespace doubles as a client outside the cluster (NodePort, LB IPs).
  ip -n tdr-underlay-local addr replace 10.250.0.1/24 dev br0
  local i
  for i in "${!NODES[@]}"; do
    start_agent "${NODES[$i]}" $((first_port + i)) $((first_observer_port + i))
  done
  log "waiting for the agents (NodeNetwork Ready; needs tendril-operator for the pod CIDRs)"
  if ! sim wait-ready --timeout-seconds 120 "${NODES[@]}" >/dev/null; then
    for n in "${NODES[@]}"; do tail -n 15 "$logs/agent-$n.log" >&2; done
    die "agents not ready (is tendril-operator running? logs: $logs/agent-*.log)"
  fi
  log "demo pods (namespaces demo, demo-2)"
  sim demo-up "${NODES[@]}" | sed 's/^/  /' >&2
  start_web_servers
}

# The demo web pods answer HTTP on 8080 with their name (what the demo Services balance).
web_server_pidfile() { echo "$pids/web-$1.pid"; }

start_web_servers() {
  local pod node ip netns slug
  while read -r pod node ip netns; do
    [[ ${pod#*/} == web-* ]] || continue
    slug=${pod/\//_}
    [[ -z $(pidfile_pid "$(web_server_pidfile "$slug")" python3) ]] || continue
    mkdir -p "$simdir/web/$slug"
    echo "$pod on $node" >"$simdir/web/$slug/index.html"
    spawn_detached "$(web_server_pidfile "$slug")" "$logs/web-$slug.log" \
      ip netns exec "$netns" python3 -m http.server 8080 --directory "$simdir/web/$slug"
  done < <(sim pods)
}

stop_web_servers() {
  local f pid
  for f in "$pids"/web-*.pid; do
    [[ -e $f ]] || continue
    pid=$(pidfile_pid "$f" python3)
    [[ -z $pid ]] || stop_process "$pid" 5
    rm -f "$f" "${f%.pid}.start"
  done
  for pid in $(stray_pids python3 "$simdir/web/"); do stop_process "$pid" 5; done
}

cmd_down() {
  stop_web_servers
  if $have_plane && [[ -x $bin/tendril-sim ]]; then
    sim pods-down | sed 's/^/  /' >&2 || log "some pods could not be deleted cleanly"
  fi
  for n in "${NODES[@]}"; do stop_agent "$n"; done
  # Agents of this cluster without a pid file (a start interrupted, or a pid file an older
  # liveness check removed while the agent was still starting): by their state dir.
  local pid
  for pid in $(stray_pids tendril-agent "$simdir/"); do
    log "stopping stray tendril-agent (pid $pid)"
    stop_process "$pid"
  done
  if $have_plane && [[ -x $bin/tendril-sim ]]; then
    sim nodes-down "${NODES[@]}" || log "Node objects not deleted (is the apiserver down?)"
  fi
  # Without the binary or the apiserver, still remove what lives in the kernel.
  for n in "${NODES[@]}"; do
    ip netns del "tdr-$n" 2>/dev/null || true
    rm -rf "/sys/fs/bpf/tendril-sim/$n"
  done
  for f in "$simdir"/pods/*.json; do
    [[ -e $f ]] || continue
    ip netns del "$(jq -r .netns "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  ip netns del tdr-underlay-local 2>/dev/null || true
  rm -rf "$simdir"
  log "simulated nodes down"
}

cmd_status() {
  local ok=0 n i pid
  for i in "${!NODES[@]}"; do
    n=${NODES[$i]}
    pid=$(agent_pid "$n")
    if [[ -n $pid ]]; then
      echo "node $n: agent running (pid $pid, metrics 127.0.0.1:$((first_port + i)), flows 127.0.0.1:$((first_observer_port + i))), netns tdr-$n"
    else
      echo "node $n: agent NOT running"
      ok=1
    fi
  done
  if [[ -x $bin/tendril-sim ]]; then
    echo "pods (NAMESPACE/NAME NODE IP NETNS):"
    sim pods | sed 's/^/  /'
    echo "web servers (HTTP :8080): $(ls "$pids"/web-*.pid 2>/dev/null | wc -l) running"
  fi
  return $ok
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) die "usage: $0 up|down|status" ;;
esac
