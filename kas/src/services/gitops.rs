use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use kas_proto::gitops::git_ref_cf::Ref;
use kas_proto::gitops::gitops_server::Gitops;
use kas_proto::gitops::objects_to_synchronize_response::{Header, Message, Object, Trailer};
use kas_proto::gitops::path_cf::Path;
use kas_proto::gitops::{ObjectsToSynchronizeRequest, ObjectsToSynchronizeResponse};

use tokio::time::Instant;

use super::Shared;
use crate::agent::gitops::{read_manifests, GitopsError, ManifestGlob, ManifestPath};
use crate::auth::Agent;
use crate::gitlab::GitalyLocation;
use crate::sources::gitaly::{branch_head, GitalyError};
use crate::sync::head_poller::{jittered, PollFn};

/// Objects larger than this are sent in several messages with the same source, so no
/// message comes near agentk's 4 MiB receive limit.
const CHUNK: usize = 1024 * 1024;

type Tx = mpsc::Sender<Result<ObjectsToSynchronizeResponse, Status>>;

pub struct GitopsService {
    shared: Arc<Shared>,
}

impl GitopsService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// What the agent asked for, checked.
struct Wanted {
    paths: Vec<ManifestPath>,
    /// A fixed commit, or the branch to follow (empty: the project's default branch).
    revision: Revision,
}

enum Revision {
    Commit(String),
    Branch(String),
}

fn parse_request(
    request: &ObjectsToSynchronizeRequest,
    max_paths: usize,
) -> Result<Wanted, Status> {
    if request.project_id.trim().is_empty() {
        return Err(Status::invalid_argument("project_id is required"));
    }
    if request.paths.is_empty() {
        return Err(Status::invalid_argument("at least one path is required"));
    }
    if request.paths.len() > max_paths {
        return Err(Status::failed_precondition(format!(
            "{} paths requested, the limit is {max_paths} (max_number_of_paths)",
            request.paths.len()
        )));
    }
    let mut paths = Vec::with_capacity(request.paths.len());
    for (i, path) in request.paths.iter().enumerate() {
        paths.push(match &path.path {
            Some(Path::Glob(glob)) => ManifestPath::Glob(
                ManifestGlob::new(glob)
                    .map_err(|e| Status::invalid_argument(format!("paths[{i}].glob: {e}")))?,
            ),
            Some(Path::File(file)) if !file.trim_matches('/').is_empty() => {
                ManifestPath::File(file.clone())
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "paths[{i}] needs a glob or a file"
                )))
            }
        });
    }
    let revision = match request.r#ref.as_ref().and_then(|r| r.r#ref.as_ref()) {
        None => Revision::Branch(String::new()),
        Some(Ref::Branch(b)) => Revision::Branch(b.clone()),
        Some(Ref::Commit(c)) => Revision::Commit(c.clone()),
        Some(Ref::Tag(_)) => {
            return Err(Status::unimplemented(
                "tag refs are not supported by this kas; use a branch or a commit",
            ))
        }
    };
    Ok(Wanted { paths, revision })
}

fn branch_poll(shared: &Shared, location: &GitalyLocation, branch: &str) -> PollFn<GitalyError> {
    let (pool, location, branch) = (shared.gitaly.clone(), location.clone(), branch.to_owned());
    Arc::new(move || {
        let (pool, location, branch) = (pool.clone(), location.clone(), branch.clone());
        Box::pin(async move { branch_head(&pool, &location, &branch).await })
    })
}

/// Sends one batch: header, the objects (large ones in chunks), trailer.
async fn send_batch(
    tx: &Tx,
    commit: &str,
    project_id: i64,
    objects: Vec<(String, Vec<u8>)>,
) -> Result<(), ()> {
    let msg = |m| Ok(ObjectsToSynchronizeResponse { message: Some(m) });
    tx.send(msg(Message::Header(Header {
        commit_id: commit.to_owned(),
        project_id,
    })))
    .await
    .map_err(drop)?;
    for (source, data) in objects {
        let mut chunks = data.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            tx.send(msg(Message::Object(Object {
                source,
                data: Vec::new(),
            })))
            .await
            .map_err(drop)?;
            continue;
        }
        for chunk in chunks {
            tx.send(msg(Message::Object(Object {
                source: source.clone(),
                data: chunk.to_vec(),
            })))
            .await
            .map_err(drop)?;
        }
    }
    tx.send(msg(Message::Trailer(Trailer {})))
        .await
        .map_err(drop)
}

/// Manifests that could not be read for a passing reason (Gitaly down or slow) are tried
/// again this soon (or at the poll interval, if shorter); the stream stays open meanwhile.
const READ_RETRY: Duration = Duration::from_secs(10);

/// How one attempt to send the batch of a head ended.
enum Attempt {
    /// Sent, or ended the stream with a definite error: the stream is over.
    Done,
    /// Gitaly could not answer now: keep the stream and try again later.
    RetryLater(GitopsError),
}

/// Reads the manifests at `head` and sends them, or the definite error that ends the
/// stream.
async fn send_head(
    shared: &Shared,
    location: &GitalyLocation,
    project_id: i64,
    wanted: &Wanted,
    head: &str,
    tx: &Tx,
) -> Attempt {
    // A pinned commit must exist: listing a missing one reads as "no files", and an empty
    // batch would make the agent remove everything it applied.
    if let Revision::Commit(c) = &wanted.revision {
        match shared.gitaly.find_commit(location, c).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                let _ = tx
                    .send(Err(Status::failed_precondition(format!(
                        "commit {c} does not exist in the manifest project"
                    ))))
                    .await;
                return Attempt::Done;
            }
            Err(e) => {
                let e = GitopsError::from(e);
                if e.is_passing() {
                    return Attempt::RetryLater(e);
                }
                let _ = tx.send(Err(e.into())).await;
                return Attempt::Done;
            }
        }
    }
    let events = &shared.metrics.config_events;
    match read_manifests(
        &shared.gitaly,
        location,
        head,
        &wanted.paths,
        shared.gitops_limits,
    )
    .await
    {
        Ok(objects) => {
            let n = objects.len();
            if send_batch(tx, head, project_id, objects).await.is_ok() {
                events.with_label_values(&["gitops_sent"]).inc();
                tracing::info!(project_id, commit_id = %head, objects = n, "sent GitOps manifests");
            }
            Attempt::Done
        }
        Err(e) if e.is_passing() => Attempt::RetryLater(e),
        Err(e) => {
            events.with_label_values(&["gitops_rejected"]).inc();
            tracing::info!(project_id, commit_id = %head, error = %e, "GitOps manifests refused");
            let _ = tx.send(Err(e.into())).await;
            Attempt::Done
        }
    }
}

/// Waits for a head other than `known`, then sends its batch and returns. Ends without a
/// message when the connection is rotated or the pod drains (nothing to do: the agent
/// asks again).
/// One GetObjectsToSynchronize stream, once GitLab has located the project.
struct StreamJob {
    shared: Arc<Shared>,
    location: GitalyLocation,
    project_id: i64,
    default_branch: String,
    wanted: Wanted,
    /// The commit the agent already has.
    known: String,
    agent: Agent,
    tx: Tx,
    end: CancellationToken,
}

async fn serve_stream(job: StreamJob) {
    let StreamJob {
        shared,
        location,
        project_id,
        default_branch,
        wanted,
        known,
        agent,
        tx,
        end,
    } = job;
    // While it waits for a change, the stream re-checks its token every cache TTL, so a
    // revoked agent's stream ends within about one TTL (as configuration streams do).
    let revalidate_every = shared.auth.success_ttl();
    let mut revalidate_at = Instant::now() + jittered(revalidate_every);
    let events = &shared.metrics.config_events;
    let mut heads = match &wanted.revision {
        Revision::Commit(_) => None,
        Revision::Branch(b) => {
            let branch = if b.is_empty() { &default_branch } else { b };
            let key = format!("gitops|{}|{branch}", location.key());
            Some(shared.gitops_pollers.subscribe_tagged(
                &key,
                Some(&location.repository.gl_project_path),
                branch_poll(&shared, &location, branch),
            ))
        }
    };
    loop {
        let head = match (&wanted.revision, heads.as_mut()) {
            (Revision::Commit(c), _) => Some(c.clone()),
            (_, Some(heads)) => match heads.borrow_and_update().clone().as_deref() {
                Some(Ok(head)) => head.clone(),
                Some(Err(e)) => {
                    events.with_label_values(&["gitops_poll_failed"]).inc();
                    tracing::debug!(project_id, error = %e, "cannot poll GitOps manifest project (the poller logs it once)");
                    None
                }
                None => None,
            },
            _ => None,
        };
        let mut retry_at: Option<Instant> = None;
        if let Some(head) = head.filter(|h| *h != known) {
            match send_head(&shared, &location, project_id, &wanted, &head, &tx).await {
                Attempt::Done => return,
                Attempt::RetryLater(e) => {
                    events.with_label_values(&["gitops_read_failed"]).inc();
                    tracing::warn!(project_id, commit_id = %head, error = %e, "cannot read GitOps manifests; will retry");
                    let every = READ_RETRY.min(shared.gitops_pollers.interval());
                    retry_at = Some(Instant::now() + jittered(every));
                }
            }
        }
        let changed = async {
            match heads.as_mut() {
                Some(heads) => heads.changed().await.is_ok(),
                // A fixed commit the agent already has: nothing changes on this stream.
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changed => if !changed { return },
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {}
            _ = tokio::time::sleep_until(revalidate_at) => {
                revalidate_at = Instant::now() + jittered(revalidate_every);
                match shared.auth.revalidate(&agent.token).await {
                    Err(e) if e.is_definite() => {
                        tracing::info!(project_id, outcome = e.outcome_label(), "agent token no longer accepted; ending its GitOps stream");
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    // Accepted, or GitLab unreachable: keep waiting.
                    _ => {}
                }
            }
            _ = tx.closed() => return,
            _ = end.cancelled() => return,
        }
    }
}

#[tonic::async_trait]
impl Gitops for GitopsService {
    type GetObjectsToSynchronizeStream =
        ReceiverStream<Result<ObjectsToSynchronizeResponse, Status>>;

    async fn get_objects_to_synchronize(
        &self,
        request: Request<ObjectsToSynchronizeRequest>,
    ) -> Result<Response<Self::GetObjectsToSynchronizeStream>, Status> {
        let agent = self.shared.authenticate(&request).await?;
        let end = self.shared.stream_end(&request);
        let request = request.into_inner();
        let wanted = parse_request(&request, self.shared.gitops_limits.max_number_of_paths)?;
        // GitLab decides whether this agent may read the project, and where it lives.
        let project = self
            .shared
            .project_info
            .get(self.shared.auth.gitlab(), &agent.token, &request.project_id)
            .await
            .map_err(Status::from)?;
        let location = project.gitaly.ok_or_else(|| {
            Status::unavailable("GitLab named no Gitaly server for the manifest project")
        })?;
        let guard = self.shared.stream_guard("GetObjectsToSynchronize");
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let _guard = guard;
            serve_stream(StreamJob {
                shared,
                location,
                project_id: project.project_id,
                default_branch: project.default_branch,
                wanted,
                known: request.commit_id,
                agent,
                tx,
                end,
            })
            .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
