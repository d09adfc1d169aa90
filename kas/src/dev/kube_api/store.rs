//! The stand-in's cluster: namespaces, pods with their log lines, and other objects created
//! through it. Every change is broadcast, so open watches and `logs -f` streams see changes
//! a test makes after the call started.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::SystemTime;

use serde_json::Value;
use tokio::sync::broadcast;

/// How many changes an open watch may fall behind before it misses some (a test pushes a
/// handful; a slow reader is not the case under test).
const EVENT_BACKLOG: usize = 1024;

/// One pod as the stand-in knows it.
#[derive(Clone, Debug)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `Pending`, `Running`, `Succeeded`, `Failed`: `kubectl exec` wants `Running`.
    pub phase: String,
    pub containers: Vec<String>,
    pub created: SystemTime,
    pub resource_version: u64,
}

/// A change to a pod, as a watch reports it.
#[derive(Clone, Debug)]
pub struct PodEvent {
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub pod: PodState,
}

/// A log line of a pod's container.
#[derive(Clone, Debug)]
pub struct LogLine {
    pub namespace: String,
    pub pod: String,
    pub line: String,
}

#[derive(Default)]
struct Cluster {
    namespaces: BTreeSet<String>,
    pods: BTreeMap<(String, String), PodState>,
    logs: BTreeMap<(String, String), Vec<String>>,
    /// Objects of other resources created through the API: (resource, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
    resource_version: u64,
}

pub struct Store {
    cluster: Mutex<Cluster>,
    pod_events: broadcast::Sender<PodEvent>,
    log_lines: broadcast::Sender<LogLine>,
}

/// Why a create was refused.
pub enum CreateError {
    AlreadyExists,
}

impl Store {
    pub fn new() -> Self {
        Self {
            cluster: Mutex::default(),
            pod_events: broadcast::channel(EVENT_BACKLOG).0,
            log_lines: broadcast::channel(EVENT_BACKLOG).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cluster> {
        // A panicking test thread must not take the stand-in down with it.
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().resource_version
    }

    /// The next resourceVersion, for a change made elsewhere (ConfigMaps keep their own
    /// objects, [`super::configmaps`]): one counter for the whole cluster, as the API
    /// server has.
    pub fn next_resource_version(&self) -> u64 {
        let mut c = self.lock();
        c.resource_version += 1;
        c.resource_version
    }

    pub fn add_namespace(&self, name: &str) {
        self.lock().namespaces.insert(name.to_owned());
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.iter().cloned().collect()
    }

    /// Adds (or replaces) a pod and reports it to open watches.
    pub fn put_pod(&self, namespace: &str, name: &str, phase: &str, containers: &[&str]) {
        let mut c = self.lock();
        c.resource_version += 1;
        let rv = c.resource_version;
        c.namespaces.insert(namespace.to_owned());
        let key = (namespace.to_owned(), name.to_owned());
        let kind = if c.pods.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let pod = PodState {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{namespace}-{name}-{rv}"),
            phase: phase.to_owned(),
            containers: containers.iter().map(|s| (*s).to_owned()).collect(),
            created: c.pods.get(&key).map_or_else(SystemTime::now, |p| p.created),
            resource_version: rv,
        };
        c.pods.insert(key, pod.clone());
        let _ = self.pod_events.send(PodEvent { kind, pod });
    }

    /// Changes a pod's phase; false if there is no such pod.
    pub fn set_phase(&self, namespace: &str, name: &str, phase: &str) -> bool {
        let mut c = self.lock();
        c.resource_version += 1;
        let rv = c.resource_version;
        let Some(pod) = c.pods.get_mut(&(namespace.to_owned(), name.to_owned())) else {
            return false;
        };
        pod.phase = phase.to_owned();
        pod.resource_version = rv;
        let pod = pod.clone();
        let _ = self.pod_events.send(PodEvent {
            kind: "MODIFIED",
            pod,
        });
        true
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        let mut c = self.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let Some(mut pod) = c.pods.remove(&key) else {
            return false;
        };
        c.logs.remove(&key);
        c.resource_version += 1;
        pod.resource_version = c.resource_version;
        let _ = self.pod_events.send(PodEvent {
            kind: "DELETED",
            pod,
        });
        true
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodState> {
        self.lock()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Pods of `namespace`, or of all namespaces.
    pub fn pods(&self, namespace: Option<&str>) -> Vec<PodState> {
        self.lock()
            .pods
            .values()
            .filter(|p| namespace.is_none_or(|ns| p.namespace == ns))
            .cloned()
            .collect()
    }

    /// Appends a line to a pod's log and reports it to `logs -f` streams.
    pub fn log(&self, namespace: &str, pod: &str, line: &str) {
        self.lock()
            .logs
            .entry((namespace.to_owned(), pod.to_owned()))
            .or_default()
            .push(line.to_owned());
        let _ = self.log_lines.send(LogLine {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            line: line.to_owned(),
        });
    }

    pub fn logs(&self, namespace: &str, pod: &str) -> Vec<String> {
        self.lock()
            .logs
            .get(&(namespace.to_owned(), pod.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// Subscribes to pod changes: call before reading the current state, so nothing falls
    /// between the two.
    pub fn pod_events(&self) -> broadcast::Receiver<PodEvent> {
        self.pod_events.subscribe()
    }

    pub fn log_lines(&self) -> broadcast::Receiver<LogLine> {
        self.log_lines.subscribe()
    }

    /// Stores an object created through the API, completing its metadata as the API server
    /// does; returns what it stored.
    pub fn create(
        &self,
        resource: &str,
        namespace: &str,
        mut object: Value,
    ) -> Result<Value, CreateError> {
        let mut c = self.lock();
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let key = (resource.to_owned(), namespace.to_owned(), name.clone());
        if c.objects.contains_key(&key) {
            return Err(CreateError::AlreadyExists);
        }
        c.resource_version += 1;
        let rv = c.resource_version;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), namespace.into());
            meta.insert("uid".into(), format!("uid-{resource}-{name}-{rv}").into());
            meta.insert("resourceVersion".into(), rv.to_string().into());
            meta.insert(
                "creationTimestamp".into(),
                super::objects::rfc3339(SystemTime::now()).into(),
            );
        }
        c.namespaces.insert(namespace.to_owned());
        c.objects.insert(key, object.clone());
        Ok(object)
    }

    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((r, ns, _), _)| r == resource && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }
}
