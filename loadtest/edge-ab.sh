#!/usr/bin/env bash
# kas-edge binaries compared on one workload, back to back in one session (the machine's
# noise is the same for each): `loadtest/edge-ab.sh OLD-BIN NEW-BIN`. For each round
# (ROUNDS, default 2) and each binary, every step runs against a fresh `kas dev` (pods and
# GitLab stand-in) and a fresh `kas-edge run` configured as bench.sh configures it:
#   idle     memory per idle wss tunnel: edge RSS growth / IDLE_AGENTS (2000) agents
#   rpc      edge CPU per gRPC Ping: /proc CPU time over a RPC_SECS (20) open-loop run at
#            RPC_RATE (1000)/s over 4 grpcs connections, divided by the requests sent
#   rps      requests/s at saturation, as bench.sh measures them: TLS HTTP/1.1 keep-alive
#            (wrk, 64 connections) and gRPC Pings (h2load, 8 connections × 16 streams),
#            RPS_SECS (10) each, with the edge's CPU per request; whether a change holds
#            the edge back when it is the bottleneck (the rpc step's rate never makes it one)
#   hostile  edge RSS before the attacks, peak during, and ATTACK_SETTLE (60s) after
#            ATTACK_SECS (30s) of `--scenario hostile` with HOSTILE_AGENTS (1000) holding
#            (the "before" sample after ATTACK_WARMUP (30) s of the fleet's own traffic);
#            ATTACK_SCALE (1) sizes the attacks (0.001: one connection of each kind, a
#            control run that shows what the fleet alone does to the edge's RSS);
#            ATTACK_KINDS (all) runs only the attacks named (comma-separated);
#            HOSTILE_WS_FRACTION (the scenario's 0.5) of the fleet on wss://, the rest grpcs://;
#            ATTACK_SOURCE_BASE (127.0.6.1) where the attackers' addresses start: beyond the
#            fleet's (127.0.2.1 on) for more than ~1,000 agents, e.g. 127.0.40.1
#   soak     SOAK_AGENTS (2000) wss agents with Echo streams, SOAK_CHURN (50) of them
#            reconnecting per second for SOAK_SECS (1800): is the edge's RSS flat?
#            (loadtest/rss-trend.py on the run's timeline; not in the default STEPS)
#   storm    STORM_AGENTS (5000) wss agents reconnecting at once: seconds until all are
#            back, connects the edge refused for its handshake cap
#            (edge_policy_blocked_total{reason="handshakes_in_progress"}), fleet errors
# STEPS chooses ("idle rpc rps hostile storm"); EDGE_TOML is appended to the edge's
# configuration (e.g. '[downstream]\nmax_handshakes = 256' for a storm over the cap on a
# machine too slow to reach the default cap). One line per run on stdout (tab-separated) and
# in $OUT (loadtest/results/edge-ab-<time>.tsv), each run's JSON report in $JSON_DIR
# (/tmp/edge-ab-<time>/). Runs in a network namespace of its own
# (unshare -n, root), so nothing else on the machine shares its loopback addresses.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=loadtest/stack.sh
. "$ROOT/loadtest/stack.sh"
if [ -z "${EDGE_AB_NETNS:-}" ]; then
  exec env EDGE_AB_NETNS=1 unshare -n -- "$0" "$@"
fi
ip link set lo up

BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-idle rpc rps hostile storm}
IDLE_AGENTS=${IDLE_AGENTS:-2000}
RPC_RATE=${RPC_RATE:-1000}
RPC_SECS=${RPC_SECS:-20}
RPS_SECS=${RPS_SECS:-10}
HOSTILE_AGENTS=${HOSTILE_AGENTS:-1000}
ATTACK_SECS=${ATTACK_SECS:-30}
ATTACK_SETTLE=${ATTACK_SETTLE:-60}
ATTACK_SCALE=${ATTACK_SCALE:-1}
ATTACK_WARMUP=${ATTACK_WARMUP:-30}
ATTACK_KINDS=${ATTACK_KINDS:-}
HOSTILE_WS_FRACTION=${HOSTILE_WS_FRACTION:-}
ATTACK_SOURCE_BASE=${ATTACK_SOURCE_BASE:-}
STORM_AGENTS=${STORM_AGENTS:-5000}
SOAK_AGENTS=${SOAK_AGENTS:-2000}
SOAK_CHURN=${SOAK_CHURN:-50}
SOAK_SECS=${SOAK_SECS:-1800}
OUT=${OUT:-$ROOT/loadtest/results/edge-ab-$(date -u +%Y%m%dT%H%M).tsv}
EDGES=("$@")
[ "${#EDGES[@]}" -gt 0 ] || EDGES=("$BIN/kas-edge")
case " $STEPS " in
  *" rps "*) for tool in wrk h2load; do
      command -v "$tool" >/dev/null || { echo "edge-ab: the rps step needs $tool (apt-get install wrk nghttp2-client)" >&2; exit 2; }
    done ;;
esac
for b in "${EDGES[@]}" "$BIN/kas" "$BIN/kas-loadtest"; do
  [ -x "$b" ] || { echo "edge-ab: $b missing (cargo build --release -p kas -p kas-loadtest -p kas-edge)" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)"
JSON_DIR=${JSON_DIR:-/tmp/edge-ab-$(date -u +%Y%m%dT%H%M)}
mkdir -p "$(dirname "$OUT")" "$JSON_DIR"

WORK=$(mktemp -d /tmp/kas-edge-ab.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
log() { echo "edge-ab: $*" >&2; }

# A fresh kas dev and edge; sets EDGE_PID, TOKEN, CA.
start_stack() { # edge-binary
  stop_all
  rm -rf "${WORK:?}/dev" "${WORK:?}/tls"
  start_kas_dev "$BIN/kas" "$WORK"
  edge_toml 127.0.5.1:8443 127.0.5.1:8081 127.0.5.1:8080 "$WORK/tls" 127.0.1 "${EDGE_TOML:-}" >"$WORK/edge.toml"
  start_edge "$1" "$WORK/edge.toml" 127.0.5.1:8081
  CA=$WORK/tls/tls.crt
  sleep 1
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Requests/s of `command...` at saturation and the edge's CPU per request over it:
# "<req/s> req/s, <µs> us CPU per request". wrk and h2load each print their rate on a line
# of their own ("Requests/sec:", "finished in …, N req/s").
saturate() { # output-file command...
  local out=$1 before after rate
  shift
  before=$(cpu_ticks "$EDGE_PID")
  "$@" >"$out" 2>&1 || true
  after=$(cpu_ticks "$EDGE_PID")
  rate=$(awk '/^Requests\/sec:/ {print $2} /^finished in/ {for (i = 1; i < NF; i++) if ($(i + 1) ~ /^req\/s/) print $i}' "$out" | head -1)
  awk -v r="${rate:-0}" -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v s="$RPS_SECS" \
    'BEGIN { if (r > 0) printf "%.0f req/s, %.1f us CPU per request", r, t / hz * 1e6 / (r * s); else printf "no rate" }'
}
# A field of a run's JSON report; a run that ended without one gets a line that says so (and
# the A/B goes on) instead of ending the whole comparison.
json() {
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "$@" 2>/dev/null ||
    echo "no result: see $kept.{json,log}"
}

# A binary's name in the lines and kept files: its file name, or its folder's and file name
# when two binaries share a file name (e.g. old/kas-edge new/kas-edge), so no run overwrites
# another's output and every line says which binary it measured.
label() { # edge-binary
  local other
  for other in "${EDGES[@]}"; do
    if [ "$other" != "$1" ] && [ "$(basename "$other")" = "$(basename "$1")" ]; then
      echo "$(basename "$(dirname "$1")")-$(basename "$1")"
      return
    fi
  done
  basename "$1"
}

printf 'round\tbinary\tstep\tresult\n' | tee "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for edge in "${EDGES[@]}"; do
    name=$(label "$edge")
    LT=("$BIN/kas-loadtest" --progress never)
    for step in $STEPS; do
      start_stack "$edge"
      j=$WORK/$step.json
      rm -f "$j"
      # Where the run's output and report are kept: $kept.log, $kept.json.
      kept=$JSON_DIR/$round-$name-$step
      case $step in
        idle)
          "${LT[@]}" --token "$TOKEN" --ca-file "$CA" --target wss://127.0.5.1:8443/ --scenario idle \
            --agents "$IDLE_AGENTS" --rate 500 --settle 60s --duration 10s --echo-interval 60s \
            --max-error-rate 0.001 --edge-pid "$EDGE_PID" --json "$j" >"$kept.log" 2>&1 || true
          result=$(json "$j" '"%.0f B per tunnel (%d agents, rss %.1f -> %.1f MiB)" % (d["edge"]["rss_per_connection_bytes"], d["facts"]["connected_after_ramp"], d["edge"]["baseline_rss_bytes"]/2**20, d["edge"]["loaded_rss_bytes"]/2**20)')
          ;;
        rpc)
          before=$(cpu_ticks "$EDGE_PID")
          "${LT[@]}" --token "$TOKEN" --ca-file "$CA" --target grpcs://127.0.5.1:8443 --scenario rpc \
            --ws-fraction 0 --rpc-rate "$RPC_RATE" --rpc-connections 4 --duration "${RPC_SECS}s" \
            --max-error-rate 0.001 --json "$j" >"$kept.log" 2>&1 || true
          after=$(cpu_ticks "$EDGE_PID")
          cpu_s=$(awk -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" 'BEGIN {print t / hz}')
          result=$(json "$j" '"%.1f us CPU per request (%d sent, %d errors, p99 %.2f ms)" % ('"$cpu_s"' * 1e6 / d["totals"]["rpc_sent"], d["totals"]["rpc_sent"], d["totals"]["errors"], d["latency"]["rpc"]["p99_ms"])')
          ;;
        rps)
          h1=$(saturate "$kept-h1.txt" wrk -t2 -c64 -d"${RPS_SECS}s" https://127.0.5.1:8443/)
          grpc=$(saturate "$kept-grpc.txt" grpc_ping_load "$WORK" "$RPS_SECS" 8 16 "$TOKEN" \
            https://127.0.5.1:8443/kas_edge.diagnostics.v1.Diagnostics/Ping)
          result="h1 $h1; grpc $grpc"
          ;;
        hostile)
          "${LT[@]}" --token "$TOKEN" --ca-file "$CA" --target wss://127.0.5.1:8443/ --scenario hostile \
            --agents "$HOSTILE_AGENTS" --rate 500 --duration "${ATTACK_SECS}s" \
            --attack-settle "${ATTACK_SETTLE}s" --attack-scale "$ATTACK_SCALE" --attack-warmup "${ATTACK_WARMUP}s" ${ATTACK_KINDS:+--attack-kinds "$ATTACK_KINDS"} ${HOSTILE_WS_FRACTION:+--ws-fraction "$HOSTILE_WS_FRACTION"} \
            ${ATTACK_SOURCE_BASE:+--attack-source-base "$ATTACK_SOURCE_BASE"} --edge-pid "$EDGE_PID" \
            --edge-admin http://127.0.5.1:8081/metrics --json "$j" >"$kept.log" 2>&1 || true
          result=$(json "$j" '"rss connected %.1f, before %.1f / peak %.1f / %ss after %.1f MiB (after/before %.3f); passed %s, legit errors %d/%d" % (d["edge"]["rss_fleet_connected_bytes"]/2**20, d["edge"]["rss_before_attack_bytes"]/2**20, d["edge"]["rss_peak_attack_bytes"]/2**20, '"$ATTACK_SETTLE"', d["edge"]["rss_after_attack_bytes"]/2**20, d["edge"]["rss_after_attack_bytes"]/d["edge"]["rss_before_attack_bytes"], d["passed"], d["facts"]["legit_errors"], d["facts"]["legit_operations"])')
          ;;
        soak)
          "${LT[@]}" --token "$TOKEN" --ca-file "$CA" --target wss://127.0.5.1:8443/ --scenario churn \
            --agents "$SOAK_AGENTS" --rate 500 --churn-rate "$SOAK_CHURN" --duration "${SOAK_SECS}s" \
            --echo-interval 10s --max-error-rate 0.001 --edge-pid "$EDGE_PID" --json "$j" >"$kept.log" 2>&1 || true
          result="$("$ROOT/loadtest/rss-trend.py" "$j" --phase churn --skip 60 || true); $(json "$j" '"%d reconnects, fleet errors %d/%d; passed %s" % (d["facts"].get("churn_reconnects_done", 0), d["totals"]["errors"], d["totals"]["operations"], d["passed"])')"
          ;;
        storm)
          "${LT[@]}" --token "$TOKEN" --ca-file "$CA" --target wss://127.0.5.1:8443/ --scenario storm \
            --agents "$STORM_AGENTS" --rate 1000 --settle 120s --duration 120s --echo-interval 60s \
            --max-error-rate 0.001 --json "$j" >"$kept.log" 2>&1 || true
          result=$(json "$j" '"all back in %ss (%s/%s), refused by the cap %s, fleet errors %d/%d %s; passed %s" % (d["facts"].get("storm_time_until_all_back_s"), d["facts"].get("storm_reconnected"), d["facts"].get("storm_agents"), '"$(handshake_refusals 127.0.5.1:8081)"', d["totals"]["errors"], d["totals"]["operations"], {e["kind"]: e["count"] for e in d["errors"]}, d["passed"])')
          ;;
      esac
      printf '%s\t%s\t%s\t%s\n' "$round" "$name" "$step" "$result" | tee -a "$OUT"
      cp "$j" "$kept.json" 2>/dev/null || true
    done
  done
done
stop_all
