#!/usr/bin/env bash
# The Tiltfile's custom_build in cluster mode: builds the operator and agent images with
# hack/build-images.sh (buildah, no Docker engine) and pushes localhost/tendril/TARGET:tilt to
# the ref Tilt expects ($EXPECTED_REF, which carries the registry Tilt was configured with).
#
# usage (from Tilt): hack/tilt/push-image.sh operator|agent
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

target=${1:?usage: $0 operator|agent}
: "${EXPECTED_REF:?set by Tilt (custom_build)}"
command -v buildah >/dev/null || die "buildah not found (apt-get install buildah umoci busybox-static)"
bash "$TENDRIL_ROOT/hack/build-images.sh" --tag tilt >&2
out="$TENDRIL_CACHE/images"
buildah --storage-driver vfs --root "$out/.buildah/storage" --runroot "$out/.buildah/run" \
  push --quiet "localhost/tendril/$target:tilt" "docker://$EXPECTED_REF"
