//! gRPC over websocket, the way agentk dials `wss://`: a websocket with subprotocol
//! `ws-tunnel` whose binary messages, concatenated, are one HTTP/2 byte stream. Message
//! boundaries mean nothing, so the stream is exposed as plain `AsyncRead`/`AsyncWrite` and
//! an ordinary HTTP/2 server or client runs on top.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// The websocket subprotocol agentk requests and kas must echo.
pub const SUBPROTOCOL: &str = "ws-tunnel";

/// A websocket carrying a byte stream in binary messages.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    eof: bool,
}

impl<S> WsByteStream<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by tungstenite itself on the next write or flush.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "ws-tunnel carries binary messages only",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(())
            | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                Poll::Ready(Ok(()))
            }
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// Client side: performs the websocket handshake for `url` (e.g. `ws://kas/` or
/// `wss://kas.example.com/`) over an already connected stream (TCP or TLS), requesting the
/// `ws-tunnel` subprotocol, and returns the byte stream to run HTTP/2 over.
pub async fn client_handshake<S>(stream: S, url: &str) -> io::Result<WsByteStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().map_err(to_io)?;
    request.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(SUBPROTOCOL),
    );
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(to_io)?;
    let agreed = response
        .headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    if agreed != Some(SUBPROTOCOL) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("server did not agree to the {SUBPROTOCOL} subprotocol (got {agreed:?})"),
        ));
    }
    Ok(WsByteStream::new(ws))
}

/// Server side, beneath the websocket codec: refuses any websocket message larger than
/// `limit` until `authenticated` is set (by the first call on the tunnel that GitLab
/// accepts). It follows the frame headers in the raw bytes, so an oversized message is
/// refused from its header, before the codec buffers any of it; afterwards the codec's
/// own (larger) limit applies alone.
pub struct PreAuthLimit<S> {
    inner: S,
    authenticated: std::sync::Arc<std::sync::atomic::AtomicBool>,
    limit: u64,
    frames: FrameTracker,
}

impl<S> PreAuthLimit<S> {
    pub fn new(
        inner: S,
        authenticated: std::sync::Arc<std::sync::atomic::AtomicBool>,
        limit: usize,
    ) -> Self {
        Self {
            inner,
            authenticated,
            limit: limit as u64,
            frames: FrameTracker::default(),
        }
    }
}

/// Where the client's byte stream is in its websocket frames (RFC 6455 §5.2).
#[derive(Default)]
struct FrameTracker {
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come; 0 = a header comes next.
    payload_left: u64,
    /// Data payload bytes of the message being received (continuations included).
    message_len: u64,
}

impl FrameTracker {
    /// Header length once its first two bytes are known.
    fn header_size(&self) -> usize {
        let ext = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    /// Follows `bytes`; `Err` with the message size once a message exceeds `limit`.
    fn feed(&mut self, mut bytes: &[u8], limit: u64) -> Result<(), u64> {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            let want = if self.header_len < 2 {
                2
            } else {
                self.header_size()
            };
            let n = (want - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len < 2 || self.header_len < self.header_size() {
                continue;
            }
            let len = match self.header[1] & 0x7f {
                126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.header[2..10]);
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let fin = self.header[0] & 0x80 != 0;
            let opcode = self.header[0] & 0x0f;
            self.header_len = 0;
            self.payload_left = len;
            // Control frames (ping, pong, close) may sit between a message's fragments
            // and are at most 125 bytes: only data frames add up.
            if opcode < 8 {
                self.message_len = self.message_len.saturating_add(len);
                if self.message_len > limit {
                    return Err(self.message_len);
                }
                if fin {
                    self.message_len = 0;
                }
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PreAuthLimit<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if self
            .authenticated
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Poll::Ready(Ok(()));
        }
        let limit = self.limit;
        let this = &mut *self;
        if let Err(size) = this.frames.feed(&buf.filled()[before..], limit) {
            buf.set_filled(before);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("websocket message of {size} bytes before authentication (limit {limit})"),
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PreAuthLimit<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::FrameTracker;

    /// A masked client frame header for a payload of `len` bytes.
    fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![if fin { 0x80 } else { 0 } | opcode];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=0xffff => {
                h.push(0x80 | 126);
                h.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend_from_slice(&len.to_be_bytes());
            }
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = header(fin, opcode, len as u64);
        f.resize(f.len() + len, 0xab);
        f
    }

    #[test]
    fn small_messages_pass_even_split_into_single_bytes() {
        let mut bytes = frame(true, 2, 100);
        bytes.extend(frame(true, 2, 1000));
        bytes.extend(frame(true, 2, 70_000 - 1000));
        let mut t = FrameTracker::default();
        for b in &bytes {
            t.feed(std::slice::from_ref(b), 70_000).unwrap();
        }
    }

    #[test]
    fn an_oversized_message_is_refused_at_its_header() {
        let mut t = FrameTracker::default();
        // Only the header of a 64-bit-length frame: refused before any payload.
        assert_eq!(t.feed(&header(true, 2, 1 << 20), 65_536), Err(1 << 20));
    }

    #[test]
    fn fragments_add_up_and_control_frames_between_them_do_not() {
        let mut t = FrameTracker::default();
        t.feed(&frame(false, 2, 40_000), 65_536).unwrap();
        t.feed(&frame(true, 9, 100), 65_536).unwrap(); // ping between fragments
        assert_eq!(t.feed(&frame(true, 0, 30_000), 65_536), Err(70_000));
        let mut t = FrameTracker::default();
        t.feed(&frame(false, 2, 40_000), 65_536).unwrap();
        t.feed(&frame(true, 0, 20_000), 65_536).unwrap();
        // The message ended: the next one starts from zero.
        t.feed(&frame(true, 2, 60_000), 65_536).unwrap();
    }
}
