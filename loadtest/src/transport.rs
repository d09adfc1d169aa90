//! One agent connection: TCP from a chosen loopback source address, TLS when the target
//! says so, the `ws-tunnel` websocket or plain HTTP/2, and an HTTP/2 client on top that
//! tonic's generated clients accept. The HTTP/2 connection is driven by the agent's own
//! task, so a connection costs one task, not a task plus a channel worker.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpSocket;

use crate::target::Target;

/// Small windows and buffers: an idle agent needs a few KiB, not the megabytes hyper
/// would allow by default, and the goal is many thousands of them in one process.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONN_WINDOW: u32 = 256 * 1024;
const MAX_SEND_BUF: usize = 64 * 1024;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

pub type Connection =
    hyper::client::conn::http2::Connection<TokioIo<BoxIo>, tonic::body::Body, TokioExecutor>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// gRPC inside a `ws-tunnel` websocket (agentk's default `wss://`).
    Websocket,
    /// gRPC straight over HTTP/2 (`grpcs://`, ALPN h2).
    Grpc,
}

/// Which step of connecting failed, so reports tell TLS trouble from refused sockets.
#[derive(Debug)]
pub struct ConnectError {
    pub stage: &'static str,
    pub error: anyhow::Error,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {:#}", self.stage, self.error)
    }
}

fn stage<E: Into<anyhow::Error>>(stage: &'static str) -> impl FnOnce(E) -> ConnectError {
    move |e| ConnectError {
        stage,
        error: e.into(),
    }
}

/// The HTTP/2 request sender as a tower service for tonic's generated clients.
#[derive(Clone)]
pub struct H2Service(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<http::Request<tonic::body::Body>> for H2Service {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

/// A ready HTTP/2 client and where its requests say they go.
#[derive(Clone)]
pub struct GrpcConn {
    pub service: H2Service,
    pub origin: http::Uri,
}

pub fn load_roots(ca_file: &Path) -> anyhow::Result<rustls::RootCertStore> {
    let pem = std::fs::read(ca_file)
        .with_context(|| format!("cannot read --ca-file {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.with_context(|| format!("{}: bad PEM certificate", ca_file.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: unusable certificate", ca_file.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no certificate found", ca_file.display());
    }
    Ok(roots)
}

pub(crate) fn tls_connector(
    roots: &rustls::RootCertStore,
    alpn: &[u8],
    resumption: bool,
) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    if !resumption {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

pub struct Connector {
    /// ALPN http/1.1 for the websocket upgrade.
    tls_ws: Option<tokio_rustls::TlsConnector>,
    /// ALPN h2 for gRPC.
    tls_h2: Option<tokio_rustls::TlsConnector>,
    server_name: ServerName<'static>,
    server_name_text: String,
    h2: hyper::client::conn::http2::Builder<TokioExecutor>,
}

impl Connector {
    pub fn new(
        ca_file: Option<&Path>,
        server_name: &str,
        resumption: bool,
    ) -> anyhow::Result<Self> {
        let (tls_ws, tls_h2) = match ca_file {
            Some(path) => {
                let roots = load_roots(path)?;
                (
                    Some(tls_connector(&roots, b"http/1.1", resumption)?),
                    Some(tls_connector(&roots, b"h2", resumption)?),
                )
            }
            None => (None, None),
        };
        let name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("--server-name `{server_name}` is not a valid name"))?;
        let mut h2 = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .adaptive_window(false)
            .max_send_buf_size(MAX_SEND_BUF)
            .max_frame_size(16 * 1024);
        Ok(Self {
            tls_ws,
            tls_h2,
            server_name: name,
            server_name_text: server_name.to_owned(),
            h2,
        })
    }

    /// The same client, but its streams grant the server no flow-control window: it takes
    /// none of any answer (the hostile scenario's `zero_window` readers).
    pub fn granting_no_window(mut self) -> Self {
        self.h2.initial_stream_window_size(0);
        self
    }

    /// TCP (bound to `source` when given), then TLS, websocket and HTTP/2 as the target and
    /// transport require. The returned connection must be polled for requests to progress.
    pub async fn connect(
        &self,
        target: &Target,
        transport: Transport,
        source: Option<IpAddr>,
    ) -> Result<(GrpcConn, Connection), ConnectError> {
        self.connect_via(target, transport, source, |io| io).await
    }

    /// [`Connector::connect`] with `wrap` put around the byte stream below the websocket
    /// (above TLS): how a misbehaving client (one that stops reading) is built from a
    /// well-behaved one.
    pub async fn connect_via(
        &self,
        target: &Target,
        transport: Transport,
        source: Option<IpAddr>,
        wrap: impl FnOnce(BoxIo) -> BoxIo,
    ) -> Result<(GrpcConn, Connection), ConnectError> {
        let socket = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(stage("socket"))?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("cannot bind source address {ip}"))
                .map_err(stage("bind"))?;
        }
        let tcp = socket
            .connect(target.addr)
            .await
            .with_context(|| format!("connect to {}", target.addr))
            .map_err(stage("tcp"))?;
        let _ = tcp.set_nodelay(true);
        let mut io: BoxIo = Box::new(tcp);
        if target.tls {
            let tls = match transport {
                Transport::Websocket => self.tls_ws.as_ref(),
                Transport::Grpc => self.tls_h2.as_ref(),
            }
            .ok_or_else(|| anyhow::anyhow!("TLS target {} needs --ca-file", target.url))
            .map_err(stage("tls"))?;
            let stream = tls
                .connect(self.server_name.clone(), io)
                .await
                .map_err(stage("tls"))?;
            if transport == Transport::Grpc && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(ConnectError {
                    stage: "tls",
                    error: anyhow::anyhow!("server did not agree to ALPN h2"),
                });
            }
            io = Box::new(stream);
        }
        io = wrap(io);
        if transport == Transport::Websocket {
            let ws = kas::transport::wstunnel::client_handshake(
                io,
                &target.ws_url(&self.server_name_text),
            )
            .await
            .map_err(stage("websocket"))?;
            io = Box::new(ws);
        }
        let (send, conn) = self
            .h2
            .handshake(TokioIo::new(io))
            .await
            .map_err(stage("http2"))?;
        let origin = target
            .grpc_origin(&self.server_name_text)
            .parse()
            .context("origin URI")
            .map_err(stage("http2"))?;
        Ok((
            GrpcConn {
                service: H2Service(send),
                origin,
            },
            conn,
        ))
    }
}
