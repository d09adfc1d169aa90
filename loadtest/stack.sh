# shellcheck shell=bash
# Sourced by bench.sh and edge-ab.sh: how both start the stack they measure, a `kas dev`
# (three kas pods on 127.0.1.1-3 and the GitLab stand-in) and a `kas-edge run` in front of
# it, and stop it again, so the two benchmarks measure the same setup. The caller defines
# `log` (its own prefix) and runs with `set -e`, so a stack that does not come up ends it.
#
# Every process started is in PIDS; stop_all ends them (TERM, up to 10 s, then KILL).

# shellcheck source=loadtest/edge-config.sh
. "$(dirname "${BASH_SOURCE[0]}")/edge-config.sh"

PIDS=()

# Ends every process in PIDS and forgets them.
stop_all() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  PIDS=()
}

# Polls a command every 0.1 s for up to 30 s; fails (logged) if it never succeeded.
wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "$what did not come up"
  return 1
}

# Whether the edge with this admin address sees all three pods healthy.
edge_healthy() { # admin-address
  [ "$(curl -fs "http://$1/metrics" | grep -c '^edge_upstream_healthy{.*} 1$')" = 3 ]
}

# Connects the edge at this admin address refused because its handshake slots and their
# queue were full (edge_policy_blocked_total{reason="handshakes_in_progress"}), so far.
handshake_refusals() { # admin-address
  curl -fs "http://$1/metrics" |
    awk '/^edge_policy_blocked_total\{.*reason="handshakes_in_progress"/ {s += $NF} END {print s + 0}'
}

# Samples the edge's connections in handshake (queued ones included) and those queued for a
# slot every 0.2 s until STOP exists (at most 10 min); writes the two peaks to OUT.
handshake_peaks() { # admin-address out stop
  local in=0 queued=0 i q
  for _ in $(seq 1 3000); do
    [ -e "$3" ] && break
    read -r i q < <(curl -fs --max-time 1 "http://$1/metrics" |
      awk '/^edge_connections_in_handshake / {i = $2} /^edge_connections_queued_for_handshake / {q = $2} END {print i + 0, q + 0}')
    [ "${i:-0}" -gt "$in" ] && in=$i
    [ "${q:-0}" -gt "$queued" ] && queued=$q
    sleep 0.2
  done
  echo "$in $queued" >"$2"
}

# Starts `kas dev` in DIR (state in DIR/dev, log DIR/kas.log) and waits until its three pods
# are ready; sets KAS_PID and TOKEN (the demo agent's).
start_kas_dev() { # kas-binary dir
  (cd "$2" && exec "$1" dev --dir "$2/dev" >"$2/kas.log" 2>&1) &
  KAS_PID=$!
  PIDS+=("$KAS_PID")
  local n
  for n in 1 2 3; do wait_for "kas pod $n" curl -fs "http://127.0.1.$n:8151/readiness"; done
  # shellcheck disable=SC2034 # for the caller
  TOKEN=$(cat "$2/dev/demo-agent-token")
}

# Starts `kas-edge run` with CONFIG (log next to it, .toml → .log) and waits until it sees
# its three pods healthy at ADMIN; sets EDGE_PID.
start_edge() { # kas-edge-binary config admin-address
  "$1" run --config "$2" >"${2%.toml}.log" 2>&1 &
  EDGE_PID=$!
  PIDS+=("$EDGE_PID")
  wait_for "kas-edge ($2)" edge_healthy "$3"
}

# gRPC Diagnostics/Ping requests as fast as the target answers them (h2load, an empty
# PingRequest each, its report on stdout): the load both benchmarks measure gRPC
# requests/s with, so they send the same requests.
grpc_ping_load() { # work-dir secs connections streams-per-connection token url
  printf '\0\0\0\0\0' >"$1/ping.bin" # one gRPC message: uncompressed, empty PingRequest
  h2load -D "$2" -c "$3" -m "$4" -d "$1/ping.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $5" "$6"
}
