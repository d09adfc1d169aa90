# shellcheck shell=bash
# Sourced (through stack.sh) by bench.sh and edge-ab.sh: the kas-edge configuration both
# benchmarks run, in front of three kas pods on loopback, so the numbers they report are of
# the same edge.
#
# edge_toml HTTPS ADMIN HTTP TLS_DIR POD_PREFIX [EXTRA]
#   HTTPS, ADMIN, HTTP: listen addresses (HTTP empty: no plain-HTTP listener);
#   TLS_DIR: where the self-signed certificate goes; POD_PREFIX: the pods' first three
#   octets (pods .1, .2, .3 on the agent port 8150, health on 8151); EXTRA: appended
#   configuration (printf %b: '\n' starts a line).
edge_toml() {
  local https=$1 admin=$2 http=$3 tls_dir=$4 pods=$5 extra=${6:-}
  echo "[listen]"
  echo "https = \"$https\""
  [ -n "$http" ] && echo "http = \"$http\""
  cat <<EOF
admin = "$admin"
threads = 2
[tls]
self_signed = true
hosts = ["localhost"]
self_signed_dir = "$tls_dir"
[discovery]
kind = "static"
endpoints = ["$pods.1:8150", "$pods.2:8150", "$pods.3:8150"]
[health]
port = 8151
[log]
level = "warn"
EOF
  [ -z "$extra" ] || printf '%b\n' "$extra"
}
