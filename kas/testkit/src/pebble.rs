//! A local ACME server for tests: Let's Encrypt's `pebble` test CA and its fake DNS
//! server as child processes on loopback, stopped (and their logs shown on failure) however
//! the test ends. Shared by the edge's ACME unit tests and its end-to-end ACME test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpStream;

/// Child processes killed (and their logs shown if the test failed) however the test
/// ends.
pub struct Procs {
    children: Vec<(&'static str, Child)>,
    logs: PathBuf,
}

impl Procs {
    pub fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.children.push((name, child));
    }

    pub fn stop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let names: Vec<_> = self.children.iter().map(|(n, _)| *n).collect();
        self.stop();
        if std::thread::panicking() {
            for name in names {
                let log = std::fs::read_to_string(self.logs.join(format!("{name}.log")));
                eprintln!("---- {name} log ----\n{}", log.unwrap_or_default());
            }
        }
    }
}

pub fn require(binary: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(binary))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{binary}` is not installed: run `apt-get install -y pebble` (CI installs it)")
    })
}

/// A loopback port that is free for both TCP and UDP (the fake DNS server needs both).
pub fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub async fn wait_listening(addr: SocketAddr, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} not listening on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Pebble {
    pub procs: Procs,
    pub directory: String,
    /// pebble's own HTTPS certificate, self-signed.
    pub https_ca: PathBuf,
    pub management: SocketAddr,
}

/// pebble validating HTTP-01 on `http_port`, resolving every name to 127.0.0.1 through
/// pebble-challtestsrv (its other challenge listeners disabled).
/// Every name resolves to `http_ip` for pebble's validation authority.
pub async fn start_pebble(
    dir: &Path,
    http_ip: &str,
    http_port: u16,
    validity: Option<u64>,
) -> Pebble {
    let pebble = require("pebble");
    let challtestsrv = require("pebble-challtestsrv");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let https_ca = dir.join("pebble-https.pem");
    let https_key = dir.join("pebble-https.key");
    std::fs::write(&https_ca, cert.pem()).unwrap();
    std::fs::write(&https_key, key.serialize_pem()).unwrap();

    let [acme, management, tls, dns, dns_management] = [(); 5].map(|_| free_port());
    let mut config = serde_json::json!({"pebble": {
        "listenAddress": format!("127.0.0.1:{acme}"),
        "managementListenAddress": format!("127.0.0.1:{management}"),
        "certificate": https_ca,
        "privateKey": https_key,
        "httpPort": http_port,
        "tlsPort": tls,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    if let Some(secs) = validity {
        config["pebble"]["certificateValidityPeriod"] = secs.into();
    }
    let config_path = dir.join("pebble.json");
    std::fs::write(&config_path, config.to_string()).unwrap();

    let mut procs = Procs {
        children: Vec::new(),
        logs: dir.to_path_buf(),
    };
    procs.spawn(
        "pebble-challtestsrv",
        Command::new(challtestsrv)
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-defaultIPv4", http_ip, "-defaultIPv6", ""]),
    );
    procs.spawn(
        "pebble",
        Command::new(pebble)
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env_remove("PEBBLE_VA_ALWAYS_VALID")
            // rustls-acme does not retry a rejected nonce per request, it restarts
            // the whole order after a back-off; pebble's default 5% rejection would
            // make the wait below flaky.
            .env("PEBBLE_WFE_NONCEREJECT", "0"),
    );
    let management: SocketAddr = ([127, 0, 0, 1], management).into();
    wait_listening(
        ([127, 0, 0, 1], dns_management).into(),
        "pebble-challtestsrv",
    )
    .await;
    wait_listening(([127, 0, 0, 1], acme).into(), "pebble").await;
    wait_listening(management, "pebble management").await;
    Pebble {
        procs,
        directory: format!("https://127.0.0.1:{acme}/dir"),
        https_ca,
        management,
    }
}

/// The root pebble generated at start, which issued chains must verify against.
pub async fn pebble_root(pebble: &Pebble) -> CertificateDer<'static> {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pebble.https_ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let url = format!("https://{}/roots/0", pebble.management);
    let pem = client
        .get(url)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap();
    CertificateDer::from_pem_slice(&pem).unwrap()
}
