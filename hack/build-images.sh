#!/usr/bin/env bash
# Builds Tendril's OCI images without a Docker engine: cargo builds the binaries, this script
# assembles the build context (binaries + the glibc runtime they link + static busybox) and
# buildah (Debian package; no daemon, vfs storage, nothing pulled) builds
# deploy/images/Containerfile's `operator` and `agent` targets. Results, in $TENDRIL_CACHE/images:
#   oci/                          one OCI image layout holding every image, by ref name
#                                 (tendril-operator-TAG, tendril-agent-TAG)
#   tendril-{operator,agent}-TAG.tar   docker-archive tarballs named localhost/tendril/NAME:TAG
#                                 (`podman load`, `ctr -n k8s.io images import`, `kind load image-archive`)
# Each image is then unpacked with umoci and its binary run in a chroot of the unpacked root
# filesystem (`--help`), which proves the runtime libraries in the image are sufficient.
#
# usage: hack/build-images.sh [--profile release|dev] [--tag TAG] [--context-only DIR]
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"

profile=release
tag=dev
context_only=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --context-only) context_only=$2; shift 2 ;;
    *) die "unknown argument $1 (usage: $0 [--profile release|dev] [--tag TAG] [--context-only DIR])" ;;
  esac
done
out="$TENDRIL_CACHE/images"
binaries=(tendril-operator tendril-agent tendril-cni tendril-relay tendrilctl)
for tool in cargo ldd; do command -v "$tool" >/dev/null || die "$tool not found"; done
[[ -n $context_only ]] || for tool in buildah umoci; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install buildah umoci busybox-static)"
done
[[ -x /bin/busybox ]] && ! ldd /bin/busybox >/dev/null 2>&1 ||
  die "a static /bin/busybox is needed for the agent image (apt-get install busybox-static)"

log "building ${binaries[*]} (cargo profile $profile)"
(cd "$TENDRIL_ROOT" && cargo build --profile "$profile" --locked \
  -p tendril-controllers -p tendril-datapath \
  --bin tendril-operator --bin tendril-agent --bin tendril-cni --bin tendril-relay --bin tendrilctl)
target_dir="$CARGO_TARGET_DIR/$([[ $profile == dev ]] && echo debug || echo "$profile")"

work=$(mktemp -d "${TMPDIR:-/tmp}/tendril-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
ctx=${context_only:-$work/context}
rm -rf "$ctx"
mkdir -p "$ctx/bin" "$ctx/runtime/etc/ssl/certs" "$ctx/runtime/tmp"
for b in "${binaries[@]}"; do
  install -m 0755 "$target_dir/$b" "$ctx/bin/$b"
done
# The agent's BGP daemon (bgp.gobgpdPath: gobgpd, looked up in PATH): Debian's gobgpd.
gobgpd=$(command -v gobgpd) || die "gobgpd not found (apt-get install gobgpd; hack/install-prereqs.sh)"
install -m 0755 "$gobgpd" "$ctx/bin/gobgpd"
# The runtime: every shared object the binaries load, at the path the loader finds it
# (ldd prints the program interpreter by its PT_INTERP path, /lib64/ld-linux-x86-64.so.2).
for lib in $(ldd "${binaries[@]/#/$target_dir/}" "$gobgpd" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | sort -u); do
  mkdir -p "$ctx/runtime$(dirname "$lib")"
  cp -L "$lib" "$ctx/runtime$lib"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  > "$ctx/runtime/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$ctx/runtime/etc/group"
cp /etc/ssl/certs/ca-certificates.crt "$ctx/runtime/etc/ssl/certs/"
chmod 1777 "$ctx/runtime/tmp"
install -m 0755 /bin/busybox "$ctx/busybox"
cp "$TENDRIL_ROOT/deploy/images/Containerfile" "$ctx/Containerfile"
if [[ -n $context_only ]]; then
  log "build context ready in $ctx (docker build --target operator|agent $ctx)"
  exit 0
fi

# vfs storage works in any container, needs no fuse-overlayfs and no daemon.
bah=(buildah --storage-driver vfs --root "$out/.buildah/storage" --runroot "$out/.buildah/run")
mkdir -p "$out"
for target in operator agent; do
  ref="localhost/tendril/$target:$tag"
  log "building $ref"
  # --timestamp 0: the same binaries give the same image digest.
  "${bah[@]}" build --quiet --isolation chroot --timestamp 0 --target "$target" -t "$ref" \
    -f "$ctx/Containerfile" "$ctx" >/dev/null
  "${bah[@]}" push --quiet "$ref" "oci:$out/oci:tendril-$target-$tag"
  rm -f "$out/tendril-$target-$tag.tar"
  "${bah[@]}" push --quiet "$ref" "docker-archive:$out/tendril-$target-$tag.tar:$ref"
  "${bah[@]}" rmi "$ref" >/dev/null

  # Verify: unpack the OCI image and run its entrypoint in a chroot of its root filesystem.
  bundle="$work/bundle-$target"
  umoci unpack --image "$out/oci:tendril-$target-$tag" "$bundle" >/dev/null
  entry=$(jq -r '.process.args[0]' "$bundle/config.json")
  [[ -x $bundle/rootfs$entry ]] || die "$ref: entrypoint $entry missing from the image"
  chroot "$bundle/rootfs" "$entry" --help >/dev/null || die "$ref: $entry --help failed in the image's root filesystem"
  if [[ $target == agent ]]; then
    chroot "$bundle/rootfs" /bin/busybox test -x /usr/bin/tendril-cni || die "$ref: tendril-cni missing"
    chroot "$bundle/rootfs" /bin/busybox true || die "$ref: busybox does not run"
    chroot "$bundle/rootfs" /usr/bin/gobgpd --version >/dev/null || die "$ref: gobgpd does not run"
  fi
  digest=$(jq -r --arg n "tendril-$target-$tag" \
    '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $n) | .digest' \
    "$out/oci/index.json")
  log "$ref  $digest  user=$(jq -c .process.user "$bundle/config.json")  entrypoint=$entry"
done
# Blobs of images this run replaced.
umoci gc --layout "$out/oci"
log "images in $out (OCI layout oci/, docker archives *.tar)"
