//! What the faults scenario runs against and how each fault is made: the stack
//! (`kas-loadtest-stack`'s [`Stack`]: GitLab, Gitaly and Kubernetes API stand-ins in this
//! process, kas pods as child processes) and [`EdgeProcess`] in front of it, all on one
//! loopback /24 of their own.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use super::edge::{write_atomically, EdgeProcess};
use super::timeline::Watched;
use crate::cli::Args;
use crate::stack::{Stack, StackArgs};

/// How long a pod may drain after SIGTERM before it is killed (kas's drain deadline in
/// the stack's configuration is 5 s).
const POD_TERMINATION_GRACE: Duration = Duration::from_secs(15);
/// How often kas polls the configuration branch: a commit reaches every agent within
/// this (plus the read), unless Gitaly is down.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The stand-ins' fault switches.
mod switches {
    use std::time::Duration;

    use kas::dev::gitlab_standin::GitlabFault;

    use crate::stack::Stack;

    /// GitLab answers 503 (`true`) or normally again.
    pub fn gitlab_unavailable(stack: &Stack, on: bool) {
        stack.gitlab.set_fault(if on {
            GitlabFault::Unavailable
        } else {
            GitlabFault::None
        });
    }

    /// GitLab answers slowly, every call taking `delay`; `None`: normally again.
    pub fn gitlab_slow(stack: &Stack, delay: Option<Duration>) {
        stack
            .gitlab
            .set_fault(delay.map_or(GitlabFault::None, GitlabFault::Slow));
    }

    /// The Gitaly stand-in stops (connections refused, open ones cut) or serves again.
    pub fn gitaly_down(stack: &Stack, on: bool) {
        stack.gitlab.gitaly().set_down(on);
    }
}

pub use switches::{gitaly_down, gitlab_slow, gitlab_unavailable};

/// The stack and the edge, and the processes the timeline samples.
pub struct Rig {
    pub stack: Stack,
    pub edge: EdgeProcess,
    pub watched: Watched,
    /// Pod the next kill hits (round-robin from 1).
    next_kill: u8,
    blocklist_original: String,
}

/// Address `host` of `base`'s /24.
fn host(base: Ipv4Addr, host: u8) -> Ipv4Addr {
    let [a, b, c, _] = base.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// A binary next to this program, unless given.
fn sibling(given: Option<&PathBuf>, name: &str) -> anyhow::Result<PathBuf> {
    match given {
        Some(p) => Ok(p.clone()),
        None => Ok(std::env::current_exe()
            .context("cannot find this program's path")?
            .with_file_name(name)),
    }
}

impl Rig {
    /// Starts the stack (`--kas-pods` pods as a fleet — Redis and the private API, so a
    /// Kubernetes API request the edge sends to any pod finds the agent's tunnels on
    /// another — and one GitLab agent all agents share) and the edge in front; both ready.
    pub async fn start(args: &Args, watched: Watched) -> anyhow::Result<Self> {
        let base = args.faults_ip_base;
        if !base.is_loopback() || u16::from(base.octets()[3]) + u16::from(args.kas_pods) > 200 {
            bail!("--faults-ip-base {base}: pods need loopback addresses below .200 of its /24");
        }
        let dir = std::path::absolute(&args.faults_dir).context("the faults directory's path")?;
        let stack_dir = dir.join("stack");
        std::fs::create_dir_all(&stack_dir)
            .with_context(|| format!("cannot create {}", stack_dir.display()))?;
        let stack_args = StackArgs {
            dir: stack_dir,
            pods: args.kas_pods,
            agents: 1,
            ip_base: base,
            standin_ip: host(base, 200),
            kas_bin: Some(sibling(args.kas_bin.as_ref(), "kas")?),
            tls: false,
            routing_timeout: Duration::from_secs(5),
            max_tunnels_per_agent: 1_000_000,
            log_level: "warn".into(),
            config_poll_interval: Some(CONFIG_POLL_INTERVAL),
            redis: true,
        };
        let stack = Stack::start(&stack_args).await?;
        watched.set_kas(stack.pod_pids());
        let pods: Vec<IpAddr> = (1..=stack.pod_count())
            .filter_map(|n| stack.pod_addr(n))
            .collect();
        let edge_bin = sibling(args.edge_bin.as_ref(), "kas-edge")?;
        let edge = EdgeProcess::start(&edge_bin, &dir, IpAddr::V4(host(base, 250)), &pods).await?;
        watched.set_edge(edge.pid().into_iter().collect());
        let blocklist_original = std::fs::read_to_string(&edge.blocklist).unwrap_or_default();
        Ok(Self {
            stack,
            edge,
            watched,
            next_kill: 1,
            blocklist_original,
        })
    }

    fn pods_changed(&self) {
        self.watched.set_kas(self.stack.pod_pids());
    }

    fn edge_changed(&self) {
        self.watched.set_edge(self.edge.pid().into_iter().collect());
    }

    /// `kill -9` of the next pod, started again at once (as a kubelet restarts it);
    /// returns when the edge sees every pod healthy again.
    pub async fn kill_pod(&mut self) -> anyhow::Result<String> {
        let n = self.next_kill;
        self.next_kill = n % self.stack.pod_count() + 1;
        let pid = self.stack.pod_pids().get(usize::from(n) - 1).copied();
        self.stack.kill_pod(n).await?;
        self.pods_changed();
        self.stack.start_pod(n).await?;
        self.pods_changed();
        self.edge
            .wait_pods_healthy(usize::from(self.stack.pod_count()))
            .await?;
        Ok(format!(
            "kill -9 of kas-{n} (pid {}), started again",
            pid.map_or("?".into(), |p| p.to_string())
        ))
    }

    /// A Deployment rollout: SIGTERM to each pod in turn; the next only once its
    /// replacement is ready and healthy at the edge.
    pub async fn rollout(&mut self) -> anyhow::Result<String> {
        let pods = self.stack.pod_count();
        let mut drained = 0;
        for n in 1..=pods {
            if self.stack.terminate_pod(n, POD_TERMINATION_GRACE).await? {
                drained += 1;
            }
            self.pods_changed();
            self.stack.start_pod(n).await?;
            self.pods_changed();
            self.edge.wait_pods_healthy(usize::from(pods)).await?;
        }
        Ok(format!(
            "SIGTERM to kas-1..{pods} one at a time, each replaced and healthy at the edge before \
             the next ({drained}/{pods} exited within {POD_TERMINATION_GRACE:?})"
        ))
    }

    /// Blocklist edit `k`: entries in documentation networks (and a loopback range no
    /// agent uses), so nothing of the fleet matches.
    pub fn edit_blocklist(&self, k: u64) -> anyhow::Result<()> {
        let mut text = self.blocklist_original.clone();
        text.push_str(&format!(
            "# kas-loadtest faults: edit {k}\n192.0.2.{}\n198.51.100.0/24\n203.0.113.{}/32\n127.255.{}.0/24\n",
            k % 250 + 1,
            (k * 7) % 250 + 1,
            k % 200 + 50,
        ));
        write_atomically(&self.edge.blocklist, &text)
    }

    /// Puts the blocklist back as the edge started with it.
    pub fn restore_blocklist(&self) -> anyhow::Result<()> {
        write_atomically(&self.edge.blocklist, &self.blocklist_original)
    }

    /// New key and certificate files; returns when the edge reloaded them.
    pub async fn rotate_certificate(&self) -> anyhow::Result<String> {
        let took = self.edge.rotate_certificate().await?;
        Ok(format!(
            "new key and certificate (same CA) over the files; reloaded after {} ms",
            took.as_millis()
        ))
    }

    /// The edge restarted (graceful upgrade when it has one).
    pub async fn restart_edge(&mut self) -> anyhow::Result<String> {
        let old = self.edge.pid();
        let how = self.edge.restart(&self.watched).await;
        self.edge_changed();
        let how = how?;
        Ok(format!(
            "{how}: pid {} → {}",
            old.map_or("?".into(), |p| p.to_string()),
            self.edge.pid().map_or("?".into(), |p| p.to_string())
        ))
    }

    /// Stops the edge, then the pods.
    pub async fn stop(self) {
        let _ = self.restore_blocklist();
        self.edge.stop().await;
        self.stack.stop().await;
    }
}
