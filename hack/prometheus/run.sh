#!/usr/bin/env bash
# Runs Prometheus (Debian's) in the foreground for the local cluster, with
# hack/prometheus/prometheus.yml and file_sd targets written from the environment:
#   TENDRIL_PROMETHEUS_OPERATOR  operator metrics address (default 127.0.0.1:9963)
#   TENDRIL_PROMETHEUS_AGENTS    "PORT=NODE ..." agent metrics ports on 127.0.0.1 with their
#                                node names (default "9964=tendril-node-1 9965=tendril-node-2",
#                                what hack/sim-cluster.sh starts)
#   TENDRIL_PROMETHEUS_PORT      web/API port on 127.0.0.1 (default 9090)
# Data and the generated files live in $TENDRIL_RUN/prometheus. The Tiltfile's `prometheus`
# resource runs this; by hand: `hack/prometheus/run.sh`, then http://127.0.0.1:9090/targets.
set -euo pipefail
source "$(dirname "$0")/../lib/common.sh"

command -v prometheus >/dev/null || die "prometheus not found (apt-get install prometheus)"
dir="$TENDRIL_RUN/prometheus"
port=${TENDRIL_PROMETHEUS_PORT:-9090}
operator=${TENDRIL_PROMETHEUS_OPERATOR:-127.0.0.1:9963}
agents=${TENDRIL_PROMETHEUS_AGENTS:-9964=tendril-node-1 9965=tendril-node-2}

mkdir -p "$dir/targets" "$dir/data"
cp "$TENDRIL_ROOT/hack/prometheus/prometheus.yml" "$dir/prometheus.yml"
jq -n --arg t "$operator" '[{targets: [$t]}]' >"$dir/targets/operator.json.tmp"
mv "$dir/targets/operator.json.tmp" "$dir/targets/operator.json"
# shellcheck disable=SC2086 # word splitting of the PORT=NODE list is intended
printf '%s\n' $agents | jq -R -s 'split("\n") | map(select(. != "") | split("=")
  | {targets: ["127.0.0.1:\(.[0])"], labels: {node: .[1]}})' >"$dir/targets/agents.json.tmp"
mv "$dir/targets/agents.json.tmp" "$dir/targets/agents.json"
log "prometheus on http://127.0.0.1:$port (operator $operator, agents $agents)"
exec prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
  --storage.tsdb.retention.time=1d --web.listen-address="127.0.0.1:$port"
