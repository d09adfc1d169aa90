//! GitOps over real sockets: `Gitops/GetObjectsToSynchronize` against the GitLab and
//! Gitaly stand-ins (real git repositories).

mod common;
mod hgitaly;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{with_token, Harness, TOKEN};
use tonic::transport::Channel;
use tonic::Code;

use kas::dev::gitlab_standin::StandinProject;
use kas_proto::agent_configuration::agent_configuration_client::AgentConfigurationClient;
use kas_proto::agent_configuration::ConfigurationRequest;
use kas_proto::gitops::git_ref_cf::Ref;
use kas_proto::gitops::gitops_client::GitopsClient;
use kas_proto::gitops::objects_to_synchronize_response::Message;
use kas_proto::gitops::path_cf::Path;
use kas_proto::gitops::{
    GitRefCf, ObjectsToSynchronizeRequest, ObjectsToSynchronizeResponse, PathCf,
};
use kas_testkit::gitops::{next_message, read_batch, ObjectsStream};

const STEP: Duration = Duration::from_secs(10);

fn manifests() -> StandinProject {
    StandinProject {
        project_id: 77,
        project_path: "ops/manifests".into(),
        default_branch: "main".into(),
        relative_path: None,
    }
}

async fn start() -> Harness {
    let kas = Harness::start_with(|c| {
        c.gitops.poll_interval = Duration::from_millis(100);
        c.gitops.max_number_of_files = 3;
        c.gitops.max_manifest_file_size = 1000;
        c.gitops.max_total_manifest_file_size = 1500;
    })
    .await;
    kas.gitlab.add_project(manifests());
    kas
}

fn request(
    project: &str,
    globs: &[&str],
    commit_id: &str,
) -> tonic::Request<ObjectsToSynchronizeRequest> {
    with_token(
        ObjectsToSynchronizeRequest {
            project_id: project.into(),
            commit_id: commit_id.into(),
            paths: globs
                .iter()
                .map(|g| PathCf {
                    path: Some(Path::Glob((*g).into())),
                })
                .collect(),
            r#ref: None,
        },
        TOKEN,
    )
}

async fn open(
    channel: Channel,
    req: tonic::Request<ObjectsToSynchronizeRequest>,
) -> Result<ObjectsStream, tonic::Status> {
    GitopsClient::new(channel)
        .get_objects_to_synchronize(req)
        .await
        .map(|r| r.into_inner())
}

async fn next(
    stream: &mut ObjectsStream,
) -> Result<Option<ObjectsToSynchronizeResponse>, tonic::Status> {
    next_message(stream, STEP).await
}

/// One batch of the manifest project: its commit and files.
async fn batch(
    stream: &mut ObjectsStream,
) -> Result<(String, BTreeMap<String, String>), tonic::Status> {
    read_batch(stream, manifests().project_id, STEP).await
}

async fn batch_of(
    stream: &mut ObjectsStream,
    project_id: i64,
) -> Result<(String, BTreeMap<String, String>), tonic::Status> {
    read_batch(stream, project_id, STEP).await
}

#[tokio::test]
async fn a_gitops_agent_receives_its_manifests_then_each_new_commit_once() {
    let kas = start().await;
    // The agent's configuration names the manifest project; the agent sees it.
    kas.gitlab
        .write_agent_config(
            &kas.agent,
            "gitops:\n  manifest_projects:\n  - id: ops/manifests\n    paths:\n    - glob: 'deploy/**/*.yaml'\n",
        )
        .unwrap();
    let mut config = AgentConfigurationClient::new(kas.h2c_channel().await)
        .get_configuration(with_token(ConfigurationRequest::default(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    let cfg = tokio::time::timeout(STEP, config.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .configuration
        .unwrap();
    let projects = cfg.gitops.unwrap().manifest_projects;
    assert_eq!(projects[0].id, "ops/manifests");
    assert_eq!(projects[0].paths[0].glob, "deploy/**/*.yaml");

    let first = kas
        .gitlab
        .commit_files(
            &manifests(),
            &[
                ("deploy/app.yaml", Some(b"kind: Deployment\n")),
                ("deploy/db/db.yaml", Some(b"kind: StatefulSet\n")),
                ("deploy/.hidden/x.yaml", Some(b"kind: Secret\n")),
                ("deploy/README.md", Some(b"not a manifest\n")),
                ("other/x.yaml", Some(b"kind: Other\n")),
            ],
        )
        .unwrap();
    let channel = kas.ws_channel().await;
    let mut stream = open(
        channel.clone(),
        request(&projects[0].id, &[&projects[0].paths[0].glob], ""),
    )
    .await
    .expect("GetObjectsToSynchronize accepted");
    let (commit, files) = batch(&mut stream).await.expect("a batch");
    assert_eq!(commit, first);
    let expected: BTreeMap<String, String> = [
        ("deploy/app.yaml", "kind: Deployment\n"),
        ("deploy/db/db.yaml", "kind: StatefulSet\n"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(files, expected);

    // Asking again with the commit it has: nothing comes while the branch stands still
    // (the poller checks every 100 ms) ...
    let mut again = open(
        channel.clone(),
        request("77", &["deploy/**/*.yaml"], &commit),
    )
    .await
    .expect("accepted by numeric id too");
    assert!(
        tokio::time::timeout(Duration::from_millis(800), again.message())
            .await
            .is_err(),
        "something was sent for the commit the agent already has"
    );
    // ... and the next commit comes on the same stream.
    let second = kas
        .gitlab
        .commit_files(
            &manifests(),
            &[
                ("deploy/app.yaml", Some(b"kind: Deployment\nreplicas: 3\n")),
                ("deploy/db/db.yaml", None),
            ],
        )
        .unwrap();
    let (commit, files) = batch(&mut again).await.expect("the next batch");
    assert_eq!(commit, second);
    assert_eq!(
        files.into_iter().collect::<Vec<_>>(),
        [(
            "deploy/app.yaml".to_owned(),
            "kind: Deployment\nreplicas: 3\n".to_owned()
        )]
    );
}

#[tokio::test]
async fn too_many_or_too_large_manifests_fail_with_the_reason() {
    let kas = start().await;
    let small = vec![b'a'; 100];
    let big = vec![b'b'; 2000];
    let half = vec![b'c'; 900];
    let head = kas
        .gitlab
        .commit_files(
            &manifests(),
            &[
                ("many/1.yaml", Some(&small)),
                ("many/2.yaml", Some(&small)),
                ("many/3.yaml", Some(&small)),
                ("many/4.yaml", Some(&small)),
                ("big/big.yaml", Some(&big)),
                ("total/1.yaml", Some(&half)),
                ("total/2.yaml", Some(&half)),
                ("fine/1.yaml", Some(&half)),
            ],
        )
        .unwrap();
    let channel = kas.h2c_channel().await;
    for (glob, reason) in [
        ("many/*.yaml", "max_number_of_files"),
        ("big/*.yaml", "max_manifest_file_size"),
        ("total/*.yaml", "max_total_manifest_file_size"),
    ] {
        let mut stream = open(channel.clone(), request("ops/manifests", &[glob], ""))
            .await
            .expect("accepted");
        let status = batch(&mut stream).await.expect_err(glob);
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{glob}: {status:?}"
        );
        assert!(status.message().contains(reason), "{glob}: {status:?}");
    }
    // Within the bounds the same project is fine.
    let mut stream = open(
        channel.clone(),
        request("ops/manifests", &["fine/*.yaml", "many/[12].yaml"], ""),
    )
    .await
    .expect("accepted");
    let (_, files) = batch(&mut stream).await.expect("a batch within the bounds");
    assert_eq!(files.len(), 3);

    // A pinned commit that does not exist is refused, not an empty batch (which would
    // make the agent prune everything); an existing one is served.
    let mut pinned = request("ops/manifests", &["fine/*.yaml"], "");
    pinned.get_mut().r#ref = Some(GitRefCf {
        r#ref: Some(Ref::Commit(
            "0123456789abcdef0123456789abcdef01234567".into(),
        )),
    });
    let mut stream = open(channel.clone(), pinned).await.expect("accepted");
    let status = batch(&mut stream).await.expect_err("a missing commit");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("does not exist"), "{status:?}");
    let mut pinned = request("ops/manifests", &["fine/*.yaml"], "");
    pinned.get_mut().r#ref = Some(GitRefCf {
        r#ref: Some(Ref::Commit(head.clone())),
    });
    let mut stream = open(channel.clone(), pinned).await.expect("accepted");
    let (commit, files) = batch(&mut stream).await.expect("the pinned commit's batch");
    assert_eq!((commit, files.len()), (head, 1));

    // A project GitLab does not know, or a request without paths.
    let status = open(channel.clone(), request("ops/nope", &["*.yaml"], ""))
        .await
        .expect_err("unknown project");
    assert_eq!(status.code(), Code::NotFound);
    let status = open(channel, request("ops/manifests", &[], ""))
        .await
        .expect_err("no paths");
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn manifests_are_read_from_hgitaly_a_third_party_gitaly() {
    let hg = tokio::task::spawn_blocking(hgitaly::HGitaly::start)
        .await
        .expect("HGitaly started");
    let repo = hg.create_repo("ops/manifests.hg");
    let first = hg.commit(
        &repo,
        &[
            ("deploy/app.yaml", Some(b"kind: Deployment\n")),
            ("deploy/db/db.yaml", Some(b"kind: StatefulSet\n")),
            ("deploy/notes.txt", Some(b"not a manifest\n")),
        ],
    );
    let kas = start().await;
    kas.gitlab.set_gitaly(&hg.address(), "unused by HGitaly");
    kas.gitlab.add_project(StandinProject {
        project_id: 78,
        project_path: "ops/manifests-hg".into(),
        default_branch: "branch/default".into(),
        relative_path: Some("ops/manifests.hg".into()),
    });
    let channel = kas.h2c_channel().await;
    let mut stream = open(channel.clone(), request("78", &["deploy/**/*.yaml"], ""))
        .await
        .expect("accepted");
    let (commit, files) = batch_of(&mut stream, 78).await.expect("a batch");
    assert_eq!(commit, first);
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        ["deploy/app.yaml", "deploy/db/db.yaml"]
    );
    assert_eq!(files["deploy/db/db.yaml"], "kind: StatefulSet\n");

    let mut again = open(channel, request("78", &["deploy/**/*.yaml"], &commit))
        .await
        .expect("accepted");
    let second = hg.commit(
        &repo,
        &[("deploy/app.yaml", Some(b"kind: Deployment\nreplicas: 2\n"))],
    );
    let (commit, files) = batch_of(&mut again, 78).await.expect("the next batch");
    assert_eq!(commit, second);
    assert_eq!(files["deploy/app.yaml"], "kind: Deployment\nreplicas: 2\n");

    // Pinned commits through HGitaly's FindCommit: the first one is still served, an
    // unknown one refused.
    let channel = kas.h2c_channel().await;
    for (pin, exists) in [(first.clone(), true), ("f".repeat(40), false)] {
        let mut req = request("78", &["deploy/**/*.yaml"], "");
        req.get_mut().r#ref = Some(GitRefCf {
            r#ref: Some(Ref::Commit(pin.clone())),
        });
        let mut stream = open(channel.clone(), req).await.expect("accepted");
        match batch_of(&mut stream, 78).await {
            Ok((commit, files)) if exists => {
                assert_eq!(commit, first);
                assert_eq!(files["deploy/app.yaml"], "kind: Deployment\n");
            }
            Err(status) if !exists => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}")
            }
            other => panic!("pinned {pin}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_revoked_token_ends_a_waiting_gitops_stream_within_the_cache_ttl() {
    let kas = Harness::start_with(|c| {
        c.gitops.poll_interval = Duration::from_millis(100);
        c.gitlab.auth_cache_ttl = Duration::from_secs(1);
    })
    .await;
    kas.gitlab.add_project(manifests());
    let head = kas
        .gitlab
        .commit_files(&manifests(), &[("a.yaml", Some(b"kind: A\n"))])
        .unwrap();
    // Waiting: the agent already has the head.
    let mut stream = open(
        kas.h2c_channel().await,
        request("ops/manifests", &["*.yaml"], &head),
    )
    .await
    .expect("accepted");
    let revoked_at = std::time::Instant::now();
    kas.gitlab.remove_agent(TOKEN);
    let status = match tokio::time::timeout(STEP, stream.message()).await {
        Ok(Err(status)) => status,
        other => panic!("expected the stream to end with an error, got {other:?}"),
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // TTL 1 s with ±10 % jitter, plus the GitLab round trip.
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        revoked_at.elapsed()
    );
}

#[tokio::test]
async fn a_large_manifest_arrives_in_chunks_under_the_clients_message_limit() {
    // Default bounds (5 MiB per file); the file is above a gRPC client's default 4 MiB
    // receive limit, so it only arrives whole if kas splits it.
    let kas = Harness::start_with(|c| c.gitops.poll_interval = Duration::from_millis(100)).await;
    kas.gitlab.add_project(manifests());
    let big: Vec<u8> = (0..4_500_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    kas.gitlab
        .commit_files(&manifests(), &[("big.yaml", Some(&big))])
        .unwrap();
    let mut stream = open(
        kas.h2c_channel().await,
        request("ops/manifests", &["*.yaml"], ""),
    )
    .await
    .expect("accepted");
    let mut chunks = 0;
    let mut data = Vec::new();
    loop {
        match next(&mut stream)
            .await
            .expect("stream healthy")
            .and_then(|m| m.message)
        {
            Some(Message::Header(_)) => {}
            Some(Message::Object(o)) => {
                assert_eq!(o.source, "big.yaml");
                chunks += 1;
                data.extend_from_slice(&o.data);
            }
            Some(Message::Trailer(_)) => break,
            None => panic!("the stream ended before its trailer"),
        }
    }
    assert!(chunks >= 5, "{chunks} messages for 4.5 MB");
    assert!(data == big, "the chunks do not add up to the file");
}

#[tokio::test]
async fn gitlab_is_asked_where_a_manifest_project_lives_once_per_cache_ttl() {
    let kas = Harness::start_with(|c| {
        c.gitops.poll_interval = Duration::from_millis(100);
        c.gitops.project_info_cache_error_ttl = Duration::from_millis(500);
    })
    .await;
    kas.gitlab.add_project(manifests());
    kas.gitlab
        .commit_files(&manifests(), &[("a.yaml", Some(b"kind: A\n"))])
        .unwrap();
    let channel = kas.h2c_channel().await;
    let before = kas.gitlab.project_info_requests();
    for _ in 0..3 {
        let mut stream = open(channel.clone(), request("ops/manifests", &["*.yaml"], ""))
            .await
            .expect("accepted");
        batch(&mut stream).await.expect("a batch");
    }
    assert_eq!(
        kas.gitlab.project_info_requests() - before,
        1,
        "three batches, one lookup"
    );

    // A refusal is remembered for the (short) error TTL, then asked again.
    let before = kas.gitlab.project_info_requests();
    for _ in 0..2 {
        let status = open(channel.clone(), request("ops/missing", &["*.yaml"], ""))
            .await
            .expect_err("unknown project");
        assert_eq!(status.code(), Code::NotFound);
    }
    assert_eq!(kas.gitlab.project_info_requests() - before, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = open(channel, request("ops/missing", &["*.yaml"], ""))
        .await
        .expect_err("still unknown");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(kas.gitlab.project_info_requests() - before, 2);
}
