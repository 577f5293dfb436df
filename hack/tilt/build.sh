#!/usr/bin/env bash
# Builds Tilt from its Go module (github.com/tilt-dev/tilt/cmd/tilt, the version in
# hack/tilt/go.mod, with the `replace` lines Tilt's own go.mod needs) into
# $TENDRIL_CACHE/tilt/bin/tilt. Rebuilds only when go.mod/go.sum change. Prints the path.
#
# Tilt v0.34.0's module is not in the checksum database the Go client asks by default, so
# GONOSUMDB exempts github.com/tilt-dev/* from that lookup; go.sum (committed) still pins
# every module's hash, so a changed download fails the build.
# cgo stays on: Tilt parses some files with tree-sitter (C).
#
# The module lacks Tilt's compiled web UI (pkg/assets/build holds only robots.txt; Tilt's
# release builds put the webpack output there), and without it Tilt refuses to start
# ("running in prod mode, but JS/CSS files are not available"). So the build uses a copy of
# the module's source with one page added, pkg/assets/build/index.html (hack/tilt/web/: a
# notice pointing to the terminal UI and CLI), through a `replace` in a temporary copy of
# go.mod (-modfile). Everything else is Tilt's code as published.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

mod="$TENDRIL_ROOT/hack/tilt"
bin_dir="$TENDRIL_CACHE/tilt/bin"
stamp="$bin_dir/.stamp"
want=$(files_hash "$mod/go.mod" "$mod/go.sum" "$mod/web/index.html" "$0")
if [[ -x $bin_dir/tilt && -f $stamp && $(cat "$stamp") == "$want" ]]; then
  echo "$bin_dir/tilt"
  exit 0
fi
mkdir -p "$bin_dir"
start=$(date +%s)
version=$(sed -n "s#^\s*github.com/tilt-dev/tilt \(v[^ ]*\).*#\1#p" "$mod/go.mod" | head -1)
log "building tilt $version from its Go module (cold: about 15 minutes on 2 busy cores; then cached)"
# Tilt's -X version variable, as its release build sets it, so `tilt version` is real.
work=$(mktemp -d "${TMPDIR:-/tmp}/tilt-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$mod" && GONOSUMDB=github.com/tilt-dev go mod download github.com/tilt-dev/tilt)
src=$(cd "$mod" && go list -m -f '{{.Dir}}' github.com/tilt-dev/tilt)
copy="$TENDRIL_CACHE/tilt/src-$version"
rm -rf "$copy"
cp -r "$src" "$copy"
chmod -R u+w "$copy"
cp "$mod/web/index.html" "$copy/pkg/assets/build/index.html"
cp "$mod/go.mod" "$work/go.mod"
cp "$mod/go.sum" "$work/go.sum"
printf '\nreplace github.com/tilt-dev/tilt => %s\n' "$copy" >>"$work/go.mod"
(cd "$mod" && GONOSUMDB=github.com/tilt-dev nice -n 19 go build -trimpath -modfile "$work/go.mod" \
  -ldflags "-s -w -X main.date=1970-01-01 -X main.version=${version#v}" -o "$bin_dir/tilt" github.com/tilt-dev/tilt/cmd/tilt)
echo "$want" >"$stamp"
log "tilt built in $(($(date +%s) - start))s: $bin_dir/tilt"
echo "$bin_dir/tilt"
