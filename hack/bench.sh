#!/usr/bin/env bash
# The benchmarks, apart from the suite: each prints its figures (ratios against a baseline
# measured in the same run) and asserts nothing about speed. Needs root (BPF, netns).
#
#   hack/bench.sh            # all
#   hack/bench.sh bpf        # per-packet cost of every program and of the service path (BPF_PROG_TEST_RUN)
#   hack/bench.sh policy     # per-packet cost of policy enforcement at 0/10/10k rules
#   hack/bench.sh flows      # the flow pipeline at 100k events/s with a slow GetFlows follower
#   hack/bench.sh propagation  # policy applied → enforced on every node, 10/1k/10k rules
#   hack/bench.sh memory     # agent and operator RSS per remote endpoint
#   hack/bench.sh services   # service LB vs kube-proxy iptables/nftables: programming at
#                            # 1k/10k services (30k: TENDRIL_SVC_BENCH_30K=1), one change at
#                            # 10k, connect latency at 1/1k/10k
#   hack/bench.sh services-operator  # the services concern at 1k/10k Services (write,
#                            # realize, change, restart, operator RSS)
#   hack/bench.sh lbipam     # LB IPAM planning of 10k Services in one /16
#   hack/bench.sh encryption # pod to pod across nodes, clear vs WireGuard: throughput, CPU
#                            # per Gbit, latency p50/p99
#   hack/bench.sh scale [FRACTIONS]  # the operator at 1k nodes/100k pods/10k services/1k
#                            # NetworkPolicies × FRACTIONS (default 0.1,0.3) with kwok; churn
#
# Built and run with the release profile (what a user runs, and what kube-proxy, the
# baseline of `services`, is); TENDRIL_BENCH_PROFILE=dev measures the debug build instead.
set -uo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$TENDRIL_ROOT"

bash hack/install-prereqs.sh >/dev/null
bash hack/control-plane.sh build >/dev/null
profile=${TENDRIL_BENCH_PROFILE:-release}
case $profile in
  release) profile_flag=(--release) ;;
  dev) profile_flag=() ;;
  *) die "TENDRIL_BENCH_PROFILE is release or dev, not $profile" ;;
esac
log "building the $profile profile (the first release build takes a while)"
# The e2e harness takes the binaries of the profile its test was built with.
cargo build "${profile_flag[@]}" --workspace --bins >/dev/null || die "cargo build failed"

which=${1:-all}
rc=0
run() {
  log "── benchmark $1"
  shift
  local cmd=("$1" "$2" "${profile_flag[@]}")
  shift 2
  "${cmd[@]}" "$@" -- --nocapture --test-threads=1 --include-ignored || rc=1
}
case $which in
  all | bpf) run "bpf programs (ns/packet)" cargo test -p tendril-datapath --test bpf_bench ;;&
  all | bpf) run "service path (ns/packet)" cargo test -p tendril-datapath --test bpf_services_bench ;;&
  all | policy) run "policy per packet (ns/packet)" cargo test -p tendril-datapath --test bpf_policy_bench ;;&
  all | flows) run "flow pipeline at 100k events/s" cargo test -p tendril-datapath --test flows_bench ;;&
  all | propagation) run "policy propagation" cargo test -p tendril-e2e --test policy_propagation ;;&
  all | memory) run "memory per endpoint" cargo test -p tendril-e2e --test agent_memory ;;&
  all | services) run "services vs kube-proxy" cargo test -p tendril-e2e --test services_bench ;;&
  all | services-operator) run "services concern at scale" cargo test -p tendril-e2e --test services_scale ;;&
  all | lbipam) run "LB IPAM planning" cargo test -p tendril-controllers --lib lbipam_plan_cost ;;&
  all | encryption) run "encryption: clear vs WireGuard" cargo test -p tendril-e2e --test encryption_bench ;;&
  all | scale) TENDRIL_SCALE_FRACTIONS=${2:-${TENDRIL_SCALE_FRACTIONS:-0.1,0.3}} \
    run "operator at scale (kwok)" cargo test -p tendril-e2e --test scale ;;&
  all | bpf | policy | flows | propagation | memory | services | services-operator | lbipam | encryption | scale) ;;
  *) die "unknown benchmark $which (bpf, policy, flows, propagation, memory, services, services-operator, lbipam, encryption, scale or all)" ;;
esac
exit $rc
