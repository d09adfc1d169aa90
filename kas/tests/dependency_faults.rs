//! kas while GitLab or Gitaly fails, over real sockets with the stand-ins playing the
//! outage (`GitlabStandin::set_fault`, `GitalyStandin::set_down`). What is decided (README,
//! "When GitLab or Gitaly is down"):
//! - GitLab down (503, unreachable, timeout): connected agents keep their streams (a
//!   re-check of their token that fails for GitLab's reasons is deferred, only GitLab's
//!   401/403/404 ends a stream); tokens checked before stay good until the cache TTL; new
//!   agents get UNAVAILABLE, never UNAUTHENTICATED.
//! - GitLab slow: every call is bounded by `gitlab.api_timeout`, and one token costs one
//!   call in flight however many of its connections wait.
//! - Gitaly down: configuration and GitOps streams stay open with what the agent has, and
//!   the commit made meanwhile arrives once Gitaly is back.

mod common;

use std::time::Duration;

use futures_util::future::join_all;
use tonic::transport::Channel;
use tonic::Code;

use common::{eventually, with_token, Harness, TOKEN};
use kas::dev::gitlab_standin::{GitlabFault, StandinAgent, StandinProject};
use kas::sources::config_file_path;
use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::{ConfigurationRequest, ConfigurationResponse};
use kas_proto::agent_registrar::agent_registrar_client::AgentRegistrarClient;
use kas_proto::agent_registrar::RegisterRequest;
use kas_proto::gitops::git_ref_cf::Ref;
use kas_proto::gitops::gitops_client::GitopsClient;
use kas_proto::gitops::path_cf::Path;
use kas_proto::gitops::{GitRefCf, ObjectsToSynchronizeRequest, PathCf};
use kas_testkit::gitops::{read_batch, ObjectsStream};
use kas_testkit::metrics::metric;

const STEP: Duration = Duration::from_secs(10);
/// How long a stream must stay quiet and open to count as "kept" during an outage.
const QUIET: Duration = Duration::from_secs(1);
/// An agent GitLab knows whose token kas has not checked yet: a "new agent".
const NEW_TOKEN: &str = "glagent-new-agent-token";

fn new_agent() -> StandinAgent {
    StandinAgent {
        token: NEW_TOKEN.into(),
        agent_id: 2,
        agent_name: "second".into(),
        ..StandinAgent::demo(NEW_TOKEN)
    }
}

async fn metrics(kas: &Harness) -> String {
    kas.http_get("/metrics").await.1
}

async fn wait_metric_at_least(kas: &Harness, series: &str, at_least: f64) {
    eventually(&format!("{series} >= {at_least}"), STEP, || async {
        metric(&metrics(kas).await, series) >= at_least
    })
    .await;
}

async fn config_stream(channel: Channel) -> tonic::Streaming<ConfigurationResponse> {
    AgentConfigurationClient::new(channel)
        .get_configuration(with_token(ConfigurationRequest::default(), TOKEN))
        .await
        .expect("GetConfiguration accepted")
        .into_inner()
}

/// The next message, which must come within [`STEP`] on a healthy stream.
async fn next<T>(stream: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("no message in time")
        .expect("the stream failed")
        .expect("the stream ended")
}

/// Asserts that the stream neither ends nor fails nor sends anything for [`QUIET`].
async fn assert_open_and_quiet<T: std::fmt::Debug>(stream: &mut tonic::Streaming<T>, when: &str) {
    if let Ok(got) = tokio::time::timeout(QUIET, stream.message()).await {
        panic!("{when}: the stream must stay open and quiet, got {got:?}");
    }
}

async fn register(kas: &Harness, token: &str) -> Result<(), tonic::Status> {
    AgentRegistrarClient::new(kas.h2c_channel().await)
        .register(with_token(RegisterRequest::default(), token))
        .await
        .map(drop)
}

/// Commits a new configuration for the demo agent; returns the commit.
fn commit_config(kas: &Harness, level: &str) -> String {
    let path = config_file_path(&kas.agent.agent_name);
    let yaml = format!("observability:\n  logging:\n    level: {level}\n");
    kas.gitlab
        .commit_files(&kas.agent.project(), &[(&path, Some(yaml.as_bytes()))])
        .expect("commit")
}

// ---- GitLab down -------------------------------------------------------------------

#[tokio::test]
async fn gitlab_503_keeps_connected_streams_and_new_agents_get_unavailable() {
    // Tokens are re-checked every second: the outage outlasts several re-checks.
    let kas = Harness::start_with(|c| c.gitlab.auth_cache_ttl = Duration::from_secs(1)).await;
    kas.gitlab.add_agent(new_agent());
    let mut stream = config_stream(kas.ws_channel().await).await;
    next(&mut stream).await;

    kas.gitlab.set_fault(GitlabFault::Unavailable);
    // Two re-checks of the stream's token met the 503 and were deferred.
    wait_metric_at_least(
        &kas,
        "kas_agent_token_revalidations_total{result=\"deferred\"}",
        2.0,
    )
    .await;
    // The stream is alive: a commit made during the outage reaches it (Gitaly is up).
    let head = commit_config(&kas, "warn");
    assert_eq!(next(&mut stream).await.commit_id, head);

    // A new agent cannot be checked: UNAVAILABLE (agentk retries), not UNAUTHENTICATED.
    let status = register(&kas, NEW_TOKEN).await.expect_err("GitLab is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("GitLab is unavailable"),
        "{status:?}"
    );
    let text = metrics(&kas).await;
    assert!(
        metric(
            &text,
            "kas_gitlab_api_errors_total{endpoint=\"agent_info\",kind=\"http_5xx\"}"
        ) >= 3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "kas_agent_token_revalidations_total{result=\"rejected\"}"
        ),
        0.0
    );

    kas.gitlab.set_fault(GitlabFault::None);
    register(&kas, NEW_TOKEN)
        .await
        .expect("the new agent gets in once GitLab is back");
    let head = commit_config(&kas, "error");
    assert_eq!(next(&mut stream).await.commit_id, head);
}

#[tokio::test]
async fn gitlab_timing_out_keeps_connected_streams() {
    let kas = Harness::start_with(|c| c.gitlab.auth_cache_ttl = Duration::from_secs(1)).await;
    let mut stream = config_stream(kas.h2c_channel().await).await;
    next(&mut stream).await;
    kas.gitlab
        .set_fault(GitlabFault::Slow(Duration::from_secs(60)));
    // Every re-check now times out (api_timeout 2 s): deferred, the stream stays.
    wait_metric_at_least(
        &kas,
        "kas_agent_token_revalidations_total{result=\"deferred\"}",
        1.0,
    )
    .await;
    let head = commit_config(&kas, "warn");
    assert_eq!(next(&mut stream).await.commit_id, head);
    assert!(
        metric(
            &metrics(&kas).await,
            "kas_gitlab_api_errors_total{endpoint=\"agent_info\",kind=\"timeout\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn tokens_checked_before_an_outage_are_honoured_until_the_cache_ttl() {
    let kas = Harness::start_with(|c| c.gitlab.auth_cache_ttl = Duration::from_secs(120)).await;
    kas.gitlab.add_agent(new_agent());
    register(&kas, TOKEN)
        .await
        .expect("checked while GitLab is up");

    kas.gitlab.set_fault(GitlabFault::Unavailable);
    let asked = kas.gitlab.requests_received();
    // The agent reconnects during the outage: its token is still trusted.
    register(&kas, TOKEN)
        .await
        .expect("a token checked within the TTL");
    let mut stream = config_stream(kas.ws_channel().await).await;
    next(&mut stream).await;
    assert_eq!(
        kas.gitlab.requests_received(),
        asked,
        "a cached token costs GitLab nothing"
    );
    // An agent kas has never seen cannot be checked.
    let status = register(&kas, NEW_TOKEN).await.expect_err("GitLab is down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}

#[tokio::test]
async fn gitlab_refusing_a_token_ends_its_stream_where_an_outage_did_not() {
    let kas = Harness::start_with(|c| c.gitlab.auth_cache_ttl = Duration::from_secs(1)).await;
    let mut stream = config_stream(kas.h2c_channel().await).await;
    next(&mut stream).await;

    kas.gitlab.set_fault(GitlabFault::Unavailable);
    wait_metric_at_least(
        &kas,
        "kas_agent_token_revalidations_total{result=\"deferred\"}",
        1.0,
    )
    .await;
    assert_open_and_quiet(&mut stream, "GitLab answering 503").await;

    // GitLab is back and says the token is revoked (401): that ends the stream.
    kas.gitlab.remove_agent(TOKEN);
    kas.gitlab.set_fault(GitlabFault::None);
    let status = match tokio::time::timeout(STEP, stream.message()).await {
        Ok(Err(status)) => status,
        other => panic!("expected the stream to end with an error, got {other:?}"),
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        metric(
            &metrics(&kas).await,
            "kas_agent_token_revalidations_total{result=\"rejected\"}"
        ) >= 1.0
    );
}

// ---- GitLab slow -------------------------------------------------------------------

#[tokio::test]
async fn a_slow_gitlab_is_bounded_by_the_api_timeout_and_asked_once_per_token() {
    // The test profile's gitlab.api_timeout is 2 s.
    let kas = Harness::start().await;
    kas.gitlab.add_agent(new_agent());
    const CALLS: usize = 20;

    // Slower than the timeout: every waiting connection gets UNAVAILABLE at the timeout,
    // long before GitLab would answer, and GitLab was asked once.
    kas.gitlab
        .set_fault(GitlabFault::Slow(Duration::from_secs(30)));
    let asked = kas.gitlab.requests_received();
    let started = std::time::Instant::now();
    let results = join_all((0..CALLS).map(|_| register(&kas, NEW_TOKEN))).await;
    let waited = started.elapsed();
    for r in &results {
        let status = r.as_ref().expect_err("GitLab answers after the timeout");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert!(
        waited < Duration::from_secs(15),
        "bounded by the 2 s API timeout, not GitLab's 30 s: {waited:?}"
    );
    assert_eq!(
        kas.gitlab.requests_received() - asked,
        1,
        "{CALLS} waiting connections of one token share one GitLab call"
    );
    assert!(
        metric(
            &metrics(&kas).await,
            "kas_gitlab_api_errors_total{endpoint=\"agent_info\",kind=\"timeout\"}"
        ) >= 1.0
    );

    // Slow but within the timeout: agents get in, still one call for the token.
    kas.gitlab
        .set_fault(GitlabFault::Slow(Duration::from_millis(500)));
    let asked = kas.gitlab.requests_received();
    let results = join_all((0..CALLS).map(|_| register(&kas, NEW_TOKEN))).await;
    for r in results {
        r.expect("a slow GitLab within the timeout lets agents in");
    }
    assert_eq!(kas.gitlab.requests_received() - asked, 1);
}

#[tokio::test]
async fn a_slow_gitlab_sees_at_most_max_concurrent_requests_calls_from_a_pod() {
    const AGENTS: i64 = 8;
    let kas = Harness::start_with(|c| {
        c.gitlab.max_concurrent_requests = 2;
        // Room for all of them to be served one slot after another.
        c.gitlab.api_timeout = Duration::from_secs(20);
    })
    .await;
    let tokens: Vec<String> = (0..AGENTS).map(|i| format!("glagent-many-{i}")).collect();
    for (i, token) in tokens.iter().enumerate() {
        kas.gitlab.add_agent(StandinAgent {
            token: token.clone(),
            agent_id: 10 + i as i64,
            ..StandinAgent::demo(token)
        });
    }
    kas.gitlab
        .set_fault(GitlabFault::Slow(Duration::from_millis(300)));
    // Eight new agents at once, each its own token: GitLab gets two calls at a time, and
    // the others wait for a slot instead of being refused.
    let results = join_all(tokens.iter().map(|t| register(&kas, t))).await;
    for r in results {
        r.expect("served once a slot is free");
    }
    assert_eq!(kas.gitlab.requests_received(), AGENTS as u64);
    let most = kas.gitlab.max_requests_in_flight();
    assert!(
        (1..=2).contains(&most),
        "at most gitlab.max_concurrent_requests calls at once, saw {most}"
    );
}

/// `gitlab.api_rate_limit`: a burst of new agents reaches GitLab paced by the token
/// bucket — the bucket's worth at once, then one call per refill — and every agent still
/// gets in, since a call waits for a token (within `gitlab.api_timeout`) instead of failing.
#[tokio::test]
async fn gitlab_api_calls_are_paced_by_the_rate_limit_and_every_agent_gets_in() {
    const AGENTS: usize = 12;
    const BUCKET: u32 = 2;
    const PER_SECOND: f64 = 5.0;
    let kas = Harness::start_with(|c| {
        c.gitlab.api_rate_limit = kas::config::RateLimitConfig {
            refill_rate_per_second: PER_SECOND,
            bucket_size: BUCKET,
        };
        // Room for all of them: 10 calls beyond the bucket take 2 s.
        c.gitlab.api_timeout = Duration::from_secs(20);
    })
    .await;
    let tokens: Vec<String> = (0..AGENTS).map(|i| format!("glagent-paced-{i}")).collect();
    for (i, token) in tokens.iter().enumerate() {
        kas.gitlab.add_agent(StandinAgent {
            token: token.clone(),
            agent_id: 100 + i as i64,
            ..StandinAgent::demo(token)
        });
    }
    // A full bucket to start from.
    tokio::time::sleep(Duration::from_secs_f64(f64::from(BUCKET) / PER_SECOND)).await;
    let started = std::time::Instant::now();
    let results = join_all(tokens.iter().map(|t| register(&kas, t))).await;
    for r in results {
        r.expect("a rate-limited call waits for its token and the agent gets in");
    }
    let arrivals: Vec<Duration> = kas
        .gitlab
        .request_arrivals()
        .into_iter()
        .filter_map(|at| at.checked_duration_since(started))
        .collect();
    eprintln!("agent_info arrivals after the burst started: {arrivals:?}");
    assert_eq!(arrivals.len(), AGENTS, "one agent_info call per new agent");
    // The bucket at once, one more at 200 ms; a margin of one for the scheduler.
    let early = arrivals
        .iter()
        .filter(|t| **t < Duration::from_millis(300))
        .count();
    assert!(
        early <= BUCKET as usize + 2,
        "{early} calls reached GitLab in the first 300 ms: {arrivals:?}"
    );
    // 10 calls beyond the bucket at 5/s: the last cannot start before ~2 s.
    let last = arrivals.iter().max().copied().unwrap_or_default();
    assert!(
        last >= Duration::from_millis(1500),
        "the last call arrived after {last:?}: {arrivals:?}"
    );
    let text = metrics(&kas).await;
    assert!(
        metric(
            &text,
            "kas_gitlab_api_rate_limited_total{endpoint=\"agent_info\"}"
        ) >= 8.0,
        "{text}"
    );
    assert!(metric(&text, "kas_gitlab_api_rate_limit_wait_seconds_total") > 1.0);
}

// ---- Gitaly down -------------------------------------------------------------------

#[tokio::test]
async fn gitaly_down_keeps_the_configuration_stream_and_the_new_commit_arrives_after() {
    let kas = Harness::start().await;
    let mut stream = config_stream(kas.ws_channel().await).await;
    let first = next(&mut stream).await;

    let gitaly = kas.gitlab.gitaly();
    gitaly.set_down(true);
    assert!(gitaly.wait_listening(false, STEP).await, "Gitaly stopped");
    let head = commit_config(&kas, "warn");
    assert_ne!(head, first.commit_id);
    // kas's branch polls fail (connection refused), again and again ...
    wait_metric_at_least(
        &kas,
        "kas_gitaly_requests_total{outcome=\"unavailable\",rpc=\"FindBranch\"}",
        3.0,
    )
    .await;
    assert!(
        metric(
            &metrics(&kas).await,
            "kas_agent_configuration_events_total{event=\"poll_failed\"}"
        ) >= 1.0
    );
    // ... and the agent notices nothing: its stream stays open with its configuration.
    assert_open_and_quiet(&mut stream, "Gitaly down").await;

    gitaly.set_down(false);
    assert!(gitaly.wait_listening(true, STEP).await, "Gitaly back");
    assert_eq!(
        next(&mut stream).await.commit_id,
        head,
        "the commit made during the outage arrives"
    );
}

fn manifests() -> StandinProject {
    StandinProject {
        project_id: 77,
        project_path: "ops/manifests".into(),
        default_branch: "main".into(),
        relative_path: None,
    }
}

async fn gitops_stream(
    kas: &Harness,
    known: &str,
    pinned: Option<&str>,
) -> Result<ObjectsStream, tonic::Status> {
    let request = ObjectsToSynchronizeRequest {
        project_id: manifests().project_path,
        commit_id: known.into(),
        paths: vec![PathCf {
            path: Some(Path::Glob("*.yaml".into())),
        }],
        r#ref: pinned.map(|c| GitRefCf {
            r#ref: Some(Ref::Commit(c.into())),
        }),
    };
    GitopsClient::new(kas.h2c_channel().await)
        .get_objects_to_synchronize(with_token(request, TOKEN))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn gitaly_down_keeps_gitops_streams_and_they_catch_up_after() {
    let kas = Harness::start_with(|c| c.gitops.poll_interval = Duration::from_millis(100)).await;
    kas.gitlab.add_project(manifests());
    let first = kas
        .gitlab
        .commit_files(&manifests(), &[("a.yaml", Some(b"kind: A\n"))])
        .unwrap();
    // Waiting for a change: the agent has the head.
    let mut waiting = gitops_stream(&kas, &first, None).await.expect("accepted");

    let gitaly = kas.gitlab.gitaly();
    gitaly.set_down(true);
    assert!(gitaly.wait_listening(false, STEP).await, "Gitaly stopped");
    let head = kas
        .gitlab
        .commit_files(&manifests(), &[("b.yaml", Some(b"kind: B\n"))])
        .unwrap();
    // A stream opened during the outage for a pinned commit: kas cannot even check the
    // commit exists, and keeps the stream instead of failing it.
    let mut pinned = gitops_stream(&kas, "", Some(&head))
        .await
        .expect("accepted: GitLab is up");
    wait_metric_at_least(
        &kas,
        "kas_agent_configuration_events_total{event=\"gitops_poll_failed\"}",
        1.0,
    )
    .await;
    wait_metric_at_least(
        &kas,
        "kas_agent_configuration_events_total{event=\"gitops_read_failed\"}",
        1.0,
    )
    .await;
    assert_open_and_quiet(&mut waiting, "Gitaly down, waiting stream").await;
    assert_open_and_quiet(&mut pinned, "Gitaly down, pinned stream").await;

    gitaly.set_down(false);
    assert!(gitaly.wait_listening(true, STEP).await, "Gitaly back");
    for stream in [&mut waiting, &mut pinned] {
        let (commit, files) = read_batch(stream, 77, STEP).await.expect("a batch");
        assert_eq!(commit, head);
        assert_eq!(files.len(), 2, "{files:?}");
    }
}
