//! One direction of an HTTP/2 stream's body, from one connection to another, under both
//! connections' flow control.
//!
//! Bytes received are given back to their sender (WINDOW_UPDATE) only once the other
//! side has taken them, and the other side takes only what its window allows: a reader
//! that stops reading stops its writer, one window later. So the edge holds at most one
//! window per stream for a slow agent or pod, never a growing buffer.

use std::future::poll_fn;
use std::task::Poll;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderValue;

/// Where a relay stopped early.
#[derive(Debug)]
pub(super) enum Broken {
    /// The side we read from reset the stream, or its connection failed.
    Source(h2::Error),
    /// The side we write to reset the stream, or its connection failed.
    Destination,
}

/// Relays DATA, then trailers (or the end of the stream), from `from` to `to`; returns
/// the trailers' `grpc-status`, if any (a gRPC call's outcome). `bytes` counts what was passed on, also when the relay breaks
/// off.
pub(super) async fn relay(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    bytes: &mut u64,
) -> Result<Option<HeaderValue>, Broken> {
    loop {
        // Waiting for data must still notice the destination resetting its stream.
        let next = poll_fn(|cx| {
            if to.poll_reset(cx).is_ready() {
                return Poll::Ready(Err(Broken::Destination));
            }
            from.poll_data(cx).map(Ok)
        })
        .await?;
        match next {
            Some(Ok(data)) => {
                let len = data.len();
                send_within_window(to, data).await?;
                *bytes += len as u64;
                // Only now may the source send this much more.
                if let Err(e) = from.flow_control().release_capacity(len) {
                    return Err(Broken::Source(e));
                }
            }
            Some(Err(e)) => return Err(Broken::Source(e)),
            None => break,
        }
    }
    let trailers = poll_fn(|cx| from.poll_trailers(cx))
        .await
        .map_err(Broken::Source)?;
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .cloned();
    let sent = match trailers {
        Some(t) => to.send_trailers(t),
        None => to.send_data(Bytes::new(), true),
    };
    sent.map_err(|_| Broken::Destination)?;
    Ok(status)
}

/// Sends `data` in pieces as the destination's window opens.
async fn send_within_window(to: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), Broken> {
    while !data.is_empty() {
        to.reserve_capacity(data.len());
        let granted = poll_fn(|cx| to.poll_capacity(cx)).await;
        match granted {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => {
                let piece = data.split_to(n.min(data.len()));
                to.send_data(piece, false)
                    .map_err(|_| Broken::Destination)?;
            }
            Some(Err(_)) | None => return Err(Broken::Destination),
        }
    }
    Ok(())
}
