//! Certificates from an ACME CA (Let's Encrypt) for the edge's TLS listener.
//!
//! The edge can run without an operator-managed certificate: this module drives
//! [`rustls_acme`]'s order/renew state machine on the edge's runtime, caches the account
//! key and the issued certificate on disk, and hands pingora a certificate resolver.
//!
//! # Why HTTP-01 and not TLS-ALPN-01
//!
//! TLS-ALPN-01 needs the TLS listener to accept handshakes that offer only the ALPN
//! protocol `acme-tls/1` and answer them with a special self-signed certificate. Pingora's
//! rustls `TlsSettings` (0.9) builds one `ServerConfig` with a fixed ALPN list
//! (`h2`, `http/1.1`) and no hook to add `acme-tls/1` for some handshakes only, so the
//! validation handshake would fail with `no_application_protocol`. HTTP-01 needs nothing
//! from the TLS listener: the plain `:80` listener answers
//! `GET /.well-known/acme-challenge/<token>` with [`Acme::http01_key_authorization`], and
//! the resolver given to pingora is an ordinary one that never sees ACME traffic.
//! HTTP-01 cannot issue wildcard certificates, so [`AcmeConfig`] (in `config/acme.rs`) refuses `*.` names.
//!
//! # Restarts, renewal and rotation
//!
//! The account key and the certificate (with its private key) are written to
//! [`AcmeConfig::cache_dir`] atomically and readable by the owner only. A restart serves
//! the cached certificate at once and orders nothing while it is fresh: Let's Encrypt
//! rate-limits duplicate certificates, and a crash loop must not burn through that limit.
//!
//! rustls-acme schedules renewal when two thirds of the certificate's lifetime have
//! passed (a 90-day certificate is renewed 30 days before it expires; a cached one past
//! that point is renewed right after start-up) and keeps serving the old certificate
//! until the new one is issued. A failed order is retried after 1 s, 2 s, 4 s, … capped
//! at 2^16 s (about 18 h); [`AcmeStatus::renew_at`] and the logged errors are what an
//! alert should watch. The new certificate replaces the old one in the resolver
//! atomically: handshakes in flight and established connections keep the certificate they
//! negotiated, nothing is closed.
//!
//! # Several replicas
//!
//! Only one replica may run ACME: each client places its own orders and only the one that
//! placed an order knows its challenge token. The CA validates through the public load
//! balancer, so its request may reach any replica. Two settings make that work:
//!
//! - the others set `tls.acme_challenge_relay` to the ACME replica's `:80` and relay the
//!   challenges they cannot answer (see `admin.rs`);
//! - the ACME replica sets [`AcmeConfig::publish_secret`] and publishes every certificate
//!   to a Kubernetes TLS Secret, which the others mount as `[tls] certificates` and
//!   hot-reload (see [`crate::listener::acme::publish`]).
//!
//! `deploy/overlays/production-acme` wires this up; `deploy/README.md` explains it.

pub mod publish;

pub use crate::config::AcmeConfig;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::server::ResolvesServerCert;
use rustls_acme::{AccountCache, AcmeState, CertCache, EventError, EventOk, UseChallenge};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("invalid acme configuration: {problem}")]
    Config { problem: String },
    #[error("acme.directory_ca {}: {problem}", path.display())]
    DirectoryCa { path: PathBuf, problem: String },
    #[error("acme.cache_dir {}: {source}", path.display())]
    CacheDir { path: PathBuf, source: io::Error },
}

/// The served certificate, for logs, metrics and expiry alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Lower-cased DNS names of the leaf.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// True when it was loaded from the cache rather than issued by this process.
    pub from_cache: bool,
}

impl CertificateInfo {
    /// When rustls-acme starts renewing: two thirds into the lifetime. An expiry alert
    /// should fire well after this, when renewal has had time to fail repeatedly.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after - lifetime / 3
    }
}

/// What the ACME task has done so far; see [`Acme::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcmeStatus {
    /// True once the resolver has a certificate to serve.
    pub serving: bool,
    /// The served certificate, if it could be inspected.
    pub certificate: Option<CertificateInfo>,
    /// Certificates issued by the CA to this process (renewals included).
    pub issued: u64,
    /// Failed orders and cache errors since start.
    pub failures: u64,
    /// The most recent failure; cleared when a certificate is issued.
    pub last_error: Option<String>,
}

impl AcmeStatus {
    pub fn renew_at(&self) -> Option<SystemTime> {
        self.certificate.as_ref().map(CertificateInfo::renew_at)
    }
}

/// A running ACME client. Dropping it stops ordering and renewal; a resolver handed out
/// earlier keeps serving the last certificate.
pub struct Acme {
    resolver: Arc<rustls_acme::ResolvesServerCertAcme>,
    status: watch::Receiver<AcmeStatus>,
    certificate_path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Acme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acme")
            .field("status", &*self.status.borrow())
            .field("certificate_path", &self.certificate_path)
            .finish_non_exhaustive()
    }
}

/// Checks everything about `cfg` that can be checked without the CA: the values, the cache
/// directory (created private if missing) and the directory CA file. `kas-edge check` and
/// [`Acme::start`] both go through here.
pub fn preflight(cfg: &AcmeConfig) -> Result<(), AcmeError> {
    cfg.validate()
        .map_err(|e| AcmeError::Config { problem: e.problem })?;
    create_private_dir(&cfg.cache_dir).map_err(|source| AcmeError::CacheDir {
        path: cfg.cache_dir.clone(),
        source,
    })?;
    if let Some(ca) = &cfg.directory_ca {
        directory_client_config(ca, Arc::new(rustls::crypto::ring::default_provider()))?;
    }
    Ok(())
}

impl Acme {
    /// Validates `cfg`, prepares the cache directory and spawns the ACME task on `rt`.
    /// A cached certificate is usually served within milliseconds; otherwise the first
    /// order starts at once, and until it succeeds the resolver has nothing to serve.
    ///
    /// With `publish_to` (the Secrets API of the namespace named by `publish_namespace`,
    /// required when `publish_secret` is set), every certificate is also published there.
    pub fn start(
        cfg: AcmeConfig,
        rt: &tokio::runtime::Handle,
        publish_to: Option<kube::Api<k8s_openapi::api::core::v1::Secret>>,
    ) -> Result<Acme, AcmeError> {
        preflight(&cfg)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let base = match &cfg.directory_ca {
            None => rustls_acme::AcmeConfig::new_with_provider(&cfg.domains, provider),
            Some(ca) => rustls_acme::AcmeConfig::new_with_client_config(
                &cfg.domains,
                directory_client_config(ca, provider)?,
            ),
        };
        let seen = Arc::new(Mutex::new(None));
        let published = match (&cfg.publish_secret, publish_to) {
            (Some(name), Some(api)) => {
                let (cert_pem, key_pem) = crate::listener::tls::certs::self_signed(&cfg.domains)
                    .map_err(|e| AcmeError::Config {
                        problem: format!("placeholder certificate: {e}"),
                    })?;
                let placeholder = crate::listener::acme::publish::TlsPair { cert_pem, key_pem };
                let (tx, rx) = watch::channel(None);
                rt.spawn(crate::listener::acme::publish::run(
                    api,
                    name.clone(),
                    placeholder,
                    rx,
                ));
                Some(tx)
            }
            (Some(_), None) => {
                return Err(AcmeError::Config {
                    problem: "acme.publish_secret needs the Kubernetes API".into(),
                })
            }
            (None, _) => None,
        };
        let cache = FileCache {
            cert: cfg.certificate_path(),
            account: cfg.account_path(),
            last_cert: seen.clone(),
            published,
        };
        let state = base
            .contact(&cfg.contact)
            .directory(&cfg.directory)
            .challenge_type(UseChallenge::Http01)
            .cache(cache)
            .state();
        let resolver = state.resolver();
        let (tx, status) = watch::channel(AcmeStatus::default());
        tracing::info!(
            domains = ?cfg.domains,
            directory = %cfg.directory,
            cache = %cfg.certificate_path().display(),
            "ACME client starting (HTTP-01)"
        );
        let task = rt.spawn(drive(state, tx, seen));
        Ok(Acme {
            resolver,
            status,
            certificate_path: cfg.certificate_path(),
            task,
        })
    }

    /// For pingora's `TlsSettings::set_cert_resolver`. It serves the same certificate
    /// whatever the SNI, and nothing until the first certificate is deployed (handshakes
    /// then fail, which is why the edge should not report ready before
    /// [`Acme::has_certificate`]).
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.resolver.clone()
    }

    /// The body for `GET /.well-known/acme-challenge/<token>` on `:80`, or `None` (answer
    /// 404) when no challenge with that token is pending in this process.
    pub fn http01_key_authorization(&self, token: &str) -> Option<String> {
        self.resolver.get_http_01_key_auth(token)
    }

    pub fn has_certificate(&self) -> bool {
        self.status.borrow().serving
    }

    /// Changes whenever a certificate is deployed or an attempt fails: for metrics and
    /// for waiting on the first certificate.
    pub fn status(&self) -> watch::Receiver<AcmeStatus> {
        self.status.clone()
    }

    pub fn certificate_path(&self) -> &Path {
        &self.certificate_path
    }
}

impl Drop for Acme {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn directory_client_config(
    ca: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, AcmeError> {
    let err = |problem: String| AcmeError::DirectoryCa {
        path: ca.to_path_buf(),
        problem,
    };
    let pem = std::fs::read(ca).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("unparsable PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("unusable certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE PEM block found".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Polls the rustls-acme state machine forever and turns its events into logs and
/// [`AcmeStatus`] updates. rustls-acme does its own waiting (renewal timer, back-off).
async fn drive(
    mut state: AcmeState<io::Error>,
    tx: watch::Sender<AcmeStatus>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
) {
    let take_seen = || {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .and_then(|pem| match inspect_pem(&pem) {
                Ok(info) => Some(info),
                Err(problem) => {
                    tracing::warn!(%problem, "cannot inspect the ACME certificate");
                    None
                }
            })
    };
    // Set between `DeployedNewCert` and the cache store that follows it, which is when
    // the PEM of a new certificate becomes visible to us.
    let mut awaiting_new = false;
    let mut consecutive_failures: u32 = 0;
    while let Some(event) = state.next().await {
        match event {
            Ok(EventOk::DeployedCachedCert) => {
                let info = take_seen().map(|mut i| {
                    i.from_cache = true;
                    i
                });
                log_deployed("serving cached ACME certificate", info.as_ref());
                tx.send_modify(|s| {
                    s.serving = true;
                    s.certificate = info;
                });
            }
            Ok(EventOk::DeployedNewCert) => {
                let renewal = tx.borrow().serving;
                tracing::info!(renewal, "ACME certificate issued and deployed");
                consecutive_failures = 0;
                awaiting_new = true;
                tx.send_modify(|s| {
                    s.serving = true;
                    s.issued += 1;
                    s.last_error = None;
                });
            }
            Ok(EventOk::CertCacheStore) => {
                tracing::debug!("ACME certificate cached");
                if std::mem::take(&mut awaiting_new) {
                    let info = take_seen();
                    log_deployed("serving new ACME certificate", info.as_ref());
                    tx.send_modify(|s| s.certificate = info);
                }
            }
            Ok(EventOk::AccountCacheStore) => tracing::info!("ACME account key cached"),
            Err(e) => {
                let retry = match &e {
                    EventError::Order(_) => {
                        // Mirrors rustls-acme's back-off so the log says when to expect
                        // the next attempt.
                        let secs = 1u64 << consecutive_failures.min(16);
                        consecutive_failures = consecutive_failures.saturating_add(1);
                        Some(Duration::from_secs(secs))
                    }
                    _ => None,
                };
                if let EventError::CertCacheStore(_) = &e {
                    if std::mem::take(&mut awaiting_new) {
                        let info = take_seen();
                        log_deployed(
                            "serving new ACME certificate (not cached: a restart will order again)",
                            info.as_ref(),
                        );
                        tx.send_modify(|s| s.certificate = info);
                    }
                }
                match retry {
                    Some(retry_in) => tracing::error!(
                        error = %e,
                        retry_in = ?retry_in,
                        attempt = consecutive_failures,
                        "ACME order failed"
                    ),
                    None => tracing::error!(error = %e, "ACME cache error"),
                }
                tx.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(e.to_string());
                });
            }
        }
    }
}

fn log_deployed(what: &str, info: Option<&CertificateInfo>) {
    match info {
        Some(i) => {
            let expired = i.not_after < SystemTime::now();
            tracing::info!(
                names = ?i.names,
                not_after = ?i.not_after,
                renew_at = ?i.renew_at(),
                expired,
                "{what}"
            );
        }
        None => tracing::info!("{what}"),
    }
}

/// Reads names and validity from the cache file format (key PEM, then the chain).
fn inspect_pem(pem: &[u8]) -> Result<CertificateInfo, String> {
    let leaf = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or("no certificate in PEM")?
        .map_err(|e| format!("unparsable PEM: {e}"))?;
    let (_, x509) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|e| format!("invalid X.509: {e}"))?;
    let names = x509
        .subject_alternative_name()
        .map_err(|e| format!("unparsable SubjectAltName: {e}"))?
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let validity = x509.validity();
    Ok(CertificateInfo {
        names,
        not_before: crate::listener::tls::certs::unix_to_system(validity.not_before.timestamp()),
        not_after: crate::listener::tls::certs::unix_to_system(validity.not_after.timestamp()),
        from_cache: false,
    })
}

/// rustls-acme's own `DirCache` writes in place with default permissions: a crash mid-
/// write leaves a truncated file, and the certificate's private key and the account key
/// end up world-readable. This one writes atomically with mode 0600, and remembers the
/// last certificate PEM it loaded or stored so [`drive`] can report what is served.
struct FileCache {
    cert: PathBuf,
    account: PathBuf,
    last_cert: Arc<Mutex<Option<Vec<u8>>>>,
    /// Where certificates go for the other replicas, when `publish_secret` is set.
    published: Option<watch::Sender<Option<Vec<u8>>>>,
}

impl FileCache {
    fn remember(&self, pem: &[u8]) {
        *crate::support::sync::lock(&self.last_cert) = Some(pem.to_vec());
        if let Some(published) = &self.published {
            published.send_replace(Some(pem.to_vec()));
        }
    }
}

#[async_trait::async_trait]
impl CertCache for FileCache {
    type EC = io::Error;

    async fn load_cert(&self, _: &[String], _: &str) -> Result<Option<Vec<u8>>, io::Error> {
        let pem = read_if_exists(&self.cert).await?;
        if let Some(pem) = &pem {
            self.remember(pem);
        }
        Ok(pem)
    }

    async fn store_cert(&self, _: &[String], _: &str, cert: &[u8]) -> Result<(), io::Error> {
        self.remember(cert);
        write_private(self.cert.clone(), cert.to_vec()).await
    }
}

#[async_trait::async_trait]
impl AccountCache for FileCache {
    type EA = io::Error;

    async fn load_account(&self, _: &[String], _: &str) -> Result<Option<Vec<u8>>, io::Error> {
        read_if_exists(&self.account).await
    }

    async fn store_account(&self, _: &[String], _: &str, key: &[u8]) -> Result<(), io::Error> {
        write_private(self.account.clone(), key.to_vec()).await
    }
}

async fn read_if_exists(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

async fn write_private(path: PathBuf, contents: Vec<u8>) -> io::Result<()> {
    tokio::task::spawn_blocking(move || write_private_sync(&path, &contents))
        .await
        .map_err(io::Error::other)?
}

fn write_private_sync(path: &Path, contents: &[u8]) -> io::Result<()> {
    crate::support::fs::write_atomically(path, contents, 0o600)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    // Fail at start-up, not after the first order, when the volume is read-only.
    write_private_sync(&dir.join(".write-test"), b"")?;
    std::fs::remove_file(dir.join(".write-test"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kas_testkit::pebble::*;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::atomic::Ordering;

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    const WAIT: Duration = Duration::from_secs(60);
    const HOST: &str = "kas.edge.test";

    fn config(cache_dir: &Path) -> AcmeConfig {
        AcmeConfig::for_tests(HOST, cache_dir)
    }

    fn ring() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    #[test]
    fn cache_writes_are_private_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("nested/cache");
        create_private_dir(&cache).unwrap();
        let file = cache.join("cert.pem");
        write_private_sync(&file, b"old").unwrap();
        write_private_sync(&file, b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&file), 0o600);
            assert_eq!(mode(&cache), 0o700);
        }
        // No temporary or probe files are left behind.
        let names: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["cert.pem"]);
    }

    #[tokio::test]
    async fn start_rejects_unusable_directory_ca_and_cache_dir() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Handle::current();
        let mut cfg = config(&dir.path().join("cache"));
        cfg.directory_ca = Some(dir.path().join("missing.pem"));
        let err = Acme::start(cfg.clone(), &rt, None).unwrap_err().to_string();
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        cfg.directory_ca = Some(dir.path().join("empty.pem"));
        let err = Acme::start(cfg.clone(), &rt, None).unwrap_err().to_string();
        assert!(err.contains("no CERTIFICATE"), "{err}");

        let mut cfg = config(&dir.path().join("empty.pem").join("sub"));
        cfg.directory_ca = None;
        let err = Acme::start(cfg, &rt, None).unwrap_err();
        assert!(matches!(err, AcmeError::CacheDir { .. }), "{err}");
    }

    #[tokio::test]
    async fn no_key_authorization_without_a_pending_challenge() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens on port 1: the order fails and is retried later.
        let acme =
            Acme::start(config(dir.path()), &tokio::runtime::Handle::current(), None).unwrap();
        assert_eq!(acme.http01_key_authorization("some-token"), None);
        assert_eq!(acme.http01_key_authorization(""), None);
        assert!(!acme.has_certificate());
        let mut status = acme.status();
        let failed = tokio::time::timeout(WAIT, status.wait_for(|s| s.failures > 0))
            .await
            .expect("the unreachable directory is reported")
            .unwrap()
            .clone();
        assert!(!failed.serving);
        assert!(failed.last_error.unwrap().contains("order"));
    }

    /// The test's stand-in for the `:80` listener: answers challenges from `acme` and
    /// counts the key authorizations it handed out.
    fn serve_http01(
        listener: TcpListener,
        acme: Arc<Acme>,
        answered: Arc<AtomicUsize>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acme, answered) = (acme.clone(), answered.clone());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = req
                        .uri()
                        .path()
                        .strip_prefix("/.well-known/acme-challenge/")
                        .and_then(|token| acme.http01_key_authorization(token));
                    let response = match body {
                        Some(key_auth) => {
                            answered.fetch_add(1, Ordering::SeqCst);
                            Response::new(Full::new(Bytes::from(key_auth)))
                        }
                        None => {
                            let mut r = Response::new(Full::new(Bytes::from_static(b"no\n")));
                            *r.status_mut() = StatusCode::NOT_FOUND;
                            r
                        }
                    };
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        })
    }

    /// A TLS server configured like the edge's (h2 and http/1.1, no acme-tls/1) that
    /// echoes until the client closes.
    async fn serve_tls(resolver: Arc<dyn ResolvesServerCert>) -> SocketAddr {
        let mut config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    /// Handshakes as a verifying client (against pebble's root, for [`HOST`]).
    async fn connect(addr: SocketAddr, root: &CertificateDer<'static>) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let connector = kas_testkit::clients::tls_connector_trusting(roots, &[b"h2"]);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = connector
            .connect(rustls::pki_types::ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .expect("the served chain verifies against pebble's root");
        echo(&mut tls, b"hello").await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        tls
    }

    async fn echo(tls: &mut Client, msg: &[u8]) {
        tls.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }

    fn chain(tls: &Client) -> Vec<CertificateDer<'static>> {
        let certs = tls.get_ref().1.peer_certificates().unwrap();
        certs.iter().map(|c| c.clone().into_owned()).collect()
    }

    async fn served_chain(
        addr: SocketAddr,
        root: &CertificateDer<'static>,
    ) -> Vec<CertificateDer<'static>> {
        chain(&connect(addr, root).await)
    }

    async fn wait_status(
        acme: &Acme,
        what: &str,
        f: impl FnMut(&AcmeStatus) -> bool,
    ) -> AcmeStatus {
        let mut status = acme.status();
        let result = tokio::time::timeout(WAIT, status.wait_for(f)).await;
        match result {
            Ok(Ok(s)) => s.clone(),
            _ => panic!(
                "{what} within {WAIT:?}; status: {:?}",
                *acme.status().borrow()
            ),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn issues_over_http01_then_restarts_from_cache() {
        let dir = tempfile::tempdir().unwrap();
        let http01 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut pebble = start_pebble(
            dir.path(),
            "127.0.0.1",
            http01.local_addr().unwrap().port(),
            None,
        )
        .await;
        let root = pebble_root(&pebble).await;

        let cache = dir.path().join("acme-cache");
        let cfg = AcmeConfig {
            directory: pebble.directory.clone(),
            directory_ca: Some(pebble.https_ca.clone()),
            publish_secret: Some("kas-edge-tls".into()),
            ..config(&cache)
        };
        let rt = tokio::runtime::Handle::current();
        let (apiserver, seen) = crate::listener::acme::publish::tests::fake_api(false, 0).await;
        let publish_to = Some(crate::listener::acme::publish::tests::api(apiserver));
        let acme = Arc::new(Acme::start(cfg.clone(), &rt, publish_to).unwrap());
        let answered = Arc::new(AtomicUsize::new(0));
        let responder = serve_http01(http01, acme.clone(), answered.clone());

        let status = wait_status(&acme, "a certificate is issued", |s| {
            s.serving && s.certificate.is_some()
        })
        .await;
        assert!(acme.has_certificate());
        assert!(
            answered.load(Ordering::SeqCst) > 0,
            "pebble never fetched the challenge"
        );
        assert_eq!(status.issued, 1);
        let info = status.certificate.clone().unwrap();
        assert_eq!(info.names, [HOST]);
        assert!(!info.from_cache);
        let now = SystemTime::now();
        assert!(info.not_before <= now + Duration::from_secs(60) && now < info.renew_at());
        assert!(info.renew_at() < info.not_after);

        let addr = serve_tls(acme.resolver()).await;
        let chain = served_chain(addr, &root).await;
        assert!(chain.len() >= 2, "leaf and intermediate are served");
        let cached = std::fs::read(acme.certificate_path()).unwrap();
        assert_eq!(inspect_pem(&cached).unwrap().names, [HOST]);
        // The other replicas get it through the Secret: the issued chain, not the placeholder.
        let issued = crate::listener::acme::publish::split_acme_pem(&cached).unwrap();
        crate::listener::acme::publish::tests::wait_for(
            &seen,
            "the issued certificate published",
            |s| {
                s.iter().any(|(m, _, body)| {
                    m == "PATCH"
                        && crate::listener::acme::publish::tests::decoded(body, "tls.crt")
                            == issued.cert_pem
                })
            },
        )
        .await;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(acme.certificate_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A restart while the CA is unreachable: the cached certificate is served and no
        // order is attempted.
        responder.abort();
        drop(acme);
        pebble.procs.stop();
        let again = Acme::start(
            AcmeConfig {
                publish_secret: None,
                ..cfg
            },
            &rt,
            None,
        )
        .unwrap();
        let status = wait_status(&again, "the cached certificate is served", |s| s.serving).await;
        let info2 = status.certificate.clone().unwrap();
        assert!(info2.from_cache);
        assert_eq!(
            (info2.not_after, &info2.names),
            (info.not_after, &info.names)
        );
        let addr = serve_tls(again.resolver()).await;
        assert_eq!(served_chain(addr, &root).await, chain);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = again.status().borrow().clone();
        assert_eq!((status.issued, status.failures), (0, 0), "{status:?}");
    }

    /// pebble issues 24-second certificates here, so rustls-acme's renewal at two thirds
    /// of the lifetime happens during the test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn renews_before_expiry_without_dropping_connections() {
        let dir = tempfile::tempdir().unwrap();
        let http01 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pebble = start_pebble(
            dir.path(),
            "127.0.0.1",
            http01.local_addr().unwrap().port(),
            Some(24),
        )
        .await;
        let root = pebble_root(&pebble).await;
        let cfg = AcmeConfig {
            directory: pebble.directory.clone(),
            directory_ca: Some(pebble.https_ca.clone()),
            ..config(&dir.path().join("acme-cache"))
        };
        let acme = Arc::new(Acme::start(cfg, &tokio::runtime::Handle::current(), None).unwrap());
        let _responder = serve_http01(http01, acme.clone(), Arc::new(AtomicUsize::new(0)));

        let first = wait_status(&acme, "a certificate is issued", |s| {
            s.certificate.is_some()
        })
        .await
        .certificate
        .unwrap();
        let lifetime = first.not_after.duration_since(first.not_before).unwrap();
        assert!(lifetime <= Duration::from_secs(24), "{lifetime:?}");
        let addr = serve_tls(acme.resolver()).await;
        let mut early = connect(addr, &root).await;
        let old_chain = chain(&early);

        let renewed = wait_status(&acme, "the certificate is renewed", |s| {
            s.issued == 2
                && s.certificate
                    .as_ref()
                    .is_some_and(|c| c.not_after > first.not_after)
        })
        .await;
        let renewed_at = SystemTime::now();
        assert!(
            renewed_at >= first.renew_at(),
            "renewed before the threshold"
        );
        assert!(renewed_at < first.not_after, "renewed only after expiry");
        assert!(!renewed.certificate.unwrap().from_cache);

        let new_chain = served_chain(addr, &root).await;
        assert_ne!(new_chain[0], old_chain[0]);
        // The connection made before the renewal keeps working on its old certificate.
        echo(&mut early, b"still here").await;
        assert_eq!(chain(&early), old_chain);
    }
}
