//! TLS on the proxy's listener (real kas's `listen.certificate_file` / `key_file`): kubectl
//! sends bearer credentials only over TLS, so a proxy reached directly (not behind the
//! edge, which terminates TLS itself) needs it.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;

/// An acceptor for `certificate_file` (PEM chain) and `key_file` (PEM key), offering HTTP/2
/// and HTTP/1.1 (upgrades such as `kubectl exec` use the latter).
pub fn acceptor(certificate_file: &Path, key_file: &Path) -> anyhow::Result<TlsAcceptor> {
    let cert_pem = std::fs::read(certificate_file).with_context(|| {
        format!(
            "kubernetes_api.certificate_file {}",
            certificate_file.display()
        )
    })?;
    let key_pem = std::fs::read(key_file)
        .with_context(|| format!("kubernetes_api.key_file {}", key_file.display()))?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "{}: not a PEM certificate chain",
                certificate_file.display()
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!("{}: no certificate in the file", certificate_file.display());
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{}: not a PEM private key", key_file.display()))?
        .with_context(|| format!("{}: no private key in the file", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("kubernetes_api.certificate_file and key_file do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
