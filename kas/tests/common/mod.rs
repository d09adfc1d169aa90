//! Starts a real GitLab stand-in and a real kas on loopback ports for each test.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};

use kas::gitlab::SharedSecret;
use kas::gitlab_standin::{GitlabStandin, StandinAgent};
use kas::{BoundKas, Config};

pub const TOKEN: &str = "glagent-test-token";
pub const FORBIDDEN_TOKEN: &str = "glagent-forbidden-token";

pub struct Harness {
    pub gitlab: GitlabStandin,
    pub secret: SharedSecret,
    pub agent: StandinAgent,
    pub agent_addr: SocketAddr,
    pub obs_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = SharedSecret::generate();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, secret.to_base64()).unwrap();
        let gitlab = GitlabStandin::start(loopback0(), secret.clone(), &dir.path().join("repos"))
            .await
            .unwrap();
        let agent = StandinAgent::demo(TOKEN);
        gitlab.add_agent(agent.clone());
        gitlab.add_agent(StandinAgent {
            token: FORBIDDEN_TOKEN.into(),
            forbidden: true,
            ..StandinAgent::demo(FORBIDDEN_TOKEN)
        });
        gitlab
            .write_agent_config(&agent, "observability:\n  logging:\n    level: debug\n")
            .unwrap();

        let mut config = Config::default();
        config.agent.listen = loopback0();
        config.observability.listen = "127.0.0.1:0".parse().unwrap();
        config.gitlab.address = gitlab.url();
        config.gitlab.authentication_secret_file = secret_file;
        config.gitlab.api_timeout = Duration::from_secs(2);
        config.agent_configuration.poll_interval = Duration::from_millis(100);
        config.shutdown.readiness_delay = Duration::from_millis(500);
        config.shutdown.drain_deadline = Duration::from_secs(3);
        tweak(&mut config);
        let kas = BoundKas::bind(config, "kas-test").await.unwrap();
        let agent_addr = kas.agent_addr();
        let obs_addr = kas.observability_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(kas.run(async {
            let _ = rx.await;
        }));
        Self {
            gitlab,
            secret,
            agent,
            agent_addr,
            obs_addr,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// gRPC over HTTP/2 cleartext, as `grpc://` agents connect.
    pub async fn h2c_channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.agent_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// gRPC over a ws-tunnel websocket, as `ws://` agents connect.
    pub async fn ws_channel(&self) -> Channel {
        ws_channel(self.agent_addr).await.unwrap()
    }

    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.obs_addr, path).await
    }
}

pub async fn ws_channel(addr: SocketAddr) -> Result<Channel, tonic::transport::Error> {
    let url = format!("ws://{addr}/");
    Endpoint::from_static("http://kas.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let url = url.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let ws = kas::wstunnel::client_handshake(tcp, &url).await?;
                Ok::<_, std::io::Error>(TokioIo::new(ws))
            }
        }))
        .await
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Attaches `authorization: Bearer <token>` like agentk does.
pub fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}
