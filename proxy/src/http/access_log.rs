//! One JSON `access` line per request, stream or tunnel, and the request metrics that go
//! with it.
//!
//! The line is an ordinary log event (`target` = `access`, the same JSON format and level
//! filter as every other line). It is written off the request path because the process's
//! logger writes into [`crate::telemetry::log_writer`]'s bounded queue (`main` installs it
//! so), so a log consumer that falls behind costs dropped lines
//! (`edge_access_log_dropped_total`), never a stalled worker thread.

use std::sync::Arc;
use std::time::Instant;

use pingora::proxy::Session;

use super::websocket::TunnelEnd;
use super::{Protocol, RequestCtx};
use prometheus::{Histogram, IntGauge};

use crate::telemetry::metrics::EdgeMetrics;
use crate::upstream::pool::Pod;

/// One access-log line and the request metrics that go with it.
pub(super) struct AccessRecord {
    pub(super) client: Option<std::net::IpAddr>,
    pub(super) protocol: Protocol,
    pub(super) method: http::Method,
    pub(super) path: String,
    pub(super) pod: Option<Arc<Pod>>,
    pub(super) status: u16,
    pub(super) started: Instant,
    pub(super) bytes_in: u64,
    pub(super) bytes_out: u64,
    pub(super) tunnel_end: Option<TunnelEnd>,
}

impl AccessRecord {
    /// The request's part of the line; the caller fills in the byte counts.
    pub(super) fn of(session: &Session, ctx: &RequestCtx, status: u16) -> Self {
        let req = session.req_header();
        Self {
            client: ctx.client,
            protocol: ctx.protocol,
            method: req.method.clone(),
            path: req.uri.path().to_owned(),
            pod: ctx.pod.as_ref().map(|g| g.pod().clone()),
            status,
            started: ctx.started,
            bytes_in: 0,
            bytes_out: 0,
            tunnel_end: ctx.tunnel.map(|t| t.end),
        }
    }

    /// A request's line before anything happened to it (HTTP/2, served by the edge).
    pub(super) fn new(
        client: std::net::IpAddr,
        protocol: Protocol,
        method: &http::Method,
        uri: &http::Uri,
        status: u16,
    ) -> Self {
        Self {
            client: Some(client),
            protocol,
            method: method.clone(),
            path: uri.path().to_owned(),
            pod: None,
            status,
            started: Instant::now(),
            bytes_in: 0,
            bytes_out: 0,
            tunnel_end: None,
        }
    }

    pub(super) fn log(&self, metrics: &EdgeMetrics, error: Option<String>) {
        let protocol = self.protocol.label();
        metrics
            .requests
            .with_label_values(&[protocol, &self.status.to_string()])
            .inc();
        metrics
            .bytes
            .with_label_values(&["from_client"])
            .inc_by(self.bytes_in);
        metrics
            .bytes
            .with_label_values(&["to_client"])
            .inc_by(self.bytes_out);
        self.emit(protocol, error);
    }

    fn emit(&self, protocol: &str, error: Option<String>) {
        tracing::info!(
            target: "access",
            client = self.client.map(|ip| ip.to_string()).unwrap_or_default(),
            protocol,
            method = %self.method,
            path = %self.path,
            pod = self.pod.as_ref().map_or("-", |p| p.label.as_str()),
            status = self.status,
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            tunnel_end = self.tunnel_end.map(TunnelEnd::label),
            error,
        );
    }
}

/// Metric children every request touches, resolved once per server.
pub(super) struct HotMetrics {
    active_grpc: IntGauge,
    active_http: IntGauge,
    latency_grpc: Histogram,
    latency_http: Histogram,
}

impl HotMetrics {
    pub(super) fn new(metrics: &EdgeMetrics) -> Self {
        let active = |p: Protocol| metrics.active.with_label_values(&[p.label()]);
        let latency = |p: Protocol| metrics.upstream_latency.with_label_values(&[p.label()]);
        Self {
            active_grpc: active(Protocol::Grpc),
            active_http: active(Protocol::Http),
            latency_grpc: latency(Protocol::Grpc),
            latency_http: latency(Protocol::Http),
        }
    }

    pub(super) fn active(&self, protocol: Protocol) -> &IntGauge {
        match protocol {
            Protocol::Grpc => &self.active_grpc,
            _ => &self.active_http,
        }
    }

    pub(super) fn latency(&self, protocol: Protocol) -> &Histogram {
        match protocol {
            Protocol::Grpc => &self.latency_grpc,
            _ => &self.latency_http,
        }
    }
}
