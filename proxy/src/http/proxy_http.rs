//! pingora's `ProxyHttp` seam: what the edge's own HTTP/1.1 loop ([`super::h1`]) leaves to
//! pingora. Websocket upgrades become raw tunnels to the least-loaded pod (handed to
//! [`super::websocket`], which does the upgrade itself instead of pingora's HTTP/1 proxy
//! loop); any other request is forwarded over HTTP/1.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;

use super::access_log::AccessRecord;
use super::headers;
use super::refusal::{bad_gateway, bad_request, respond_denied, unavailable};
use super::websocket::{self, PodDialer, RelayOutcome, TunnelEnd, TunnelOutcome};
use super::{Protocol, RequestGate};
use crate::config::UpstreamConfig;
use crate::connection::activity::{ActivityTable, RequestActivity};
use crate::connection::handoff::{Handoff, PendingHandoffs};
use crate::pingora_compat;
use crate::telemetry::metrics::GaugeGuard;
use crate::upstream::connect::{ConnectFailure, Unconnected};
use crate::upstream::pool::PodGuard;

pub struct RequestCtx {
    pub(super) protocol: Protocol,
    pub(super) started: Instant,
    /// The client's address (after PROXY protocol), for the access log.
    pub(super) client: Option<std::net::IpAddr>,
    /// The in-flight slot on the chosen pod, held for the whole stream or tunnel.
    pub(super) pod: Option<PodGuard>,
    attempts: u32,
    upstream_latency_recorded: bool,
    /// Set for websocket upgrades the pod refused (see [`crate::http::websocket`]).
    pub(super) tunnel: Option<TunnelOutcome>,
    /// The upgrade became a tunnel, handed to the connection layer, which logs its end.
    handed_off: bool,
    /// Counts the request in `edge_active_streams` until it ends, whichever way.
    _active: Option<GaugeGuard>,
    /// Keeps the connection's idle clock stopped until the request ends.
    _busy: Option<RequestActivity>,
}

pub struct EdgeProxy {
    pub gate: Arc<RequestGate>,
    pub upstream: UpstreamConfig,
    /// Where established tunnels wait for [`crate::connection::ConnectionLayer`] to carry them.
    pub handoffs: Arc<PendingHandoffs>,
    /// Each connection's idle clock, stopped while a request runs.
    pub activity: Arc<ActivityTable>,
}

/// The bytes a request head takes: method, path and query, header names and values (plus
/// the separators HTTP/1 would put between them, so both protocols count alike).
fn request_head_bytes(req: &pingora::http::RequestHeader) -> usize {
    let line = req.method.as_str().len() + req.uri.path_and_query().map_or(0, |p| p.as_str().len());
    super::gate::head_bytes(line, &req.headers)
}

/// pingora sees HTTP/1.1 only (HTTP/2 goes to [`h2`]), so no request here is gRPC.
fn classify(session: &Session) -> Protocol {
    if session.is_upgrade_req() {
        Protocol::Websocket
    } else {
        Protocol::Http
    }
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            protocol: Protocol::Http,
            started: Instant::now(),
            client: None,
            pod: None,
            attempts: 0,
            upstream_latency_recorded: false,
            tunnel: None,
            handed_off: false,
            _active: None,
            _busy: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        ctx._busy = self
            .activity
            .request_started(pingora_compat::session_cookie(session));
        ctx.protocol = classify(session);
        ctx._active = Some(GaugeGuard::hold(
            self.gate
                .metrics
                .active
                .with_label_values(&[ctx.protocol.label()]),
        ));
        if ctx.protocol == Protocol::Websocket {
            // pingora's HTTP/1 read timeout (60 s) would otherwise also apply to the
            // upgraded tunnel and cut idle agents; dead peers are found by TCP keepalive.
            session.set_read_timeout(None);
            session.set_write_timeout(None);
        }
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.client = client;
        let head = session.req_header();
        let http11 = head.version == http::Version::HTTP_11;
        if let Err(headers::Refused(why)) = headers::check_http1_target(&head.headers, http11) {
            respond_denied(session, ctx.protocol, &bad_request(why)).await;
            return Ok(true);
        }
        if let Some(denial) = self.gate.refused(
            client,
            request_head_bytes(session.req_header()),
            &session.req_header().headers,
        ) {
            respond_denied(session, ctx.protocol, &denial).await;
            return Ok(true);
        }
        if ctx.protocol == Protocol::Websocket {
            self.forward_websocket(session, ctx).await;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        // A retry releases the slot on the pod that failed before taking a new one.
        ctx.pod = None;
        let guard = self
            .gate
            .pool
            .pick()
            .ok_or_else(|| Error::explain(HTTPStatus(503), "no healthy kas pod"))?;
        let route = self.gate.routes.for_path(session.req_header().uri.path());
        let mut peer = HttpPeer::new(guard.pod().port(route).addr, false, String::new());
        let opts = &mut peer.options;
        opts.connection_timeout = Some(self.upstream.connect_timeout);
        opts.read_timeout = None;
        opts.write_timeout = None;
        opts.idle_timeout = Some(Duration::from_secs(60));
        opts.tcp_keepalive = Some(crate::support::keepalive::pingora(
            self.upstream.tcp_keepalive,
        ));
        opts.set_http_version(1, 1);
        ctx.pod = Some(guard);
        Ok(Box::new(peer))
    }

    /// The request as it goes to the pod: end-to-end headers only ([`headers`]).
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        for name in headers::hop_by_hop(&upstream_request.headers, headers::Hop::Http1) {
            upstream_request.remove_header(&name);
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // pingora drives the retry (back to `upstream_peer`); what a failure means is shared.
        let again = match &ctx.pod {
            Some(guard) => self
                .gate
                .connect
                .failed(guard.pod(), ctx.attempts, e.as_ref()),
            None => ctx.attempts < self.gate.connect.max_attempts(),
        };
        if again {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.record_upstream_latency(ctx);
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let code = match e.etype() {
            HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        let already_answered = session.response_written().is_some();
        let error_code = if code == 0 || already_answered {
            code
        } else if code == 503 || code == 502 {
            respond_denied(session, ctx.protocol, &unavailable("kas is unavailable")).await
        } else {
            if let Err(err) = session.respond_error(code).await {
                tracing::debug!(error = %err, "could not write the error response");
            }
            code
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    /// A client that goes away (agents reconnect, cancel streams) is not an edge error;
    /// the access log line still records it.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, error: &Error) -> bool {
        *error.esource() == ErrorSource::Downstream
            && matches!(error.etype(), ConnectionClosed | ReadError | WriteError)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        if ctx.handed_off {
            return; // The tunnel logs when it ends.
        }
        // A relayed upgrade refusal left only a stand-in session behind: its numbers are in ctx.
        let (status, bytes_in, bytes_out) = match &ctx.tunnel {
            Some(t) => (t.status, t.bytes_in, t.bytes_out),
            None => (
                session
                    .response_written()
                    .map(|r| r.status.as_u16())
                    .unwrap_or(0),
                session.body_bytes_read() as u64,
                session.body_bytes_sent() as u64,
            ),
        };
        AccessRecord {
            bytes_in,
            bytes_out,
            ..AccessRecord::of(session, ctx, status)
        }
        .log(&self.gate.metrics, e.map(|e| e.to_string()));
    }
}

/// pingora could not connect to the pod: nothing reached it.
impl ConnectFailure for Error {
    fn pod_unreachable(&self) -> bool {
        true
    }

    fn may_try_another(&self) -> bool {
        true
    }
}

impl EdgeProxy {
    fn record_upstream_latency(&self, ctx: &mut RequestCtx) {
        if !ctx.upstream_latency_recorded {
            ctx.upstream_latency_recorded = true;
            self.gate
                .metrics
                .upstream_latency
                .with_label_values(&[ctx.protocol.label()])
                .observe(ctx.started.elapsed().as_secs_f64());
        }
    }

    /// Forwards a websocket upgrade to the least-loaded pod and, once it answers `101`,
    /// carries the tunnel until either side closes. Connect failures move on to another pod
    /// (nothing reached the first one); any later failure is answered with a 502.
    async fn forward_websocket(&self, session: &mut Session, ctx: &mut RequestCtx) {
        let dialer = PodDialer {
            connect_timeout: self.upstream.connect_timeout,
            response_timeout: self.upstream.upgrade_timeout,
            tcp_keepalive: self.upstream.tcp_keepalive,
        };
        let request = session.req_header().clone();
        let route = self.gate.routes.for_path(request.uri.path());
        let connected = self
            .gate
            .connect
            .connect(&mut ctx.attempts, &mut dialer.upgrade(route, &request))
            .await;
        let answered = match connected {
            Ok((guard, answered)) => {
                ctx.pod = Some(guard);
                answered
            }
            Err(Unconnected::NoPod) => {
                respond_denied(session, ctx.protocol, &unavailable("no healthy kas pod")).await;
                return;
            }
            Err(Unconnected::Failed(guard, e)) => {
                ctx.pod = Some(guard);
                tracing::warn!(error = %e, "websocket upgrade not forwarded");
                let denial = bad_gateway("kas did not answer the upgrade");
                respond_denied(session, ctx.protocol, &denial).await;
                return;
            }
        };
        self.record_upstream_latency(ctx);
        let status = answered.response.status;
        if status.is_informational() && status != 101 {
            // An interim answer is no answer: relayed, it would leave the agent waiting.
            tracing::warn!(
                status = status.as_u16(),
                "pod answered the upgrade with an interim response"
            );
            let denial = bad_gateway("kas answered the upgrade incorrectly");
            respond_denied(session, ctx.protocol, &denial).await;
            return;
        }
        if answered.response.status == 101
            && !pingora_compat::completes_upgrade(session, &answered.response)
        {
            tracing::warn!(pod = %ctx.pod.as_ref().map(|g| g.pod().label.as_str()).unwrap_or("-"),
                "pod answered 101 without a valid upgrade");
            let denial = bad_gateway("kas answered the upgrade incorrectly");
            respond_denied(session, ctx.protocol, &denial).await;
            return;
        }
        match websocket::relay(session, answered).await {
            RelayOutcome::Finished(outcome) => ctx.tunnel = Some(outcome),
            RelayOutcome::Established(pending) => {
                // Carried by the connection layer once pingora's request is over; what the
                // access log needs and what must live as long as the tunnel go with it.
                let mut record = AccessRecord::of(session, ctx, 101);
                let held = (ctx.pod.take(), ctx._active.take());
                let metrics = self.gate.metrics.clone();
                let connection = pending.connection_id();
                self.handoffs
                    .put(Handoff::new(connection, move |stop| async move {
                        let outcome = pending
                            .carry(async {
                                stop.await;
                                TunnelEnd::ClosedByEdge
                            })
                            .await;
                        record.bytes_in = outcome.bytes_in;
                        record.bytes_out = outcome.bytes_out;
                        record.tunnel_end = Some(outcome.end);
                        record.log(&metrics, None);
                        drop(held);
                    }));
                ctx.handed_off = true;
            }
        }
    }
}
