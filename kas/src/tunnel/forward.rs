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

/// One registered tunnel as the stream of what kas sends the agent: `inbound` is the
/// agent's stream after the descriptor; `end` fires at the connection's age or the pod's
/// drain deadline; `busy` is held while a call runs; `hold` lives as long as the tunnel.
///
/// The stream *is* the tunnel: the HTTP/2 stream sending it to the agent polls it, and
/// polling it reads the agent's messages too. An idle tunnel is therefore no task and no
/// channel of its own — only its registration, parked in the registry — and a call's
/// messages to the agent go from the caller's channel straight into the HTTP/2 stream.
/// It ends with OK (the stream ends) or with the status the tunnel ends with (an `Err`
/// item, then the end). If it is dropped before it ended (the agent reset the stream or
/// its connection broke), a call it carries hears that the tunnel closed.
pub fn tunnel_stream<S, H>(
    registration: Registration,
    inbound: S,
    end: CancellationToken,
    busy: prometheus::IntGauge,
    hold: H,
) -> impl Stream<Item = Result<ConnectResponse, Status>> + Send + 'static
where
    S: Stream<Item = Result<ConnectRequest, Status>> + Unpin + Send + 'static,
    H: Send + 'static,
{
    let driver = Driver {
        agent_id: registration.agent_id(),
        inbound,
        end,
        phase: Phase::Idle { registration, busy },
        _hold: hold,
    };
    futures_util::stream::unfold(driver, |mut driver| async move {
        let item = driver.next().await?;
        Some((item, driver))
    })
}

/// Runs one registered tunnel until it ends, sending what goes to the agent into
/// `outbound` (for tests that drive a tunnel by hand; kas serves [`tunnel_stream`]).
#[cfg(test)]
pub(super) async fn run_tunnel<S>(
    registration: Registration,
    inbound: S,
    outbound: mpsc::Sender<Result<ConnectResponse, Status>>,
    end: CancellationToken,
    busy: prometheus::IntGauge,
) -> TunnelEnd
where
    S: Stream<Item = Result<ConnectRequest, Status>> + Unpin + Send + 'static,
{
    let stream = tunnel_stream(registration, inbound, end, busy, ());
    tokio::pin!(stream);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(msg)) => {
                    if outbound.send(Ok(msg)).await.is_err() {
                        return TunnelEnd::Ok;
                    }
                }
                Some(Err(status)) => return TunnelEnd::Status(status),
                None => return TunnelEnd::Ok,
            },
            _ = outbound.closed() => return TunnelEnd::Ok,
        }
    }
}

struct Driver<S, H> {
    agent_id: i64,
    inbound: S,
    end: CancellationToken,
    phase: Phase,
    _hold: H,
}

enum Phase {
    /// Registered, waiting for a call.
    Idle {
        registration: Registration,
        busy: prometheus::IntGauge,
    },
    Carrying(Carry),
    Done,
}

/// What the next poll of a carrying tunnel gives the agent's stream.
enum Step {
    Send(ToAgentMsg),
    End(TunnelEnd),
}

impl<S, H> Driver<S, H>
where
    S: Stream<Item = Result<ConnectRequest, Status>> + Unpin,
{
    /// The next message for the agent; `None` once the tunnel ended.
    async fn next(&mut self) -> Option<Result<ConnectResponse, Status>> {
        let Driver {
            inbound,
            end,
            phase,
            ..
        } = self;
        let routed = match phase {
            Phase::Done => return None,
            Phase::Carrying(carry) => {
                return match carry.step(inbound, end).await {
                    Step::Send(msg) => Some(Ok(ConnectResponse { msg: Some(msg) })),
                    Step::End(how) => self.finish(how),
                };
            }
            Phase::Idle { registration, .. } => {
                tokio::select! {
                    // A call that has arrived wins over an end that arrives at the same time.
                    biased;
                    routed = registration.routed() => routed,
                    msg = inbound.next() => return self.finish(match msg {
                        Some(Ok(_)) => TunnelEnd::Status(Status::invalid_argument(
                            "tunnel message out of order: the agent sent a message on an idle tunnel",
                        )),
                        // The agent left.
                        Some(Err(_)) | None => TunnelEnd::Ok,
                    }),
                    _ = end.cancelled() => return self.finish(TunnelEnd::Ok),
                }
            }
        };
        // Withdraws the registration.
        let Phase::Idle { busy, .. } = std::mem::replace(phase, Phase::Done) else {
            unreachable!("matched Idle above");
        };
        let Routed {
            method_name,
            meta,
            to_agent,
            from_agent,
        } = routed;
        *phase = Phase::Carrying(Carry {
            from_agent,
            to_agent: Some(to_agent),
            stage: Stage::Started,
            settled: false,
            _busy: GaugeGuard::hold(busy),
        });
        Some(Ok(ConnectResponse {
            msg: Some(ToAgentMsg::RequestInfo(RequestInfo { method_name, meta })),
        }))
    }

    fn finish(&mut self, how: TunnelEnd) -> Option<Result<ConnectResponse, Status>> {
        self.phase = Phase::Done;
        let agent_id = self.agent_id;
        match how {
            TunnelEnd::Ok => {
                tracing::debug!(agent_id, "reverse tunnel ended");
                None
            }
            TunnelEnd::Status(status) => {
                tracing::info!(agent_id, code = ?status.code(), message = status.message(), "reverse tunnel ended with an error");
                Some(Err(status))
            }
        }
    }
}

/// A call on its way through the tunnel.
struct Carry {
    from_agent: mpsc::Sender<FromAgent>,
    /// `None` once the caller half-closed (or went away after the agent's last message).
    to_agent: Option<mpsc::Receiver<ToAgent>>,
    stage: Stage,
    /// The caller knows how the call ended (or did not need to be told).
    settled: bool,
    _busy: GaugeGuard,
}

impl Carry {
    /// Reads the agent's messages, passing them to the caller, until the caller has
    /// something for the agent or the tunnel ends.
    async fn step<S>(&mut self, inbound: &mut S, end: &CancellationToken) -> Step
    where
        S: Stream<Item = Result<ConnectRequest, Status>> + Unpin,
    {
        let how = loop {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(ConnectRequest { msg })) => match self.stage.accept(msg) {
                        Ok((next, event)) => {
                            self.stage = next;
                            if self.from_agent.send(event).await.is_err() && !self.stage.may_end() {
                                break TunnelEnd::Status(Status::cancelled("the request was cancelled"));
                            }
                        }
                        Err(status) => {
                            self.fail(Status::unavailable(format!(
                                "the agent broke the tunnel protocol: {}",
                                status.message()
                            )))
                            .await;
                            break TunnelEnd::Status(status);
                        }
                    },
                    Some(Err(status)) => {
                        self.fail(Status::unavailable(format!(
                            "the agent's tunnel failed: {}",
                            status.message()
                        )))
                        .await;
                        break TunnelEnd::Ok;
                    }
                    None if self.stage.may_end() => break TunnelEnd::Ok,
                    None => {
                        self.fail(Status::unavailable(
                            "the agent closed its tunnel before finishing the answer",
                        ))
                        .await;
                        break TunnelEnd::Ok;
                    }
                },
                cmd = recv(&mut self.to_agent) => match cmd {
                    Some(ToAgent::Message(data)) => {
                        return Step::Send(ToAgentMsg::Message(Message { data: data.into() }));
                    }
                    Some(ToAgent::CloseSend) => {
                        self.to_agent = None;
                        return Step::Send(ToAgentMsg::CloseSend(CloseSend {}));
                    }
                    // The caller went away before it half-closed.
                    None => {
                        self.to_agent = None;
                        if self.stage.may_end() {
                            continue;
                        }
                        break TunnelEnd::Status(Status::cancelled("the request was cancelled"));
                    }
                },
                _ = self.from_agent.closed(), if !self.stage.may_end() => {
                    break TunnelEnd::Status(Status::cancelled("the request was cancelled"));
                }
                // The connection's age or the pod's drain: the call ends cleanly here (the
                // caller sees its answer end without an error) rather than being cut when the
                // connection closes.
                _ = end.cancelled() => break TunnelEnd::Ok,
            }
        };
        self.settled = true;
        Step::End(how)
    }

    async fn fail(&self, status: Status) {
        let _ = self.from_agent.send(FromAgent::Error(status)).await;
    }
}

impl Drop for Carry {
    /// Dropped before it ended: the agent's HTTP/2 stream was reset or its connection
    /// broke. The caller must not take what it got for a whole answer.
    fn drop(&mut self) {
        if self.settled || self.stage.may_end() {
            return;
        }
        let lost = FromAgent::Error(Status::unavailable("the agent's tunnel closed"));
        if let Err(mpsc::error::TrySendError::Full(lost)) = self.from_agent.try_send(lost) {
            // The caller has not read what came before; it gets this after them.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let from_agent = self.from_agent.clone();
                runtime.spawn(async move {
                    let _ = from_agent.send(lost).await;
                });
            }
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
