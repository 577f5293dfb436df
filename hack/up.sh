#!/usr/bin/env bash
# README command 1: bring up the local Tendril cluster.
#
#   prerequisites (idempotent) → control-plane build (cached) → cargo build of the workspace
#   binaries → etcd + kube-apiserver + kube-controller-manager on 127.0.0.1 → the CRDs
#   (`kubectl apply --server-side -k crds/`) → tendril-operator in the background → two
#   simulated nodes with one tendril-agent each and the demo pods (hack/sim-cluster.sh).
#
# Safe to run again: running components are kept, the operator is restarted only when its
# binary was rebuilt. State, logs and pid files live in $TENDRIL_RUN (~/.cache/tendril/run);
# `hack/down.sh` stops everything.
#
# Environment: TENDRIL_OPERATOR_METRICS_PORT (default 9963), and the control-plane settings
# documented in hack/control-plane.sh (TENDRIL_APISERVER_PORT, …).
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$TENDRIL_ROOT"

t0=$(date +%s)
metrics_port=${TENDRIL_OPERATOR_METRICS_PORT:-9963}
logs="$TENDRIL_RUN/logs"
pids="$TENDRIL_RUN/pids"

bash hack/install-prereqs.sh
bash hack/control-plane.sh build
log "building the workspace binaries"
cargo build --workspace --bins
bash hack/control-plane.sh start
KUBECONFIG=$(bash hack/control-plane.sh kubeconfig | tail -1)
export KUBECONFIG

log "applying CRDs"
kubectl apply --server-side --field-manager=tendril-up -k crds/ >/dev/null
mapfile -t crds < <(kubectl get crd -o name | grep '\.tendril\.dev$')
if ((${#crds[@]})); then
  kubectl wait --for=condition=Established --timeout=60s "${crds[@]}" >/dev/null
fi
# The operator's Lease lives here (config/operator.yaml: leaderElection.leaseNamespace).
kubectl create namespace tendril-system --dry-run=client -o yaml |
  kubectl apply --server-side --field-manager=tendril-up -f - >/dev/null

# ---------------------------------------------------------------- operator
operator_bin="$CARGO_TARGET_DIR/debug/tendril-operator"
# By pid and start time (pidfile_pid, hack/lib/common.sh): an operator still starting is
# never taken for one that exited.
operator_pid() { pidfile_pid "$pids/tendril-operator.pid" tendril-operator; }
operator_status="not built (no $operator_bin)"
if [[ -x $operator_bin ]]; then
  pid=$(operator_pid)
  if [[ -n $pid && $operator_bin -nt $pids/tendril-operator.pid ]]; then
    log "operator binary rebuilt: restarting tendril-operator (pid $pid)"
    stop_process "$pid"
    rm -f "$pids/tendril-operator.pid" "$pids/tendril-operator.start"
    pid=""
  fi
  if [[ -z $pid ]]; then
    if [[ -n $(ss -Hltn "sport = :$metrics_port" 2>/dev/null) ]]; then
      die "port $metrics_port is in use (set TENDRIL_OPERATOR_METRICS_PORT)"
    fi
    log "starting tendril-operator (log: $logs/operator.log)"
    mkdir -p "$logs" "$pids"
    printf '\n==== %s starting tendril-operator\n' "$(date -u +%FT%TZ)" >>"$logs/operator.log"
    spawn_detached "$pids/tendril-operator.pid" "$logs/operator.log" env NO_COLOR=1 \
      "$operator_bin" --config config/operator.yaml --kubeconfig "$KUBECONFIG" \
      --metrics-bind "127.0.0.1:$metrics_port"
    pid=$SPAWNED_PID
    deadline=$((SECONDS + 60))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$metrics_port/healthz") == 200 ]]; do
      if [[ -z $(operator_pid) ]]; then
        tail -n 30 "$logs/operator.log" >&2
        exit_status "$pid" >&2
        die "tendril-operator exited (log: $logs/operator.log)"
      fi
      ((SECONDS < deadline)) || die "tendril-operator not healthy after 60s (log: $logs/operator.log)"
      sleep 0.2
    done
  fi
  operator_status="running (pid $(operator_pid)), log $logs/operator.log"
fi

# ---------------------------------------------------------------- simulated nodes and agents
# Two nodes (network namespaces on an underlay bridge), one tendril-agent each, the default
# PodIPPool and the demo pods, wired by the real tendril-cni as a kubelet would.
sim_status="not started (operator not built)"
if [[ -x $operator_bin ]]; then
  bash hack/sim-cluster.sh up
  sim_status=$(bash hack/sim-cluster.sh status 2>&1 | sed 's/^/  /')
  # The demo policy (namespace demo exists now): web takes traffic from demo's clients only.
  kubectl apply --server-side -f hack/demo/policy.yaml >/dev/null
  # The demo Services: web behind a ClusterIP and NodePort 30080 (no kube-proxy).
  kubectl apply --server-side -f hack/demo/services.yaml >/dev/null
  # LB IPAM: a LoadBalancerIPPool and a LoadBalancer Service that gets an EXTERNAL-IP from it.
  kubectl apply --server-side -f hack/demo/lbipam.yaml >/dev/null
fi
# ---------------------------------------------------------------- end of simulated nodes

# ---------------------------------------------------------------- flows: tendril-relay
# Hubble's Observer API for the whole local cluster on Hubble relay's address, so `hubble
# status` and `hubble observe` work with no flags (the agents serve theirs on
# TENDRIL_AGENT_OBSERVER_PORT and the next port, hack/sim-cluster.sh).
relay_bin="$CARGO_TARGET_DIR/debug/tendril-relay"
relay_addr="127.0.0.1:${TENDRIL_RELAY_PORT:-4245}"
map_addr="127.0.0.1:${TENDRIL_SERVICE_MAP_PORT:-12000}"
relay_pid() { pidfile_pid "$pids/tendril-relay.pid" tendril-relay; }
relay_status="not started (operator not built)"
if [[ -x $operator_bin && -x $relay_bin ]]; then
  pid=$(relay_pid)
  if [[ -n $pid && $relay_bin -nt $pids/tendril-relay.pid ]]; then
    log "relay binary rebuilt: restarting tendril-relay (pid $pid)"
    stop_process "$pid"
    rm -f "$pids/tendril-relay.pid" "$pids/tendril-relay.start"
    pid=""
  fi
  if [[ -z $pid ]]; then
    if [[ -n $(ss -Hltn "sport = :${relay_addr##*:}" 2>/dev/null) ]]; then
      die "port ${relay_addr##*:} is in use (set TENDRIL_RELAY_PORT)"
    fi
    if [[ -n $(ss -Hltn "sport = :${map_addr##*:}" 2>/dev/null) ]]; then
      die "port ${map_addr##*:} is in use (set TENDRIL_SERVICE_MAP_PORT)"
    fi
    first_observer=${TENDRIL_AGENT_OBSERVER_PORT:-4250}
    log "starting tendril-relay on $relay_addr (log: $logs/relay.log)"
    printf '\n==== %s starting tendril-relay\n' "$(date -u +%FT%TZ)" >>"$logs/relay.log"
    spawn_detached "$pids/tendril-relay.pid" "$logs/relay.log" env NO_COLOR=1 "$relay_bin" \
      --listen "$relay_addr" --ui-listen "$map_addr" --peer "127.0.0.1:$first_observer" \
      --peer "127.0.0.1:$((first_observer + 1))"
  fi
  relay_status="running (pid $(relay_pid)) on $relay_addr, service map http://$map_addr/, log $logs/relay.log"
fi

cat <<EOF

Tendril is up ($(($(date +%s) - t0))s).

  export KUBECONFIG=$KUBECONFIG

  operator:  $operator_status
  agents:    metrics on http://127.0.0.1:${TENDRIL_AGENT_METRICS_PORT:-9964}/metrics and the next port
  metrics:   http://127.0.0.1:$metrics_port/metrics
  flows:     tendril-relay $relay_status
  apiserver: $(sed -n 's/^APISERVER_URL=//p' "$TENDRIL_RUN/plane.env") (logs in $logs)
  kubectl:   export PATH=$K8S_BIN:\$PATH   (kubectl v$K8S_VERSION, matches the server)

Simulated nodes and demo pods:
$sim_status

Try next:
  kubectl get tendril
  kubectl get pods,endpoints.tendril.dev -A -o wide
  hack/pod-exec.sh demo/client -- ping -c1 <IP of demo/web-2, on the other node>
  hack/pod-exec.sh demo-2/client -- ping -c1 -W1 <IP of demo/web-1>   # denied (hack/demo/policy.yaml)
  kubectl get svc,lbservices -n demo                                  # Services → LBServices
  hack/pod-exec.sh demo/client -- curl -s http://\$(kubectl get svc -n demo web -o jsonpath='{.spec.clusterIP}')/
  ip netns exec tdr-underlay-local curl -s http://10.250.0.10:30080/   # NodePort, from outside (10.250.0.1)
  kubectl get svc -n demo web-lb; kubectl get lbipp                   # EXTERNAL-IP from LB IPAM (hack/demo/lbipam.yaml)
  kubectl get networkpolicies.tendril.dev,resolvedpolicies -A
  curl -s http://127.0.0.1:${TENDRIL_AGENT_METRICS_PORT:-9964}/flows      # recent policy verdicts and drops
  $TENDRIL_TOOLS/hubble observe --last 20                # the same flows through Hubble's API (tendril-relay)
  xdg-open http://$map_addr/                       # the live service map (workloads and their flows, from tendril-relay)
  $CARGO_TARGET_DIR/debug/tendrilctl status --operator-health 127.0.0.1:$metrics_port \
    --agent-metrics tendril-node-1=127.0.0.1:${TENDRIL_AGENT_METRICS_PORT:-9964} \
    --agent-metrics tendril-node-2=127.0.0.1:$((${TENDRIL_AGENT_METRICS_PORT:-9964} + 1))
  $CARGO_TARGET_DIR/debug/tendrilctl policy trace --from demo-2/client --to demo/web-1 --port 8080/TCP
  $CARGO_TARGET_DIR/debug/tendrilctl observe --verdict DROPPED --last 10
  ln -sf $CARGO_TARGET_DIR/debug/tendrilctl ~/.local/bin/kubectl-tendril   # then: kubectl tendril status
  kubectl get nodenetworks
  curl -s http://127.0.0.1:$metrics_port/metrics | grep controller_runtime_reconcile_total

Stop everything with hack/down.sh.
EOF
