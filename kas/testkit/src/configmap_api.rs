//! A Kubernetes API stand-in for ConfigMaps, over real HTTP on a loopback address of the
//! test's own: what the edge's ConfigMap watch and `kas-edge block` talk to, with a
//! kubeconfig file that points at it. Its wire helpers ([`serve`], [`json_response`],
//! [`status_response`], [`parse_query`]) serve other fakes of the API too.
//!
//! It serves, for `/api/v1/namespaces/NS/configmaps[/NAME]`:
//! - GET of one ConfigMap, LIST (with `fieldSelector=metadata.name=…`) and WATCH
//!   (`watch=true`): events after the `resourceVersion` asked for (replayed from its
//!   history), then live ones, BOOKMARK events when asked for (`allowWatchBookmarks`), and
//!   a clean end after `timeoutSeconds`;
//! - PUT (update) with optimistic concurrency: a `metadata.resourceVersion` other than the
//!   current one is refused with 409 Conflict, like the real API server; POST (create) and
//!   DELETE.
//!
//! Every change bumps one global resourceVersion. A test can change objects directly
//! ([`ConfigMapApi::put`], as `kubectl edit` would), cut every open watch connection
//! mid-stream ([`ConfigMapApi::drop_watches`]), take the whole API away for a while
//! ([`ConfigMapApi::set_outage`]), make concurrent writers read the same version so they collide
//! ([`ConfigMapApi::gather_gets`]), and count what clients did ([`ConfigMapApi::counts`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The stand-in's response body; other fakes of the API (proxy's EndpointSlice unit tests)
/// answer with it too, through [`json_response`] and [`status_response`].
pub type Body = BoxBody<Bytes, std::io::Error>;

/// How often open watches that asked for them get a BOOKMARK, unless a test says otherwise.
pub const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// Longest a GET waits for the others of [`ConfigMapApi::gather_gets`].
pub const GATHER_LIMIT: Duration = Duration::from_secs(10);

/// What clients did, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// LIST requests answered with a list.
    pub lists: usize,
    /// WATCH requests answered with a stream.
    pub watches: usize,
    /// Watch streams open now.
    pub open_watches: usize,
    /// Updates refused with 409 because their resourceVersion was stale.
    pub conflicts: usize,
    /// Successful updates (PUT).
    pub updates: usize,
    /// BOOKMARK events sent.
    pub bookmarks: usize,
}

/// One change, kept so a watch can resume after it.
struct Change {
    revision: u64,
    kind: &'static str,
    namespace: String,
    object: Value,
}

struct Watch {
    id: u64,
    namespace: String,
    name: Option<String>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
}

impl Watch {
    fn wants(&self, namespace: &str, object: &Value) -> bool {
        self.namespace == namespace
            && self
                .name
                .as_deref()
                .is_none_or(|n| object["metadata"]["name"] == n)
    }

    fn send(&self, kind: &str, object: &Value) -> bool {
        let line = format!("{}\n", json!({ "type": kind, "object": object }));
        self.tx.send(Ok(Bytes::from(line))).is_ok()
    }
}

#[derive(Default)]
struct State {
    revision: u64,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    next_watch: u64,
    outage: bool,
    /// The next GETs of one ConfigMap wait here for one another ([`ConfigMapApi::gather_gets`]).
    gathering: Option<(usize, Arc<tokio::sync::Barrier>)>,
    counts: Counts,
}

impl State {
    /// Stores `object` (create or update) at a new revision and tells the watches.
    fn store(&mut self, namespace: &str, mut object: Value, kind: &'static str) -> Value {
        self.revision += 1;
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        object["apiVersion"] = json!("v1");
        object["kind"] = json!("ConfigMap");
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{namespace}-{name}"));
        }
        if kind == "DELETED" {
            self.objects.remove(&(namespace.to_owned(), name));
        } else {
            self.objects
                .insert((namespace.to_owned(), name), object.clone());
        }
        self.history.push(Change {
            revision: self.revision,
            kind,
            namespace: namespace.to_owned(),
            object: object.clone(),
        });
        self.watches
            .retain(|w| !w.wants(namespace, &object) || w.send(kind, &object));
        object
    }

    fn drop_watches(&mut self) -> usize {
        let n = self.watches.len();
        for w in self.watches.drain(..) {
            // An error ends the response without its last chunk: the client sees the
            // connection cut mid-stream, as when an API server goes away.
            let _ =
                w.tx.send(Err(std::io::Error::other("watch connection dropped")));
        }
        n
    }
}

/// The stand-in; its server stops when it is dropped.
pub struct ConfigMapApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ConfigMapApi {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Serves HTTP/1.1 on `listener`, answering every request with `handle`, until the returned
/// task is aborted. Connections a fake cuts (a dropped watch) end with errors: ignored.
pub fn serve<F, Fut>(listener: TcpListener, handle: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handle(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigMapApi {
    /// Serves on `host` (a port the system picks) and writes a kubeconfig for it.
    pub async fn start(host: IpAddr) -> Self {
        let listener = TcpListener::bind((host, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let server_state = state.clone();
        let server = serve(listener, move |req| {
            let state = server_state.clone();
            async move { handle(&state, req).await }
        });
        let ticker_state = state.clone();
        let bookmarks = tokio::spawn(async move {
            let mut every = tokio::time::interval(BOOKMARK_EVERY);
            loop {
                every.tick().await;
                let mut state = lock(&ticker_state);
                let bookmark = json!({
                    "kind": "ConfigMap",
                    "apiVersion": "v1",
                    "metadata": { "resourceVersion": state.revision.to_string() },
                });
                let before = state.counts.bookmarks;
                let mut sent = 0;
                state.watches.retain(|w| {
                    if !w.bookmarks {
                        return true;
                    }
                    sent += 1;
                    w.send("BOOKMARK", &bookmark)
                });
                state.counts.bookmarks = before + sent;
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    \
                 server: http://{addr}\nusers:\n- name: tester\n  user: {{}}\ncontexts:\n\
                 - name: stand-in\n  context:\n    cluster: stand-in\n    user: tester\n\
                 current-context: stand-in\n"
            ),
        )
        .unwrap();
        Self {
            addr,
            state,
            kubeconfig,
            _dir: dir,
            tasks: vec![server, bookmarks],
        }
    }

    /// A kubeconfig whose current context is this stand-in (no credentials).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Creates or replaces ConfigMap `namespace/name` with `data`, as `kubectl apply` or
    /// `kubectl edit` would; returns its new resourceVersion.
    pub fn put(&self, namespace: &str, name: &str, data: &[(&str, &str)]) -> String {
        let data: BTreeMap<&str, &str> = data.iter().copied().collect();
        let mut state = lock(&self.state);
        let kind = if state
            .objects
            .contains_key(&(namespace.to_owned(), name.to_owned()))
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = json!({ "metadata": { "name": name }, "data": data });
        let stored = state.store(namespace, object, kind);
        stored["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The value of `key` in ConfigMap `namespace/name`.
    pub fn value(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        lock(&self.state)
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .and_then(|o| o["data"][key].as_str().map(str::to_owned))
    }

    /// Cuts every open watch connection mid-stream; returns how many there were.
    pub fn drop_watches(&self) -> usize {
        lock(&self.state).drop_watches()
    }

    /// While on, every request is answered 503 and open watches are cut.
    pub fn set_outage(&self, on: bool) {
        let mut state = lock(&self.state);
        state.outage = on;
        if on {
            state.drop_watches();
        }
    }

    /// The next `n` GETs of a single ConfigMap wait for one another (at most [`GATHER_LIMIT`])
    /// and then all read the same resourceVersion: the updates of clients that read, modify
    /// and write collide, and all but one are refused with 409.
    pub fn gather_gets(&self, n: usize) {
        lock(&self.state).gathering = Some((n, Arc::new(tokio::sync::Barrier::new(n))));
    }

    pub fn counts(&self) -> Counts {
        let state = lock(&self.state);
        Counts {
            open_watches: state.watches.len(),
            ..state.counts
        }
    }
}

fn not_found(name: &str) -> Response<Body> {
    status_response(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("configmaps \"{name}\" not found"),
    )
}

/// What a request is about: the namespace and, for one object, its name.
fn route(path: &str) -> Option<(String, Option<String>)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let mut parts = rest.split('/');
    let namespace = parts.next()?.to_owned();
    if parts.next()? != "configmaps" {
        return None;
    }
    let name = parts.next().map(str::to_owned);
    if parts.next().is_some() {
        return None;
    }
    Some((namespace, name))
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    if lock(state).outage {
        return status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "outage",
        );
    }
    let Some((namespace, name)) = route(req.uri().path()) else {
        return status_response(StatusCode::NOT_FOUND, "NotFound", "no such path");
    };
    let query = parse_query(req.uri().query().unwrap_or(""));
    match (req.method().clone(), name) {
        (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(state, &namespace, &query)
        }
        (Method::GET, None) => list(state, &namespace, &query),
        (Method::GET, Some(name)) => {
            let gather = {
                let mut state = lock(state);
                let gather = state.gathering.as_mut().map(|(left, barrier)| {
                    *left -= 1;
                    (*left, barrier.clone())
                });
                if let Some((0, _)) = gather {
                    state.gathering = None;
                }
                gather
            };
            if let Some((_, barrier)) = gather {
                let _ = tokio::time::timeout(GATHER_LIMIT, barrier.wait()).await;
            }
            match lock(state).objects.get(&(namespace, name.clone())) {
                Some(object) => json_response(StatusCode::OK, object),
                None => not_found(&name),
            }
        }
        (Method::PUT, Some(name)) => {
            let Some(object) = body_json(req).await else {
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            let mut state = lock(state);
            let key = (namespace.clone(), name.clone());
            let Some(current) = state.objects.get(&key) else {
                return not_found(&name);
            };
            let sent = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !sent.is_empty() && current["metadata"]["resourceVersion"] != sent {
                state.counts.conflicts += 1;
                return status_response(StatusCode::CONFLICT,
                    "Conflict",
                    &format!("Operation cannot be fulfilled on configmaps \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                );
            }
            if object["metadata"]["name"] != name.as_str() {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "name does not match the path",
                );
            }
            state.counts.updates += 1;
            let stored = state.store(&namespace, object, "MODIFIED");
            json_response(StatusCode::OK, &stored)
        }
        (Method::POST, None) => {
            let Some(object) = body_json(req).await else {
                return status_response(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
            };
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let mut state = lock(state);
            if state
                .objects
                .contains_key(&(namespace.clone(), name.clone()))
            {
                return status_response(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("configmaps \"{name}\" already exists"),
                );
            }
            let stored = state.store(&namespace, object, "ADDED");
            json_response(StatusCode::CREATED, &stored)
        }
        (Method::DELETE, Some(name)) => {
            let mut state = lock(state);
            let Some(object) = state
                .objects
                .get(&(namespace.clone(), name.clone()))
                .cloned()
            else {
                return not_found(&name);
            };
            let stored = state.store(&namespace, object, "DELETED");
            json_response(StatusCode::OK, &stored)
        }
        _ => status_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "not served by the stand-in",
        ),
    }
}

/// The name a `fieldSelector=metadata.name=NAME` asks for.
fn selected_name(query: &HashMap<String, String>) -> Option<String> {
    query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

fn list(state: &Mutex<State>, namespace: &str, query: &HashMap<String, String>) -> Response<Body> {
    let name = selected_name(query);
    let mut state = lock(state);
    state.counts.lists += 1;
    let items: Vec<&Value> = state
        .objects
        .iter()
        .filter(|((ns, n), _)| ns == namespace && name.as_deref().is_none_or(|want| want == n))
        .map(|(_, o)| o)
        .collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": "ConfigMapList",
        "metadata": { "resourceVersion": state.revision.to_string() },
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

fn watch(
    shared: &Arc<Mutex<State>>,
    namespace: &str,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut state = lock(shared);
    state.counts.watches += 1;
    state.next_watch += 1;
    let watch = Watch {
        id: state.next_watch,
        namespace: namespace.to_owned(),
        name: selected_name(query),
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true"),
        tx,
    };
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if since == 0 {
        // "Any": the current objects as ADDED, then what follows.
        for object in state.objects.values().filter(|o| watch.wants(namespace, o)) {
            watch.send("ADDED", object);
        }
    } else {
        for change in state.history.iter().filter(|c| c.revision > since) {
            if watch.wants(&change.namespace, &change.object) {
                watch.send(change.kind, &change.object);
            }
        }
    }
    if let Some(secs) = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
    {
        // The API server ends a watch cleanly after timeoutSeconds (the response's last
        // chunk); the client resumes from the last resourceVersion it saw.
        let id = watch.id;
        let shared = Arc::downgrade(shared);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            if let Some(shared) = shared.upgrade() {
                lock(&shared).watches.retain(|w| w.id != id);
            }
        });
    }
    state.watches.push(watch);
    drop(state);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((chunk.map(Frame::data), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}

async fn body_json(req: Request<Incoming>) -> Option<Value> {
    let bytes = req.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

/// A `Status` object, as the API server answers errors.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    json_response(code, &body)
}

pub fn json_response(code: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// A request's query parameters, percent-decoded.
pub fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
