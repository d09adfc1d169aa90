//! Answers that stay open: `?watch=1` (one JSON watch event per chunk, as pods change) and
//! `log?follow=true` (lines as they are logged). Each ends when the client goes, the
//! stand-in stops, its deadline passes, or (logs) the test ends the pod's log.

use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use super::objects;
use super::response::{self, send_chunk, Body};
use super::store::PodEvent;
use super::{query, OpenGuard, State, MAX_STREAM};

/// The log line that ends open `logs -f` streams of a pod (see `KubeApi::end_log`).
pub const END_OF_LOG: &str = "\u{0}end-of-log";

/// `?watch=1` on pods of `namespace` (or all). Without a `resourceVersion` the current pods
/// come first as `ADDED`, as the API server does; with one (kubectl passes its list's),
/// only later changes. `fieldSelector=metadata.name=X` narrows it to one pod.
pub fn watch_pods(
    state: Arc<State>,
    namespace: Option<String>,
    raw_query: &str,
    as_table: bool,
) -> Response<Body> {
    let mut events = state.store.pod_events();
    let from_version: Option<u64> = query::get(raw_query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let only_name = query::get(raw_query, "fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name=").map(str::to_owned));
    let deadline = Instant::now()
        + query::get(raw_query, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(MAX_STREAM)
            .min(MAX_STREAM);
    let matches = move |e: &PodEvent| {
        namespace.as_deref().is_none_or(|ns| e.pod.namespace == ns)
            && only_name.as_deref().is_none_or(|n| e.pod.name == n)
            && from_version.is_none_or(|v| e.pod.resource_version > v)
    };
    let initial: Vec<PodEvent> = match from_version {
        Some(_) => Vec::new(),
        None => state
            .store
            .pods(None)
            .into_iter()
            .map(|pod| PodEvent { kind: "ADDED", pod })
            .filter(|e| matches(e))
            .collect(),
    };
    let (response, tx) = response::streamed("application/json");
    tokio::spawn(async move {
        let _open = OpenGuard::new(&state.watches);
        let mut first = true;
        let mut encode = |e: &PodEvent| {
            let object = if as_table {
                let mut table =
                    objects::pod_table(std::slice::from_ref(&e.pod), e.pod.resource_version);
                // Column definitions on the first event only, as the API server sends them:
                // kubectl prints the header once.
                if !first {
                    table["columnDefinitions"] = json!([]);
                }
                table
            } else {
                objects::pod(&e.pod)
            };
            first = false;
            format!("{}\n", json!({"type": e.kind, "object": object}))
        };
        for e in &initial {
            if !send_chunk(&tx, encode(e)).await {
                return;
            }
        }
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = tokio::time::sleep_until(deadline) => return,
                () = state.shutdown.cancelled() => return,
                () = tx.closed() => return,
            };
            match event {
                Ok(e) if matches(&e) => {
                    if !send_chunk(&tx, encode(&e)).await {
                        return;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    });
    response
}

/// A pod's log; with `follow=true` it stays open and streams lines as they are logged.
pub fn logs(state: Arc<State>, ns: &str, pod: &str, raw_query: &str) -> Response<Body> {
    if state.store.pod(ns, pod).is_none() {
        return response::not_found(&format!("pods \"{pod}\""));
    }
    let follow = query::flag(raw_query, "follow");
    // Subscribe before reading the backlog, so no line falls between the two.
    let mut lines = state.store.log_lines();
    let backlog = state.store.logs(ns, pod);
    if !follow {
        let text: String = backlog
            .iter()
            .filter(|l| *l != END_OF_LOG)
            .map(|l| format!("{l}\n"))
            .collect();
        return response::full(StatusCode::OK, "text/plain", text);
    }
    if backlog.iter().any(|l| l == END_OF_LOG) {
        let text: String = backlog
            .iter()
            .take_while(|l| *l != END_OF_LOG)
            .map(|l| format!("{l}\n"))
            .collect();
        return response::full(StatusCode::OK, "text/plain", text);
    }
    let (ns, pod) = (ns.to_owned(), pod.to_owned());
    let (response, tx) = response::streamed("text/plain");
    tokio::spawn(async move {
        let _open = OpenGuard::new(&state.followers);
        let deadline = Instant::now() + MAX_STREAM;
        for line in backlog {
            if !send_chunk(&tx, format!("{line}\n")).await {
                return;
            }
        }
        loop {
            let line = tokio::select! {
                line = lines.recv() => line,
                () = tokio::time::sleep_until(deadline) => return,
                () = state.shutdown.cancelled() => return,
                () = tx.closed() => return,
            };
            match line {
                Ok(l) if l.namespace == ns && l.pod == pod => {
                    if l.line == END_OF_LOG {
                        return;
                    }
                    if !send_chunk(&tx, format!("{}\n", l.line)).await {
                        return;
                    }
                }
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
    });
    response
}
