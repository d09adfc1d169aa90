//! The load generator's tests on kas-testkit: a GitLab stand-in and kas pods on their own
//! loopback addresses (each on its own runtime, so a test can kill one), and the
//! `kas-edge` binary in front when it has been built. The token, the agents' source range
//! and the command lines are this crate's.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kas::dev::gitlab_standin::GitlabStandin;
use kas::Config;
use kas_testkit::edge::{EdgeOptions, EdgeStdout};
use kas_testkit::net::{next_subnet, Subnet};
use kas_testkit::pods::{Cluster, Pod};
use kas_testkit::Profile;

pub use kas_testkit::net::ip;

pub const TOKEN: &str = "glagent-loadtest-token";

pub struct LoadtestTests;

impl Profile for LoadtestTests {
    const TOKEN: &'static str = TOKEN;
    const AGENT_LOG_LEVEL: &'static str = "info";

    fn pod_config(config: &mut Config) {
        config.agent_configuration.poll_interval = Duration::from_secs(1);
    }
}

pub type Edge = kas_testkit::edge::Edge<LoadtestTests>;

/// Pods on a subnet of their own; the agents' source addresses come from a second one.
pub struct Stack {
    pub subnet: Subnet,
    pub gitlab: GitlabStandin,
    pub pods: Vec<Pod>,
    pub dir: tempfile::TempDir,
    sources: Subnet,
}

impl Stack {
    pub async fn start(pods: u8) -> Self {
        Self::start_with(pods, |_| {}).await
    }

    /// Like [`Stack::start`], each pod's configuration changed by `tweak`.
    pub async fn start_with(pods: u8, tweak: impl Fn(&mut Config)) -> Self {
        let cluster = Cluster::<LoadtestTests>::start_with(pods, tweak).await;
        Self {
            subnet: cluster.subnet,
            gitlab: cluster.gitlab,
            pods: cluster.pods,
            dir: cluster.dir,
            sources: next_subnet(),
        }
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
        ip(self.sources, 1).to_string()
    }

    /// [`Stack::args`] aimed at both pods, the first over websocket and the second over
    /// gRPC, with half the agents on each transport.
    pub fn mixed_args(&self, scenario: &str, extra: &[&str]) -> kas_loadtest::Args {
        let (ws, grpc) = (self.pod_url(0, true), self.pod_url(1, false));
        let mut argv = vec!["--target", &ws, "--target", &grpc, "--ws-fraction", "0.5"];
        argv.extend_from_slice(extra);
        self.args(scenario, &argv)
    }

    /// Common options: this stack's token and source range, quick timings.
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

    /// The `kas-edge` binary at `binary` on `<subnet>.250` in front of every pod, once it
    /// reports all of them healthy.
    pub async fn start_edge(&self, binary: &Path) -> Edge {
        self.start_edge_with(binary, "").await
    }

    /// [`Stack::start_edge`] with `extra` TOML appended to the edge's configuration.
    pub async fn start_edge_with(&self, binary: &Path, extra: &str) -> Edge {
        let options = EdgeOptions {
            rust_log: "warn",
            stdout: EdgeStdout::Null,
            tls_hosts: &["localhost"],
            ready_within: Duration::from_secs(15),
            ..EdgeOptions::new(binary)
        };
        let endpoints: Vec<SocketAddr> = self.pods.iter().map(|p| p.addr).collect();
        let edge = Edge::launch(&options, ip(self.subnet, 250), &endpoints, extra).await;
        edge.wait_healthy(self.pods.len()).await;
        edge
    }
}

/// The `kas-edge` binary: $KAS_EDGE_BIN, next to this test's target directory, or the
/// workspace's target/debug. `None` when it has not been built.
pub fn find_edge_binary() -> Option<PathBuf> {
    find_binary("kas-edge", "KAS_EDGE_BIN")
}

/// The `kas` binary: $KAS_BIN, next to this test's target directory, or the workspace's
/// target/debug. `None` when it has not been built.
pub fn find_kas_binary() -> Option<PathBuf> {
    find_binary("kas", "KAS_BIN")
}

fn find_binary(name: &str, env: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env).map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test> → target/<profile>/<name>
        if let Some(profile_dir) = exe.parent().and_then(|d| d.parent()) {
            candidates.push(profile_dir.join(name));
        }
    }
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target/debug").join(name));
    candidates.push(workspace.join("target/release").join(name));
    candidates.into_iter().find(|p| p.exists())
}
