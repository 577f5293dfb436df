#!/usr/bin/env bash
# README command 2 (and what .ci/run runs): every check and every test, unit and integration.
#
#   prerequisites → control-plane build (cached) → cargo fmt --check → clippy -D warnings →
#   cargo build of the binaries (the e2e tests spawn them) → CRD manifests up to date →
#   cargo test --workspace (the e2e tests start their own control plane in
#   ~/.cache/tendril/test-run, never the hack/up.sh one)
#
# Every step runs even after an earlier one failed (one run shows every problem); the exit
# status is non-zero if any failed. TENDRIL_TEST_THREADS (default 4: the integration tests
# mostly wait on the apiserver) sets libtest's --test-threads. TENDRIL_TEST_RUN and
# TENDRIL_TEST_PORT_BASE move the e2e tests' plane (see e2e/src/plane.rs). Extra arguments go to
# `cargo test` (e.g. `hack/test.sh -p tendril-e2e`).
set -uo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$TENDRIL_ROOT"

if [[ ${CI:-} == true || ! -t 1 ]]; then
  export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
fi
t0=$(date +%s)
results=()
failed=0

step() {
  local name=$1 s rc
  shift
  s=$(date +%s)
  log "── $name"
  "$@"
  rc=$?
  if ((rc == 0)); then
    results+=("ok    $(printf '%5ss' $(($(date +%s) - s)))  $name")
  else
    results+=("FAIL  $(printf '%5ss' $(($(date +%s) - s)))  $name (exit $rc)")
    failed=$((failed + 1))
  fi
  return $rc
}

summary() {
  printf '\n%s\n' "──────── hack/test.sh summary ────────"
  printf '%s\n' "${results[@]}"
  local total=$(($(date +%s) - t0))
  if ((failed)); then
    printf 'FAILED: %d step(s) failed, total %dm%02ds\n' "$failed" $((total / 60)) $((total % 60))
  else
    printf 'PASSED: all %d steps, total %dm%02ds\n' "${#results[@]}" $((total / 60)) $((total % 60))
  fi
}

# Without prerequisites and the control plane nothing else is meaningful.
if ! step "prerequisites" bash hack/install-prereqs.sh ||
  ! step "control-plane build" bash hack/control-plane.sh build; then
  summary
  exit 1
fi

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets -- -D warnings
# The benchmarks are `test = false` targets (hack/bench.sh runs them): --all-targets skips
# them, so they are linted (and so compiled) by name, or they would rot unseen.
step "benchmarks compile (clippy)" cargo clippy -p tendril-datapath -p tendril-e2e \
  --test bpf_bench --test bpf_policy_bench --test policy_propagation --test agent_memory -- -D warnings
step "cargo build --bins" cargo build --workspace --bins
# The agent must not link the operator's concerns (DESIGN: controllers compute, the datapath
# converges; both share only tendril-runtime and tendril-crds).
datapath_links_no_operator() {
  if cargo tree -p tendril-datapath -e normal,build --prefix none | grep -q '^tendril-controllers '; then
    echo "tendril-datapath depends on tendril-controllers (cargo tree -p tendril-datapath -i tendril-controllers)" >&2
    return 1
  fi
}
step "tendril-datapath does not link tendril-controllers" datapath_links_no_operator
# The inner loop users develop with: `tilt ci` of the Tiltfile in local mode (own ports/run dir).
step "tilt ci (local mode)" bash hack/tilt/ci.sh
# The binary just built (`cargo run -p` would resolve features for one package and rebuild
# every dependency).
step "CRD manifests up to date" "$CARGO_TARGET_DIR/debug/tendril-crdgen" --check
# --no-fail-fast: one failing test binary must not hide the results of the others.
step "cargo test" cargo test --workspace --no-fail-fast "$@" -- --test-threads="${TENDRIL_TEST_THREADS:-4}"

# The e2e tests' shared plane: left running locally (the next run reuses it, and other test
# runs may be using it), stopped in CI.
test_run=${TENDRIL_TEST_RUN:-$TENDRIL_CACHE/test-run}
if [[ ${CI:-} == true ]]; then
  TENDRIL_RUN="$test_run" bash hack/control-plane.sh stop >/dev/null 2>&1 || true
else
  log "test control plane left running for the next run; stop it with: TENDRIL_RUN=$test_run hack/control-plane.sh stop"
fi

summary
((failed == 0))
