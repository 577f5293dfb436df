#!/usr/bin/env bash
# Installs what building and testing Tendril needs, idempotently: Debian packages (apt runs
# only when one is missing, with a single `apt-get update`), the Rust components rustfmt and
# clippy, and checks that Go is present. Safe to run any number of times.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"

# One package a line; append only. Why each is here:
packages=(
  clang llvm libbpf-dev bpftool gcc-multilib # eBPF programs (clang -target bpf, asm/types.h)
  iproute2 iputils-ping iperf3 ethtool tcpdump conntrack # simulated nodes and pods, traffic checks
  netcat-openbsd socat curl jq # probes and scripting
  openssl # control-plane certificates
  prometheus # promtool and scrape tests
  gobgpd bird2 # BGP engine and independent peer
  util-linux # flock(1): serializes control-plane starts
  buildah umoci busybox-static # daemonless image builds (hack/build-images.sh), agent image shell
  nftables # nft(8): kube-proxy's nftables mode, the reference of the services conformance matrix
  chromium # headless browser that loads the relay's service map page in its test
  wireguard-tools wireguard-go # wg(8) against the agent's WireGuard device; an independent peer
)

missing=()
for p in "${packages[@]}"; do
  if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  sudo=()
  if [[ $(id -u) != 0 ]]; then sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

command -v go >/dev/null || die "Go is not installed (need Go >= 1.26 on PATH or in /usr/local/go/bin)"
command -v cargo >/dev/null || die "Rust is not installed (need cargo on PATH or in ~/.cargo/bin)"
if command -v rustup >/dev/null; then
  for c in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
      log "adding Rust component $c"
      rustup component add "$c"
    fi
  done
fi
cargo fmt --version >/dev/null 2>&1 || die "cargo fmt is missing (rustup component add rustfmt)"
cargo clippy --version >/dev/null 2>&1 || die "cargo clippy is missing (rustup component add clippy)"
# Go-built test tools, pinned, into $TENDRIL_TOOLS (outside the repository, kept between runs).
go_tools=(
  github.com/containernetworking/cni/cnitool@v1.3.1 # CNI conformance of tendril-cni
)
for tool in "${go_tools[@]}"; do
  bin="$TENDRIL_TOOLS/$(basename "${tool%@*}")"
  stamp="$bin.version"
  if [[ ! -x $bin || $(cat "$stamp" 2>/dev/null) != "$tool" ]]; then
    log "installing $tool"
    GOBIN="$TENDRIL_TOOLS" CGO_ENABLED=0 go install "$tool"
    echo "$tool" >"$stamp"
  fi
done

log "prerequisites ok: $(go version | cut -d' ' -f3), $(cargo --version | cut -d' ' -f1-2)"
