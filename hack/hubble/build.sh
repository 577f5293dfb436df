#!/usr/bin/env bash
# Builds the hubble CLI from its Go module (github.com/cilium/cilium/hubble, the version in
# hack/hubble/go.mod) into $TENDRIL_TOOLS/hubble, with the -X version variable Cilium's own
# Makefile sets, so `hubble version` is real. Rebuilds only when go.mod/go.sum or this
# script change (cold: about 6 minutes at low priority on 2 cores; a ~140 MB binary, then
# cached). Idempotent; prints the binary's path on its last line.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

mod="$TENDRIL_ROOT/hack/hubble"
bin="$TENDRIL_TOOLS/hubble"
stamp="$bin.stamp"
want=$(files_hash "$mod/go.mod" "$mod/go.sum" "$0")
if [[ -x $bin && -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$TENDRIL_TOOLS"
start=$(date +%s)
version=$(sed -n "s#^\s*github.com/cilium/cilium \(v[^ ]*\).*#\1#p" "$mod/go.mod" | head -1)
log "building hubble $version from its Go module (cold: about 6 minutes; then cached)"
# Built to a temporary name and moved: an interrupted build never leaves a half binary.
(cd "$mod" && CGO_ENABLED=0 nice -n 19 go build -trimpath \
  -ldflags "-s -w -X github.com/cilium/cilium/hubble/pkg.Version=$version" \
  -o "$bin.tmp" github.com/cilium/cilium/hubble)
mv "$bin.tmp" "$bin"
echo "$want" >"$stamp"
log "hubble built in $(($(date +%s) - start))s: $bin"
echo "$bin"
