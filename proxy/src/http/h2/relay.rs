//! One direction of an HTTP/2 stream's body, from one connection to another, under both
//! connections' flow control.
//!
//! Bytes received are given back to their sender (WINDOW_UPDATE) only once the other
//! side has taken them, and the other side takes only what its window allows: a reader
//! that stops reading stops its writer, one window later. So the edge holds at most one
//! window per stream for a slow agent or pod, never a growing buffer. Answers an agent
//! leaves unread that long are counted against it ([`Stalls`]).

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::HeaderValue;
use tokio::sync::Notify;

/// How long a stream's answer may wait on its agent's flow control (the edge holds bytes
/// of it the agent's window does not let it send) before the stream counts as stalled.
pub(super) const STALLED_AFTER: Duration = Duration::from_secs(10);
/// Stalled streams one agent connection may have: a reader that takes nothing of more
/// answers than that is cut, so beyond [`STALLED_AFTER`] an agent connection holds at
/// most this many stream windows of answers at the edge. Agents read what they asked for;
/// they hold a dozen streams or so and rarely leave one waiting.
pub(super) const MAX_STALLED_STREAMS: usize = 8;

/// One agent connection's streams whose answers are stalled on it.
#[derive(Default)]
pub(super) struct Stalls {
    count: AtomicUsize,
    exceeded: Notify,
}

impl Stalls {
    /// Resolves once more than [`MAX_STALLED_STREAMS`] are stalled at once.
    pub(super) async fn exceeded(&self) {
        self.exceeded.notified().await
    }

    fn stalled(&self) -> Stalled<'_> {
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 > MAX_STALLED_STREAMS {
            self.exceeded.notify_one();
        }
        Stalled(self)
    }
}

/// A stream counted as stalled while it lives.
struct Stalled<'a>(&'a Stalls);

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Where a relay stopped early.
#[derive(Debug)]
pub(super) enum Broken {
    /// The side we read from reset the stream, or its connection failed.
    Source(h2::Error),
    /// The side we write to reset the stream, or its connection failed.
    Destination,
}

/// Relays DATA, then trailers (or the end of the stream), from `from` to `to`; returns
/// the trailers' `grpc-status`, if any (a gRPC call's outcome). `bytes` counts what was
/// passed on, also when the relay breaks off. With `stalls` (an answer to an agent), the
/// stream counts there while the agent leaves it stalled.
pub(super) async fn relay(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    bytes: &mut u64,
    stalls: Option<&Stalls>,
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
                send_within_window(to, data, stalls).await?;
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
async fn send_within_window(
    to: &mut SendStream<Bytes>,
    mut data: Bytes,
    stalls: Option<&Stalls>,
) -> Result<(), Broken> {
    while !data.is_empty() {
        to.reserve_capacity(data.len());
        // Mostly there at once; the stall clock starts only when it is not.
        let granted = match poll_fn(|cx| Poll::Ready(to.poll_capacity(cx))).await {
            Poll::Ready(granted) => granted,
            Poll::Pending => {
                let window = poll_fn(|cx| to.poll_capacity(cx));
                tokio::pin!(window);
                match stalls {
                    None => window.await,
                    Some(stalls) => match tokio::time::timeout(STALLED_AFTER, &mut window).await {
                        Ok(granted) => granted,
                        Err(_) => {
                            let _stalled = stalls.stalled();
                            window.await
                        }
                    },
                }
            }
        };
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
