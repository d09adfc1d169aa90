//! The edge's own plain-HTTP endpoints, served outside pingora on a small side runtime so
//! they keep answering while pingora's listeners drain:
//! - the admin port: `/healthz`, `/readyz` (503 from the first moment of a drain), `/metrics`;
//! - the optional `:80` listener: health and ACME paths answered (or relayed to the
//!   replica that runs ACME), everything else redirected to https.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::EdgeMetrics;
use crate::pool::Pool;

/// What the admin endpoints report.
pub struct EdgeState {
    pub ready: AtomicBool,
    pub pool: Arc<Pool>,
    pub metrics: EdgeMetrics,
    pub https_port: u16,
    /// Set when certificates come from ACME.
    pub acme: Option<Arc<crate::acme::Acme>>,
    /// `host:port` of the replica that runs ACME, for challenges this one cannot answer.
    pub acme_relay: Option<String>,
}

impl EdgeState {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }

    /// Ready while not draining and, with ACME, once a certificate is there to serve.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && self.acme.as_ref().is_none_or(|acme| acme.has_certificate())
    }
}

type Body = Full<Bytes>;
/// A handler's answer; most are immediate, a relayed ACME challenge is not.
pub type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

fn now(response: Response<Body>) -> Reply {
    Box::pin(std::future::ready(response))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
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

pub fn admin_handler(state: Arc<EdgeState>) -> impl Fn(&Request<Incoming>) -> Reply {
    move |req| now(admin_response(&state, req))
}

fn admin_response(state: &EdgeState, req: &Request<Incoming>) -> Response<Body> {
    {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if state.is_ready() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
            "/metrics" => {
                let mut r = text(StatusCode::OK, state.metrics.render(&state.pool));
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

/// Builds the https URL for a plain-HTTP request, keeping the host and path.
fn https_location(req: &Request<Incoming>, https_port: u16) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())?;
    // Strip a port, minding IPv6 literals like [::1]:80.
    let name = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if name.is_empty() || name.contains(['/', '@', ' ']) {
        return None;
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    Some(if https_port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{https_port}{path}")
    })
}

/// The user agent of relayed challenge requests; a replica never relays one of those
/// again, so a misconfigured relay cannot loop.
const RELAY_USER_AGENT: &str = "kas-edge-acme-relay";
/// How long the replica that runs ACME may take to answer a relayed challenge.
const RELAY_TIMEOUT: Duration = Duration::from_secs(5);

pub fn redirect_handler(state: Arc<EdgeState>) -> impl Fn(&Request<Incoming>) -> Reply {
    move |req| {
        let path = req.uri().path();
        if path == "/healthz" {
            return now(text(StatusCode::OK, "ok\n"));
        }
        if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
            return acme_challenge(&state, req, token);
        }
        now(match https_location(req, state.https_port) {
            Some(location) => {
                let mut r = text(StatusCode::PERMANENT_REDIRECT, format!("see {location}\n"));
                if let Ok(v) = header::HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r
            }
            None => text(StatusCode::BAD_REQUEST, "missing or invalid Host header\n"),
        })
    }
}

/// Answers an HTTP-01 challenge from this replica's own ACME client or, when another
/// replica runs ACME (the CA's request may reach any replica through the load balancer),
/// relays it there.
fn acme_challenge(state: &EdgeState, req: &Request<Incoming>, token: &str) -> Reply {
    let not_pending = || text(StatusCode::NOT_FOUND, "no ACME challenge pending\n");
    // ACME tokens are base64url; anything else is not worth a relay.
    let plausible = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plausible {
        return now(not_pending());
    }
    if let Some(answer) = state
        .acme
        .as_ref()
        .and_then(|acme| acme.http01_key_authorization(token))
    {
        return now(text(StatusCode::OK, answer));
    }
    let relayed = req
        .headers()
        .get(header::USER_AGENT)
        .is_some_and(|ua| ua == RELAY_USER_AGENT);
    let Some(relay) = state.acme_relay.clone().filter(|_| !relayed) else {
        return now(not_pending());
    };
    let path = req.uri().path().to_owned();
    Box::pin(async move {
        match relay_challenge(&relay, &path).await {
            Some(answer) => text(StatusCode::OK, answer),
            None => not_pending(),
        }
    })
}

async fn relay_challenge(relay: &str, path: &str) -> Option<Bytes> {
    let addr = match tokio::net::lookup_host(relay).await {
        Ok(mut addrs) => addrs.next()?,
        Err(e) => {
            tracing::warn!(relay, error = %e, "cannot resolve tls.acme_challenge_relay");
            return None;
        }
    };
    let answer =
        crate::plain_http::get(addr, relay, path, RELAY_USER_AGENT, RELAY_TIMEOUT, 4096).await;
    match answer {
        Some(answer) if answer.status == StatusCode::OK => {
            tracing::info!(relay, path, "relayed an ACME challenge");
            Some(answer.body)
        }
        other => {
            tracing::warn!(relay, path, status = ?other.map(|a| a.status), "relayed ACME challenge not answered");
            None
        }
    }
}

/// A future for a fixed-address listener, bound now so a busy port fails start-up with a
/// clear message instead of later inside a task.
pub async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {what} {addr}: {e}"))
}

/// Keeps `f` from being dropped if the side runtime is asked to run it detached.
pub fn spawn_named(
    rt: &tokio::runtime::Handle,
    name: &'static str,
    f: impl Future<Output = ()> + Send + 'static,
) {
    rt.spawn(async move {
        f.await;
        tracing::debug!(task = name, "background task ended");
    });
}
