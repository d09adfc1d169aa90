//! The agent's side of one tunnel, after its descriptor: idle until a call is routed to it
//! (or its connection ends), then the call's messages both ways, in the order the protocol
//! allows, and then the stream ends — a tunnel carries one call.
//!
//! Towards the agent the order is fixed by construction (`request_info`, `message`*,
//! `close_send`); from the agent it is checked message by message, and a message out of
//! order ends the tunnel with `INVALID_ARGUMENT` and the call with an error.

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use kas_common::metrics::GaugeGuard;
use kas_proto::reverse_tunnel::connect_request::Msg as FromAgentMsg;
use kas_proto::reverse_tunnel::connect_response::Msg as ToAgentMsg;
use kas_proto::reverse_tunnel::{CloseSend, ConnectRequest, ConnectResponse, Message, RequestInfo};

use super::{FromAgent, Registration, Routed, ToAgent};

/// Where the agent's answer is: which message may come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The call was sent; the agent answers with its header (or an error).
    Started,
    /// After the header or a message: more messages, or the trailer.
    Answering,
    /// After the trailer: an error, or the end.
    Trailed,
    /// After an error: only the end.
    Failed,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Started => "the request",
            Stage::Answering => "the header or a message",
            Stage::Trailed => "the trailer",
            Stage::Failed => "the error",
        }
    }

    fn may_end(self) -> bool {
        matches!(self, Stage::Trailed | Stage::Failed)
    }

    /// The next stage after `msg`, and what to tell the caller.
    fn accept(self, msg: Option<FromAgentMsg>) -> Result<(Stage, FromAgent), Status> {
        let (kind, next) = match (&msg, self) {
            (Some(FromAgentMsg::Header(_)), Stage::Started) => ("header", Stage::Answering),
            (Some(FromAgentMsg::Message(_)), Stage::Answering) => ("message", Stage::Answering),
            (Some(FromAgentMsg::Trailer(_)), Stage::Answering) => ("trailer", Stage::Trailed),
            (Some(FromAgentMsg::Error(_)), Stage::Started | Stage::Trailed) => {
                ("error", Stage::Failed)
            }
            (other, stage) => {
                let kind = match other {
                    Some(FromAgentMsg::Descriptor(_)) => "descriptor",
                    Some(FromAgentMsg::Header(_)) => "header",
                    Some(FromAgentMsg::Message(_)) => "message",
                    Some(FromAgentMsg::Trailer(_)) => "trailer",
                    Some(FromAgentMsg::Error(_)) => "error",
                    None => "empty message",
                };
                return Err(Status::invalid_argument(format!(
                    "tunnel message out of order: {kind} after {}",
                    stage.name()
                )));
            }
        };
        let event = match msg {
            Some(FromAgentMsg::Header(h)) => FromAgent::Header(h.meta),
            Some(FromAgentMsg::Message(m)) => FromAgent::Message(m.data.into()),
            Some(FromAgentMsg::Trailer(t)) => FromAgent::Trailer(t.meta),
            Some(FromAgentMsg::Error(e)) => {
                let status = e.status.ok_or_else(|| {
                    Status::invalid_argument(format!("tunnel {kind} without a status"))
                })?;
                FromAgent::Error(Status::new(status.code.into(), status.message))
            }
            _ => unreachable!("only the kinds matched above reach here"),
        };
        Ok((next, event))
    }
}

/// How a tunnel's stream ends.
#[derive(Debug)]
pub enum TunnelEnd {
    /// With OK: the agent left, the connection's age or the drain ended an idle tunnel,
    /// or the call finished.
    Ok,
    /// With this status (the agent broke the protocol, the call was cancelled).
    Status(Status),
}

/// Runs one registered tunnel until it ends. `inbound` is the agent's stream after the
/// descriptor; `outbound` the stream to the agent; `end` fires at the connection's age or
/// the pod's drain deadline; `busy` is held while a call runs.
pub async fn run_tunnel<S>(
    mut registration: Registration,
    mut inbound: S,
    outbound: mpsc::Sender<Result<ConnectResponse, Status>>,
    end: CancellationToken,
    busy: prometheus::IntGauge,
) -> TunnelEnd
where
    S: Stream<Item = Result<ConnectRequest, Status>> + Unpin,
{
    let routed = tokio::select! {
        // A call that has arrived wins over an end that arrives at the same time.
        biased;
        routed = registration.routed() => routed,
        msg = inbound.next() => return match msg {
            Some(Ok(_)) => TunnelEnd::Status(Status::invalid_argument(
                "tunnel message out of order: the agent sent a message on an idle tunnel",
            )),
            // The agent left.
            Some(Err(_)) | None => TunnelEnd::Ok,
        },
        _ = end.cancelled() => return TunnelEnd::Ok,
        _ = outbound.closed() => return TunnelEnd::Ok,
    };
    drop(registration);
    let _busy = GaugeGuard::hold(busy);
    carry(routed, inbound, outbound, end).await
}

async fn carry<S>(
    routed: Routed,
    mut inbound: S,
    outbound: mpsc::Sender<Result<ConnectResponse, Status>>,
    end: CancellationToken,
) -> TunnelEnd
where
    S: Stream<Item = Result<ConnectRequest, Status>> + Unpin,
{
    let Routed {
        method_name,
        meta,
        to_agent,
        from_agent,
    } = routed;
    let fail = |status: Status| {
        let from_agent = from_agent.clone();
        async move {
            let _ = from_agent.send(FromAgent::Error(status)).await;
        }
    };
    let info = ConnectResponse {
        msg: Some(ToAgentMsg::RequestInfo(RequestInfo { method_name, meta })),
    };
    if outbound.send(Ok(info)).await.is_err() {
        fail(Status::unavailable("the agent's tunnel closed")).await;
        return TunnelEnd::Ok;
    }
    let mut to_agent = Some(to_agent);
    let mut stage = Stage::Started;
    loop {
        tokio::select! {
            msg = inbound.next() => match msg {
                Some(Ok(ConnectRequest { msg })) => match stage.accept(msg) {
                    Ok((next, event)) => {
                        stage = next;
                        if from_agent.send(event).await.is_err() && !stage.may_end() {
                            return TunnelEnd::Status(Status::cancelled("the request was cancelled"));
                        }
                    }
                    Err(status) => {
                        fail(Status::unavailable(format!(
                            "the agent broke the tunnel protocol: {}",
                            status.message()
                        )))
                        .await;
                        return TunnelEnd::Status(status);
                    }
                },
                Some(Err(status)) => {
                    fail(Status::unavailable(format!(
                        "the agent's tunnel failed: {}",
                        status.message()
                    )))
                    .await;
                    return TunnelEnd::Ok;
                }
                None if stage.may_end() => return TunnelEnd::Ok,
                None => {
                    fail(Status::unavailable(
                        "the agent closed its tunnel before finishing the answer",
                    ))
                    .await;
                    return TunnelEnd::Ok;
                }
            },
            cmd = recv(&mut to_agent) => {
                let msg = match cmd {
                    Some(ToAgent::Message(data)) => ToAgentMsg::Message(Message { data: data.into() }),
                    Some(ToAgent::CloseSend) => {
                        to_agent = None;
                        ToAgentMsg::CloseSend(CloseSend {})
                    }
                    // The caller went away before it half-closed.
                    None => {
                        to_agent = None;
                        if stage.may_end() {
                            continue;
                        }
                        return TunnelEnd::Status(Status::cancelled("the request was cancelled"));
                    }
                };
                if outbound.send(Ok(ConnectResponse { msg: Some(msg) })).await.is_err() {
                    fail(Status::unavailable("the agent's tunnel closed")).await;
                    return TunnelEnd::Ok;
                }
            }
            _ = from_agent.closed(), if !stage.may_end() => {
                return TunnelEnd::Status(Status::cancelled("the request was cancelled"));
            }
            // The connection's age or the pod's drain: the call ends cleanly here (the
            // caller sees its answer end without an error) rather than being cut when the
            // connection closes.
            _ = end.cancelled() => return TunnelEnd::Ok,
        }
    }
}

/// The next command of the caller; pending once it half-closed.
async fn recv(to_agent: &mut Option<mpsc::Receiver<ToAgent>>) -> Option<ToAgent> {
    match to_agent {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
