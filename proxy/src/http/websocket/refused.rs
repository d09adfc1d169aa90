//! Relaying a refused upgrade: whatever the pod answered instead of `101` (an expired
//! token's 401, a 426, an error page) reaches the agent with its status, its end-to-end
//! headers and its body, so the agent can tell why. The body is read within bounds and
//! re-framed with a correct `Content-Length` whatever framing the pod used, because the
//! pod's own framing is not to be trusted to end, and the agent's connection closes after
//! it (the pod may not have sent the whole body).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::http::framing::{strip_hop_by_hop, ChunkedBody, ResponseFraming};

/// The most body relayed from a pod that refused the upgrade (an error page).
const MAX_REFUSAL_BODY: usize = 64 * 1024;
/// Raw bytes read from a refusing pod at most (chunk framing included), so a pod that
/// frames a small body in endless chunk extensions cannot keep the edge reading.
const MAX_REFUSAL_RAW: usize = 4 * MAX_REFUSAL_BODY;
/// How long a refused upgrade's body may take to arrive from the pod.
const REFUSAL_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent may take to accept a refused upgrade's answer.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Relays a refused upgrade: the pod's status and end-to-end headers, and its body read
/// within bounds ([`read_refusal_body`]) and re-framed with a correct `Content-Length`
/// whatever framing the pod used. Returns the body bytes sent.
pub(super) async fn relay_refusal(
    session: &mut Session,
    response: ResponseHeader,
    stream: TcpStream,
    early: Bytes,
) -> pingora::Result<u64> {
    let framing = ResponseFraming::of(&response);
    let (body, complete) = read_refusal_body(framing, stream, early).await;
    if !complete {
        tracing::debug!(status = response.status.as_u16(), framing = ?framing, relayed = body.len(),
            "a refused upgrade's body did not arrive whole; relaying what did");
    }
    let mut head = response;
    strip_hop_by_hop(&mut head);
    if framing != ResponseFraming::NoBody {
        head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    }
    let sent = body.len() as u64;
    // The session has no write timeout (tunnels must not have one): an agent that does not
    // read its refusal must not hold the edge either.
    let write = async {
        session.write_response_header(Box::new(head), false).await?;
        if !body.is_empty() {
            session.write_response_body(Some(body), false).await?;
        }
        session.write_response_body(None, true).await
    };
    match tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, write).await {
        Ok(written) => written.map(|()| sent),
        Err(_) => Err(pingora::Error::explain(
            pingora::ErrorType::WriteTimedout,
            "the agent did not take the refused upgrade's answer",
        )),
    }
}

/// Reads a refused upgrade's body: at most [`MAX_REFUSAL_BODY`] bytes of it, at most
/// [`MAX_REFUSAL_RAW`] bytes off the wire, within [`REFUSAL_BODY_TIMEOUT`]. Returns the
/// body (decoded from chunks, cut at a declared length) and whether it arrived whole.
async fn read_refusal_body(
    framing: ResponseFraming,
    mut stream: TcpStream,
    early: Bytes,
) -> (Bytes, bool) {
    let mut raw = BytesMut::from(&early[..]);
    drop(early);
    let mut body = BytesMut::new();
    let mut chunks = ChunkedBody::default();
    let read = async {
        let mut raw_total = raw.len();
        loop {
            let complete = match framing {
                ResponseFraming::NoBody | ResponseFraming::HeadOnly(_) => return true,
                ResponseFraming::Invalid => return false,
                ResponseFraming::Length(n) => {
                    let missing = n.saturating_sub(body.len() as u64);
                    let take = missing.min(raw.len() as u64) as usize;
                    body.extend_from_slice(&raw.split_to(take));
                    body.len() as u64 >= n
                }
                ResponseFraming::UntilClose => {
                    body.extend_from_slice(&raw.split());
                    false
                }
                ResponseFraming::Chunked => match chunks.decode(&mut raw, &mut body) {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::debug!(error = %e, "a refused upgrade's chunked body");
                        return false;
                    }
                },
            };
            if complete {
                return body.len() <= MAX_REFUSAL_BODY;
            }
            if body.len() > MAX_REFUSAL_BODY || raw_total > MAX_REFUSAL_RAW {
                return false;
            }
            raw.reserve(8 * 1024);
            match stream.read_buf(&mut raw).await {
                Ok(0) => return framing == ResponseFraming::UntilClose,
                Ok(n) => raw_total += n,
                Err(_) => return false,
            }
        }
    };
    let complete = tokio::time::timeout(REFUSAL_BODY_TIMEOUT, read)
        .await
        .unwrap_or(false);
    body.truncate(MAX_REFUSAL_BODY);
    (body.freeze(), complete)
}
