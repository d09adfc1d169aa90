//! The local stack behind the README's first command: a GitLab stand-in (with its Gitaly
//! stand-in over real git repositories in `<dir>/repos`) and several kas pods on loopback,
//! each pod on its own address (127.0.1.N) like pods with their own IPs, with the agent
//! port, the observability port and the Kubernetes API proxy's port apart; a Kubernetes API
//! stand-in as the demo agent's cluster, and the demo agent itself holding reverse tunnels
//! into it — on every pod, since requests reach any pod and, without Redis (which the local
//! stack does not run), pods cannot find each other's tunnels — and a CI job token GitLab's
//! stand-in accepts for the demo agent, so `kubectl` works through the proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use super::agent::{AgentOptions, TestAgent};
use super::gitlab_standin::{GitlabStandin, StandinAgent, StandinAllowedAgent, StandinCiJob};
use super::kube_api::KubeApi;
use crate::config::Config;
use crate::gitlab::SharedSecret;
use crate::server::BoundKas;

pub const AGENT_PORT: u16 = 8150;
pub const OBSERVABILITY_PORT: u16 = 8151;
/// The Kubernetes API proxy's port on each pod (real kas's default).
pub const K8S_PROXY_PORT: u16 = 8154;
/// The path the proxy serves (as on kas.gitlab.com); the edge passes it on unchanged.
pub const K8S_PROXY_PREFIX: &str = "/k8s-proxy/";
/// GitLab's calls into kas (real kas's API port).
pub const API_PORT: u16 = 8153;

#[derive(Debug, Clone)]
pub struct DevStackOptions {
    /// Working directory for the secret, the demo token and the demo repository.
    pub dir: PathBuf,
    pub pods: u8,
    pub gitlab_listen: SocketAddr,
    /// The demo agent's cluster (the Kubernetes API stand-in).
    pub kube_api_listen: SocketAddr,
    pub poll_interval: Duration,
}

impl Default for DevStackOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(".dev"),
            pods: 3,
            gitlab_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8180),
            kube_api_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8182),
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
    /// `ci:<agent id>:<job token>`: the bearer token `kubectl` uses through the proxy.
    pub ci_token: String,
    pub kube_api: KubeApi,
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
        let job_token = read_or_create(&opts.dir.join("demo-ci-job-token"), || {
            let bytes: [u8; 16] = rand::random();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("glcbt-dev-{hex}")
        })?;
        gitlab.add_ci_job(StandinCiJob {
            job_token: job_token.clone(),
            job_id: 1,
            pipeline_id: 1,
            project_id: agent.project_id,
            group_ids: vec![],
            username: "dev".into(),
            environment: None,
            allowed_agents: vec![StandinAllowedAgent {
                agent_id: agent.agent_id,
                config_project_id: agent.project_id,
                access_as: serde_json::json!({"ci_job": {}}),
            }],
        });
        let ci_token = format!("ci:{}:{job_token}", agent.agent_id);
        let kube_api = KubeApi::start(opts.kube_api_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot start the Kubernetes API stand-in on {}",
                    opts.kube_api_listen
                )
            })?;
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
            config.kubernetes_api.listen = Some(SocketAddr::new(pod_ip(n), K8S_PROXY_PORT));
            config.kubernetes_api.url_path_prefix = K8S_PROXY_PREFIX.into();
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
            ci_token,
            kube_api,
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
                "kas pod:          grpc://{a}  ws://{a}/  health http://{o}{r}\n",
                a = pod.agent_addr(),
                o = pod.observability_addr(),
                r = pod.readiness_path()
            ));
            if let Some(proxy) = pod.k8s_proxy_addr() {
                out.push_str(&format!(
                    "                  k8s proxy http://{proxy}{K8S_PROXY_PREFIX}\n"
                ));
            }
        }
        out.push_str(&format!("demo agent token: {}\n", self.token));
        out.push_str(&format!(
            "demo cluster:     {}  (Kubernetes API stand-in; the demo agent holds tunnels on every pod)\n",
            self.kube_api.url()
        ));
        out.push_str(&format!(
            "CI job token:     {}  (kubectl bearer token for the proxy)\n",
            self.ci_token
        ));
        out
    }

    /// Runs every pod until `shutdown` flips to true, then drains them together.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        let agent_addrs: Vec<SocketAddr> = self.pods.iter().map(|p| p.agent_addr()).collect();
        for pod in self.pods {
            let mut rx = shutdown.clone();
            tasks.push(tokio::spawn(pod.run(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })));
        }
        // The demo agent: two idle tunnels on every pod, as if one agentk per pod.
        let mut agents = Vec::new();
        for addr in &agent_addrs {
            let options = AgentOptions::new(&self.token, &self.kube_api.url());
            match TestAgent::connect_h2c(*addr, options).await {
                Ok(agent) => agents.push(agent),
                Err(e) => tracing::warn!(%addr, error = %e, "the demo agent cannot connect"),
            }
        }
        let _ = shutdown.wait_for(|stop| *stop).await;
        drop(agents);
        for task in tasks {
            task.await.context("kas pod task failed")??;
        }
        drop(self.gitlab);
        Ok(())
    }
}
