//! The local stack behind the README's first command: a GitLab stand-in (with its Gitaly
//! stand-in over real git repositories in `<dir>/repos`) and several kas pods on loopback,
//! each pod on its own address (127.0.1.N) like pods with their own IPs, with the agent
//! port and the observability port apart.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use super::gitlab_standin::{GitlabStandin, StandinAgent};
use crate::config::Config;
use crate::gitlab::SharedSecret;
use crate::server::BoundKas;

pub const AGENT_PORT: u16 = 8150;
pub const OBSERVABILITY_PORT: u16 = 8151;
/// GitLab's calls into kas (real kas's API port).
pub const API_PORT: u16 = 8153;

#[derive(Debug, Clone)]
pub struct DevStackOptions {
    /// Working directory for the secret, the demo token and the demo repository.
    pub dir: PathBuf,
    pub pods: u8,
    pub gitlab_listen: SocketAddr,
    pub poll_interval: Duration,
}

impl Default for DevStackOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".dev"),
            pods: 3,
            gitlab_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8180),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// The address of pod `n` (1-based): its own loopback IP, the real kas ports.
pub fn pod_ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, n))
}

const DEMO_CONFIG: &str = "# Demo agent configuration, read by kas through the local Gitaly stand-in.\n# Edit, then `git commit -am change` in this repository: connected agents receive the\n# new version within the poll interval.\nobservability:\n  logging:\n    level: info\nci_access:\n  projects:\n    - id: demo-group/demo-project\n";

/// Reads a file, or creates it with `make()` the first time, so the secret and the demo
/// token survive restarts of the stack.
fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = make();
            std::fs::write(path, format!("{text}\n"))
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(text)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Everything the local stack prepared, for the launcher to print and to pass on.
pub struct DevStack {
    pub gitlab: GitlabStandin,
    pub secret_file: PathBuf,
    pub token: String,
    pub agent: StandinAgent,
    pub pods: Vec<BoundKas>,
}

impl DevStack {
    pub async fn start(opts: &DevStackOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&opts.dir)
            .with_context(|| format!("cannot create {}", opts.dir.display()))?;
        let secret_file = opts.dir.join("gitlab_kas_secret");
        let secret_text = read_or_create(&secret_file, || SharedSecret::generate().to_base64())?;
        let secret = SharedSecret::from_base64(&secret_text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", secret_file.display()))?;
        let token = read_or_create(&opts.dir.join("demo-agent-token"), || {
            let bytes: [u8; 16] = rand::random();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("glagent-dev-{hex}")
        })?;
        let repo_root = opts.dir.join("repos");
        let gitlab = GitlabStandin::start(opts.gitlab_listen, secret, &repo_root)
            .await
            .with_context(|| {
                format!("cannot start the GitLab stand-in on {}", opts.gitlab_listen)
            })?;
        let agent = StandinAgent::demo(&token);
        gitlab.add_agent(agent.clone());
        let repo = repo_root.join(&agent.project_path);
        let config_path = repo.join(crate::sources::config_file_path(&agent.agent_name));
        if !config_path.exists() {
            gitlab.write_agent_config(&agent, DEMO_CONFIG)?;
        } else if !repo.join(".git").exists() {
            // A demo directory from before repositories were git: make it one, as it is.
            gitlab.commit_files(&agent.project(), &[])?;
        }
        let mut pods = Vec::new();
        for n in 1..=opts.pods {
            let mut config = Config::default();
            config.agent.listen = SocketAddr::new(pod_ip(n), AGENT_PORT);
            config.observability.listen = SocketAddr::new(pod_ip(n), OBSERVABILITY_PORT);
            config.gitlab.address = gitlab.url();
            config.gitlab.authentication_secret_file = secret_file.clone();
            config.agent_configuration.poll_interval = opts.poll_interval;
            // GitLab's calls (connected agents, push events): the stand-in signs them with
            // the shared secret, as GitLab does.
            config.api.listen = Some(SocketAddr::new(pod_ip(n), API_PORT));
            config.api.authentication_secret_file = secret_file.clone();
            config.shutdown.readiness_delay = Duration::from_secs(1);
            config.shutdown.drain_deadline = Duration::from_secs(5);
            pods.push(BoundKas::bind(config, &format!("kas-{n}")).await?);
        }
        // A commit in the demo repository reaches the agent at once: the hook asks the
        // stand-in, which sends every pod a GitPushEvent (no Redis here to fan it out).
        gitlab.set_kas_apis(pods.iter().filter_map(BoundKas::api_addr).collect());
        crate::dev::push_events::install_post_commit_hook(
            &repo,
            &gitlab.url(),
            &agent.project_path,
        )?;
        Ok(Self {
            gitlab,
            secret_file,
            token,
            agent,
            pods,
        })
    }

    /// Human-readable instructions for reaching the stack.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("GitLab stand-in:  {}\n", self.gitlab.url()));
        out.push_str(&format!(
            "Gitaly stand-in:  {}  (git repositories in {})\n",
            self.gitlab.gitaly().address(),
            self.gitlab.gitaly().storage_root().display()
        ));
        for pod in &self.pods {
            out.push_str(&format!(
                "kas pod:          grpc://{a}  ws://{a}/  health http://{o}/readiness\n",
                a = pod.agent_addr(),
                o = pod.observability_addr()
            ));
        }
        out.push_str(&format!("demo agent token: {}\n", self.token));
        out
    }

    /// Runs every pod until `shutdown` flips to true, then drains them together.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        for pod in self.pods {
            let mut rx = shutdown.clone();
            tasks.push(tokio::spawn(pod.run(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })));
        }
        let _ = shutdown.wait_for(|stop| *stop).await;
        for task in tasks {
            task.await.context("kas pod task failed")??;
        }
        drop(self.gitlab);
        Ok(())
    }
}
