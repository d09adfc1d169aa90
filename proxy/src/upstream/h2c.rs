//! HTTP/2 cleartext connections from the edge to one pod, shared by every gRPC stream the
//! edge sends there.
//!
//! A pod gets a few long-lived multiplexed connections: one per edge worker thread
//! ([`H2cSettings::connections`]), so streams started on one worker share a connection
//! and rarely wake another worker, and more when those are full. A connection is full at
//! `max_streams` or at the pod's own SETTINGS_MAX_CONCURRENT_STREAMS (kas: hyper's 200)
//! less one kept for a probe ([`PodStream`]), whichever is lower: agents hold their
//! streams for hours, so a stream must never wait for a slot on a full connection.
//! Dialling is single-flight per pod: a burst of streams to a new pod dials once, and
//! when that dial fails every stream that waited for it fails at once instead of dialling
//! again (and waiting `connect_timeout` again) in turn. A connection dialled beyond those
//! one per worker is closed once it carried no stream for a [`RETIRE_SWEEP`]
//! ([`PodConnections::retire_idle`]): a burst (a rollout's reconnects, an attack's streams)
//! must not leave the edge and the pod holding its connections, and their buffers, for
//! as long as both run.
//!
//! Because every agent's streams share these connections, nothing one agent does may make
//! a pod close one, nor hold one back for the others:
//! - flow control: the connection's window is the streams' windows added up
//!   ([`H2cSettings::connection_window`]), so the answers an agent does not read fill its
//!   own streams' windows and never the window every stream shares;
//! - early resets: a pod closes a connection (GOAWAY ENHANCE_YOUR_CALM; h2's
//!   `max_pending_accept_reset_streams`, 20 in kas) on which too many streams were reset
//!   while still in its accept queue; the edge keeps such resets within
//!   [`EARLY_RESET_BUDGET`] ([`PodStream`]);
//! - the pod's other per-connection limits are out of an agent's reach: the edge opens no
//!   stream before the pod's SETTINGS arrived and never more than it allows (so it refuses
//!   none, which h2 counts), sends only requests its own HTTP/2 server accepted and
//!   rebuilt (no malformed header block or framing, which h2 also counts), header lists
//!   within [`crate::http::headers::POD_HEADER_LIST_MAX`], DATA framed by the edge so
//!   that small frames a pod would hold unread stay few (`http::h2::relay::upload`), and
//!   control frames of its own only (no agent's SETTINGS, PING or WINDOW_UPDATE is
//!   relayed): one PING per `ping_interval`, WINDOW_UPDATEs as h2 batches released bytes.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::support::sync::lock;

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
    /// How much a pod may send on one stream before the edge has passed it on to the
    /// agent: what the edge holds for an agent that does not read.
    pub stream_window: u32,
}

impl H2cSettings {
    /// The connection-level window the edge grants a pod: every stream's window added up
    /// (the streams the connection may carry, and the probe), so no stream's unread bytes
    /// ever use up what the others need. The streams' windows, not this, bound what the
    /// edge holds.
    pub fn connection_window(&self) -> u32 {
        let streams = u64::try_from(self.max_streams).unwrap_or(u64::MAX);
        let total = u64::from(self.stream_window).saturating_mul(streams.saturating_add(1));
        u32::try_from(total.min(MAX_WINDOW)).unwrap_or(u32::MAX)
    }
}

/// The largest flow-control window HTTP/2 allows (RFC 9113 6.9.1).
pub const MAX_WINDOW: u64 = (1 << 31) - 1;

/// Streams on one connection the edge may have reset before the pod answered them and
/// that may still wait in the pod's accept queue. h2 (hyper, kas) closes a connection on
/// which more than 20 streams were reset while waiting there: half of that, so the
/// bound holds with room to spare.
pub const EARLY_RESET_BUDGET: usize = 10;

/// The most connections one pod gets from one edge (at kas's 200 streams each, about
/// 12,700 streams); beyond, a stream goes to another pod.
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
    /// Every connection the pod may get from this edge is full.
    #[error("all {MAX_CONNECTIONS} connections to the pod are full")]
    Full,
    /// The client reset its stream before it was sent: nothing reached the pod.
    #[error("the client reset the stream")]
    Abandoned,
}

impl crate::upstream::connect::ConnectFailure for OpenError {
    fn pod_unreachable(&self) -> bool {
        matches!(self, OpenError::Connect(_))
    }

    /// Anything but a stream the client abandoned may go to another pod: nothing was sent.
    fn may_try_another(&self) -> bool {
        !matches!(self, OpenError::Abandoned)
    }
}

/// How often idle connections beyond the pod's one per worker are looked for: one that
/// opened no stream since the last look and carries none is closed, so an idle extra goes
/// within one to two of these.
pub const RETIRE_SWEEP: Duration = Duration::from_secs(10);

/// Set in [`Connection::streams`] once the connection is retired: its count is then never
/// below the limit, and a stream that raced the retirement sees the bit and goes elsewhere.
const RETIRED: usize = 1 << (usize::BITS - 2);

/// One live connection: the handle to open streams on it, and what it carries now.
struct Connection {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Streams open now (and [`RETIRED`] once retired).
    streams: Arc<AtomicUsize>,
    /// Streams ever opened, and that count at the last sweep: equal means none since.
    opened: AtomicU64,
    opened_at_sweep: AtomicU64,
    settling: Arc<Settling>,
}

impl Connection {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Counts a new stream; `None` when the connection was retired meanwhile.
    fn count_stream(&self) -> Option<StreamCount> {
        let before = self.streams.fetch_add(1, Ordering::SeqCst);
        let counted = StreamCount(self.streams.clone());
        if before & RETIRED != 0 {
            return None;
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        Some(counted)
    }

    /// Retires the connection if it opened no stream since the last sweep and carries
    /// none now: no stream can be counted on it afterwards. The caller drops it from the
    /// list; h2 then ends it with GOAWAY once the last handle goes.
    fn retire_if_idle(&self) -> bool {
        let opened = self.opened.load(Ordering::Relaxed);
        let quiet = self.opened_at_sweep.swap(opened, Ordering::Relaxed) == opened;
        if !quiet
            || self
                .streams
                .compare_exchange(0, RETIRED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return false;
        }
        self.closed.store(true, Ordering::Relaxed);
        // The prober holds a handle too: let it see `closed` and go.
        self.settling.want_probe.notify_one();
        true
    }

    fn has_room(&self, settings: &H2cSettings) -> bool {
        // One of the pod's slots stays free for a probe (see `probe_when_asked`).
        let pod = self
            .send
            .current_max_send_streams()
            .saturating_sub(1)
            .max(1);
        let limit = settings.max_streams.min(pod);
        !self.is_closed() && self.streams.load(Ordering::Relaxed) < limit
    }
}

/// What a connection knows about the streams in its pod's accept queue.
///
/// h2 hands a server's streams to its application in the order they were opened, and a
/// pod answers a stream only after taking it: once the pod answered stream `n`, every
/// stream opened before it has left the queue, and a reset of any of them no longer
/// counts against the pod's limit. Resets of streams not known to have left it are
/// "unsettled"; at most [`EARLY_RESET_BUDGET`] are. A stream that would exceed that waits
/// (holding its slot) until the pod answers it or a later stream: when nothing else does,
/// a probe (a health check, answered at once) is sent for it.
#[derive(Default)]
struct Settling {
    /// The highest stream id the pod answered.
    answered: AtomicU32,
    /// Stream ids reset before they were answered, above `answered` when they were reset.
    unsettled: Mutex<Vec<u32>>,
    /// Streams waiting to be reset.
    waiting: AtomicUsize,
    /// Wakes them when `answered` moves.
    moved: Notify,
    /// Asks for a probe.
    want_probe: Notify,
}

impl Settling {
    /// The pod answered stream `id`.
    fn answered(&self, id: u32) {
        let before = self.answered.fetch_max(id, Ordering::SeqCst);
        if id > before && self.waiting.load(Ordering::SeqCst) > 0 {
            self.moved.notify_waiters();
        }
    }

    /// Takes a place in the budget for resetting unanswered stream `id`, if there is one.
    fn reserve_early_reset(&self, id: u32) -> bool {
        let mut unsettled = lock(&self.unsettled);
        let answered = self.answered.load(Ordering::SeqCst);
        unsettled.retain(|&reset| reset > answered);
        if unsettled.len() < EARLY_RESET_BUDGET {
            unsettled.push(id);
            true
        } else {
            false
        }
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
///
/// Dropping it ends the stream. h2 resets a stream whose last handle goes; once the pod
/// answered, that is harmless. Before, the reset is one of the connection's early resets
/// ([`Settling`]): sent at once within the budget, else the stream is kept (a small task
/// holds it and its slot) until its reset can no longer count, or the pod answers it.
pub struct PodStream {
    /// `None` only while dropping.
    open: Option<Open>,
}

struct Open {
    answer: PodAnswer,
    body: SendStream<Bytes>,
    /// Counts the stream against its connection's limit while it lives.
    _counted: StreamCount,
}

/// The pod's answer to a stream, to come.
pub struct PodAnswer {
    /// Until the head arrives (or the stream fails).
    pending: Option<ResponseFuture>,
    id: u32,
    settling: Arc<Settling>,
}

impl PodAnswer {
    /// Waits for the pod's answer head. Cancel-safe: the stream stays unanswered if this is
    /// dropped while it waits. A second call fails (the head was taken).
    pub async fn head(&mut self) -> Result<http::Response<RecvStream>, h2::Error> {
        let Some(pending) = self.pending.as_mut() else {
            return Err(h2::Error::from(Reason::INTERNAL_ERROR));
        };
        let answer = pending.await;
        self.pending = None;
        // h2 answers an oversized header list itself, before the pod took the stream.
        if let Ok(response) = &answer {
            if response.status() != http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
                self.settling.answered(self.id);
            }
        }
        answer
    }
}

impl PodStream {
    /// The answer to come and the request body's way to the pod, to use side by side.
    pub fn parts(&mut self) -> (&mut PodAnswer, &mut SendStream<Bytes>) {
        let open = self
            .open
            .as_mut()
            .expect("a PodStream holds its stream until dropped");
        (&mut open.answer, &mut open.body)
    }
}

impl Drop for PodStream {
    fn drop(&mut self) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        if open.answer.pending.is_none() {
            // Answered (or failed): h2's reset as the handles go cannot count.
            return;
        }
        if open.answer.settling.reserve_early_reset(open.answer.id) {
            open.body.send_reset(Reason::CANCEL);
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(open.reset_once_settled());
        }
    }
}

impl Open {
    /// Resets an unanswered stream as soon as its reset fits the budget, or lets it go
    /// once the pod answers it (or its connection ends).
    async fn reset_once_settled(mut self) {
        let settling = self.answer.settling.clone();
        settling.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&settling.waiting);
        loop {
            let moved = settling.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if settling.reserve_early_reset(self.answer.id) {
                self.body.send_reset(Reason::CANCEL);
                return;
            }
            settling.want_probe.notify_one();
            tokio::select! {
                _ = self.answer.head() => return,
                _ = moved => {}
            }
        }
    }
}

/// Counts a stream among those waiting for their reset while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
    /// Fails before anything reached the pod, or not at all. `abandoned` is asked last,
    /// right before the stream is sent: a client that reset its stream by then (in the
    /// very write that opened it, say) sends nothing to the pod.
    pub async fn open(
        &self,
        addr: SocketAddr,
        settings: &H2cSettings,
        request: http::Request<()>,
        end_of_stream: bool,
        abandoned: &mut (dyn FnMut() -> bool + Send),
    ) -> Result<PodStream, OpenError> {
        // A connection retired between being chosen and counting the stream is skipped;
        // the retired one has left the list, so the next choice is another (or a dial).
        let mut choice = 0;
        let (connection, counted) = loop {
            let connection = match self.with_room(settings) {
                Some(c) => c,
                None => self.dial_once(addr, settings).await?,
            };
            if let Some(counted) = connection.count_stream() {
                break (connection, counted);
            }
            choice += 1;
            if choice >= 3 {
                return Err(OpenError::Full);
            }
        };
        let mut send = match connection.send.clone().ready().await {
            Ok(send) => send,
            Err(e) => {
                self.forget(&connection);
                return Err(OpenError::Closing(e));
            }
        };
        if abandoned() {
            return Err(OpenError::Abandoned);
        }
        match send.send_request(request, end_of_stream) {
            Ok((response, body)) => Ok(PodStream {
                open: Some(Open {
                    answer: PodAnswer {
                        id: u32::from(response.stream_id()),
                        pending: Some(response),
                        settling: connection.settling.clone(),
                    },
                    body,
                    _counted: counted,
                }),
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
            // Bounded, and a full connection takes no more: its window is sized for the
            // streams it may carry.
            return Err(OpenError::Full);
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

    /// Closes the connections beyond the first `settings.connections` open ones that
    /// opened no stream since the last call and carry none; called every
    /// [`RETIRE_SWEEP`]. Returns how many it closed.
    pub fn retire_idle(&self, settings: &H2cSettings) -> usize {
        let list = self.live.load();
        let retired: Vec<&Arc<Connection>> = list
            .iter()
            .filter(|c| !c.is_closed())
            .skip(settings.connections.max(1))
            .filter(|c| c.retire_if_idle())
            .collect();
        for connection in &retired {
            self.forget(connection);
        }
        retired.len()
    }

    /// Connections open now (for the pod's metrics).
    pub fn open_connections(&self) -> usize {
        self.live.load().iter().filter(|c| !c.is_closed()).count()
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
        .initial_connection_window_size(settings.connection_window())
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
    let settling = Arc::new(Settling::default());
    tokio::spawn(probe_when_asked(
        settling.clone(),
        send.clone(),
        closed.clone(),
        addr,
    ));
    Ok(Connection {
        send,
        closed,
        streams: Arc::new(AtomicUsize::new(0)),
        opened: AtomicU64::new(0),
        opened_at_sweep: AtomicU64::new(0),
        settling,
    })
}

/// How long the prober waits before trying again after a probe failed.
const PROBE_RETRY: Duration = Duration::from_millis(100);

/// Sends a probe, one at a time, whenever a stream waits for its reset: a stream the pod
/// answers at once (a gRPC health check), opened after every stream waiting, whose answer
/// settles them all ([`Settling`]). It takes the slot `has_room` keeps free.
async fn probe_when_asked(
    settling: Arc<Settling>,
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    addr: SocketAddr,
) {
    loop {
        if settling.waiting.load(Ordering::SeqCst) == 0 {
            settling.want_probe.notified().await;
        }
        if closed.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut ready) = send.clone().ready().await else {
            return;
        };
        let Ok((response, mut body)) = ready.send_request(probe(addr), false) else {
            return;
        };
        let id = u32::from(response.stream_id());
        // An empty `HealthCheckRequest`, which also ends the request.
        let _ = body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        match response.await {
            Ok(head) if head.status() != http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                settling.answered(id);
            }
            _ if closed.load(Ordering::Relaxed) => return,
            _ => tokio::time::sleep(PROBE_RETRY).await,
        }
    }
}

/// The probe: kas answers a health check at once, without authentication.
fn probe(addr: SocketAddr) -> http::Request<()> {
    let mut request = http::Request::new(());
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query("/grpc.health.v1.Health/Check")
        .build()
        .unwrap_or_default();
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    request
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

#[cfg(test)]
mod tests {
    use kas_testkit::wait::eventually;

    use super::*;

    /// An HTTP/2 server standing in for a pod: allows `max_streams` streams per
    /// connection, answers probes at once and other streams once `release` is true, and
    /// counts the connections it accepted and saw end.
    struct FakePod {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        release: tokio::sync::watch::Sender<bool>,
    }

    async fn fake_pod(max_streams: u32) -> FakePod {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = tokio::sync::watch::channel(false);
        let (accepted, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, e) = (accepted.clone(), ended.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (ended, released) = (e.clone(), released.clone());
                tokio::spawn(async move {
                    let handshake = h2::server::Builder::new()
                        .max_concurrent_streams(max_streams)
                        .handshake::<_, Bytes>(tcp);
                    if let Ok(mut connection) = handshake.await {
                        while let Some(Ok((request, mut respond))) = connection.accept().await {
                            let mut released = released.clone();
                            tokio::spawn(async move {
                                if request.uri().path() != "/grpc.health.v1.Health/Check" {
                                    let _ = released.wait_for(|go| *go).await;
                                }
                                let _ = respond.send_response(http::Response::new(()), true);
                            });
                        }
                    }
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        FakePod {
            addr,
            accepted,
            ended,
            release,
        }
    }

    fn settings() -> H2cSettings {
        H2cSettings {
            connect_timeout: Duration::from_secs(5),
            tcp_keepalive: Duration::from_secs(60),
            ping_interval: Duration::from_secs(60),
            max_streams: 100,
            connections: 1,
            stream_window: 65_535,
        }
    }

    async fn open(pod: &PodConnections, addr: SocketAddr) -> PodStream {
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("http://{addr}/test"))
            .body(())
            .unwrap();
        pod.open(addr, &settings(), request, true, &mut || false)
            .await
            .expect("a stream on the pod")
    }

    /// `n` streams opened one after another.
    async fn open_many(pod: &PodConnections, addr: SocketAddr, n: usize) -> Vec<PodStream> {
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            streams.push(open(pod, addr).await);
        }
        streams
    }

    /// Waits (at most 5 s) until the pod saw `n` of its connections end.
    async fn pod_sees_ends(pod: &FakePod, n: usize) {
        let what = format!("the pod sees {n} connections end");
        eventually(&what, Duration::from_secs(5), || async {
            pod.ended.load(Ordering::SeqCst) >= n
        })
        .await;
    }

    #[tokio::test]
    async fn connections_a_burst_added_close_once_idle_and_the_usual_one_stays() {
        // Two streams per connection (the pod allows 3, one slot kept for a probe).
        let pod = fake_pod(3).await;
        let connections = PodConnections::default();
        let mut burst = open_many(&connections, pod.addr, 5).await;
        assert_eq!(
            connections.open_connections(),
            3,
            "5 streams need 3 connections"
        );
        assert_eq!(pod.accepted.load(Ordering::SeqCst), 3);

        // While they carry streams, nothing is closed however often the sweep runs.
        for _ in 0..3 {
            assert_eq!(connections.retire_idle(&settings()), 0);
        }
        pod.release.send(true).unwrap();
        for stream in &mut burst {
            stream.parts().0.head().await.expect("the pod's answer");
        }
        drop(burst);

        // No stream opened since the last sweep and none left: both extras go.
        assert_eq!(
            connections.retire_idle(&settings()),
            2,
            "both extras were idle"
        );
        assert_eq!(connections.open_connections(), 1);
        pod_sees_ends(&pod, 2).await;
        assert_eq!(pod.ended.load(Ordering::SeqCst), 2, "both extras, no more");
        // The usual connection still serves, without a dial.
        let mut again = open(&connections, pod.addr).await;
        again
            .parts()
            .0
            .head()
            .await
            .expect("an answer on the kept connection");
        assert_eq!(pod.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pod.ended.load(Ordering::SeqCst), 2);
        assert_eq!(
            connections.retire_idle(&settings()),
            0,
            "never the last one"
        );
    }

    #[tokio::test]
    async fn an_extra_connection_with_a_stream_or_a_recent_one_stays() {
        let pod = fake_pod(3).await;
        let connections = PodConnections::default();
        let mut held = open_many(&connections, pod.addr, 3).await;
        assert_eq!(connections.open_connections(), 2);
        // The extra carries a stream: it stays.
        assert_eq!(connections.retire_idle(&settings()), 0);
        assert_eq!(connections.retire_idle(&settings()), 0);
        pod.release.send(true).unwrap();
        let last = held.pop().unwrap();
        drop(last);
        // Quiet now, but a stream came and went since the last sweep: it stays once more.
        let mut third = open(&connections, pod.addr).await;
        third.parts().0.head().await.unwrap();
        drop(third);
        assert_eq!(connections.retire_idle(&settings()), 0);
        assert_eq!(connections.retire_idle(&settings()), 1);
        pod_sees_ends(&pod, 1).await;
        assert_eq!(pod.ended.load(Ordering::SeqCst), 1);
        // The streams on the usual connection were not touched.
        for stream in &mut held {
            stream
                .parts()
                .0
                .head()
                .await
                .expect("answered on the kept connection");
        }
    }

    #[test]
    fn a_retired_connection_counts_no_stream() {
        let streams = Arc::new(AtomicUsize::new(0));
        assert!(streams
            .compare_exchange(0, RETIRED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok());
        // What `count_stream` sees for a stream that raced the retirement.
        let before = streams.fetch_add(1, Ordering::SeqCst);
        drop(StreamCount(streams.clone()));
        assert_ne!(before & RETIRED, 0);
        assert_eq!(streams.load(Ordering::SeqCst), RETIRED);
    }
}
