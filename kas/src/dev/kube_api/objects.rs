//! The JSON documents the stand-in answers with, shaped as kube-apiserver's so that real
//! `kubectl` (and client-go) decode them: version, legacy discovery, pods, tables, watch
//! events and `Status` errors.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::store::PodState;

/// The `gitVersion` the stand-in reports from `/version`.
pub const GIT_VERSION: &str = "v1.33.0-kas-testkit";

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

/// `/api`: a plain `APIVersions` with `Content-Type: application/json`, which makes client-go
/// fall back from aggregated to legacy discovery (it checks the answer's media type).
pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ]
    })
}

/// `/apis`: no API groups beyond the core one.
pub fn api_group_list() -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
}

fn resource(name: &str, kind: &str, namespaced: bool, verbs: &[&str], short: &[&str]) -> Value {
    let mut r = json!({
        "name": name,
        "singularName": "",
        "namespaced": namespaced,
        "kind": kind,
        "verbs": verbs,
    });
    if !short.is_empty() {
        r["shortNames"] = json!(short);
    }
    r
}

/// `/api/v1`: the core resources the stand-in serves.
pub fn core_v1_resources() -> Value {
    let crud = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [
            resource("configmaps", "ConfigMap", true, &crud, &["cm"]),
            resource("namespaces", "Namespace", false, &["get", "list", "watch"], &["ns"]),
            resource("pods", "Pod", true, &crud, &["po"]),
            resource("pods/exec", "PodExecOptions", true, &["create", "get"], &[]),
            resource("pods/log", "Pod", true, &["get"], &[]),
            resource("secrets", "Secret", true, &crud, &[]),
        ]
    })
}

/// RFC 3339 in UTC with second precision, as Kubernetes writes timestamps.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// kubectl's short age form: `45s`, `3m`, `2h`, `5d`.
fn age(since: SystemTime) -> String {
    let s = SystemTime::now()
        .duration_since(since)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7_199 => format!("{}m", s / 60),
        7_200..=172_799 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

pub fn pod(p: &PodState) -> Value {
    let running = p.phase == "Running";
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "uid": p.uid,
            "resourceVersion": p.resource_version.to_string(),
            "creationTimestamp": rfc3339(p.created),
        },
        "spec": {
            "containers": p.containers.iter().map(|c| json!({"name": c, "image": "busybox"})).collect::<Vec<_>>(),
            "nodeName": "node-1",
        },
        "status": {
            "phase": p.phase,
            "containerStatuses": p.containers.iter().map(|c| json!({
                "name": c,
                "ready": running,
                "restartCount": 0,
                "image": "busybox",
                "imageID": "",
                "state": if running { json!({"running": {"startedAt": rfc3339(p.created)}}) } else { json!({"waiting": {"reason": p.phase}}) },
            })).collect::<Vec<_>>(),
        }
    })
}

pub fn pod_list(pods: &[PodState], resource_version: u64) -> Value {
    json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": pods.iter().map(pod).collect::<Vec<_>>(),
    })
}

/// The server-side printing kubectl asks for (`Accept: ...;as=Table;...`): the columns of
/// `kubectl get pods`, each row carrying its object so `-A` can print the namespace.
pub fn pod_table(pods: &[PodState], resource_version: u64) -> Value {
    let column = |name: &str, ty: &str, format: &str| json!({"name": name, "type": ty, "format": format, "description": "", "priority": 0});
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": [
            column("Name", "string", "name"),
            column("Ready", "string", ""),
            column("Status", "string", ""),
            column("Restarts", "string", ""),
            column("Age", "string", ""),
        ],
        "rows": pods.iter().map(|p| {
            let ready = if p.phase == "Running" { p.containers.len() } else { 0 };
            json!({
                "cells": [p.name, format!("{ready}/{}", p.containers.len()), p.phase, "0", age(p.created)],
                "object": pod(p),
            })
        }).collect::<Vec<_>>(),
    })
}

pub fn namespace(name: &str) -> Value {
    json!({
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": format!("ns-{name}"), "resourceVersion": "1"},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

pub fn namespace_list(names: &[String]) -> Value {
    json!({
        "kind": "NamespaceList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "1"},
        "items": names.iter().map(|n| namespace(n)).collect::<Vec<_>>(),
    })
}

/// A `metav1.Status` failure, the body of every error answer.
pub fn status_failure(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}
