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
# Direct means plaintext to a pod (pods do not speak TLS), so the ratios show what the
# proxy costs on top of reaching kas at all.
#
# Knobs (environment): DURATION (s per throughput measurement, default 10), H1_CONNS (64),
# BULK_BYTES (268435456), STORM_AGENTS (5000),
# GRPC_CONNS (8), GRPC_STREAMS (16), NEWCONN_CONNS (16), RPC_RATE (1000), WS_RATE (ramp
# agents/s, 300), WS_AGENTS
# (10000, lowered to what the open-files limit allows: a proxy needs two descriptors per
# tunnel), PATHS ("direct edge nginx haproxy"), SKIP_BUILD=1 to use existing binaries.
# Everything listens on loopback: pods 127.0.1.1-3:8150 (health :8151), GitLab stand-in
# 127.0.0.1:8180, proxies 127.0.5.1 (kas-edge), 127.0.5.2 (nginx), 127.0.5.3 (HAProxy).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
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
PATHS=${PATHS:-direct edge nginx haproxy}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release

log() { echo "bench: $*" >&2; }
die() { log "$*"; exit 1; }

# --- prerequisites ------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v h2load >/dev/null || missing+=(nghttp2-client)
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
for b in kas kas-edge kas-loadtest; do [ -x "$BIN/$b" ] || die "$BIN/$b missing"; done

for addr in 127.0.1.1:8150 127.0.1.2:8150 127.0.1.3:8150 127.0.0.1:8180 127.0.5.1:8443 127.0.5.2:8443 127.0.5.3:8443; do
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
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up"
}
answers_tls() { [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "https://$1/")" != 000 ]; }

# --- kas pods and the GitLab stand-in (one process) ---------------------------------------
log "starting kas pods"
(cd "$WORK" && exec "$BIN/kas" dev --dir "$WORK/dev" >"$WORK/kas.log" 2>&1) &
KAS_PID=$!
PIDS+=("$KAS_PID")
for n in 1 2 3; do wait_for "kas pod $n" curl -fs "http://127.0.1.$n:8151/readiness"; done
TOKEN=$(cat "$WORK/dev/demo-agent-token")

# --- kas-edge (it also generates the certificate everyone uses) ---------------------------
cat >"$WORK/edge.toml" <<EOF
[listen]
https = "127.0.5.1:8443"
http = "127.0.5.1:8080"
admin = "127.0.5.1:8081"
threads = 2
[tls]
self_signed = true
hosts = ["localhost"]
self_signed_dir = "$WORK/tls"
[discovery]
kind = "static"
endpoints = ["127.0.1.1:8150", "127.0.1.2:8150", "127.0.1.3:8150"]
[health]
port = 8151
[log]
level = "warn"
EOF
log "starting kas-edge"
"$BIN/kas-edge" run --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
EDGE_PID=$!
PIDS+=("$EDGE_PID")
edge_healthy() { [ "$(curl -fs http://127.0.5.1:8081/metrics | grep -c '^edge_upstream_healthy{.*} 1$')" = 3 ]; }
wait_for "kas-edge" edge_healthy
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
printf '\0\0\0\0\0' >"$WORK/ping.bin" # one gRPC message: uncompressed, empty PingRequest

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
  # shellcheck disable=SC2086
  local before after; before=$(cost_snapshot $pids)
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

LT=("$BIN/kas-loadtest" --token "$TOKEN" --progress never)
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
    h2load -D "$DURATION" -c "$GRPC_CONNS" -m "$GRPC_STREAMS" -d "$WORK/ping.bin" \
      -H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $TOKEN" \
      "$grpc_url" >"$RAW/$p-grpc.txt" 2>&1
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
  with_cost "$p-storm" "$(pids_of "$p")" run_storm
done

DATE=$(date -u +%Y-%m-%dT%H-%M-%SZ)
NGINX_VERSION=$(nginx -v 2>&1 | head -1) HAPROXY_VERSION=$(haproxy -v 2>&1 | head -1) \
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
    results[p] = {
        "bulk_ws_mbps": (bulk["ws"].get("facts") or {}).get("bulk_mb_per_s") if bulk["ws"].get("passed") else None,
        "bulk_grpc_mbps": (bulk["grpc"].get("facts") or {}).get("bulk_mb_per_s") if bulk["grpc"].get("passed") else None,
        # Every agent back counts even when some reconnects were refused on the way (the
        # edge's handshake cap); the refusals are reported with the errors.
        "storm_s": storm_facts.get("storm_time_until_all_back_s")
        if storm_facts.get("storm_reconnected") == storm_facts.get("storm_agents") else None,
        "storm_cpu_ms_per_agent": round(storm_cpu / 1000, 3) if storm_cpu is not None else None,
        "storm_passed": storm.get("passed"),
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
]
ratios = {}
for p in paths:
    if p == "direct":
        continue
    ratios[p] = {}
    for key, _, _ in metrics:
        d, t = results.get("direct", {}).get(key), results[p].get(key)
        ratios[p][key] = round(t / d, 3) if d and t is not None else None

doc = {
    "date": os.environ["DATE"],
    "machine": {"cpus": os.cpu_count()},
    "versions": {"nginx": os.environ.get("NGINX_VERSION"), "haproxy": os.environ.get("HAPROXY_VERSION")},
    "params": {k.lower(): os.environ[k] for k in ["DURATION", "H1_CONNS", "GRPC_CONNS", "GRPC_STREAMS", "NEWCONN_CONNS", "RPC_RATE", "WS_AGENTS"]},
    "results": results,
    "ratios_through_over_direct": ratios,
}
out = os.path.join(os.environ["RESULTS"], os.environ["DATE"] + ".json")
with open(out, "w") as f:
    json.dump(doc, f, indent=2)

def fmt(v):
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"

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
        + (f", bulk failures {results[p]['bulk_failures']}" if results[p]['bulk_failures'] else "")
        for p in paths),
]
with open(os.path.join(os.environ["RESULTS"], "latest.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {out} and {os.path.join(os.environ['RESULTS'], 'latest.md')}")
PY

# The kas fleet (Redis operations at 10,000 agents, cross-pod vs same-pod proxy latency):
# its own measurement with its own pods; FLEET_BENCH=0 skips it.
[ "${FLEET_BENCH:-1}" = 0 ] || bash "$ROOT/loadtest/fleet_bench.sh"
