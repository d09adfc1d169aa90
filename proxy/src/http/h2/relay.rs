//! One direction of an HTTP/2 stream's body, from one connection to another, under both
//! connections' flow control.
//!
//! Bytes received are given back to their sender (WINDOW_UPDATE) only once the other
//! side has taken them, and the other side takes only what its window allows: a reader
//! that stops reading stops its writer, one window later. So the edge holds at most one
//! window per stream for a slow agent or pod, never a growing buffer. Answers an agent
//! leaves unread that long are counted against it ([`Stalls`]).
//!
//! Towards a pod the edge frames an agent's bytes itself ([`upload`]): h2 (kas) closes a
//! connection whose small DATA frames, buffered unread, cost it more than half its
//! connection window in framing overhead (256 bytes a frame at most), and a pod reads no
//! stream before it answers it, nor one whose answers wait on its agent. Relayed frame
//! for frame, one agent's trickle of one-byte frames would close the connection every
//! agent shares.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
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

/// A DATA frame shorter than this costs the h2 that buffers it unread framing overhead
/// (h2's `DEFAULT_DATA_FRAME_OVERHEAD_THRESHOLD`).
const SMALL_FRAME: usize = 256;
/// Small DATA frames a stream sends a pod before the pod answered it: an agent's first
/// messages; more small pieces wait and go out together.
const SMALL_BEFORE_ANSWER: u32 = 8;
/// While small pieces are held back, how often the upload looks whether it may send them.
const HOLD_RECHECK: Duration = Duration::from_millis(20);

/// What the two directions of one stream tell each other.
#[derive(Default)]
pub(super) struct StreamFlow {
    /// The pod answered the stream (its head arrived).
    pub answered: AtomicBool,
    /// The pod's answer is waiting on the agent's flow control right now.
    pub waiting_on_agent: AtomicBool,
}

/// An answer's way to its agent: the connection's stall count and the stream's flow.
pub(super) struct ToAgent<'a> {
    pub stalls: &'a Stalls,
    pub flow: &'a StreamFlow,
}

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
/// passed on, also when the relay breaks off. With `to_agent` (an answer), the stream
/// counts as stalled on its connection while the agent leaves it so.
pub(super) async fn relay(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    bytes: &mut u64,
    to_agent: Option<ToAgent<'_>>,
) -> Result<Option<HeaderValue>, Broken> {
    while let Some(data) = next_data(from, to).await? {
        pass_on(from, to, data, bytes, to_agent.as_ref()).await?;
    }
    finish(from, to).await
}

/// An agent's request body to its pod, like [`relay`] but framed by the edge: a piece of
/// fewer than [`SMALL_FRAME`] bytes goes out on its own only while the pod is likely to
/// read it (it answered the stream, or the stream is young: [`SMALL_BEFORE_ANSWER`]
/// pieces) and the answer is not waiting on the agent; otherwise it waits, and what
/// follows joins it, until it may go or makes a frame of [`SMALL_FRAME`] bytes. What
/// waits is not yet given back to the agent, so its window bounds it.
pub(super) async fn upload(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    bytes: &mut u64,
    flow: &StreamFlow,
) -> Result<(), Broken> {
    let mut held = BytesMut::new();
    let mut small_unanswered = 0u32;
    loop {
        let next = if held.is_empty() {
            Some(next_data(from, to).await?)
        } else {
            tokio::time::timeout(HOLD_RECHECK, next_data(from, to))
                .await
                .ok()
                .transpose()?
        };
        let ended = match next {
            Some(Some(data)) if held.is_empty() && data.len() >= SMALL_FRAME => {
                pass_on(from, to, data, bytes, None).await?;
                continue;
            }
            Some(Some(data)) => {
                held.extend_from_slice(&data);
                false
            }
            Some(None) => true,
            None => false,
        };
        if !held.is_empty() && !ended && held.len() < SMALL_FRAME {
            let answered = flow.answered.load(Ordering::Relaxed);
            let hold = flow.waiting_on_agent.load(Ordering::Relaxed)
                || (!answered && small_unanswered >= SMALL_BEFORE_ANSWER);
            if hold {
                continue;
            }
            if !answered {
                small_unanswered += 1;
            }
        }
        if !held.is_empty() {
            pass_on(from, to, held.split().freeze(), bytes, None).await?;
        }
        if ended {
            break;
        }
    }
    finish(from, to).await.map(drop)
}

/// The next DATA of `from` (`None` at its end); waiting for it still notices `to`
/// resetting its stream.
async fn next_data(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
) -> Result<Option<Bytes>, Broken> {
    let next = poll_fn(|cx| {
        if to.poll_reset(cx).is_ready() {
            return Poll::Ready(Err(Broken::Destination));
        }
        from.poll_data(cx).map(Ok)
    })
    .await?;
    next.transpose().map_err(Broken::Source)
}

/// Sends `data` to `to` and only then lets `from` send as much more.
async fn pass_on(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
    data: Bytes,
    bytes: &mut u64,
    to_agent: Option<&ToAgent<'_>>,
) -> Result<(), Broken> {
    let len = data.len();
    send_within_window(to, data, to_agent).await?;
    *bytes += len as u64;
    from.flow_control()
        .release_capacity(len)
        .map_err(Broken::Source)
}

/// Trailers (or the end of the stream) from `from` to `to`; the trailers' `grpc-status`.
async fn finish(
    from: &mut RecvStream,
    to: &mut SendStream<Bytes>,
) -> Result<Option<HeaderValue>, Broken> {
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
    to_agent: Option<&ToAgent<'_>>,
) -> Result<(), Broken> {
    while !data.is_empty() {
        to.reserve_capacity(data.len());
        // Mostly there at once; the stall clock starts only when it is not.
        let granted = match poll_fn(|cx| Poll::Ready(to.poll_capacity(cx))).await {
            Poll::Ready(granted) => granted,
            Poll::Pending => {
                let window = poll_fn(|cx| to.poll_capacity(cx));
                tokio::pin!(window);
                match to_agent {
                    None => window.await,
                    Some(to_agent) => {
                        let _waiting = Flag::raise(&to_agent.flow.waiting_on_agent);
                        match tokio::time::timeout(STALLED_AFTER, &mut window).await {
                            Ok(granted) => granted,
                            Err(_) => {
                                let _stalled = to_agent.stalls.stalled();
                                window.await
                            }
                        }
                    }
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

/// Raises a flag for as long as it lives.
struct Flag<'a>(&'a AtomicBool);

impl<'a> Flag<'a> {
    fn raise(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}
