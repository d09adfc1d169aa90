#!/usr/bin/env python3
"""Writes kas-edge.json, the Grafana dashboard for kas-edge and kas, next to this file.

    python3 deploy/monitoring/dashboards/generate.py           # rewrite kas-edge.json
    python3 deploy/monitoring/dashboards/generate.py --check   # exit 1 if it is out of date

The JSON is what operators import (Dashboards > New > Import, as is: no `__inputs`; pick
the Prometheus data source in the `datasource` variable). Edit the panels here, not in the
JSON, so the layout stays computed and the e2e test (deploy/monitoring/e2e_test.py) sees
the same queries. Standard library only.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from generated_file import write_or_check  # noqa: E402  (deploy/monitoring/)
OUT = os.path.join(HERE, "kas-edge.json")

DS = {"type": "prometheus", "uid": "${datasource}"}
E = 'instance=~"$edge"'  # edge replicas selected in the `edge` variable
K = 'instance=~"$kas"'  # kas pods selected in the `kas` variable
RI = "$__rate_interval"


def q(expr, legend="", instant=False):
    """One query of a panel."""
    target = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        target["instant"] = True
        target["range"] = False
    return target


def timeseries(title, description, targets, unit="short", width=12, height=8, stack=False, minimum=None):
    defaults = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"], "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "_size": (width, height),
    }


def stat(title, description, target, unit="short", thresholds=None, width=4, height=4):
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}, "noValue": "none"},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value",
            "justifyMode": "auto",
            "orientation": "auto",
        },
        "_size": (width, height),
    }


def red_below(value):
    return [{"color": "red", "value": None}, {"color": "green", "value": value}]


def red_above(warn, crit):
    return [{"color": "green", "value": None}, {"color": "orange", "value": warn}, {"color": "red", "value": crit}]


ROWS = [
    ("Overview", [
        stat("Ready edge replicas", "Edge replicas whose /readyz is 200 (edge_ready).",
             q(f"sum(edge_ready{{{E}}})", instant=True), thresholds=red_below(2)),
        stat("Healthy kas pods (worst edge)",
             "Fewest healthy kas pods any selected edge replica sees (0: that replica answers UNAVAILABLE/503).",
             q(f"min(instance:edge_upstream_healthy_pods:sum{{{E}}})", instant=True), thresholds=red_below(1)),
        stat("Connected agents", "Agent connections on the selected kas pods (kas_connected_agents).",
             q(f"sum(kas_connected_agents{{{K}}})", instant=True)),
        stat("Certificate expires in", "Earliest certificate expiry over the selected edge replicas.",
             q(f"min(edge_tls_certificate_expiry_seconds{{{E}}})", instant=True), unit="dtdurations",
             thresholds=[{"color": "red", "value": None}, {"color": "orange", "value": 3 * 86400},
                         {"color": "green", "value": 14 * 86400}]),
        stat("HTTP 5xx ratio (5m)", "Share of edge requests answered 5xx (recording rule).",
             q("max(job:edge_requests_5xx:ratio_rate5m)", instant=True), unit="percentunit",
             thresholds=red_above(0.01, 0.05)),
        stat("Firing alerts", "kas-edge and kas alerts firing in this Prometheus.",
             q('count(ALERTS{alertstate="firing", component=~"edge|kas"}) or vector(0)', instant=True),
             thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]),
    ]),
    ("Edge: connections and traffic", [
        timeseries("Open connections by protocol",
                   "Downstream connections by negotiated ALPN: h2 = grpcs:// agents, http/1.1 = wss:// agents and plain HTTP.",
                   [q(f"sum by (alpn) (edge_open_connections_by_alpn{{{E}}})", "{{alpn}}"),
                    q(f"sum(edge_open_connections{{{E}}})", "total")]),
        timeseries("Open connections per edge replica", "edge_open_connections by replica.",
                   [q(f"edge_open_connections{{{E}}}", "{{instance}}")]),
        timeseries("Active streams and tunnels", "Open gRPC streams, websocket tunnels and HTTP requests.",
                   [q(f"sum by (protocol) (edge_active_streams{{{E}}})", "{{protocol}}")]),
        timeseries("Requests by protocol and status",
                   "Finished requests/streams per second (101 = websocket; gRPC errors travel inside 200, see gRPC status).",
                   [q(f"sum by (protocol, status) (rate(edge_requests_total{{{E}}}[{RI}]))", "{{protocol}} {{status}}")],
                   unit="reqps"),
        timeseries("gRPC status", "gRPC calls per second by final grpc-status.",
                   [q(f"sum by (grpc_status) (rate(edge_grpc_responses_total{{{E}}}[{RI}]))", "{{grpc_status}}")],
                   unit="reqps"),
        timeseries("Error ratios (5m)", "HTTP 5xx and gRPC UNAVAILABLE as a share of all (recording rules).",
                   [q("job:edge_requests_5xx:ratio_rate5m", "HTTP 5xx {{job}}"),
                    q("job:edge_grpc_unavailable:ratio_rate5m", "gRPC UNAVAILABLE {{job}}")],
                   unit="percentunit", minimum=0),
        timeseries("Time to kas response headers",
                   "p50 and p99 from request to the pod's response headers, by protocol (not stream length).",
                   [q(f"histogram_quantile(0.5, sum by (protocol, le) (rate(edge_upstream_response_seconds_bucket{{{E}}}[{RI}])))",
                      "p50 {{protocol}}"),
                    q(f"histogram_quantile(0.99, sum by (protocol, le) (rate(edge_upstream_response_seconds_bucket{{{E}}}[{RI}])))",
                      "p99 {{protocol}}")],
                   unit="s"),
        timeseries("Body bytes", "Request and response body bytes per second.",
                   [q(f"sum by (direction) (rate(edge_body_bytes_total{{{E}}}[{RI}]))", "{{direction}}")],
                   unit="Bps"),
    ]),
    ("Edge: TLS", [
        timeseries("TLS handshakes", "Started (ClientHello) and completed handshakes per second.",
                   [q(f"sum by (result) (rate(edge_tls_handshakes_total{{{E}}}[{RI}]))", "{{result}}")],
                   unit="ops", width=8),
        timeseries("Handshake failure ratio (5m)", "Handshakes started but not completed (recording rule).",
                   [q("job:edge_tls_handshake_failures:ratio_rate5m", "{{job}}")], unit="percentunit", width=8, minimum=0),
        timeseries("Handshake latency", "p50 and p99 TLS handshake duration.",
                   [q(f"histogram_quantile(0.5, sum by (le) (rate(edge_tls_handshake_seconds_bucket{{{E}}}[{RI}])))", "p50"),
                    q(f"histogram_quantile(0.99, sum by (le) (rate(edge_tls_handshake_seconds_bucket{{{E}}}[{RI}])))", "p99")],
                   unit="s", width=8),
        timeseries("Connections in TLS handshake vs cap",
                   "Connections waiting in the handshake per replica, the configured cap, and those queued for a slot under it.",
                   [q(f"edge_connections_in_handshake{{{E}}}", "in handshake {{instance}}"),
                    q(f"edge_connections_in_handshake_limit{{{E}}}", "cap {{instance}}"),
                    q(f"edge_connections_queued_for_handshake{{{E}}}", "queued {{instance}}")], width=8),
        timeseries("Certificate expiry", "Time until the earliest served certificate expires, per replica.",
                   [q(f"edge_tls_certificate_expiry_seconds{{{E}}}", "{{instance}}")], unit="dtdurations", width=8),
        timeseries("Certificate reloads (totals)", "Certificate reloads since each replica started, by result.",
                   [q(f"sum by (instance, result) (edge_tls_reloads_total{{{E}}})", "{{instance}} {{result}}")], width=8),
    ]),
    ("kas pods as the edge sees them", [
        timeseries("kas pod health (1 = healthy on every edge)",
                   "Worst health-check verdict per kas pod over the selected edge replicas.",
                   [q(f"min by (pod) (edge_upstream_healthy{{{E}}})", "{{pod}}")], minimum=0),
        timeseries("Healthy kas pods per edge replica", "0 = that replica answers UNAVAILABLE/503.",
                   [q(f"instance:edge_upstream_healthy_pods:sum{{{E}}}", "{{instance}}")], minimum=0),
        timeseries("In-flight streams and HTTP/2 connections per kas pod",
                   "Streams open from the edge to each kas pod (what balancing looks at), and the HTTP/2 "
                   "connections their gRPC streams share: one per edge worker, more while those are full "
                   "(idle extras close after 10-20 s).",
                   [q(f"sum by (pod) (edge_upstream_in_flight{{{E}}})", "streams {{pod}}"),
                    q(f"sum by (pod) (edge_upstream_h2_connections{{{E}}})", "h2 connections {{pod}}")]),
        timeseries("Health check and connect failures", "Failed /readiness checks and failed connects per kas pod.",
                   [q(f"sum by (pod) (rate(edge_health_check_failures_total{{{E}}}[{RI}]))", "health {{pod}}"),
                    q(f"sum by (pod) (rate(edge_upstream_connect_failures_total{{{E}}}[{RI}]))", "connect {{pod}}")],
                   unit="ops"),
    ]),
    ("Edge: policies", [
        timeseries("Refusals by reason", "Connections/requests refused per second, by reason and policy source.",
                   [q(f"sum by (reason, source) (rate(edge_policy_blocked_total{{{E}}}[{RI}]))", "{{reason}} ({{source}})")],
                   unit="ops", width=8),
        timeseries("Preview matches and closed connections",
                   "Matches of preview entries (nobody blocked), and established connections cut by a blocklist edit.",
                   [q(f"sum by (source) (rate(edge_policy_preview_matches_total{{{E}}}[{RI}]))", "preview {{source}}"),
                    q(f"sum(rate(edge_policy_closed_connections_total{{{E}}}[{RI}]))", "closed by an edit")],
                   unit="ops", width=8),
        timeseries("Policy reloads (totals)", "Policy file reloads since each replica started, by file and result.",
                   [q(f"sum by (file, result) (edge_policy_reloads_total{{{E}}})", "{{file}} {{result}}"),
                    q(f"sum(edge_blocklist_reload_errors_total{{{E}}})", "rejected blocklist edits")], width=8),
        timeseries("Blocklist entries per replica", "Entries in force, every source together.",
                   [q(f"edge_blocklist_entries{{{E}}}", "{{instance}}")], width=8),
        timeseries("Distinct blocklists across replicas",
                   "Per source, how many different lists the replicas hold (edge_blocklist_content_hash): 1 when "
                   "all agree. The ConfigMap reaches every replica within a second, the file within ~2 minutes.",
                   [q(f'count by (source) (count_values by (source) ("hash", edge_blocklist_content_hash{{{E}}}))',
                      "{{source}}")], minimum=0, width=8),
        timeseries("Blocklist ConfigMap watch", "1 while each replica's watch of the blocklist ConfigMap works.",
                   [q(f"edge_blocklist_watch_up{{{E}}}", "{{instance}}")], minimum=0, width=8),
        timeseries("Blocklist age", "Time since each replica last loaded the blocklist successfully.",
                   [q(f"time() - edge_blocklist_last_reload_timestamp_seconds{{{E}}}", "{{instance}}")], unit="s", width=8),
        timeseries("Rate limiter keys and evictions", "Tracked IPs/token hashes, and keys evicted early per second.",
                   [q(f"edge_ratelimit_tracked_keys{{{E}}}", "keys {{instance}}"),
                    q(f"sum by (instance) (rate(edge_ratelimit_evictions_total{{{E}}}[{RI}]))", "evictions/s {{instance}}")],
                   width=8),
        timeseries("Edge replicas ready and scraped", "edge_ready (1 = accepting) and the scrape's up.",
                   [q(f"edge_ready{{{E}}}", "ready {{instance}}"),
                    q(f'up{{job="kas-edge", {E}}}', "up {{instance}}")], minimum=0),
        timeseries("Access log lines dropped", "Lines the access log could not write, per second.",
                   [q(f"sum by (instance) (rate(edge_access_log_dropped_total{{{E}}}[{RI}]))", "{{instance}}")], unit="ops"),
    ]),
    ("kas", [
        timeseries("Connected agents by transport", "Agent connections by transport over the selected kas pods.",
                   [q(f"sum by (transport) (kas_connected_agents{{{K}}})", "{{transport}}")], width=8),
        timeseries("Connected agents per kas pod", "How evenly agents are spread over the pods.",
                   [q(f"sum by (instance) (kas_connected_agents{{{K}}})", "{{instance}}")], width=8),
        timeseries("Open streams by method", "Long-lived gRPC streams: GetConfiguration, Connect, Echo.",
                   [q(f"sum by (method) (kas_open_streams{{{K}}})", "{{method}}")], width=8),
        timeseries("kas pods ready", "kas_ready per pod (0 from the first moment of shutdown).",
                   [q(f"kas_ready{{{K}}}", "{{instance}}")], width=8, minimum=0),
        timeseries("Token checks by outcome", "Agent token checks per second (cached_* answered without GitLab).",
                   [q(f"sum by (outcome) (rate(kas_auth_results_total{{{K}}}[{RI}]))", "{{outcome}}")], unit="ops", width=8),
        timeseries("Configuration events", "Configurations sent to agents and failures to read one.",
                   [q(f"sum by (event) (rate(kas_agent_configuration_events_total{{{K}}}[{RI}]))", "{{event}}")],
                   unit="ops", width=8),
        timeseries("GitLab API latency", "p50 and p99 of kas's GitLab API calls by endpoint.",
                   [q(f"histogram_quantile(0.5, sum by (endpoint, le) (rate(kas_gitlab_api_request_duration_seconds_bucket{{{K}}}[{RI}])))",
                      "p50 {{endpoint}}"),
                    q(f"histogram_quantile(0.99, sum by (endpoint, le) (rate(kas_gitlab_api_request_duration_seconds_bucket{{{K}}}[{RI}])))",
                      "p99 {{endpoint}}")],
                   unit="s", width=8),
        timeseries("GitLab API calls by outcome", "Calls per second by endpoint and outcome.",
                   [q(f"sum by (endpoint, outcome) (rate(kas_gitlab_api_request_duration_seconds_count{{{K}}}[{RI}]))",
                      "{{endpoint}} {{outcome}}")], unit="reqps", width=8),
        timeseries("GitLab API error ratio (5m)", "Calls failing as unavailable, per endpoint (recording rule).",
                   [q("job_endpoint:kas_gitlab_api_errors:ratio_rate5m", "{{endpoint}}")], unit="percentunit", width=8,
                   minimum=0),
        timeseries("Redis operations by result (fleet)",
                   "kas's Redis operations per second by name and result (ok, error); only pods with [redis].",
                   [q(f"sum by (op, result) (rate(kas_redis_operations_total{{{K}}}[{RI}]))", "{{op}} {{result}}")],
                   unit="ops", width=8),
        timeseries("Kubernetes API proxy routing (fleet)",
                   "Calls routed to a tunnel on the same pod or another pod, and routing timeouts (502).",
                   [q(f"sum by (to) (rate(kas_routed_calls_total{{{K}}}[{RI}]))", "to {{to}}"),
                    q(f"sum(rate(k8s_api_proxy_routing_timeout_total{{{K}}}[{RI}]))", "timeouts")],
                   unit="ops", width=8),
        timeseries("Reverse tunnels by state", "Idle (ready) and busy reverse tunnels agents hold, per state.",
                   [q(f"sum by (state) (kas_reverse_tunnels{{{K}}})", "{{state}}")], width=8),
        timeseries("kas replicas (HPA, kube-state-metrics)", "Current, minimum and maximum replicas of the kas HPA.",
                   [q('kube_horizontalpodautoscaler_status_current_replicas{horizontalpodautoscaler="kas"}', "current {{namespace}}"),
                    q('kube_horizontalpodautoscaler_spec_min_replicas{horizontalpodautoscaler="kas"}', "min {{namespace}}"),
                    q('kube_horizontalpodautoscaler_spec_max_replicas{horizontalpodautoscaler="kas"}', "max {{namespace}}")],
                   width=24),
    ]),
]


def variable(name, label, expr):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": expr,
        "query": {"query": expr, "refId": f"{name}-variable"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "hide": 0,
        "regex": "",
        "options": [],
    }


def build():
    panels = []
    next_id = 1
    y = 0
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row_panels:
            width, height = panel.pop("_size")
            if x + width > 24:
                x = 0
                y += row_height
                row_height = 0
            panel["id"] = next_id
            next_id += 1
            panel["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
            for i, target in enumerate(panel["targets"]):
                target["refId"] = chr(ord("A") + i)
            panels.append(panel)
            x += width
            row_height = max(row_height, height)
        y += row_height
    return {
        "uid": "kas-edge-overview",
        "title": "kas-edge and kas",
        "description": "The edge (kas-edge) and kas: connections, streams, TLS, kas pod health, policies, GitLab API. "
                       "Runbook: deploy/runbook.md. Generated by deploy/monitoring/dashboards/generate.py.",
        "tags": ["kas", "kas-edge"],
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "1m",
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True, "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
                "regex": "",
                "options": [],
            },
            variable("edge", "Edge replica", "label_values(edge_ready, instance)"),
            variable("kas", "kas pod", "label_values(kas_ready, instance)"),
        ]},
        "panels": panels,
    }


def render():
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    write_or_check(__doc__.splitlines()[0], OUT, render)
