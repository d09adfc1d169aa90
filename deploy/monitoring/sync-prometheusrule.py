#!/usr/bin/env python3
"""Writes deploy/components/monitoring/prometheusrule.yaml from the rules file.

    python3 deploy/monitoring/sync-prometheusrule.py           # rewrite the PrometheusRule
    python3 deploy/monitoring/sync-prometheusrule.py --check   # exit 1 if it is out of date

deploy/monitoring/rules/kas-edge.rules.yaml is the source: promtool tests it and the e2e
test loads it into Prometheus. The PrometheusRule carries the same `groups`, copied as text
(comments included) under `spec:`. Standard library only.
"""

import os
import sys

from generated_file import write_or_check

HERE = os.path.dirname(os.path.abspath(__file__))
RULES = os.path.join(HERE, "rules", "kas-edge.rules.yaml")
OUT = os.path.normpath(os.path.join(HERE, "..", "components", "monitoring", "prometheusrule.yaml"))

HEADER = """\
# GENERATED from deploy/monitoring/rules/kas-edge.rules.yaml by
# deploy/monitoring/sync-prometheusrule.py: edit the rules file and run the script, never
# this file (deploy/validate.sh and deploy/monitoring/test.sh fail when they differ).
# Long lines: the runbook URLs.
# yamllint disable rule:line-length
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: kas-edge
  labels:
    app.kubernetes.io/name: kas-edge
    app.kubernetes.io/component: monitoring
spec:
"""


def render():
    with open(RULES, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        sys.exit(f"{RULES}: no top-level `groups:` line")
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


if __name__ == "__main__":
    write_or_check(__doc__.splitlines()[0], OUT, render)
