//! The public `:80` listener (`listen.http`) against hostile clients, through the edge
//! binary over real sockets: it is admitted like the TLS port (blocklist, per-IP
//! connection rate), before a byte is read. (A flood of it: `public_http_flood.rs`.)

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// `GET /healthz` on `:80` from `from`: `Some(status)`, or `None` when the edge closed the
/// connection without a word.
async fn healthz_from(from: IpAddr, to: SocketAddr) -> Option<u16> {
    let mut s = connect_from(from, to).await.ok()?;
    // Refused connections are closed at accept; the write may or may not still succeed.
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kas.test\r\nConnection: close\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
        .await
        .expect("the edge answers or closes within 5 s");
    if read.is_err() || answer.is_empty() {
        return None;
    }
    String::from_utf8_lossy(&answer)
        .get(9..12)
        .and_then(|code| code.parse().ok())
}

/// The value of the first metric line starting with `prefix`, 0 if absent.
#[tokio::test]
async fn blocklisted_and_rate_limited_clients_are_refused_on_port_80() {
    let cluster = Cluster::start(0).await;
    let blocked = ip(cluster.subnet, 66);
    let hasty = ip(cluster.subnet, 67);
    let welcome = ip(cluster.subnet, 68);
    let dir = tempfile::tempdir().unwrap();
    let blocklist = dir.path().join("blocklist.txt");
    let limits = dir.path().join("limits.toml");
    std::fs::write(&blocklist, format!("{blocked}  # test\n")).unwrap();
    std::fs::write(
        &limits,
        "[per_ip]\nnew_connections_per_second = 1\nnew_connections_burst = 2\n",
    )
    .unwrap();
    let pods = [SocketAddr::new(ip(cluster.subnet, 10), AGENT_PORT)];
    let edge = Edge::start(
        cluster.subnet,
        &pods,
        &format!("[policies]\nblocklist = {blocklist:?}\nlimits = {limits:?}\n"),
    )
    .await;

    assert_eq!(healthz_from(welcome, edge.http).await, Some(200));
    assert_eq!(
        healthz_from(blocked, edge.http).await,
        None,
        "a blocklisted client gets nothing on :80"
    );
    // The same per-IP connection budget as the TLS port: two, then refused.
    assert_eq!(healthz_from(hasty, edge.http).await, Some(200));
    assert_eq!(healthz_from(hasty, edge.http).await, Some(200));
    assert_eq!(healthz_from(hasty, edge.http).await, None);
    assert_eq!(healthz_from(welcome, edge.http).await, Some(200));

    let m = edge.metrics().await;
    assert_eq!(
        metric(
            &m,
            "edge_policy_blocked_total{reason=\"blocklist\",source=\"blocklist\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "edge_policy_blocked_total{reason=\"connection_rate\",source=\"limits\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "edge_plain_http_dropped_total{listener=\"http\",reason=\"policy\"}"
        ),
        2.0,
        "{m}"
    );
}
