//! Every downstream connection, tracked from the TLS handshake to its close.
//!
//! pingora's connection filter sees a connection only at accept and never learns when it
//! closes, and its proxy offers no handle to end a connection from outside. This wraps the
//! proxy's `ServerApp` so each connection is registered by client IP for its whole life:
//! that gives an open-connection gauge, a place for per-client concurrency limits, and a
//! way to close a client's established connections (an operator just blocked it).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::GaugeGuard;
use crate::tunnel::{Handoffs, TunnelEnd};

#[derive(Default)]
struct Entry {
    tokens: HashMap<u64, CancellationToken>,
}

/// Open connections by client IP.
pub struct ConnectionRegistry {
    by_ip: Mutex<HashMap<IpAddr, Entry>>,
    next_id: AtomicU64,
    open: IntGauge,
}

/// Registration of one connection; unregisters on drop.
pub struct ConnectionGuard {
    registry: Arc<ConnectionRegistry>,
    ip: IpAddr,
    id: u64,
    pub cancelled: CancellationToken,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut by_ip = self.registry.lock();
        if let Some(entry) = by_ip.get_mut(&self.ip) {
            entry.tokens.remove(&self.id);
            if entry.tokens.is_empty() {
                by_ip.remove(&self.ip);
            }
        }
        self.registry.open.dec();
    }
}

impl ConnectionRegistry {
    pub fn new(open: IntGauge) -> Arc<Self> {
        Arc::new(Self {
            by_ip: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            open,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.by_ip.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, ip: IpAddr) -> ConnectionGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancelled = CancellationToken::new();
        self.lock()
            .entry(ip)
            .or_default()
            .tokens
            .insert(id, cancelled.clone());
        self.open.inc();
        ConnectionGuard {
            registry: self.clone(),
            ip,
            id,
            cancelled,
        }
    }

    /// Open connections of `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip).map_or(0, |e| e.tokens.len())
    }

    /// Closes every open connection whose client IP matches; returns how many.
    pub fn close_matching(&self, matches: impl Fn(IpAddr) -> bool) -> usize {
        let by_ip = self.lock();
        let mut closed = 0;
        for (ip, entry) in by_ip.iter().filter(|(ip, _)| matches(**ip)) {
            for token in entry.tokens.values() {
                token.cancel();
                closed += 1;
            }
            tracing::info!(client = %ip, connections = entry.tokens.len(), "closing established connections");
        }
        closed
    }
}

/// Connections the edge opens to its own TLS port (the readiness probe: "does pingora
/// accept yet?"). The accept filter drops them without a word, so they neither count as
/// clients nor make pingora log a failed TLS handshake for a probe that never sends one.
#[derive(Default)]
pub struct SelfProbes(Mutex<HashSet<SocketAddr>>);

impl SelfProbes {
    /// True (once) for a connection that came from [`SelfProbes::connect`].
    pub fn take(&self, peer: &SocketAddr) -> bool {
        self.lock().remove(peer)
    }

    /// Connects to `target` from a source address registered first, so the accept filter
    /// can recognise the connection. Succeeds once something listens on `target`.
    pub async fn connect(&self, target: SocketAddr) -> std::io::Result<()> {
        let socket = if target.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let local_ip = if target.is_ipv4() {
            IpAddr::from(std::net::Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        };
        socket.bind(SocketAddr::new(local_ip, 0))?;
        let local = socket.local_addr()?;
        self.lock().insert(local);
        let connected = socket.connect(target).await.map(drop);
        if connected.is_err() {
            self.lock().remove(&local);
        }
        connected
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The client IP of a stream, as pingora recorded it.
pub fn client_ip(stream: &Stream) -> Option<IpAddr> {
    stream
        .get_socket_digest()?
        .peer_addr()?
        .as_inet()
        .map(|a| a.ip())
}

/// The protocol the client and the edge agreed on in the TLS handshake.
fn alpn_label(stream: &Stream) -> &'static str {
    match stream.selected_alpn_proto() {
        Some(pingora::protocols::ALPN::H2) => "h2",
        Some(pingora::protocols::ALPN::H1) => "http/1.1",
        Some(_) => "other",
        None => "none",
    }
}

/// The TLS handshake's duration, as pingora measured it for this connection.
fn tls_handshake_duration(stream: &Stream) -> Option<std::time::Duration> {
    stream
        .get_timing_digest()
        .into_iter()
        .flatten()
        .nth(1)
        .and_then(|tls| tls.establishment_duration)
}

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

/// The proxy application wrapped so each connection is registered for its lifetime and
/// can be ended from outside. It also keeps HTTP/1.1 keep-alive rounds of one connection
/// inside one call, so "the connection" here is the TCP connection, and it carries the
/// websocket tunnels the proxy hands over (see [`crate::tunnel::Handoffs`]).
pub struct Tracked<A> {
    pub inner: Arc<A>,
    pub policies: Arc<crate::policy::Policies>,
    pub metrics: crate::metrics::EdgeMetrics,
    pub max_age: Option<MaxAge>,
    pub handoffs: Arc<Handoffs>,
}

/// Resolves when the edge wants the connection closed: its client was blocked, or it
/// reached its maximum age. Never resolves for an untracked connection without an age.
async fn closed_by_edge(guard: Option<&ConnectionGuard>, deadline: Option<Instant>) {
    let cancelled = async {
        match guard {
            Some(g) => g.cancelled.cancelled().await,
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
            client = guard.map(|g| g.ip.to_string()).unwrap_or_default(),
            "closing a connection at its maximum age"
        ),
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Tracked<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if let Some(handshake) = tls_handshake_duration(&stream) {
            self.metrics
                .tls_handshake_seconds
                .observe(handshake.as_secs_f64());
        }
        let id = stream.id();
        let by_alpn = GaugeGuard::hold(
            self.metrics
                .open_connections_by_alpn
                .with_label_values(&[alpn_label(&stream)]),
        );
        let guard = match client_ip(&stream) {
            Some(ip) => {
                if !self.policies.admit_concurrent(ip) {
                    return None;
                }
                Some(self.policies.registry.register(ip))
            }
            None => None,
        };
        let deadline = self
            .max_age
            .map(|m| Instant::now() + m.pick())
            .filter(|_| guard.is_some());
        let mut stream = stream;
        loop {
            let reusable = tokio::select! {
                reusable = self.inner.process_new(stream, shutdown) => reusable,
                // Dropping the connection's future closes its socket and, for HTTP/2, every
                // stream on it; upstream halves follow as their tasks see the close.
                _ = closed_by_edge(guard.as_ref(), deadline) => {
                    drop(self.handoffs.take(id));
                    return None;
                }
            };
            if let Some(handoff) = self.handoffs.take(id) {
                // pingora's request is over and its state freed; the tunnel continues in a
                // task of its own that holds just what it needs, registration included.
                tokio::spawn(async move {
                    let stop = async {
                        closed_by_edge(guard.as_ref(), deadline).await;
                        TunnelEnd::ClosedByEdge
                    };
                    let outcome = handoff.tunnel.carry(stop).await;
                    (handoff.on_end)(outcome);
                    drop((guard, by_alpn));
                });
                return None;
            }
            match reusable {
                Some(next) if !*shutdown.borrow() => stream = next,
                _ => return None,
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_counts_and_closes_by_ip() {
        let registry = ConnectionRegistry::new(IntGauge::new("open", "open").unwrap());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = registry.register(a);
        let a2 = registry.register(a);
        let b1 = registry.register(b);
        assert_eq!(registry.count(a), 2);
        assert_eq!(registry.open.get(), 3);
        assert_eq!(registry.close_matching(|ip| ip == a), 2);
        assert!(a1.cancelled.is_cancelled() && a2.cancelled.is_cancelled());
        assert!(!b1.cancelled.is_cancelled());
        drop((a1, a2));
        assert_eq!(registry.count(a), 0);
        assert_eq!(registry.open.get(), 1);
    }
}
