#!/usr/bin/env bash
# Builds the test control plane (kube-apiserver, kube-controller-manager, kube-proxy,
# kubectl, etcd, kwok) from the Go module proxy into $K8S_BIN. Rebuilds only when the
# wrapper modules under hack/control-plane/ change.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"

mods="$TENDRIL_ROOT/hack/control-plane"
stamp="$K8S_BIN/.stamp"
want=$(files_hash "$mods"/*/go.mod "$mods"/*/go.sum "$0")
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  log "control plane binaries up to date in $K8S_BIN"
  exit 0
fi
mkdir -p "$K8S_BIN"
start=$(date +%s)
export CGO_ENABLED=0

# The version variables Kubernetes' own build sets (hack/lib/version.sh), so /version is real.
commit=$(go mod download -json k8s.io/kubernetes@v$K8S_VERSION | sed -n 's/.*"Hash": "\(.*\)".*/\1/p' | head -1)
ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=${K8S_VERSION%%.*}"
  ldflags+=" -X $pkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $pkg.gitTreeState=clean"
  ldflags+=" -X $pkg.gitCommit=${commit:-unknown} -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "building Kubernetes v$K8S_VERSION (cold: tens of minutes on 2 cores)"
(cd "$mods/kubernetes" && go build -trimpath -ldflags "-s -w $ldflags" -o "$K8S_BIN/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)
log "building etcd v$ETCD_VERSION"
(cd "$mods/etcd" && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=v$ETCD_VERSION" \
  -o "$K8S_BIN/etcd" go.etcd.io/etcd/server/v3)
log "building kwok v$KWOK_VERSION"
(cd "$mods/kwok" && go build -trimpath -ldflags "-s -w" -o "$K8S_BIN/kwok" sigs.k8s.io/kwok/cmd/kwok)
echo "$want" > "$stamp"
log "control plane built in $(( $(date +%s) - start ))s into $K8S_BIN"
