//! An established tunnel: the agent's raw connection and the pod's socket, carried by a
//! [`Duplex`] in the task of the agent's connection. What is tunnel-specific lives here:
//! which end is the agent and which the pod, the bytes that arrived with the handshake,
//! the edge's own reasons to stop, and the outcome the access log reports.

use std::future::Future;

use bytes::Bytes;
use pingora::protocols::UniqueIDType;
use tokio::net::TcpStream;

use super::{TunnelEnd, TunnelOutcome};
use crate::support::duplex::{Duplex, DuplexEnd, DuplexLimits, Side};

/// Bounds on waiting for a peer of an established tunnel: a write to the agent or the pod
/// that makes no progress, and the pod's last bytes after the agent hung up (or the
/// reverse).
pub type TunnelLimits = DuplexLimits;

/// An established tunnel that nothing carries yet: the agent's raw connection (taken out
/// of its pingora session), the pod's socket and the pod's first bytes.
pub struct PendingTunnel {
    /// The duplex's stream end: TLS, read through a held buffer.
    pub(super) agent: pingora::protocols::Stream,
    /// The duplex's socket end: read only once readable.
    pub(super) pod: TcpStream,
    /// From the pod, right behind its `101`.
    pub(super) early: Bytes,
    /// From the agent, right behind its upgrade request.
    pub(super) pre_read: Bytes,
    pub(super) status: u16,
}

impl PendingTunnel {
    /// The agent connection's id (its socket), the key under which it is handed over.
    pub fn connection_id(&self) -> UniqueIDType {
        self.agent.id()
    }

    /// Carries bytes both ways until both sides are done, one fails, or `stop` (the edge
    /// closing the connection: a block, its maximum age) resolves with the reason.
    pub fn carry(
        self,
        stop: impl Future<Output = TunnelEnd>,
    ) -> impl Future<Output = TunnelOutcome> {
        self.carry_within(TunnelLimits::default(), stop)
    }

    /// [`PendingTunnel::carry`] with explicit limits.
    pub fn carry_within(
        self,
        limits: TunnelLimits,
        stop: impl Future<Output = TunnelEnd>,
    ) -> impl Future<Output = TunnelOutcome> {
        let status = self.status;
        let mut duplex = Duplex::new(self.agent, self.pod, &self.pre_read, &self.early, limits);
        async move {
            let end = tokio::select! {
                end = &mut duplex => tunnel_end(end),
                end = stop => end,
            };
            TunnelOutcome {
                status,
                bytes_in: duplex.carried_to_socket(),
                bytes_out: duplex.carried_to_stream(),
                end,
            }
        }
    }
}

/// The agent is the duplex's stream end, the pod its socket end.
pub(super) fn tunnel_end(end: DuplexEnd) -> TunnelEnd {
    match end {
        DuplexEnd::Closed(Side::Stream) => TunnelEnd::AgentClosed,
        DuplexEnd::Closed(Side::Socket) => TunnelEnd::PodClosed,
        DuplexEnd::Failed(Side::Stream) => TunnelEnd::AgentError,
        DuplexEnd::Failed(Side::Socket) => TunnelEnd::PodError,
    }
}
