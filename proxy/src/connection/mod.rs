//! Layer 3: every downstream connection, tracked from the TLS handshake to its close.
//!
//! pingora's connection filter sees a connection only at accept and never learns when it
//! closes, and its proxy offers no handle to end a connection from outside. This wraps the
//! proxy's `ServerApp` so each connection is registered by client IP for its whole life
//! ([`registry`]): that gives an open-connection gauge, a place for per-client concurrency
//! limits, and a way to close a client's established connections (an operator just
//! blocked it). It also carries the work requests hand to their connection ([`handoff`]).

pub mod activity;
pub mod handoff;
pub mod registry;

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use tokio::time::Instant;

use crate::pingora_compat;
use crate::policy::Policies;
use crate::telemetry::metrics::{EdgeMetrics, GaugeGuard};
use activity::{Activity, ActivityTable};
use handoff::PendingHandoffs;
use registry::{ConnectionGuard, ConnectionRegistry};

/// Optional bound on a connection's life, so load spreads again after a scale-out:
/// `age` plus up to `jitter` of it at random, so connections opened together (after a
/// restart) do not all close together.
#[derive(Debug, Clone, Copy)]
pub struct MaxAge {
    pub age: std::time::Duration,
    pub jitter: f64,
}

impl MaxAge {
    fn pick(&self) -> std::time::Duration {
        let extra = rand::random::<f64>() * self.jitter.clamp(0.0, 1.0);
        self.age + self.age.mul_f64(extra)
    }
}

/// What the edge's HTTP servers need to know of the connection they serve.
pub struct ClientConnection {
    /// The client's address (after a PROXY header).
    pub client: std::net::IpAddr,
    /// Stopped while a stream is open (see [`activity`]).
    pub activity: Arc<Activity>,
    /// Flips when the edge starts draining (an HTTP/1 connection closes after the
    /// request in flight).
    pub shutdown: ShutdownWatch,
    /// This connection's moment in the drain: time for its GOAWAY.
    pub drain: DrainMoment,
}

/// When, in a drain, a connection is asked to leave: at a random moment within the drain
/// spread, chosen per connection, so agents reconnect (to the other replicas, or to the
/// process that took the sockets over) a few at a time across the drain instead of all at
/// once. An HTTP/2 connection gets its GOAWAY then (new calls go to a new connection; the
/// open streams get [`STREAMS_AFTER_GOAWAY`]); a tunnel is closed then. With no spread,
/// every connection's moment is the drain's start (GOAWAY at once, nothing forced to
/// close before the drain deadline).
#[derive(Clone)]
pub struct DrainMoment {
    shutdown: ShutdownWatch,
    delay: std::time::Duration,
    spread: bool,
}

/// How long the streams of an HTTP/2 connection that got its GOAWAY in a spread drain
/// may continue before the connection is closed: in-flight calls finish; agents' long
/// streams (configuration watches, tunnels) are then re-opened on their new connection.
pub const STREAMS_AFTER_GOAWAY: std::time::Duration = std::time::Duration::from_secs(2);

impl DrainMoment {
    /// A random moment within `spread` after the drain begins.
    pub fn pick(shutdown: ShutdownWatch, spread: std::time::Duration) -> Self {
        Self {
            shutdown,
            delay: spread.mul_f64(rand::random::<f64>()),
            spread: !spread.is_zero(),
        }
    }

    /// Resolves at this connection's moment; never before the drain begins (never at all
    /// if the server goes away without one).
    pub async fn reached(&self) {
        let mut shutdown = self.shutdown.clone();
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                // The server is gone: that is a drain as well.
                break;
            }
        }
        tokio::time::sleep(self.delay).await;
    }

    /// Resolves when the edge closes the connection itself, `after` its moment; never
    /// without a spread (the drain deadline ends what is left).
    async fn closes(self, after: std::time::Duration) {
        if !self.spread {
            return std::future::pending().await;
        }
        self.reached().await;
        tokio::time::sleep(after).await;
        tracing::debug!("closing a connection during the drain");
    }
}

/// Serves the requests of one connection that chose HTTP/2 in its TLS handshake, until
/// the connection ends. The connection layer around it owns the connection's limits
/// (blocks, maximum age, idle deadline, drain spread) and ends the future to apply them.
#[async_trait]
pub trait ServeHttp2: Send + Sync + 'static {
    async fn serve(&self, stream: Stream, connection: ClientConnection);
}

/// Serves the HTTP/1.1 requests of one connection it can serve itself, and returns the
/// connection (with what it read of the next request put back) for pingora to serve the
/// rest: websocket upgrades and anything unusual. `None`: the connection is done.
#[async_trait]
pub trait ServeHttp1: Send + Sync + 'static {
    async fn serve(&self, stream: Stream, connection: ClientConnection) -> Option<Stream>;
}

/// The proxy application wrapped so each connection is registered for its lifetime, can
/// be ended from outside (a block, its maximum age) and carries the tunnels its requests
/// hand over. HTTP/2 connections go to `h2`; HTTP/1.1 ones to `h1`, which may hand them
/// on to pingora's proxy (`inner`, which runs the remaining keep-alive rounds inside one
/// `process_new` call). Either way "the connection" here is the TCP connection.
pub struct ConnectionLayer<A> {
    pub inner: Arc<A>,
    pub h2: Arc<dyn ServeHttp2>,
    pub h1: Arc<dyn ServeHttp1>,
    pub policies: Arc<Policies>,
    pub registry: Arc<ConnectionRegistry>,
    pub metrics: EdgeMetrics,
    pub max_age: Option<MaxAge>,
    pub handoffs: Arc<PendingHandoffs>,
    pub activity: Arc<ActivityTable>,
    pub idle: IdleLimits,
    /// Connections still open when the drain begins close at a random moment within
    /// this long (zero: never before the drain deadline).
    pub drain_spread: std::time::Duration,
}

/// How long a connection may wait on its client with nothing in flight
/// (see [`activity`]).
#[derive(Debug, Clone, Copy)]
pub struct IdleLimits {
    pub request_head: std::time::Duration,
    pub keepalive: std::time::Duration,
    pub h2_idle: std::time::Duration,
}

/// Resolves when the edge wants the connection closed: its client was blocked, or it
/// reached its maximum age. Never resolves for an untracked connection without an age.
fn closed_by_edge(
    guard: Option<&ConnectionGuard>,
    deadline: Option<Instant>,
) -> impl Future<Output = ()> + Send + 'static {
    let cancelled = guard.map(|g| g.cancelled.clone());
    let client = guard.map(|g| g.ip);
    async move {
        let cancelled = async {
            match cancelled {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let expired = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancelled => {}
            _ = expired => tracing::info!(
                client = client.map(|ip| ip.to_string()).unwrap_or_default(),
                "closing a connection at its maximum age"
            ),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ConnectionLayer<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if let Some(handshake) = pingora_compat::tls_handshake_duration(&stream) {
            self.metrics
                .tls_handshake_seconds
                .observe(handshake.as_secs_f64());
        }
        let id = stream.id();
        let by_alpn = GaugeGuard::hold(
            self.metrics
                .open_connections_by_alpn
                .with_label_values(&[pingora_compat::alpn_label(&stream)]),
        );
        // Registered (and admitted against the limits) before its handshake started.
        let socket = pingora_compat::connection_cookie(&stream)?;
        let guard = self.registry.finish_handshake(socket)?;
        if self.policies.blocklisted(guard.ip) {
            // Blocked by an edit while in its handshake: that edit's sweep may have
            // missed it, this check cannot.
            self.metrics.established_closed.inc();
            tracing::info!(client = %guard.ip, "closing a connection blocked during its handshake");
            return None;
        }
        let client = guard.ip;
        let guard = Some(guard);
        let h2 = pingora_compat::alpn_label(&stream) == "h2";
        let activity = if h2 {
            // Agents open their first stream at once; a connection that opens none gets no
            // longer than an HTTP/1 client gets for its first request head.
            let first = self.idle.request_head.min(self.idle.h2_idle);
            Activity::new(first, self.idle.h2_idle)
        } else {
            Activity::new(self.idle.request_head, self.idle.keepalive)
        };
        // pingora's requests find their connection's clock by socket; the HTTP/2 server is
        // handed it.
        let _tracked = (!h2).then(|| self.activity.track(socket, activity.clone()));
        let deadline = self
            .max_age
            .map(|m| Instant::now() + m.pick())
            .filter(|_| guard.is_some());
        // Either server returns only when the connection is done with it: after the last
        // keep-alive request, the last HTTP/2 stream, or a request that handed its
        // connection over (a websocket tunnel). pingora never returns a stream to reuse.
        // Closing every open agent connection at the drain deadline would make thousands
        // of agents reconnect in the same second: each has its own moment.
        let drain = DrainMoment::pick(shutdown.clone(), self.drain_spread);
        let served = async {
            let connection = ClientConnection {
                client,
                activity: activity.clone(),
                shutdown: shutdown.clone(),
                drain: drain.clone(),
            };
            if h2 {
                self.h2.serve(stream, connection).await;
            } else if let Some(rest) = self.h1.serve(stream, connection).await {
                self.inner.process_new(rest, shutdown).await;
            }
        };
        tokio::select! {
            _ = served => {}
            // Dropping the connection's future closes its socket and, for HTTP/2, every
            // stream on it; upstream halves follow as their tasks see the close.
            _ = closed_by_edge(guard.as_ref(), deadline) => {
                drop(self.handoffs.take(id));
                return None;
            }
            _ = drain.clone().closes(if h2 { STREAMS_AFTER_GOAWAY } else { std::time::Duration::ZERO }) => {
                drop(self.handoffs.take(id));
                return None;
            }
            _ = activity.expired() => {
                let stage = match (h2, activity.requests_started()) {
                    (_, 0) => "request_head",
                    (true, _) => "h2_idle",
                    (false, _) => "keepalive",
                };
                self.metrics.timeouts.with_label_values(&[stage]).inc();
                tracing::debug!(stage, "closing a connection that waited too long on its client");
                drop(self.handoffs.take(id));
                return None;
            }
        }
        if let Some(handoff) = self.handoffs.take(id) {
            // pingora's request is over and its state freed; the tunnel continues in a
            // task of its own that holds just what it needs, registration included.
            let by_edge = closed_by_edge(guard.as_ref(), deadline);
            let by_drain = drain.closes(std::time::Duration::ZERO);
            let stop = Box::pin(async move {
                tokio::select! {
                    _ = by_edge => {}
                    _ = by_drain => {}
                }
            });
            tokio::spawn(async move {
                handoff.carry(stop).await;
                drop((guard, by_alpn));
            });
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
