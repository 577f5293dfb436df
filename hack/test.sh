#!/usr/bin/env bash
# README command 2 (and what .ci/run runs): every check and every test, unit and integration.
#
#   prerequisites → control-plane build (cached) → hubble CLI build (cached, for the flows
#   e2e test) → cargo fmt --check → clippy -D warnings →
#   cargo build of the binaries (the e2e tests spawn them) → [the hack/up.sh cluster, when
#   TENDRIL_TEST_BESIDE_LOCAL_CLUSTER=1] → tilt ci → CRD manifests up to date →
#   cargo test --workspace, its binaries run concurrently (the e2e tests start their own
#   control plane in ~/.cache/tendril/test-run, never the hack/up.sh one) → [hack/down.sh]
#
# Every step runs even after an earlier one failed (one run shows every problem); the exit
# status is non-zero if any failed. TENDRIL_TEST_JOBS (default 3) test binaries run at once
# (e2e/src/bin/tendril-test-runner.rs), TENDRIL_TEST_THREADS (default 4: the integration tests
# mostly wait on the apiserver) sets libtest's --test-threads in each. TENDRIL_TEST_RUN and
# TENDRIL_TEST_PORT_BASE move the e2e tests' plane (see e2e/src/plane.rs). Extra arguments go to
# `cargo test --no-run` (e.g. `hack/test.sh -p tendril-e2e --test pods_e2e`), and after `--`
# to every test binary (e.g. a test name filter).
#
# Logs: each step's output, and what it kept of the processes it started, is in
# $TENDRIL_TEST_LOGS/STEP/ (~/.cache/tendril/test-logs, e.g. `tilt-ci-local-mode/`); each e2e
# test's in $TENDRIL_TEST_LOGS/BINARY.TEST/ (e2e/src/util.rs). A step that passes, and a test
# that passes, leaves nothing there; the summary prints the directories of what failed.
#
# TENDRIL_TEST_BESIDE_LOCAL_CLUSTER=1 (what .ci/run sets): the suite runs with the local
# cluster of `hack/up.sh` up beside it, as on a developer's machine: brought up after the
# build (a step of its own: a failing hack/up.sh fails the run), taken down at the end with
# hack/down.sh unless it was already up before.
set -uo pipefail
source "$(dirname "$0")/lib/common.sh"
cd "$TENDRIL_ROOT"

if [[ ${CI:-} == true || ! -t 1 ]]; then
  export CARGO_TERM_COLOR=never CARGO_TERM_PROGRESS_WHEN=never
fi
t0=$(date +%s)
results=()
failed=0
steps=0

# A step's log directory: its name, lowercased, non-alphanumerics as `-`.
step_dir() {
  local slug
  slug=$(tr '[:upper:]' '[:lower:]' <<<"$1" | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
  echo "$TENDRIL_TEST_LOGS/$slug"
}

# step NAME COMMAND...: runs COMMAND with its output also in STEP_DIR/output.log and
# TENDRIL_STEP_LOGS=STEP_DIR (where hack/tilt/ci.sh keeps its logs). Then STEP_AFTER, if set
# (STEP_AFTER=fn step …), runs as `fn RC STEP_DIR`. Passed: the directory is removed; failed:
# it stays and the summary names it.
step() {
  local name=$1 s rc dir
  shift
  s=$(date +%s)
  dir=$(step_dir "$name")
  rm -rf "$dir"
  mkdir -p "$dir"
  touch "$dir/.started"
  log "── $name"
  TENDRIL_STEP_LOGS=$dir "$@" 2>&1 | tee "$dir/output.log"
  rc=${PIPESTATUS[0]}
  steps=$((steps + 1))
  local after=()
  if [[ -n ${STEP_AFTER:-} ]]; then
    mapfile -t after < <("$STEP_AFTER" "$rc" "$dir")
  fi
  if ((rc == 0)); then
    rm -rf "$dir"
    results+=("ok    $(printf '%5ss' $(($(date +%s) - s)))  $name")
  else
    results+=("FAIL  $(printf '%5ss' $(($(date +%s) - s)))  $name (exit $rc)")
    results+=("        logs: $dir" "${after[@]}")
    failed=$((failed + 1))
  fi
  return $rc
}

# After `cargo test` (its STEP_AFTER): removes the log directories of the tests that passed
# (named in the output as `test NAME ... ok` under `Running … (…/deps/BINARY-HASH)`); on
# failure copies the shared plane's logs next to the output and prints, for the summary, the
# directories this run's failed tests left.
after_cargo_test() {
  local rc=$1 dir=$2 bin="" line d
  [[ -f $dir/output.log ]] || return 0
  while IFS= read -r line; do
    if [[ $line =~ Running\ .*/deps/([A-Za-z0-9_]+)-[0-9a-f]+\)$ ]]; then
      bin=${BASH_REMATCH[1]}
    elif [[ -n $bin && $line =~ ^test\ (.+)\ \.\.\.\ ok$ ]]; then
      d="$TENDRIL_TEST_LOGS/$bin.${BASH_REMATCH[1]//::/.}"
      [[ -d $d ]] && rm -rf "$d"
    fi
  done <"$dir/output.log"
  if ((rc != 0)); then
    keep_plane_logs "$test_run" "$dir/shared-plane"
    find "$TENDRIL_TEST_LOGS" -mindepth 1 -maxdepth 1 -type d -name '*.*' ! -name '*.prev' \
      -newer "$dir/.started" | sort | sed 's/^/        logs: /'
  fi
}

summary() {
  printf '\n%s\n' "──────── hack/test.sh summary ────────"
  printf '%s\n' "${results[@]}"
  local total=$(($(date +%s) - t0))
  if ((failed)); then
    printf 'FAILED: %d step(s) failed, total %dm%02ds\n' "$failed" $((total / 60)) $((total % 60))
  else
    printf 'PASSED: all %d steps, total %dm%02ds\n' "$steps" $((total / 60)) $((total % 60))
  fi
}

# Without prerequisites and the control plane nothing else is meaningful.
if ! step "prerequisites" bash hack/install-prereqs.sh ||
  ! step "control-plane build" bash hack/control-plane.sh build; then
  summary
  exit 1
fi
# The real hubble CLI, which the flows e2e test drives (cached: built once). Without it only
# that test fails, naming this step.
step "hubble CLI build" bash hack/hubble/build.sh

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets -- -D warnings
# The benchmarks are `test = false` targets (hack/bench.sh runs them): --all-targets skips
# them, so they are linted (and so compiled) by name, or they would rot unseen.
step "benchmarks compile (clippy)" cargo clippy -p tendril-datapath -p tendril-e2e \
  --test bpf_bench --test bpf_policy_bench --test policy_propagation --test agent_memory \
  --test services_bench --test services_scale --test bpf_services_bench --test flows_bench \
  --test encryption_bench --test scale -- -D warnings
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
# The local cluster beside the suite (README command 1, left up as a developer leaves it).
local_cluster=false
if [[ ${TENDRIL_TEST_BESIDE_LOCAL_CLUSTER:-} == 1 ]]; then
  if bash hack/control-plane.sh status >/dev/null 2>&1; then
    log "the local cluster is already up: the suite runs beside it and leaves it up"
  else
    local_cluster=true
  fi
  # Taken down also when the run is interrupted.
  $local_cluster && trap 'bash hack/down.sh >/dev/null 2>&1' EXIT
  step "local cluster up (hack/up.sh)" bash hack/up.sh ||
    keep_plane_logs "$TENDRIL_RUN" "$(step_dir "local cluster up (hack/up.sh)")/local-cluster"
fi
# The inner loop users develop with: `tilt ci` of the Tiltfile in local mode (own ports/run dir).
step "tilt ci (local mode)" bash hack/tilt/ci.sh
# The binary just built (`cargo run -p` would resolve features for one package and rebuild
# every dependency).
step "CRD manifests up to date" "$CARGO_TARGET_DIR/debug/tendril-crdgen" --check
test_run=${TENDRIL_TEST_RUN:-$TENDRIL_CACHE/test-run}
# `cargo test`, with the test binaries run TENDRIL_TEST_JOBS at a time, longest first
# (e2e/src/suite.rs says why), each binary's output printed whole as it ends, and no fail-fast.
STEP_AFTER=after_cargo_test step "cargo test" \
  "$CARGO_TARGET_DIR/debug/tendril-test-runner" --jobs "${TENDRIL_TEST_JOBS:-3}" \
  --test-threads "${TENDRIL_TEST_THREADS:-4}" --seed-durations hack/test-durations \
  --durations "$TENDRIL_CACHE/test-durations" "$@"
if $local_cluster; then
  # What the cluster beside a failing suite logged (operator, agents, control plane).
  if ((failed)); then
    keep_plane_logs "$TENDRIL_RUN" "$TENDRIL_TEST_LOGS/local-cluster"
    results+=("        local cluster's logs: $TENDRIL_TEST_LOGS/local-cluster")
  fi
  step "local cluster down (hack/down.sh)" bash hack/down.sh
  trap - EXIT
fi

# The e2e tests' shared plane: left running locally (the next run reuses it, and other test
# runs may be using it), stopped in CI.
if [[ ${CI:-} == true ]]; then
  TENDRIL_RUN="$test_run" bash hack/control-plane.sh stop >/dev/null 2>&1 || true
else
  log "test control plane left running for the next run; stop it with: TENDRIL_RUN=$test_run hack/control-plane.sh stop"
fi

summary
((failed == 0))
