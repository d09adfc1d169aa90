//! The `kas-edge` binary as a child process, configured by a generated TOML file, with a
//! self-signed certificate it generates itself. The binary is the caller's: only the proxy
//! package's tests have `env!("CARGO_BIN_EXE_kas-edge")`.

use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;

use crate::clients::{self, http_get};
use crate::net::{ip, Subnet};
use crate::pods::HEALTH_PORT;
use crate::wait::{eventually, STEP};

/// How the edge runs.
pub struct EdgeOptions {
    pub binary: PathBuf,
    /// `RUST_LOG` of the edge.
    pub rust_log: &'static str,
    /// Where the edge's log (its stdout) goes.
    pub stdout: EdgeStdout,
    /// `tls.hosts` of the generated certificate.
    pub tls_hosts: &'static [&'static str],
    /// How long the edge may take to answer 200 on `/readyz`.
    pub ready_within: Duration,
    /// `listen.threads`: the edge's workers, and so its HTTP/2 connections per pod (one
    /// per worker). A test that needs every agent on one shared pod connection runs 1.
    pub threads: usize,
}

impl EdgeOptions {
    /// `binary` logging at info to its log file, a certificate for `localhost` and
    /// `kas.example.test`, ready within 90 s (generous: with ACME the edge is ready only
    /// once its certificate is issued), 2 worker threads.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            rust_log: "info",
            stdout: EdgeStdout::LogFile,
            tls_hosts: &["localhost", "kas.example.test"],
            ready_within: Duration::from_secs(90),
            threads: 2,
        }
    }
}

/// Where the edge's stdout (its log) goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeStdout {
    /// To [`Edge::log_file`], for [`Edge::log`].
    LogFile,
    /// Nowhere.
    Null,
    /// Into a pipe that nobody reads (a stuck log shipper): once the pipe's buffer is
    /// full, every write to it blocks.
    StuckPipe,
}

/// How a crate's tests run the edge with [`Edge::start`].
pub trait EdgeProfile: 'static {
    fn edge() -> EdgeOptions;
}

/// A running edge; killed when dropped. `P` names the [`EdgeProfile`] of
/// [`Edge::start`].
pub struct Edge<P> {
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub ca_file: PathBuf,
    pub config_file: PathBuf,
    pub child: Child,
    pub log_file: PathBuf,
    /// With [`EdgeStdout::StuckPipe`], the pipe's read end: held open, never read.
    _stuck_stdout: Option<ChildStdout>,
    _dir: tempfile::TempDir,
    profile: PhantomData<fn() -> P>,
}

impl<P: EdgeProfile> Edge<P> {
    /// The edge on `<subnet>.250` (https 8443, http 8080, admin 8081) in front of
    /// `endpoints`, run as [`EdgeProfile::edge`] says, configured by `extra` TOML appended
    /// to the defaults here.
    pub async fn start(subnet: Subnet, endpoints: &[SocketAddr], extra: &str) -> Self {
        Self::start_at(ip(subnet, 250), endpoints, extra).await
    }

    /// Like [`Edge::start`], listening on `host` (a second replica next to the first).
    pub async fn start_at(host: IpAddr, endpoints: &[SocketAddr], extra: &str) -> Self {
        Self::launch(&P::edge(), host, endpoints, extra).await
    }
}

impl<P> Edge<P> {
    /// Like [`Edge::start_at`], run as `options` say. Returns once `/readyz` answers 200.
    pub async fn launch(
        options: &EdgeOptions,
        host: IpAddr,
        endpoints: &[SocketAddr],
        extra: &str,
    ) -> Self {
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
            let hosts: Vec<String> = options.tls_hosts.iter().map(|h| format!("{h:?}")).collect();
            format!(
                "[tls]\nself_signed = true\nhosts = [{}]\nself_signed_dir = {tls_dir:?}\n",
                hosts.join(", ")
            )
        };
        let config = format!(
            "[listen]\nhttps = \"{https}\"\nhttp = \"{http}\"\nadmin = \"{admin}\"\nthreads = {}\n\
             {tls_section}\
             [discovery]\nkind = \"static\"\nendpoints = [{}]\n\
             [health]\nport = {HEALTH_PORT}\ninterval = \"200ms\"\ntimeout = \"150ms\"\n{extra}",
            options.threads,
            list.join(", ")
        );
        let config_file = dir.path().join("edge.toml");
        std::fs::write(&config_file, config).unwrap();
        let log_file = dir.path().join("edge.log");
        let stdout = match options.stdout {
            EdgeStdout::LogFile => Stdio::from(std::fs::File::create(&log_file).unwrap()),
            EdgeStdout::Null => Stdio::null(),
            EdgeStdout::StuckPipe => Stdio::piped(),
        };
        let mut child = Command::new(&options.binary)
            .args(["run", "--config"])
            .arg(&config_file)
            .env("RUST_LOG", options.rust_log)
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", options.binary.display()));
        let stuck_stdout = child.stdout.take();
        let edge = Self {
            https,
            http,
            admin,
            ca_file: tls_dir.join("tls.crt"),
            config_file,
            child,
            log_file,
            _stuck_stdout: stuck_stdout,
            _dir: dir,
            profile: PhantomData,
        };
        eventually("edge ready", options.ready_within, || async move {
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

    /// The admin port's `/metrics`; empty when nothing answers.
    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .map(|(_, m)| m)
            .unwrap_or_default()
    }

    /// Sends signal `sig` (`TERM`, `INT`, ...) to the edge.
    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
    }

    /// The edge's log so far (empty unless its stdout is [`EdgeStdout::LogFile`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// A TLS client that trusts the edge's generated certificate and offers `alpn`.
    pub fn tls_client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        clients::tls_connector(&self.ca_file, alpn)
    }

    /// gRPC over TLS with ALPN h2, as `grpcs://` agents connect.
    pub async fn grpc_channel(&self) -> Channel {
        clients::grpc_channel(self.https, self.tls_client(&[b"h2"])).await
    }

    /// gRPC over a `wss://` websocket, as agentk connects by default.
    pub async fn ws_channel(&self) -> Result<Channel, tonic::transport::Error> {
        clients::ws_channel(self.https, self.tls_client(&[b"http/1.1"]), None).await
    }
}

impl<P> Drop for Edge<P> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
