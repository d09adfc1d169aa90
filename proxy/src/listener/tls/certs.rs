//! Certificates for the edge's TLS listener: loading, SNI selection and hot reload.
//!
//! The edge terminates TLS for `kas.gitlab.com` (and whatever else is configured), and
//! certificates are rotated by cert-manager or by hand while agents hold long-lived
//! connections. So certificates are swapped atomically ([`ArcSwap`]) under running
//! handshakes, established connections keep the session they negotiated, and a bad
//! rotation (half-written files, a key that does not match) never replaces a working set.
//!
//! Everything uses rustls' ring provider explicitly rather than the process default: the
//! workspace must not depend on which provider another crate happens to install.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::support::filewatch::{self, FileWatchError, FileWatcher};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file is missing, unreadable or not what it must be.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    #[error("private key {} does not belong to certificate {}: {problem}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        problem: String,
    },
    #[error("no TLS certificate configured")]
    NoCertificates,
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(String),
}

fn file_err(path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// One certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSource {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate ready for handshakes, with what logs, metrics and SNI selection need
/// pulled out of the leaf once at load time instead of per handshake.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-cased DNS names of the leaf (SubjectAltName, else the subject CN); may hold
    /// `*.` wildcards.
    pub names: Vec<String>,
    pub not_after: SystemTime,
}

/// Reads and checks one certificate/key pair. Everything a handshake would trip over
/// later (key mismatch, unsupported key, expired leaf) is rejected here, where the error
/// can still name the file.
pub fn load_certified_key(src: &CertSource) -> Result<LoadedCert, TlsError> {
    let cert_pem = read(&src.cert)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<CertificateDer<'static>>, _>>()
        .map_err(|e| file_err(&src.cert, format!("unparsable PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(file_err(&src.cert, "no CERTIFICATE PEM block found"));
    };
    let (names, not_after) = inspect_leaf(&src.cert, leaf)?;

    let key_pem = read(&src.key)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| file_err(&src.key, format!("unparsable PEM: {e}")))?
        .ok_or_else(|| {
            file_err(
                &src.key,
                "no private key PEM block found (PKCS#8, PKCS#1 RSA or SEC1 EC)",
            )
        })?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(&src.key, format!("unusable private key: {e}")))?;

    let certified = CertifiedKey::new(chain, signing_key);
    // Strict: unlike `CertifiedKey::from_der`, an unverifiable pair is refused too; ring
    // keys always expose their public key, so that only happens with a broken key.
    certified.keys_match().map_err(|e| TlsError::KeyMismatch {
        cert: src.cert.clone(),
        key: src.key.clone(),
        problem: e.to_string(),
    })?;

    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_err(path, format!("cannot read: {e}")))
}

fn inspect_leaf(
    path: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<(Vec<String>, SystemTime), TlsError> {
    let (_, x509) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| file_err(path, format!("leaf certificate is not valid X.509: {e}")))?;

    let validity = x509.validity();
    let not_after = unix_to_system(validity.not_after.timestamp());
    let now = SystemTime::now();
    if not_after < now {
        return Err(file_err(
            path,
            format!("leaf certificate expired at {}", validity.not_after),
        ));
    }
    if unix_to_system(validity.not_before.timestamp()) > now {
        // Not fatal: a freshly issued certificate on a host with a slightly slow clock
        // would otherwise be refused, and clients judge validity by their own clocks.
        tracing::warn!(
            cert = %path.display(),
            not_before = %validity.not_before,
            "leaf certificate is not valid yet"
        );
    }

    let san = x509
        .subject_alternative_name()
        .map_err(|e| file_err(path, format!("unparsable SubjectAltName: {e}")))?;
    let mut names: Vec<String> = match san {
        Some(ext) => ext
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(normalize(d)),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    if names.is_empty() {
        // Legacy certificates name the host only in the CN; clients that still accept
        // them are the ones we would otherwise misroute.
        names.extend(
            x509.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(normalize),
        );
    }
    names.dedup();
    Ok((names, not_after))
}

/// An X.509 time (seconds since the epoch, possibly before it) as a `SystemTime`.
pub(crate) fn unix_to_system(secs: i64) -> SystemTime {
    let magnitude = Duration::from_secs(secs.unsigned_abs());
    if secs >= 0 {
        UNIX_EPOCH + magnitude
    } else {
        UNIX_EPOCH - magnitude
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// An immutable snapshot of all certificates, with the name indexes handshakes use.
#[derive(Debug)]
struct CertSet {
    certs: Vec<LoadedCert>,
    exact: HashMap<String, usize>,
    /// `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    /// `certs` must not be empty: the first one is the default.
    fn new(certs: Vec<LoadedCert>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, cert) in certs.iter().enumerate() {
            for name in &cert.names {
                // The first configured certificate claiming a name keeps it, so order in
                // the configuration is the tie-breaker operators can see.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Self {
            certs,
            exact,
            wildcard,
        }
    }

    fn pick(&self, sni: Option<&str>) -> Option<&LoadedCert> {
        let index = sni.map(normalize).and_then(|name| {
            self.exact.get(&name).copied().or_else(|| {
                // A wildcard covers exactly one label.
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).copied()
            })
        });
        // Unknown names get the default rather than a failed handshake: clients that
        // connect by IP or through an alias still get a certificate to judge themselves.
        self.certs.get(index.unwrap_or(0))
    }

    fn earliest_not_after(&self) -> SystemTime {
        self.certs
            .iter()
            .map(|c| c.not_after)
            .min()
            .unwrap_or(UNIX_EPOCH)
    }

    fn names(&self) -> Vec<String> {
        self.certs.iter().flat_map(|c| c.names.clone()).collect()
    }
}

/// What a successful reload installed, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub certificates: usize,
    pub names: Vec<String>,
    pub earliest_not_after: SystemTime,
    /// False when every chain is byte-identical to what was served before, so a watcher
    /// firing on an unrelated touch need not be logged as a rotation.
    pub changed: bool,
}

/// Picks the certificate for each handshake by SNI and swaps the whole set on reload.
pub struct CertResolver {
    sources: Vec<CertSource>,
    current: ArcSwap<CertSet>,
    /// Serialises reloads so an older read of the files can never be stored after a
    /// newer one; handshakes never touch it.
    reloading: Mutex<()>,
}

impl CertResolver {
    /// Loads every source; the first is the default for clients without (matching) SNI.
    pub fn new(sources: Vec<CertSource>) -> Result<Self, TlsError> {
        let set = load_set(&sources)?;
        Ok(Self {
            sources,
            current: ArcSwap::from_pointee(set),
            reloading: Mutex::new(()),
        })
    }

    /// Re-reads all sources. If any fails, nothing changes and the error is returned:
    /// serving a partly rotated set could hand out a certificate whose key was replaced.
    pub fn reload(&self) -> Result<ReloadSummary, TlsError> {
        let _guard = crate::support::sync::lock(&self.reloading);
        let set = load_set(&self.sources)?;
        let old = self.current.load();
        let changed = old.certs.len() != set.certs.len()
            || old
                .certs
                .iter()
                .zip(&set.certs)
                .any(|(a, b)| a.key.cert != b.key.cert);
        let summary = ReloadSummary {
            certificates: set.certs.len(),
            names: set.names(),
            earliest_not_after: set.earliest_not_after(),
            changed,
        };
        self.current.store(Arc::new(set));
        Ok(summary)
    }

    /// Every certificate and key file, to hand to [`filewatch`].
    pub fn watch_paths(&self) -> Vec<PathBuf> {
        self.sources
            .iter()
            .flat_map(|s| [s.cert.clone(), s.key.clone()])
            .collect()
    }

    /// All names currently served, in configuration order.
    pub fn current_names(&self) -> Vec<String> {
        self.current.load().names()
    }

    /// The earliest expiry among the served certificates: what an expiry alert watches.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().earliest_not_after()
    }

    /// Reloads whenever a certificate or key file changes and hands each outcome to
    /// `on_reload` (which logs and counts; a failure leaves the old set in place).
    ///
    /// Cert and key are often written one after the other; a reload in between fails on
    /// the mismatch and the write of the second file triggers the one that succeeds.
    /// The watcher holds the resolver weakly, so it does not keep it alive.
    pub fn watch(
        self: &Arc<Self>,
        debounce: Duration,
        poll_every: Option<Duration>,
        on_reload: impl Fn(Result<ReloadSummary, TlsError>) + Send + 'static,
    ) -> Result<FileWatcher, FileWatchError> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let callback = move || {
            if let Some(resolver) = weak.upgrade() {
                on_reload(resolver.reload());
            }
        };
        let paths = self.watch_paths();
        match poll_every {
            Some(every) => filewatch::watch_files_with_poll(paths, debounce, every, callback),
            None => filewatch::watch_files(paths, debounce, callback),
        }
    }

    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.current.load().pick(sni).map(|c| c.key.clone())
    }
}

fn load_set(sources: &[CertSource]) -> Result<CertSet, TlsError> {
    if sources.is_empty() {
        return Err(TlsError::NoCertificates);
    }
    let certs = sources
        .iter()
        .map(load_certified_key)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(CertSet::new(certs))
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver")
            .field("sources", &self.sources)
            .field("names", &self.current_names())
            .finish_non_exhaustive()
    }
}

/// A development certificate (ECDSA P-256) for `hosts`; literal IPs become IP SANs.
/// The first host is also the subject CN so tools that show only the CN say something
/// useful.
pub fn self_signed(hosts: &[String]) -> Result<(String, String), TlsError> {
    let Some(first) = hosts.first() else {
        return Err(TlsError::SelfSigned("no host names given".into()));
    };
    let err = |e: rcgen::Error| TlsError::SelfSigned(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, first.as_str());
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Generates a development certificate into `dir` as `tls.crt` and `tls.key` (0600).
///
/// Each file is written to a temporary name and renamed into place, so a watcher or a
/// concurrent reload never reads half a file, and the key is never briefly readable by
/// others.
pub fn write_self_signed(dir: &Path, hosts: &[String]) -> Result<CertSource, TlsError> {
    let (cert_pem, key_pem) = self_signed(hosts)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| file_err(dir, format!("cannot create directory: {e}")))?;
    let src = CertSource {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    write_atomically(&src.cert, cert_pem.as_bytes(), 0o644)?;
    write_atomically(&src.key, key_pem.as_bytes(), 0o600)?;
    Ok(src)
}

fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::support::fs::write_atomically(path, content, mode)
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// A rustls server configuration (TLS 1.2 and 1.3, ring) around `resolver`, for tests
/// and listeners that are not pingora's.
pub fn server_config(resolver: Arc<CertResolver>, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // Fails only if the provider has no cipher suite for these versions; ring's
        // default provider has several for each, so this is not reachable from input.
        .expect("ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

    const WAIT: Duration = Duration::from_secs(5);

    /// Generated once with `openssl genrsa -traditional` / `openssl ecparam -genkey
    /// -noout` and `openssl req -x509 -days 36500`: ring cannot generate RSA keys and
    /// rcgen writes only PKCS#8, so the other two PEM key formats need fixtures.
    const RSA_PKCS1_KEY: &str = "\
-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAigAj2ziQYasQdFbkCx3++xV47Z069u5bdV7UEn3nxnd/EgNP
bWN1a4Fl/RLZkP16jXPHdCbZCLl67o+NbOxd1Wzhuj8ggKTkzXg1phLuZzg+UxAi
3NxiieEZHXVut+IdKv1c0YZGc1jgAfO2Ntrf2/04uhdIhrFhDCivI73WlOMK+fCF
Pu0Nuoz9fobUDxYNYMyAL5bHkqszEBnuZVxEl2XDfvCT5KiIOMblwZK5V/DFYyEz
RbddTv6Qbe4izt0z3dMPmPatalJfs5MUNl6dH0SVWSId4vsG0KrNeBiZZKXmfevA
r+/ggmO3HEuM2dLUZ2UxFxKw5AlLFeIgFJ5s3wIDAQABAoIBAAsMlzjEG723ylT7
G6SPB2CuJ76kS9mdww5Jarx75TtdGC9mh9nP0ITfjIo84KIJxMhSzVT0KVHYAmSo
cyyvji6UJ0ykvxYqkOepdZr+KAvbea4BfD3nzWH4Km0f5Z7TSJeUR3XyBNQ5rCt4
pA3A7F/H5t6LfH/NIvwr8Iq+XLh5IsVVK6nmx263PgfUljVZxURsPemorkPul+l+
32cif/4QLGPXyifv3y68aQ3hxQlqQexufPsKHm9O84X3PuVy4Xpdg+0l6dooxbIO
FTyTOTEeOPKH2dhnFA9ZG/yBfcxEvFtUi9bOt1A7hKYN/5hwymcOLTkcxY5K/+w3
nLn58WkCgYEAwheHfr705oRm0B34p6WG7A3oQRtK0hfXNvJFAGONbcnec43hAALj
sTw8dba51LUEWR/WJtW26tzT10n+RqkMrMVhRNlk/HPXKJRELPIJPg0q/Y1Ndcmy
Y6EVWL0t3up/oEYP6dkXhWWr5pDvM5555+KxUNx4j26ocViKeQ0lLVkCgYEAtgSA
Jo3mnNKUuzAKbVxS/9O0FQecxzvmVNsRR4Bme3wyitJmMvNa8liJ68a9Sxv/nSNh
ie5SMN/6Mrd8J1fnwP+fO4uupDYS73Fv8n1vjBWd56wtgjkJvPpvz2ynZbYx5OUJ
rRRvn7ROtDcQc/wWACwiwBGuBw/EVhKME6srjPcCgYBRZIKaoUOcI6vl3Ju42g5h
kVdzbhmLTxoeXayYBCd8Aeq6dKYFVjDb01HbX1xAmgSPx20L7hV+Gkrv/oSWZy/8
h+1JbQ0PXRi+WKbaXkmH7we3OnlgSsv3Qcbs5rCEybvpn1fvDe3yL/fNgbv93phq
qMMJENux8orKtYGkT+HmSQKBgQCVwZQypHPGOZg3fupFWj3L0MIMv2ulnMoArRFF
dAZduSzYfQ2rBACi/mfTvnuGLa4c+rxIwPWM0utHCSI0OKYsa+T2GBIDd54StZF2
wO+jITH/J/F1gDpb6u1Ni0cbb1ET08InTnYcvzw2GEwIMbNkRuv8fU9i7f0LGE15
7U5ytwKBgAflSpKFbvpITLtN3cPy4g0an7OiqdWzyOHgZCGmTd7ugDbGw63/Y601
y/RYu/muOnKsj75Wofg9VLHUxPoTh9jtfr89K73NyV5bPsNCsNWTGjDkvmouDDaa
s1uVpNLDXycKVs0Se4qbraUq2HjlRlFqNCbu+m8W72JH2YYtemQ1
-----END RSA PRIVATE KEY-----
";
    const RSA_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIIDGzCCAgOgAwIBAgIURdpXrad4QNwtsCbL77QDC4Gv2yswDQYJKoZIhvcNAQEL
BQAwEzERMA8GA1UEAwwIcnNhLnRlc3QwIBcNMjYxMTI4MDk0MzUyWhgPMjEyNjEx
MDQwOTQzNTJaMBMxETAPBgNVBAMMCHJzYS50ZXN0MIIBIjANBgkqhkiG9w0BAQEF
AAOCAQ8AMIIBCgKCAQEAigAj2ziQYasQdFbkCx3++xV47Z069u5bdV7UEn3nxnd/
EgNPbWN1a4Fl/RLZkP16jXPHdCbZCLl67o+NbOxd1Wzhuj8ggKTkzXg1phLuZzg+
UxAi3NxiieEZHXVut+IdKv1c0YZGc1jgAfO2Ntrf2/04uhdIhrFhDCivI73WlOMK
+fCFPu0Nuoz9fobUDxYNYMyAL5bHkqszEBnuZVxEl2XDfvCT5KiIOMblwZK5V/DF
YyEzRbddTv6Qbe4izt0z3dMPmPatalJfs5MUNl6dH0SVWSId4vsG0KrNeBiZZKXm
fevAr+/ggmO3HEuM2dLUZ2UxFxKw5AlLFeIgFJ5s3wIDAQABo2UwYzAdBgNVHQ4E
FgQUZVrZAzwR/zJLykAIy7sI2KKkH88wHwYDVR0jBBgwFoAUZVrZAzwR/zJLykAI
y7sI2KKkH88wEwYDVR0RBAwwCoIIcnNhLnRlc3QwDAYDVR0TAQH/BAIwADANBgkq
hkiG9w0BAQsFAAOCAQEAFnZQr760rYc7yUkUPRDKsv9DoGkAJRk7835Rga/tp9m0
gOxQv/wMMblxIe4Pjf24/38KDcdFVvWDmBeKdqGNhIQRBDnt7lee5JnXcTJUJKZm
yFV+da3sa+ObExp6DGxaoQS21eUUDTq48T9PQ+VbCSM0z2Aa+5bz0MeSZBBLhWrX
AOdneYyE8XAc7ThJltTOmCFqkB/YQPzTqle0kQZm8jSFldryggn+BXYFc/fVls+Z
XqgDtwOwJabQ0X0//qVPijFszvVbsmvPisKqSqEZKXY36oZ+OuzhGCe14O9COU/2
BC0uloOxh8RljjAjOPyGdINiqdqiFF6fNiiKEfez5w==
-----END CERTIFICATE-----
";
    const EC_SEC1_KEY: &str = "\
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFOiDGKqsGORqD9qrxfdHwVaRsUS3nkkPcoDB2DhZ30OoAoGCCqGSM49
AwEHoUQDQgAE3QbJbJvUaPdElPlVsltB8nhlqdtJ85kLyGWTunQDU1ttxnZgORDQ
Evnuduh0G8+LBptTL4u2N2agNleafFV7/A==
-----END EC PRIVATE KEY-----
";
    const EC_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIIBjTCCATKgAwIBAgIUU+0Hv+45N6ppfxd1rZRAG+b2ASEwCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHZWMudGVzdDAgFw0yNjExMjgwOTQzNTJaGA8yMTI2MTEwNDA5
NDM1MlowEjEQMA4GA1UEAwwHZWMudGVzdDBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABN0GyWyb1Gj3RJT5VbJbQfJ4ZanbSfOZC8hlk7p0A1NbbcZ2YDkQ0BL57nbo
dBvPiwabUy+LtjdmoDZXmnxVe/yjZDBiMB0GA1UdDgQWBBSd/JcUwBUL878xWxgY
7M0RGklF4zAfBgNVHSMEGDAWgBSd/JcUwBUL878xWxgY7M0RGklF4zASBgNVHREE
CzAJggdlYy50ZXN0MAwGA1UdEwEB/wQCMAAwCgYIKoZIzj0EAwIDSQAwRgIhAJ9j
VOk+uE4tB3wR2IDA59caOqgvNT0bA2+Oc4SzIJAzAiEA5iHRaHEpTx86i3B+9FEc
jFT+wyV8eDv9xBnIZR1JQcY=
-----END CERTIFICATE-----
";

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// Writes a fresh self-signed pair as `<stem>.crt`/`<stem>.key` (via rename, as an
    /// operator's tooling would) and returns it with the leaf DER.
    fn write_pair(dir: &Path, stem: &str, names: &[&str]) -> (CertSource, CertificateDer<'static>) {
        let (cert, key) = self_signed(&hosts(names)).unwrap();
        let src = CertSource {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        write_atomically(&src.cert, cert.as_bytes(), 0o644).unwrap();
        write_atomically(&src.key, key.as_bytes(), 0o600).unwrap();
        (src, der_of(&cert))
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    /// Accepts TLS connections and echoes whatever each client sends.
    async fn serve(config: Arc<rustls::ServerConfig>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        if tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    struct Client<'a> {
        roots: &'a [CertificateDer<'static>],
        /// What the client verifies; sent as SNI when `sni` is true.
        name: &'a str,
        sni: bool,
        alpn: &'a [&'a [u8]],
    }

    impl Client<'_> {
        async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
            let mut roots = rustls::RootCertStore::empty();
            for r in self.roots {
                roots.add(r.clone()).unwrap();
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.enable_sni = self.sni;
            config.alpn_protocols = self.alpn.iter().map(|p| p.to_vec()).collect();
            let name = rustls::pki_types::ServerName::try_from(self.name.to_string()).unwrap();
            let tcp = TcpStream::connect(addr).await?;
            TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        }

        async fn leaf(&self, addr: SocketAddr) -> std::io::Result<CertificateDer<'static>> {
            let tls = self.connect(addr).await?;
            Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
        }
    }

    async fn echo(tls: &mut TlsStream<TcpStream>, msg: &[u8]) {
        tls.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, tls.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg);
    }

    fn client<'a>(roots: &'a [CertificateDer<'static>], name: &'a str) -> Client<'a> {
        Client {
            roots,
            name,
            sni: true,
            alpn: &[],
        }
    }

    #[tokio::test]
    async fn sni_selects_certificate_and_no_sni_gets_default() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_der) = write_pair(dir.path(), "a", &["a.test"]);
        let (b, b_der) = write_pair(dir.path(), "b", &["b.test", "kas.b.test"]);
        let resolver = Arc::new(CertResolver::new(vec![a, b]).unwrap());
        let addr = serve(server_config(resolver, &[])).await;
        let roots = [a_der.clone(), b_der.clone()];

        assert_eq!(client(&roots, "b.test").leaf(addr).await.unwrap(), b_der);
        assert_eq!(
            client(&roots, "kas.b.test").leaf(addr).await.unwrap(),
            b_der
        );
        assert_eq!(client(&roots, "a.test").leaf(addr).await.unwrap(), a_der);
        let no_sni = Client {
            sni: false,
            ..client(&roots, "a.test")
        };
        assert_eq!(no_sni.leaf(addr).await.unwrap(), a_der);
    }

    #[tokio::test]
    async fn wildcard_matches_one_label() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_der) = write_pair(dir.path(), "a", &["a.test"]);
        let (w, w_der) = write_pair(dir.path(), "w", &["*.wild.test"]);
        let resolver = Arc::new(CertResolver::new(vec![a, w]).unwrap());
        let addr = serve(server_config(resolver.clone(), &[])).await;
        let roots = [a_der.clone(), w_der.clone()];

        assert_eq!(
            client(&roots, "x.wild.test").leaf(addr).await.unwrap(),
            w_der
        );
        let default = resolver.pick(None).unwrap();
        for sni in ["wild.test", "y.x.wild.test", "unknown.test"] {
            let got = resolver.pick(Some(sni)).unwrap();
            assert!(Arc::ptr_eq(&got, &default), "{sni} should get the default");
        }
        let upper = resolver.pick(Some("X.WILD.TEST.")).unwrap();
        assert_eq!(upper.cert[0], w_der);
    }

    #[tokio::test]
    async fn alpn_h2_is_negotiated() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_der) = write_pair(dir.path(), "a", &["a.test"]);
        let resolver = Arc::new(CertResolver::new(vec![a]).unwrap());
        let addr = serve(server_config(resolver, &[b"h2", b"http/1.1"])).await;
        let roots = [a_der];
        let c = Client {
            alpn: &[b"h2"],
            ..client(&roots, "a.test")
        };
        let tls = c.connect(addr).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn reload_serves_new_leaf_and_keeps_established_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (src, old_der) = write_pair(dir.path(), "tls", &["a.test"]);
        let resolver = Arc::new(CertResolver::new(vec![src]).unwrap());
        let addr = serve(server_config(resolver.clone(), &[])).await;

        let (_, new_der) = write_pair(dir.path(), "tls", &["a.test"]);
        let roots = [old_der.clone(), new_der.clone()];
        let mut early = client(&roots, "a.test").connect(addr).await.unwrap();
        echo(&mut early, b"before").await;
        assert_eq!(early.get_ref().1.peer_certificates().unwrap()[0], old_der);

        let summary = resolver.reload().unwrap();
        assert!(summary.changed);
        assert_eq!(summary.names, ["a.test"]);
        assert_eq!(client(&roots, "a.test").leaf(addr).await.unwrap(), new_der);
        echo(&mut early, b"after the reload").await;

        assert!(!resolver.reload().unwrap().changed);
    }

    #[tokio::test]
    async fn failed_reload_keeps_old_set() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_der) = write_pair(dir.path(), "a", &["a.test"]);
        let (b, b_der) = write_pair(dir.path(), "b", &["b.test"]);
        let resolver = Arc::new(CertResolver::new(vec![a.clone(), b.clone()]).unwrap());
        let addr = serve(server_config(resolver.clone(), &[])).await;
        let (other, _) = write_pair(dir.path(), "other", &["a.test"]);

        // `a` rotates correctly, but `b` gets a garbage key: neither change may be served.
        let (_, a_new) = write_pair(dir.path(), "a", &["a.test"]);
        std::fs::write(&b.key, "not a key").unwrap();
        let err = resolver.reload().unwrap_err().to_string();
        assert!(
            err.contains("b.key") && err.contains("no private key"),
            "{err}"
        );

        // A well-formed key of another certificate.
        std::fs::copy(&other.key, &b.key).unwrap();
        let err = resolver.reload().unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("b.key"), "{err}");

        let roots = [a_der.clone(), b_der.clone(), a_new];
        assert_eq!(client(&roots, "a.test").leaf(addr).await.unwrap(), a_der);
        assert_eq!(client(&roots, "b.test").leaf(addr).await.unwrap(), b_der);
    }

    #[tokio::test]
    async fn watcher_reloads_on_file_change() {
        let dir = tempfile::tempdir().unwrap();
        let (src, old_der) = write_pair(dir.path(), "tls", &["a.test"]);
        let resolver = Arc::new(CertResolver::new(vec![src]).unwrap());
        let addr = serve(server_config(resolver.clone(), &[])).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _watch = resolver
            .watch(Duration::from_millis(100), None, move |r| {
                let _ = tx.send(r.map(|s| s.changed).map_err(|e| e.to_string()));
            })
            .unwrap();

        let (_, new_der) = write_pair(dir.path(), "tls", &["a.test"]);
        let roots = [old_der, new_der.clone()];
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if client(&roots, "a.test").leaf(addr).await.unwrap() == new_der {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no reload within {WAIT:?}"
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
        }
    }

    #[test]
    fn loads_pkcs1_rsa_and_sec1_ec_keys() {
        let dir = tempfile::tempdir().unwrap();
        for (stem, cert, key, name) in [
            ("rsa", RSA_CERT, RSA_PKCS1_KEY, "rsa.test"),
            ("ec", EC_CERT, EC_SEC1_KEY, "ec.test"),
        ] {
            let src = CertSource {
                cert: dir.path().join(format!("{stem}.crt")),
                key: dir.path().join(format!("{stem}.key")),
            };
            std::fs::write(&src.cert, cert).unwrap();
            std::fs::write(&src.key, key).unwrap();
            let loaded = load_certified_key(&src).unwrap();
            assert_eq!(loaded.names, [name]);
            assert!(loaded.not_after > SystemTime::now() + Duration::from_secs(86400 * 365));
        }
    }

    #[test]
    fn load_errors_name_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let (good, _) = write_pair(dir.path(), "good", &["a.test"]);
        let at = |name: &str, content: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let err = |cert: PathBuf, key: PathBuf| {
            load_certified_key(&CertSource { cert, key })
                .unwrap_err()
                .to_string()
        };

        let e = err(dir.path().join("missing.crt"), good.key.clone());
        assert!(
            e.contains("missing.crt") && e.contains("cannot read"),
            "{e}"
        );
        let e = err(at("empty.crt", ""), good.key.clone());
        assert!(
            e.contains("empty.crt") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        // A key file given as the certificate: PEM, but no certificate in it.
        let e = err(good.key.clone(), good.key.clone());
        assert!(
            e.contains("good.key") && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let broken = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let e = err(at("broken.crt", broken), good.key.clone());
        assert!(e.contains("broken.crt") && e.contains("PEM"), "{e}");
        let not_x509 = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        let e = err(at("notx509.crt", not_x509), good.key.clone());
        assert!(e.contains("notx509.crt") && e.contains("X.509"), "{e}");
        let e = err(good.cert.clone(), at("garbage.key", "garbage"));
        assert!(
            e.contains("garbage.key") && e.contains("no private key"),
            "{e}"
        );

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(hosts(&["old.test"])).unwrap();
        params.not_before = rcgen::date_time_ymd(2000, 1, 1);
        params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        let e = err(
            at("expired.crt", &cert.pem()),
            at("expired.key", &key.serialize_pem()),
        );
        assert!(e.contains("expired.crt") && e.contains("expired at"), "{e}");

        assert!(matches!(
            CertResolver::new(vec![]),
            Err(TlsError::NoCertificates)
        ));
    }

    #[test]
    fn common_name_is_used_without_san() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Legacy.Test");
        let cert = params.self_signed(&key).unwrap();
        let src = CertSource {
            cert: dir.path().join("legacy.crt"),
            key: dir.path().join("legacy.key"),
        };
        std::fs::write(&src.cert, cert.pem()).unwrap();
        std::fs::write(&src.key, key.serialize_pem()).unwrap();
        assert_eq!(load_certified_key(&src).unwrap().names, ["legacy.test"]);
    }

    #[tokio::test]
    async fn self_signed_covers_names_and_ips() {
        let dir = tempfile::tempdir().unwrap();
        let src = write_self_signed(
            &dir.path().join("dev"),
            &hosts(&["kas.gitlab.test", "127.0.0.1"]),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&src.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leaf_pem = std::fs::read_to_string(&src.cert).unwrap();
        let resolver = Arc::new(CertResolver::new(vec![src]).unwrap());
        assert_eq!(resolver.current_names(), ["kas.gitlab.test"]);
        assert!(resolver.not_after() > SystemTime::now());
        let addr = serve(server_config(resolver, &[])).await;
        let roots = [der_of(&leaf_pem)];
        // Verified against the IP SAN; no SNI is sent for an IP, so this is the default.
        client(&roots, "127.0.0.1").connect(addr).await.unwrap();
        client(&roots, "kas.gitlab.test")
            .connect(addr)
            .await
            .unwrap();

        assert!(matches!(self_signed(&[]), Err(TlsError::SelfSigned(_))));
    }
}
