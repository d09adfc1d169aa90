//! The admin port: liveness, readiness and metrics.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{now, text, AdminState, Body, Reply, ServeLimits};

/// The admin port's bounds. Its clients are the kubelet and Prometheus, a handful of
/// connections; the bounds only keep a misbehaving one from holding the control plane's
/// runtime busy.
pub fn limits() -> ServeLimits {
    ServeLimits {
        listener: "admin",
        max_connections: 256,
        per_client: None,
        header_timeout: Duration::from_secs(10),
        lifetime: Duration::from_secs(120),
        admit: None,
    }
}

pub fn admin_handler(state: Arc<AdminState>) -> impl Fn(&Request<Incoming>) -> Reply {
    move |req| now(admin_response(&state, req))
}

fn admin_response(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => match state.readiness() {
                Ok(()) => text(StatusCode::OK, "ready\n"),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => {
                state.metrics.ready.set(i64::from(state.is_ready()));
                let mut r = text(StatusCode::OK, state.metrics.render(&state.pool.samples()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "try /healthz, /readyz or /metrics\n"),
        }
    }
}
