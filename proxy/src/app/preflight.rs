//! Everything the configuration names, loaded and checked before anything listens.
//!
//! `kas-edge check` is this and nothing more; `kas-edge run` starts with it. One path, so
//! a configuration that passes `check` cannot fail `run` on a file it names, and both
//! report a bad file with the same words.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;

use crate::config::{DiscoveryConfig, EdgeConfig};
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

/// Checks every file `config` names: policy files, certificate/key pairs (readable,
/// parseable, matching), the ACME cache and CA, and what discovery needs from the pod.
pub fn check(config: EdgeConfig) -> anyhow::Result<Preflight> {
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
    if let Some(cfg) = &config.tls.acme {
        acme::preflight(cfg).context("tls.acme")?;
    }
    if let DiscoveryConfig::Kubernetes {
        namespace: None, ..
    } = &config.discovery
    {
        crate::upstream::discovery::own_namespace()?;
    }
    Ok(Preflight {
        config,
        policy_files,
        certificates,
    })
}
