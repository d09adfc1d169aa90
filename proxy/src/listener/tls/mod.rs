//! Turns `[tls]` configuration into what pingora's listener needs: a certificate resolver
//! (hot-reloaded when the files change, or a generated self-signed certificate when the
//! configuration asks for one with `tls.self_signed`) and handshake callbacks that feed
//! metrics.

pub mod certs;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::listeners::{TlsAccept, TlsAcceptCallbacks};
use pingora::protocols::tls::TlsRef;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;
use crate::listener::acme::Acme;
use crate::support::filewatch::FileWatcher;
use crate::telemetry::metrics::EdgeMetrics;
use certs::{CertResolver, CertSource};

/// Burst of file events (an editor, a Secret update) coalesced into one reload.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(200);
/// Safety net for volumes where inotify misses changes.
const RELOAD_POLL: Duration = Duration::from_secs(30);

/// Where certificates come from.
enum Source {
    /// Files (or a generated self-signed pair), watched and hot-reloaded.
    Files {
        resolver: Arc<CertResolver>,
        _watcher: Option<FileWatcher>,
    },
    /// An ACME CA; the certificate is renewed and swapped in by the ACME task.
    Acme(Arc<Acme>),
}

pub struct TlsSetup {
    source: Source,
    metrics: EdgeMetrics,
}

/// Counts handshakes at ClientHello, then delegates certificate choice.
#[derive(Debug)]
struct CountingResolver {
    inner: Arc<dyn ResolvesServerCert>,
    started: prometheus::IntCounter,
}

impl ResolvesServerCert for CountingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.started.inc();
        self.inner.resolve(hello)
    }
}

struct HandshakeMetrics(EdgeMetrics);

#[async_trait]
impl TlsAccept for HandshakeMetrics {
    async fn handshake_complete_callback(
        &self,
        _tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        self.0
            .tls_handshakes
            .with_label_values(&["completed"])
            .inc();
        None
    }
}

/// Where a generated certificate goes: `tls.self_signed_dir`, or a directory under the
/// system's temporary directory.
pub fn self_signed_dir(config: &TlsConfig) -> std::path::PathBuf {
    config
        .self_signed_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("kas-edge-self-signed"))
}

/// What generating the self-signed certificate at start needs, checked without writing
/// it: a certificate can be made for `tls.hosts`, and its directory can be written.
pub fn preflight_self_signed(config: &TlsConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    certs::self_signed(&config.hosts).context("tls.hosts")?;
    let dir = self_signed_dir(config);
    std::fs::create_dir_all(&dir)
        .and_then(|()| tempfile_in(&dir))
        .with_context(|| format!("tls.self_signed_dir {}: cannot write there", dir.display()))
}

/// Creates and removes a file in `dir`: proof that the certificate can be written there.
fn tempfile_in(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".kas-edge-check-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// The certificate sources from configuration, or a generated self-signed one when
/// `tls.self_signed` asks for it. Never a silent fallback: without either, an error.
pub fn sources(config: &TlsConfig) -> anyhow::Result<Vec<CertSource>> {
    if !config.self_signed {
        if config.certificates.is_empty() {
            anyhow::bail!(
                "tls.certificates: no certificate configured (and tls.self_signed is not set)"
            );
        }
        return Ok(config
            .certificates
            .iter()
            .map(|c| CertSource {
                cert: c.cert.clone(),
                key: c.key.clone(),
            })
            .collect());
    }
    let source = certs::write_self_signed(&self_signed_dir(config), &config.hosts)?;
    tracing::warn!(
        hosts = ?config.hosts,
        cert = %source.cert.display(),
        "tls.self_signed: serving a generated self-signed certificate (development only)"
    );
    Ok(vec![source])
}

impl TlsSetup {
    pub fn new(
        config: &TlsConfig,
        metrics: EdgeMetrics,
        rt: &tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        if let Some(acme) = &config.acme {
            let publish_to = match &acme.publish_secret {
                None => None,
                Some(_) => {
                    let client = rt.block_on(crate::support::kubernetes::in_cluster_client(
                        "tls.acme.publish_secret",
                    ))?;
                    Some(match &acme.publish_namespace {
                        Some(ns) => kube::Api::namespaced(client, ns),
                        None => kube::Api::default_namespaced(client),
                    })
                }
            };
            let acme = Arc::new(Acme::start(acme.clone(), rt, publish_to)?);
            let mut status = acme.status();
            let m = metrics.clone();
            rt.spawn(async move {
                loop {
                    if let Some(cert) = &status.borrow_and_update().certificate {
                        m.certificate_expires_at(cert.not_after);
                    }
                    if status.changed().await.is_err() {
                        return;
                    }
                }
            });
            tracing::info!(domains = ?config.acme.as_ref().map(|a| &a.domains), "TLS certificates from ACME (HTTP-01)");
            return Ok(Self {
                source: Source::Acme(acme),
                metrics,
            });
        }
        let resolver = Arc::new(CertResolver::new(sources(config)?)?);
        metrics.certificate_expires_at(resolver.not_after());
        let watcher = if config.certificates.is_empty() {
            None
        } else {
            let m = metrics.clone();
            let watcher = resolver.watch(RELOAD_DEBOUNCE, Some(RELOAD_POLL), move |result| match result {
                Ok(summary) if summary.changed => {
                    m.tls_reloads.with_label_values(&["ok"]).inc();
                    m.certificate_expires_at(summary.earliest_not_after);
                    tracing::info!(certificates = summary.certificates, names = ?summary.names, "TLS certificates reloaded");
                }
                Ok(_) => {}
                Err(e) => {
                    m.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the previous certificates");
                }
            })?;
            Some(watcher)
        };
        tracing::info!(names = ?resolver.current_names(), "TLS certificates loaded");
        Ok(Self {
            source: Source::Files {
                resolver,
                _watcher: watcher,
            },
            metrics,
        })
    }

    /// The ACME client, when certificates come from ACME (the :80 listener answers its
    /// HTTP-01 challenges, readiness waits for its first certificate).
    pub fn acme(&self) -> Option<Arc<Acme>> {
        match &self.source {
            Source::Acme(acme) => Some(acme.clone()),
            Source::Files { .. } => None,
        }
    }

    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        let inner: Arc<dyn ResolvesServerCert> = match &self.source {
            Source::Files { resolver, .. } => resolver.clone(),
            Source::Acme(acme) => acme.resolver(),
        };
        Arc::new(CountingResolver {
            inner,
            started: self.metrics.tls_handshakes.with_label_values(&["started"]),
        })
    }

    pub fn handshake_callbacks(&self) -> TlsAcceptCallbacks {
        Box::new(HandshakeMetrics(self.metrics.clone()))
    }
}
