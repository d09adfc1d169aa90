//! Everything the configuration names, loaded and checked before anything listens.
//!
//! `kas-edge check` is this and nothing more; `kas-edge run` starts with it. One path, so
//! a configuration that passes `check` cannot fail `run` on a file it names, and both
//! report a bad file with the same words.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;

use crate::config::EdgeConfig;
use crate::listener::acme;
use crate::listener::tls::certs::{self, CertSource};
use crate::policy::PolicyFiles;

/// What the files hold, for `check` to report and `run` to use.
pub struct Preflight {
    pub config: EdgeConfig,
    pub policy_files: PolicyFiles,
    /// Names and expiry of each configured certificate, in configuration order.
    pub certificates: Vec<CertificateSummary>,
}

pub struct CertificateSummary {
    pub file: std::path::PathBuf,
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// Reads the configuration file and checks it with everything it names.
pub fn from_file(path: &Path) -> anyhow::Result<Preflight> {
    let config = EdgeConfig::from_file(path)?;
    check(config)
}

/// Checks every file `config` names and everything `run` would otherwise only find out
/// later: policy files, certificate/key pairs (readable, parseable, matching), the
/// self-signed certificate's host names, the ACME settings, cache and CA, and what
/// discovery and the blocklist ConfigMap need from the pod (namespace, credentials). Field-level checks
/// (discovery names, `proxy_protocol.trusted`, limits) already ran when the
/// configuration was parsed (`EdgeConfig::validate`).
pub fn check(config: EdgeConfig) -> anyhow::Result<Preflight> {
    // `run` may get a configuration built in code (`kas-edge dev`, tests): validate it
    // here too, so nothing reaches the listeners unchecked.
    config.validate(Path::new("(configuration)"))?;
    let policy_files = PolicyFiles::load(&config.policies)?;
    let mut certificates = Vec::new();
    for pair in &config.tls.certificates {
        let loaded = certs::load_certified_key(&CertSource {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        })?;
        certificates.push(CertificateSummary {
            file: pair.cert.clone(),
            names: loaded.names,
            not_after: loaded.not_after,
        });
    }
    if config.tls.self_signed {
        crate::listener::tls::preflight_self_signed(&config.tls)?;
    }
    if let Some(cfg) = &config.tls.acme {
        acme::preflight(cfg).context("tls.acme")?;
    }
    crate::upstream::discovery::preflight(&config.discovery)?;
    crate::policy::configmap::preflight(&config.policies)?;
    Ok(Preflight {
        config,
        policy_files,
        certificates,
    })
}
