//! The observability port: the liveness and readiness probes and the metrics
//! (`/liveness`, `/readiness`, `/metrics` unless `observability.*.url_path` says
//! otherwise). It is separate from the agent port so health checkers and scrapers never
//! queue behind agent traffic, and it stays up through a drain so the edge can watch
//! readiness go 503.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ObservabilityConfig;
use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub(crate) struct Observability {
    ready: Arc<AtomicBool>,
    metrics: Metrics,
    paths: Arc<Paths>,
}

/// The configured paths (validated: distinct, absolute, no query).
struct Paths {
    liveness: String,
    readiness: String,
    metrics: String,
    /// The 404's body, naming the three.
    not_found: Bytes,
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

impl Observability {
    pub fn new(config: &ObservabilityConfig, ready: Arc<AtomicBool>, metrics: Metrics) -> Self {
        let (liveness, readiness, metrics_path) = (
            config.liveness_probe.url_path.clone(),
            config.readiness_probe.url_path.clone(),
            config.prometheus.url_path.clone(),
        );
        let not_found = format!("not found: try {liveness}, {readiness} or {metrics_path}\n");
        Self {
            ready,
            metrics,
            paths: Arc::new(Paths {
                liveness,
                readiness,
                metrics: metrics_path,
                not_found: Bytes::from(not_found),
            }),
        }
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        }
        let path = req.uri().path();
        let paths = &self.paths;
        if path == paths.liveness {
            respond(StatusCode::OK, "text/plain", "ok\n")
        } else if path == paths.readiness {
            if self.ready.load(Ordering::SeqCst) {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "shutting down\n",
                )
            }
        } else if path == paths.metrics {
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(),
            )
        } else {
            respond(StatusCode::NOT_FOUND, "text/plain", paths.not_found.clone())
        }
    }

    pub async fn serve(self, listener: TcpListener, stop: CancellationToken) {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(10));
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "observability accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let this = self.clone();
            let conn = http.serve_connection(
                TokioIo::new(stream),
                service_fn(move |req| {
                    let response = this.answer(&req);
                    async move { Ok::<_, Infallible>(response) }
                }),
            );
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    }
}
