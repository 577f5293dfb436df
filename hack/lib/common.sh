# Shared settings for hack/ scripts. Source it; do not run it.
# Everything expensive (Go and cargo builds, control-plane binaries) lives outside the
# repository so a fresh clone on the same machine reuses it.

TENDRIL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TENDRIL_CACHE="${TENDRIL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tendril}"
# Runtime state of the local cluster (pids, certificates, logs, kubeconfig).
TENDRIL_RUN="${TENDRIL_RUN:-$TENDRIL_CACHE/run}"
K8S_VERSION="1.36.3"
ETCD_VERSION="3.6.8"
KWOK_VERSION="0.8.0"
K8S_BIN="$TENDRIL_CACHE/k8s-$K8S_VERSION/bin"
# Logs that explain a failed test-suite step or e2e test are kept here, one directory per
# step (`tilt-ci`, `cargo-test`, …) or per test (`BINARY/TEST`); cleanup never deletes them.
export TENDRIL_TEST_LOGS="${TENDRIL_TEST_LOGS:-$TENDRIL_CACHE/test-logs}"
# Go-built test tools (cnitool), installed by hack/install-prereqs.sh.
export TENDRIL_TOOLS="$TENDRIL_CACHE/tools/bin"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TENDRIL_CACHE/target}"
export GOMODCACHE="${GOMODCACHE:-$(go env GOMODCACHE 2>/dev/null || echo "$HOME/go/pkg/mod")}"
export GOCACHE="${GOCACHE:-$(go env GOCACHE 2>/dev/null || echo "$HOME/.cache/go-build")}"
export PATH="$K8S_BIN:$TENDRIL_TOOLS:$HOME/.cargo/bin:/usr/local/go/bin:$HOME/go/bin:$PATH"

# Colour only on a terminal (CI logs stay plain).
if [[ -t 2 && -z ${NO_COLOR:-} ]]; then
  log() { printf '\033[1;34m[tendril]\033[0m %s\n' "$*" >&2; }
  die() { printf '\033[1;31m[tendril] error:\033[0m %s\n' "$*" >&2; exit 1; }
else
  log() { printf '[tendril] %s\n' "$*" >&2; }
  die() { printf '[tendril] error: %s\n' "$*" >&2; exit 1; }
fi

# Content hash of a list of files: the build stamp that decides whether to rebuild.
files_hash() { cat "$@" | sha256sum | cut -c1-16; }

# snapshot_machine DIR: what else ran on the machine when something failed (processes,
# listening sockets, memory, load, the kernel's OOM and kill messages), next to kept logs.
snapshot_machine() {
  local dir=$1
  mkdir -p "$dir"
  {
    echo "# $(date -u +%FT%TZ) load: $(cat /proc/loadavg)"
    free -m
    echo
    ps -eo pid,ppid,pgid,sid,stat,ni,etimes,rss,comm,args --sort=pid 2>/dev/null
  } >"$dir/processes.txt" 2>&1 || true
  ss -Htanp >"$dir/sockets.txt" 2>&1 || true
  dmesg 2>/dev/null | tail -n 200 >"$dir/dmesg.txt" || true
}

# keep_plane_logs RUN_DIR DEST: a control plane's component logs (etcd, kube-apiserver,
# kube-controller-manager, the pid checks) and settings, copied before the run dir goes.
keep_plane_logs() {
  local run=$1 dest=$2
  [[ -d $run ]] || return 0
  mkdir -p "$dest"
  [[ -d $run/logs ]] && cp -a "$run/logs/." "$dest/" 2>/dev/null
  [[ -f $run/plane.env ]] && cp -a "$run/plane.env" "$dest/" 2>/dev/null
  return 0
}

# ---------------------------------------------------------------- detached processes
# A process these scripts start in the background (control-plane components, the operator,
# the agents) is known by its pid and that process's start time: PIDFILE and, next to it,
# the same name ending in .start. The pair names the process from its fork on, before and
# after it execs its binary (which on a loaded machine may take a while), and never a later
# process that reuses the pid. Checking the command name instead took a process that had not
# exec'd yet (still a bash or a setsid) for one that had exited, and left it running unseen.

# proc_field PID N: field N of /proc/PID/stat counted after the command name (1 is the
# state, 20 the start time in clock ticks since boot); nothing when the process is gone.
proc_field() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }
  cut -d' ' -f"$2" <<<"$stat"
}

# describe_pid PID: what /proc says about it (state, comm, exe, start time), or that it is gone.
describe_pid() {
  local pid=$1
  [[ -n $pid && -e /proc/$pid/stat ]] || { echo "no such process"; return 0; }
  printf 'state %s, comm %s, exe %s, started at tick %s' "$(proc_field "$pid" 1)" \
    "$(cat "/proc/$pid/comm" 2>/dev/null)" "$(readlink "/proc/$pid/exe" 2>/dev/null)" \
    "$(proc_field "$pid" 20)"
}

# spawn_detached PIDFILE LOG COMMAND...: runs COMMAND in a session of its own (neither a
# terminal's Ctrl-C nor the caller's exit reaches it), stdin from /dev/null, output appended
# to LOG, fd 9 (the callers' lock) closed; writes PIDFILE and its .start file. setsid execs
# COMMAND in the same process, so $! is COMMAND from the fork on: job control is turned off
# first, since a background job leading its own process group would make setsid fork (and $!
# a setsid that exits at once). Sets SPAWNED_PID.
spawn_detached() {
  local pidfile=$1 logfile=$2
  shift 2
  set +m
  setsid "$@" </dev/null >>"$logfile" 2>&1 9>&- &
  SPAWNED_PID=$!
  proc_field "$SPAWNED_PID" 20 >"${pidfile%.pid}.start"
  echo "$SPAWNED_PID" >"$pidfile"
}

# pidfile_pid PIDFILE [COMM]: the pid PIDFILE names while that process runs, else nothing,
# and a stale PIDFILE (process gone, or a zombie not yet reaped) is removed. A pid file
# without a .start file (written by an older version of these scripts) is checked against
# COMM, the command name (its first 15 characters, as the kernel keeps it).
pidfile_pid() {
  local pidfile=$1 comm=${2:-} pid start
  [[ -f $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  if [[ -f ${pidfile%.pid}.start ]]; then
    start=$(cat "${pidfile%.pid}.start")
    if [[ -n $pid && -n $start && $(proc_field "$pid" 20) == "$start" &&
      $(proc_field "$pid" 1) != [ZX] ]]; then
      echo "$pid"
      return 0
    fi
  elif [[ -n $pid && -n $comm && $(cat "/proc/$pid/comm" 2>/dev/null) == "${comm:0:15}" &&
    $(proc_field "$pid" 1) != [ZX] ]]; then
    echo "$pid"
    return 0
  fi
  rm -f "$pidfile" "${pidfile%.pid}.start"
}

# exit_status PID: how a background job of this shell ended (bash keeps their statuses),
# and the kernel's word if it killed it (the OOM killer).
exit_status() {
  local pid=$1 st=0
  wait "$pid" 2>/dev/null || st=$?
  if ((st == 127)); then
    echo "pid $pid, exit status unknown"
  elif ((st > 128)); then
    echo "pid $pid killed by signal $((st - 128)) ($(kill -l $((st - 128)) 2>/dev/null))"
  else
    echo "pid $pid exited with status $st"
  fi
  dmesg 2>/dev/null | grep -E "Killed process $pid |oom.*pid=$pid[, ]" | tail -n 3 || true
}

# stray_pids COMM PATTERN: processes named COMM (first 15 characters) whose command line
# contains PATTERN (a run dir: never by name alone).
stray_pids() {
  local comm=$1 pattern=$2 pid
  for pid in $(pgrep -x -- "${comm:0:15}" || true); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$pattern"; then
      echo "$pid"
    fi
  done
}

# stop_process PID [GRACE_S]: SIGTERM, SIGKILL after GRACE_S (15) seconds; returns once it
# is gone.
stop_process() {
  local pid=$1 grace=${2:-15} i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}
