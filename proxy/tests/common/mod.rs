//! Test fixtures over real sockets: a GitLab stand-in, kas pods on their own loopback
//! addresses (like pod IPs, same ports on each), and the `kas-edge` binary in front with a
//! generated self-signed certificate. Clients speak real TLS, HTTP/2 and websocket.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic::transport::{Channel, Endpoint, Uri};

use kas::gitlab::SharedSecret;
use kas::gitlab_standin::{GitlabStandin, StandinAgent};
use kas::{BoundKas, Config};

pub const TOKEN: &str = "glagent-edge-test-token";
pub const AGENT_PORT: u16 = 8150;
pub const HEALTH_PORT: u16 = 8151;
pub const STEP: Duration = Duration::from_secs(15);

/// Each fixture gets its own 127.A.B.0/24 so tests in one process (and concurrent test
/// processes) never share an address.
pub fn next_subnet() -> (u8, u8) {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = 20 + (std::process::id() % 200) as u8;
    (a, NEXT.fetch_add(1, Ordering::SeqCst))
}

pub fn ip(subnet: (u8, u8), host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, subnet.0, subnet.1, host))
}

/// A kas pod on its own runtime, so killing it closes every socket it has, like a
/// crashed container.
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    pub obs_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Pod {
    /// Starts the pod's drain: readiness 503 at once, listener open for `readiness_delay`.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Kills the pod: every socket closes at once.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub subnet: (u8, u8),
    pub gitlab: GitlabStandin,
    pub agent: StandinAgent,
    pub pods: Vec<Pod>,
    pub dir: tempfile::TempDir,
    secret_file: PathBuf,
}

impl Cluster {
    pub async fn start(pods: u8) -> Self {
        Self::start_with(pods, |_| {}).await
    }

    pub async fn start_with(pods: u8, tweak: impl Fn(&mut Config)) -> Self {
        let subnet = next_subnet();
        let dir = tempfile::tempdir().unwrap();
        let secret = SharedSecret::generate();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, secret.to_base64()).unwrap();
        let gitlab = GitlabStandin::start(
            SocketAddr::new(ip(subnet, 1), 0),
            secret,
            &dir.path().join("repos"),
        )
        .await
        .unwrap();
        let agent = StandinAgent::demo(TOKEN);
        gitlab.add_agent(agent.clone());
        gitlab
            .write_agent_config(&agent, "observability:\n  logging:\n    level: debug\n")
            .unwrap();
        let mut cluster = Self {
            subnet,
            gitlab,
            agent,
            pods: Vec::new(),
            dir,
            secret_file,
        };
        for i in 0..pods {
            cluster.add_pod(10 + i, &tweak).await;
        }
        cluster
    }

    pub async fn add_pod(&mut self, host: u8, tweak: &impl Fn(&mut Config)) {
        let addr = SocketAddr::new(ip(self.subnet, host), AGENT_PORT);
        let obs_addr = SocketAddr::new(ip(self.subnet, host), HEALTH_PORT);
        let mut config = Config::default();
        config.agent.listen = addr;
        config.observability.listen = obs_addr;
        config.gitlab.address = self.gitlab.url();
        config.gitlab.authentication_secret_file = self.secret_file.clone();
        config.agent_configuration.poll_interval = Duration::from_millis(200);
        config.shutdown.readiness_delay = Duration::from_secs(30);
        config.shutdown.drain_deadline = Duration::from_secs(30);
        tweak(&mut config);
        let name = format!("kas-{host}");
        let (tx, rx) = oneshot::channel();
        let pod_name = name.clone();
        let runtime = tokio::task::spawn_blocking(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let kas = rt.block_on(BoundKas::bind(config, &pod_name)).unwrap();
            rt.spawn(kas.run(async {
                let _ = rx.await;
            }));
            rt
        })
        .await
        .unwrap();
        self.pods.push(Pod {
            name,
            addr,
            obs_addr,
            shutdown: Some(tx),
            runtime: Some(runtime),
        });
    }

    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.pods.iter().map(|p| p.addr).collect()
    }
}

/// The `kas-edge` binary, configured by `extra` TOML appended to the defaults here.
pub struct Edge {
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub ca_file: PathBuf,
    pub config_file: PathBuf,
    pub child: Child,
    pub log_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Edge {
    pub async fn start(subnet: (u8, u8), endpoints: &[SocketAddr], extra: &str) -> Self {
        Self::start_at(ip(subnet, 250), endpoints, extra).await
    }

    /// Like [`Edge::start`], listening on `host` (a second replica next to the first).
    pub async fn start_at(host: IpAddr, endpoints: &[SocketAddr], extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let https = SocketAddr::new(host, 8443);
        let admin = SocketAddr::new(host, 8081);
        let http = SocketAddr::new(host, 8080);
        let tls_dir = dir.path().join("tls");
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        // A test that brings its own [tls] section replaces the generated certificate.
        let tls_section = if extra.contains("[tls]") {
            String::new()
        } else {
            format!("[tls]\nself_signed = true\nhosts = [\"localhost\", \"kas.example.test\"]\nself_signed_dir = {tls_dir:?}\n")
        };
        let config = format!(
            "[listen]\nhttps = \"{https}\"\nhttp = \"{http}\"\nadmin = \"{admin}\"\nthreads = 2\n\
             {tls_section}\
             [discovery]\nkind = \"static\"\nendpoints = [{}]\n\
             [health]\nport = {HEALTH_PORT}\ninterval = \"200ms\"\ntimeout = \"150ms\"\n{extra}",
            list.join(", ")
        );
        let config_file = dir.path().join("edge.toml");
        std::fs::write(&config_file, config).unwrap();
        let log_file = dir.path().join("edge.log");
        let child = Command::new(env!("CARGO_BIN_EXE_kas-edge"))
            .args(["run", "--config"])
            .arg(&config_file)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log_file).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let edge = Self {
            https,
            http,
            admin,
            ca_file: tls_dir.join("tls.crt"),
            config_file,
            child,
            log_file,
            _dir: dir,
        };
        let admin = edge.admin;
        // Generous: with ACME the edge is ready only once its certificate is issued.
        eventually("edge ready", Duration::from_secs(90), || async move {
            matches!(http_get(admin, "/readyz").await, Some((200, _)))
        })
        .await;
        edge
    }

    /// Waits until the edge reports `n` healthy pods.
    pub async fn wait_healthy(&self, n: usize) {
        let admin = self.admin;
        eventually(&format!("{n} healthy pods"), STEP, || async move {
            http_get(admin, "/metrics")
                .await
                .map(|(_, m)| {
                    m.lines()
                        .filter(|l| l.starts_with("edge_upstream_healthy{") && l.ends_with(" 1"))
                        .count()
                        == n
                })
                .unwrap_or(false)
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .map(|(_, m)| m)
            .unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    pub fn tls_client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        tls_connector(&self.ca_file, alpn)
    }

    /// gRPC over TLS with ALPN h2, as `grpcs://` agents connect.
    pub async fn grpc_channel(&self) -> Channel {
        grpc_channel(self.https, self.tls_client(&[b"h2"])).await
    }

    /// gRPC over a `wss://` websocket, as agentk connects by default.
    pub async fn ws_channel(&self) -> Result<Channel, tonic::transport::Error> {
        ws_channel(self.https, self.tls_client(&[b"http/1.1"]), None).await
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tls_connector(ca_file: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read(ca_file).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    tls_connector_trusting(roots, alpn)
}

/// A verifying TLS client that trusts `roots` and offers `alpn`.
pub fn tls_connector_trusting(
    roots: rustls::RootCertStore,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub async fn tls_connect(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    bind: Option<IpAddr>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = match bind {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tls.connect(name, tcp).await
}

pub async fn grpc_channel(addr: SocketAddr, tls: tokio_rustls::TlsConnector) -> Channel {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move { tls_connect(addr, &tls, None).await.map(TokioIo::new) }
        }))
        .await
        .unwrap()
}

pub async fn ws_channel(
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    bind: Option<IpAddr>,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                let stream = tls_connect(addr, &tls, bind).await?;
                let ws = kas::wstunnel::client_handshake(stream, "wss://localhost/").await?;
                Ok::<_, std::io::Error>(TokioIo::new(ws))
            }
        }))
        .await
}

/// A plain HTTP/1.1 GET; `None` when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

pub fn with_token<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

/// Waits (bounded) for `f` to become true.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}
