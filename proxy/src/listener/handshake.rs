//! Between accept and the end of the TLS handshake: the real client behind a trusted load
//! balancer (PROXY header), admission against per-client and global limits, registration
//! (so a blocklist edit reaches a connection still in its handshake), and a deadline.
//!
//! pingora gives a handshake a fixed 60 s and counts it against nothing; a client that
//! opens thousands of connections and never sends a ClientHello would hold them all. Here
//! each connection is registered before its handshake starts and a small task ends it at
//! `handshake_timeout` (or at once when its client gets blocked) by shutting its socket
//! down, which makes pingora's pending read fail. The connection layer takes the
//! registration over when the handshake completes; a handshake that fails gives its
//! client's slot back the moment pingora drops its socket
//! ([`pingora_compat::on_socket_dropped`]), so a broken client behind a NAT does not hold
//! the slots of the agents sharing its address.
//!
//! The global cap is a queue ([`HandshakeSlots`]): a connection that finds every slot taken
//! waits for one while handshakes keep completing (a reconnect storm), and is refused only
//! when the table stops moving (connections that hold their slots: a flood). A waiting
//! connection is registered already — it counts against its client's cap, a blocklist edit
//! reaches it, and its wait is part of its handshake deadline.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::{Error, ErrorType};

use crate::connection::registry::ConnectionRegistry;
use crate::listener::handshake_slots::{HandshakeSlots, NoSlot};
use crate::pingora_compat;
use crate::policy::Policies;
use crate::telemetry::metrics::EdgeMetrics;

/// Bounds on connections in their TLS handshake.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// From accept (after a PROXY header) to the end of the TLS handshake.
    pub timeout: Duration,
    /// Connections in handshake from every client together: protects the edge when many
    /// addresses attack at once. More wait for a slot ([`HandshakeSlots`]).
    pub max_total: usize,
    /// Connections in handshake from one client.
    pub max_per_client: usize,
}

/// pingora's pre-TLS step for every connection on the TLS port.
pub struct HandshakeLayer {
    pub policies: Arc<Policies>,
    pub registry: Arc<ConnectionRegistry>,
    pub limits: HandshakeLimits,
    pub metrics: EdgeMetrics,
    /// `limits.max_total` slots, shared by every connection on the port.
    pub slots: HandshakeSlots,
}

impl HandshakeLayer {
    fn refuse(&self, reason: &'static str, client: std::net::SocketAddr) -> Box<Error> {
        self.policies.blocked(reason, "limits");
        Error::explain(
            ErrorType::ConnectRefused,
            format!("client {client} refused: {reason}"),
        )
    }

    fn no_slot(&self, no_slot: NoSlot, client: std::net::SocketAddr) -> Box<Error> {
        match no_slot {
            NoSlot::Stalled | NoSlot::QueueFull => self.refuse("handshakes_in_progress", client),
            NoSlot::Deadline => {
                self.metrics
                    .timeouts
                    .with_label_values(&["tls_handshake"])
                    .inc();
                Error::explain(
                    ErrorType::ConnectTimedout,
                    format!("client {client}: handshake deadline passed waiting for a slot"),
                )
            }
        }
    }
}

#[async_trait]
impl PreTlsProcess for HandshakeLayer {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        // Ask the socket directly: reading the digest's peer address would fix it to the
        // load balancer's before the PROXY header can correct it.
        let Some(peer) = pingora_compat::socket_peer(stream) else {
            return Err(Error::explain(ErrorType::SocketError, "no peer address"));
        };
        let client = if self.policies.trusted.contains(peer.ip()) {
            crate::listener::proxy_protocol::read_client(&self.policies, stream, peer).await?
        } else {
            // Direct clients speak TLS at once; a PROXY header from them is not honoured
            // and fails the handshake.
            peer
        };
        let ip = client.ip();
        let deadline = tokio::time::Instant::now() + self.limits.timeout;
        if self.registry.handshakes_from(ip) >= self.limits.max_per_client {
            return Err(self.refuse("client_handshakes_in_progress", client));
        }
        if !self.policies.admit_concurrent(ip) {
            return Err(Error::explain(
                ErrorType::ConnectRefused,
                format!("client {client} refused: concurrent connections"),
            ));
        }
        let Some(socket) = pingora_compat::socket_cookie(stream) else {
            return Err(Error::explain(ErrorType::SocketError, "no socket cookie"));
        };
        let ticket = self.registry.begin_handshake(ip, socket);
        // A failed handshake ends with pingora dropping the socket: its slot is free then.
        // After a completed one the connection layer holds the registration, and this
        // finds nothing to abandon.
        let registry = self.registry.clone();
        pingora_compat::on_socket_dropped(stream, move || {
            registry.abandon_handshake(socket);
        });
        let slot = tokio::select! {
            slot = self.slots.take(deadline) => slot,
            () = ticket.cancelled.cancelled() => {
                self.registry.abandon_handshake(socket);
                return Err(Error::explain(
                    ErrorType::ConnectRefused,
                    format!("client {client} blocked while waiting for a handshake slot"),
                ));
            }
        };
        let slot = match slot {
            Ok(slot) => slot,
            Err(no_slot) => {
                self.registry.abandon_handshake(socket);
                return Err(self.no_slot(no_slot, client));
            }
        };
        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        let fd = pingora_compat::raw_fd(stream);
        tokio::spawn(async move {
            // Held exactly as long as this handshake: this task ends when it does.
            let _slot = slot;
            let reason = tokio::select! {
                // Completed, failed or abandoned: nothing left to bound.
                _ = ticket.over.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => "tls_handshake",
                _ = ticket.cancelled.cancelled() => "blocked",
            };
            if registry.abandon_handshake(socket) {
                // Counted before the peer can see the close.
                if reason == "tls_handshake" {
                    metrics.timeouts.with_label_values(&[reason]).inc();
                }
                pingora_compat::shutdown_socket(fd, socket);
                tracing::debug!(client = %client, reason, "closing a connection in its TLS handshake");
            }
        });
        Ok(())
    }
}
