//! ConfigMaps as the API server keeps them, for clients that rely on resourceVersions: the
//! edge's blocklist ConfigMap watch and `kas-edge block` (read, modify, write). Unlike the
//! stand-in's other objects they keep a history, so a watch resumes after the
//! `resourceVersion` it asks for, and an update with a stale `metadata.resourceVersion` is
//! refused with 409 Conflict.
//!
//! Served for `/api/v1/namespaces/NS/configmaps[/NAME]`: GET of one, LIST (with
//! `fieldSelector=metadata.name=…`), WATCH (`watch=true`: events after the
//! `resourceVersion` asked for, replayed from the history, then live ones; BOOKMARK events
//! when asked for, `allowWatchBookmarks`; a clean end after `timeoutSeconds`), POST
//! (create), PUT (update) and DELETE.
//!
//! A test can change objects directly ([`super::KubeApi::put_configmap`], as `kubectl edit`
//! would), cut every open watch mid-stream, make concurrent writers read the same version
//! so they collide ([`super::KubeApi::gather_configmap_gets`]), and count what clients did
//! ([`ConfigMapCounts`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::response::{self, Body};
use super::store::Store;
use super::{objects, query, State, MAX_STREAM};

/// How often open watches that asked for them get a BOOKMARK.
pub const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

/// Longest a GET waits for the others of [`super::KubeApi::gather_configmap_gets`].
pub const GATHER_LIMIT: Duration = Duration::from_secs(10);

/// What clients did with ConfigMaps, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigMapCounts {
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
struct Inner {
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    next_watch: u64,
    /// The next GETs of one ConfigMap wait here for one another.
    gathering: Option<(usize, Arc<tokio::sync::Barrier>)>,
    counts: ConfigMapCounts,
}

impl Inner {
    /// Stores `object` (create, update or delete) at the cluster's next resourceVersion
    /// and tells the watches.
    fn store(
        &mut self,
        store: &Store,
        namespace: &str,
        mut object: Value,
        kind: &'static str,
    ) -> Value {
        let revision = store.next_resource_version();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        object["apiVersion"] = json!("v1");
        object["kind"] = json!("ConfigMap");
        object["metadata"]["namespace"] = json!(namespace);
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{namespace}-{name}"));
        }
        if object["metadata"]["creationTimestamp"].is_null() {
            object["metadata"]["creationTimestamp"] = json!(objects::rfc3339(SystemTime::now()));
        }
        if kind == "DELETED" {
            self.objects.remove(&(namespace.to_owned(), name));
        } else {
            store.add_namespace(namespace);
            self.objects
                .insert((namespace.to_owned(), name), object.clone());
        }
        self.history.push(Change {
            revision,
            kind,
            namespace: namespace.to_owned(),
            object: object.clone(),
        });
        self.watches
            .retain(|w| !w.wants(namespace, &object) || w.send(kind, &object));
        object
    }
}

/// The stand-in's ConfigMaps.
#[derive(Default)]
pub struct ConfigMaps {
    inner: Mutex<Inner>,
}

impl ConfigMaps {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not take the stand-in down with it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces `namespace/name` with `data`; returns its new resourceVersion.
    pub fn put(&self, store: &Store, namespace: &str, name: &str, data: &[(&str, &str)]) -> String {
        let data: BTreeMap<&str, &str> = data.iter().copied().collect();
        let mut inner = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let kind = if inner.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = json!({ "metadata": { "name": name }, "data": data });
        let stored = inner.store(store, namespace, object, kind);
        stored["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Cuts every open watch mid-stream; returns how many there were.
    pub fn drop_watches(&self) -> usize {
        let mut inner = self.lock();
        let n = inner.watches.len();
        for w in inner.watches.drain(..) {
            // An error ends the response without its last chunk: the client sees the
            // connection cut mid-stream, as when an API server goes away.
            let _ =
                w.tx.send(Err(std::io::Error::other("watch connection dropped")));
        }
        n
    }

    pub fn gather_gets(&self, n: usize) {
        self.lock().gathering = Some((n, Arc::new(tokio::sync::Barrier::new(n))));
    }

    pub fn counts(&self) -> ConfigMapCounts {
        let inner = self.lock();
        ConfigMapCounts {
            open_watches: inner.watches.len(),
            ..inner.counts
        }
    }

    /// A BOOKMARK at `revision` to every open watch that asked for them.
    pub fn send_bookmarks(&self, revision: u64) {
        let bookmark = json!({
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": revision.to_string() },
        });
        let mut inner = self.lock();
        let mut sent = 0;
        inner.watches.retain(|w| {
            if !w.bookmarks {
                return true;
            }
            sent += 1;
            w.send("BOOKMARK", &bookmark)
        });
        inner.counts.bookmarks += sent;
    }

    fn end_watch(&self, id: u64) {
        self.lock().watches.retain(|w| w.id != id);
    }
}

fn not_found(name: &str) -> Response<Body> {
    response::not_found(&format!("configmaps \"{name}\""))
}

/// GET of one ConfigMap; waits for the others first while gathering.
pub async fn get(state: &State, namespace: &str, name: &str) -> Response<Body> {
    let gather = {
        let mut inner = state.configmaps.lock();
        let gather = inner.gathering.as_mut().map(|(left, barrier)| {
            *left -= 1;
            (*left, barrier.clone())
        });
        if let Some((0, _)) = gather {
            inner.gathering = None;
        }
        gather
    };
    if let Some((_, barrier)) = gather {
        let _ = tokio::time::timeout(GATHER_LIMIT, barrier.wait()).await;
    }
    match state.configmaps.get(namespace, name) {
        Some(object) => response::json(StatusCode::OK, &object),
        None => not_found(name),
    }
}

/// The name a `fieldSelector=metadata.name=NAME` asks for.
fn selected_name(raw_query: &str) -> Option<String> {
    query::get(raw_query, "fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name=").map(str::to_owned))
}

pub fn list(state: &State, namespace: Option<&str>, raw_query: &str) -> Response<Body> {
    let name = selected_name(raw_query);
    let mut inner = state.configmaps.lock();
    inner.counts.lists += 1;
    // Read under the ConfigMaps' lock: no change of theirs falls between it and the items.
    let revision = state.store.resource_version();
    let items: Vec<&Value> = inner
        .objects
        .iter()
        .filter(|((ns, n), _)| {
            namespace.is_none_or(|want| want == ns) && name.as_deref().is_none_or(|want| want == n)
        })
        .map(|(_, o)| o)
        .collect();
    let list = json!({
        "apiVersion": "v1",
        "kind": "ConfigMapList",
        "metadata": { "resourceVersion": revision.to_string() },
        "items": items,
    });
    response::json(StatusCode::OK, &list)
}

/// Events after the `resourceVersion` asked for (all current objects as ADDED without
/// one), then live ones, until `timeoutSeconds` (at most [`MAX_STREAM`]), a cut, or the
/// client goes.
pub fn watch(state: &Arc<State>, namespace: &str, raw_query: &str) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut inner = state.configmaps.lock();
    inner.counts.watches += 1;
    inner.next_watch += 1;
    let watch = Watch {
        id: inner.next_watch,
        namespace: namespace.to_owned(),
        name: selected_name(raw_query),
        bookmarks: query::flag(raw_query, "allowWatchBookmarks"),
        tx,
    };
    let since: u64 = query::get(raw_query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if since == 0 {
        // "Any": the current objects as ADDED, then what follows.
        for object in inner.objects.values().filter(|o| watch.wants(namespace, o)) {
            watch.send("ADDED", object);
        }
    } else {
        for change in inner.history.iter().filter(|c| c.revision > since) {
            if watch.wants(&change.namespace, &change.object) {
                watch.send(change.kind, &change.object);
            }
        }
    }
    // The API server ends a watch cleanly after timeoutSeconds (the response's last chunk);
    // the client resumes from the last resourceVersion it saw.
    let lasts = query::get(raw_query, "timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(MAX_STREAM)
        .min(MAX_STREAM);
    let id = watch.id;
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        tokio::time::sleep(lasts).await;
        if let Some(state) = weak.upgrade() {
            state.configmaps.end_watch(id);
        }
    });
    inner.watches.push(watch);
    drop(inner);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((chunk.map(Frame::data), rx))
    });
    let mut answer = Response::new(StreamBody::new(frames).boxed_unsync());
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    answer
}

/// POST: a new ConfigMap (`name` taken from its metadata).
pub fn create(state: &State, namespace: &str, name: &str, object: Value) -> Response<Body> {
    let mut inner = state.configmaps.lock();
    if inner
        .objects
        .contains_key(&(namespace.to_owned(), name.to_owned()))
    {
        return response::failure(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("configmaps \"{name}\" already exists"),
        );
    }
    let stored = inner.store(&state.store, namespace, object, "ADDED");
    response::json(StatusCode::CREATED, &stored)
}

/// PUT: an update, refused with 409 when its `metadata.resourceVersion` is not the
/// current one (optimistic concurrency, as the API server does).
pub fn update(state: &State, namespace: &str, name: &str, object: Value) -> Response<Body> {
    let mut inner = state.configmaps.lock();
    let Some(current) = inner.objects.get(&(namespace.to_owned(), name.to_owned())) else {
        return not_found(name);
    };
    let sent = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
    if !sent.is_empty() && current["metadata"]["resourceVersion"] != sent {
        inner.counts.conflicts += 1;
        return response::failure(
            StatusCode::CONFLICT,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on configmaps \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        );
    }
    if object["metadata"]["name"] != name {
        return response::failure(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "name does not match the path",
        );
    }
    inner.counts.updates += 1;
    let stored = inner.store(&state.store, namespace, object, "MODIFIED");
    response::json(StatusCode::OK, &stored)
}

pub fn delete(state: &State, namespace: &str, name: &str) -> Response<Body> {
    let mut inner = state.configmaps.lock();
    let Some(object) = inner
        .objects
        .get(&(namespace.to_owned(), name.to_owned()))
        .cloned()
    else {
        return not_found(name);
    };
    let stored = inner.store(&state.store, namespace, object, "DELETED");
    response::json(StatusCode::OK, &stored)
}
