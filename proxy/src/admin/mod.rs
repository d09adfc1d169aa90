//! The edge's own plain-HTTP endpoints, served outside pingora so they keep answering
//! while pingora's listeners drain. Two listeners with different audiences, on different
//! runtimes (see `app`):
//! - [`private`]: the admin port, `/healthz`, `/readyz` (503 from the first moment of a
//!   drain, and until discovery and the blocklist ConfigMap have produced a first result),
//!   `/metrics` — for the kubelet and Prometheus, never exposed publicly; on the
//!   control-plane runtime;
//! - [`public`]: the optional `:80` listener, health and ACME paths answered (or relayed to
//!   the replica that runs ACME), everything else redirected to https; on a runtime of its
//!   own, so a flood there cannot delay health checks or `/readyz`.
//!
//! Both are served by [`serve`], which bounds every connection: a global and a per-client
//! cap (by the same /32 or /64 key as the TLS port's limits), an admission check at accept
//! (before a byte is read), a header deadline, and a total lifetime.

pub mod private;
pub mod public;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::support::net::{canonical, ClientKey};
use crate::support::status::SourceStatus;
use crate::support::sync::lock;
use crate::telemetry::metrics::{EdgeMetrics, GaugeGuard};
use crate::upstream::discovery::DiscoveryStatus;
use crate::upstream::pool::Pool;

/// What both listeners answer from: readiness (with the pods and metrics behind it) and,
/// for the public listener, where https is and how ACME challenges are answered.
pub struct AdminState {
    pub ready: AtomicBool,
    pub pool: Arc<Pool>,
    pub metrics: EdgeMetrics,
    /// Whether discovery has produced a first result.
    pub discovery: Arc<DiscoveryStatus>,
    /// With `policies.blocklist_configmap`: whether the ConfigMap has been read once. A
    /// replica that has not would admit clients every other replica refuses.
    pub blocklist_watch: Option<Arc<SourceStatus>>,
    pub https_port: u16,
    /// Set when certificates come from ACME.
    pub acme: Option<Arc<crate::listener::acme::Acme>>,
    /// `host:port` of the replica that runs ACME, for challenges this one cannot answer.
    pub acme_relay: Option<String>,
}

impl AdminState {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(self.is_ready()));
    }

    /// Ready while not draining, once discovery has produced a first result, the blocklist
    /// ConfigMap (when configured) has been read and, with ACME, once a certificate is there
    /// to serve.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Err` says why the edge is not ready, for `/readyz`'s body.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err("draining or not yet accepting".into());
        }
        self.discovery.readiness()?;
        if let Some(watch) = &self.blocklist_watch {
            watch.readiness()?;
        }
        if self
            .acme
            .as_ref()
            .is_some_and(|acme| !acme.has_certificate())
        {
            return Err("waiting for the ACME certificate".into());
        }
        Ok(())
    }
}

pub(crate) type Body = Full<Bytes>;
/// A handler's answer; most are immediate, a relayed ACME challenge is not.
pub type Reply = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

pub(crate) fn now(response: Response<Body>) -> Reply {
    Box::pin(std::future::ready(response))
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Decides at accept, before any byte is read, whether a client may connect.
pub type Admit = Arc<dyn Fn(IpAddr) -> bool + Send + Sync>;

/// A cap on the connections one client holds at once. `key` says who "one client" is:
/// the TLS port's limits count by the network around an address (IPv6 /64 by default),
/// so a client rotating addresses within its /64 is still one client here too.
#[derive(Clone)]
pub struct PerClientCap {
    pub limit: usize,
    pub key: Arc<dyn Fn(IpAddr) -> ClientKey + Send + Sync>,
}

/// The bounds of one plain-HTTP listener.
#[derive(Clone)]
pub struct ServeLimits {
    /// `listener` label of the metrics (`http`, `admin`).
    pub listener: &'static str,
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Connections open at once from one client, if limited.
    pub per_client: Option<PerClientCap>,
    /// Time for a request's headers, and the longest idle wait between requests.
    pub header_timeout: Duration,
    /// Total life of a connection; then it is closed whatever it is doing.
    pub lifetime: Duration,
    /// Checked first for every new connection; `false` closes it at once.
    pub admit: Option<Admit>,
}

/// Request heads are a few hundred bytes; hyper's default buffer allows 400 KiB.
const MAX_BUF: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// Open connections per client key. An entry exists only while its client holds a
/// connection, and every connection first holds one of `max_connections` permits, so the
/// table never has more than `max_connections` entries.
struct PerClient {
    cap: PerClientCap,
    open: Mutex<HashMap<ClientKey, usize>>,
}

struct PerClientGuard {
    table: Arc<PerClient>,
    key: ClientKey,
}

impl PerClient {
    fn new(cap: PerClientCap) -> Arc<Self> {
        Arc::new(Self {
            cap,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn try_hold(self: &Arc<Self>, ip: IpAddr) -> Option<PerClientGuard> {
        let key = (self.cap.key)(ip);
        let mut open = lock(&self.open);
        let count = open.entry(key).or_insert(0);
        if *count >= self.cap.limit {
            return None;
        }
        *count += 1;
        Some(PerClientGuard {
            table: self.clone(),
            key,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.open).len()
    }
}

impl Drop for PerClientGuard {
    fn drop(&mut self) {
        let mut open = lock(&self.table.open);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Serves `handler` on `listener` over HTTP/1.1 until the process ends, within `limits`.
/// Every task it starts runs on the runtime that runs this future.
pub async fn serve<F>(listener: TcpListener, handler: F, limits: ServeLimits, metrics: EdgeMetrics)
where
    F: Fn(&Request<Incoming>) -> Reply + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF)
        .max_headers(MAX_HEADERS);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_client = limits.per_client.clone().map(PerClient::new);
    let open = metrics
        .plain_http_connections
        .with_label_values(&[limits.listener]);
    let dropped = |reason: &str| {
        metrics
            .plain_http_dropped
            .with_label_values(&[limits.listener, reason])
    };
    let (by_policy, at_max, at_max_per_ip, at_lifetime) = (
        dropped("policy"),
        dropped("max_connections"),
        dropped("max_connections_per_ip"),
        dropped("lifetime"),
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(listener = limits.listener, error = %e, "plain-HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ip = canonical(peer.ip());
        // Refusals drop the socket before reading a byte.
        if limits.admit.as_ref().is_some_and(|admit| !admit(ip)) {
            by_policy.inc();
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            at_max.inc();
            continue;
        };
        let client_guard = match &per_client {
            Some(table) => match table.try_hold(ip) {
                Some(guard) => Some(guard),
                None => {
                    at_max_per_ip.inc();
                    continue;
                }
            },
            None => None,
        };
        let handler = handler.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let reply = handler(&req);
                async move { Ok::<_, Infallible>(reply.await) }
            }),
        );
        let held = GaugeGuard::hold(open.clone());
        let lifetime = limits.lifetime;
        let at_lifetime = at_lifetime.clone();
        tokio::spawn(async move {
            let _held = (permit, client_guard, held);
            if tokio::time::timeout(lifetime, conn).await.is_err() {
                at_lifetime.inc();
            }
        });
    }
}

/// Binds a fixed-address listener now so a busy port fails start-up with a
/// clear message instead of later inside a task.
pub async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {what} {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::net::{client_key, KeyPrefixes};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    const WAIT: Duration = Duration::from_secs(5);

    fn by_default_keys(limit: usize) -> PerClientCap {
        PerClientCap {
            limit,
            key: Arc::new(|ip| client_key(ip, KeyPrefixes::default())),
        }
    }

    #[test]
    fn per_client_table_holds_at_most_the_limit_and_forgets_closed_clients() {
        let table = PerClient::new(by_default_keys(2));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = table.try_hold(a).unwrap();
        let second = table.try_hold(a).unwrap();
        assert!(table.try_hold(a).is_none(), "third from one address");
        let other = table.try_hold(b).unwrap();
        assert_eq!(table.len(), 2);
        drop((first, second, other));
        assert_eq!(table.len(), 0, "entries leave with their last connection");
    }

    #[test]
    fn addresses_of_one_ipv6_slash_64_are_one_client() {
        let table = PerClient::new(by_default_keys(2));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let first = table.try_hold(ip("2001:db8:1:2::1")).unwrap();
        let second = table.try_hold(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(
            table.try_hold(ip("2001:db8:1:2:abcd::7")).is_none(),
            "a third address of the same /64"
        );
        let neighbour = table.try_hold(ip("2001:db8:1:3::1")).unwrap();
        assert_eq!(table.len(), 2);
        drop((first, second, neighbour));
        assert_eq!(table.len(), 0);
    }

    /// A connection from `from` to `addr`.
    async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(from.parse().unwrap(), 0))
            .unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// True if the server closed `stream` (EOF or reset) within `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 512];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    async fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Serves a handler that answers `/` at once and never answers `/hang`.
    async fn start(limits: ServeLimits, metrics: &EdgeMetrics) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = |req: &Request<Incoming>| -> Reply {
            if req.uri().path() == "/hang" {
                Box::pin(std::future::pending())
            } else {
                now(text(StatusCode::OK, "ok\n"))
            }
        };
        tokio::spawn(serve(listener, handler, limits, metrics.clone()));
        addr
    }

    fn limits() -> ServeLimits {
        ServeLimits {
            listener: "http",
            max_connections: 2,
            per_client: Some(by_default_keys(1)),
            header_timeout: Duration::from_secs(30),
            lifetime: Duration::from_secs(30),
            admit: None,
        }
    }

    #[tokio::test]
    async fn refuses_over_the_caps_and_refused_clients_before_reading() {
        let metrics = EdgeMetrics::new();
        let blocked: IpAddr = "127.0.0.9".parse().unwrap();
        let addr = start(
            ServeLimits {
                admit: Some(Arc::new(move |ip| ip != blocked)),
                ..limits()
            },
            &metrics,
        )
        .await;
        let open = metrics.plain_http_connections.with_label_values(&["http"]);
        let dropped = |reason: &str| {
            metrics
                .plain_http_dropped
                .with_label_values(&["http", reason])
                .get()
        };

        let mut refused = connect_from("127.0.0.9", addr).await;
        assert!(closed_within(&mut refused, WAIT).await, "admission refused");
        assert_eq!(dropped("policy"), 1);

        let mut first = connect_from("127.0.0.2", addr).await;
        wait_for("first connection held", || open.get() == 1).await;
        let mut same_ip = connect_from("127.0.0.2", addr).await;
        assert!(closed_within(&mut same_ip, WAIT).await, "per-IP cap");
        assert_eq!(dropped("max_connections_per_ip"), 1);

        let mut second = connect_from("127.0.0.3", addr).await;
        wait_for("second connection held", || open.get() == 2).await;
        let mut third = connect_from("127.0.0.4", addr).await;
        assert!(closed_within(&mut third, WAIT).await, "global cap");
        assert_eq!(dropped("max_connections"), 1);

        // The held ones still work, and closing one frees its place.
        first
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = first.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        drop(first);
        wait_for("first connection released", || open.get() == 1).await;
        let mut again = connect_from("127.0.0.2", addr).await;
        wait_for("a new connection held", || open.get() == 2).await;
        assert!(!closed_within(&mut again, Duration::from_millis(200)).await);
        assert!(!closed_within(&mut second, Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn silent_and_stuck_connections_are_closed_in_time() {
        let metrics = EdgeMetrics::new();
        let addr = start(
            ServeLimits {
                per_client: None,
                header_timeout: Duration::from_millis(300),
                lifetime: Duration::from_millis(800),
                ..limits()
            },
            &metrics,
        )
        .await;
        // Sends nothing: closed at the header deadline.
        let started = tokio::time::Instant::now();
        let mut silent = connect_from("127.0.0.2", addr).await;
        assert!(closed_within(&mut silent, WAIT).await);
        assert!(
            started.elapsed() < Duration::from_millis(750),
            "{:?}",
            started.elapsed()
        );

        // A request that never completes: cut at the connection's lifetime.
        let mut stuck = connect_from("127.0.0.2", addr).await;
        stuck
            .write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(closed_within(&mut stuck, WAIT).await);
        assert_eq!(
            metrics
                .plain_http_dropped
                .with_label_values(&["http", "lifetime"])
                .get(),
            1
        );
        let open = metrics.plain_http_connections.with_label_values(&["http"]);
        wait_for("no connection left", || open.get() == 0).await;
    }
}
