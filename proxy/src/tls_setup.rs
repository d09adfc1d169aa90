//! Turns `[tls]` configuration into what pingora's listener needs: a certificate resolver
//! (hot-reloaded from files, or a generated self-signed certificate in development) and
//! handshake callbacks that feed metrics.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::{TlsAccept, TlsAcceptCallbacks};
use pingora::protocols::tls::TlsRef;
use rustls::server::ResolvesServerCert;

use crate::config::TlsConfig;
use crate::metrics::EdgeMetrics;
use crate::tls::{self, CertResolver, CertSource};

pub struct TlsSetup {
    resolver: Arc<CertResolver>,
    metrics: EdgeMetrics,
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

impl TlsSetup {
    pub fn new(
        config: &TlsConfig,
        metrics: EdgeMetrics,
        _rt: &tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let sources: Vec<CertSource> = if config.certificates.is_empty() {
            let dir = config
                .self_signed_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("kas-edge-self-signed"));
            std::fs::create_dir_all(&dir)?;
            let (cert, key) = tls::self_signed(&config.hosts)?;
            let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
            std::fs::write(&cert_path, cert)?;
            std::fs::write(&key_path, key)?;
            tracing::warn!(
                hosts = ?config.hosts,
                cert = %cert_path.display(),
                "no tls.certificates configured: serving a generated self-signed certificate (development only)"
            );
            vec![CertSource {
                cert: cert_path,
                key: key_path,
            }]
        } else {
            config
                .certificates
                .iter()
                .map(|c| CertSource {
                    cert: c.cert.clone(),
                    key: c.key.clone(),
                })
                .collect()
        };
        let resolver = Arc::new(CertResolver::new(sources)?);
        Ok(Self { resolver, metrics })
    }

    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        self.resolver.clone()
    }

    pub fn handshake_callbacks(&self) -> TlsAcceptCallbacks {
        Box::new(HandshakeMetrics(self.metrics.clone()))
    }
}
