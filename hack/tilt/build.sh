#!/usr/bin/env bash
# Builds Tilt from its Go module (github.com/tilt-dev/tilt/cmd/tilt, the version in
# hack/tilt/go.mod, with the `replace` lines Tilt's own go.mod needs) into
# $TENDRIL_CACHE/tilt/bin/tilt. Rebuilds only when go.mod/go.sum change. Prints the path.
#
# Tilt v0.34.0's module is not in the checksum database the Go client asks by default, so
# GONOSUMDB exempts github.com/tilt-dev/* from that lookup; go.sum (committed) still pins
# every module's hash, so a changed download fails the build.
# cgo stays on: Tilt parses some files with tree-sitter (C).
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

mod="$TENDRIL_ROOT/hack/tilt"
bin_dir="$TENDRIL_CACHE/tilt/bin"
stamp="$bin_dir/.stamp"
want=$(files_hash "$mod/go.mod" "$mod/go.sum" "$0")
if [[ -x $bin_dir/tilt && -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "$bin_dir/tilt"
  exit 0
fi
mkdir -p "$bin_dir"
start=$(date +%s)
version=$(sed -n "s#^\s*github.com/tilt-dev/tilt \(v[^ ]*\).*#\1#p" "$mod/go.mod" | head -1)
log "building tilt $version from its Go module (cold: several minutes on 2 cores)"
# Tilt's -X version variable, as its release build sets it, so `tilt version` is real.
(cd "$mod" && GONOSUMDB=github.com/tilt-dev nice -n 19 go build -trimpath \
  -ldflags "-s -w -X main.date=1970-01-01 -X main.version=${version#v}" -o "$bin_dir/tilt" github.com/tilt-dev/tilt/cmd/tilt)
echo "$want" >"$stamp"
log "tilt built in $(($(date +%s) - start))s: $bin_dir/tilt"
echo "$bin_dir/tilt"
