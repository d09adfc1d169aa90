//! `kas-loadtest-stack`: what the `k8s-proxy` scenario needs, on loopback, until Ctrl-C or
//! SIGTERM — a GitLab stand-in knowing `--agents` agents (their tokens in
//! `<dir>/agent-tokens`; distinct ids, one configuration project and file) and one CI job allowed to use every one of them (`ci:<agent
//! id>:<job token>` per agent in `<dir>/ci-tokens`, line for line), the Kubernetes API
//! stand-in the agents replay requests against, and `--pods` real `kas` processes with the
//! Kubernetes API proxy on. The pods are separate processes, so their memory is kas's
//! alone; `<dir>/stack.env` says where everything is, for a shell to `source`.
//!
//! Pod `n` (from 1) listens on `--ip-base` + n − 1: agents on 8150, observability on 8151,
//! the proxy on 8154 under `/k8s-proxy/` (plaintext, as behind the edge; `--tls` for a
//! self-signed certificate in `<dir>/tls.crt`). The stand-ins listen on `--standin-ip`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use kas::dev::gitlab_standin::{GitlabStandin, StandinAgent, StandinAllowedAgent, StandinCiJob};
use kas::dev::kube_api::KubeApi;
use kas::gitlab::SharedSecret;

use crate::cli::parse_duration;

pub const AGENT_PORT: u16 = 8150;
pub const OBSERVABILITY_PORT: u16 = 8151;
pub const K8S_PROXY_PORT: u16 = 8154;
pub const K8S_PROXY_PREFIX: &str = "/k8s-proxy/";
const GITLAB_PORT: u16 = 8180;
const KUBE_API_PORT: u16 = 8182;
const REDIS_PORT: u16 = 6379;
pub const PRIVATE_API_PORT: u16 = 8155;

/// The CI job token every `ci:` token of the stack carries.
const JOB_TOKEN: &str = "glcbt-loadtest-job";
/// The project every agent's configuration lives in (one repository: kas polls it once).
const PROJECT_PATH: &str = "loadtest/agents";
/// Every agent's name, so every agent's configuration file.
const AGENT_NAME: &str = "loadtest";
const AGENT_CONFIG: &str = "observability:\n  logging:\n    level: warn\n";

/// The local stack for the `k8s-proxy` scenario.
#[derive(Debug, Clone, Parser)]
#[command(name = "kas-loadtest-stack", version)]
pub struct StackArgs {
    /// Directory for the secret, the tokens, the pods' configurations and logs, and
    /// stack.env.
    #[arg(long, default_value = ".loadtest-stack")]
    pub dir: PathBuf,

    /// kas pods (processes).
    #[arg(long, default_value_t = 3)]
    pub pods: u8,

    /// Distinct agents GitLab knows (tokens in <dir>/agent-tokens). kas-loadtest gives its
    /// agents these tokens in turn; with one, every agent is the same GitLab agent.
    #[arg(long, default_value_t = 1)]
    pub agents: usize,

    /// Address of pod 1; pod n gets the n-th address from here.
    #[arg(long, default_value = "127.0.7.1")]
    pub ip_base: Ipv4Addr,

    /// Address of the GitLab (:8180) and Kubernetes API (:8182) stand-ins.
    #[arg(long, default_value = "127.0.7.200")]
    pub standin_ip: Ipv4Addr,

    /// The kas binary. Default: `kas` next to this program.
    #[arg(long)]
    pub kas_bin: Option<PathBuf>,

    /// Serve the proxy over TLS with a self-signed certificate (<dir>/tls.crt).
    #[arg(long)]
    pub tls: bool,

    /// How long a request waits for a tunnel of its agent (real kas: 20 s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub routing_timeout: Duration,

    /// Tunnels one agent may hold on a pod: with one agent token, the whole fleet's.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_tunnels_per_agent: usize,

    /// kas's log level.
    #[arg(long, default_value = "warn")]
    pub log_level: String,

    /// Run the pods as a fleet: a `redis-server` (on the stand-ins' address, :6379) they
    /// share, and each pod's private API (:8155), so a Kubernetes API request landing on
    /// any pod reaches the agent's tunnels wherever they are (as behind the edge).
    #[arg(long)]
    pub redis: bool,

    /// How often kas checks the agents' configuration branch for a new commit (kas's
    /// default, 5 minutes, when not given).
    #[arg(long, value_parser = parse_duration)]
    pub config_poll_interval: Option<Duration>,
}

/// The stack's files and addresses, as `stack.env` lists them.
pub struct StackInfo {
    pub agent_targets: Vec<String>,
    pub proxy_urls: Vec<String>,
    pub kube_api_url: String,
    pub token_file: PathBuf,
    pub ci_token_file: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub kas_pids: Vec<u32>,
    pub metrics_urls: Vec<String>,
}

impl StackInfo {
    /// Shell assignments (values single-quoted).
    pub fn env_text(&self) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
        let list = |v: &[String]| q(&v.join(" "));
        let pids: Vec<String> = self.kas_pids.iter().map(u32::to_string).collect();
        let mut out = String::new();
        let _ = writeln!(out, "AGENT_TARGETS={}", list(&self.agent_targets));
        let _ = writeln!(out, "K8S_PROXY_URLS={}", list(&self.proxy_urls));
        let _ = writeln!(out, "KUBE_API_URL={}", q(&self.kube_api_url));
        let _ = writeln!(
            out,
            "TOKEN_FILE={}",
            q(&self.token_file.display().to_string())
        );
        let _ = writeln!(
            out,
            "CI_TOKEN_FILE={}",
            q(&self.ci_token_file.display().to_string())
        );
        let ca = self
            .ca_file
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string());
        let _ = writeln!(out, "CA_FILE={}", q(&ca));
        let _ = writeln!(out, "KAS_PIDS={}", list(&pids));
        let _ = writeln!(out, "KAS_METRICS={}", list(&self.metrics_urls));
        out
    }
}

/// The running stack: stand-ins in this process, pods as children. Dropping it kills the
/// pods (`kill_on_drop`); [`Stack::stop`] lets them drain first. The faults scenario
/// kills, stops and restarts pods one by one ([`Stack::kill_pod`], [`Stack::terminate_pod`],
/// [`Stack::start_pod`]) and switches the stand-ins' faults through [`Stack::gitlab`].
pub struct Stack {
    pub info: StackInfo,
    pub gitlab: GitlabStandin,
    _kube: KubeApi,
    /// Pod n (from 1) is `pods[n - 1]`; `None` while it is down.
    pods: Vec<Option<Child>>,
    launch: PodLaunch,
    fleet: Option<Fleet>,
}

/// What starting pod n again needs.
struct PodLaunch {
    kas: PathBuf,
    dir: PathBuf,
    ips: Vec<IpAddr>,
}

/// The configuration every agent of the stack reads: `AGENT_CONFIG`, and a comment line
/// when `revision` is given, so each revision is a new commit with the same meaning.
pub fn agent_config(revision: Option<&str>) -> String {
    match revision {
        Some(r) => format!("{AGENT_CONFIG}# revision {r}\n"),
        None => AGENT_CONFIG.to_owned(),
    }
}

fn pod_ip(base: Ipv4Addr, n: u8) -> anyhow::Result<IpAddr> {
    let ip = u32::from(base)
        .checked_add(u32::from(n) - 1)
        .context("pod address overflows")?;
    let ip = Ipv4Addr::from(ip);
    if !ip.is_loopback() {
        bail!("pod {n}'s address {ip} is not on loopback");
    }
    Ok(IpAddr::V4(ip))
}

fn kas_binary(args: &StackArgs) -> anyhow::Result<PathBuf> {
    let path = match &args.kas_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name("kas"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p kas) or give --kas-bin",
            path.display()
        );
    }
    Ok(path)
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A self-signed certificate for `localhost` and the pods' addresses.
pub fn self_signed(dir: &Path, ips: &[IpAddr]) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating a key pair")?;
    let mut names = vec!["localhost".to_owned()];
    names.extend(ips.iter().map(IpAddr::to_string));
    let params = rcgen::CertificateParams::new(names).context("certificate parameters")?;
    let cert = params.self_signed(&key).context("self-signing")?;
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    write(&cert_path, &cert.pem())?;
    write(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Agent `i` of the stack. One configuration file for all: kas reads it once per commit,
/// and the Gitaly stand-in (a git process per read) does not set the connect rate.
fn standin_agent(i: usize) -> StandinAgent {
    StandinAgent {
        token: format!("glagent-loadtest-{i}"),
        agent_id: i as i64 + 1,
        agent_name: AGENT_NAME.into(),
        project_id: 1,
        project_path: PROJECT_PATH.into(),
        ..StandinAgent::demo("")
    }
}

/// The GitLab stand-in with `n` agents sharing one configuration project, and a CI job
/// allowed to use all of them; writes the token files.
async fn gitlab(args: &StackArgs, dir: &Path) -> anyhow::Result<(GitlabStandin, PathBuf)> {
    let secret = SharedSecret::generate();
    let secret_file = dir.join("gitlab_kas_secret");
    write(&secret_file, &secret.to_base64())?;
    let addr = SocketAddr::new(IpAddr::V4(args.standin_ip), GITLAB_PORT);
    let gitlab = GitlabStandin::start(addr, secret, &dir.join("repos"))
        .await
        .with_context(|| format!("cannot start the GitLab stand-in on {addr}"))?;
    let (mut tokens, mut ci_tokens, mut allowed) = (String::new(), String::new(), Vec::new());
    for i in 0..args.agents.max(1) {
        let agent = standin_agent(i);
        if i == 0 {
            gitlab
                .write_agent_config(&agent, AGENT_CONFIG)
                .context("cannot commit the agents' configuration (is git installed?)")?;
        }
        let _ = writeln!(tokens, "{}", agent.token);
        let _ = writeln!(ci_tokens, "ci:{}:{JOB_TOKEN}", agent.agent_id);
        allowed.push(StandinAllowedAgent {
            agent_id: agent.agent_id,
            config_project_id: 1,
            access_as: serde_json::json!({"agent": {}}),
        });
        gitlab.add_agent(agent);
    }
    gitlab.add_ci_job(StandinCiJob {
        job_token: JOB_TOKEN.into(),
        job_id: 1,
        pipeline_id: 1,
        project_id: 1,
        group_ids: vec![],
        username: "loadtest".into(),
        environment: None,
        allowed_agents: allowed,
    });
    write(&dir.join("agent-tokens"), &tokens)?;
    write(&dir.join("ci-tokens"), &ci_tokens)?;
    Ok((gitlab, secret_file))
}

/// kas's TOML configuration for pod `ip`. GitLab's API rate limit is lifted: the stand-in
/// is not GitLab, and the benchmarks measure kas and the edge with thousands of distinct
/// tokens, not the pace real kas's 50/s per pod would impose on them.
fn pod_config(
    args: &StackArgs,
    ip: IpAddr,
    gitlab_url: &str,
    secret_file: &Path,
    tls: Option<&(PathBuf, PathBuf)>,
    fleet: Option<&Fleet>,
) -> String {
    let fleet = fleet.map_or(String::new(), |f| {
        format!(
            "[redis]\naddress = \"{}\"\n\n[private_api]\nlisten = \"{}\"\nauthentication_secret_file = {:?}\n\n",
            f.redis_addr,
            SocketAddr::new(ip, PRIVATE_API_PORT),
            f.private_secret_file.display().to_string()
        )
    });
    let tls = tls.map_or(String::new(), |(cert, key)| {
        format!(
            "certificate_file = {:?}\nkey_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    });
    format!(
        "[agent]\nlisten = \"{ip}:{AGENT_PORT}\"\n\n\
         [observability]\nlisten = \"{ip}:{OBSERVABILITY_PORT}\"\n\n\
         [gitlab]\naddress = {gitlab_url:?}\nauthentication_secret_file = {secret:?}\n\
         api_rate_limit = {{ refill_rate_per_second = 1000000.0, bucket_size = 1000000 }}\n\n\
         [reverse_tunnel]\nrouting_timeout = \"{routing}ms\"\nmax_tunnels_per_agent = {max}\n\
         max_tunnels_total = {total}\n\n\
         [kubernetes_api]\nlisten = \"{ip}:{K8S_PROXY_PORT}\"\nurl_path_prefix = {K8S_PROXY_PREFIX:?}\n{tls}\n\
         [shutdown]\nreadiness_delay = \"0s\"\ndrain_deadline = \"5s\"\n\n\
         {poll}{fleet}[log]\nlevel = {level:?}\n",
        secret = secret_file.display().to_string(),
        routing = args.routing_timeout.as_millis(),
        max = args.max_tunnels_per_agent,
        total = args.max_tunnels_per_agent.max(1_000_000),
        level = args.log_level,
        poll = args.config_poll_interval.map_or(String::new(), |d| format!(
            "[agent_configuration]\npoll_interval = \"{}ms\"\n\n",
            d.as_millis().max(1)
        )),
    )
}

/// What the pods share as a fleet: Redis, and the private API's secret.
struct Fleet {
    redis: Child,
    redis_addr: SocketAddr,
    private_secret_file: PathBuf,
}

/// Starts `redis-server` on `addr` (nothing saved, nothing appended) and waits (bounded)
/// until it answers PING.
async fn start_redis(addr: SocketAddr, dir: &Path) -> anyhow::Result<Child> {
    let log_path = dir.join("redis.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut child = Command::new("redis-server")
        .args([
            "--bind",
            &addr.ip().to_string(),
            "--port",
            &addr.port().to_string(),
        ])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start redis-server (apt-get install redis-server)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "redis-server on {addr} exited at start ({status}); see {}",
                log_path.display()
            );
        }
        if redis_pong(addr).await {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            bail!("redis-server on {addr} did not answer PING within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn redis_pong(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ping = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).await.ok()?;
        Some(&answer == b"+PONG\r\n")
    };
    tokio::time::timeout(Duration::from_secs(1), ping)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Waits (bounded) until `addr` answers `GET /readiness` with 200.
async fn wait_ready(addr: SocketAddr, child: &mut Child, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!("kas on {addr} exited at start ({status}); see its log");
        }
        if crate::probe::http_get_status(addr, "/readiness").await == Some(200) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("kas on {addr} not ready within {within:?}; see its log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Stack {
    pub async fn start(args: &StackArgs) -> anyhow::Result<Self> {
        if args.pods == 0 {
            bail!("--pods must be at least 1");
        }
        let kas = kas_binary(args)?;
        std::fs::create_dir_all(&args.dir)
            .with_context(|| format!("cannot create {}", args.dir.display()))?;
        let dir = std::path::absolute(&args.dir).context("the stack directory's path")?;
        let (gitlab, secret_file) = gitlab(args, &dir).await?;
        let kube_addr = SocketAddr::new(IpAddr::V4(args.standin_ip), KUBE_API_PORT);
        let kube = KubeApi::start(kube_addr)
            .await
            .with_context(|| format!("cannot start the Kubernetes API stand-in on {kube_addr}"))?;
        let ips = (1..=args.pods)
            .map(|n| pod_ip(args.ip_base, n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tls = if args.tls {
            Some(self_signed(&dir, &ips)?)
        } else {
            None
        };
        let fleet = if args.redis {
            let redis_addr = SocketAddr::new(IpAddr::V4(args.standin_ip), REDIS_PORT);
            let redis = start_redis(redis_addr, &dir).await?;
            let private_secret_file = dir.join("private_api_secret");
            write(&private_secret_file, &SharedSecret::generate().to_base64())?;
            Some(Fleet {
                redis,
                redis_addr,
                private_secret_file,
            })
        } else {
            None
        };
        let info = StackInfo {
            agent_targets: Vec::new(),
            proxy_urls: Vec::new(),
            kube_api_url: kube.url(),
            token_file: dir.join("agent-tokens"),
            ci_token_file: dir.join("ci-tokens"),
            ca_file: tls.as_ref().map(|(cert, _)| cert.clone()),
            kas_pids: Vec::new(),
            metrics_urls: Vec::new(),
        };
        let mut stack = Self {
            info,
            gitlab,
            _kube: kube,
            pods: (0..args.pods).map(|_| None).collect(),
            launch: PodLaunch {
                kas,
                dir: dir.clone(),
                ips: ips.clone(),
            },
            fleet,
        };
        let scheme = if args.tls { "https" } else { "http" };
        for (n, ip) in (1..=args.pods).zip(&ips) {
            write(
                &stack.config_path(n),
                &pod_config(
                    args,
                    *ip,
                    &stack.gitlab.url(),
                    &secret_file,
                    tls.as_ref(),
                    stack.fleet.as_ref(),
                ),
            )?;
            stack.start_pod(n).await?;
            let obs = SocketAddr::new(*ip, OBSERVABILITY_PORT);
            stack
                .info
                .agent_targets
                .push(format!("grpc://{ip}:{AGENT_PORT}"));
            stack.info.proxy_urls.push(format!(
                "{scheme}://{ip}:{K8S_PROXY_PORT}{K8S_PROXY_PREFIX}"
            ));
            stack
                .info
                .metrics_urls
                .push(format!("http://{obs}/metrics"));
        }
        stack.info.kas_pids = stack.pod_pids();
        write(&dir.join("stack.env"), &stack.info.env_text())?;
        Ok(stack)
    }

    /// Commits [`agent_config`] of `revision` as every agent's configuration (they share
    /// one file); returns the new commit id, which kas hands the agents at its next poll.
    pub fn commit_agent_config(&self, revision: &str) -> anyhow::Result<String> {
        let agent = standin_agent(0);
        let path = kas::sources::config_file_path(&agent.agent_name);
        let yaml = agent_config(Some(revision));
        self.gitlab
            .commit_files(&agent.project(), &[(&path, Some(yaml.as_bytes()))])
            .context("cannot commit the agents' configuration")
    }

    fn config_path(&self, n: u8) -> PathBuf {
        self.launch.dir.join(format!("kas-{n}.toml"))
    }

    /// Pod n's address (from 1).
    pub fn pod_addr(&self, n: u8) -> Option<IpAddr> {
        self.launch.ips.get(usize::from(n).checked_sub(1)?).copied()
    }

    /// How many pods the stack has (running or not).
    pub fn pod_count(&self) -> u8 {
        self.pods.len() as u8
    }

    /// The running pods' process ids, in pod order.
    pub fn pod_pids(&self) -> Vec<u32> {
        self.pods.iter().flatten().filter_map(Child::id).collect()
    }

    fn slot(&mut self, n: u8) -> anyhow::Result<&mut Option<Child>> {
        let count = self.pods.len();
        usize::from(n)
            .checked_sub(1)
            .and_then(|i| self.pods.get_mut(i))
            .with_context(|| format!("no pod {n} (the stack has {count})"))
    }

    /// Starts pod n (from 1) with its configuration, its log appended to, and waits
    /// (bounded) until it is ready. Refused while it runs.
    pub async fn start_pod(&mut self, n: u8) -> anyhow::Result<()> {
        let ip = self.pod_addr(n).with_context(|| format!("no pod {n}"))?;
        let config_path = self.config_path(n);
        let log_path = self.launch.dir.join(format!("kas-{n}.log"));
        let kas = self.launch.kas.clone();
        if self.slot(n)?.is_some() {
            bail!("pod {n} is running");
        }
        let mut command = Command::new(&kas);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--pod-name")
            .arg(format!("kas-{n}"));
        log_to(&mut command, &log_path)?;
        let mut child = command
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", kas.display()))?;
        let obs = SocketAddr::new(ip, OBSERVABILITY_PORT);
        wait_ready(obs, &mut child, Duration::from_secs(30)).await?;
        *self.slot(n)? = Some(child);
        Ok(())
    }

    /// `kill -9` of pod n: gone at once, nothing drained. Waits for the process.
    pub async fn kill_pod(&mut self, n: u8) -> anyhow::Result<()> {
        if let Some(mut child) = self.slot(n)?.take() {
            child
                .kill()
                .await
                .with_context(|| format!("kill -9 of pod {n}"))?;
        }
        Ok(())
    }

    /// SIGTERM to pod n, as Kubernetes ends a pod: it drains and exits; waits up to
    /// `within`, then kills it. Returns whether it exited by itself.
    pub async fn terminate_pod(&mut self, n: u8, within: Duration) -> anyhow::Result<bool> {
        let Some(mut child) = self.slot(n)?.take() else {
            return Ok(true);
        };
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) with the pid of a child we started and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(within, child.wait()).await.is_ok() {
            return Ok(true);
        }
        let _ = child.kill().await;
        Ok(false)
    }

    /// SIGTERM to every pod, then waits (bounded) for them; the rest are killed.
    pub async fn stop(mut self) {
        for child in self.pods.iter().flatten() {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) with a pid of a child we started and still own.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
        }
        for child in self.pods.iter_mut().flatten() {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Some(mut fleet) = self.fleet.take() {
            let _ = fleet.redis.kill().await;
        }
    }
}

/// Runs the stack until SIGINT or SIGTERM.
pub async fn run(args: StackArgs) -> anyhow::Result<()> {
    let stack = Stack::start(&args).await?;
    let env = std::path::absolute(args.dir.join("stack.env")).unwrap_or(args.dir.join("stack.env"));
    println!(
        "kas-loadtest-stack ready ({} pods); Ctrl-C stops it",
        args.pods
    );
    print!("{}", stack.info.env_text());
    println!("wrote {}", env.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stack.stop().await;
    Ok(())
}

/// Sends a process's stdout and stderr to the end of `path` (created if missing), so a
/// restarted process's lines follow its predecessor's.
pub(crate) fn log_to(command: &mut Command, path: &Path) -> anyhow::Result<()> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let err = log.try_clone().context("log file handle")?;
    command.stdout(log).stderr(err);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pods' configuration is one kas accepts, with GitLab's API rate limit lifted.
    #[test]
    fn the_pod_configuration_is_valid_kas_toml() {
        let args = StackArgs::parse_from(["kas-loadtest-stack"]);
        let text = pod_config(
            &args,
            IpAddr::from([127, 0, 7, 1]),
            "http://127.0.7.200:8180",
            Path::new("/secret"),
            None,
            None,
        );
        let config = kas::Config::from_toml(&text).expect("kas reads it");
        config.validate().expect("kas accepts it");
        assert_eq!(config.gitlab.api_rate_limit.bucket_size, 1_000_000);
    }
}
