#!/usr/bin/env bash
# The kas fleet's costs (kas/examples/fleet_bench.rs, a real redis-server and two kas pods):
# Redis commands per second in steady state at $AGENTS agents (default 10,000; each with
# tunnels and a configuration stream), measured at a short refresh period ($REFRESH_S,
# default 5 s) and scaled to production's 240 s; and the latency a cross-pod Kubernetes API
# proxy request adds over a same-pod one ($REQUESTS sequential GET /version each).
# Writes loadtest/results/fleet-<date>.json and fleet-latest.json. bench.sh runs it last.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=$PWD/loadtest/results
mkdir -p "$RESULTS"
command -v redis-server >/dev/null || { echo "redis-server missing: run .ci/install" >&2; exit 1; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build -q -p kas --example fleet_bench
line=$(target/debug/examples/fleet_bench | tail -1)
date=$(date -u +%Y-%m-%dT%H%M%SZ)
echo "$line" > "$RESULTS/fleet-$date.json"
cp "$RESULTS/fleet-$date.json" "$RESULTS/fleet-latest.json"
echo "fleet: $line"
echo "wrote $RESULTS/fleet-$date.json and $RESULTS/fleet-latest.json"
