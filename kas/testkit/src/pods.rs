//! kas pods, each on its own runtime so that killing one closes every socket it has at
//! once, like a crashed container: a cluster of them on a subnet of their own (like pod
//! IPs, the same ports on each), or one on ephemeral 127.0.0.1 ports.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use kas::dev::gitlab_standin::{GitlabStandin, StandinAgent};
use kas::gitlab::SharedSecret;
use kas::{BoundKas, Config};

use crate::clients;
use crate::gitlab::{pod_config, Standin};
use crate::net::{ip, next_subnet, Subnet, LOCALHOST_ANY_PORT};
use crate::Profile;

/// The agent port of a pod in a [`Cluster`] (kas's own default).
pub const AGENT_PORT: u16 = 8150;
/// The observability port (`/readiness`, `/metrics`) of a pod in a [`Cluster`].
pub const HEALTH_PORT: u16 = 8151;

/// A kas pod on its own runtime.
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    pub obs_addr: SocketAddr,
    /// The Kubernetes API proxy, when the configuration has one.
    pub k8s_proxy_addr: Option<SocketAddr>,
    /// kas's task: its result once it has drained (after [`Pod::begin_shutdown`]).
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
    shutdown: Option<oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Pod {
    /// Binds kas with `config` (its listeners may ask for port 0) and runs it.
    pub async fn start(name: &str, config: Config) -> Self {
        let (tx, rx) = oneshot::channel();
        let pod_name = name.to_owned();
        let (runtime, task, addr, obs_addr, k8s_proxy_addr) =
            tokio::task::spawn_blocking(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .unwrap();
                let kas = rt.block_on(BoundKas::bind(config, &pod_name)).unwrap();
                let (addr, obs_addr) = (kas.agent_addr(), kas.observability_addr());
                let k8s_proxy_addr = kas.k8s_proxy_addr();
                let task = rt.spawn(kas.run(async {
                    let _ = rx.await;
                }));
                (rt, task, addr, obs_addr, k8s_proxy_addr)
            })
            .await
            .unwrap();
        Self {
            name: name.to_owned(),
            addr,
            obs_addr,
            k8s_proxy_addr,
            task: Some(task),
            shutdown: Some(tx),
            runtime: Some(runtime),
        }
    }

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

/// A GitLab stand-in on `<subnet>.1` and kas pods on `<subnet>.10` onwards, each with the
/// agent port [`AGENT_PORT`] and the observability port [`HEALTH_PORT`].
pub struct Cluster<P: Profile> {
    pub subnet: Subnet,
    pub gitlab: GitlabStandin,
    pub agent: StandinAgent,
    pub pods: Vec<Pod>,
    pub dir: tempfile::TempDir,
    secret_file: PathBuf,
    profile: PhantomData<fn() -> P>,
}

impl<P: Profile> Cluster<P> {
    pub async fn start(pods: u8) -> Self {
        Self::start_with(pods, |_| {}).await
    }

    /// Like [`Cluster::start`], each pod's configuration changed by `tweak`.
    pub async fn start_with(pods: u8, tweak: impl Fn(&mut Config)) -> Self {
        let subnet = next_subnet();
        let standin = Standin::start::<P>(SocketAddr::new(ip(subnet, 1), 0)).await;
        let mut cluster = Self {
            subnet,
            gitlab: standin.gitlab,
            agent: standin.agent,
            pods: Vec::new(),
            dir: standin.dir,
            secret_file: standin.secret_file,
            profile: PhantomData,
        };
        for i in 0..pods {
            cluster.add_pod(10 + i, &tweak).await;
        }
        cluster
    }

    /// Starts pod `kas-<host>` on `<subnet>.<host>`.
    pub async fn add_pod(&mut self, host: u8, tweak: &impl Fn(&mut Config)) {
        let agent = SocketAddr::new(ip(self.subnet, host), AGENT_PORT);
        let observability = SocketAddr::new(ip(self.subnet, host), HEALTH_PORT);
        let mut config = pod_config::<P>(&self.gitlab, &self.secret_file, agent, observability);
        tweak(&mut config);
        self.pods
            .push(Pod::start(&format!("kas-{host}"), config).await);
    }

    /// The pods' agent addresses.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.pods.iter().map(|p| p.addr).collect()
    }
}

/// One kas pod, `kas-test`, on ephemeral 127.0.0.1 ports, and its GitLab stand-in.
pub struct Harness<P: Profile> {
    pub gitlab: GitlabStandin,
    pub secret: SharedSecret,
    pub agent: StandinAgent,
    pub agent_addr: SocketAddr,
    pub obs_addr: SocketAddr,
    /// The Kubernetes API proxy, when the tweak configured one.
    pub k8s_proxy_addr: Option<SocketAddr>,
    /// kas's task: its result once it has drained (after [`Harness::begin_shutdown`]).
    pub task: Option<JoinHandle<anyhow::Result<()>>>,
    pod: Pod,
    _dir: tempfile::TempDir,
    profile: PhantomData<fn() -> P>,
}

impl<P: Profile> Harness<P> {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Like [`Harness::start`], the pod's configuration changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let standin = Standin::start::<P>(LOCALHOST_ANY_PORT).await;
        let mut config = pod_config::<P>(
            &standin.gitlab,
            &standin.secret_file,
            LOCALHOST_ANY_PORT,
            LOCALHOST_ANY_PORT,
        );
        tweak(&mut config);
        let mut pod = Pod::start("kas-test", config).await;
        Self {
            gitlab: standin.gitlab,
            secret: standin.secret,
            agent: standin.agent,
            agent_addr: pod.addr,
            obs_addr: pod.obs_addr,
            k8s_proxy_addr: pod.k8s_proxy_addr,
            task: pod.task.take(),
            pod,
            _dir: standin.dir,
            profile: PhantomData,
        }
    }

    /// gRPC over HTTP/2 cleartext, as `grpc://` agents connect.
    pub async fn h2c_channel(&self) -> Channel {
        clients::h2c_channel(self.agent_addr).await
    }

    /// gRPC over a ws-tunnel websocket, as `ws://` agents connect.
    pub async fn ws_channel(&self) -> Channel {
        clients::ws_channel(self.agent_addr, None, None)
            .await
            .unwrap()
    }

    pub fn begin_shutdown(&mut self) {
        self.pod.begin_shutdown();
    }

    /// GET on the observability port; panics when nothing answers.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        clients::http_get(self.obs_addr, path)
            .await
            .unwrap_or_else(|| panic!("no answer to GET {path} from {}", self.obs_addr))
    }
}

/// A stand-in kas pod's observability port on `ip`: every request gets `200 ok`, as
/// `/readiness` of a ready pod does, for tests whose agent port is a fake of their own.
pub async fn serve_readiness(ip: std::net::IpAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let health = tokio::net::TcpListener::bind((ip, HEALTH_PORT))
        .await
        .expect("bind the stand-in health port");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = health.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
}
