//! `[tls]`: certificates (files, ACME or generated for development).

use serde::Deserialize;
use std::path::PathBuf;

use super::FieldError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Certificates, chosen by SNI from their names; the first is the default.
    pub certificates: Vec<CertificateConfig>,
    /// Generate a self-signed certificate for `hosts` at start instead (development and
    /// tests only: no client trusts it). Exactly one of `certificates`, `acme` and this.
    pub self_signed: bool,
    /// Public host names of the edge (e.g. `kas.gitlab.com`), used for a generated certificate.
    pub hosts: Vec<String>,
    /// Where a generated certificate is written, so clients can be told to trust it.
    pub self_signed_dir: Option<PathBuf>,
    /// Obtain and renew the certificate from an ACME CA (HTTP-01 on `listen.http`).
    pub acme: Option<super::AcmeConfig>,
    /// `host:port` of the replica that runs ACME (its `listen.http`): HTTP-01 challenges
    /// this replica cannot answer are relayed there, since the CA's validation request may
    /// reach any replica through the load balancer.
    pub acme_challenge_relay: Option<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            certificates: Vec::new(),
            self_signed: false,
            hosts: vec!["localhost".into(), "127.0.0.1".into()],
            self_signed_dir: None,
            acme: None,
            acme_challenge_relay: None,
        }
    }
}

impl TlsConfig {
    /// `has_http_listener`: whether `listen.http` is set (ACME challenges arrive there).
    pub fn validate(&self, has_http_listener: bool) -> Result<(), FieldError> {
        let sources = [
            !self.certificates.is_empty(),
            self.acme.is_some(),
            self.self_signed,
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => {
                return Err(FieldError::new(
                    "tls.certificates",
                    "no certificate configured: list [[tls.certificates]] (PEM files), \
                     configure [tls.acme], or set tls.self_signed = true (development only)",
                ))
            }
            1 => {}
            _ if self.self_signed => {
                return Err(FieldError::new(
                    "tls.self_signed",
                    "use only one of tls.certificates, tls.acme and tls.self_signed",
                ))
            }
            _ => {
                return Err(FieldError::new(
                    "tls.acme",
                    "use either tls.certificates or tls.acme, not both",
                ))
            }
        }
        if self.acme.is_some() && !has_http_listener {
            return Err(FieldError::new(
                "listen.http",
                "required with tls.acme: HTTP-01 challenges are answered there",
            ));
        }
        if let Some(relay) = &self.acme_challenge_relay {
            let port = relay
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                return Err(FieldError::new(
                    "tls.acme_challenge_relay",
                    format!("{relay:?} is not host:port (e.g. \"kas-edge-acme:80\")"),
                ));
            }
            if !has_http_listener {
                return Err(FieldError::new(
                    "listen.http",
                    "required with tls.acme_challenge_relay: challenges arrive there",
                ));
            }
        }
        if self.self_signed && self.hosts.is_empty() {
            return Err(FieldError::new(
                "tls.hosts",
                "needed to generate a certificate with tls.self_signed",
            ));
        }
        if self.self_signed_dir.is_some() && !self.self_signed {
            return Err(FieldError::new(
                "tls.self_signed_dir",
                "only used with tls.self_signed = true",
            ));
        }
        Ok(())
    }
}
