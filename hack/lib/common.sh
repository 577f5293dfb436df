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
