//! Interim certificate resolver (single certificate, no reload); replaced by the full
//! SNI + hot-reload resolver.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

#[derive(Debug, Clone)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug)]
pub struct CertResolver {
    key: Arc<CertifiedKey>,
}

impl CertResolver {
    pub fn new(sources: Vec<CertSource>) -> Result<Self, TlsError> {
        let src = sources
            .first()
            .ok_or_else(|| TlsError("no certificate".into()))?;
        let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
            std::fs::File::open(&src.cert).map_err(|e| TlsError(e.to_string()))?,
        ))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(e.to_string()))?;
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
            std::fs::File::open(&src.key).map_err(|e| TlsError(e.to_string()))?,
        ))
        .map_err(|e| TlsError(e.to_string()))?
        .ok_or_else(|| TlsError("no key".into()))?;
        let provider = rustls::crypto::ring::default_provider();
        let key =
            CertifiedKey::from_der(certs, key, &provider).map_err(|e| TlsError(e.to_string()))?;
        Ok(Self { key: Arc::new(key) })
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.clone())
    }
}

pub fn self_signed(hosts: &[String]) -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| TlsError(e.to_string()))?;
    let params =
        rcgen::CertificateParams::new(hosts.to_vec()).map_err(|e| TlsError(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}
