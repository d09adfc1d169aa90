//! HTTP/2 cleartext connections from the edge to one pod, shared by every gRPC stream the
//! edge sends there.
//!
//! A pod gets a few long-lived multiplexed connections: one per edge worker thread
//! ([`H2cSettings::connections`]), so streams started on one worker share a connection
//! and rarely wake another worker, and more when those are full. A connection is full at
//! `max_streams` or at the pod's own SETTINGS_MAX_CONCURRENT_STREAMS (kas: hyper's 200),
//! whichever is lower: agents hold their streams for hours, so a stream must never wait
//! for a slot on a full connection. Dialling is single-flight per pod: a burst of streams
//! to a new pod dials once, and when that dial fails every stream that waited for it
//! fails at once instead of dialling again (and waiting `connect_timeout` again) in turn.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
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
    /// Streams in flight on one connection, at most (the pod may allow fewer).
    pub max_streams: usize,
    /// Connections per pod the edge keeps even when fewer would do: one per worker.
    pub connections: usize,
    /// Flow-control windows the edge grants pods: how much a pod may send on one stream,
    /// and on one connection, before the edge has passed it on to the agent. They bound
    /// what the edge holds for a slow agent.
    pub stream_window: u32,
    pub connection_window: u32,
}

/// The most connections one pod gets from one edge (at kas's 200 streams each, 12,800
/// streams); beyond, streams queue on the least-loaded connection.
pub const MAX_CONNECTIONS: usize = 64;

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

impl Connection {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn has_room(&self, settings: &H2cSettings) -> bool {
        let limit = settings
            .max_streams
            .min(self.send.current_max_send_streams());
        !self.is_closed() && self.streams.load(Ordering::Relaxed) < limit
    }
}

/// A pod's connections, created empty with the pod and filled as streams need them.
pub struct PodConnections {
    live: ArcSwap<Vec<Arc<Connection>>>,
    /// Held while dialling, so one dial serves every stream waiting for it.
    dialling: tokio::sync::Mutex<()>,
    /// Dials that failed so far: a waiter that sees it change knows the dial it waited
    /// for failed.
    failures: AtomicU64,
}

impl Default for PodConnections {
    fn default() -> Self {
        Self {
            live: ArcSwap::from_pointee(Vec::new()),
            dialling: tokio::sync::Mutex::new(()),
            failures: AtomicU64::new(0),
        }
    }
}

/// A stream opened on a pod: its answer to come, and the request body's way there.
pub struct PodStream {
    pub response: h2::client::ResponseFuture,
    pub body: h2::SendStream<Bytes>,
    /// Counts the stream against its connection's limit while it lives.
    _counted: StreamCount,
}

struct StreamCount(Arc<AtomicUsize>);

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

thread_local! {
    /// This thread's preferred connection: threads take them in turn as they first open
    /// a stream.
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
    /// Opens a stream for `request` on `addr`, dialling when no connection has room.
    /// Fails before anything reached the pod, or not at all.
    pub async fn open(
        &self,
        addr: SocketAddr,
        settings: &H2cSettings,
        request: http::Request<()>,
        end_of_stream: bool,
    ) -> Result<PodStream, OpenError> {
        let connection = match self.with_room(settings) {
            Some(c) => c,
            None => self.dial_once(addr, settings).await?,
        };
        connection.streams.fetch_add(1, Ordering::Relaxed);
        let counted = StreamCount(connection.streams.clone());
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
                self.forget(&connection);
                Err(OpenError::Closing(e))
            }
        }
    }

    /// The thread's own connection if it has room, else any with room; `None` when one
    /// more should be dialled (the thread has none yet, or all are full).
    fn with_room(&self, settings: &H2cSettings) -> Option<Arc<Connection>> {
        let list = self.live.load();
        let own = thread_slot() % settings.connections.max(1);
        if own >= list.len() {
            return None;
        }
        let n = list.len();
        (0..n)
            .map(|i| &list[(own + i) % n])
            .find(|c| c.has_room(settings))
            .cloned()
    }

    async fn dial_once(
        &self,
        addr: SocketAddr,
        settings: &H2cSettings,
    ) -> Result<Arc<Connection>, OpenError> {
        let failures = self.failures.load(Ordering::SeqCst);
        let _dialling = self.dialling.lock().await;
        if let Some(c) = self.with_room(settings) {
            return Ok(c);
        }
        if self.failures.load(Ordering::SeqCst) != failures {
            return Err(OpenError::Connect(
                "the dial this stream waited for failed".into(),
            ));
        }
        let open: Vec<Arc<Connection>> = self
            .live
            .load()
            .iter()
            .filter(|c| !c.is_closed())
            .cloned()
            .collect();
        if open.len() >= MAX_CONNECTIONS {
            // Bounded: the stream waits on the least-loaded connection instead.
            if let Some(least) = open
                .iter()
                .min_by_key(|c| c.streams.load(Ordering::Relaxed))
            {
                return Ok(least.clone());
            }
        }
        match dial(addr, settings).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                self.live.rcu(|list| {
                    let mut next: Vec<_> =
                        list.iter().filter(|c| !c.is_closed()).cloned().collect();
                    next.push(connection.clone());
                    next
                });
                Ok(connection)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Drops `connection` from the pod's list.
    fn forget(&self, connection: &Arc<Connection>) {
        self.live.rcu(|list| {
            list.iter()
                .filter(|c| !Arc::ptr_eq(c, connection))
                .cloned()
                .collect::<Vec<_>>()
        });
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
    let kill = Arc::new(tokio::sync::Notify::new());
    let mut pinger = connection.ping_pong();
    let (done, killed) = (closed.clone(), kill.clone());
    tokio::spawn(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(pod = %addr, error = %e, "pod connection ended");
                }
            }
            _ = killed.notified() => {}
        }
        done.store(true, Ordering::Relaxed);
    });
    // The pod's SETTINGS come before its PING answer: once answered, the connection's
    // stream limit is the pod's, not a guess a first burst of streams would overrun.
    if let Some(pinger) = pinger.as_mut() {
        let answered =
            tokio::time::timeout(settings.connect_timeout, pinger.ping(h2::Ping::opaque()));
        if !matches!(answered.await, Ok(Ok(_))) {
            kill.notify_one();
            return Err(connect("no answer to the first HTTP/2 PING".into()));
        }
    }
    tokio::spawn(keep_alive(
        pinger,
        settings.ping_interval,
        kill,
        closed.clone(),
        addr,
    ));
    Ok(Connection {
        send,
        closed,
        streams: Arc::new(AtomicUsize::new(0)),
    })
}

/// PINGs the pod every `interval` and ends the connection when one goes unanswered for
/// an interval: finds a pod that vanished without a FIN under idle streams.
async fn keep_alive(
    pinger: Option<h2::PingPong>,
    interval: Duration,
    kill: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicBool>,
    addr: SocketAddr,
) {
    let Some(mut pinger) = pinger else {
        return;
    };
    loop {
        tokio::time::sleep(interval).await;
        if closed.load(Ordering::Relaxed) {
            return;
        }
        match tokio::time::timeout(interval, pinger.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) if closed.load(Ordering::Relaxed) => return,
            _ => {
                tracing::warn!(pod = %addr, "closing a pod connection that stopped answering PINGs");
                kill.notify_one();
                return;
            }
        }
    }
}
