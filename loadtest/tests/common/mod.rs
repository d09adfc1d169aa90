//! A local system for the load generator's own tests: a GitLab stand-in and kas pods on
//! their own loopback addresses, each pod on its own runtime so a test can kill it (every
//! socket closes at once, like a crashed container), and the `kas-edge` binary in front
//! when it has been built.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use kas::gitlab::SharedSecret;
use kas::gitlab_standin::{GitlabStandin, StandinAgent};
use kas::{BoundKas, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TOKEN: &str = "glagent-loadtest-token";
pub const AGENT_PORT: u16 = 8150;
pub const HEALTH_PORT: u16 = 8151;

/// 127.A.B.0/24 per fixture; A is picked away from the ranges the proxy's tests use, B
/// counts fixtures in this process. Agents' source addresses come from 127.A.(B+100).
pub fn next_subnet() -> (u8, u8) {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = 230 + (std::process::id() % 20) as u8;
    (a, NEXT.fetch_add(1, Ordering::SeqCst))
}

pub fn ip(subnet: (u8, u8), host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, subnet.0, subnet.1, host))
}

pub struct Pod {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Pod {
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

pub struct Stack {
    pub subnet: (u8, u8),
    pub gitlab: GitlabStandin,
    pub pods: Vec<Pod>,
    pub dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(pods: u8) -> Self {
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
            .write_agent_config(&agent, "observability:\n  logging:\n    level: info\n")
            .unwrap();
        let mut stack = Self {
            subnet,
            gitlab,
            pods: Vec::new(),
            dir,
        };
        for host in 0..pods {
            let mut config = Config::default();
            config.agent.listen = SocketAddr::new(ip(subnet, 10 + host), AGENT_PORT);
            config.observability.listen = SocketAddr::new(ip(subnet, 10 + host), HEALTH_PORT);
            config.gitlab.address = stack.gitlab.url();
            config.gitlab.authentication_secret_file = secret_file.clone();
            config.agent_configuration.poll_interval = Duration::from_secs(1);
            let addr = config.agent.listen;
            let name = format!("kas-{host}");
            let runtime = tokio::task::spawn_blocking(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                let kas = rt.block_on(BoundKas::bind(config, &name)).unwrap();
                rt.spawn(kas.run(std::future::pending()));
                rt
            })
            .await
            .unwrap();
            stack.pods.push(Pod {
                addr,
                runtime: Some(runtime),
            });
        }
        stack
    }

    /// `ws://pod/` for even `i`, `grpc://pod` for odd: both transports get exercised.
    pub fn pod_url(&self, i: usize, ws: bool) -> String {
        let addr = self.pods[i].addr;
        if ws {
            format!("ws://{addr}/")
        } else {
            format!("grpc://{addr}")
        }
    }

    pub fn source_base(&self) -> String {
        format!("127.{}.{}.1", self.subnet.0, 100 + self.subnet.1)
    }

    /// Common options: this stack's token and source range, quick timings.
    /// [`Stack::args`] aimed at both pods, the first over websocket and the second over
    /// gRPC, with half the agents on each transport.
    pub fn mixed_args(&self, scenario: &str, extra: &[&str]) -> kas_loadtest::Args {
        let (ws, grpc) = (self.pod_url(0, true), self.pod_url(1, false));
        let mut argv = vec!["--target", &ws, "--target", &grpc, "--ws-fraction", "0.5"];
        argv.extend_from_slice(extra);
        self.args(scenario, &argv)
    }

    pub fn args(&self, scenario: &str, extra: &[&str]) -> kas_loadtest::Args {
        let mut argv: Vec<String> = [
            "kas-loadtest",
            "--scenario",
            scenario,
            "--token",
            TOKEN,
            "--source-base",
            &self.source_base(),
            "--progress",
            "never",
            "--settle",
            "30s",
            "--sample-interval",
            "200ms",
            "--backoff-min",
            "100ms",
            "--backoff-max",
            "500ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(extra.iter().map(|s| s.to_string()));
        <kas_loadtest::Args as clap::Parser>::try_parse_from(argv).unwrap()
    }
}

/// The `kas-edge` binary: $KAS_EDGE_BIN, next to this test's target directory, or the
/// workspace's target/debug. `None` when it has not been built.
pub fn find_edge_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KAS_EDGE_BIN").map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test> → target/<profile>/kas-edge
        if let Some(profile_dir) = exe.parent().and_then(|d| d.parent()) {
            candidates.push(profile_dir.join("kas-edge"));
        }
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target/debug/kas-edge"));
    candidates.push(workspace.join("target/release/kas-edge"));
    candidates.into_iter().find(|p| p.exists())
}

pub struct Edge {
    pub https: SocketAddr,
    pub admin: SocketAddr,
    pub ca_file: PathBuf,
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plain GET of the edge's admin port; `None` when nothing answers.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

impl Edge {
    pub async fn start(binary: &std::path::Path, stack: &Stack) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host = ip(stack.subnet, 250);
        let https = SocketAddr::new(host, 8443);
        let admin = SocketAddr::new(host, 8081);
        let tls_dir = dir.path().join("tls");
        let endpoints: Vec<String> = stack
            .pods
            .iter()
            .map(|p| format!("\"{}\"", p.addr))
            .collect();
        let config = format!(
            "[listen]\nhttps = \"{https}\"\nhttp = \"{}\"\nadmin = \"{admin}\"\nthreads = 2\n\
             [tls]\nself_signed = true\nhosts = [\"localhost\"]\nself_signed_dir = {tls_dir:?}\n\
             [discovery]\nkind = \"static\"\nendpoints = [{}]\n\
             [health]\nport = {HEALTH_PORT}\ninterval = \"200ms\"\ntimeout = \"150ms\"\n",
            SocketAddr::new(host, 8080),
            endpoints.join(", ")
        );
        let config_file = dir.path().join("edge.toml");
        std::fs::write(&config_file, config).unwrap();
        let child = Command::new(binary)
            .args(["run", "--config"])
            .arg(&config_file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let edge = Self {
            https,
            admin,
            ca_file: tls_dir.join("tls.crt"),
            child,
            _dir: dir,
        };
        // Ready, and every pod healthy, within a generous bound.
        let want = stack.pods.len();
        for _ in 0..300 {
            if let Some(m) = admin_get(admin, "/metrics").await {
                let healthy = m
                    .lines()
                    .filter(|l| l.starts_with("edge_upstream_healthy{") && l.ends_with(" 1"))
                    .count();
                if healthy == want && edge.ca_file.exists() {
                    return edge;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the edge did not become ready with {want} healthy pods");
    }
}
