//! A Kubernetes API server stand-in: plain HTTP/1.1 on a loopback address serving what real
//! `kubectl` needs for `get` (legacy discovery, `/version`, pods and namespaces, server-side
//! printed tables), `get -w` (chunked watch events pushed by the test while the call is
//! open), `logs -f` (lines pushed over time), `create` (a POST echoed back), `exec` over
//! websocket (`v5.channel.k8s.io`, `v4.channel.k8s.io`) and a raw upgrade echo; and
//! ConfigMaps with resourceVersions as the edge's blocklist watch and `kas-edge block` need
//! them ([`configmaps`]: resumable watches, bookmarks, 409 on a stale update), with an
//! outage switch ([`KubeApi::set_outage`]).
//!
//! It records every request ([`RecordedRequest`]), which is the point: the agent's replay
//! of a request that crossed the edge, kas and a reverse tunnel ends here, and a test asserts
//! what arrived (`Impersonate-*`, `Via`) and what must not (`Authorization`, `Cookie`).
//!
//! It is a test fixture, not a cluster: no auth, no admission, one API group (core `v1`).
//! Odd input gets a `Status` error, never a panic. It is the one Kubernetes API stand-in of
//! the workspace: kas's and the agent's tests, the local stack and the edge's tests use it
//! (the edge's through `kas-testkit`); other fakes of the API in tests reuse its wire
//! helpers ([`serve`], [`response`], [`query`]).

mod configmaps;
mod echo;
mod exec;
mod objects;
mod openapi;
pub mod query;
mod record;
pub mod response;
mod routes;
mod store;
mod stream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use configmaps::{ConfigMapCounts, BOOKMARK_EVERY, GATHER_LIMIT};
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
    configmaps: configmaps::ConfigMaps,
    /// While set, every request is answered 503 ([`KubeApi::set_outage`]).
    outage: AtomicBool,
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
            configmaps: configmaps::ConfigMaps::default(),
            outage: AtomicBool::new(false),
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
        tokio::spawn(send_bookmarks(state.clone()));
        let routed = state.clone();
        let task = serve(listener, state.shutdown.clone(), move |req| {
            routes::handle(routed.clone(), req)
        });
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
        match resource {
            "configmaps" => self.state.configmaps.get(namespace, name),
            _ => self.state.store.object(resource, namespace, name),
        }
    }

    /// Creates or replaces ConfigMap `namespace/name` with `data`, as `kubectl apply` or
    /// `kubectl edit` would; returns its new resourceVersion.
    pub fn put_configmap(&self, namespace: &str, name: &str, data: &[(&str, &str)]) -> String {
        self.state
            .configmaps
            .put(&self.state.store, namespace, name, data)
    }

    /// The value of `key` in ConfigMap `namespace/name`.
    pub fn configmap_value(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let object = self.state.configmaps.get(namespace, name)?;
        object["data"][key].as_str().map(str::to_owned)
    }

    /// Cuts every open ConfigMap watch mid-stream; returns how many there were.
    pub fn drop_configmap_watches(&self) -> usize {
        self.state.configmaps.drop_watches()
    }

    /// While on, every request is answered 503 and open ConfigMap watches are cut.
    pub fn set_outage(&self, on: bool) {
        self.state.outage.store(on, Ordering::SeqCst);
        if on {
            self.state.configmaps.drop_watches();
        }
    }

    /// The next `n` GETs of a single ConfigMap wait for one another (at most
    /// [`GATHER_LIMIT`]) and then all read the same resourceVersion: the updates of clients
    /// that read, modify and write collide, and all but one are refused with 409.
    pub fn gather_configmap_gets(&self, n: usize) {
        self.state.configmaps.gather_gets(n);
    }

    /// What clients did with ConfigMaps so far.
    pub fn configmap_counts(&self) -> ConfigMapCounts {
        self.state.configmaps.counts()
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

/// BOOKMARKs to the ConfigMap watches that asked for them, every [`BOOKMARK_EVERY`], until
/// the stand-in stops.
async fn send_bookmarks(state: Arc<State>) {
    let mut every = tokio::time::interval(BOOKMARK_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        state
            .configmaps
            .send_bookmarks(state.store.resource_version());
    }
}

/// Serves HTTP/1.1 (upgrades included) on `listener`, every request answered by `handle`,
/// until `shutdown`: it stops accepting and ends the connections it serves. The stand-in
/// runs on it, and so can other fakes of the API in tests.
pub fn serve<F, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    handle: F,
) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<response::Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else {
                // Out of descriptors or similar: back off briefly instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handle = handle.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::select! {
                    _ = conn => {}
                    () = shutdown.cancelled() => {}
                }
            });
        }
    })
}
