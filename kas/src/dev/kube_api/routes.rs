//! Which answer a request gets: discovery, pods (list, watch, get, log, exec), namespaces,
//! created objects, ConfigMaps, the upgrade echo. Every request is recorded first (during an
//! outage it is answered 503 before anything else).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::Value;

use super::record::RecordedRequest;
use super::response::{self, Body};
use super::{configmaps, echo, exec, objects, openapi, query, stream, State, MAX_BODY};

/// How long a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    if state.outage.load(std::sync::atomic::Ordering::SeqCst) {
        return response::failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "outage",
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or_default().to_owned();
    let headers = recorded_headers(req.headers());
    let upgrade = req.headers().contains_key(header::UPGRADE);

    let (parts, incoming) = req.into_parts();
    // The head alone from here; an upgrade stays possible (hyper keeps it in the parts).
    let req = Request::from_parts(parts, ());
    // An upgrade's bytes after the head belong to the upgraded protocol: nothing to record.
    let body = if upgrade {
        Bytes::new()
    } else {
        let limited = Limited::new(incoming, MAX_BODY);
        match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                record(&state, &method, &path, &raw_query, headers, Bytes::new());
                return response::failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "RequestEntityTooLarge",
                    &format!("request body: {e}"),
                );
            }
            Err(_) => {
                record(&state, &method, &path, &raw_query, headers, Bytes::new());
                return response::failure(
                    StatusCode::REQUEST_TIMEOUT,
                    "Timeout",
                    "request body too slow",
                );
            }
        }
    };
    record(&state, &method, &path, &raw_query, headers, body.clone());

    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // kubectl asks for server-side printing (`as=Table`) on get and get -w.
    let as_table = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("as=Table"));
    let watch = query::flag(&raw_query, "watch");

    match (&method, segments.as_slice()) {
        (_, ["upgrade-echo"]) => echo::handle(&state, req),
        (&Method::GET, ["version"]) => response::json(StatusCode::OK, &objects::version()),
        (&Method::GET, ["api"]) => response::json(
            StatusCode::OK,
            &objects::api_versions(&state.server_address),
        ),
        (&Method::GET, ["openapi", "v3"]) => response::json(StatusCode::OK, &openapi::index()),
        (&Method::GET, ["openapi", "v3", "api", "v1"]) => {
            response::json(StatusCode::OK, &openapi::core_v1())
        }
        (&Method::GET, ["apis"]) => response::json(StatusCode::OK, &objects::api_group_list()),
        (&Method::GET, ["api", "v1"]) => {
            response::json(StatusCode::OK, &objects::core_v1_resources())
        }
        (&Method::GET, ["api", "v1", "namespaces"]) => response::json(
            StatusCode::OK,
            &objects::namespace_list(&state.store.namespaces()),
        ),
        (&Method::GET, ["api", "v1", "namespaces", ns]) => {
            if state.store.namespaces().iter().any(|n| n == ns) {
                response::json(StatusCode::OK, &objects::namespace(ns))
            } else {
                response::not_found(&format!("namespaces \"{ns}\""))
            }
        }
        (&Method::GET, ["api", "v1", "pods"]) if watch => {
            stream::watch_pods(state.clone(), None, &raw_query, as_table)
        }
        (&Method::GET, ["api", "v1", "pods"]) => list_pods(&state, None, as_table),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) if watch => {
            stream::watch_pods(state.clone(), Some(ns.to_string()), &raw_query, as_table)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            list_pods(&state, Some(ns), as_table)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "pods"]) => create_pod(&state, ns, &body),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match state.store.pod(ns, name) {
                Some(p) if as_table => response::json(
                    StatusCode::OK,
                    &objects::pod_table(&[p], state.store.resource_version()),
                ),
                Some(p) => response::json(StatusCode::OK, &objects::pod(&p)),
                None => response::not_found(&format!("pods \"{name}\"")),
            }
        }
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match state.store.pod(ns, name) {
                Some(p) if state.store.delete_pod(ns, name) => {
                    response::json(StatusCode::OK, &objects::pod(&p))
                }
                _ => response::not_found(&format!("pods \"{name}\"")),
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name, "log"]) => {
            stream::logs(state.clone(), ns, name, &raw_query)
        }
        (&Method::GET | &Method::POST, ["api", "v1", "namespaces", ns, "pods", name, "exec"]) => {
            exec::handle(state.clone(), ns, name, &raw_query, req)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps"]) if watch => {
            configmaps::watch(&state, ns, &raw_query)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps"]) => {
            configmaps::list(&state, Some(ns), &raw_query)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            configmaps::get(&state, ns, name).await
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "configmaps"]) => {
            match parse_object(&body) {
                Ok((object, name)) => configmaps::create(&state, ns, &name, object),
                Err(response) => *response,
            }
        }
        (&Method::PUT, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            match parse_object(&body) {
                Ok((object, _)) => configmaps::update(&state, ns, name, object),
                Err(response) => *response,
            }
        }
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            configmaps::delete(&state, ns, name)
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, resource]) => {
            create_object(&state, resource, ns, &body)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, resource]) => {
            list_objects(&state, resource, Some(ns))
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, resource, name]) => {
            match state.store.object(resource, ns, name) {
                Some(object) => response::json(StatusCode::OK, &object),
                None => response::not_found(&format!("{resource} \"{name}\"")),
            }
        }
        _ => response::failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({method} {path})"),
        ),
    }
}

fn recorded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn record(
    state: &State,
    method: &Method,
    path: &str,
    query: &str,
    headers: Vec<(String, String)>,
    body: Bytes,
) {
    state.recorder.push(RecordedRequest {
        method: method.to_string(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers,
        body,
    });
}

fn list_pods(state: &State, namespace: Option<&str>, as_table: bool) -> Response<Body> {
    // The version first: a watch from it then misses no change made after the list.
    let rv = state.store.resource_version();
    let pods = state.store.pods(namespace);
    let doc = if as_table {
        objects::pod_table(&pods, rv)
    } else {
        objects::pod_list(&pods, rv)
    };
    response::json(StatusCode::OK, &doc)
}

/// The object in a create's body and its name; the error answer otherwise (boxed: an
/// answer is large next to the object).
fn parse_object(body: &[u8]) -> Result<(Value, String), Box<Response<Body>>> {
    let object: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the body is not a JSON object: {e}"),
        ))
    })?;
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| {
            Box::new(response::failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value",
            ))
        })?;
    Ok((object, name))
}

fn create_pod(state: &State, ns: &str, body: &[u8]) -> Response<Body> {
    let (object, name) = match parse_object(body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    if state.store.pod(ns, &name).is_some() {
        return response::failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("pods \"{name}\" already exists"),
        );
    }
    let containers: Vec<String> = object
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let containers: Vec<&str> = if containers.is_empty() {
        vec![super::CONTAINER]
    } else {
        containers.iter().map(String::as_str).collect()
    };
    state.store.put_pod(ns, &name, "Running", &containers);
    match state.store.pod(ns, &name) {
        Some(p) => response::json(StatusCode::CREATED, &objects::pod(&p)),
        None => response::not_found(&format!("pods \"{name}\"")),
    }
}

fn create_object(state: &State, resource: &str, ns: &str, body: &[u8]) -> Response<Body> {
    let (object, name) = match parse_object(body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    match state.store.create(resource, ns, object) {
        Ok(stored) => response::json(StatusCode::CREATED, &stored),
        Err(super::store::CreateError::AlreadyExists) => response::failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{resource} \"{name}\" already exists"),
        ),
    }
}

fn list_objects(state: &State, resource: &str, ns: Option<&str>) -> Response<Body> {
    let kind = match resource {
        "secrets" => "SecretList",
        _ => return response::not_found(&format!("resource {resource}")),
    };
    response::json(
        StatusCode::OK,
        &serde_json::json!({
            "kind": kind,
            "apiVersion": "v1",
            "metadata": {"resourceVersion": state.store.resource_version().to_string()},
            "items": state.store.objects(resource, ns),
        }),
    )
}
