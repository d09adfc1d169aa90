//! The registry and the forwarder without sockets: hand-offs, matching, bounds, single use
//! and message order. Time is paused, so waits cost nothing and nothing sleeps.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use kas_proto::gitlab::agent::reverse_tunnel::info::{AgentDescriptor, Method, Service};
use kas_proto::reverse_tunnel::connect_request::Msg as FromAgentMsg;
use kas_proto::reverse_tunnel::connect_response::Msg as ToAgentMsg;
use kas_proto::reverse_tunnel::{ConnectRequest, ConnectResponse, Header, Message, Trailer};

use super::forward::{run_tunnel, TunnelEnd};
use super::*;

const K8S: &str = "gitlab.agent.kubernetes_api.rpc.KubernetesApi";
const MAKE_REQUEST: &str = "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest";

fn descriptor(service: &str, method: &str) -> Arc<Descriptor> {
    Arc::new(
        Descriptor::from_proto(AgentDescriptor {
            services: vec![Service {
                name: service.into(),
                methods: vec![Method {
                    name: method.into(),
                }],
            }],
        })
        .expect("valid descriptor"),
    )
}

fn k8s() -> Arc<Descriptor> {
    descriptor(K8S, "MakeRequest")
}

fn registry(limits: RegistryLimits) -> TunnelRegistry {
    TunnelRegistry::new(limits, TunnelMetrics::new(&prometheus::Registry::new()))
}

fn limits() -> RegistryLimits {
    RegistryLimits {
        max_tunnels_per_agent: 3,
        max_tunnels_total: 5,
        max_waiting_per_agent: 2,
        find_timeout: Duration::from_secs(20),
    }
}

fn routed() -> (Routed, mpsc::Sender<ToAgent>, mpsc::Receiver<FromAgent>) {
    let (to_tx, to_rx) = mpsc::channel(8);
    let (from_tx, from_rx) = mpsc::channel(8);
    (
        Routed {
            method_name: MAKE_REQUEST.into(),
            meta: Meta::new(),
            to_agent: to_rx,
            from_agent: from_tx,
        },
        to_tx,
        from_rx,
    )
}

#[test]
fn descriptors_match_service_and_method_exactly() {
    let d = k8s();
    assert!(d.supports(K8S, "MakeRequest"));
    assert!(!d.supports(K8S, "makerequest"));
    assert!(!d.supports("gitlab.agent.kubernetes_api.rpc", "MakeRequest"));
    assert!(!d.supports(K8S, "Other"));
    let nameless = AgentDescriptor {
        services: vec![Service {
            name: K8S.into(),
            methods: vec![Method { name: "".into() }],
        }],
    };
    assert!(Descriptor::from_proto(nameless).is_err());
    assert_eq!(split_method(MAKE_REQUEST), Some((K8S, "MakeRequest")));
    assert_eq!(split_method("/nomethod/"), None);
    assert_eq!(split_method("noslash"), None);
}

#[tokio::test(start_paused = true)]
async fn a_ready_tunnel_serves_one_request_then_is_gone() {
    let reg = registry(limits());
    let mut registration = reg.register(7, k8s()).expect("registered");
    assert_eq!(reg.ready_count(7), 1);
    let tunnel = reg.find(7, K8S, "MakeRequest").await.expect("found");
    assert_eq!(reg.ready_count(7), 0, "a found tunnel leaves the ready set");
    let (call, _to, _from) = routed();
    assert!(tunnel.start(call).is_ok());
    let got = registration.routed().await;
    assert_eq!(got.method_name, MAKE_REQUEST);
    drop(registration);
    assert_eq!(reg.agent_count(), 0, "nothing is left behind for the agent");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_request_gets_the_next_tunnel_directly() {
    let reg = registry(limits());
    let finder = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.find(7, K8S, "MakeRequest").await })
    };
    tokio::task::yield_now().await;
    assert_eq!(reg.waiting_count(7), 1);
    let mut registration = reg.register(7, k8s()).expect("registered");
    assert_eq!(reg.ready_count(7), 0, "handed to the waiter, never ready");
    let tunnel = finder.await.expect("joined").expect("found");
    let (call, _to, _from) = routed();
    tunnel.start(call).map_err(|_| "start").expect("started");
    assert_eq!(registration.routed().await.method_name, MAKE_REQUEST);
    assert_eq!(reg.waiting_count(7), 0);
}

#[tokio::test(start_paused = true)]
async fn tunnels_only_serve_what_their_descriptor_names() {
    let reg = registry(limits());
    let _other = reg
        .register(7, descriptor("other.Service", "MakeRequest"))
        .expect("ok");
    let _other_agent = reg.register(8, k8s()).expect("ok");
    let started = tokio::time::Instant::now();
    let err = reg.find(7, K8S, "MakeRequest").await.err();
    assert_eq!(err, Some(FindError::NotConnected));
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(20),
        "waited the find timeout"
    );
    assert_eq!(reg.metrics().routing_timeouts.get(), 1);
    assert_eq!(
        reg.waiting_count(7),
        0,
        "a timed-out request leaves the queue"
    );
    assert_eq!(reg.ready_count(7), 1);
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_and_tunnels_are_bounded() {
    let reg = registry(limits());
    let mut finders = Vec::new();
    for _ in 0..2 {
        let reg = reg.clone();
        finders.push(tokio::spawn(async move {
            reg.find(7, K8S, "MakeRequest").await
        }));
    }
    tokio::task::yield_now().await;
    assert_eq!(reg.waiting_count(7), 2);
    assert_eq!(
        reg.find(7, K8S, "MakeRequest").await.err(),
        Some(FindError::TooManyWaiting)
    );
    for f in finders {
        f.abort();
    }
    tokio::task::yield_now().await;
    assert_eq!(reg.agent_count(), 0, "cancelled requests leave the queue");

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(reg.register(7, k8s()).expect("within the agent's limit"));
    }
    assert!(matches!(
        reg.register(7, k8s()),
        Err(RegisterError::AgentLimit(3))
    ));
    for _ in 0..2 {
        held.push(reg.register(8, k8s()).expect("within the total"));
    }
    assert!(matches!(
        reg.register(9, k8s()),
        Err(RegisterError::TotalLimit(5))
    ));
    assert_eq!(reg.agent_count(), 2, "a refused agent leaves no entry");
    drop(held);
    assert_eq!(reg.agent_count(), 0);
    assert_eq!(reg.metrics().ready.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_unused_tunnel_offers_itself_again() {
    let reg = registry(limits());
    let mut registration = reg.register(7, k8s()).expect("registered");
    let tunnel = reg.find(7, K8S, "MakeRequest").await.expect("found");
    let waiting = tokio::spawn(async move {
        let routed = registration.routed().await;
        (registration, routed.method_name)
    });
    tokio::task::yield_now().await;
    drop(tunnel);
    tokio::task::yield_now().await;
    assert_eq!(reg.ready_count(7), 1, "back in the ready set");
    let tunnel = reg.find(7, K8S, "MakeRequest").await.expect("found again");
    let (call, _to, _from) = routed();
    tunnel.start(call).map_err(|_| "start").expect("started");
    let (_registration, method) = waiting.await.expect("joined");
    assert_eq!(method, MAKE_REQUEST);
}

#[tokio::test(start_paused = true)]
async fn the_newest_tunnel_is_taken_first() {
    // An agent reconnecting while its old connection drains: its old tunnel is still
    // ready, its new one arrived since. Requests go to the new one.
    let reg = registry(limits());
    let mut old = reg.register(7, k8s()).expect("registered");
    let mut new = reg.register(7, k8s()).expect("registered");
    let tunnel = reg.find(7, K8S, "MakeRequest").await.expect("found");
    let (call, _to, _from) = routed();
    tunnel.start(call).map_err(|_| "start").expect("started");
    let routed_to_new = tokio::time::timeout(Duration::from_secs(1), new.routed()).await;
    assert!(routed_to_new.is_ok(), "the newest tunnel got the request");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), old.routed())
            .await
            .is_err(),
        "the old tunnel stays idle"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_whose_stream_ended_is_skipped() {
    let reg = registry(limits());
    let mut live = reg.register(7, k8s()).expect("registered");
    // The newest tunnel is taken first.
    let gone = reg.register(7, k8s()).expect("registered");
    let first = reg.find(7, K8S, "MakeRequest").await.expect("found");
    drop(gone);
    let (call, _to, _from) = routed();
    let call = first
        .start(call)
        .expect_err("the ended stream refuses the call");
    let next = reg.find(7, K8S, "MakeRequest").await.expect("the live one");
    next.start(call).map_err(|_| "start").expect("started");
    assert_eq!(live.routed().await.method_name, MAKE_REQUEST);
}

#[tokio::test(start_paused = true)]
async fn route_waits_for_a_late_agent_and_shutdown_releases_waiters() {
    let reg = registry(limits());
    let router = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.route(7, MAKE_REQUEST, Meta::new()).await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut registration = reg.register(7, k8s()).expect("registered");
    let routed = registration.routed().await;
    assert_eq!(routed.method_name, MAKE_REQUEST);
    assert!(router.await.expect("joined").is_ok());

    let waiter = {
        let reg = reg.clone();
        tokio::spawn(async move { reg.route(7, MAKE_REQUEST, Meta::new()).await })
    };
    tokio::task::yield_now().await;
    reg.shut_down();
    let err = waiter.await.expect("joined").err().expect("refused");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(reg.register(7, k8s()).is_err());
}

/// The agent's side of a tunnel driven by hand: `agent` feeds what the agent sends.
struct TunnelHarness {
    agent: mpsc::Sender<Result<ConnectRequest, Status>>,
    to_agent: mpsc::Receiver<Result<ConnectResponse, Status>>,
    end: CancellationToken,
    task: tokio::task::JoinHandle<TunnelEnd>,
}

fn harness(reg: &TunnelRegistry) -> TunnelHarness {
    let registration = reg.register(7, k8s()).expect("registered");
    let (agent, inbound) = mpsc::channel(8);
    let (outbound, to_agent) = mpsc::channel(8);
    let end = CancellationToken::new();
    let task = tokio::spawn(run_tunnel(
        registration,
        ReceiverStream::new(inbound),
        outbound,
        end.clone(),
        reg.metrics().busy.clone(),
    ));
    TunnelHarness {
        agent,
        to_agent,
        end,
        task,
    }
}

fn agent_says(msg: FromAgentMsg) -> Result<ConnectRequest, Status> {
    Ok(ConnectRequest { msg: Some(msg) })
}

#[tokio::test(start_paused = true)]
async fn a_call_flows_both_ways_in_order_and_ends_the_tunnel() {
    let reg = registry(limits());
    let mut h = harness(&reg);
    let call = reg
        .route(7, MAKE_REQUEST, Meta::new())
        .await
        .expect("routed");
    let TunnelCall {
        to_agent,
        mut from_agent,
    } = call;
    let first = h.to_agent.recv().await.expect("sent").expect("ok");
    assert!(
        matches!(first.msg, Some(ToAgentMsg::RequestInfo(ref i)) if i.method_name == MAKE_REQUEST)
    );
    assert_eq!(reg.metrics().busy.get(), 1);
    assert!(to_agent.send(Bytes::from_static(b"req")).await);
    assert!(to_agent.close_send().await);
    let msg = h.to_agent.recv().await.expect("sent").expect("ok");
    assert!(matches!(msg.msg, Some(ToAgentMsg::Message(ref m)) if m.data == b"req"));
    let msg = h.to_agent.recv().await.expect("sent").expect("ok");
    assert!(matches!(msg.msg, Some(ToAgentMsg::CloseSend(_))));

    h.agent
        .send(agent_says(FromAgentMsg::Header(Header::default())))
        .await
        .expect("open");
    h.agent
        .send(agent_says(FromAgentMsg::Message(Message {
            data: b"resp".to_vec(),
        })))
        .await
        .expect("open");
    h.agent
        .send(agent_says(FromAgentMsg::Trailer(Trailer::default())))
        .await
        .expect("open");
    drop(h.agent);
    assert!(matches!(
        from_agent.recv().await,
        Some(FromAgent::Header(_))
    ));
    assert!(
        matches!(from_agent.recv().await, Some(FromAgent::Message(ref b)) if b.as_ref() == b"resp")
    );
    assert!(matches!(
        from_agent.recv().await,
        Some(FromAgent::Trailer(_))
    ));
    assert!(
        from_agent.recv().await.is_none(),
        "the call ends with the agent's stream"
    );
    assert!(matches!(h.task.await.expect("joined"), TunnelEnd::Ok));
    assert_eq!(reg.metrics().busy.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_agent_message_out_of_order_ends_tunnel_and_call_with_errors() {
    let reg = registry(limits());
    let h = harness(&reg);
    let mut call = reg
        .route(7, MAKE_REQUEST, Meta::new())
        .await
        .expect("routed");
    // A message before the header.
    h.agent
        .send(agent_says(FromAgentMsg::Message(Message {
            data: b"x".to_vec(),
        })))
        .await
        .expect("open");
    match h.task.await.expect("joined") {
        TunnelEnd::Status(s) => {
            assert_eq!(s.code(), Code::InvalidArgument);
            assert!(
                s.message().contains("message after the request"),
                "{}",
                s.message()
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    match call.from_agent.recv().await {
        Some(FromAgent::Error(s)) => assert_eq!(s.code(), Code::Unavailable),
        other => panic!("expected an error for the caller, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn an_idle_tunnel_ends_ok_at_its_connection_end_and_on_noise_with_an_error() {
    let reg = registry(limits());
    let h = harness(&reg);
    h.end.cancel();
    assert!(matches!(h.task.await.expect("joined"), TunnelEnd::Ok));
    assert_eq!(reg.ready_count(7), 0, "withdrawn");

    let h = harness(&reg);
    h.agent
        .send(agent_says(FromAgentMsg::Header(Header::default())))
        .await
        .expect("open");
    match h.task.await.expect("joined") {
        TunnelEnd::Status(s) => assert_eq!(s.code(), Code::InvalidArgument),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_eq!(reg.agent_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_cancels_the_tunnel() {
    let reg = registry(limits());
    let mut h = harness(&reg);
    let call = reg
        .route(7, MAKE_REQUEST, Meta::new())
        .await
        .expect("routed");
    let _info = h.to_agent.recv().await;
    drop(call);
    match h.task.await.expect("joined") {
        TunnelEnd::Status(s) => assert_eq!(s.code(), Code::Cancelled),
        other => panic!("expected CANCELLED, got {other:?}"),
    }
    assert_eq!(reg.metrics().busy.get(), 0);
}

/// Records what the registry tells its tracker.
#[derive(Default)]
struct Recording(std::sync::Mutex<Vec<(i64, bool)>>);

impl TunnelTracker for Recording {
    fn set_has_tunnels(&self, agent_id: i64, has_tunnels: bool) {
        self.0.lock().unwrap().push((agent_id, has_tunnels));
    }
}

#[tokio::test]
async fn the_tracker_hears_of_the_first_tunnel_and_the_last() {
    let tracker = Arc::new(Recording::default());
    let reg = TunnelRegistry::with_tracker(
        limits(),
        TunnelMetrics::new(&prometheus::Registry::new()),
        tracker.clone(),
    );
    let first = reg.register(7, k8s()).expect("registered");
    let second = reg.register(7, k8s()).expect("registered");
    assert_eq!(*tracker.0.lock().unwrap(), vec![(7, true)]);
    // The newest (second) is taken; the first one leaving empties the ready set.
    let taken = reg.find_now(7, K8S, "MakeRequest").expect("no error");
    assert!(taken.is_some());
    drop(first);
    assert_eq!(*tracker.0.lock().unwrap(), vec![(7, true), (7, false)]);
    drop(taken);
    drop(second);
}
