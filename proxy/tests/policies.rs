//! Operator policies through the edge binary over real sockets, with clients on distinct
//! loopback addresses: blocklist at accept (and live edits), PROXY protocol, preview,
//! header rules and rate limits.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

struct PolicyFiles {
    dir: tempfile::TempDir,
}

impl PolicyFiles {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Writes like an editor that saves to a temp file and renames it over the original.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.path(&format!(".{name}.swp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }
    fn toml(&self, extra: &str) -> String {
        format!(
            "[policies]\nblocklist = {:?}\nlimits = {:?}\nrules = {:?}\n{extra}",
            self.path("blocklist.txt"),
            self.path("limits.toml"),
            self.path("rules.toml")
        )
    }
}

async fn setup(
    blocklist: &str,
    limits: &str,
    rules: &str,
    extra: &str,
) -> (Cluster, Edge, PolicyFiles) {
    let cluster = Cluster::start(1).await;
    let files = PolicyFiles::new();
    files.write("blocklist.txt", blocklist);
    files.write("limits.toml", limits);
    files.write("rules.toml", rules);
    let edge = Edge::start(cluster.subnet, &cluster.endpoints(), &files.toml(extra)).await;
    edge.wait_healthy(1).await;
    (cluster, edge, files)
}

#[tokio::test]
async fn blocked_ip_is_refused_before_tls_and_others_pass() {
    let subnet = next_subnet();
    let blocked = ip(subnet, 66);
    let (cluster, edge, _files) = setup(&format!("{blocked}  # abuse, INC-1\n"), "", "", "").await;
    let _ = cluster;
    let before = metric(
        &edge.metrics().await,
        "edge_tls_handshakes_total{result=\"started\"}",
    );
    assert!(
        tls_from(&edge, blocked).await.is_err(),
        "blocked client got a TLS session"
    );
    let after = metric(
        &edge.metrics().await,
        "edge_tls_handshakes_total{result=\"started\"}",
    );
    assert_eq!(
        before, after,
        "the blocked client never reached the TLS handshake"
    );
    assert!(ping_from(&edge, ip(subnet, 67)).await.is_ok());
    let metrics = edge.metrics().await;
    assert!(
        metric(&metrics, "edge_policy_blocked_total{reason=\"blocklist\"") >= 1.0,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "edge_blocklist_entries"), 1.0);
}

#[tokio::test]
async fn live_edit_cuts_the_newly_blocked_clients_open_websocket_only() {
    let subnet = next_subnet();
    let (victim, bystander) = (ip(subnet, 66), ip(subnet, 67));
    let (_cluster, edge, files) = setup("# nothing yet\n", "", "", "").await;
    let mut victim_conn = tunnel(&edge, victim).await;
    let mut bystander_conn = tunnel(&edge, bystander).await;

    let edited = Instant::now();
    files.write(
        "blocklist.txt",
        &format!("{victim}/32  # blocked during the incident\n"),
    );
    let cut_after = cut_after(&mut victim_conn, edited, "the blocked client's websocket").await;
    println!("newly blocked websocket closed {cut_after:?} after the edit");
    assert!(cut_after < Duration::from_secs(5), "took {cut_after:?}");
    bystander_conn
        .ping(with_token(PingRequest::default()))
        .await
        .expect("other clients' connections stay up");
    assert!(
        tls_from(&edge, victim).await.is_err(),
        "new connections refused too"
    );
    assert!(
        metric(
            &edge.metrics().await,
            "edge_policy_closed_connections_total"
        ) >= 1.0
    );
    // The access log says who ended the tunnel.
    let victim_tunnel = format!("\"client\":\"{victim}\"");
    eventually("the cut tunnel's access line", STEP, || {
        let log = edge.log();
        let found = log
            .lines()
            .any(|l| l.contains(&victim_tunnel) && l.contains("\"tunnel_end\":\"closed_by_edge\""));
        async move { found }
    })
    .await;
}

#[tokio::test]
async fn garbage_edit_keeps_the_old_table_and_reports_the_line() {
    let subnet = next_subnet();
    let blocked = ip(subnet, 66);
    let (_cluster, edge, files) = setup(&format!("{blocked}\n"), "", "", "").await;
    files.write(
        "blocklist.txt",
        &format!("# new version\n{}\n10.0.0.300\n", ip(subnet, 68)),
    );
    let admin = edge.admin;
    eventually("reload error counted", STEP, || async move {
        http_get(admin, "/metrics")
            .await
            .is_some_and(|(_, m)| metric(&m, "edge_blocklist_reload_errors_total") >= 1.0)
    })
    .await;
    assert!(
        tls_from(&edge, blocked).await.is_err(),
        "old table still enforced"
    );
    assert!(
        tls_from(&edge, ip(subnet, 68)).await.is_ok(),
        "the rejected version is not applied"
    );
    let log = edge.log();
    assert!(
        log.contains("blocklist.txt:3") && log.contains("10.0.0.300"),
        "{log}"
    );

    // `kas-edge check` says the same before anyone saves.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas-edge"))
        .args(["check", "--config"])
        .arg(&edge.config_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("blocklist.txt:3"), "{stderr}");
}

#[tokio::test]
async fn preview_entries_count_but_let_through() {
    let subnet = next_subnet();
    let watched = ip(subnet, 70);
    let (_cluster, edge, _files) = setup(
        &format!("preview {watched}  # testing a rule\n"),
        "",
        "",
        "",
    )
    .await;
    assert!(ping_from(&edge, watched).await.is_ok());
    let admin = edge.admin;
    eventually("preview counted", STEP, || async move {
        http_get(admin, "/metrics").await.is_some_and(|(_, m)| {
            metric(
                &m,
                "edge_policy_preview_matches_total{source=\"blocklist\"}",
            ) >= 1.0
        })
    })
    .await;
}

fn proxy_v1(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        source.ip(),
        dest.ip(),
        source.port(),
        dest.port()
    )
    .into_bytes()
}

fn proxy_v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    for addr in [source, dest] {
        if let IpAddr::V4(v4) = addr.ip() {
            h.extend_from_slice(&v4.octets());
        }
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&dest.port().to_be_bytes());
    h
}

/// Connects from `from`, sends `header`, then tries a TLS handshake.
async fn tls_after_header(edge: &Edge, from: IpAddr, header: &[u8]) -> std::io::Result<()> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut tcp = socket.connect(edge.https).await?;
    tcp.write_all(header).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(STEP, edge.tls_client(&[b"h2"]).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("timeout"))?
        .map(|_| ())
}

#[tokio::test]
async fn proxy_protocol_is_honoured_only_from_trusted_sources() {
    let subnet = next_subnet();
    let lb = ip(subnet, 5);
    let blocked = SocketAddr::new(ip(subnet, 66), 40000);
    let fine = SocketAddr::new(ip(subnet, 77), 40001);
    let (_cluster, edge, _files) = setup(
        &format!("{}\n", blocked.ip()),
        "",
        "",
        &format!("[proxy_protocol]\ntrusted = [\"{lb}/32\"]\n"),
    )
    .await;
    for header in [proxy_v1(blocked, edge.https), proxy_v2(blocked, edge.https)] {
        assert!(
            tls_after_header(&edge, lb, &header).await.is_err(),
            "blocked real client let in"
        );
    }
    for header in [proxy_v1(fine, edge.https), proxy_v2(fine, edge.https)] {
        tls_after_header(&edge, lb, &header)
            .await
            .expect("trusted LB with an allowed client");
    }
    // An untrusted source's PROXY header is not honoured: the handshake fails.
    assert!(
        tls_after_header(&edge, ip(subnet, 6), &proxy_v1(fine, edge.https))
            .await
            .is_err()
    );
    // The trusted LB cannot skip the header.
    assert!(tls_from(&edge, lb).await.is_err());

    // The access log names the real client.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(lb, 0)).unwrap();
    let mut tcp = socket.connect(edge.https).await.unwrap();
    tcp.write_all(&proxy_v1(fine, edge.https)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = edge
        .tls_client(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(STEP, tls.read_to_end(&mut buf)).await;
    eventually("access log with the real client", STEP, || {
        let log = edge.log();
        async move { log.contains(&format!("\"client\":\"{}\"", fine.ip())) }
    })
    .await;
}

#[tokio::test]
async fn header_rule_answers_403_and_grpc_status_7() {
    let rules =
        "[[deny]]\nname = \"bad-user-agent\"\nheader = \"user-agent\"\ncontains = \"badUser\"\n";
    let (_cluster, edge, _files) = setup("", "", rules, "").await;
    let mut tls = tls_connect(edge.https, &edge.tls_client(&[b"http/1.1"]), None)
        .await
        .unwrap();
    tls.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: badUser/1.0\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Protocol: ws-tunnel\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0; 512];
    let n = tokio::time::timeout(STEP, tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    let tls = edge.tls_client(&[b"h2"]);
    let https = edge.https;
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .user_agent("badUser")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let tls = tls.clone();
            async move {
                tls_connect(https, &tls, None)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let status = DiagnosticsClient::new(channel)
        .ping(with_token(PingRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Everyone else is served.
    assert!(ping(&edge.grpc_channel().await).await.is_ok());
}

async fn ping(channel: &tonic::transport::Channel) -> Result<String, tonic::Status> {
    DiagnosticsClient::new(channel.clone())
        .ping(with_token(PingRequest::default()))
        .await
        .map(|r| r.into_inner().pod)
}

#[tokio::test]
async fn request_rate_limit_answers_429_with_retry_after_and_grpc_status_8() {
    let limits = "[per_ip]\nrequests_per_second = 1\nrequests_burst = 2\n";
    let (_cluster, edge, _files) = setup("", limits, "", "").await;
    let channel = edge.grpc_channel().await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(ping(&channel).await.err().map(|s| s.code()));
    }
    assert_eq!(codes[..2], [None, None], "{codes:?}");
    assert!(codes.contains(&Some(Code::ResourceExhausted)), "{codes:?}");

    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&edge.ca_file).unwrap()).unwrap(),
        )
        .resolve("localhost", edge.https)
        .build()
        .unwrap();
    let mut saw_429 = false;
    for _ in 0..4 {
        let r = client
            .get(format!("https://localhost:{}/", edge.https.port()))
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry));
            saw_429 = true;
        }
    }
    assert!(saw_429);
}

#[tokio::test]
async fn per_token_limit_isolates_tokens_from_the_same_ip() {
    let limits = "[per_token]\nnew_connections_per_minute = 2\n";
    let (cluster, edge, _files) = setup("", limits, "", "").await;
    let other = kas::dev::gitlab_standin::StandinAgent {
        agent_id: 2,
        ..kas::dev::gitlab_standin::StandinAgent::demo("glagent-second-token")
    };
    cluster.gitlab.add_agent(other);
    let channel = edge.grpc_channel().await;
    let call = |token: &'static str| {
        let channel = channel.clone();
        async move {
            let mut request = tonic::Request::new(PingRequest::default());
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            DiagnosticsClient::new(channel)
                .ping(request)
                .await
                .err()
                .map(|s| s.code())
        }
    };
    assert_eq!(call(TOKEN).await, None);
    assert_eq!(call(TOKEN).await, None);
    assert_eq!(call(TOKEN).await, Some(Code::ResourceExhausted));
    assert_eq!(
        call("glagent-second-token").await,
        None,
        "another agent behind the same IP is unaffected"
    );
}

#[test]
fn shipped_policy_examples_pass_kas_edge_check() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\nself_signed = true\n\
             [discovery]\nkind = \"static\"\nendpoints = [\"127.0.1.1:8150\"]\n\
             [policies]\nblocklist = {:?}\nlimits = {:?}\nrules = {:?}\n",
            root.join("blocklist.txt"),
            root.join("limits.toml"),
            root.join("rules.toml")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas-edge"))
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}
