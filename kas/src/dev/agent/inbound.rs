//! What kas sends on a tunnel after `RequestInfo`, read in its own task and checked for
//! order: `Message`s carrying `HttpRequest` `Header`, `Data`*, `Trailer`, then (after a
//! `101`) `UpgradeData`*, and `CloseSend` once the caller half-closed. The pieces go to the
//! request being replayed: the head once, body bytes in a bounded channel (so a slow API
//! server slows kas through HTTP/2 flow control instead of filling memory), upgrade bytes in
//! another. A message out of order ends the request with `InvalidArgument`, as agentk's
//! stream visitor does.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use kas_proto::grpctool::{http_request, HttpRequest};
use kas_proto::reverse_tunnel::{connect_response::Msg, ConnectResponse};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Streaming};

/// Why the request side failed: a code and message for the tunnel's `Error`.
pub type Failure = (Code, String);

pub struct Inbound {
    /// The `HttpRequest.Header`; dropped unsent if the request side failed first.
    pub header: oneshot::Receiver<http_request::Header>,
    /// Request body bytes; ends at the `HttpRequest.Trailer`.
    pub body: mpsc::Receiver<Bytes>,
    /// Bytes for the upgraded connection; ends at `CloseSend` (or kas's end of stream).
    pub upgrade: mpsc::Receiver<Bytes>,
    /// Set when the request side failed: an order violation or the stream broke.
    pub failure: Arc<Mutex<Option<Failure>>>,
    pub task: JoinHandle<()>,
}

impl Inbound {
    pub fn failure(&self) -> Option<Failure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Header,
    DataOrTrailer,
    Upgrade,
}

/// Reads `stream` until its end; on a failure records it and cancels `abort`.
pub fn spawn(mut stream: Streaming<ConnectResponse>, abort: CancellationToken) -> Inbound {
    let (header_tx, header) = oneshot::channel();
    let (body_tx, body) = mpsc::channel(4);
    let (upgrade_tx, upgrade) = mpsc::channel(4);
    let failure = Arc::new(Mutex::new(None));
    let slot = failure.clone();
    let task = tokio::spawn(async move {
        let mut header_tx = Some(header_tx);
        let mut body_tx = Some(body_tx);
        let mut upgrade_tx = Some(upgrade_tx);
        let mut expect = Expect::Header;
        let mut close_sent = false;
        let fail = |f: Failure| {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
            abort.cancel();
        };
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                () = abort.cancelled() => return,
            };
            let msg = match next {
                Ok(Some(ConnectResponse { msg: Some(msg) })) => msg,
                Ok(Some(ConnectResponse { msg: None })) => {
                    return fail((Code::InvalidArgument, "empty ConnectResponse".into()))
                }
                // kas ended the call: whatever is still running for it stops (a watch whose
                // caller left). After the agent's own half-close this is the normal end.
                Ok(None) => return abort.cancel(),
                Err(status) => {
                    return fail((
                        status.code(),
                        format!("tunnel stream broke: {}", status.message()),
                    ))
                }
            };
            let data = match msg {
                Msg::CloseSend(_) if !close_sent => {
                    close_sent = true;
                    body_tx = None;
                    upgrade_tx = None;
                    continue;
                }
                Msg::Message(m) if !close_sent => m.data,
                other => {
                    return fail((
                        Code::InvalidArgument,
                        format!(
                            "unexpected {} after RequestInfo{}",
                            name(&other),
                            if close_sent { " and CloseSend" } else { "" }
                        ),
                    ))
                }
            };
            let request = match HttpRequest::decode(data.as_slice()) {
                Ok(HttpRequest { message: Some(m) }) => m,
                Ok(HttpRequest { message: None }) => {
                    return fail((Code::InvalidArgument, "empty HttpRequest".into()))
                }
                Err(e) => {
                    return fail((
                        Code::InvalidArgument,
                        format!("HttpRequest does not decode: {e}"),
                    ))
                }
            };
            use http_request::Message as M;
            match (expect, request) {
                (Expect::Header, M::Header(h)) => {
                    if let Some(tx) = header_tx.take() {
                        let _ = tx.send(h);
                    }
                    expect = Expect::DataOrTrailer;
                }
                (Expect::DataOrTrailer, M::Data(d)) => {
                    if let Some(tx) = &body_tx {
                        tokio::select! {
                            // The request may no longer read its body (answered early).
                            _ = tx.send(Bytes::from(d.data)) => {}
                            () = abort.cancelled() => return,
                        }
                    }
                }
                (Expect::DataOrTrailer, M::Trailer(_)) => {
                    body_tx = None;
                    expect = Expect::Upgrade;
                }
                (Expect::Upgrade, M::UpgradeData(u)) => {
                    if let Some(tx) = &upgrade_tx {
                        tokio::select! {
                            _ = tx.send(Bytes::from(u.data)) => {}
                            () = abort.cancelled() => return,
                        }
                    }
                }
                (expect, got) => {
                    return fail((
                        Code::InvalidArgument,
                        format!(
                            "HttpRequest out of order: expected {expect:?}, got {}",
                            http_name(&got)
                        ),
                    ))
                }
            }
        }
    });
    Inbound {
        header,
        body,
        upgrade,
        failure,
        task,
    }
}

fn name(msg: &Msg) -> &'static str {
    match msg {
        Msg::RequestInfo(_) => "RequestInfo",
        Msg::Message(_) => "Message",
        Msg::CloseSend(_) => "CloseSend",
    }
}

fn http_name(msg: &http_request::Message) -> &'static str {
    match msg {
        http_request::Message::Header(_) => "Header",
        http_request::Message::Data(_) => "Data",
        http_request::Message::Trailer(_) => "Trailer",
        http_request::Message::UpgradeData(_) => "UpgradeData",
    }
}
