//! Per-client limits count a client's IPv6 /64, not each address, through the real
//! `kas-edge` binary over real sockets. Loopback has only `::1`, so the clients come through
//! a trusted "load balancer" on a loopback address that speaks PROXY protocol v2 and claims
//! sources 2001:db8:1:2::N; the edge judges the claimed client, as behind a real L4 balancer.
//! Also: the per-token limit under its new name, and the old name's warning.

mod common;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use common::*;
use hyper_util::rt::TokioIo;
use kas_proto::diagnostics::diagnostics_client::DiagnosticsClient;
use kas_proto::diagnostics::PingRequest;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// Address `n` of 2001:db8:1:`net`::/64.
fn v6(net: u16, n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, net, n, 0, 0, n)
}

/// A PROXY v2 header for a TCP client at `[client]:40000` (IPv6).
fn proxy_v2(client: Ipv6Addr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x21); // TCP over IPv6
    h.extend_from_slice(&36u16.to_be_bytes());
    h.extend_from_slice(&client.octets());
    h.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    h.extend_from_slice(&40000u16.to_be_bytes());
    h.extend_from_slice(&8443u16.to_be_bytes());
    h
}

/// The edge with `limits`, trusting PROXY headers from `lb` (a loopback address).
struct Setup {
    _cluster: Cluster,
    edge: Edge,
    lb: IpAddr,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(limits: &str) -> Self {
        let cluster = Cluster::start(1).await;
        let lb = ip(next_subnet(), 5);
        let dir = tempfile::tempdir().unwrap();
        let limits_file = dir.path().join("limits.toml");
        std::fs::write(&limits_file, limits).unwrap();
        let edge = Edge::start(
            cluster.subnet,
            &cluster.endpoints(),
            &format!(
                "[policies]\nlimits = {limits_file:?}\n\
                 [proxy_protocol]\ntrusted = [\"{lb}/32\"]\n"
            ),
        )
        .await;
        edge.wait_healthy(1).await;
        Self {
            _cluster: cluster,
            edge,
            lb,
            dir,
        }
    }

    fn limits_file(&self) -> PathBuf {
        self.dir.path().join("limits.toml")
    }

    /// A TLS session (ALPN h2) from `client`, through the load balancer.
    async fn tls_as(&self, client: Ipv6Addr) -> std::io::Result<TlsStream<TcpStream>> {
        connect_as(
            self.edge.https,
            self.edge.tls_client(&[b"h2"]),
            self.lb,
            client,
        )
        .await
    }

    /// A gRPC channel from `client`, through the load balancer.
    async fn grpc_as(&self, client: Ipv6Addr) -> Result<Channel, tonic::transport::Error> {
        let (https, tls, lb) = (self.edge.https, self.edge.tls_client(&[b"h2"]), self.lb);
        Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let tls = tls.clone();
                async move { connect_as(https, tls, lb, client).await.map(TokioIo::new) }
            }))
            .await
    }

    /// The gRPC status of one ping from `client` (`None`: served); `Unavailable` when the
    /// edge refused the connection.
    async fn ping_as(&self, client: Ipv6Addr) -> Option<Code> {
        match self.grpc_as(client).await {
            Ok(channel) => ping(&channel, TOKEN).await,
            Err(_) => Some(Code::Unavailable),
        }
    }
}

async fn connect_as(
    https: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    lb: IpAddr,
    client: Ipv6Addr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(lb, 0))?;
    let mut tcp = socket.connect(https).await?;
    tcp.write_all(&proxy_v2(client)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(STEP, tls.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("timeout"))?
}

/// One ping with `authorization: <authorization>` (a bare token means `Bearer <token>`).
async fn ping(channel: &Channel, authorization: &str) -> Option<Code> {
    let value = if authorization.contains(' ') {
        authorization.to_owned()
    } else {
        format!("Bearer {authorization}")
    };
    let mut request = tonic::Request::new(PingRequest::default());
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
    DiagnosticsClient::new(channel.clone())
        .ping(request)
        .await
        .err()
        .map(|s| s.code())
}

fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn new_connections_count_the_slash_64_whichever_address_it_uses() {
    // Burst 4, then one a minute: the test never waits long enough for a fifth.
    let setup = Setup::start(
        "[per_ip]\nnew_connections_per_second = 1\nnew_connections_burst = 4\n\
         requests_per_second = 1000\n",
    )
    .await;
    let started = std::time::Instant::now();
    let mut admitted = Vec::new();
    for n in 1..=12 {
        admitted.push(setup.tls_as(v6(2, n)).await.is_ok());
    }
    // Keyed by address (before), all twelve were fresh clients. One a second refills.
    let refilled = started.elapsed().as_secs() as usize;
    let count = admitted.iter().filter(|ok| **ok).count();
    assert!(
        (4..=4 + refilled).contains(&count) && count < 12,
        "one /64, one budget: {admitted:?}"
    );
    assert!(admitted[..4].iter().all(|ok| *ok), "{admitted:?}");
    assert!(
        setup.tls_as(v6(3, 1)).await.is_ok(),
        "the neighbouring /64 is another client"
    );
    let metrics = setup.edge.metrics().await;
    assert!(
        metric(
            &metrics,
            "edge_policy_blocked_total{reason=\"connection_rate\",source=\"limits\"}"
        ) >= Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "edge_ratelimit_evictions_total"),
        Some(0.0)
    );

    // Every address its own client, by configuration: a live edit applies at once.
    std::fs::write(
        setup.limits_file(),
        "[keys]\nipv6_prefix = 128\n[per_ip]\nnew_connections_per_second = 1\n\
         new_connections_burst = 4\n",
    )
    .unwrap();
    let s = &setup;
    eventually("the per-address keys are in force", STEP, || async move {
        s.tls_as(v6(2, 100)).await.is_ok()
    })
    .await;
    for n in 101..=108 {
        assert!(setup.tls_as(v6(2, n)).await.is_ok(), "address {n}");
    }
}

#[tokio::test]
async fn requests_concurrency_and_bans_count_the_slash_64() {
    let setup = Setup::start(
        "[per_ip]\nmax_concurrent_connections = 3\nrequests_per_second = 1\nrequests_burst = 3\n\
         [ban]\nviolations = 3\nwindow = \"1m\"\nduration = \"10m\"\n",
    )
    .await;
    // Concurrency: three connections open from three addresses of the /64; a fourth
    // address is refused, another /64 is not.
    let mut open = Vec::new();
    for n in 1..=3 {
        open.push(
            setup
                .grpc_as(v6(2, n))
                .await
                .unwrap_or_else(|e| panic!("connection {n}: {e}")),
        );
    }
    assert!(
        setup.tls_as(v6(2, 4)).await.is_err(),
        "a fourth connection from the same /64"
    );
    assert!(setup.tls_as(v6(3, 1)).await.is_ok());

    // Requests: three served across the three connections, then refused with status 8
    // (one a second refills: on a slow machine a later one may pass).
    let mut codes = Vec::new();
    for channel in open.iter().cycle().take(20) {
        codes.push(ping(channel, TOKEN).await);
        if codes.iter().filter(|c| c.is_some()).count() == 2 {
            break;
        }
    }
    assert_eq!(codes[..3], [None, None, None], "{codes:?}");
    assert_eq!(codes[3], Some(Code::ResourceExhausted), "{codes:?}");
    assert!(codes
        .iter()
        .all(|c| matches!(c, None | Some(Code::ResourceExhausted))));

    // The concurrency refusal and two request refusals were three violations: the whole
    // /64 is banned, at accept, on an address it never used before.
    // With every connection closed, concurrency cannot be what refuses it.
    drop(open);
    let admin = setup.edge.admin;
    eventually("connections closed", STEP, || async move {
        http_get(admin, "/metrics")
            .await
            .is_some_and(|(_, m)| metric(&m, "edge_open_connections ") == Some(0.0))
    })
    .await;
    let banned = "edge_policy_blocked_total{reason=\"banned\",source=\"limits\"}";
    let before = metric(&setup.edge.metrics().await, banned).unwrap_or(0.0);
    assert!(setup.tls_as(v6(2, 0xbeef)).await.is_err(), "banned /64");
    let metrics = setup.edge.metrics().await;
    assert_eq!(metric(&metrics, banned), Some(before + 1.0), "{metrics}");
    assert_eq!(
        setup.ping_as(v6(4, 1)).await,
        None,
        "other clients are served"
    );
    eventually("tracked keys published", STEP, || async move {
        http_get(admin, "/metrics")
            .await
            .and_then(|(_, m)| metric(&m, "edge_ratelimit_tracked_keys"))
            .is_some_and(|keys| keys >= 2.0)
    })
    .await;
}

#[tokio::test]
async fn per_token_streams_count_every_spelling_kas_accepts() {
    let setup = Setup::start("[per_token]\nnew_streams_per_minute = 3\n").await;
    let channel = setup.grpc_as(v6(2, 1)).await.unwrap();
    let mut codes = Vec::new();
    for spelling in [
        format!("Bearer {TOKEN}"),
        format!("bearer  {TOKEN} "),
        format!("BEARER {TOKEN}"),
        format!("BeArEr {TOKEN}"),
    ] {
        codes.push(ping(&channel, &spelling).await);
    }
    assert_eq!(
        codes,
        [None, None, None, Some(Code::ResourceExhausted)],
        "one token, however it is spelled"
    );
    assert!(
        !setup.edge.log().contains("deprecated"),
        "the new name warns nothing"
    );
}

#[tokio::test]
async fn the_old_per_token_name_still_limits_and_warns_once() {
    let setup = Setup::start("# old file\n[per_token]\nnew_connections_per_minute = 1\n").await;
    let channel = setup.grpc_as(v6(2, 1)).await.unwrap();
    assert_eq!(ping(&channel, TOKEN).await, None);
    assert_eq!(
        ping(&channel, TOKEN).await,
        Some(Code::ResourceExhausted),
        "still enforced"
    );
    let limits = setup.limits_file();
    let at = format!("{}:3", limits.display());
    let warnings = setup
        .edge
        .log()
        .lines()
        .filter(|l| l.contains("deprecated") && l.contains(&at))
        .count();
    assert_eq!(warnings, 1, "{}", setup.edge.log());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas-edge"))
        .args(["check", "--config"])
        .arg(&setup.edge.config_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!(
            "warning: {at}: field `per_token.new_connections_per_minute` is deprecated"
        )) && stdout.contains("per_token.new_streams_per_minute"),
        "{stdout}"
    );
}
