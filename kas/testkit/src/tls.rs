//! A self-signed certificate for a test server on loopback (kas's Kubernetes API proxy):
//! valid for `localhost` and `127.0.0.1`, written as PEM files a client can trust.

use std::path::{Path, PathBuf};

/// Writes `tls.crt` and `tls.key` into `dir`; returns their paths.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("certificate parameters");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write tls.crt");
    std::fs::write(&key_path, key.serialize_pem()).expect("write tls.key");
    (cert_path, key_path)
}

/// Like [`self_signed`], valid for `names` (host names or IP addresses), written as
/// `<stem>.crt` and `<stem>.key` into `dir`.
pub fn self_signed_for(dir: &Path, stem: &str, names: &[String]) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key pair");
    let params = rcgen::CertificateParams::new(names.to_vec()).expect("certificate parameters");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    let (cert_path, key_path) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("write certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path)
}
