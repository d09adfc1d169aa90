//! A Kubernetes API server stand-in: plain HTTP/1.1 on a loopback address serving what real
//! `kubectl` needs for `get` (legacy discovery, `/version`, pods and namespaces, server-side
//! printed tables), `get -w` (chunked watch events pushed by the test while the call is
//! open), `logs -f` (lines pushed over time), `create` (a POST echoed back), `exec` over
//! websocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and a raw upgrade echo.
//!
//! It records every request ([`RecordedRequest`]), which is the point: the agent's replay
//! of a request that crossed the edge, kas and a reverse tunnel ends here, and a test asserts
//! what arrived (`Impersonate-*`, `Via`) and what must not (`Authorization`, `Cookie`).
//!
//! It is a test fixture, not a cluster: no auth, no admission, one API group (core `v1`).
//! Odd input gets a `Status` error, never a panic.

mod echo;
mod exec;
mod objects;
mod openapi;
mod query;
mod record;
mod response;
mod routes;
mod store;
mod stream;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use objects::GIT_VERSION;
pub use record::{RecordedRequest, KEPT_REQUESTS};
pub use store::PodState;

/// The largest request body the stand-in reads and records; a larger one gets 413.
pub const MAX_BODY: usize = 1 << 20;

/// How long a watch, `logs -f` or exec session may stay open at most, so no fixture task
/// outlives a stuck test for long. A watch's own `timeoutSeconds` is shorter when given.
pub const MAX_STREAM: Duration = Duration::from_secs(600);

/// The pod the stand-in starts with, running, in namespace `default`.
pub const DEFAULT_POD: (&str, &str) = ("default", "web-0");
/// A second pod, in namespace `kube-system`, so `get pods -A` lists more than one namespace.
pub const SYSTEM_POD: (&str, &str) = ("kube-system", "coredns-0");
/// The single container of the fixture pods.
pub const CONTAINER: &str = "main";

pub(crate) struct State {
    store: store::Store,
    recorder: record::Recorder,
    /// `host:port` the stand-in listens on, reported in discovery.
    server_address: String,
    /// Open watch streams, so a test knows when an event it pushes will be seen.
    watches: AtomicUsize,
    /// Open `logs?follow=true` streams.
    followers: AtomicUsize,
    /// Open exec sessions.
    execs: AtomicUsize,
    shutdown: CancellationToken,
}

/// Counts an open stream for as long as it lives.
pub(crate) struct OpenGuard<'a>(&'a AtomicUsize);

impl<'a> OpenGuard<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running stand-in. Dropping it stops it and ends every open stream.
pub struct KubeApi {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl KubeApi {
    /// Listens on `listen` (port 0: any) with two running pods ([`DEFAULT_POD`],
    /// [`SYSTEM_POD`]), each with two log lines.
    pub async fn start(listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            store: store::Store::new(),
            recorder: record::Recorder::default(),
            server_address: addr.to_string(),
            watches: AtomicUsize::new(0),
            followers: AtomicUsize::new(0),
            execs: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
        });
        for ns in ["default", "kube-system"] {
            state.store.add_namespace(ns);
        }
        for (ns, name) in [DEFAULT_POD, SYSTEM_POD] {
            state.store.put_pod(ns, name, "Running", &[CONTAINER]);
            state.store.log(ns, name, &format!("{name} started"));
            state.store.log(ns, name, &format!("{name} ready"));
        }
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(Self { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://host:port`, the base URL an agent replays requests against.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far (the last [`KEPT_REQUESTS`]), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.recorder.all()
    }

    /// The most recent request whose path is `path`.
    pub fn last_request(&self, path: &str) -> Option<RecordedRequest> {
        self.requests().into_iter().rev().find(|r| r.path == path)
    }

    pub fn clear_requests(&self) {
        self.state.recorder.clear();
    }

    /// Adds a running pod (or replaces one) with container [`CONTAINER`]; open watches see
    /// `ADDED` (or `MODIFIED`).
    pub fn add_pod(&self, namespace: &str, name: &str) {
        self.state
            .store
            .put_pod(namespace, name, "Running", &[CONTAINER]);
    }

    /// Sets a pod's phase (`Pending`, `Running`, `Succeeded`, `Failed`); open watches see
    /// `MODIFIED`. False if there is no such pod.
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) -> bool {
        self.state.store.set_phase(namespace, name, phase)
    }

    /// Removes a pod; open watches see `DELETED`. False if there is no such pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.state.store.delete_pod(namespace, name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodState> {
        self.state.store.pod(namespace, name)
    }

    /// Appends a line to a pod's log; open `logs -f` streams of that pod get it at once.
    pub fn log(&self, namespace: &str, pod: &str, line: &str) {
        self.state.store.log(namespace, pod, line);
    }

    /// Ends the log of a pod: open `logs -f` streams of it finish (kubectl exits 0) and
    /// later ones answer the lines so far and finish at once.
    pub fn end_log(&self, namespace: &str, pod: &str) {
        self.state.store.log(namespace, pod, stream::END_OF_LOG);
    }

    /// An object created through the API (`POST`), e.g. `("configmaps", "default", "cm1")`.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<serde_json::Value> {
        self.state.store.object(resource, namespace, name)
    }

    /// Open watch streams now.
    pub fn open_watches(&self) -> usize {
        self.state.watches.load(Ordering::SeqCst)
    }

    /// Open `logs?follow=true` streams now.
    pub fn open_log_follows(&self) -> usize {
        self.state.followers.load(Ordering::SeqCst)
    }

    /// Open exec sessions now.
    pub fn open_execs(&self) -> usize {
        self.state.execs.load(Ordering::SeqCst)
    }

    /// Writes a kubeconfig for talking to the stand-in directly (no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            crate::dev::kubeconfig::kubeconfig(&self.url(), None, None),
        )
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
        self.task.abort();
    }
}

/// Accepts until shutdown; each connection is served until its client closes it or the
/// stand-in stops.
async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = state.shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            // Out of descriptors or similar: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = {
                let state = state.clone();
                service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(routes::handle(state, req).await) }
                })
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                () = state.shutdown.cancelled() => {}
            }
        });
    }
}
