#!/usr/bin/env bash
# The local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager built
# from Go modules (hack/control-plane-build.sh), run on 127.0.0.1 like controller-runtime's
# envtest, but with a controller-manager so Namespaces, ServiceAccounts, EndpointSlices,
# ReplicaSets and garbage collection behave as in a real cluster. Nothing schedules pods and
# there is no kubelet: tests create Nodes and write Pod status themselves.
#
# usage: hack/control-plane.sh COMMAND
#   build                  build the binaries (no-op when up to date)
#   start                  start every component that is not running, wait until ready;
#                          harmless when the plane is already up
#   stop                   stop every component (pid files, then strays of this run dir)
#   status                 show components; exit 1 unless all are healthy
#   kubeconfig             print the admin kubeconfig path (last line)
#   restart COMPONENT      restart etcd | apiserver | controller-manager and wait until ready
#   kill COMPONENT         stop one component (fault tests); `start` brings it back
#   clean                  stop, then delete the run dir (certificates, etcd data, logs)
#
# State lives in $TENDRIL_RUN (default ~/.cache/tendril/run): pki/, etcd/, logs/, pids/,
# kubeconfig, and plane.env (the settings the plane runs with, KEY=VALUE, read by the e2e
# harness). Settings, each overridable by environment; once a plane has started, the values
# in plane.env are reused unless overridden:
#   TENDRIL_ETCD_PORT=12379 TENDRIL_ETCD_PEER_PORT=12380 TENDRIL_APISERVER_PORT=16443
#   TENDRIL_KCM_PORT=20257
#   TENDRIL_ADVERTISE_ADDRESS: kube-apiserver refuses a loopback advertise address (it is
#     written into the `kubernetes` Service's endpoints). Default: the machine's own primary
#     IPv4 address (source of the default route, found by `ip route get`, a table lookup that
#     sends nothing), else its first global IPv4 address, else 198.51.100.1 (TEST-NET-2).
#     The apiserver still binds only 127.0.0.1 and nothing dials the advertised address, so
#     no traffic leaves the machine and no link is created.
#   TENDRIL_ETCD_EXTRA_ARGS, TENDRIL_APISERVER_EXTRA_ARGS, TENDRIL_KCM_EXTRA_ARGS: more flags
#     for that component (split on spaces; not saved in plane.env), e.g. --feature-gates=…;
#     the e2e tests break a start on purpose with a flag that does not exist.
# Service CIDRs 10.96.0.0/16 and fd00:10:96::/112: dual stack, IPv4 first, so Services stay
# IPv4 unless they ask (ipFamilyPolicy PreferDualStack/RequireDualStack, or ipFamilies) and
# the `kubernetes` Service is 10.96.0.1. kube-controller-manager's EndpointSlice controller
# writes IPv6 slices for the IPv6 family of a Service.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"

SERVICE_CIDR=10.96.0.0/16,fd00:10:96::/112
CONTROLLERS=endpointslice-controller,endpointslice-mirroring-controller,endpoints-controller
CONTROLLERS+=,namespace-controller,garbage-collector-controller,serviceaccount-controller
CONTROLLERS+=,serviceaccount-token-controller,root-ca-certificate-publisher-controller
CONTROLLERS+=,replicaset-controller,deployment-controller,clusterrole-aggregation-controller
CONTROLLERS+=,pod-garbage-collector-controller,service-cidr-controller
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

pki="$TENDRIL_RUN/pki"
pids="$TENDRIL_RUN/pids"
logs="$TENDRIL_RUN/logs"
kubeconfig="$TENDRIL_RUN/kubeconfig"
planeenv="$TENDRIL_RUN/plane.env"

load_config() {
  local saved_etcd="" saved_peer="" saved_api="" saved_kcm="" saved_adv=""
  if [[ -f $planeenv ]]; then
    saved_etcd=$(sed -n 's/^ETCD_PORT=//p' "$planeenv")
    saved_peer=$(sed -n 's/^ETCD_PEER_PORT=//p' "$planeenv")
    saved_api=$(sed -n 's/^APISERVER_PORT=//p' "$planeenv")
    saved_kcm=$(sed -n 's/^KCM_PORT=//p' "$planeenv")
    saved_adv=$(sed -n 's/^ADVERTISE_ADDRESS=//p' "$planeenv")
  fi
  ETCD_PORT=${TENDRIL_ETCD_PORT:-${saved_etcd:-12379}}
  ETCD_PEER_PORT=${TENDRIL_ETCD_PEER_PORT:-${saved_peer:-$((ETCD_PORT + 1))}}
  APISERVER_PORT=${TENDRIL_APISERVER_PORT:-${saved_api:-16443}}
  KCM_PORT=${TENDRIL_KCM_PORT:-${saved_kcm:-20257}}
  ADVERTISE_ADDRESS=${TENDRIL_ADVERTISE_ADDRESS:-$saved_adv}
  if [[ -z $ADVERTISE_ADDRESS ]]; then
    ADVERTISE_ADDRESS=$(ip -4 -o route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  fi
  if [[ -z $ADVERTISE_ADDRESS ]]; then
    ADVERTISE_ADDRESS=$(ip -4 -o addr show scope global 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)
  fi
  # No address at all (an isolated sandbox): a TEST-NET-2 address. The apiserver does not
  # require it to be local; it is only published as the `kubernetes` endpoint.
  ADVERTISE_ADDRESS=${ADVERTISE_ADDRESS:-198.51.100.1}
  APISERVER_URL="https://127.0.0.1:$APISERVER_PORT"
}

write_config() {
  cat >"$planeenv.tmp" <<EOF
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
APISERVER_PORT=$APISERVER_PORT
KCM_PORT=$KCM_PORT
ADVERTISE_ADDRESS=$ADVERTISE_ADDRESS
APISERVER_URL=$APISERVER_URL
KUBECONFIG=$kubeconfig
SERVICE_CIDR=$SERVICE_CIDR
K8S_VERSION=$K8S_VERSION
ETCD_VERSION=$ETCD_VERSION
EOF
  mv "$planeenv.tmp" "$planeenv"
}

config_matches() {
  local kv
  for kv in "ETCD_PORT=$ETCD_PORT" "ETCD_PEER_PORT=$ETCD_PEER_PORT" "APISERVER_PORT=$APISERVER_PORT" \
    "KCM_PORT=$KCM_PORT" "ADVERTISE_ADDRESS=$ADVERTISE_ADDRESS" "SERVICE_CIDR=$SERVICE_CIDR"; do
    grep -qx -- "$kv" "$planeenv" || return 1
  done
}

# ---------------------------------------------------------------- processes

# pid of a running component of this run dir, or nothing: see pidfile_pid in
# hack/lib/common.sh (pid and start time, written at spawn). A pid file without a start file
# (an older plane) is checked by command name and run dir. A stale pid file is removed; why
# is appended to logs/pid-checks.log.
running_pid() {
  local name=$1 f="$pids/$1.pid" pid
  [[ -f $f ]] || return 0
  pid=$(cat "$f")
  if [[ -f $pids/$name.start ]] ||
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$TENDRIL_RUN/"; then
    if [[ -n $(pidfile_pid "$f" "$name") ]]; then
      echo "$pid"
      return 0
    fi
  fi
  printf '%s: pid file named %s (%s) at %s: not running\n' "$name" "${pid:-nothing}" \
    "$(describe_pid "$pid")" "$(date -u +%T.%N)" >>"$logs/pid-checks.log" 2>/dev/null || true
  rm -f "$f" "$pids/$name.start"
}

# A process of this run dir without a pid file (e.g. a start killed between spawn and
# writing the pid file) would hold the ports: stop it first. Found by the run dir in its
# command line, never by name alone (stray_pids, hack/lib/common.sh).
stop_strays() {
  local pid
  for pid in $(stray_pids "$1" "$TENDRIL_RUN/"); do
    log "stopping stray $1 (pid $pid) left by an earlier run"
    stop_pid "$pid"
  done
}

stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

stop_component() {
  local name=$1 pid
  pid=$(running_pid "$name")
  if [[ -n $pid ]]; then
    log "stopping $name (pid $pid)"
    stop_pid "$pid"
  fi
  rm -f "$pids/$name.pid" "$pids/$name.start"
  stop_strays "$name"
}

port_free() { [[ -z $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# check_port WHAT PORT VARIABLE: dies when something listens on PORT. A port inside the
# kernel's ephemeral range (ip_local_port_range) may be taken at any moment as the local port
# of some outgoing connection, which makes the component's bind fail although nothing
# listens: warned about (the defaults, and the e2e harness's ports, are below that range).
check_port() {
  local what=$1 port=$2 var=$3 lo hi
  port_free "$port" || die "$what port $port is in use (set $var)"
  read -r lo hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || return 0
  if ((port >= lo && port <= hi)); then
    log "warning: $what port $port is in the ephemeral port range $lo-$hi: an outgoing connection may hold it (set $var below $lo)"
  fi
  return 0
}

# Runs a component detached (spawn_detached in hack/lib/common.sh: own session, away from
# the caller's terminal and lock, known by pid and start time from the fork on, so one still
# starting is never taken for one that exited).
declare -A spawned=()
spawn() {
  local name=$1
  shift
  mkdir -p "$logs" "$pids"
  printf '\n==== %s starting %s\n' "$(date -u +%FT%TZ)" "$name" >>"$logs/$name.log"
  spawn_detached "$pids/$name.pid" "$logs/$name.log" "$K8S_BIN/$name" "$@"
  spawned[$name]=$SPAWNED_PID
  printf '%s: spawned pid %s (%s) at %s\n' "$name" "$SPAWNED_PID" "$(describe_pid "$SPAWNED_PID")" \
    "$(date -u +%T.%N)" >>"$logs/pid-checks.log"
}

# Why COMPONENT, spawned by this shell, is gone: its exit status (bash keeps those of its
# background jobs), the kernel's word if it killed it (OOM), and who holds a port it could
# not bind.
exit_cause() {
  local comp=$1 pid=${spawned[$1]:-} port
  [[ -n $pid ]] || { echo "not started by this command"; return 0; }
  exit_status "$pid"
  for port in $(grep -o '127\.0\.0\.1:[0-9]*: bind: address already in use' "$logs/$comp.log" 2>/dev/null |
    tail -n 1 | sed 's/127\.0\.0\.1:\([0-9]*\).*/\1/'); do
    echo "sockets on port $port (a client's ephemeral port blocks a listener too):"
    ss -Htanp "sport = :$port" 2>/dev/null | head -n 5
  done
}

# wait_until DESCRIPTION TIMEOUT_S COMPONENT COMMAND...: polls COMMAND until it succeeds;
# fails early, showing the log, when COMPONENT exits.
wait_until() {
  local what=$1 timeout=$2 comp=$3
  shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n $comp && -z $(running_pid "$comp") ]]; then
      tail -n 30 "$logs/$comp.log" >&2 || true
      exit_cause "$comp" >&2
      die "$comp exited while waiting for $what (log: $logs/$comp.log)"
    fi
    ((SECONDS < deadline)) || {
      tail -n 30 "$logs/$comp.log" >&2 || true
      die "timed out after ${timeout}s waiting for $what (log: $logs/$comp.log)"
    }
    sleep 0.2
  done
}

# ---------------------------------------------------------------- health checks

curl_admin() {
  curl -sf --max-time 5 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"
}
etcd_healthy() { curl -sf --max-time 5 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ready() { [[ $(curl_admin "$APISERVER_URL/readyz") == ok ]]; }
kcm_healthy() { [[ $(curl -skf --max-time 5 "https://127.0.0.1:$KCM_PORT/healthz") == ok ]]; }
# The serviceaccount controller made the default ServiceAccount and the root-ca publisher the
# CA bundle: pods can be created in the default namespace and the controllers are working.
controllers_working() {
  curl_admin "$APISERVER_URL/api/v1/namespaces/default/serviceaccounts/default" >/dev/null &&
    curl_admin "$APISERVER_URL/api/v1/namespaces/default/configmaps/kube-root-ca.crt" >/dev/null
}
healthy() {
  [[ -n $(running_pid etcd) && -n $(running_pid kube-apiserver) &&
    -n $(running_pid kube-controller-manager) ]] && etcd_healthy && apiserver_ready && kcm_healthy
}

# ---------------------------------------------------------------- certificates

gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME SUBJECT EXTENSIONS: a key and a certificate signed by the CA.
sign() {
  local name=$1 subj=$2 ext=$3
  gen_key "$pki/$name.key"
  openssl req -new -key "$pki/$name.key" -subj "$subj" -out "$pki/$name.csr" 2>/dev/null
  printf '%b\n' "$ext" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

ensure_pki() {
  local san="subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:$ADVERTISE_ADDRESS,DNS:localhost"
  san+=",DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
  san+=",DNS:kubernetes.default.svc.cluster.local"
  if [[ -f $pki/apiserver.crt ]] &&
    openssl x509 -in "$pki/apiserver.crt" -noout -ext subjectAltName 2>/dev/null | grep -q "IP Address:$ADVERTISE_ADDRESS\$\|IP Address:$ADVERTISE_ADDRESS,"; then
    return 0
  fi
  log "generating certificates in $pki"
  mkdir -p "$pki"
  chmod 700 "$pki"
  if [[ ! -f $pki/ca.crt ]]; then
    gen_key "$pki/ca.key"
    openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=tendril-ca" -days 3650 -sha256 \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out "$pki/ca.crt" 2>/dev/null
  fi
  local common="basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment"
  sign apiserver "/CN=kube-apiserver" "$common\nextendedKeyUsage=serverAuth\n$san"
  sign admin "/O=system:masters/CN=tendril-admin" "$common\nextendedKeyUsage=clientAuth"
  sign controller-manager "/CN=system:kube-controller-manager" "$common\nextendedKeyUsage=clientAuth"
  if [[ ! -f $pki/sa.key ]]; then
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
  fi
}

# write_kubeconfig FILE USER: self-contained (certificates embedded).
write_kubeconfig() {
  local file=$1 user=$2
  b64() { base64 -w0 <"$1"; }
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tendril
  cluster:
    server: $APISERVER_URL
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$pki/$user.crt")
    client-key-data: $(b64 "$pki/$user.key")
contexts:
- name: tendril
  context:
    cluster: tendril
    user: $user
current-context: tendril
EOF
  chmod 600 "$file.tmp"
  mv "$file.tmp" "$file"
}

# ---------------------------------------------------------------- components

start_etcd() {
  [[ -n $(running_pid etcd) ]] && return 0
  stop_strays etcd
  check_port etcd "$ETCD_PORT" TENDRIL_ETCD_PORT
  check_port "etcd peer" "$ETCD_PEER_PORT" TENDRIL_ETCD_PEER_PORT
  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  # --unsafe-no-fsync: the data is disposable and fsync on a shared CI disk is the slowest
  # part of every write.
  spawn etcd --name=tendril --data-dir="$TENDRIL_RUN/etcd" \
    --listen-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster="tendril=http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync --log-level=warn --quota-backend-bytes=4294967296 \
    --auto-compaction-mode=periodic --auto-compaction-retention=5m ${TENDRIL_ETCD_EXTRA_ARGS:-}
}

start_apiserver() {
  [[ -n $(running_pid kube-apiserver) ]] && return 0
  stop_strays kube-apiserver
  check_port kube-apiserver "$APISERVER_PORT" TENDRIL_APISERVER_PORT
  log "starting kube-apiserver on $APISERVER_URL (advertising $ADVERTISE_ADDRESS)"
  spawn kube-apiserver --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
    --advertise-address="$ADVERTISE_ADDRESS" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --client-ca-file="$pki/ca.crt" --cert-dir="$TENDRIL_RUN/apiserver-certs" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --api-audiences=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC --allow-privileged=true --profiling=false --v=1 \
    ${TENDRIL_APISERVER_EXTRA_ARGS:-}
}

start_kcm() {
  [[ -n $(running_pid kube-controller-manager) ]] && return 0
  stop_strays kube-controller-manager
  check_port kube-controller-manager "$KCM_PORT" TENDRIL_KCM_PORT
  log "starting kube-controller-manager"
  local kc="$TENDRIL_RUN/controller-manager.kubeconfig"
  # No --authentication-kubeconfig: its /healthz is always allowed and nothing scrapes it.
  spawn kube-controller-manager --kubeconfig="$kc" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --cert-dir="$TENDRIL_RUN/kcm-certs" \
    --controllers="$CONTROLLERS" --use-service-account-credentials=true \
    --root-ca-file="$pki/ca.crt" --service-account-private-key-file="$pki/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --cluster-name=tendril \
    --leader-elect=false --profiling=false --v=1 ${TENDRIL_KCM_EXTRA_ARGS:-}
}

wait_ready() {
  wait_until "etcd health" 60 etcd etcd_healthy
  wait_until "kube-apiserver /readyz" 120 kube-apiserver apiserver_ready
  wait_until "kube-controller-manager /healthz" 60 kube-controller-manager kcm_healthy
  wait_until "default ServiceAccount and kube-root-ca.crt (controllers working)" 120 \
    kube-controller-manager controllers_working
}

lock() {
  mkdir -p "$TENDRIL_RUN"
  exec 9>"$TENDRIL_RUN/.lock"
  flock 9
}

# ---------------------------------------------------------------- commands

cmd_start() {
  lock
  load_config
  # A plane running with other settings than requested is restarted with the requested ones.
  if [[ -f $planeenv ]] && ! config_matches; then
    log "settings changed: restarting the plane"
    for c in kube-controller-manager kube-apiserver etcd; do stop_component "$c"; done
  fi
  if healthy && controllers_working; then
    write_kubeconfig "$kubeconfig" admin
    log "control plane already running: $APISERVER_URL"
    return 0
  fi
  local start_ns
  start_ns=$(date +%s%N)
  [[ -x $K8S_BIN/kube-apiserver ]] || die "control-plane binaries missing in $K8S_BIN: run hack/control-plane.sh build"
  mkdir -p "$TENDRIL_RUN" "$logs" "$pids"
  ensure_pki
  write_config
  write_kubeconfig "$kubeconfig" admin
  write_kubeconfig "$TENDRIL_RUN/controller-manager.kubeconfig" controller-manager
  start_etcd
  wait_until "etcd health" 60 etcd etcd_healthy
  start_apiserver
  wait_until "kube-apiserver /readyz" 120 kube-apiserver apiserver_ready
  start_kcm
  wait_ready
  local ms=$((($(date +%s%N) - start_ns) / 1000000))
  log "control plane ready in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s: $APISERVER_URL (kubeconfig $kubeconfig)"
}

cmd_stop() {
  lock
  for c in kube-controller-manager kube-apiserver etcd; do stop_component "$c"; done
  log "control plane stopped ($TENDRIL_RUN)"
}

component_name() {
  case $1 in
  etcd) echo etcd ;;
  apiserver | kube-apiserver) echo kube-apiserver ;;
  controller-manager | kube-controller-manager | kcm) echo kube-controller-manager ;;
  *) die "unknown component '$1' (etcd, apiserver, controller-manager)" ;;
  esac
}

cmd_kill() {
  local c
  c=$(component_name "${1:-}")
  lock
  load_config
  stop_component "$c"
}

cmd_restart() {
  local c
  c=$(component_name "${1:-}")
  lock
  load_config
  [[ -f $planeenv ]] || die "no control plane in $TENDRIL_RUN: run start first"
  stop_component "$c"
  start_etcd
  wait_until "etcd health" 60 etcd etcd_healthy
  start_apiserver
  wait_until "kube-apiserver /readyz" 120 kube-apiserver apiserver_ready
  start_kcm
  wait_ready
  log "$c restarted"
}

cmd_status() {
  load_config
  local c pid ok=0
  for c in "${COMPONENTS[@]}"; do
    pid=$(running_pid "$c")
    if [[ -n $pid ]]; then
      printf '%-24s running (pid %s)\n' "$c" "$pid"
    else
      printf '%-24s stopped\n' "$c"
    fi
  done
  if healthy; then
    echo "healthy: $APISERVER_URL"
  else
    echo "not healthy"
    ok=1
  fi
  echo "$kubeconfig"
  return $ok
}

cmd_clean() {
  cmd_stop
  rm -rf "$TENDRIL_RUN"
  log "removed $TENDRIL_RUN"
}

case ${1:-} in
build) exec bash "$(dirname "$0")/control-plane-build.sh" ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
kubeconfig)
  [[ -f $kubeconfig ]] || die "no kubeconfig yet: run hack/control-plane.sh start"
  echo "$kubeconfig"
  ;;
restart) cmd_restart "${2:-}" ;;
kill) cmd_kill "${2:-}" ;;
clean) cmd_clean ;;
*)
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
  ;;
esac
