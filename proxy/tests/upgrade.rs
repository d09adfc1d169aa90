//! Restarting the edge without refusing a connection: a new `kas-edge run --upgrade`
//! takes the running edge's listening sockets on SIGQUIT, the old one drains, and a fleet
//! of agents (websocket and gRPC) moves over, while new connections keep arriving.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hyper_util::rt::TokioIo;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// Agents held through the hand-over, of each kind.
const AGENTS_PER_KIND: usize = 6;
/// The old process's drain (`shutdown.drain_deadline`); connections close spread over
/// 80 % of it (`close_spread`, the default).
const DRAIN: Duration = Duration::from_secs(6);
/// pingora keeps accepting in the old process this long after sending its sockets
/// (CLOSE_TIMEOUT in pingora's server), then the drain starts.
const PINGORA_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The new process; killed when dropped.
struct NewEdge(Child);

impl Drop for NewEdge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What went wrong, by kind, on connections that should never have failed.
#[derive(Default)]
struct Failures(Mutex<Vec<String>>);

impl Failures {
    fn record(&self, what: impl Into<String>) {
        self.0.lock().unwrap().push(what.into());
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// gRPC over TLS (ALPN h2), failing with the error instead of panicking.
async fn grpc(addr: SocketAddr, tls: TlsConnector) -> Result<Channel, String> {
    Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move { tls_connect(addr, &tls, None).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn ping(channel: &Channel) -> Result<(), String> {
    let mut client = DiagnosticsClient::new(channel.clone());
    let call = client.ping(with_token(PingRequest::default()));
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err("ping timed out".into()),
    }
}

/// An Echo stream opened within 5 s, or why not.
async fn open_echo(channel: &Channel) -> Result<Echo, String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = DiagnosticsClient::new(channel.clone());
    let call = client.echo(with_token(tokio_stream::wrappers::ReceiverStream::new(rx)));
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(response)) => Ok(Echo {
            tx,
            rx: response.into_inner(),
        }),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err("opening the stream timed out".into()),
    }
}

/// One plain HTTP/1.0 request on a new connection: its status line, or the error (a
/// refused or reset connection shows as such).
async fn plain_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(answer)) if answer.starts_with(b"HTTP/1.") => {
            Ok(String::from_utf8_lossy(&answer[..answer.len().min(12)]).into_owned())
        }
        Ok(Ok(answer)) => Err(format!("not an HTTP answer: {answer:?}")),
        Ok(Err(e)) => Err(format!("{:?}: {e}", e.kind())),
        Err(_) => Err("timed out".into()),
    }
}

/// An agent: holds an Echo stream (over a websocket tunnel or gRPC over TLS), one round
/// trip every 100 ms; when its connection ends it reconnects, as agentk does. Records
/// when its first connection broke (relative to `since`) and whether it is connected.
struct Agent {
    /// When the first connection ended, after `since`.
    first_break: Mutex<Option<Duration>>,
    /// Round trips that succeeded since the last (re)connect.
    round_trips_since_connect: AtomicUsize,
    reconnects: AtomicUsize,
}

async fn hold_agent(
    websocket: bool,
    addr: SocketAddr,
    cert: std::path::PathBuf,
    agent: Arc<Agent>,
    since: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    failures: Arc<Failures>,
) {
    let kind = if websocket { "websocket" } else { "grpc" };
    // Bounded: the test stops it, and a stuck agent gives up after this many attempts.
    for attempt in 0..200 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let channel = if websocket {
            ws_channel(addr, tls_connector(&cert, &[b"http/1.1"]), None)
                .await
                .map_err(|e| format!("{e:?}"))
        } else {
            grpc(addr, tls_connector(&cert, &[b"h2"])).await
        };
        let channel = match channel {
            Ok(channel) => channel,
            Err(e) => {
                failures.record(format!("{kind} agent reconnect {attempt}: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if attempt > 0 {
            agent.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let mut echo = match open_echo(&channel).await {
            Ok(echo) => echo,
            Err(e) => {
                failures.record(format!("{kind} agent stream {attempt}: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if echo.round_trip(format!("{kind} {n}")).await.is_err() {
                break;
            }
            n += 1;
            agent
                .round_trips_since_connect
                .fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // Not connected any more: reset before the break is recorded, so "broke once and
        // round trips since" never counts the old connection's.
        agent.round_trips_since_connect.store(0, Ordering::Relaxed);
        let started = *since.lock().unwrap();
        let mut first = agent.first_break.lock().unwrap();
        if first.is_none() {
            *first = Some(started.map(|s| s.elapsed()).unwrap_or_default());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_takes_the_sockets_over_without_refusing_a_connection_and_the_fleet_moves() {
    let cluster = Cluster::start(2).await;
    // A certificate both processes serve (a generated one would differ between them).
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = kas_testkit::tls::self_signed(dir.path());
    let socket = dir.path().join("upgrade.sock");
    let edge = Edge::start(
        cluster.subnet,
        &cluster.endpoints(),
        &format!(
            "[tls]\n[[tls.certificates]]\ncert = {cert:?}\nkey = {key:?}\n\
             [shutdown]\nreadiness_delay = \"0s\"\ndrain_deadline = \"{}s\"\nupgrade_socket = {socket:?}\n",
            DRAIN.as_secs()
        ),
    )
    .await;
    edge.wait_healthy(2).await;
    let (https, http, admin) = (edge.https, edge.http, edge.admin);

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Failures::default());
    let since: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut agents = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..2 * AGENTS_PER_KIND {
        let agent = Arc::new(Agent {
            first_break: Mutex::new(None),
            round_trips_since_connect: AtomicUsize::new(0),
            reconnects: AtomicUsize::new(0),
        });
        agents.push(agent.clone());
        tasks.push(tokio::spawn(hold_agent(
            i % 2 == 0,
            https,
            cert.clone(),
            agent,
            since.clone(),
            stop.clone(),
            failures.clone(),
        )));
    }
    eventually("every agent connected", STEP, || {
        let agents = agents.clone();
        async move {
            agents
                .iter()
                .all(|a| a.round_trips_since_connect.load(Ordering::Relaxed) > 0)
        }
    })
    .await;
    assert_eq!(failures.take(), Vec::<String>::new(), "before the upgrade");

    // New connections all along: a TLS tunnel with a call, gRPC with a call, the admin
    // port and the plain-HTTP port, each on a new connection, one after another.
    let fresh_count = Arc::new(AtomicUsize::new(0));
    let fresh = {
        let (stop, failures, cert, count) = (
            stop.clone(),
            failures.clone(),
            cert.clone(),
            fresh_count.clone(),
        );
        tokio::spawn(async move {
            for round in 0..2_000u32 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match round % 4 {
                    0 => {
                        match ws_channel(https, tls_connector(&cert, &[b"http/1.1"]), None).await {
                            Ok(channel) => {
                                if let Err(e) = ping(&channel).await {
                                    failures.record(format!("new websocket call: {e}"));
                                }
                            }
                            Err(e) => failures.record(format!("new websocket: {e:?}")),
                        }
                    }
                    1 => match grpc(https, tls_connector(&cert, &[b"h2"])).await {
                        Ok(channel) => {
                            if let Err(e) = ping(&channel).await {
                                failures.record(format!("new gRPC call: {e}"));
                            }
                        }
                        Err(e) => failures.record(format!("new gRPC connection: {e}")),
                    },
                    2 => {
                        if let Err(e) = plain_get(admin, "/readyz").await {
                            failures.record(format!("admin port: {e}"));
                        }
                    }
                    _ => {
                        if let Err(e) = plain_get(http, "/").await {
                            failures.record(format!("plain-HTTP port: {e}"));
                        }
                    }
                }
                count.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // pingora's order: the new process first, then SIGQUIT to the old one.
    let new_log = dir.path().join("new-edge.log");
    let new = NewEdge(
        Command::new(env!("CARGO_BIN_EXE_kas-edge"))
            .args(["run", "--upgrade", "--config"])
            .arg(&edge.config_file)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(std::fs::File::create(&new_log).unwrap()))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let waiting = {
        let mut path = socket.clone().into_os_string();
        path.push(".listeners");
        std::path::PathBuf::from(path)
    };
    eventually("the new process waits for the sockets", STEP, || {
        let waiting = waiting.clone();
        async move { waiting.exists() }
    })
    .await;
    let fresh_before = fresh_count.load(Ordering::Relaxed);
    *since.lock().unwrap() = Some(Instant::now());
    let quit_at = Instant::now();
    edge.signal("QUIT");

    // The old process hands over, keeps accepting for pingora's close timeout, drains
    // and exits by itself.
    let mut old = edge;
    let exit_within = PINGORA_CLOSE_TIMEOUT + DRAIN + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = old.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            quit_at.elapsed() < exit_within,
            "the old edge did not exit after its drain; its log:\n{}",
            old.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let exited_after = quit_at.elapsed();
    assert!(status.success(), "old edge exit status {status}");

    // Every agent is back, on the new process (the old one is gone).
    eventually("every agent back", STEP, || {
        let agents = agents.clone();
        async move {
            agents.iter().all(|a| {
                a.first_break.lock().unwrap().is_some()
                    && a.round_trips_since_connect.load(Ordering::Relaxed) > 2
            })
        }
    })
    .await;
    // The new process serves the admin port alone: ready, counting the fleet.
    assert!(matches!(http_get(admin, "/readyz").await, Some((200, _))));
    let metrics = http_get(admin, "/metrics").await.unwrap().1;
    let open = metric_value(&metrics, "edge_open_connections").unwrap_or(0.0);
    assert!(
        open >= (2 * AGENTS_PER_KIND) as f64,
        "the new process holds {open} connections; its log:\n{}",
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    stop.store(true, Ordering::Relaxed);
    fresh.await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let fresh_during = fresh_count.load(Ordering::Relaxed) - fresh_before;
    let failures = failures.take();
    let new_log_text = std::fs::read_to_string(&new_log).unwrap_or_default();
    assert!(
        failures.is_empty(),
        "{} failures during the hand-over ({fresh_during} new connections): {failures:#?}\n\
         old edge's log:\n{}\nnew edge's log:\n{new_log_text}",
        failures.len(),
        old.log()
    );
    assert!(
        fresh_during > 50,
        "only {fresh_during} new connections during the hand-over"
    );

    // Every agent lost its connection to the old process once, at moments spread over
    // the drain, not all at its deadline.
    let breaks: Vec<Duration> = agents
        .iter()
        .map(|a| {
            a.first_break
                .lock()
                .unwrap()
                .unwrap_or_else(|| panic!("an agent never left the old process"))
        })
        .collect();
    let (first, last) = (breaks.iter().min().unwrap(), breaks.iter().max().unwrap());
    assert!(
        *last - *first > Duration::from_secs(1),
        "agents all left the old process within {:?} ({breaks:?})",
        *last - *first
    );
    assert!(
        *last <= exited_after,
        "an agent was cut after the old process exited?"
    );

    drop(new);
}
