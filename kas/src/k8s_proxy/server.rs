//! The proxy's listener and its per-request steps: path prefix, CORS, the caller's
//! credential, a tunnel of the agent, then the request through it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use kas_common::metrics::register;
use kas_proto::paths::KUBERNETES_API_MAKE_REQUEST;

use super::auth::{Credential, ProxyAuthorizer};
use super::pipe::{self, ClusterRequest, Unanswered};
use super::status::ProxyError;
use super::{headers, ProxyBody};
use crate::transport::next_connection;
use crate::tunnel::{Meta, Router, TunnelCall};

/// A slow caller may take this long to send its request head (real kas: 10 s).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a replayable request (see [`pipe::replayable`]) is sent again after
/// losing its tunnel before the answer: once covers an agent's connection closing under it;
/// a second loss in a row means something is wrong and the caller should hear of it.
const MAX_REPLAYS: u32 = 1;
/// CORS preflight answers are cached by browsers for a day (as real kas).
const CORS_MAX_AGE: &str = "86400";
const CORS_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH";

#[derive(Clone)]
pub struct K8sProxyMetrics {
    /// Answers by status code (the cluster's, or the proxy's own errors).
    pub responses: IntCounterVec,
    /// Requests sent again through another tunnel after theirs was lost before the answer.
    pub replayed: IntCounter,
}

impl K8sProxyMetrics {
    pub fn new(registry: &Registry) -> Self {
        Self {
            responses: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "kas_k8s_proxy_responses_total",
                        "Kubernetes API proxy answers by HTTP status code and by who answered (cluster, proxy).",
                    ),
                    &["code", "source"],
                )
                .expect("valid metric"),
            ),
            replayed: register(
                registry,
                IntCounter::new(
                    "kas_k8s_proxy_requests_replayed_total",
                    "Idempotent requests without a body sent again through another tunnel because theirs was lost before the cluster's answer began (an agent reconnecting, a pod or edge draining).",
                )
                .expect("valid metric"),
            ),
        }
    }
}

pub struct K8sProxy {
    /// `url_path_prefix`, ending with `/`.
    prefix: String,
    /// GitLab's external URL: the one `Origin` browsers may call from.
    allowed_origin: String,
    authorizer: ProxyAuthorizer,
    /// This pod's tunnels, or the fleet's (this pod, then the pods Redis names).
    router: Arc<dyn Router>,
    metrics: K8sProxyMetrics,
}

impl K8sProxy {
    pub fn new(
        prefix: String,
        gitlab_external_url: &str,
        authorizer: ProxyAuthorizer,
        router: Arc<dyn Router>,
        metrics: K8sProxyMetrics,
    ) -> Self {
        Self {
            prefix,
            allowed_origin: gitlab_external_url.trim_end_matches('/').to_owned(),
            authorizer,
            router,
            metrics,
        }
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let origin = request.headers().get(header::ORIGIN).cloned();
        let (mut response, source) = match self.proxy(request, origin.as_ref()).await {
            Ok(response) => (response, "cluster"),
            Err(e) => {
                if e.code.is_server_error() {
                    tracing::info!(code = e.code.as_u16(), message = %e.message, "k8s-proxy request failed");
                }
                (e.into_response(), "proxy")
            }
        };
        if let Some(origin) = origin.filter(|o| self.origin_allowed(o)) {
            cors_headers(response.headers_mut(), origin);
        }
        self.metrics
            .responses
            .with_label_values(&[response.status().as_str(), source])
            .inc();
        Ok(response)
    }

    fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        origin.as_bytes() == self.allowed_origin.as_bytes()
    }

    async fn proxy(
        &self,
        request: Request<Incoming>,
        origin: Option<&HeaderValue>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let path = request.uri().path();
        let Some(rest) = path.strip_prefix(self.prefix.as_str()) else {
            return Err(ProxyError::bad_request(format!(
                "URL path does not start with the proxy's prefix {:?}",
                self.prefix
            )));
        };
        // The prefix ends with '/', which stays as the path's first character.
        let url_path = format!("/{rest}");
        if let Some(origin) = origin {
            if !self.origin_allowed(origin) {
                return Err(ProxyError::forbidden(
                    "Origin is not allowed: requests from browsers must come from GitLab",
                ));
            }
            if request.method() == Method::OPTIONS {
                return Ok(preflight(request.headers()));
            }
        }
        let query: Vec<(String, String)> = request
            .uri()
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let credential = Credential::from_request(request.headers(), &query)?;
        let authorized = self.authorizer.authorize(&credential).await?;
        let upgrade = headers::upgrade_requested(request.headers());
        let cluster = ClusterRequest {
            method: request.method().as_str().to_owned(),
            url_path,
            headers: headers::request_headers(request.headers().clone()),
            query: headers::request_query(query),
            impersonation: authorized.impersonation,
            upgrade,
        };
        // A request kubectl can safely send twice goes through another tunnel if its own is
        // lost before the answer began: agents reconnect all the time (their pod or edge
        // drains, their connection reaches its age), and an idle tunnel of a connection
        // about to close is as likely to be picked as any.
        let mut replays_left = if pipe::replayable(&request, upgrade) {
            MAX_REPLAYS
        } else {
            0
        };
        loop {
            let call = self.route(authorized.agent_id).await?;
            if replays_left == 0 {
                return pipe::forward(call, request, &cluster)
                    .await
                    .map_err(Unanswered::into_error);
            }
            match pipe::forward_bodiless(call, &cluster).await {
                Err(Unanswered::TunnelLost(e)) => {
                    replays_left -= 1;
                    self.metrics.replayed.inc();
                    tracing::debug!(message = %e.message, "k8s-proxy request replayed through another tunnel");
                }
                answered => return answered.map_err(Unanswered::into_error),
            }
        }
    }

    /// A tunnel of the agent, from this pod or another (waiting up to the routing timeout).
    async fn route(&self, agent_id: i64) -> Result<TunnelCall, ProxyError> {
        self.router
            .route(agent_id, KUBERNETES_API_MAKE_REQUEST, Meta::new())
            .await
            .map_err(|status| pipe::grpc_failure(&status))
    }
}

fn preflight(request: &HeaderMap) -> Response<ProxyBody> {
    let mut response = Response::new(super::empty_body());
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(CORS_METHODS),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(CORS_MAX_AGE),
    );
    response
}

fn cors_headers(h: &mut HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// A TLS handshake must finish within this time (the client's slot is held meanwhile).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the proxy until `stop` (over TLS with `tls`); open connections are tracked by
/// `tracker` and asked to finish (GOAWAY, or close when idle) when `goaway` fires, while
/// their requests — a watch, an exec — run on until the tunnels end them at the drain
/// deadline.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<K8sProxy>,
    stop: CancellationToken,
    goaway: CancellationToken,
    tracker: TaskTracker,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    while let Some((stream, peer)) = next_connection(&listener, &stop, "k8s-proxy").await {
        let (proxy, goaway, builder, tls) =
            (proxy.clone(), goaway.clone(), builder.clone(), tls.clone());
        tracker.spawn(async move {
            let result = match tls {
                None => serve_connection(&builder, stream, proxy, &goaway).await,
                Some(tls) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(&builder, stream, proxy, &goaway).await,
                        Ok(Err(e)) => Err(e.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "k8s-proxy connection ended with an error");
            }
        });
    }
}

async fn serve_connection<IO>(
    builder: &auto::Builder<TokioExecutor>,
    io: IO,
    proxy: Arc<K8sProxy>,
    goaway: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| proxy.clone().handle(req));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        _ = goaway.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}
