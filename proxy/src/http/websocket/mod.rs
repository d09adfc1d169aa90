//! Websocket tunnels from agents to kas pods, forwarded by the edge itself.
//!
//! Why not pingora's HTTP/1 proxy loop: pingora 0.9.1 ends an upgraded connection when the
//! pod's `101` is read before the upgrade request's own (empty) body has reached the upstream
//! half of its pipe (cloudflare/pingora#946). The agent then gets the `101`, maybe the pod's
//! first frame, and EOF. On a busy edge that was about one tunnel in a thousand, which for a
//! fleet that holds connections for hours means a steady trickle of pointless reconnects.
//!
//! So for an upgrade request the edge does the handshake with the pod itself: it writes the
//! request head, reads the response head, relays it to the agent, and only a `101` turns the
//! connection into a byte tunnel. The agent's raw connection is then taken out of pingora
//! (with any bytes pingora had already read past the request head) and handed, with the
//! pod's socket, to the connection layer ([`Handoffs`]), which carries it in a small task of
//! its own: pingora's per-request state is freed, and an idle tunnel holds its TLS state,
//! two sockets and a few hundred bytes of buffer (pod reads wait for readiness before they
//! take a buffer).
//!
//! A tunnel is two half-duplex copies joined in one task, agent → pod and pod → agent, each
//! with its own adaptive buffer, so an agent that stops reading stalls only the bytes meant
//! for it: what it sends still reaches the pod. One side's EOF shuts down the edge's write
//! towards the other side (TCP FIN, TLS close_notify) and the other direction continues until
//! it ends, for at most [`DuplexLimits::half_closed`]. A write that makes no progress for
//! [`DuplexLimits::write_stall`] (a peer that stopped reading) ends the tunnel.
//!
//! [`DuplexLimits::half_closed`]: crate::support::duplex::DuplexLimits::half_closed
//! [`DuplexLimits::write_stall`]: crate::support::duplex::DuplexLimits::write_stall
//!
//! A refused upgrade (anything but `101`) is relayed with its status and end-to-end headers
//! and a body read within a bound and re-framed with a correct `Content-Length`.
//!
//! The parts: [`upgrade`] dials the pod and does the handshake, [`refused`] relays a
//! refusal, [`tunnel`] carries an established tunnel with the generic byte pump
//! ([`crate::support::duplex`]); this file joins them ([`relay`]) and names the outcomes.

mod refused;
mod tunnel;
mod upgrade;

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;

pub use super::dial::{HandshakeError, PodDialer};
use crate::pingora_compat;
pub use tunnel::{PendingTunnel, TunnelLimits};
pub use upgrade::{PodAnswer, Upgrade};

/// How a tunnel or refused upgrade ended: the access log's `tunnel_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// The pod answered something other than `101`; it was relayed and the connection closed.
    Refused,
    AgentClosed,
    PodClosed,
    AgentError,
    PodError,
    /// The edge closed it: the client was blocked, or the connection reached its maximum age.
    ClosedByEdge,
}

impl TunnelEnd {
    pub fn label(self) -> &'static str {
        match self {
            TunnelEnd::Refused => "refused",
            TunnelEnd::AgentClosed => "agent_closed",
            TunnelEnd::PodClosed => "pod_closed",
            TunnelEnd::AgentError => "agent_error",
            TunnelEnd::PodError => "pod_error",
            TunnelEnd::ClosedByEdge => "closed_by_edge",
        }
    }
}

/// What the access log reports for a forwarded upgrade. The agent's pingora session is
/// handed over to the tunnel, so its counters cannot be read afterwards.
#[derive(Clone, Copy, Debug)]
pub struct TunnelOutcome {
    /// The status the agent got from the pod.
    pub status: u16,
    /// Bytes from the agent to the pod after the upgrade.
    pub bytes_in: u64,
    /// Bytes from the pod to the agent after the response head.
    pub bytes_out: u64,
    pub end: TunnelEnd,
}

/// Where a forwarded upgrade stands once pingora's part is over.
pub enum RelayOutcome {
    /// Refused by the pod, or failed before the tunnel existed: nothing left to carry.
    Finished(TunnelOutcome),
    /// The `101` is on the wire; the tunnel waits to be carried by its connection
    /// (see [`crate::connection::handoff`]).
    Established(PendingTunnel),
}

/// Relays the pod's answer to the agent. A refusal is relayed with correct framing; after
/// a `101` the agent's connection is taken out of pingora and returned with the pod's,
/// ready to be carried. Errors are reported in the outcome, not propagated: the response is already
/// on the wire.
pub async fn relay(session: &mut Session, answered: PodAnswer) -> RelayOutcome {
    let PodAnswer {
        stream,
        response,
        early,
    } = answered;
    let mut outcome = TunnelOutcome {
        status: response.status.as_u16(),
        bytes_in: 0,
        bytes_out: 0,
        end: TunnelEnd::Refused,
    };
    if response.status != 101 {
        // The agent's connection cannot be reused: the pod may not have finished the body.
        session.set_keepalive(None);
        match refused::relay_refusal(session, response, stream, early).await {
            Ok(sent) => outcome.bytes_out = sent,
            Err(e) => tracing::debug!(error = %e, "relaying a refused upgrade"),
        }
        return RelayOutcome::Finished(outcome);
    }
    // pingora writes (and flushes) the 101, and so knows the session is upgraded.
    if let Err(e) = session
        .write_response_header(Box::new(response), false)
        .await
    {
        tracing::debug!(error = %e, "writing the 101 to the agent");
        outcome.end = TunnelEnd::AgentError;
        return RelayOutcome::Finished(outcome);
    }
    let head = upgrade::encode_request_head(session.req_header());
    let taken = match take_buffered(session).await {
        Ok(pre_read) => pingora_compat::take_h1_stream(session, &head)
            .await
            .map(|agent| (agent, pre_read)),
        Err(e) => Err(e),
    };
    match taken {
        Ok((agent, pre_read)) => RelayOutcome::Established(PendingTunnel {
            agent,
            pod: stream,
            early,
            pre_read,
            status: outcome.status,
        }),
        Err(e) => {
            tracing::warn!(error = %e, "could not take over the agent's connection");
            outcome.end = TunnelEnd::AgentError;
            RelayOutcome::Finished(outcome)
        }
    }
}

/// Bytes the agent sent right behind its upgrade request, without waiting for the `101`,
/// that pingora has already read into the session's buffers: taken now, so they are not
/// dropped with the session, and without waiting on the socket for more.
async fn take_buffered(session: &mut Session) -> io::Result<Bytes> {
    let mut taken = BytesMut::new();
    // Bounded: pingora buffers at most a header's worth; a client streaming fast past
    // that is simply read by the pump instead.
    for _ in 0..16 {
        let read = session.downstream_session.read_request_body();
        // A zero timeout still polls the read once: buffered bytes come back at once.
        match tokio::time::timeout(Duration::ZERO, read).await {
            Ok(Ok(Some(data))) => taken.extend_from_slice(&data),
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => return Err(io::Error::other(e.to_string())),
        }
    }
    Ok(taken.freeze())
}

#[cfg(test)]
mod tests;
