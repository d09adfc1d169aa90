//! The agent configuration read through Gitaly, over real sockets: kas's Gitaly client
//! against HGitaly (a third-party Gitaly server) and against our git-backed stand-in, the
//! v2 token check, the REST alternative with an API token, token revocation on long
//! streams, and one shared poller for many streams.

mod hgitaly;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use kas::config::ConfigurationSourceKind;
use kas::dev::gitaly_standin::{commit_all, GitalyStandin, STORAGE};
use kas::dev::gitlab_standin::{GitlabStandin, StandinAgent};
use kas::gitlab::{GitalyInfo, GitalyLocation, GitalyRepository, SharedSecret};
use kas::sources::gitaly::{GitalyError, GitalyLimits, GitalyPool};
use kas::{BoundKas, Config};
use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use kas_proto::agentcfg::LogLevelEnum;

use hgitaly::HGitaly;

const TOKEN: &str = "glagent-gitaly-test";
const STEP: Duration = Duration::from_secs(15);

fn loopback0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A GitLab stand-in (with its Gitaly stand-in) and one kas in front, on loopback.
struct Stack {
    gitlab: GitlabStandin,
    agent: StandinAgent,
    agent_addr: SocketAddr,
    obs_addr: SocketAddr,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

impl Stack {
    /// `prepare` may add agents, commits or another Gitaly before kas starts; `tweak`
    /// adjusts kas's configuration (it sees the stack's directory for token files).
    async fn start(
        prepare: impl FnOnce(&GitlabStandin, &StandinAgent),
        tweak: impl FnOnce(&mut Config, &GitlabStandin, &std::path::Path),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = SharedSecret::generate();
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, secret.to_base64()).unwrap();
        let gitlab = GitlabStandin::start(loopback0(), secret, &dir.path().join("repos"))
            .await
            .unwrap();
        let agent = StandinAgent::demo(TOKEN);
        gitlab.add_agent(agent.clone());
        prepare(&gitlab, &agent);
        let mut config = Config::default();
        config.agent.listen = loopback0();
        config.observability.listen = loopback0();
        config.gitlab.address = gitlab.url();
        config.gitlab.authentication_secret_file = secret_file;
        config.gitlab.api_timeout = Duration::from_secs(3);
        config.agent_configuration.poll_interval = Duration::from_millis(100);
        config.shutdown.readiness_delay = Duration::ZERO;
        config.shutdown.drain_deadline = Duration::from_secs(1);
        tweak(&mut config, &gitlab, dir.path());
        let kas = BoundKas::bind(config, "kas-gitaly-test").await.unwrap();
        let (agent_addr, obs_addr) = (kas.agent_addr(), kas.observability_addr());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(kas.run(async {
            let _ = rx.await;
        }));
        Self {
            gitlab,
            agent,
            agent_addr,
            obs_addr,
            dir,
            stop: Some(tx),
            task,
        }
    }

    async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.agent_addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn stream(&self, token: &str, commit: &str) -> tonic::Streaming<ConfigurationResponse> {
        config_stream(self.channel().await, token, commit)
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.obs_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `kas_gitaly_requests_total` summed over outcomes for one RPC.
    async fn gitaly_requests(&self, rpc: &str) -> u64 {
        count_metric(
            &self.metrics().await,
            "kas_gitaly_requests_total",
            &format!("rpc=\"{rpc}\""),
        )
    }
}

fn count_metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn config_stream(
    channel: Channel,
    token: &str,
    commit: &str,
) -> Result<tonic::Streaming<ConfigurationResponse>, tonic::Status> {
    let mut request = tonic::Request::new(ConfigurationRequest {
        commit_id: commit.into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    Ok(AgentConfigurationClient::new(channel)
        .get_configuration(request)
        .await?
        .into_inner())
}

async fn next(stream: &mut tonic::Streaming<ConfigurationResponse>) -> ConfigurationResponse {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("a message in time")
        .expect("stream ok")
        .expect("stream open")
}

async fn next_error(stream: &mut tonic::Streaming<ConfigurationResponse>) -> tonic::Status {
    match tokio::time::timeout(STEP, stream.message()).await {
        Ok(Err(status)) => status,
        other => panic!("expected an error status, got {other:?}"),
    }
}

fn level(response: &ConfigurationResponse) -> Option<i32> {
    Some(
        response
            .configuration
            .as_ref()?
            .observability
            .as_ref()?
            .logging
            .as_ref()?
            .level,
    )
}

const DEBUG: &[u8] = b"observability:\n  logging:\n    level: debug\n";
const WARN: &[u8] = b"observability:\n  logging:\n    level: warn\n";
const CONFIG: &str = ".gitlab/agents/demo/config.yaml";

// ---- against HGitaly ------------------------------------------------------------------

#[tokio::test]
async fn the_gitaly_client_reads_branches_files_and_trees_from_hgitaly() {
    let hg = tokio::task::spawn_blocking(HGitaly::start).await.unwrap();
    let repo = hg.create_repo("demo/project.hg");
    let big = vec![b'#'; 200];
    let head = hg.commit(
        &repo,
        &[
            (CONFIG, Some(DEBUG)),
            ("manifests/app/deploy.yaml", Some(b"kind: Deployment\n")),
            ("big.txt", Some(&big)),
        ],
    );
    let metrics = prometheus::IntCounterVec::new(
        prometheus::Opts::new("kas_gitaly_requests_total", "test"),
        &["rpc", "outcome"],
    )
    .unwrap();
    let pool = GitalyPool::new(GitalyLimits::default(), metrics.clone());
    let location = GitalyLocation {
        info: GitalyInfo {
            address: hg.address(),
            token: "HGitaly ignores tokens".into(),
            features: [("gitaly-feature-test".to_string(), "true".to_string())].into(),
        },
        repository: GitalyRepository {
            storage_name: "default".into(),
            relative_path: "demo/project.hg".into(),
            gl_project_path: "demo/project".into(),
            ..Default::default()
        },
    };

    assert_eq!(
        pool.find_branch(&location, "branch/default").await.unwrap(),
        Some(head.clone())
    );
    assert_eq!(
        pool.find_branch(&location, "branch/nope").await.unwrap(),
        None
    );
    let file = pool
        .tree_entry(&location, &head, CONFIG, 128 * 1024)
        .await
        .unwrap();
    assert_eq!(file.as_deref(), Some(DEBUG));
    assert_eq!(
        pool.tree_entry(&location, &head, ".gitlab/agents/x/config.yaml", 1024)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        pool.tree_entry(&location, &head, "big.txt", 100)
            .await
            .unwrap_err(),
        GitalyError::FileTooBig { limit: 100 }
    );
    let entries = pool
        .get_tree_entries(&location, &head, "manifests", true, 100)
        .await
        .unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.path == "manifests/app/deploy.yaml" && e.is_blob),
        "{entries:?}"
    );
    assert!(pool
        .get_tree_entries(&location, &head, "nowhere", true, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(metrics.with_label_values(&["FindBranch", "ok"]).get(), 2);
    assert_eq!(
        pool.channel_count(),
        1,
        "one pooled channel per Gitaly address"
    );
}

#[tokio::test]
async fn an_agent_gets_its_configuration_from_hgitaly_and_then_the_change() {
    let hg = tokio::task::spawn_blocking(HGitaly::start).await.unwrap();
    let repo = hg.create_repo("demo/project.hg");
    let first_commit = hg.commit(&repo, &[(CONFIG, Some(DEBUG))]);
    let address = hg.address();
    let kas = Stack::start(
        |gitlab, _| {
            gitlab.set_gitaly(&address, "unused by HGitaly");
            gitlab.add_agent(StandinAgent {
                relative_path: Some("demo/project.hg".into()),
                default_branch: "branch/default".into(),
                ..StandinAgent::demo("glagent-hg")
            });
        },
        |_, _, _| {},
    )
    .await;
    let mut stream = kas.stream("glagent-hg", "").await;
    let first = next(&mut stream).await;
    assert_eq!(first.commit_id, first_commit);
    assert_eq!(level(&first), Some(LogLevelEnum::Debug as i32));
    assert_eq!(
        first.configuration.as_ref().unwrap().project_path,
        kas.agent.project_path
    );

    let second_commit = hg.commit(&repo, &[(CONFIG, Some(WARN))]);
    let second = next(&mut stream).await;
    assert_eq!(second.commit_id, second_commit);
    assert_eq!(level(&second), Some(LogLevelEnum::Warn as i32));
    assert!(kas.gitaly_requests("TreeEntry").await >= 2);
}

// ---- against our git-backed stand-in --------------------------------------------------

#[tokio::test]
async fn an_agent_gets_its_configuration_from_the_git_standin_and_then_the_change() {
    let kas = Stack::start(
        |gitlab, agent| {
            gitlab
                .write_agent_config(agent, std::str::from_utf8(DEBUG).unwrap())
                .unwrap();
        },
        |_, _, _| {},
    )
    .await;
    let mut stream = kas.stream(TOKEN, "").await;
    let first = next(&mut stream).await;
    assert_eq!(level(&first), Some(LogLevelEnum::Debug as i32));
    // The commit id is the git commit: the stand-in reads the repository, not a digest.
    let repo = kas.dir.path().join("repos").join(&kas.agent.project_path);
    let git_head = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .unwrap();
    assert_eq!(
        first.commit_id,
        String::from_utf8_lossy(&git_head.stdout).trim()
    );

    // A plain `git commit` in the repository is what agents see next.
    std::fs::write(repo.join(CONFIG), WARN).unwrap();
    let head = commit_all(&repo, "main", "warn").unwrap();
    let second = next(&mut stream).await;
    assert_eq!(second.commit_id, head);
    assert_eq!(level(&second), Some(LogLevelEnum::Warn as i32));
    assert!(kas.gitaly_requests("FindBranch").await >= 2);
    assert!(kas.gitlab.gitaly().calls("TreeEntry") >= 2);
}

#[tokio::test]
async fn missing_null_invalid_and_oversized_files_and_an_empty_repository() {
    let kas = Stack::start(|_, _| {}, |_, _, _| {}).await;
    // Empty repository (no commit yet): nothing is sent, polling continues.
    let repo = kas.dir.path().join("repos").join(&kas.agent.project_path);
    std::fs::create_dir_all(&repo).unwrap();
    let init = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["init", "-q", "--initial-branch", "main"])
        .status()
        .unwrap();
    assert!(init.success());
    let mut stream = kas.stream(TOKEN, "").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(800), stream.message())
            .await
            .is_err()
    );

    // First commit without the agent's file: an empty configuration.
    let project = kas.agent.project();
    kas.gitlab
        .commit_files(&project, &[("README.md", Some(b"hi\n"))])
        .unwrap();
    let empty = next(&mut stream).await;
    assert!(empty
        .configuration
        .as_ref()
        .unwrap()
        .observability
        .is_none());
    assert_eq!(
        empty.configuration.as_ref().unwrap().agent_id,
        kas.agent.agent_id
    );

    // YAML null: empty too.
    kas.gitlab
        .commit_files(&project, &[(CONFIG, Some(b"null\n"))])
        .unwrap();
    let null = next(&mut stream).await;
    assert_ne!(null.commit_id, empty.commit_id);
    assert!(null.configuration.as_ref().unwrap().observability.is_none());

    // Invalid: FAILED_PRECONDITION with the reason.
    kas.gitlab
        .commit_files(
            &project,
            &[(
                CONFIG,
                Some(b"observability:\n  logging:\n    level: loud\n"),
            )],
        )
        .unwrap();
    let status = next_error(&mut stream).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("loud"), "{status:?}");

    // Over 128 KiB: FAILED_PRECONDITION naming the limit (Gitaly refuses it by max_size).
    let big = vec![b'#'; 128 * 1024 + 1];
    kas.gitlab
        .commit_files(&project, &[(CONFIG, Some(&big))])
        .unwrap();
    let status = next_error(&mut kas.stream(TOKEN, "").await).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("131072"), "{status:?}");
}

#[tokio::test]
async fn gitaly_checks_the_v2_token_kas_signs() {
    let root = tempfile::tempdir().unwrap();
    let head = commit_all(&root.path().join("g/p"), "main", "first").unwrap();
    let gitaly = GitalyStandin::start(loopback0(), root.path(), Some(b"s3cret".to_vec()))
        .await
        .unwrap();
    let metrics = prometheus::IntCounterVec::new(
        prometheus::Opts::new("kas_gitaly_requests_total", "test"),
        &["rpc", "outcome"],
    )
    .unwrap();
    let pool = GitalyPool::new(GitalyLimits::default(), metrics.clone());
    let location = |token: &str| GitalyLocation {
        info: GitalyInfo {
            address: gitaly.address(),
            token: token.into(),
            features: Default::default(),
        },
        repository: GitalyRepository {
            storage_name: STORAGE.into(),
            relative_path: "g/p".into(),
            ..Default::default()
        },
    };
    assert_eq!(
        pool.find_branch(&location("s3cret"), "main").await.unwrap(),
        Some(head)
    );
    match pool
        .find_branch(&location("wrong"), "main")
        .await
        .unwrap_err()
    {
        GitalyError::Denied { code, .. } => assert_eq!(code, Code::PermissionDenied),
        other => panic!("expected PERMISSION_DENIED, got {other}"),
    }
    assert_eq!(
        metrics.with_label_values(&["FindBranch", "denied"]).get(),
        1
    );

    // No token at all: UNAUTHENTICATED (a raw client, since kas always signs).
    let channel = Endpoint::from_shared(format!("http://{}", gitaly.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = kas_proto::gitaly::ref_service_client::RefServiceClient::new(channel)
        .find_branch(kas_proto::gitaly::FindBranchRequest {
            repository: Some(location("").repository.to_proto()),
            name: b"main".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

// ---- the REST alternative -------------------------------------------------------------

#[tokio::test]
async fn the_rest_source_works_with_an_api_token_and_the_agent_token_is_refused_there() {
    let kas = Stack::start(
        |gitlab, agent| {
            gitlab
                .write_agent_config(agent, std::str::from_utf8(DEBUG).unwrap())
                .unwrap();
        },
        |config, gitlab, dir| {
            let token_file = dir.join("api-token");
            std::fs::write(&token_file, gitlab.api_token()).unwrap();
            config.agent_configuration.source = ConfigurationSourceKind::GitlabApi;
            config.agent_configuration.api_token_file = Some(token_file);
        },
    )
    .await;
    let first = next(&mut kas.stream(TOKEN, "").await).await;
    assert_eq!(level(&first), Some(LogLevelEnum::Debug as i32));
    assert_eq!(kas.gitaly_requests("FindBranch").await, 0);

    // GitLab (and the stand-in) refuse an agent token on the repository API.
    let status = reqwest::Client::new()
        .get(format!(
            "{}/api/v4/projects/1/repository/branches/main",
            kas.gitlab.url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 401);
}

// ---- fleet scale ----------------------------------------------------------------------

#[tokio::test]
async fn a_revoked_token_ends_its_long_stream_within_the_cache_ttl() {
    let kas = Stack::start(
        |gitlab, agent| {
            gitlab
                .write_agent_config(agent, std::str::from_utf8(DEBUG).unwrap())
                .unwrap();
        },
        |config, _, _| config.gitlab.auth_cache_ttl = Duration::from_secs(1),
    )
    .await;
    let mut stream = kas.stream(TOKEN, "").await;
    next(&mut stream).await;
    let revoked_at = std::time::Instant::now();
    kas.gitlab.remove_agent(TOKEN);
    let status = next_error(&mut stream).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // TTL 1 s with ±10 % jitter, plus the GitLab round trip.
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        revoked_at.elapsed()
    );
}

#[tokio::test]
async fn many_streams_on_one_project_share_one_gitaly_poller() {
    const STREAMS: usize = 60;
    let interval = Duration::from_millis(250);
    let kas = Arc::new(
        Stack::start(
            |gitlab, agent| {
                gitlab
                    .write_agent_config(agent, std::str::from_utf8(DEBUG).unwrap())
                    .unwrap();
            },
            |config, _, _| config.agent_configuration.poll_interval = interval,
        )
        .await,
    );
    let channels = [kas.channel().await, kas.channel().await];
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut s = config_stream(channels[i % 2].clone(), TOKEN, "")
            .await
            .unwrap();
        next(&mut s).await;
        streams.push(s);
    }
    let before = kas.gitaly_requests("FindBranch").await;
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let polls = kas.gitaly_requests("FindBranch").await - before;
    // One poller: window / interval ≈ 12 polls (jitter ±10 %), whatever the number of
    // streams; one poller per stream would be ~720.
    let expected = (window.as_millis() / interval.as_millis()) as u64;
    assert!(
        polls <= expected + 3,
        "{polls} FindBranch polls in {window:?} for {STREAMS} streams"
    );
    assert!(
        polls >= expected / 2,
        "{polls} polls: the poller is not running"
    );

    // The first configuration was read from Gitaly once for all 60 streams.
    assert_eq!(kas.gitaly_requests("TreeEntry").await, 1);

    // A change reaches every stream with one TreeEntry for all of them: the file at the
    // new commit is read once and shared.
    kas.gitlab
        .write_agent_config(&kas.agent, std::str::from_utf8(WARN).unwrap())
        .unwrap();
    for s in &mut streams {
        assert_eq!(level(&next(s).await), Some(LogLevelEnum::Warn as i32));
    }
    assert_eq!(kas.gitaly_requests("TreeEntry").await, 2);
    let metrics = kas.metrics().await;
    let shared = count_metric(
        &metrics,
        "kas_agent_configuration_file_lookups_total",
        "cached",
    ) + count_metric(
        &metrics,
        "kas_agent_configuration_file_lookups_total",
        "coalesced",
    );
    assert_eq!(shared, 2 * STREAMS as u64 - 2, "{metrics}");
}

#[tokio::test]
async fn a_reconnect_storm_of_one_token_makes_one_gitlab_lookup() {
    let kas = Stack::start(
        |gitlab, agent| {
            gitlab
                .write_agent_config(agent, std::str::from_utf8(DEBUG).unwrap())
                .unwrap();
        },
        |_, _, _| {},
    )
    .await;
    let channel = kas.channel().await;
    let opened =
        futures_util::future::join_all((0..40).map(|_| config_stream(channel.clone(), TOKEN, "")))
            .await;
    let mut streams: Vec<_> = opened.into_iter().map(Result::unwrap).collect();
    for s in &mut streams {
        next(s).await;
    }
    // 40 concurrent authentications, one agent_info request: the rest waited for it
    // (single flight) or found it cached.
    assert_eq!(kas.gitlab.agent_info_requests(), 1);
    let metrics = kas.metrics().await;
    let coalesced = count_metric(&metrics, "kas_auth_results_total", "coalesced");
    let cached = count_metric(&metrics, "kas_auth_results_total", "cached_ok");
    assert_eq!(coalesced + cached, 39, "{metrics}");
}
