//! The `[tls.acme]` section: what to ask the ACME CA for and where the results are kept.
//! The ACME client itself lives in the listener layer (`listener/acme`); the values are checked here so
//! `kas-edge check` validates them without the listener layer.

use std::path::PathBuf;

use rustls::pki_types::ServerName;
use serde::Deserialize;

pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// The `[acme]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// Names on the certificate; the first one also names the cache file.
    pub domains: Vec<String>,
    /// `mailto:` addresses the CA warns before expiry or revocation.
    #[serde(default)]
    pub contact: Vec<String>,
    /// ACME directory URL.
    #[serde(default = "default_directory")]
    pub directory: String,
    /// Where the account key and the certificate survive restarts. Holds private keys.
    pub cache_dir: PathBuf,
    /// PEM root(s) that the ACME server's own HTTPS certificate must chain to, instead of
    /// the public web PKI: for a private CA such as pebble or step-ca.
    #[serde(default)]
    pub directory_ca: Option<PathBuf>,
    /// Publish every certificate to this Kubernetes TLS Secret (in the pod's namespace
    /// unless `publish_namespace` says otherwise), for the replicas that do not run ACME
    /// to mount. See the ACME client's `publish` module.
    #[serde(default)]
    pub publish_secret: Option<String>,
    #[serde(default)]
    pub publish_namespace: Option<String>,
}

fn default_directory() -> String {
    LETS_ENCRYPT_PRODUCTION.to_string()
}

impl AcmeConfig {
    /// The cached certificate (PKCS#8 key first, then the chain), for replicas that serve
    /// the leader's certificate from a shared volume. The name depends on the domains and
    /// the directory, so changing either never serves a certificate for the old names.
    pub fn certificate_path(&self) -> PathBuf {
        let mut key = Vec::new();
        for d in &self.domains {
            key.extend_from_slice(d.as_bytes());
            key.push(0);
        }
        key.extend_from_slice(self.directory.as_bytes());
        let first = self.domains.first().map(String::as_str).unwrap_or("none");
        self.cache_dir.join(format!(
            "cert-{}-{:016x}.pem",
            file_label(first),
            fnv1a(&key)
        ))
    }

    pub(crate) fn account_path(&self) -> PathBuf {
        let mut key = Vec::new();
        for c in &self.contact {
            key.extend_from_slice(c.as_bytes());
            key.push(0);
        }
        key.extend_from_slice(self.directory.as_bytes());
        self.cache_dir
            .join(format!("account-{:016x}.pk8", fnv1a(&key)))
    }

    /// Everything that would otherwise only fail later, inside the background task, where
    /// nobody sees it until the certificate is missing.
    pub fn validate(&self) -> Result<(), AcmeConfigError> {
        let invalid = |what: &str, value: &str, why: &str| AcmeConfigError {
            problem: format!("{what} {value:?}: {why}"),
        };
        if self.domains.is_empty() {
            return Err(AcmeConfigError {
                problem: "acme.domains is empty".into(),
            });
        }
        for d in &self.domains {
            if d.starts_with("*.") {
                return Err(invalid(
                    "domain",
                    d,
                    "wildcards need DNS-01; HTTP-01 cannot validate them",
                ));
            }
            if *d != d.to_ascii_lowercase() {
                return Err(invalid("domain", d, "must be lower case"));
            }
            match ServerName::try_from(d.as_str()) {
                Ok(ServerName::DnsName(_)) => {}
                Ok(_) => return Err(invalid("domain", d, "IP addresses are not supported")),
                Err(e) => return Err(invalid("domain", d, &e.to_string())),
            }
        }
        for c in &self.contact {
            if !c.starts_with("mailto:") || c.len() == "mailto:".len() {
                return Err(invalid("contact", c, "must be a mailto: URL"));
            }
        }
        for (what, name) in [
            ("publish_secret", &self.publish_secret),
            ("publish_namespace", &self.publish_namespace),
        ] {
            if let Some(name) = name {
                let dns1123 = !name.is_empty()
                    && name.len() <= 253
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    })
                    && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && name.ends_with(|c: char| c.is_ascii_alphanumeric());
                if !dns1123 {
                    return Err(invalid(what, name, "not a valid Kubernetes object name"));
                }
            }
        }
        if self.publish_secret.is_none() && self.publish_namespace.is_some() {
            return Err(AcmeConfigError {
                problem: "acme.publish_namespace is set without acme.publish_secret".into(),
            });
        }
        match self.directory.parse::<http::Uri>() {
            Ok(uri)
                if uri.scheme_str() == Some("https")
                    && uri.host().is_some_and(|h| !h.is_empty()) => {}
            Ok(_) => {
                return Err(invalid(
                    "directory",
                    &self.directory,
                    "ACME requires an https:// URL with a host",
                ))
            }
            Err(e) => return Err(invalid("directory", &self.directory, &e.to_string())),
        }
        Ok(())
    }
}

/// A short, file-name-safe prefix so operators can tell cache files apart.
fn file_label(domain: &str) -> String {
    domain
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A hash that never changes between Rust releases (unlike `DefaultHasher`): a renamed
/// cache file after an upgrade would mean a new order on every replica.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A value in `[tls.acme]` that can never work.
#[derive(Debug, thiserror::Error)]
#[error("invalid acme configuration: {problem}")]
pub struct AcmeConfigError {
    pub problem: String,
}

#[cfg(test)]
impl AcmeConfig {
    /// A valid section for `domain`, pointing at a directory nobody serves.
    pub(crate) fn for_tests(domain: &str, cache_dir: &std::path::Path) -> Self {
        AcmeConfig {
            domains: vec![domain.into()],
            contact: vec!["mailto:ops@edge.test".into()],
            directory: "https://127.0.0.1:1/dir".into(),
            cache_dir: cache_dir.to_path_buf(),
            directory_ca: None,
            publish_secret: None,
            publish_namespace: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(cache_dir: &Path) -> AcmeConfig {
        AcmeConfig::for_tests("kas.edge.test", cache_dir)
    }

    #[test]
    fn config_defaults_to_lets_encrypt_and_refuses_unknown_fields() {
        let cfg: AcmeConfig =
            serde_json::from_str(r#"{"domains": ["kas.gitlab.com"], "cache_dir": "/var/acme"}"#)
                .unwrap();
        assert_eq!(cfg.directory, LETS_ENCRYPT_PRODUCTION);
        assert!(cfg.contact.is_empty() && cfg.directory_ca.is_none());
        cfg.validate().unwrap();
        let err = serde_json::from_str::<AcmeConfig>(
            r#"{"domains": ["a.test"], "cache_dir": "/x", "challenge": "tls-alpn-01"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn refuses_what_http01_cannot_issue() {
        let dir = Path::new("/nonexistent");
        let with = |f: &dyn Fn(&mut AcmeConfig)| {
            let mut cfg = config(dir);
            f(&mut cfg);
            cfg.validate().unwrap_err().to_string()
        };
        assert!(with(&|c| c.domains.clear()).contains("empty"));
        assert!(with(&|c| c.domains = vec!["*.edge.test".into()]).contains("wildcard"));
        assert!(with(&|c| c.domains = vec!["Kas.Edge.Test".into()]).contains("lower case"));
        assert!(with(&|c| c.domains = vec!["127.0.0.1".into()]).contains("IP"));
        assert!(with(&|c| c.domains = vec!["bad name".into()]).contains("bad name"));
        assert!(with(&|c| c.contact = vec!["ops@edge.test".into()]).contains("mailto"));
        assert!(with(&|c| c.directory = "http://ca.test/dir".into()).contains("https"));
        assert!(with(&|c| c.directory = "https://".into()).contains("directory"));
        assert!(with(&|c| c.directory = "https:///dir".into()).contains("directory"));
        assert!(with(&|c| c.directory = "https://ca test/dir".into()).contains("directory"));
        assert!(with(&|c| c.publish_secret = Some("Kas_Edge".into())).contains("publish_secret"));
        assert!(with(&|c| c.publish_namespace = Some("kas".into())).contains("without"));
        let mut ok = config(dir);
        ok.publish_secret = Some("kas-edge-tls".into());
        ok.publish_namespace = Some("gitlab-agent".into());
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn cache_file_names_follow_domains_and_directory() {
        let a = config(Path::new("/c"));
        let mut b = a.clone();
        b.domains.push("other.edge.test".into());
        let mut c = a.clone();
        c.directory = LETS_ENCRYPT_STAGING.into();
        let paths = [&a, &b, &c].map(AcmeConfig::certificate_path);
        assert!(paths[0] != paths[1] && paths[0] != paths[2] && paths[1] != paths[2]);
        // Pinned: a different name after an upgrade would re-order on every replica.
        assert_eq!(
            paths[0],
            Path::new(&format!(
                "/c/cert-kas.edge.test-{:016x}.pem",
                fnv1a(b"kas.edge.test\0https://127.0.0.1:1/dir")
            ))
        );
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
