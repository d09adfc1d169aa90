#!/usr/bin/env bash
# The same agent workload, in one run on one machine, (1) straight to the kas pods, (2)
# through kas-edge, (3) through nginx and (4) through HAProxy. The three proxies are set
# up alike: TLS termination with the same self-signed certificate (the one kas-edge
# generates), websocket and h2c upstream to the same three kas pods. Writes the ratios
# through / direct to loadtest/results/<date>.json and loadtest/results/latest.md.
#
# Measured per path:
#   h1_rps         TLS HTTP/1.1 keep-alive requests/s (wrk; kas answers every plain
#                  HTTP/1.1 request on its agent port with a short 400, which is the
#                  "HTTP path kas answers" — the proxies forward it like any response)
#   grpc_rps       gRPC unary Diagnostics/Ping requests/s over TLS (h2load, ALPN h2)
#   rpc_p99_ms     p99 latency of the same Ping, open loop at $RPC_RATE/s (kas-loadtest,
#                  which also checks grpc-status, which h2load does not)
#   ws_mem_bytes   memory per idle TLS websocket tunnel at $WS_AGENTS connections
#                  (kas-loadtest idle; the proxy's own RSS growth per tunnel; for the
#                  direct path, the kas pods' growth per tunnel)
#   new_tls_cps    new TLS connections/s (wrk with `Connection: close`: one request per
#                  connection, full handshakes)
#   *_cpu_us_per_req, *_ctxsw_per_req
#                  the proxy's (or, direct, the pods') CPU time and context switches per
#                  request during the h1 and gRPC runs, from /proc deltas; what a proxy
#                  costs per request independent of how the load generator fares
#   grpc_upstream_conns
#                  proxy → pod TCP connections open mid-way through the gRPC run (ss)
#   bulk_ws_mbps, bulk_grpc_mbps
#                  MB/s of $BULK_BYTES pushed through one Diagnostics/Echo stream and read
#                  back concurrently, over one websocket tunnel and over one HTTP/2
#                  connection (kas-loadtest bulk, 64 KiB messages): a big configuration or
#                  a busy reverse tunnel
#   storm_s, storm_cpu_ms_per_agent
#                  a reconnect storm: $STORM_AGENTS agents connected (wss), all dropped at
#                  once, time until every one is back (kas-loadtest storm) and the proxy's
#                  (direct: the pods') CPU per returning agent
#   storm_refused  connects the edge refused during the storm run for its handshake cap
#                  (edge_policy_blocked_total{reason="handshakes_in_progress"}; since the
#                  cap queues, 0 is the target; nginx and HAProxy count no such thing)
#   storm_peak_in_handshake, storm_peak_queued
#                  the edge's connections in handshake and queued for a slot, peaks sampled
#                  every 0.2 s over the storm run: whether the storm reached the cap at all
#   storm_errors   the fleet's errors over the storm run (refused or failed connects,
#                  timeouts), kinds in the JSON
# Direct means plaintext to a pod (pods do not speak TLS), so the ratios show what the
# proxy costs on top of reaching kas at all.
#
# The Kubernetes API proxy (K8S=1, the default), on a stack of its own started by
# kas-loadtest-stack (three kas processes with the proxy on, 127.0.7.1-3:8154, plaintext
# as behind the edge; the GitLab stand-in with $K8S_AGENTS distinct agents and a CI job
# allowed all of them; the Kubernetes API stand-in on 127.0.7.200:8182):
#   k8s_kas_mem_bytes  kas memory per connected agent holding 2 idle tunnels and its
#                      configuration stream (no Echo stream: what agentk holds), at
#                      $K8S_AGENTS agents with distinct tokens (kas-loadtest idle; the kas
#                      processes' RSS growth per agent)
#   k8s_p50_ms, k8s_p99_ms
#                      GET /api/v1/namespaces/default/pods at $K8S_RATE/s open loop
#                      (kas-loadtest k8s-proxy): straight to the API stand-in, and through
#                      kas's proxy → a tunnel of one of $K8S_LOAD_AGENTS agents → the agent's
#                      replay to the stand-in; the added latency is through − direct
#   k8s_rps            the same GET from $K8S_CONC callers back to back (closed loop)
#   k8s_watch_delay_p99_ms
#                      from a pod's create (through the path) to its ADDED event on each of
#                      $K8S_WATCHES watches held through the path
# K8S_EDGE=1 adds the path through kas-edge (127.0.5.4:8443, in front of the same pods):
# agents over wss:// through it, callers to https://127.0.5.4:8443/k8s-proxy/ — the edge
# routes /k8s-proxy/ to the pods' port 8154 ([[upstream.routes]]); K8S_EDGE_TOML is appended
# to its configuration (printf %b: '\n' starts a line). Through the edge all agents are one GitLab agent (requests land on
# any pod, and each pod then holds tunnels of it), and the edge's memory per agent with its
# tunnels is measured too (k8s_edge_mem_bytes).
#
# Knobs (environment): DURATION (s per throughput measurement, default 10), H1_CONNS (64),
# BULK_BYTES (268435456), STORM_AGENTS (5000),
# GRPC_CONNS (8), GRPC_STREAMS (16), NEWCONN_CONNS (16), RPC_RATE (1000), WS_RATE (ramp
# agents/s, 300), WS_AGENTS
# (10000, lowered to what the open-files limit allows: a proxy needs two descriptors per
# tunnel), PATHS ("direct edge nginx haproxy"; empty: the Kubernetes API proxy rows alone),
# K8S (1), K8S_AGENTS (2000), K8S_LOAD_AGENTS (100), K8S_RATE (500), K8S_CONC (16),
# K8S_WATCHES (20), K8S_EDGE (0), K8S_EDGE_TOML (""), SKIP_BUILD=1 to use existing binaries.
# Everything listens on loopback: pods 127.0.1.1-3:8150 (health :8151), GitLab stand-in
# 127.0.0.1:8180, proxies 127.0.5.1 (kas-edge), 127.0.5.2 (nginx), 127.0.5.3 (HAProxy).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=loadtest/stack.sh
. "$ROOT/loadtest/stack.sh"
RESULTS=$ROOT/loadtest/results
DURATION=${DURATION:-10}
H1_CONNS=${H1_CONNS:-64}
GRPC_CONNS=${GRPC_CONNS:-8}
GRPC_STREAMS=${GRPC_STREAMS:-16}
NEWCONN_CONNS=${NEWCONN_CONNS:-16}
RPC_RATE=${RPC_RATE:-1000}
WS_AGENTS=${WS_AGENTS:-10000}
WS_RATE=${WS_RATE:-300}
BULK_BYTES=${BULK_BYTES:-268435456}
STORM_AGENTS=${STORM_AGENTS:-5000}
PATHS=${PATHS-direct edge nginx haproxy}
K8S=${K8S:-1}
K8S_AGENTS=${K8S_AGENTS:-2000}
K8S_LOAD_AGENTS=${K8S_LOAD_AGENTS:-100}
K8S_RATE=${K8S_RATE:-500}
K8S_CONC=${K8S_CONC:-16}
K8S_WATCHES=${K8S_WATCHES:-20}
K8S_EDGE=${K8S_EDGE:-0}
K8S_EDGE_TOML=${K8S_EDGE_TOML:-}
# The edge's route to the pods' Kubernetes API proxy port, as in README's configuration.
K8S_ROUTE='[[upstream.routes]]\npath_prefix = "/k8s-proxy/"\nport = 8154'
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release

log() { echo "bench: $*" >&2; }
die() { log "$*"; exit 1; }

# --- prerequisites ------------------------------------------------------------------------
missing=()
if [ -n "$PATHS" ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
fi
command -v curl >/dev/null || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin
command -v python3 >/dev/null || die "python3 is needed to write the results"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "building release binaries (kas, kas-edge, kas-loadtest)"
  cargo build --release -p kas -p kas-edge -p kas-loadtest
fi
needed=(kas kas-loadtest kas-loadtest-stack)
if [ -n "$PATHS" ] || [ "$K8S_EDGE" = 1 ]; then needed+=(kas-edge); fi
for b in "${needed[@]}"; do [ -x "$BIN/$b" ] || die "$BIN/$b missing"; done

busy_addrs=()
[ -n "$PATHS" ] && busy_addrs+=(127.0.1.1:8150 127.0.1.2:8150 127.0.1.3:8150 127.0.0.1:8180 127.0.5.1:8443 127.0.5.2:8443 127.0.5.3:8443)
[ "$K8S" = 1 ] && busy_addrs+=(127.0.7.1:8150 127.0.7.2:8150 127.0.7.3:8150 127.0.7.200:8180 127.0.7.200:8182 127.0.5.4:8443)
for addr in "${busy_addrs[@]}"; do
  if ss -ltnH "( sport = :${addr##*:} )" | awk '{print $4}' | grep -qx "$addr"; then
    die "$addr is already in use (a local stack running?); stop it first"
  fi
done

# Every tunnel is a socket in the client and two in a proxy.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
max_ws=$(( (NOFILE - 1000) / 2 ))
if [ "$WS_AGENTS" -gt "$max_ws" ]; then
  log "open-files limit $NOFILE allows $max_ws tunnels through a proxy, not $WS_AGENTS; using $max_ws"
  WS_AGENTS=$max_ws
fi

WORK=$(mktemp -d /tmp/kas-bench.XXXXXX)
RAW=$WORK/raw
mkdir -p "$RAW" "$RESULTS"
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

answers_tls() { [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "https://$1/")" != 000 ]; }

if [ -n "$PATHS" ]; then
# --- kas pods and the GitLab stand-in (one process) ---------------------------------------
log "starting kas pods"
start_kas_dev "$BIN/kas" "$WORK"

# --- kas-edge (it also generates the certificate everyone uses) ---------------------------
edge_toml 127.0.5.1:8443 127.0.5.1:8081 127.0.5.1:8080 "$WORK/tls" 127.0.1 >"$WORK/edge.toml"
log "starting kas-edge"
start_edge "$BIN/kas-edge" "$WORK/edge.toml" 127.0.5.1:8081
CA=$WORK/tls/tls.crt
cat "$WORK/tls/tls.crt" "$WORK/tls/tls.key" >"$WORK/tls/combined.pem"

# --- nginx ----------------------------------------------------------------------------------
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
worker_processes 2;
worker_rlimit_nofile $NOFILE;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections $(( NOFILE - 100 )); }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  fastcgi_temp_path $WORK/nginx/fastcgi;
  uwsgi_temp_path $WORK/nginx/uwsgi;
  scgi_temp_path $WORK/nginx/scgi;
  keepalive_requests 1000000;
  upstream kas_h1 { server 127.0.1.1:8150; server 127.0.1.2:8150; server 127.0.1.3:8150; keepalive 64; }
  upstream kas_h2 { server 127.0.1.1:8150; server 127.0.1.2:8150; server 127.0.1.3:8150; keepalive 64; }
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  server {
    listen 127.0.5.2:8443 ssl http2;
    ssl_certificate $WORK/tls/tls.crt;
    ssl_certificate_key $WORK/tls/tls.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    # A gRPC stream's body is unbounded (the default 1 MiB ends a bulk stream).
    client_max_body_size 0;
    location / {
      if (\$http_content_type ~ "^application/grpc") {
        grpc_pass grpc://kas_h2;
      }
      grpc_read_timeout 1h;
      grpc_send_timeout 1h;
      proxy_pass http://kas_h1;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_set_header Host \$host;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF
log "starting nginx"
nginx -c "$WORK/nginx.conf" -p "$WORK/nginx" &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_for "nginx" answers_tls 127.0.5.2:8443
NGINX_PIDS="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"

# --- HAProxy --------------------------------------------------------------------------------
cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn $(( WS_AGENTS + 100 ))
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend agents
  bind 127.0.5.3:8443 ssl crt $WORK/tls/combined.pem alpn h2,http/1.1
  use_backend kas_h2 if { req.hdr(content-type) -m beg application/grpc }
  default_backend kas_h1
backend kas_h1
  server p1 127.0.1.1:8150
  server p2 127.0.1.2:8150
  server p3 127.0.1.3:8150
backend kas_h2
  server p1 127.0.1.1:8150 proto h2
  server p2 127.0.1.2:8150 proto h2
  server p3 127.0.1.3:8150 proto h2
EOF
log "starting HAProxy"
haproxy -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
wait_for "HAProxy" answers_tls 127.0.5.3:8443

addr_of() { case $1 in edge) echo 127.0.5.1:8443 ;; nginx) echo 127.0.5.2:8443 ;; haproxy) echo 127.0.5.3:8443 ;; esac; }
pids_of() { case $1 in direct) echo "$KAS_PID" ;; edge) echo "$EDGE_PID" ;; nginx) echo "$NGINX_PIDS" ;; haproxy) echo "$HAPROXY_PID" ;; esac; }

# CPU ticks (utime+stime, all threads) and context switches (all threads) of a process set.
cost_snapshot() { # pids...
  local pid ticks=0 ctx=0 t c
  for pid in "$@"; do
    t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    c=$(cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}')
    ticks=$((ticks + t)); ctx=$((ctx + c))
  done
  echo "$ticks $ctx"
}
# Runs a command, recording the cost of the process set around it in $RAW/<name>.cost.
with_cost() { # name pids-string command...
  local name=$1 pids=$2; shift 2
  local before after
  # shellcheck disable=SC2086
  before=$(cost_snapshot $pids)
  "$@" || true
  # shellcheck disable=SC2086
  after=$(cost_snapshot $pids)
  echo "$before $after $(getconf CLK_TCK)" >"$RAW/$name.cost"
}
# Established proxy → pod connections of a process set (pods listen on :8150).
upstream_conns() { # pids...
  local pid n=0
  for pid in "$@"; do
    n=$((n + $(ss -tnpH state established '( dport = :8150 )' 2>/dev/null | grep -c "pid=$pid," || true)))
  done
  echo "$n"
}

fi

LT=("$BIN/kas-loadtest" --token "${TOKEN:-}" --progress never)
for p in $PATHS; do
  if [ "$p" = direct ]; then
    h1_url=http://127.0.1.1:8150/
    grpc_url=http://127.0.1.1:8150/kas_edge.diagnostics.v1.Diagnostics/Ping
    ws_targets=(--target ws://127.0.1.1:8150/ --target ws://127.0.1.2:8150/ --target ws://127.0.1.3:8150/)
    rpc_targets=(--target grpc://127.0.1.1:8150 --target grpc://127.0.1.2:8150 --target grpc://127.0.1.3:8150)
  else
    a=$(addr_of "$p")
    h1_url=https://$a/
    grpc_url=https://$a/kas_edge.diagnostics.v1.Diagnostics/Ping
    ws_targets=(--target "wss://$a/" --ca-file "$CA")
    rpc_targets=(--target "grpcs://$a" --ca-file "$CA")
  fi
  # Memory first, while the pods are fresh (the direct path measures the pods' growth).
  pid_args=()
  for pid in $(pids_of "$p"); do pid_args+=(--edge-pid "$pid"); done
  log "$p: $WS_AGENTS idle websocket tunnels"
  "${LT[@]}" --scenario idle --agents "$WS_AGENTS" --rate "$WS_RATE" --settle 180s --duration 10s \
    --echo-interval 60s --max-error-rate 0.001 "${ws_targets[@]}" "${pid_args[@]}" \
    --json "$RAW/$p-ws.json" >"$RAW/$p-ws.txt" 2>&1 || log "$p: idle run reported failures (see JSON)"
  sleep 2
  log "$p: TLS h1 keep-alive requests/s"
  run_wrk() { wrk -t2 -c"$H1_CONNS" -d"${DURATION}s" "$h1_url" >"$RAW/$p-h1.txt" 2>&1; }
  with_cost "$p-h1" "$(pids_of "$p")" run_wrk
  log "$p: gRPC unary requests/s"
  run_h2load() {
    grpc_ping_load "$WORK" "$DURATION" "$GRPC_CONNS" "$GRPC_STREAMS" "$TOKEN" "$grpc_url" >"$RAW/$p-grpc.txt" 2>&1
  }
  # shellcheck disable=SC2046
  (sleep "$(( DURATION / 2 ))"; upstream_conns $(pids_of "$p") >"$RAW/$p-grpc.conns") &
  with_cost "$p-grpc" "$(pids_of "$p")" run_h2load
  wait "$!" 2>/dev/null || true
  log "$p: gRPC Ping latency at $RPC_RATE/s (open loop)"
  "${LT[@]}" --scenario rpc --rpc-rate "$RPC_RATE" --rpc-connections 4 --duration 5s \
    --max-error-rate 0.001 --ws-fraction 0 "${rpc_targets[@]}" \
    --json "$RAW/$p-rpc.json" >"$RAW/$p-rpc.txt" 2>&1 || log "$p: rpc run reported failures (see JSON)"
  log "$p: new TLS connections/s"
  wrk -t2 -c"$NEWCONN_CONNS" -d"${DURATION}s" -H 'Connection: close' "$h1_url" >"$RAW/$p-newconn.txt" 2>&1 || true
  for transport in ws grpc; do
    log "$p: $BULK_BYTES bytes through one $transport stream"
    if [ "$transport" = ws ]; then bulk_args=(--ws-fraction 1 "${ws_targets[@]:0:2}"); else bulk_args=(--ws-fraction 0 "${rpc_targets[@]:0:2}"); fi
    [ "$p" = direct ] || bulk_args+=(--ca-file "$CA")
    "${LT[@]}" --scenario bulk --bulk-bytes "$BULK_BYTES" --duration 120s "${bulk_args[@]}" \
      --json "$RAW/$p-bulk-$transport.json" >"$RAW/$p-bulk-$transport.txt" 2>&1 || log "$p: bulk $transport reported failures (see JSON)"
  done
  log "$p: reconnect storm of $STORM_AGENTS agents"
  run_storm() {
    "${LT[@]}" --scenario storm --agents "$STORM_AGENTS" --rate 1000 --settle 120s --duration 120s \
      --echo-interval 60s --max-error-rate 0.001 "${ws_targets[@]}" \
      --json "$RAW/$p-storm.json" >"$RAW/$p-storm.txt" 2>&1 || log "$p: storm reported failures (see JSON)"
  }
  # The edge counts the connects it refuses for its handshake cap (slots and queue full);
  # for nginx and HAProxy a refused connect shows only among the fleet's errors.
  # Whether the storm reached the cap at all: the peaks of connections in handshake and of
  # those queued for a slot, sampled while it runs.
  if [ "$p" = edge ]; then
    handshake_refusals 127.0.5.1:8081 >"$RAW/$p-storm.refused"
    handshake_peaks 127.0.5.1:8081 "$RAW/$p-storm.peaks" "$RAW/$p-storm.done" &
    peaks_pid=$!
  fi
  with_cost "$p-storm" "$(pids_of "$p")" run_storm
  if [ "$p" = edge ]; then
    handshake_refusals 127.0.5.1:8081 >>"$RAW/$p-storm.refused"
    touch "$RAW/$p-storm.done"
    wait "$peaks_pid" || true
  fi
done

# --- the Kubernetes API proxy ----------------------------------------------------------------
if [ "$K8S" = 1 ]; then
  log "k8s: starting kas-loadtest-stack ($K8S_AGENTS agents, 3 kas pods with the proxy)"
  "$BIN/kas-loadtest-stack" --dir "$WORK/k8s" --agents "$K8S_AGENTS" --kas-bin "$BIN/kas" \
    >"$WORK/k8s-stack.log" 2>&1 &
  STACK_PID=$!
  PIDS+=("$STACK_PID")
  K8S_EDGE_PID=""
  wait_for "kas-loadtest-stack" test -s "$WORK/k8s/stack.env"
  # shellcheck disable=SC1091
  . "$WORK/k8s/stack.env"
  k8s_targets=(); for t in $AGENT_TARGETS; do k8s_targets+=(--target "$t"); done
  k8s_urls=(); for u in $K8S_PROXY_URLS; do k8s_urls+=(--k8s-proxy-url "$u"); done
  kas_pids=()
  # shellcheck disable=SC2153 # KAS_PIDS comes from stack.env
  for pid in $KAS_PIDS; do kas_pids+=(--edge-pid "$pid"); done
  # Agents as agentk: the configuration stream and 2 idle tunnels, no Echo stream.
  LTK=("$BIN/kas-loadtest" --progress never --kube-api-url "$KUBE_API_URL" --echo-interval 0)
  fleet=(--ws-fraction 0 "${k8s_targets[@]}" --token-file "$TOKEN_FILE")
  callers=("${k8s_urls[@]}" --k8s-token-file "$CI_TOKEN_FILE")
  direct=(--agents 0 --k8s-proxy-url "$KUBE_API_URL/")
  quiet=(--k8s-watches 0 --k8s-write-rate 0)
  watching=(--k8s-rate "$(( K8S_RATE / 5 ))" --k8s-watches "$K8S_WATCHES" --k8s-write-rate 5)
  run_k8s() { # name args...
    local name=$1; shift
    "${LTK[@]}" --scenario k8s-proxy --duration "${DURATION}s" "$@" --json "$RAW/k8s-$name.json" \
      >"$RAW/k8s-$name.txt" 2>&1 || log "k8s: $name reported failures (see the JSON)"
  }
  ticks() { # pids... → their utime + stime, in clock ticks
    local t=0 pid
    for pid in "$@"; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0) )); done
    echo "$t"
  }
  # run_k8s, with the CPU of the kas pods, the stand-ins' process and the edge around it
  # in $RAW/k8s-<name>.cpu (the load generator reports its own).
  run_k8s_cpu() { # name args...
    local name=$1 before
    # shellcheck disable=SC2086
    before="$(ticks $KAS_PIDS) $(ticks "$STACK_PID") $(ticks $K8S_EDGE_PID)"
    run_k8s "$@"
    # shellcheck disable=SC2086
    echo "$before $(ticks $KAS_PIDS) $(ticks "$STACK_PID") $(ticks $K8S_EDGE_PID) $(getconf CLK_TCK)" >"$RAW/k8s-$name.cpu"
  }
  log "k8s: kas memory per agent ($K8S_AGENTS agents, 2 idle tunnels and the configuration stream each)"
  "${LTK[@]}" --scenario idle --agents "$K8S_AGENTS" --rate "$WS_RATE" --settle 180s --duration 10s \
    --reverse-tunnel "${fleet[@]}" "${kas_pids[@]}" --json "$RAW/k8s-mem.json" >"$RAW/k8s-mem.txt" 2>&1 \
    || log "k8s: the memory run reported failures (see the JSON)"
  sleep 2
  log "k8s: GET straight to the API stand-in ($K8S_RATE/s; $K8S_CONC callers; watches)"
  run_k8s direct-rate "${direct[@]}" --k8s-rate "$K8S_RATE" "${quiet[@]}"
  run_k8s_cpu direct-conc "${direct[@]}" --k8s-concurrency "$K8S_CONC" "${quiet[@]}"
  run_k8s direct-watch "${direct[@]}" "${watching[@]}"
  log "k8s: the same through kas's proxy and $K8S_LOAD_AGENTS agents' tunnels"
  run_k8s kas-rate --agents "$K8S_LOAD_AGENTS" "${fleet[@]}" "${callers[@]}" --k8s-rate "$K8S_RATE" "${quiet[@]}"
  run_k8s_cpu kas-conc --agents "$K8S_LOAD_AGENTS" "${fleet[@]}" "${callers[@]}" --k8s-concurrency "$K8S_CONC" "${quiet[@]}"
  run_k8s kas-watch --agents "$K8S_LOAD_AGENTS" "${fleet[@]}" "${callers[@]}" "${watching[@]}"
  if [ "$K8S_EDGE" = 1 ]; then
    edge_toml 127.0.5.4:8443 127.0.5.4:8081 "" "$WORK/k8s-edge-tls" 127.0.7 \
      "$K8S_ROUTE${K8S_EDGE_TOML:+\n$K8S_EDGE_TOML}" >"$WORK/k8s-edge.toml"
    log "k8s: starting kas-edge in front of the stack's pods"
    start_edge "$BIN/kas-edge" "$WORK/k8s-edge.toml" 127.0.5.4:8081
    K8S_EDGE_PID=$EDGE_PID
    # One GitLab agent for the whole fleet: the edge spreads agents and requests over the
    # pods, and until kas routes between pods each pod must hold tunnels of the agent asked.
    efleet=(--ws-fraction 1 --target wss://127.0.5.4:8443/ --ca-file "$WORK/k8s-edge-tls/tls.crt"
      --token "$(head -1 "$TOKEN_FILE")")
    ecallers=(--k8s-proxy-url https://127.0.5.4:8443/k8s-proxy/ --k8s-insecure --k8s-token "$(head -1 "$CI_TOKEN_FILE")")
    log "k8s: edge memory per agent ($K8S_AGENTS agents over wss://, 2 idle tunnels each)"
    "${LTK[@]}" --scenario idle --agents "$K8S_AGENTS" --rate "$WS_RATE" --settle 180s --duration 10s \
      --reverse-tunnel "${efleet[@]}" --edge-pid "$K8S_EDGE_PID" --json "$RAW/k8s-edge-mem.json" \
      >"$RAW/k8s-edge-mem.txt" 2>&1 || log "k8s: the edge memory run reported failures (see the JSON)"
    sleep 2
    log "k8s: GETs through the edge's /k8s-proxy/ route"
    run_k8s edge-rate --agents "$K8S_LOAD_AGENTS" "${efleet[@]}" "${ecallers[@]}" --k8s-rate "$K8S_RATE" "${quiet[@]}"
    run_k8s_cpu edge-conc --agents "$K8S_LOAD_AGENTS" "${efleet[@]}" "${ecallers[@]}" --k8s-concurrency "$K8S_CONC" "${quiet[@]}"
    run_k8s edge-watch --agents "$K8S_LOAD_AGENTS" "${efleet[@]}" "${ecallers[@]}" "${watching[@]}"
  fi
fi

DATE=$(date -u +%Y-%m-%dT%H-%M-%SZ)
NGINX_VERSION=$(nginx -v 2>&1 | head -1) HAPROXY_VERSION=$(haproxy -v 2>&1 | head -1) \
K8S=$K8S K8S_EDGE=$K8S_EDGE K8S_AGENTS=$K8S_AGENTS K8S_LOAD_AGENTS=$K8S_LOAD_AGENTS K8S_RATE=$K8S_RATE \
K8S_CONC=$K8S_CONC K8S_WATCHES=$K8S_WATCHES \
RAW=$RAW RESULTS=$RESULTS DATE=$DATE PATHS=$PATHS WS_AGENTS=$WS_AGENTS DURATION=$DURATION \
H1_CONNS=$H1_CONNS GRPC_CONNS=$GRPC_CONNS GRPC_STREAMS=$GRPC_STREAMS NEWCONN_CONNS=$NEWCONN_CONNS \
RPC_RATE=$RPC_RATE BULK_BYTES=$BULK_BYTES STORM_AGENTS=$STORM_AGENTS python3 - <<'PY'
import json, os, re

raw, paths = os.environ["RAW"], os.environ["PATHS"].split()

def read(name):
    try:
        with open(os.path.join(raw, name)) as f:
            return f.read()
    except OSError:
        return ""

def wrk(text):
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return (float(m.group(1)) if m else None), (sum(map(int, errs.groups())) if errs else 0)

def h2load(text):
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    r = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
    return (float(m.group(1)) if m else None), ({"succeeded": int(r.group(1)), "failed": int(r.group(2)), "errored": int(r.group(3))} if r else None)

def cost(name, requests):
    """CPU µs and context switches per request from a .cost snapshot pair."""
    parts = read(f"{name}.cost").split()
    if len(parts) != 5 or not requests:
        return None, None
    t0, c0, t1, c1, hz = map(int, parts)
    return round((t1 - t0) / hz * 1e6 / requests, 1), round((c1 - c0) / requests, 3)

def load_json(name):
    try:
        return json.loads(read(name))
    except ValueError:
        return None

results = {}
for p in paths:
    h1, h1_errors = wrk(read(f"{p}-h1.txt"))
    newconn, newconn_errors = wrk(read(f"{p}-newconn.txt"))
    grpc, grpc_counts = h2load(read(f"{p}-grpc.txt"))
    ws = load_json(f"{p}-ws.json") or {}
    rpc = load_json(f"{p}-rpc.json") or {}
    edge = ws.get("edge") or {}
    duration = float(os.environ["DURATION"])
    h1_cpu, h1_ctx = cost(f"{p}-h1", (h1 or 0) * duration)
    grpc_cpu, grpc_ctx = cost(f"{p}-grpc", (grpc or 0) * duration)
    conns = read(f"{p}-grpc.conns").strip()
    bulk = {t: (load_json(f"{p}-bulk-{t}.json") or {}) for t in ("ws", "grpc")}
    storm = load_json(f"{p}-storm.json") or {}
    storm_facts = storm.get("facts") or {}
    # The storm's cost covers its ramp too: two connects per agent.
    storm_cpu, _ = cost(f"{p}-storm", 2 * int(os.environ["STORM_AGENTS"]))
    refused = read(f"{p}-storm.refused").split()
    peaks = read(f"{p}-storm.peaks").split()
    results[p] = {
        "bulk_ws_mbps": (bulk["ws"].get("facts") or {}).get("bulk_mb_per_s") if bulk["ws"].get("passed") else None,
        "bulk_grpc_mbps": (bulk["grpc"].get("facts") or {}).get("bulk_mb_per_s") if bulk["grpc"].get("passed") else None,
        # Every agent back counts even when some reconnects were refused on the way (the
        # edge's handshake cap); the refusals are reported with the errors.
        "storm_s": storm_facts.get("storm_time_until_all_back_s")
        if storm_facts.get("storm_reconnected") == storm_facts.get("storm_agents") else None,
        "storm_cpu_ms_per_agent": round(storm_cpu / 1000, 3) if storm_cpu is not None else None,
        "storm_passed": storm.get("passed"),
        # Connects the edge refused during the storm run (its ramp included) for its
        # handshake cap: the delta of edge_policy_blocked_total{reason="handshakes_in_progress"}.
        "storm_refused": int(refused[1]) - int(refused[0]) if len(refused) == 2 else None,
        # The most connections in handshake (queued ones included) and queued for a slot at
        # once, sampled every 0.2 s: whether the storm reached the cap.
        "storm_peak_in_handshake": int(peaks[0]) if len(peaks) == 2 else None,
        "storm_peak_queued": int(peaks[1]) if len(peaks) == 2 else None,
        # The fleet's errors over the storm run (ramp included): refused or failed connects,
        # configuration and Echo timeouts, by kind.
        "storm_errors": (storm.get("totals") or {}).get("errors"),
        "storm_operations": (storm.get("totals") or {}).get("operations"),
        "storm_error_kinds": {e["kind"]: e["count"] for e in storm.get("errors") or []},
        "storm_failures": [c["detail"] for c in storm.get("checks") or [] if not c.get("ok")],
        "bulk_failures": {t: [c["detail"] for c in b.get("checks") or [] if not c.get("ok")]
                          for t, b in bulk.items() if b.get("passed") is False},
        "h1_cpu_us_per_req": h1_cpu, "h1_ctxsw_per_req": h1_ctx,
        "grpc_cpu_us_per_req": grpc_cpu, "grpc_ctxsw_per_req": grpc_ctx,
        "grpc_upstream_conns": int(conns) if conns.isdigit() else None,
        "h1_rps": h1, "h1_socket_errors": h1_errors,
        "grpc_rps": grpc, "grpc_requests": grpc_counts,
        "rpc_p99_ms": (rpc.get("latency", {}).get("rpc") or {}).get("p99_ms"),
        "rpc_passed": rpc.get("passed"),
        "ws_mem_bytes": edge.get("rss_per_connection_bytes"),
        "ws_connected": (ws.get("totals") or {}).get("peak_connected"),
        "ws_errors": (ws.get("totals") or {}).get("errors"),
        "ws_passed": ws.get("passed"),
        "ws_error_kinds": {e["kind"]: e["count"] for e in ws.get("errors") or []},
        "ws_error_examples": {e["kind"]: e["example"] for e in ws.get("errors") or []},
        "ws_cpu_ms_per_handshake": edge.get("cpu_ms_per_handshake"),
        "new_tls_cps": newconn, "new_conn_socket_errors": newconn_errors,
    }

metrics = [
    ("h1_rps", "TLS h1 keep-alive requests/s", "higher is better"),
    ("grpc_rps", "gRPC unary requests/s over TLS", "higher is better"),
    ("ws_mem_bytes", f"idle TLS websocket tunnel memory, bytes/conn at {os.environ['WS_AGENTS']}", "lower is better"),
    ("new_tls_cps", "new TLS connections/s", "higher is better"),
    ("rpc_p99_ms", f"gRPC Ping p99 ms at {os.environ['RPC_RATE']}/s open loop", "lower is better"),
    ("h1_cpu_us_per_req", "h1: CPU µs per request (proxy; direct: pods)", "lower is better"),
    ("h1_ctxsw_per_req", "h1: context switches per request", "lower is better"),
    ("grpc_cpu_us_per_req", "gRPC: CPU µs per request (proxy; direct: pods)", "lower is better"),
    ("grpc_ctxsw_per_req", "gRPC: context switches per request", "lower is better"),
    ("grpc_upstream_conns", "gRPC: proxy → pod connections mid-run", "fewer is better"),
    ("bulk_ws_mbps", f"MB/s echoed through one websocket tunnel ({int(os.environ['BULK_BYTES']) >> 20} MiB)", "higher is better"),
    ("bulk_grpc_mbps", f"MB/s echoed through one gRPC stream ({int(os.environ['BULK_BYTES']) >> 20} MiB)", "higher is better"),
    ("storm_s", f"reconnect storm: s until all {os.environ['STORM_AGENTS']} agents are back", "lower is better"),
    ("storm_cpu_ms_per_agent", "reconnect storm: CPU ms per agent connect (proxy; direct: pods)", "lower is better"),
    ("storm_refused", "reconnect storm: connects refused by the edge's handshake cap", "0 is the target"),
    ("storm_peak_in_handshake", "reconnect storm: edge connections in handshake at once, peak (cap 4,096)", "sampled every 0.2 s"),
    ("storm_peak_queued", "reconnect storm: edge connections queued for a handshake slot, peak", "sampled every 0.2 s"),
    ("storm_errors", "reconnect storm: the fleet's errors (ramp and storm)", "lower is better"),
]
ratios = {}
for p in paths:
    if p == "direct":
        continue
    ratios[p] = {}
    for key, _, _ in metrics:
        d, t = results.get("direct", {}).get(key), results[p].get(key)
        # A count of connections is compared as it is, not as a ratio to the pods'.
        counted = key == "grpc_upstream_conns" or key.startswith("storm_") and key not in ("storm_s", "storm_cpu_ms_per_agent")
        ratios[p][key] = round(t / d, 3) if d and t is not None and not counted else None

def k8s_rows():
    """The Kubernetes API proxy rows: per path (direct, kas, edge) latency, requests/s and
    watch delay, kas's (and the edge's) memory per agent, and the targets."""
    def run(name):
        return load_json(f"k8s-{name}.json") or {}
    def lat(doc, name, q):
        return ((doc.get("latency") or {}).get(name) or {}).get(q)
    k8s_paths = ["direct", "kas"] + (["edge"] if os.environ["K8S_EDGE"] == "1" else [])
    res = {}
    for p in k8s_paths:
        rate, conc, watch = run(f"{p}-rate"), run(f"{p}-conc"), run(f"{p}-watch")
        errors = {}
        for r in (rate, conc, watch):
            for e in r.get("errors") or []:
                errors[e["kind"]] = errors.get(e["kind"], 0) + e["count"]
        ok = (conc.get("facts") or {}).get("k8s_requests_ok") or 0
        cpu = read(f"k8s-{p}-conc.cpu").split()
        per = {}
        if len(cpu) == 7 and ok:
            k0, s0, e0, k1, s1, e1, hz = map(int, cpu)
            per = {name: round((b - a) / hz * 1e6 / ok, 1) for name, a, b in
                   (("kas", k0, k1), ("standins", s0, s1), ("edge", e0, e1))}
        res[p] = {
            "cpu_us_per_get_kas": per.get("kas") if p != "direct" else None,
            "cpu_us_per_get_standins": per.get("standins"),
            "cpu_us_per_get_edge": per.get("edge") if p == "edge" else None,
            "cpu_us_per_get_loadtest": (conc.get("facts") or {}).get("loadtest_cpu_us_per_request"),
            "k8s_p50_ms": lat(rate, "k8s GET", "p50_ms"),
            "k8s_p99_ms": lat(rate, "k8s GET", "p99_ms"),
            "k8s_rps": (conc.get("facts") or {}).get("k8s_gets_ok_per_s") if conc.get("passed") else None,
            "k8s_watch_delay_p99_ms": lat(watch, "watch event delay", "p99_ms"),
            "tunnels_busy_peak": (conc.get("facts") or {}).get("tunnels_busy_peak"),
            "passed": {"rate": rate.get("passed"), "conc": conc.get("passed"), "watch": watch.get("passed")},
            "errors": errors,
        }
    mem = run("mem")
    res["kas"]["k8s_kas_mem_bytes"] = (mem.get("edge") or {}).get("rss_per_connection_bytes") if mem.get("passed") else None
    res["kas"]["k8s_mem_agents"] = (mem.get("totals") or {}).get("peak_connected")
    res["kas"]["k8s_mem_errors"] = {e["kind"]: e["count"] for e in mem.get("errors") or []}
    if "edge" in res:
        emem = run("edge-mem")
        res["edge"]["k8s_edge_mem_bytes"] = (emem.get("edge") or {}).get("rss_per_connection_bytes") if emem.get("passed") else None
        res["edge"]["k8s_mem_errors"] = {e["kind"]: e["count"] for e in emem.get("errors") or []}
    d = res["direct"]
    for p in k8s_paths[1:]:
        r = res[p]
        for q in ("p50", "p99"):
            a, b = d[f"k8s_{q}_ms"], r[f"k8s_{q}_ms"]
            r[f"k8s_added_{q}_ms"] = round(b - a, 3) if a is not None and b is not None else None
        r["k8s_rps_ratio"] = round(r["k8s_rps"] / d["k8s_rps"], 3) if d["k8s_rps"] and r["k8s_rps"] is not None else None
    return res

k8s = k8s_rows() if os.environ["K8S"] == "1" else None

doc = {
    "date": os.environ["DATE"],
    "machine": {"cpus": os.cpu_count()},
    "versions": {"nginx": os.environ.get("NGINX_VERSION"), "haproxy": os.environ.get("HAPROXY_VERSION")},
    "params": {k.lower(): os.environ[k] for k in ["DURATION", "H1_CONNS", "GRPC_CONNS", "GRPC_STREAMS", "NEWCONN_CONNS", "RPC_RATE", "WS_AGENTS"]},
    "results": results,
    "ratios_through_over_direct": ratios,
    "k8s_proxy": k8s,
}
if k8s is not None:
    doc["params"].update({k.lower(): os.environ[k] for k in ["K8S_AGENTS", "K8S_LOAD_AGENTS", "K8S_RATE", "K8S_CONC", "K8S_WATCHES"]})
out = os.path.join(os.environ["RESULTS"], os.environ["DATE"] + ".json")
with open(out, "w") as f:
    json.dump(doc, f, indent=2)

def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"

written = [out]
if paths:
    names = {"direct": "direct (pod)", "edge": "kas-edge", "nginx": "nginx", "haproxy": "HAProxy"}
    through = [p for p in paths if p != "direct"]
    lines = [
        f"# kas-loadtest bench {os.environ['DATE']}",
        "",
        "Same workload straight to kas pods (plaintext) and through each TLS-terminating proxy, one machine "
        f"({os.cpu_count()} CPUs), everything on loopback. Ratios are through / direct.",
        "",
        "| metric | " + " | ".join(names[p] for p in paths) + " | " + " | ".join(f"{names[p]} / direct" for p in through) + " |",
        "|---|" + "---:|" * (len(paths) + len(through)),
    ]
    for key, label, better in metrics:
        row = [fmt(results[p].get(key)) for p in paths]
        row += [("n/a" if ratios[p][key] is None else f"{ratios[p][key]:.3f}") for p in through]
        lines.append(f"| {label} ({better}) | " + " | ".join(row) + " |")
    lines += [
        "",
        "Notes: direct has no TLS (pods speak plaintext), so the ratios include the TLS cost. Memory per tunnel is "
        "the proxy's own RSS growth divided by tunnels (for direct: the kas process's growth). "
        f"{os.environ.get('NGINX_VERSION')}; {os.environ.get('HAPROXY_VERSION')}.",
        "",
        "Errors: " + "; ".join(
            f"{names[p]}: idle {results[p]['ws_errors']} errors ({results[p]['ws_connected']} connected), "
            f"h1 socket errors {results[p]['h1_socket_errors']}, new-conn socket errors {results[p]['new_conn_socket_errors']}, "
            f"h2load {results[p]['grpc_requests']}, rpc passed {results[p]['rpc_passed']}, "
            f"storm passed {results[p]['storm_passed']}"
            + (f" ({results[p]['storm_failures']})" if results[p]['storm_failures'] else "")
            + (f", errors {results[p]['storm_error_kinds']} of {results[p]['storm_operations']} operations" if results[p]['storm_error_kinds'] else "")
            + (f", bulk failures {results[p]['bulk_failures']}" if results[p]['bulk_failures'] else "")
            for p in paths),
    ]
    with open(os.path.join(os.environ["RESULTS"], "latest.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    written.append(os.path.join(os.environ["RESULTS"], "latest.md"))

def k8s_md(res):
    """The Kubernetes API proxy rows as a table, with the targets."""
    cols = [p for p in ("direct", "kas", "edge") if p in res]
    head = {"direct": "API stand-in, direct", "kas": "kas proxy → tunnel → agent", "edge": "kas-edge → kas → tunnel → agent"}
    def cell(p, key, unit=""):
        v = res[p].get(key)
        return "n/a" if v is None else (f"{v:,.0f}{unit}" if abs(v) >= 100 else f"{v:.3f}{unit}")
    def target(ok):
        return "met" if ok else "missed"
    k = res["kas"]
    rows = [
        ("GET p50 ms (open loop, %s/s)" % os.environ["K8S_RATE"], "k8s_p50_ms", ""),
        ("GET p99 ms", "k8s_p99_ms", ""),
        ("added p50 ms (vs direct)", "k8s_added_p50_ms", ""),
        ("added p99 ms (vs direct)", "k8s_added_p99_ms", ""),
        ("GETs/s, %s callers back to back" % os.environ["K8S_CONC"], "k8s_rps", ""),
        ("GETs/s ratio (vs direct)", "k8s_rps_ratio", ""),
        ("watch event delay p99 ms (%s watches, 5 creates/s)" % os.environ["K8S_WATCHES"], "k8s_watch_delay_p99_ms", ""),
        ("tunnels carrying a request at once (peak)", "tunnels_busy_peak", ""),
        ("CPU µs per GET (closed loop): kas pods", "cpu_us_per_get_kas", ""),
        ("CPU µs per GET: the load generator (callers; on tunnel paths also the agents)", "cpu_us_per_get_loadtest", ""),
        ("CPU µs per GET: the stand-ins' process (Kubernetes API, GitLab)", "cpu_us_per_get_standins", ""),
    ]
    if "edge" in res:
        rows.append(("CPU µs per GET: kas-edge", "cpu_us_per_get_edge", ""))
    lines = [
        f"# kas-loadtest bench {os.environ['DATE']}: Kubernetes API proxy",
        "",
        f"One machine ({os.cpu_count()} CPUs), loopback, three kas processes (kas-loadtest-stack), the "
        "proxy in plaintext as behind the edge; the same GET /api/v1/namespaces/default/pods straight to the "
        "Kubernetes API stand-in and through the proxy path.",
        "",
        "| metric | " + " | ".join(head[p] for p in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, key, unit in rows:
        lines.append(f"| {label} | " + " | ".join(cell(p, key, unit) for p in cols) + " |")
    mem_row = [("n/a" if p != "kas" else cell("kas", "k8s_kas_mem_bytes")) for p in cols]
    lines.append("| kas memory per agent, 2 idle tunnels + configuration stream (bytes, %s agents) | " % os.environ["K8S_AGENTS"] + " | ".join(mem_row) + " |")
    if "edge" in res:
        emem = [("n/a" if p != "edge" else cell("edge", "k8s_edge_mem_bytes")) for p in cols]
        lines.append("| edge memory per agent, same (bytes) | " + " | ".join(emem) + " |")
    added, ratio, mem = k.get("k8s_added_p50_ms"), k.get("k8s_rps_ratio"), k.get("k8s_kas_mem_bytes")
    lines += [
        "",
        "Targets (kas path): added p50 ≤ 1 ms: " + ("n/a" if added is None else f"{added:.3f} ms, {target(added <= 1.0)}")
        + "; kas memory per idle agent ≤ 32 KiB: " + ("n/a" if mem is None else f"{mem / 1024:.1f} KiB, {target(mem <= 32768)}")
        + "; GETs/s ≥ 0.5 of direct: " + ("n/a" if ratio is None else f"{ratio:.3f}, {target(ratio >= 0.5)}") + ".",
        "",
        "Runs passed / errors: " + "; ".join(f"{p}: {res[p]['passed']} {res[p]['errors'] or ''}".rstrip() for p in cols)
        + f"; memory run errors: {k.get('k8s_mem_errors') or 'none'}.",
    ]
    return lines

if k8s is not None:
    k8s_lines = k8s_md(k8s)
    with open(os.path.join(os.environ["RESULTS"], "latest-k8s.md"), "w") as f:
        f.write("\n".join(k8s_lines) + "\n")
    print("\n".join(k8s_lines))
    written.append(os.path.join(os.environ["RESULTS"], "latest-k8s.md"))
print("\nwrote " + " and ".join(written))
PY

# The kas fleet (Redis operations at 10,000 agents, cross-pod vs same-pod proxy latency):
# its own measurement with its own pods; FLEET_BENCH=0 skips it.
[ "${FLEET_BENCH:-1}" = 0 ] || bash "$ROOT/loadtest/fleet_bench.sh"
