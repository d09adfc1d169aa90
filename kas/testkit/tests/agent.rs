//! The test agent against a small `ReverseTunnel` server written here (kas's registry is
//! not what is under test): the descriptor, a GET replayed against the Kubernetes API
//! stand-in with impersonation, the answer's exact message order, a watch that streams,
//! an exec upgrade round trip, tunnel replacement, and each misbehaviour.

use std::collections::HashMap;

use futures_util::{SinkExt, StreamExt};
use kas_proto::grpctool::{http_request, http_response, HttpRequest, HttpResponse};
use kas_proto::kubernetes_api::{ExtraKeyVal, HeaderExtra, ImpersonationConfig};
use kas_proto::paths::{
    KUBERNETES_API_MAKE_REQUEST, KUBERNETES_API_METHOD, KUBERNETES_API_SERVICE,
};
use kas_proto::prototool::{self, Values};
use kas_proto::reverse_tunnel::reverse_tunnel_server::{ReverseTunnel, ReverseTunnelServer};
use kas_proto::reverse_tunnel::{
    connect_request, connect_response, CloseSend, ConnectRequest, ConnectResponse, Descriptor,
    Message, RequestInfo,
};
use kas_proto::HEADER_EXTRA_TYPE_URL;
use kas_testkit::agent::{AgentOptions, Misbehaviour, TestAgent};
use kas_testkit::kube_api::KubeApi;
use kas_testkit::net::LOCALHOST_ANY_PORT;
use kas_testkit::wait::{eventually, STEP};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "agent-token-for-tests";

/// A tunnel the server accepted: its descriptor and both directions.
struct Tunnel {
    descriptor: Descriptor,
    from_agent: Streaming<ConnectRequest>,
    to_agent: mpsc::Sender<Result<ConnectResponse, Status>>,
}

/// Accepts tunnels with the right token and a descriptor first, hands them to the test;
/// records why it refused others.
struct Server {
    tunnels: mpsc::Sender<Tunnel>,
    refusals: mpsc::Sender<Status>,
}

#[tonic::async_trait]
impl ReverseTunnel for Server {
    type ConnectStream = ReceiverStream<Result<ConnectResponse, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {TOKEN}")) {
            return Err(Status::unauthenticated("bad token"));
        }
        let mut from_agent = request.into_inner();
        let descriptor = match from_agent.message().await? {
            Some(ConnectRequest {
                msg: Some(connect_request::Msg::Descriptor(d)),
            }) => d,
            other => {
                let status =
                    Status::invalid_argument(format!("Invalid oneof value type: {other:?}"));
                let _ = self.refusals.send(status.clone()).await;
                return Err(status);
            }
        };
        let (to_agent, rx) = mpsc::channel(16);
        let _ = self
            .tunnels
            .send(Tunnel {
                descriptor,
                from_agent,
                to_agent,
            })
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Fixture {
    kube: KubeApi,
    tunnels: Mutex<mpsc::Receiver<Tunnel>>,
    refusals: Mutex<mpsc::Receiver<Status>>,
    agent: TestAgent,
}

async fn fixture(misbehaviour: Misbehaviour) -> Fixture {
    let kube = KubeApi::start(LOCALHOST_ANY_PORT).await.unwrap();
    let listener = tokio::net::TcpListener::bind(LOCALHOST_ANY_PORT)
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tunnels_tx, tunnels) = mpsc::channel(16);
    let (refusals_tx, refusals) = mpsc::channel(16);
    let server = Server {
        tunnels: tunnels_tx,
        refusals: refusals_tx,
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ReverseTunnelServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut options = AgentOptions::new(TOKEN, &kube.url());
    options.misbehaviour = misbehaviour;
    let agent = TestAgent::connect_h2c(addr, options)
        .await
        .expect("agent connects");
    Fixture {
        kube,
        tunnels: Mutex::new(tunnels),
        refusals: Mutex::new(refusals),
        agent,
    }
}

impl Fixture {
    async fn tunnel(&self) -> Tunnel {
        tokio::time::timeout(STEP, self.tunnels.lock().await.recv())
            .await
            .expect("a tunnel in time")
            .expect("the server runs")
    }
}

fn values(v: &[&str]) -> Values {
    Values {
        value: v.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn to_agent_message(m: http_request::Message) -> ConnectResponse {
    ConnectResponse {
        msg: Some(connect_response::Msg::Message(Message {
            data: HttpRequest { message: Some(m) }.encode_to_vec(),
        })),
    }
}

fn request_info() -> ConnectResponse {
    ConnectResponse {
        msg: Some(connect_response::Msg::RequestInfo(RequestInfo {
            method_name: KUBERNETES_API_MAKE_REQUEST.into(),
            meta: HashMap::new(),
        })),
    }
}

fn close_send() -> ConnectResponse {
    ConnectResponse {
        msg: Some(connect_response::Msg::CloseSend(CloseSend {})),
    }
}

fn head(
    method: &str,
    path: &str,
    query: &[(&str, &[&str])],
    header: &[(&str, &[&str])],
    extra: Option<HeaderExtra>,
) -> http_request::Message {
    http_request::Message::Header(http_request::Header {
        request: Some(prototool::HttpRequest {
            method: method.into(),
            header: header
                .iter()
                .map(|(k, v)| ((*k).to_owned(), values(v)))
                .collect(),
            url_path: path.into(),
            query: query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), values(v)))
                .collect(),
        }),
        extra: extra.map(|e| prost_types::Any {
            type_url: HEADER_EXTRA_TYPE_URL.into(),
            value: e.encode_to_vec(),
        }),
        content_length: Some(0),
    })
}

/// What the agent sent on a tunnel, decoded: gRPC frame kinds with the HTTP messages
/// inside `Message`s.
#[derive(Debug)]
enum Got {
    Header,
    Http(http_response::Message),
    Trailer,
    Error(i32, String),
    Descriptor,
}

/// Whether kas half-closes the call after the request (an upgraded request keeps it open
/// for its bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    CloseSend,
    KeepOpen,
}

impl Tunnel {
    /// Sends kas's side of one request, as kas does: the request info, `head`, `body` in
    /// one Data message per chunk, the trailer, then `then`.
    async fn send_request(&self, head: http_request::Message, body: &[&[u8]], then: Then) {
        let data = body.iter().map(|chunk| {
            http_request::Message::Data(http_request::Data {
                data: chunk.to_vec(),
            })
        });
        let messages = std::iter::once(head)
            .chain(data)
            .chain([http_request::Message::Trailer(http_request::Trailer {})])
            .map(to_agent_message);
        let close = (then == Then::CloseSend).then(close_send);
        for m in std::iter::once(request_info()).chain(messages).chain(close) {
            self.to_agent.send(Ok(m)).await.unwrap();
        }
    }
}

async fn next(tunnel: &mut Tunnel) -> Option<Got> {
    let msg = tokio::time::timeout(STEP, tunnel.from_agent.message())
        .await
        .expect("the agent answers in time")
        .expect("the stream stays sound")?;
    Some(decode(msg))
}

fn decode(msg: ConnectRequest) -> Got {
    match msg.msg.expect("a message") {
        connect_request::Msg::Descriptor(_) => Got::Descriptor,
        connect_request::Msg::Header(_) => Got::Header,
        connect_request::Msg::Message(m) => Got::Http(
            HttpResponse::decode(m.data.as_slice())
                .expect("an HttpResponse")
                .message
                .expect("a oneof"),
        ),
        connect_request::Msg::Trailer(_) => Got::Trailer,
        connect_request::Msg::Error(e) => {
            let s = e.status.unwrap_or_default();
            Got::Error(s.code, s.message)
        }
    }
}

#[tokio::test]
async fn replays_a_get_with_impersonation_in_agentk_order() {
    let f = fixture(Misbehaviour::None).await;
    let mut t = f.tunnel().await;
    let service = &t.descriptor.agent_descriptor.as_ref().unwrap().services[0];
    assert_eq!(service.name, KUBERNETES_API_SERVICE);
    assert_eq!(service.methods[0].name, KUBERNETES_API_METHOD);
    f.tunnel().await; // the second idle one
    assert!(f.agent.wait_idle(2, STEP).await);

    let extra = HeaderExtra {
        imp_config: Some(ImpersonationConfig {
            username: "gitlab:ci_job:7".into(),
            groups: vec!["gitlab:ci_job".into(), "gitlab:project:3".into()],
            uid: String::new(),
            extra: vec![ExtraKeyVal {
                key: "agent.gitlab.com/id".into(),
                val: vec!["42".into()],
            }],
        }),
    };
    let get = head(
        "GET",
        "/api/v1/namespaces/default/pods",
        &[("limit", &["500"])],
        &[("Accept", &["application/json"])],
        Some(extra),
    );
    t.send_request(get, &[], Then::CloseSend).await;

    assert!(matches!(next(&mut t).await, Some(Got::Header)));
    let Some(Got::Http(http_response::Message::Header(h))) = next(&mut t).await else {
        panic!("the response head second");
    };
    let response = h.response.unwrap();
    assert_eq!(
        (response.status_code, response.status.as_str()),
        (200, "200 OK")
    );
    assert_eq!(response.header["Content-Type"].value, ["application/json"]);
    assert!(response.header["Via"].value[0].starts_with("1.1 gitlab-agent/"));
    let mut body = Vec::new();
    let rest = loop {
        match next(&mut t).await {
            Some(Got::Http(http_response::Message::Data(d))) => body.extend(d.data),
            other => break other,
        }
    };
    assert!(
        matches!(rest, Some(Got::Http(http_response::Message::Trailer(_)))),
        "{rest:?}"
    );
    assert!(matches!(next(&mut t).await, Some(Got::Trailer)));
    assert!(
        next(&mut t).await.is_none(),
        "half-close after the trailer, no Error"
    );
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["items"][0]["metadata"]["name"], "web-0");
    drop(t); // kas ends the call

    let seen = f
        .kube
        .last_request("/api/v1/namespaces/default/pods")
        .unwrap();
    assert_eq!(seen.query, "limit=500");
    assert_eq!(seen.header("impersonate-user"), Some("gitlab:ci_job:7"));
    assert_eq!(
        seen.header_all("impersonate-group"),
        ["gitlab:ci_job", "gitlab:project:3"]
    );
    assert_eq!(
        seen.header("impersonate-extra-agent.gitlab.com%2fid"),
        Some("42")
    );
    assert!(seen.header("impersonate-uid").is_none());
    assert!(seen
        .header("via")
        .unwrap()
        .starts_with("gRPC/1.0 gitlab-agent/"));
    assert!(seen.header("authorization").is_none());

    // The used tunnel was replaced at once: a third one arrives and two are idle again.
    f.tunnel().await;
    assert_eq!(f.agent.used(), 1);
    assert!(f.agent.wait_idle(2, STEP).await);
    assert_eq!(f.agent.failed(), 0, "{:?}", f.agent.last_error());
}

#[tokio::test]
async fn a_watch_streams_events_as_they_happen_and_stops_with_the_call() {
    let f = fixture(Misbehaviour::None).await;
    let mut t = f.tunnel().await;
    let watch = head(
        "GET",
        "/api/v1/namespaces/default/pods",
        &[("watch", &["1"])],
        &[],
        None,
    );
    t.send_request(watch, &[], Then::CloseSend).await;
    assert!(matches!(next(&mut t).await, Some(Got::Header)));
    assert!(matches!(
        next(&mut t).await,
        Some(Got::Http(http_response::Message::Header(_)))
    ));
    eventually("the watch is open", STEP, || async {
        f.kube.open_watches() == 1
    })
    .await;
    // Without a resourceVersion the current pods come first, one event per Data message.
    let Some(Got::Http(http_response::Message::Data(d))) = next(&mut t).await else {
        panic!("an event as data");
    };
    assert!(String::from_utf8_lossy(&d.data).contains("web-0"));
    f.kube.add_pod("default", "pushed-later");
    let Some(Got::Http(http_response::Message::Data(d))) = next(&mut t).await else {
        panic!("an event as data");
    };
    let event = String::from_utf8(d.data).unwrap();
    assert!(
        event.contains("\"ADDED\"") && event.contains("pushed-later"),
        "{event}"
    );
    // kas ends the call (its caller left): the agent stops the watch upstream.
    drop(t);
    eventually("the upstream watch ends", STEP, || async {
        f.kube.open_watches() == 0
    })
    .await;
    eventually("the agent is idle again", STEP, || async {
        f.agent.busy() == 0
    })
    .await;
}

#[tokio::test]
async fn an_exec_upgrade_carries_bytes_both_ways() {
    let f = fixture(Misbehaviour::None).await;
    let mut t = f.tunnel().await;
    let exec = head(
        "GET",
        "/api/v1/namespaces/default/pods/web-0/exec",
        &[
            ("command", &["cat"]),
            ("stdin", &["true"]),
            ("stdout", &["true"]),
        ],
        &[
            ("Connection", &["Upgrade"]),
            ("Upgrade", &["websocket"]),
            ("Sec-Websocket-Version", &["13"]),
            ("Sec-Websocket-Key", &["dGhlIHNhbXBsZSBub25jZQ=="]),
            (
                "Sec-Websocket-Protocol",
                &["v5.channel.k8s.io, v4.channel.k8s.io"],
            ),
        ],
        None,
    );
    t.send_request(exec, &[], Then::KeepOpen).await;
    assert!(matches!(next(&mut t).await, Some(Got::Header)));
    let Some(Got::Http(http_response::Message::Header(h))) = next(&mut t).await else {
        panic!("the response head");
    };
    let response = h.response.unwrap();
    assert_eq!(response.status_code, 101);
    assert_eq!(
        response.header["Sec-Websocket-Protocol"].value,
        ["v5.channel.k8s.io"]
    );
    assert!(matches!(
        next(&mut t).await,
        Some(Got::Http(http_response::Message::Trailer(_)))
    ));

    // A websocket client over the tunnel's UpgradeData, through an in-memory pipe.
    let (client_io, mut bridge) = tokio::io::duplex(64 * 1024);
    let Tunnel {
        mut from_agent,
        to_agent,
        ..
    } = t;
    let pump = tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut after = Vec::new();
        let mut agent_open = true;
        loop {
            tokio::select! {
                n = bridge.read(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        let _ = to_agent.send(Ok(close_send())).await;
                        // Keep the call open until the agent ends it.
                        while agent_open {
                            match from_agent.message().await {
                                Ok(Some(m)) => after.push(decode(m)),
                                _ => agent_open = false,
                            }
                        }
                        return after;
                    }
                    Ok(n) => {
                        let m = to_agent_message(http_request::Message::UpgradeData(
                            http_request::UpgradeData { data: buf[..n].to_vec() },
                        ));
                        if to_agent.send(Ok(m)).await.is_err() {
                            return after;
                        }
                    }
                },
                m = from_agent.message(), if agent_open => match m {
                    Ok(Some(m)) => match decode(m) {
                        Got::Http(http_response::Message::UpgradeData(u)) => {
                            if bridge.write_all(&u.data).await.is_err() {
                                return after;
                            }
                        }
                        // The upgraded connection's end: the websocket client sees EOF.
                        other => {
                            after.push(other);
                            let _ = bridge.shutdown().await;
                        }
                    },
                    Ok(None) => {
                        agent_open = false;
                        let _ = bridge.shutdown().await;
                    }
                    Err(status) => {
                        after.push(Got::Error(status.code() as i32, status.message().to_owned()));
                        agent_open = false;
                        let _ = bridge.shutdown().await;
                    }
                },
            }
        }
    });
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    ws.send(WsMessage::Binary([&[0u8][..], b"ping"].concat().into()))
        .await
        .unwrap();
    let echoed = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echoed.into_data().as_ref(), [&[1u8][..], b"ping"].concat());
    ws.send(WsMessage::Binary(vec![255u8, 0].into()))
        .await
        .unwrap();
    let status = tokio::time::timeout(STEP, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let status = status.into_data();
    assert_eq!(status[0], 3);
    assert!(String::from_utf8_lossy(&status[1..]).contains("Success"));
    // The server closes; reading on answers its close, and the stream ends.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(STEP, ws.next()).await {}
    drop(ws);
    let after = tokio::time::timeout(STEP, pump).await.unwrap().unwrap();
    assert!(matches!(after.as_slice(), [Got::Trailer]), "{after:?}");
    assert_eq!(f.agent.failed(), 0, "{:?}", f.agent.last_error());
}

#[tokio::test]
async fn a_wrong_first_message_is_refused() {
    let f = fixture(Misbehaviour::WrongFirstMessage).await;
    let refusal = tokio::time::timeout(STEP, f.refusals.lock().await.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(refusal.code(), tonic::Code::InvalidArgument);
    eventually("the agent saw the refusal", STEP, || async {
        f.agent
            .last_error()
            .is_some_and(|s| s.code() == tonic::Code::InvalidArgument)
    })
    .await;
}

#[tokio::test]
async fn a_descriptor_without_the_method_is_sent() {
    let f = fixture(Misbehaviour::DescriptorWithoutMethod).await;
    let t = f.tunnel().await;
    assert!(t.descriptor.agent_descriptor.unwrap().services[0]
        .methods
        .is_empty());
}

/// Sends a GET on a fresh tunnel of `f` and returns what the agent answered, to EOF or
/// the stream's error.
async fn answer_to_get(f: &Fixture) -> (Vec<Got>, Option<Status>) {
    let mut t = f.tunnel().await;
    t.send_request(
        head("GET", "/version", &[], &[], None),
        &[],
        Then::CloseSend,
    )
    .await;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(STEP, t.from_agent.message())
            .await
            .unwrap()
        {
            Ok(Some(m)) => got.push(decode(m)),
            Ok(None) => return (got, None),
            Err(status) => return (got, Some(status)),
        }
    }
}

#[tokio::test]
async fn misbehaviours_on_a_request() {
    let f = fixture(Misbehaviour::None).await;
    f.agent.set_misbehaviour(Misbehaviour::MessageBeforeHeader);
    let (got, error) = answer_to_get(&f).await;
    assert!(
        matches!(got.first(), Some(Got::Http(_))),
        "{got:?} {error:?}"
    );

    f.agent.set_misbehaviour(Misbehaviour::TrailerAfterError);
    let (got, error) = answer_to_get(&f).await;
    assert!(
        matches!(got.as_slice(), [Got::Header, Got::Error(..), Got::Trailer]),
        "{got:?} {error:?}"
    );

    f.agent.set_misbehaviour(Misbehaviour::DisconnectMidRequest);
    let (got, error) = answer_to_get(&f).await;
    assert!(
        matches!(
            got.as_slice(),
            [Got::Header, Got::Http(http_response::Message::Header(_))]
        ),
        "{got:?} {error:?} {:?}",
        f.agent.last_error()
    );
    assert!(error.is_some(), "the stream is reset, not ended");

    f.agent.set_misbehaviour(Misbehaviour::None);
    let (got, error) = answer_to_get(&f).await;
    assert!(error.is_none());
    assert!(matches!(got.last(), Some(Got::Trailer)), "{got:?}");
    assert!(!got.iter().any(|g| matches!(g, Got::Descriptor)));
}

/// Sends a request of `head` with `body` in `chunks` Data messages on a fresh tunnel;
/// returns the status code and everything the agent sent.
async fn exchange(f: &Fixture, head: http_request::Message, chunks: &[&[u8]]) -> (i32, Vec<Got>) {
    let mut t = f.tunnel().await;
    t.send_request(head, chunks, Then::CloseSend).await;
    let mut got = Vec::new();
    while let Some(g) = next(&mut t).await {
        got.push(g);
    }
    let code = got
        .iter()
        .find_map(|g| match g {
            Got::Http(http_response::Message::Header(h)) => {
                h.response.as_ref().map(|r| r.status_code)
            }
            _ => None,
        })
        .unwrap_or(0);
    (code, got)
}

fn with_length(m: http_request::Message, length: i64) -> http_request::Message {
    match m {
        http_request::Message::Header(mut h) => {
            h.content_length = Some(length);
            http_request::Message::Header(h)
        }
        other => other,
    }
}

#[tokio::test]
async fn a_post_body_arrives_whole_with_or_without_a_length() {
    let f = fixture(Misbehaviour::None).await;
    let cm = |name: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"data":{{"k":"v"}}}}"#
        )
    };
    let path = "/api/v1/namespaces/default/configmaps";
    let json = [("Content-Type", &["application/json"][..])];

    let known = cm("known-length");
    let (a, b) = known.as_bytes().split_at(10);
    let post = with_length(head("POST", path, &[], &json, None), known.len() as i64);
    let (code, _) = exchange(&f, post, &[a, b]).await;
    assert_eq!(code, 201);
    let seen = f.kube.last_request(path).unwrap();
    assert_eq!(
        seen.header("content-length"),
        Some(known.len().to_string().as_str())
    );
    assert_eq!(seen.body, known.as_bytes());

    let chunked = cm("unknown-length");
    let post = with_length(head("POST", path, &[], &json, None), -1);
    let (code, _) = exchange(&f, post, &[chunked.as_bytes()]).await;
    assert_eq!(code, 201);
    let seen = f.kube.last_request(path).unwrap();
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
    assert_eq!(seen.body, chunked.as_bytes());
    assert_eq!(
        f.kube
            .object("configmaps", "default", "unknown-length")
            .unwrap()["data"]["k"],
        "v"
    );
}

#[tokio::test]
async fn nested_impersonation_and_unknown_methods_fail_as_agentk_does() {
    let f = fixture(Misbehaviour::None).await;
    let extra = HeaderExtra {
        imp_config: Some(ImpersonationConfig {
            username: "someone".into(),
            ..Default::default()
        }),
    };
    let nested = head(
        "GET",
        "/version",
        &[],
        &[("Impersonate-User", &["other"])],
        Some(extra),
    );
    let (code, got) = exchange(&f, nested, &[]).await;
    assert_eq!(code, 0, "no request was made");
    assert!(
        matches!(got.as_slice(), [Got::Header, Got::Trailer, Got::Error(14, m)] if m.contains("nested impersonation")),
        "{got:?}"
    );
    assert!(f.kube.last_request("/version").is_none());

    let mut t = f.tunnel().await;
    let info = ConnectResponse {
        msg: Some(connect_response::Msg::RequestInfo(RequestInfo {
            method_name: "/some.Service/Method".into(),
            meta: HashMap::new(),
        })),
    };
    t.to_agent.send(Ok(info)).await.unwrap();
    t.to_agent.send(Ok(close_send())).await.unwrap();
    let mut got = Vec::new();
    while let Some(g) = next(&mut t).await {
        got.push(g);
    }
    assert!(
        matches!(
            got.as_slice(),
            [Got::Header, Got::Trailer, Got::Error(12, _)]
        ),
        "{got:?}"
    );
}
