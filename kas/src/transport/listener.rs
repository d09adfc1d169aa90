//! The agent port: gRPC over HTTP/2 cleartext and gRPC over a `ws-tunnel` websocket on
//! one listener, both ending in the same tonic router.

use std::convert::Infallible;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;
use tonic::service::Routes;
use tower::ServiceExt;

use super::accept::next_connection;
use crate::config::AgentListenerConfig;
use crate::telemetry::metrics::{GaugeGuard, Metrics};
use crate::transport::wstunnel::{PreAuthLimit, WsByteStream, SUBPROTOCOL};

/// A slow client may take this long to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A peer that does not answer an HTTP/2 PING within this time is dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// After its age is reached a connection has sent GOAWAY and ended its parked streams;
/// calls still running (a Register, a configuration being read) get this long to finish.
const AGE_GRACE: Duration = Duration::from_secs(30);
/// A connection ends at a random point in the last fifth of `max_connection_age`, so
/// agents that connected together (after a rollout) do not all reconnect together.
const AGE_SPREAD: f64 = 0.2;
/// Streams on one HTTP/2 connection (hyper's default, stated) and the flow-control window
/// of each; the connection's window is theirs added up. An edge carries many agents over
/// one connection, and a stream whose handler stops reading (an Echo whose agent takes
/// none of its answers) must fill only its own window, never the one every stream on the
/// connection shares (hyper's default: 1 MiB, one stream's worth).
const H2_MAX_STREAMS: u32 = 200;
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// One agent connection (an HTTP/2 connection or a websocket tunnel), as services see it
/// in the request extensions.
#[derive(Clone, Debug)]
pub(crate) struct AgentConnection {
    /// Cancelled when this connection's parked streams (reverse tunnels, configuration
    /// and GitOps streams) must end with OK: the connection reached its age, or the pod's
    /// drain deadline passed (the token is a child of the pod-wide one).
    pub end: CancellationToken,
    /// Set by the first call GitLab accepts; lifts a websocket tunnel's pre-authentication
    /// message limit.
    pub authenticated: Arc<AtomicBool>,
}

impl AgentConnection {
    fn new(end_streams: &CancellationToken) -> Self {
        Self {
            end: end_streams.child_token(),
            authenticated: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// How long one connection may live: uniformly in `[(1 - AGE_SPREAD) * max, max]`.
pub(crate) fn connection_lifetime(max: Duration) -> Duration {
    use rand::Rng;
    max.mul_f64(rand::rng().random_range((1.0 - AGE_SPREAD)..=1.0))
}

struct ListenerCtx {
    routes: Routes,
    metrics: Metrics,
    /// Cancelled when the drain starts: every connection sends GOAWAY (HTTP/2) or closes
    /// once idle (HTTP/1), while its open streams continue.
    goaway: CancellationToken,
    /// Every connection task, so the drain can wait for them.
    tracker: TaskTracker,
    ws_config: WebSocketConfig,
    /// Largest websocket message before the tunnel's first authenticated call.
    ws_pre_auth_limit: usize,
    h2: hyper::server::conn::http2::Builder<TokioExecutor>,
    max_connection_age: Duration,
    /// The pod-wide token for parked streams; each connection's end token is a child of it.
    end_streams: CancellationToken,
}

/// One per TCP connection: counts it as a gRPC agent once it speaks HTTP/2.
struct ConnCtx {
    listener: Arc<ListenerCtx>,
    grpc_guard: OnceLock<GaugeGuard>,
    conn: AgentConnection,
}

fn text_response(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from_static(text.as_bytes()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    response
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET
        && header_has_token(req.headers(), header::CONNECTION, "upgrade")
        && header_has_token(req.headers(), header::UPGRADE, "websocket")
}

impl ConnCtx {
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        if req.version() == Version::HTTP_2 {
            req.extensions_mut().insert(self.conn.clone());
            self.grpc_guard.get_or_init(|| {
                GaugeGuard::hold(
                    self.listener
                        .metrics
                        .connected_agents
                        .with_label_values(&["grpc"]),
                )
            });
            return self.listener.routes.clone().oneshot(req).await;
        }
        if is_websocket_upgrade(&req) {
            return Ok(self.listener.clone().accept_websocket(req));
        }
        Ok(text_response(
            StatusCode::BAD_REQUEST,
            "this is the kas agent port: speak gRPC over HTTP/2 or open a ws-tunnel websocket\n",
        ))
    }
}

impl ListenerCtx {
    /// Answers the upgrade and, once hyper hands over the socket, serves HTTP/2 inside.
    fn accept_websocket(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let headers = req.headers();
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        {
            let mut r = text_response(
                StatusCode::UPGRADE_REQUIRED,
                "websocket version 13 required\n",
            );
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                header::HeaderValue::from_static("13"),
            );
            return r;
        }
        let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
            return text_response(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
        };
        if !header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL) {
            return text_response(
                StatusCode::BAD_REQUEST,
                "websocket subprotocol ws-tunnel is required\n",
            );
        }
        let accept = derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        self.tracker.clone().spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            // The tunnel is a connection of its own: its own age, parked streams and
            // pre-authentication limit.
            let conn = AgentConnection::new(&self.end_streams);
            let ws = WebSocketStream::from_raw_socket(
                PreAuthLimit::new(
                    TokioIo::new(upgraded),
                    conn.authenticated.clone(),
                    self.ws_pre_auth_limit,
                ),
                Role::Server,
                Some(self.ws_config),
            )
            .await;
            let _guard = GaugeGuard::hold(
                self.metrics
                    .connected_agents
                    .with_label_values(&["websocket"]),
            );
            let routes = {
                let conn = conn.clone();
                self.routes
                    .clone()
                    .map_request(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(conn.clone());
                        req
                    })
            };
            let h2 = self.h2.serve_connection(
                TokioIo::new(WsByteStream::new(ws)),
                TowerToHyperService::new(routes),
            );
            let lifetime = connection_lifetime(self.max_connection_age);
            if let Err(e) = until_goaway(h2, &self.goaway, lifetime, &conn.end, |c| {
                c.graceful_shutdown()
            })
            .await
            {
                tracing::debug!(error = %e, "websocket tunnel ended with an error");
            }
        });
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        h.insert(
            header::UPGRADE,
            header::HeaderValue::from_static("websocket"),
        );
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static(SUBPROTOCOL),
        );
        if let Ok(v) = header::HeaderValue::from_str(&accept) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        response
    }
}

/// Drives a connection. When `goaway` fires (the pod drains), asks it to shut down
/// gracefully and keeps driving it until its last stream is done (the drain deadline ends
/// parked streams through the pod-wide token). When `lifetime` has passed, the same
/// GOAWAY goes out and then `end` ends this connection's parked streams with OK, so the
/// agent calls again on a new connection, possibly to another pod; whatever is still
/// running gets [`AGE_GRACE`].
async fn until_goaway<F, E>(
    conn: F,
    goaway: &CancellationToken,
    lifetime: Duration,
    end: &CancellationToken,
    start_graceful: impl FnOnce(std::pin::Pin<&mut F>),
) -> Result<(), E>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let aged = tokio::select! {
        result = conn.as_mut() => return result,
        _ = goaway.cancelled() => false,
        _ = tokio::time::sleep(lifetime) => true,
    };
    // GOAWAY first, so calls the agent makes after its streams end go to a new connection.
    start_graceful(conn.as_mut());
    if !aged {
        return conn.await;
    }
    tracing::debug!(
        ?lifetime,
        "connection reached its age: GOAWAY sent, ending parked streams"
    );
    end.cancel();
    match tokio::time::timeout(AGE_GRACE, conn).await {
        Ok(result) => result,
        Err(_) => {
            tracing::debug!("aged connection still busy after the grace period; closing it");
            Ok(())
        }
    }
}

/// Handles for draining the agent listener's connections.
#[derive(Clone, Default)]
pub(crate) struct Drain {
    pub goaway: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts agents until `stop` fires. Connections outlive the accept loop; they are
/// drained through `drain`.
pub(crate) async fn serve(
    listener: TcpListener,
    routes: Routes,
    cfg: &AgentListenerConfig,
    metrics: Metrics,
    stop: CancellationToken,
    drain: Drain,
    end_streams: CancellationToken,
) {
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .keep_alive_interval(Some(cfg.keepalive_interval))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(cfg.keepalive_interval))
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_MAX_STREAMS * H2_STREAM_WINDOW);
    let ctx = Arc::new(ListenerCtx {
        routes,
        metrics,
        goaway: drain.goaway.clone(),
        tracker: drain.tracker.clone(),
        ws_config: WebSocketConfig::default()
            .max_message_size(Some(cfg.max_websocket_message_bytes))
            .max_frame_size(Some(cfg.max_websocket_message_bytes)),
        ws_pre_auth_limit: cfg.max_websocket_message_bytes_before_auth,
        h2,
        max_connection_age: cfg.max_connection_age,
        end_streams: end_streams.clone(),
    });
    while let Some((stream, peer)) = next_connection(&listener, &stop, "agent").await {
        let agent_conn = AgentConnection::new(&end_streams);
        let end = agent_conn.end.clone();
        let conn_ctx = Arc::new(ConnCtx {
            listener: ctx.clone(),
            grpc_guard: OnceLock::new(),
            conn: agent_conn,
        });
        let service = service_fn(move |req| conn_ctx.clone().handle(req));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let goaway = drain.goaway.clone();
        // An HTTP/1 connection that upgrades to a websocket ends here at once; the tunnel
        // then has a lifetime of its own.
        let lifetime = connection_lifetime(ctx.max_connection_age);
        drain.tracker.spawn(async move {
            if let Err(e) =
                until_goaway(conn, &goaway, lifetime, &end, |c| c.graceful_shutdown()).await
            {
                tracing::debug!(%peer, error = %e, "agent connection ended with an error");
            }
        });
    }
}
