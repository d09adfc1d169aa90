//! Clients over real sockets, as agents connect: gRPC over HTTP/2 cleartext, TLS and
//! websocket (kas's ws-tunnel), plain HTTP GETs, the agent's token.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// A verifying TLS client that trusts the certificates in the PEM file `ca_file` and offers
/// `alpn`.
pub fn tls_connector(ca_file: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let pem = std::fs::read(ca_file).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    tls_connector_trusting(roots, alpn)
}

/// A verifying TLS client that trusts `roots` and offers `alpn`.
pub fn tls_connector_trusting(roots: rustls::RootCertStore, alpn: &[&[u8]]) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TCP connection to `addr`, from `bind` when given (a client on an address of its own).
pub async fn tcp_connect(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    match bind {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await
        }
        None => TcpStream::connect(addr).await,
    }
}

/// A TLS session with `addr` for the name `localhost`, from `bind` when given.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: &TlsConnector,
    bind: Option<IpAddr>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tcp_connect(addr, bind).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tls.connect(name, tcp).await
}

/// gRPC over HTTP/2 cleartext, as `grpc://` agents connect.
pub async fn h2c_channel(addr: SocketAddr) -> Channel {
    kas::dev::channels::h2c(addr).await.unwrap()
}

/// gRPC over TLS (give `tls` ALPN h2), as `grpcs://` agents connect.
pub async fn grpc_channel(addr: SocketAddr, tls: TlsConnector) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move { tls_connect(addr, &tls, None).await.map(TokioIo::new) }
        }))
        .await
        .unwrap()
}

/// gRPC over a ws-tunnel websocket: `wss://` through `tls` (give it ALPN http/1.1), as
/// agentk connects by default, or `ws://` when `tls` is `None`; from `bind` when given.
pub async fn ws_channel(
    addr: SocketAddr,
    tls: impl Into<Option<TlsConnector>>,
    bind: Option<IpAddr>,
) -> Result<Channel, tonic::transport::Error> {
    let tls = tls.into();
    // The HTTP/2 authority inside the tunnel: the TLS name, or a name nothing resolves.
    let (authority, url) = match tls {
        Some(_) => ("http://localhost", "wss://localhost/".to_owned()),
        None => ("http://kas.invalid", format!("ws://{addr}/")),
    };
    Endpoint::from_static(authority)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (tls, url) = (tls.clone(), url.clone());
            async move {
                let tcp = tcp_connect(addr, bind).await?;
                let stream: Box<dyn Io> = match tls {
                    Some(tls) => {
                        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                        Box::new(tls.connect(name, tcp).await?)
                    }
                    None => Box::new(tcp),
                };
                let ws = kas::transport::wstunnel::client_handshake(stream, &url).await?;
                Ok::<_, std::io::Error>(TokioIo::new(ws))
            }
        }))
        .await
}

/// A byte stream, over TLS or not.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A plain HTTP/1.1 GET with a 2 s bound: status and body, `None` when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// `message` with `authorization: Bearer <token>`, as agentk sends it.
pub use kas::dev::channels::with_token;

/// Reads an HTTP/1 head byte by byte, up to and including its blank line, so nothing after
/// it is consumed (a stand-in pod answers an upgrade, then relays the rest). `None` if the
/// peer closes first.
pub async fn read_http_head(sock: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}
