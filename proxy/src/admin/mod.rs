//! The edge's own plain-HTTP endpoints, served outside pingora on a small side runtime so
//! they keep answering while pingora's listeners drain. Two listeners with different
//! audiences:
//! - [`private`]: the admin port, `/healthz`, `/readyz` (503 from the first moment of a
//!   drain, and until discovery has produced a first result), `/metrics` — for the kubelet
//!   and Prometheus, never exposed publicly;
//! - [`public`]: the optional `:80` listener, health and ACME paths answered (or relayed to
//!   the replica that runs ACME), everything else redirected to https.

pub mod private;
pub mod public;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::telemetry::metrics::EdgeMetrics;
use crate::upstream::discovery::DiscoveryStatus;
use crate::upstream::pool::Pool;

/// What both listeners answer from: readiness (with the pods and metrics behind it) and,
/// for the public listener, where https is and how ACME challenges are answered.
pub struct AdminState {
    pub ready: AtomicBool,
    pub pool: Arc<Pool>,
    pub metrics: EdgeMetrics,
    /// Whether discovery has produced a first result.
    pub discovery: Arc<DiscoveryStatus>,
    pub https_port: u16,
    /// Set when certificates come from ACME.
    pub acme: Option<Arc<crate::listener::acme::Acme>>,
    /// `host:port` of the replica that runs ACME, for challenges this one cannot answer.
    pub acme_relay: Option<String>,
}

impl AdminState {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    /// Ready while not draining, once discovery has produced a first result and, with
    /// ACME, once a certificate is there to serve.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Err` says why the edge is not ready, for `/readyz`'s body.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err("draining or not yet accepting".into());
        }
        if !self.discovery.is_synced() {
            return Err(match self.discovery.last_error() {
                Some(why) => format!("waiting for the first discovery result: {why}"),
                None => "waiting for the first discovery result".into(),
            });
        }
        if self
            .acme
            .as_ref()
            .is_some_and(|acme| !acme.has_certificate())
        {
            return Err("waiting for the ACME certificate".into());
        }
        Ok(())
    }
}

pub(crate) type Body = Full<Bytes>;
/// A handler's answer; most are immediate, a relayed ACME challenge is not.
pub type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

pub(crate) fn now(response: Response<Body>) -> Reply {
    Box::pin(std::future::ready(response))
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves `handler` on `listener` over HTTP/1.1 until the process ends.
pub async fn serve<F>(listener: TcpListener, handler: F)
where
    F: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let reply = handler(&req);
                async move { Ok::<_, Infallible>(reply.await) }
            }),
        );
        tokio::spawn(conn);
    }
}

/// Binds a fixed-address listener now so a busy port fails start-up with a
/// clear message instead of later inside a task.
pub async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {what} {addr}: {e}"))
}
