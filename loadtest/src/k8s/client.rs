//! The callers' HTTP client for the Kubernetes API proxy (or, for comparison, the API
//! server straight): TCP, TLS when the URL says `https` (ALPN `h2` and `http/1.1`, as
//! kubectl offers), HTTP/2 when the server agrees and HTTP/1.1 keep-alive otherwise, pooled
//! by hyper's client. `--k8s-insecure` skips the certificate check, for loopback only.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use crate::transport::{load_roots, BoxIo};

/// A connection to the proxy, telling hyper whether TLS agreed on HTTP/2.
pub struct CallerIo {
    io: TokioIo<BoxIo>,
    h2: bool,
}

impl Read for CallerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CallerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connection for CallerIo {
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

/// Opens the connections hyper's pool asks for.
#[derive(Clone)]
pub struct CallerConnector {
    tls: Option<tokio_rustls::TlsConnector>,
}

type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<CallerIo>> + Send>>;

impl tower::Service<Uri> for CallerConnector {
    type Response = CallerIo;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("{uri}: no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            if !https {
                return Ok(CallerIo {
                    io: TokioIo::new(Box::new(tcp)),
                    h2: false,
                });
            }
            let tls = tls.ok_or_else(|| {
                std::io::Error::other("an https URL needs --k8s-ca-file (or --k8s-insecure)")
            })?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::other(format!("{host}: {e}")))?;
            let stream = tls.connect(name, tcp).await?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(CallerIo {
                io: TokioIo::new(Box::new(stream)),
                h2,
            })
        })
    }
}

/// Accepts any certificate: `--k8s-insecure`, loopback only.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How callers trust the proxy's certificate.
pub enum Trust<'a> {
    /// Plain `http://` URLs only.
    None,
    CaFile(&'a std::path::Path),
    /// Any certificate (loopback URLs only; checked by [`check_urls`]).
    Insecure,
}

fn tls_connector(trust: Trust<'_>) -> anyhow::Result<Option<tokio_rustls::TlsConnector>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut config = match trust {
        Trust::None => return Ok(None),
        Trust::CaFile(path) => builder
            .with_root_certificates(load_roots(path)?)
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

/// Refuses URLs that are not `http(s)://`, and, unless `allow_non_loopback`, URLs whose
/// host is not a loopback address (`localhost` included); `insecure` needs loopback always.
pub fn check_urls(urls: &[String], allow_non_loopback: bool, insecure: bool) -> anyhow::Result<()> {
    for url in urls {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--k8s-proxy-url {url} is not a URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            bail!("--k8s-proxy-url {url} must start with http:// or https://");
        }
        let host = uri.host().unwrap_or_default();
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if insecure && !loopback {
            bail!("--k8s-insecure is for loopback URLs only, not {url}");
        }
        if !loopback && !allow_non_loopback {
            bail!("--k8s-proxy-url {url} is not on loopback (add --allow-non-loopback)");
        }
    }
    Ok(())
}

/// The callers' shared client.
#[derive(Clone)]
pub struct ProxyClient {
    client: Client<CallerConnector, Full<Bytes>>,
}

/// One answer read to its end.
pub struct Answer {
    pub status: StatusCode,
    /// The `Content-Type`, empty when there was none.
    pub content_type: String,
    pub body: Bytes,
}

/// Whether an answer can be the Kubernetes API's: it names its type (JSON, or text for
/// logs), and that type is not gRPC. A path nothing routes to the proxy can still come
/// back 200 — from kas's agent port answering `grpc-status: 12` — and must not count as a
/// success.
pub fn is_kubernetes_answer(content_type: &str) -> bool {
    !content_type.is_empty() && !content_type.starts_with("application/grpc")
}

/// The `Content-Type` of `response`, empty when there is none.
pub fn content_type<B>(response: &Response<B>) -> String {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl ProxyClient {
    pub fn new(trust: Trust<'_>, max_idle: usize) -> anyhow::Result<Self> {
        let connector = CallerConnector {
            tls: tls_connector(trust)?,
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(max_idle)
            .http2_keep_alive_interval(None)
            .build(connector);
        Ok(Self { client })
    }

    /// The request; `token` as `Authorization: Bearer`, a JSON `body` with its type.
    pub fn request(
        method: Method,
        url: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, "kas-loadtest");
        if let Some(token) = token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        builder
            .body(Full::new(body.unwrap_or_default()))
            .with_context(|| format!("request to {url}"))
    }

    /// Sends and returns the head; the body streams (a watch).
    pub async fn send(&self, request: Request<Full<Bytes>>) -> anyhow::Result<Response<Incoming>> {
        Ok(self.client.request(request).await?)
    }

    /// Sends and reads the whole answer.
    pub async fn fetch(&self, request: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
        use http_body_util::BodyExt;
        let response = self.send(request).await?;
        let status = response.status();
        let content_type = content_type(&response);
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the body")?
            .to_bytes();
        Ok(Answer {
            status,
            content_type,
            body,
        })
    }
}

/// `base` (ending with `/` or not) joined with `path` (starting with `/`).
pub fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// The `message` of a Kubernetes `Status` body, or the body's start.
pub fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_joined_and_checked() {
        assert_eq!(
            join("http://127.0.7.1:8154/k8s-proxy/", "/api/v1/pods"),
            "http://127.0.7.1:8154/k8s-proxy/api/v1/pods"
        );
        assert_eq!(join("http://h:1", "/version"), "http://h:1/version");
        assert!(check_urls(&["https://localhost:8443/k8s-proxy/".into()], false, true).is_ok());
        assert!(check_urls(&["http://127.0.7.1:8154/".into()], false, false).is_ok());
        assert!(check_urls(&["https://10.0.0.1/".into()], false, false).is_err());
        assert!(check_urls(&["https://10.0.0.1/".into()], true, true).is_err());
        assert!(check_urls(&["https://10.0.0.1/".into()], true, false).is_ok());
        assert!(check_urls(&["ftp://127.0.0.1/".into()], false, false).is_err());
    }

    #[test]
    fn grpc_is_not_a_kubernetes_answer() {
        assert!(is_kubernetes_answer("application/json"));
        assert!(is_kubernetes_answer("text/plain"));
        assert!(!is_kubernetes_answer("application/grpc"));
        assert!(!is_kubernetes_answer("application/grpc+proto"));
        assert!(!is_kubernetes_answer(""));
    }

    #[test]
    fn status_messages() {
        assert_eq!(
            status_message(br#"{"kind":"Status","message":"no agent"}"#),
            "no agent"
        );
        assert_eq!(status_message(b"plain"), "plain");
    }
}
