use super::*;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// The wire helpers of the Kubernetes API stand-in the integration tests use.
use kas_testkit::kube_api::response::{self, Body};
use kas_testkit::kube_api::{query, serve};

const NS: &str = "gitlab-agent";
const SVC: &str = "kas";
const WAIT: Duration = Duration::from_secs(10);

// ---- fake kube-apiserver -------------------------------------------------

#[derive(Default)]
struct FakeState {
    items: Vec<Value>,
    resource_version: String,
    fail_next_lists: usize,
    /// Answer lists with 403, as without the RBAC Role.
    forbidden: bool,
    lists: usize,
    watches: Vec<mpsc::UnboundedSender<Value>>,
    requests: Vec<String>,
}

struct FakeApi {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    watches_opened: watch::Receiver<usize>,
    server: JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeApi {
    async fn start(items: Vec<Value>, resource_version: &str) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState {
            items,
            resource_version: resource_version.to_owned(),
            ..FakeState::default()
        }));
        let (opened_tx, watches_opened) = watch::channel(0);
        let opened_tx = Arc::new(opened_tx);
        let server_state = state.clone();
        let server = serve(listener, CancellationToken::new(), move |req| {
            let response = handle(&server_state, &opened_tx, req);
            async move { response }
        });
        FakeApi {
            addr,
            state,
            watches_opened,
            server,
        }
    }

    fn client(&self) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.default_namespace = NS.to_owned();
        kube::Client::try_from(config).unwrap()
    }

    async fn wait_for_watches(&mut self, n: usize) {
        let waited = tokio::time::timeout(WAIT, self.watches_opened.wait_for(|&o| o >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "timed out waiting for watch #{n}; requests: {:#?}",
            self.state.lock().unwrap().requests
        );
    }

    /// Streams one event on the newest watch connection.
    fn push(&self, event_type: &str, object: Value) {
        let state = self.state.lock().unwrap();
        let watch = state.watches.last().expect("no watch connection open");
        watch
            .send(json!({ "type": event_type, "object": object }))
            .expect("watch connection closed");
    }

    fn set_list(&self, items: Vec<Value>, resource_version: &str) {
        let mut state = self.state.lock().unwrap();
        state.items = items;
        state.resource_version = resource_version.to_owned();
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn handle(
    state: &Mutex<FakeState>,
    watches_opened: &watch::Sender<usize>,
    req: Request<Incoming>,
) -> Response<Body> {
    let uri = req.uri().to_string();
    eprintln!("fake kube-apiserver: {} {uri}", req.method());
    let mut state = state.lock().unwrap();
    state.requests.push(uri);

    let expected_path = format!("/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices");
    if req.method() != Method::GET || req.uri().path() != expected_path {
        return status(StatusCode::NOT_FOUND, "NotFound");
    }
    // Only these parameters matter; others (limit, timeoutSeconds,
    // allowWatchBookmarks, sendInitialEvents, ...) are ignored like a real
    // server would honour them without changing what this test serves.
    let query: HashMap<String, String> = query::pairs(req.uri().query().unwrap_or(""))
        .into_iter()
        .collect();
    let selector = format!("{SERVICE_NAME_LABEL}={SVC}");
    if query.get("labelSelector") != Some(&selector) {
        return status(StatusCode::BAD_REQUEST, "BadRequest");
    }
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");

    if !watching {
        state.lists += 1;
        if state.forbidden {
            return status(StatusCode::FORBIDDEN, "Forbidden");
        }
        if state.fail_next_lists > 0 {
            state.fail_next_lists -= 1;
            return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
        }
        let list = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSliceList",
            "metadata": { "resourceVersion": state.resource_version },
            "items": state.items,
        });
        return response::json(StatusCode::OK, &list);
    }

    if !query.contains_key("resourceVersion") {
        return status(StatusCode::BAD_REQUEST, "BadRequest");
    }
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    state.watches.push(tx);
    watches_opened.send_modify(|n| *n += 1);
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let line = Bytes::from(format!("{event}\n"));
        Some((Ok::<_, std::io::Error>(Frame::data(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(frames)))
        .unwrap()
}

fn status(code: StatusCode, reason: &str) -> Response<Body> {
    response::failure(code, reason, &format!("fake apiserver: {reason}"))
}

// ---- fixtures ------------------------------------------------------------

fn slice(name: &str, rv: &str, address_type: &str, endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": rv,
            "labels": { SERVICE_NAME_LABEL: SVC },
        },
        "addressType": address_type,
        "endpoints": endpoints,
        // "agent" second, so picking the first or only port would be wrong.
        "ports": [
            { "name": "metrics", "port": 8151, "protocol": "TCP" },
            { "name": "agent", "port": 8150, "protocol": "TCP" },
        ],
    })
}

fn pod(ip: &str, pod: &str, conditions: Value) -> Value {
    json!({
        "addresses": [ip],
        "conditions": conditions,
        "targetRef": { "kind": "Pod", "name": pod, "namespace": NS },
    })
}

fn ep(addr: &str, name: Option<&str>, ready: bool, terminating: bool) -> Endpoint {
    Endpoint {
        addr: addr.parse().unwrap(),
        name: name.map(str::to_owned),
        ready,
        terminating,
    }
}

fn config() -> EndpointSliceConfig {
    EndpointSliceConfig {
        namespace: NS.to_owned(),
        service: SVC.to_owned(),
        port_name: Some("agent".to_owned()),
        port: None,
    }
}

fn spawn_discovery(
    fake: &FakeApi,
) -> (
    watch::Receiver<Vec<Endpoint>>,
    JoinHandle<Result<(), EndpointSliceError>>,
) {
    spawn_discovery_reporting(
        fake,
        Arc::new(super::super::new_status(
            &crate::telemetry::metrics::EdgeMetrics::new(),
        )),
    )
}

fn spawn_discovery_reporting(
    fake: &FakeApi,
    status: Arc<DiscoveryStatus>,
) -> (
    watch::Receiver<Vec<Endpoint>>,
    JoinHandle<Result<(), EndpointSliceError>>,
) {
    let (tx, rx) = watch::channel(Vec::new());
    let task = tokio::spawn(run(fake.client(), config(), tx, status));
    (rx, task)
}

async fn expect(rx: &mut watch::Receiver<Vec<Endpoint>>, what: &str, want: Vec<Endpoint>) {
    let got = tokio::time::timeout(WAIT, rx.wait_for(|v| *v == want))
        .await
        .map(|r| r.is_ok());
    assert!(
        matches!(got, Ok(true)),
        "timed out waiting for {what}\n want: {want:#?}\n last published: {:#?}",
        *rx.borrow()
    );
}

// ---- over real sockets ---------------------------------------------------

#[tokio::test]
async fn follows_list_then_modified_added_deleted() {
    let initial = slice(
        "kas-a",
        "10",
        "IPv4",
        vec![
            pod(
                "192.0.2.1",
                "kas-0",
                json!({ "ready": true, "terminating": false }),
            ),
            // No conditions at all: ready by API definition, not terminating.
            json!({ "addresses": ["192.0.2.2"], "targetRef": { "kind": "Pod", "name": "kas-1" } }),
            // Not a pod: no name.
            json!({ "addresses": ["192.0.2.9"], "targetRef": { "kind": "Node", "name": "n1" } }),
        ],
    );
    let mut fake = FakeApi::start(vec![initial], "100").await;
    let (mut rx, task) = spawn_discovery(&fake);

    expect(
        &mut rx,
        "the initial list on the named port",
        vec![
            ep("192.0.2.1:8150", Some("kas-0"), true, false),
            ep("192.0.2.2:8150", Some("kas-1"), true, false),
            ep("192.0.2.9:8150", None, true, false),
        ],
    )
    .await;

    fake.wait_for_watches(1).await;
    fake.push(
        "MODIFIED",
        slice(
            "kas-a",
            "101",
            "IPv4",
            vec![
                pod("192.0.2.1", "kas-0", json!({ "ready": true })),
                pod(
                    "192.0.2.2",
                    "kas-1",
                    json!({ "ready": false, "serving": true, "terminating": true }),
                ),
            ],
        ),
    );
    expect(
        &mut rx,
        "kas-1 marked not ready and terminating",
        vec![
            ep("192.0.2.1:8150", Some("kas-0"), true, false),
            ep("192.0.2.2:8150", Some("kas-1"), false, true),
        ],
    )
    .await;

    let second = slice(
        "kas-b",
        "102",
        "IPv4",
        vec![pod("192.0.2.3", "kas-2", json!({ "ready": true }))],
    );
    fake.push("ADDED", second.clone());
    expect(
        &mut rx,
        "the second slice's pod added",
        vec![
            ep("192.0.2.1:8150", Some("kas-0"), true, false),
            ep("192.0.2.2:8150", Some("kas-1"), false, true),
            ep("192.0.2.3:8150", Some("kas-2"), true, false),
        ],
    )
    .await;

    fake.push("DELETED", slice("kas-a", "103", "IPv4", vec![]));
    expect(
        &mut rx,
        "the first slice's pods removed",
        vec![ep("192.0.2.3:8150", Some("kas-2"), true, false)],
    )
    .await;

    let requests = fake.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("resourceVersion=100")),
        "the watch must resume from the list's resourceVersion: {requests:#?}"
    );
    assert!(!task.is_finished(), "discovery must keep running");
    task.abort();
}

#[tokio::test]
async fn lists_ipv6_and_dual_stack_addresses() {
    let v4 = slice(
        "kas-v4",
        "10",
        "IPv4",
        vec![pod("192.0.2.1", "kas-0", json!({ "ready": true }))],
    );
    let v6 = slice(
        "kas-v6",
        "11",
        "IPv6",
        vec![
            pod("2001:db8::1", "kas-0", json!({ "ready": true })),
            pod("2001:db8::2", "kas-1", json!({ "ready": false })),
        ],
    );
    let fake = FakeApi::start(vec![v6, v4], "100").await;
    let (mut rx, task) = spawn_discovery(&fake);
    expect(
        &mut rx,
        "IPv4 and IPv6 endpoints",
        vec![
            ep("192.0.2.1:8150", Some("kas-0"), true, false),
            ep("[2001:db8::1]:8150", Some("kas-0"), true, false),
            ep("[2001:db8::2]:8150", Some("kas-1"), false, false),
        ],
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn relist_after_expired_watch_drops_vanished_slices() {
    let a = slice(
        "kas-a",
        "10",
        "IPv4",
        vec![pod("192.0.2.1", "kas-0", json!({ "ready": true }))],
    );
    let b = slice(
        "kas-b",
        "11",
        "IPv4",
        vec![pod("192.0.2.2", "kas-1", json!({ "ready": true }))],
    );
    let mut fake = FakeApi::start(vec![a.clone(), b], "100").await;
    let (mut rx, task) = spawn_discovery(&fake);
    expect(
        &mut rx,
        "both slices",
        vec![
            ep("192.0.2.1:8150", Some("kas-0"), true, false),
            ep("192.0.2.2:8150", Some("kas-1"), true, false),
        ],
    )
    .await;

    // kas-b is deleted while the watch is "down": no DELETED event for it,
    // only the next list lacks it.
    fake.wait_for_watches(1).await;
    fake.set_list(vec![a], "200");
    fake.push(
        "ERROR",
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version: 100 (150)",
            "reason": "Expired",
            "code": 410,
        }),
    );
    expect(
        &mut rx,
        "kas-b gone after the relist",
        vec![ep("192.0.2.1:8150", Some("kas-0"), true, false)],
    )
    .await;
    fake.wait_for_watches(2).await;
    assert!(fake.state.lock().unwrap().lists >= 2);
    assert!(!task.is_finished(), "discovery must keep running");
    task.abort();
}

#[tokio::test]
async fn retries_a_failed_list() {
    let a = slice(
        "kas-a",
        "10",
        "IPv4",
        vec![pod("192.0.2.1", "kas-0", json!({ "ready": true }))],
    );
    let fake = FakeApi::start(vec![a], "100").await;
    fake.state.lock().unwrap().fail_next_lists = 2;
    let (mut rx, task) = spawn_discovery(&fake);
    expect(
        &mut rx,
        "the list after two failures",
        vec![ep("192.0.2.1:8150", Some("kas-0"), true, false)],
    )
    .await;
    assert_eq!(fake.state.lock().unwrap().lists, 3);
    assert!(!task.is_finished(), "discovery must keep running");
    task.abort();
}

#[tokio::test]
async fn announces_an_empty_first_list() {
    let fake = FakeApi::start(vec![], "100").await;
    let metrics = crate::telemetry::metrics::EdgeMetrics::new();
    let status = Arc::new(super::super::new_status(&metrics));
    let (mut rx, task) = spawn_discovery_reporting(&fake, status.clone());
    let changed = tokio::time::timeout(WAIT, rx.changed()).await;
    assert!(matches!(changed, Ok(Ok(()))), "first sync not announced");
    assert!(rx.borrow().is_empty());
    // No kas pods is a fine answer from a working source: the edge may be ready.
    assert!(status.is_synced());
    assert_eq!(metrics.discovery_up.get(), 1);
    task.abort();
}

#[tokio::test]
async fn forbidden_list_keeps_discovery_unsynced_until_it_is_allowed() {
    let fake = FakeApi::start(vec![], "100").await;
    fake.state.lock().unwrap().forbidden = true;
    let metrics = crate::telemetry::metrics::EdgeMetrics::new();
    let status = Arc::new(super::super::new_status(&metrics));
    let (mut rx, task) = spawn_discovery_reporting(&fake, status.clone());
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics.discovery_errors.get() < 1 {
        assert!(tokio::time::Instant::now() < deadline, "403 not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!status.is_synced(), "a 403 is not a first result");
    assert_eq!(metrics.discovery_up.get(), 0);
    let reason = status.last_error().unwrap();
    assert!(reason.contains("Forbidden"), "{reason}");
    assert!(!rx.has_changed().unwrap(), "nothing published");

    // The RoleBinding appears: the next retry lists, and the edge may become ready.
    fake.state.lock().unwrap().forbidden = false;
    let changed = tokio::time::timeout(WAIT, rx.changed()).await;
    assert!(matches!(changed, Ok(Ok(()))), "no list after the 403s");
    assert!(status.is_synced());
    assert_eq!(metrics.discovery_up.get(), 1);
    assert_eq!(status.last_error(), None);
    task.abort();
}

#[tokio::test]
async fn stops_when_no_receiver_is_left() {
    let fake = FakeApi::start(vec![], "100").await;
    let (rx, task) = spawn_discovery(&fake);
    drop(rx);
    let result = tokio::time::timeout(WAIT, task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

// ---- without sockets -----------------------------------------------------

fn typed(v: Value) -> EndpointSlice {
    serde_json::from_value(v).unwrap()
}

fn with_ports(mut s: Value, ports: Value) -> Value {
    s["ports"] = ports;
    s
}

#[test]
fn port_selection() {
    let one_pod = vec![pod("192.0.2.1", "kas-0", json!({}))];
    let two_ports = slice("s", "1", "IPv4", one_pod.clone());
    let one_port = with_ports(
        slice("s", "1", "IPv4", one_pod.clone()),
        json!([{ "port": 8150 }]),
    );
    let pick = |name: Option<&str>, number: Option<u16>, s: &Value| {
        let sel = PortSelector {
            name: name.map(str::to_owned),
            number,
        };
        let eps = slice_endpoints(&typed(s.clone()), &sel, &config());
        eps.first().map(|e| e.addr.port())
    };
    assert_eq!(pick(Some("agent"), None, &two_ports), Some(8150));
    assert_eq!(pick(None, Some(8151), &two_ports), Some(8151));
    assert_eq!(pick(Some("nope"), Some(8151), &two_ports), Some(8151));
    assert_eq!(pick(Some("nope"), None, &two_ports), None);
    assert_eq!(pick(None, Some(9999), &two_ports), None);
    assert_eq!(pick(None, None, &two_ports), None, "ambiguous");
    assert_eq!(pick(None, None, &one_port), Some(8150));
    let udp = with_ports(
        slice("s", "1", "IPv4", one_pod.clone()),
        json!([{ "name": "agent", "port": 53, "protocol": "UDP" }]),
    );
    assert_eq!(pick(Some("agent"), None, &udp), None);
    let no_ports = with_ports(slice("s", "1", "IPv4", one_pod), Value::Null);
    assert_eq!(pick(None, None, &no_ports), None);
}

#[test]
fn skips_fqdn_slices_and_bad_addresses() {
    let sel = PortSelector {
        name: Some("agent".to_owned()),
        number: None,
    };
    let fqdn = slice(
        "f",
        "1",
        "FQDN",
        vec![pod("kas.example.com", "kas-0", json!({}))],
    );
    assert!(slice_endpoints(&typed(fqdn), &sel, &config()).is_empty());
    let bad = slice(
        "b",
        "1",
        "IPv4",
        vec![json!({ "addresses": ["not-an-ip", "192.0.2.7"] })],
    );
    assert_eq!(
        slice_endpoints(&typed(bad), &sel, &config()),
        vec![ep("192.0.2.7:8150", None, true, false)]
    );
}

#[test]
fn duplicate_address_across_slices_prefers_the_ready_copy() {
    let sel = PortSelector {
        name: Some("agent".to_owned()),
        number: None,
    };
    let mut set = SliceSet::default();
    set.apply(Event::Init, &sel, &config());
    let stale = slice(
        "a",
        "1",
        "IPv4",
        vec![pod("192.0.2.1", "kas-0", json!({ "ready": false }))],
    );
    let fresh = slice(
        "b",
        "2",
        "IPv4",
        vec![pod("192.0.2.1", "kas-0", json!({ "ready": true }))],
    );
    for s in [stale, fresh] {
        set.apply(Event::InitApply(typed(s)), &sel, &config());
    }
    let update = set.apply(Event::InitDone, &sel, &config()).unwrap();
    assert_eq!(
        update.endpoints,
        vec![ep("192.0.2.1:8150", Some("kas-0"), true, false)]
    );
}

#[test]
fn publishes_only_real_changes() {
    let sel = PortSelector {
        name: Some("agent".to_owned()),
        number: None,
    };
    let cfg = config();
    let (tx, mut rx) = watch::channel(Vec::new());
    let mut set = SliceSet::default();
    let a = slice(
        "a",
        "1",
        "IPv4",
        vec![pod("192.0.2.1", "kas-0", json!({ "ready": true }))],
    );

    // Nothing reaches receivers before the list is complete.
    assert!(set.apply(Event::Init, &sel, &cfg).is_none());
    assert!(set
        .apply(Event::InitApply(typed(a.clone())), &sel, &cfg)
        .is_none());
    let first = set.apply(Event::InitDone, &sel, &cfg).unwrap();
    assert!(publish(&tx, first, &cfg));
    assert!(rx.has_changed().unwrap());
    rx.borrow_and_update();

    // Only resourceVersion and a zone changed: same endpoints, no publish.
    let mut touched = a.clone();
    touched["metadata"]["resourceVersion"] = json!("2");
    touched["endpoints"][0]["zone"] = json!("zone-b");
    let update = set.apply(Event::Apply(typed(touched)), &sel, &cfg).unwrap();
    assert!(!publish(&tx, update, &cfg));
    assert!(!rx.has_changed().unwrap());

    // A relist with the same content is not news either.
    set.apply(Event::Init, &sel, &cfg);
    set.apply(Event::InitApply(typed(a)), &sel, &cfg);
    let relisted = set.apply(Event::InitDone, &sel, &cfg).unwrap();
    assert!(!publish(&tx, relisted, &cfg));
    assert!(!rx.has_changed().unwrap());

    let gone = slice("a", "3", "IPv4", vec![]);
    let update = set.apply(Event::Delete(typed(gone)), &sel, &cfg).unwrap();
    assert!(publish(&tx, update, &cfg));
    assert!(rx.borrow_and_update().is_empty());
}

#[tokio::test]
async fn rejects_unusable_config() {
    // Never contacted: validation happens before any request.
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let cases = [
        EndpointSliceConfig {
            service: "kas,app=x".to_owned(),
            ..config()
        },
        EndpointSliceConfig {
            namespace: String::new(),
            ..config()
        },
        EndpointSliceConfig {
            port_name: Some(String::new()),
            ..config()
        },
        EndpointSliceConfig {
            port: Some(0),
            ..config()
        },
    ];
    for cfg in cases {
        let (tx, _rx) = watch::channel(Vec::new());
        let status = Arc::new(super::super::new_status(
            &crate::telemetry::metrics::EdgeMetrics::new(),
        ));
        let result = tokio::time::timeout(WAIT, run(client.clone(), cfg.clone(), tx, status)).await;
        assert!(matches!(result, Ok(Err(_))), "accepted {cfg:?}");
    }
}
