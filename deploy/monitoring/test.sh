#!/usr/bin/env bash
# Every check of deploy/monitoring (.ci/test runs it after the cargo tests):
#
#   deploy/monitoring/test.sh                 all checks; needs the debug binaries
#   MONITORING_E2E=0 deploy/monitoring/test.sh   static checks only (no binaries needed)
#
# 1. promtool check rules   (syntax, PromQL, templates of the rules file)
# 2. promtool test rules    (unit tests: which alerts fire, which do not)
# 3. the dashboard and the PrometheusRule are up to date with their sources
# 4. deploy/monitoring/e2e_test.py: a real Prometheus with the shipped rules, scraping the
#    real kas-edge and kas (target/debug, or $CARGO_TARGET_DIR/debug) on loopback.
# Needs prometheus/promtool and openssl (.ci/install installs them) and Python with
# grpcio, grpcio-tools and websockets (.ci/requirements.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

target=${CARGO_TARGET_DIR:-target}
E2E_TIMEOUT=${E2E_TIMEOUT:-300}
passed=0
failed=()
started=$(date +%s)

step() { # name command...
  local name=$1 t0 rc=0
  shift
  echo "== monitoring: $name"
  t0=$(date +%s)
  "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    echo "   ok ($(($(date +%s) - t0)) s)"
  else
    failed+=("$name (exit $rc)")
    echo "   FAILED: $name (exit $rc, $(($(date +%s) - t0)) s)" >&2
  fi
}

for tool in promtool prometheus python3; do
  if ! command -v "$tool" >/dev/null; then
    echo "deploy/monitoring/test.sh: $tool is not installed (run .ci/install)" >&2
    exit 1
  fi
done

step "promtool check rules" promtool check rules deploy/monitoring/rules/kas-edge.rules.yaml
step "promtool test rules" promtool test rules deploy/monitoring/rules/kas-edge.rules.test.yaml
step "dashboard up to date" python3 deploy/monitoring/dashboards/generate.py --check
step "PrometheusRule up to date" python3 deploy/monitoring/sync-prometheusrule.py --check
if [ "${MONITORING_E2E:-1}" != 0 ]; then
  for bin in kas kas-edge; do
    if [ ! -x "$target/debug/$bin" ]; then
      echo "deploy/monitoring/test.sh: $target/debug/$bin is missing: build it first" \
        "(cargo build -p kas-edge -p kas --bins, or cargo test --workspace)" >&2
      exit 1
    fi
  done
  # The test bounds each of its waits; this bounds the whole run (SIGTERM: it cleans up).
  step "end-to-end against real Prometheus, kas-edge and kas" \
    timeout --kill-after=20 "$E2E_TIMEOUT" python3 deploy/monitoring/e2e_test.py \
    --kas "$target/debug/kas" --edge "$target/debug/kas-edge"
fi

echo "== monitoring checks done in $(($(date +%s) - started)) s"
for f in "${failed[@]}"; do echo "  - $f" >&2; done
echo "monitoring: ${passed} passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]
