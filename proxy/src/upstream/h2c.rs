//! HTTP/2 cleartext connections from the edge to one pod, shared by every gRPC stream the
//! edge sends there.
//!
//! Each pod keeps a few long-lived multiplexed connections ([`H2cSettings::connections`],
//! one per edge worker thread by default). A stream takes the connection of the slot its
//! worker thread maps to, so streams started on one worker share one connection and
//! rarely wake another worker; a connection that is full (`max_streams` in flight) passes
//! the stream to the next slot. Opening a connection is single-flight per slot: a burst
//! of streams to a new pod dials once, and when that dial fails every stream that waited
//! for it fails at once instead of dialling again (and waiting `connect_timeout` again)
//! one after the other.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;

/// How the edge talks HTTP/2 to pods; built once from `[upstream]`.
#[derive(Debug, Clone)]
pub struct H2cSettings {
    pub connect_timeout: Duration,
    pub tcp_keepalive: Duration,
    /// A PING this often; a connection whose PING is not answered within the next
    /// interval is closed (its streams fail, new ones dial again).
    pub ping_interval: Duration,
    /// Streams in flight on one connection before a stream tries another slot.
    pub max_streams: usize,
    /// Connections per pod (at most [`MAX_SLOTS`]).
    pub connections: usize,
    /// Flow-control windows the edge grants pods: how much a pod may send on one stream,
    /// and on one connection, before the edge has passed it on to the agent. They bound
    /// what the edge holds for a slow agent.
    pub stream_window: u32,
    pub connection_window: u32,
}

/// The most connections one pod gets from one edge.
pub const MAX_SLOTS: usize = 8;

/// Why no stream could be opened on a pod.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The pod did not take a connection: it gets no new traffic for the passive back-off.
    #[error("cannot connect to the pod: {0}")]
    Connect(String),
    /// The connection is going away (the pod sent GOAWAY, or it just closed): nothing was
    /// sent, another connection or pod may take the request.
    #[error("the pod's connection is closing: {0}")]
    Closing(h2::Error),
}

/// One live connection: the handle to open streams on it, and what it carries now.
struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Slot {
    live: ArcSwapOption<Connection>,
    /// Held while dialling, so one dial serves every stream waiting for the slot.
    dialling: tokio::sync::Mutex<()>,
    /// Dials that failed so far: a waiter that sees it change knows the dial it waited
    /// for failed.
    failures: AtomicU64,
}

/// A pod's connections, created empty with the pod and filled as streams need them.
#[derive(Default)]
pub struct PodConnections {
    slots: [Slot; MAX_SLOTS],
}

/// A stream opened on a pod: its answer to come, and the request body's way there.
pub struct PodStream {
    pub response: h2::client::ResponseFuture,
    pub body: h2::SendStream<Bytes>,
    /// Counts the stream against its connection's `max_streams` while it lives.
    _counted: StreamSlot,
}

struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// This thread's slot: threads take slots in turn as they first open a stream.
    static THREAD_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_THREAD_SLOT: AtomicUsize = AtomicUsize::new(0);

fn thread_slot() -> usize {
    THREAD_SLOT.with(|slot| match slot.get() {
        Some(n) => n,
        None => {
            let n = NEXT_THREAD_SLOT.fetch_add(1, Ordering::Relaxed);
            slot.set(Some(n));
            n
        }
    })
}

impl PodConnections {
    /// Opens a stream for `request` on `addr`, dialling when the chosen slot has no live
    /// connection. Fails before anything reached the pod, or not at all.
    pub async fn open(
        &self,
        addr: SocketAddr,
        settings: &H2cSettings,
        request: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<PodStream, OpenError> {
        let count = settings.connections.clamp(1, MAX_SLOTS);
        let first = thread_slot() % count;
        // The first slot with room, else the thread's own (h2 then waits for the pod's
        // stream limit).
        let chosen = (0..count)
            .map(|i| (first + i) % count)
            .find(|&i| {
                self.slots[i].live.load().as_ref().is_none_or(|c| {
                    c.closed.load(Ordering::Relaxed)
                        || c.streams.load(Ordering::Relaxed) < settings.max_streams
                })
            })
            .unwrap_or(first);
        let slot = &self.slots[chosen];
        let connection = match live(slot) {
            Some(c) => c,
            None => dial_once(slot, addr, settings).await?,
        };
        connection.streams.fetch_add(1, Ordering::Relaxed);
        let counted = StreamSlot(connection.streams.clone());
        let sent = match connection.send.clone().ready().await {
            Ok(mut send) => send.send_request(request, end_of_stream),
            Err(e) => Err(e),
        };
        match sent {
            Ok((response, body)) => Ok(PodStream {
                response,
                body,
                _counted: counted,
            }),
            Err(e) => {
                forget(slot, &connection);
                Err(OpenError::Closing(e))
            }
        }
    }

    /// Connections open to the pod now.
    pub fn connections(&self) -> usize {
        self.slots.iter().filter(|s| live(s).is_some()).count()
    }
}

fn live(slot: &Slot) -> Option<Arc<Connection>> {
    slot.live
        .load_full()
        .filter(|c| !c.closed.load(Ordering::Relaxed))
}

/// Drops `connection` from its slot unless another one already replaced it.
fn forget(slot: &Slot, connection: &Arc<Connection>) {
    let current = slot.live.load();
    if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, connection)) {
        slot.live.store(None);
    }
}

async fn dial_once(
    slot: &Slot,
    addr: SocketAddr,
    settings: &H2cSettings,
) -> Result<Arc<Connection>, OpenError> {
    let failures = slot.failures.load(Ordering::SeqCst);
    let _dialling = slot.dialling.lock().await;
    if let Some(c) = live(slot) {
        return Ok(c);
    }
    if slot.failures.load(Ordering::SeqCst) != failures {
        return Err(OpenError::Connect(
            "the dial this stream waited for failed".into(),
        ));
    }
    match dial(addr, settings).await {
        Ok(connection) => {
            let connection = Arc::new(connection);
            slot.live.store(Some(connection.clone()));
            Ok(connection)
        }
        Err(e) => {
            slot.failures.fetch_add(1, Ordering::SeqCst);
            Err(e)
        }
    }
}

async fn dial(addr: SocketAddr, settings: &H2cSettings) -> Result<Connection, OpenError> {
    let connect = |e: String| OpenError::Connect(e);
    let tcp = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| connect(format!("no answer within {:?}", settings.connect_timeout)))?
        .map_err(|e| connect(e.to_string()))?;
    tcp.set_nodelay(true).map_err(|e| connect(e.to_string()))?;
    crate::support::keepalive::apply(&tcp, settings.tcp_keepalive)
        .map_err(|e| connect(e.to_string()))?;
    let handshake = h2::client::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .enable_push(false)
        .handshake::<_, Bytes>(tcp);
    let (send, mut connection) = tokio::time::timeout(settings.connect_timeout, handshake)
        .await
        .map_err(|_| connect("no HTTP/2 handshake within the connect timeout".into()))?
        .map_err(|e| connect(format!("HTTP/2 handshake: {e}")))?;
    let closed = Arc::new(AtomicBool::new(false));
    let pinger = connection.ping_pong();
    let interval = settings.ping_interval;
    let done = closed.clone();
    tokio::spawn(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(pod = %addr, error = %e, "pod connection ended");
                }
            }
            why = keep_alive(pinger, interval) => {
                tracing::warn!(pod = %addr, why, "closing an unresponsive pod connection");
            }
        }
        done.store(true, Ordering::Relaxed);
    });
    Ok(Connection {
        send,
        closed,
        streams: Arc::new(AtomicUsize::new(0)),
    })
}

/// PINGs the pod every `interval`; returns when one goes unanswered for an interval (or
/// PINGs cannot be sent). Finds a pod that vanished without a FIN under idle streams.
async fn keep_alive(pinger: Option<h2::PingPong>, interval: Duration) -> &'static str {
    let Some(mut pinger) = pinger else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(interval, pinger.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return "PING failed",
            Err(_) => return "PING unanswered",
        }
    }
}
