//! A byte duplex between two connections, as one small future: the edge's websocket
//! tunnels are carried by it (an agent's TLS stream on one end, a pod's socket on the
//! other), but nothing here knows about websockets or HTTP.
//!
//! Why a hand-written future rather than two `async` copy loops joined: a tunnel lives for
//! hours and is idle almost all that time, so what an idle tunnel holds is what the edge
//! pays per agent. This future owns both connections without a split lock, arms its timer
//! only while a deadline runs, takes the socket side's read buffer only once the socket is
//! readable, and sizes the other side's buffer to its traffic; its whole state is a few
//! hundred bytes.
//!
//! The two copies progress independently, so a peer that stops reading stalls only the
//! bytes meant for it. The first direction to see its source close shuts down its
//! destination's write side (TCP FIN, TLS close_notify); the other continues until it ends
//! too, for at most [`DuplexLimits::half_closed`]. A failure, or a write that makes no
//! progress for [`DuplexLimits::write_stall`], ends the duplex at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bounds of both directions' read buffers. Each follows its traffic: it doubles after a
/// read that filled it and shrinks back after small reads ([`next_read_size`]), so a quiet
/// duplex reads in small steps while a busy one reads in big ones. The stream side's buffer
/// is held while the duplex waits (a TLS stream has no readiness to wait on without one):
/// an idle peer that last sent a keepalive holds [`READ_MIN`] bytes, and rustls has already
/// decrypted the record, so a small buffer costs copies, never syscalls. The socket side
/// waits for readiness and only then takes a buffer, so an idle socket side holds none.
const READ_MIN: usize = 512;
const READ_MAX: usize = 16 * 1024;

/// Steps one direction takes in one poll before yielding, so a busy direction cannot
/// starve the other.
const STEPS_PER_POLL: usize = 32;

/// Bounds on waiting for a peer of a running duplex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DuplexLimits {
    /// A write (to either side) that makes no progress for this long ends the duplex: the
    /// peer stopped reading. An idle duplex writes nothing and is not affected.
    pub write_stall: Duration,
    /// After one side's EOF, how long the other direction may continue (one peer's last
    /// bytes after the other hung up).
    pub half_closed: Duration,
}

impl Default for DuplexLimits {
    fn default() -> Self {
        Self {
            write_stall: Duration::from_secs(60),
            half_closed: Duration::from_secs(30),
        }
    }
}

/// One end of a duplex: the stream (any `AsyncRead + AsyncWrite`, read through a held
/// buffer) or the socket (a TCP socket, read once it is readable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Stream,
    Socket,
}

/// How a duplex ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DuplexEnd {
    /// This side closed first: the other direction then ended too, failed after the
    /// half-close, or ran out of [`DuplexLimits::half_closed`].
    Closed(Side),
    /// This side's peer failed: reading from it failed, or writing to it failed or stalled
    /// for [`DuplexLimits::write_stall`].
    Failed(Side),
}

/// Why one direction stopped before its source closed.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("reading: {0}")]
    Read(#[source] io::Error),
    #[error("writing: {0}")]
    Write(#[source] io::Error),
    #[error("the peer accepted nothing for {0:?}")]
    Stalled(Duration),
}

/// One direction of a duplex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    StreamToSocket,
    SocketToStream,
}

impl Way {
    fn label(self) -> &'static str {
        match self {
            Way::StreamToSocket => "stream to socket",
            Way::SocketToStream => "socket to stream",
        }
    }

    fn source(self) -> Side {
        match self {
            Way::StreamToSocket => Side::Stream,
            Way::SocketToStream => Side::Socket,
        }
    }

    fn destination(self) -> Side {
        match self {
            Way::StreamToSocket => Side::Socket,
            Way::SocketToStream => Side::Stream,
        }
    }

    /// How the duplex ends when this direction's source closed first.
    fn closed(self) -> DuplexEnd {
        DuplexEnd::Closed(self.source())
    }

    /// How the duplex ends when this direction broke: a failed read is its source's fault,
    /// a failed or stalled write its destination's.
    fn broken(self, broken: &Broken) -> DuplexEnd {
        DuplexEnd::Failed(match broken {
            Broken::Read(_) => self.source(),
            Broken::Write(_) | Broken::Stalled(_) => self.destination(),
        })
    }
}

/// Carries bytes both ways between `stream` and `socket` until both directions are done
/// or one fails; resolves to how it ended. The bytes each direction delivered stay
/// readable afterwards ([`Duplex::carried_to_socket`], [`Duplex::carried_to_stream`]).
pub struct Duplex<S> {
    stream: S,
    socket: TcpStream,
    to_socket: HalfDuplex,
    to_stream: HalfDuplex,
    limits: DuplexLimits,
    /// The direction whose source closed first, and when.
    half_closed: Option<(Way, Instant)>,
    /// Armed only while a deadline runs (a stalled write, a half-closed duplex).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// One direction: bytes read from its source wait in `buf[pos..end]` until its destination
/// has taken them all.
struct HalfDuplex {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The next read's size ([`next_read_size`]).
    size: usize,
    phase: Phase,
    /// Since when the destination has accepted nothing (a write, flush or shutdown pending).
    stalled_since: Option<Instant>,
    /// Bytes the destination accepted.
    carried: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Read,
    Write,
    Flush,
    /// The source closed: end the destination's write side.
    Shutdown,
    Done,
}

impl HalfDuplex {
    /// Starts with `first` (bytes read before the duplex began) to deliver.
    fn new(first: &[u8]) -> Self {
        Self {
            buf: first.to_vec(),
            pos: 0,
            end: first.len(),
            size: READ_MIN,
            phase: if first.is_empty() {
                Phase::Read
            } else {
                Phase::Write
            },
            stalled_since: None,
            carried: 0,
        }
    }

    fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn read_into_buffer(&mut self, n: usize) {
        if n == 0 {
            self.phase = Phase::Shutdown;
        } else {
            self.pos = 0;
            self.end = n;
            self.phase = Phase::Write;
        }
    }

    /// Makes the read buffer `size` bytes long (it may have held the first bytes).
    fn sized_buffer(&mut self) -> &mut [u8] {
        if self.buf.len() != self.size {
            self.buf = vec![0u8; self.size];
        }
        &mut self.buf
    }

    /// Reads from a source that has no readiness to wait on (TLS): the buffer is held
    /// while waiting.
    fn poll_read_held<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
    ) -> Poll<Result<(), Broken>> {
        let mut read = ReadBuf::new(self.sized_buffer());
        ready!(Pin::new(from).poll_read(cx, &mut read)).map_err(Broken::Read)?;
        let n = read.filled().len();
        self.read_into_buffer(n);
        Poll::Ready(Ok(()))
    }

    /// Reads from a socket, waiting for readiness first so an idle direction holds no
    /// buffer; a busy one keeps its buffer until the socket runs dry.
    fn poll_read_ready(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
    ) -> Poll<Result<(), Broken>> {
        loop {
            ready!(from.poll_read_ready(cx)).map_err(Broken::Read)?;
            match from.try_read(self.sized_buffer()) {
                Ok(n) => {
                    self.read_into_buffer(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = Vec::new(),
                Err(e) => return Poll::Ready(Err(Broken::Read(e))),
            }
        }
    }

    /// Writes, flushes or shuts down towards the destination, whichever is due; ready once
    /// the direction is back to reading (or done).
    fn poll_deliver<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
    ) -> Poll<Result<(), Broken>> {
        loop {
            let polled = match self.phase {
                Phase::Read | Phase::Done => return Poll::Ready(Ok(())),
                Phase::Write => {
                    let pending = self.buf.get(self.pos..self.end).unwrap_or_default();
                    match Pin::new(&mut *to).poll_write(cx, pending) {
                        Poll::Ready(Ok(0)) => {
                            Poll::Ready(Err(Broken::Write(io::ErrorKind::WriteZero.into())))
                        }
                        Poll::Ready(Ok(n)) => {
                            self.carried += n as u64;
                            self.pos = (self.pos + n).min(self.end);
                            if self.pos == self.end {
                                self.phase = Phase::Flush;
                            }
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(Broken::Write(e))),
                        Poll::Pending => Poll::Pending,
                    }
                }
                Phase::Flush => match Pin::new(&mut *to).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        self.size = next_read_size(self.size, self.end);
                        self.phase = Phase::Read;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(Broken::Write(e))),
                    Poll::Pending => Poll::Pending,
                },
                Phase::Shutdown => match Pin::new(&mut *to).poll_shutdown(cx) {
                    Poll::Ready(result) => {
                        // A peer that is gone is noticed by the direction reading from it.
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "shutting down a duplex's write side");
                        }
                        self.buf = Vec::new();
                        self.phase = Phase::Done;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                },
            };
            match polled {
                Poll::Pending => {
                    self.stalled_since.get_or_insert_with(Instant::now);
                    return Poll::Pending;
                }
                Poll::Ready(result) => {
                    self.stalled_since = None;
                    result?;
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Duplex<S> {
    /// A duplex that first delivers `to_socket` and `to_stream`: bytes already read from
    /// each side before it began (e.g. what arrived with a handshake).
    pub fn new(
        stream: S,
        socket: TcpStream,
        to_socket: &[u8],
        to_stream: &[u8],
        limits: DuplexLimits,
    ) -> Self {
        Self {
            stream,
            socket,
            to_socket: HalfDuplex::new(to_socket),
            to_stream: HalfDuplex::new(to_stream),
            limits,
            half_closed: None,
            timer: None,
        }
    }

    /// Bytes the socket accepted so far.
    pub fn carried_to_socket(&self) -> u64 {
        self.to_socket.carried
    }

    /// Bytes the stream accepted so far.
    pub fn carried_to_stream(&self) -> u64 {
        self.to_stream.carried
    }

    fn poll_to_socket(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        for _ in 0..STEPS_PER_POLL {
            match self.to_socket.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Read => ready!(self.to_socket.poll_read_held(cx, &mut self.stream))?,
                _ => ready!(self.to_socket.poll_deliver(cx, &mut self.socket))?,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_to_stream(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Broken>> {
        for _ in 0..STEPS_PER_POLL {
            match self.to_stream.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Read => ready!(self.to_stream.poll_read_ready(cx, &self.socket))?,
                _ => ready!(self.to_stream.poll_deliver(cx, &mut self.stream))?,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The earliest running deadline and how the duplex ends if it passes.
    fn next_deadline(&self) -> Option<(Instant, DuplexEnd)> {
        let stall = self.limits.write_stall;
        let stalled = Broken::Stalled(stall);
        [
            self.to_socket
                .stalled_since
                .map(|t| (t + stall, Way::StreamToSocket.broken(&stalled))),
            self.to_stream
                .stalled_since
                .map(|t| (t + stall, Way::SocketToStream.broken(&stalled))),
            self.half_closed
                .map(|(way, t)| (t + self.limits.half_closed, way.closed())),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(at, _)| *at)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Future for Duplex<S> {
    type Output = DuplexEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DuplexEnd> {
        let this = self.get_mut();
        for way in [Way::StreamToSocket, Way::SocketToStream] {
            let polled = match way {
                Way::StreamToSocket if !this.to_socket.done() => this.poll_to_socket(cx),
                Way::SocketToStream if !this.to_stream.done() => this.poll_to_stream(cx),
                _ => continue,
            };
            match polled {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    this.half_closed.get_or_insert((way, Instant::now()));
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, way = way.label(), "duplex direction failed");
                    // After a half-close the duplex was ending anyway: the first close is
                    // what ended it (a peer that closed fully resets the other's last bytes).
                    return Poll::Ready(match this.half_closed {
                        Some((first, _)) => first.closed(),
                        None => way.broken(&e),
                    });
                }
            }
        }
        if this.to_socket.done() && this.to_stream.done() {
            let first = this.half_closed.map_or(Way::StreamToSocket, |(way, _)| way);
            return Poll::Ready(first.closed());
        }
        loop {
            let Some((at, end)) = this.next_deadline() else {
                // Nothing is waiting on a deadline: an idle duplex keeps no timer.
                this.timer = None;
                return Poll::Pending;
            };
            if at <= Instant::now() {
                tracing::debug!(end = ?end, "duplex deadline passed");
                return Poll::Ready(end);
            }
            let timer = this
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            ready!(timer.as_mut().poll(cx));
        }
    }
}

/// A read buffer's next size after a read of `n` bytes into `current`.
fn next_read_size(current: usize, n: usize) -> usize {
    if n == current {
        (current * 2).min(READ_MAX)
    } else if n < current / 4 {
        (n * 2).clamp(READ_MIN, READ_MAX)
    } else {
        current
    }
}

/// The tests, and their loopback helpers for the tests of what a duplex carries.
#[cfg(test)]
pub(crate) mod tests;
