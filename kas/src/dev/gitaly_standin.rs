//! A Gitaly of our own for the local stack and tests: the RPCs kas uses (FindBranch,
//! TreeEntry, GetTreeEntries) answered from real git repositories on disk through the
//! `git` CLI, with Gitaly's v2 token check when a secret is set. Storage `default` is a
//! directory; a repository's `relative_path` is a git repository (bare or with a work tree)
//! under it. No canned answers: a commit made with `git commit` is what the next
//! FindBranch returns.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, Router};
use tonic::{Request, Response, Status};

use kas_proto::gitaly::commit_service_server::{CommitService, CommitServiceServer};
use kas_proto::gitaly::ref_service_server::{RefService, RefServiceServer};
use kas_proto::gitaly::tree_entry::EntryType;
use kas_proto::gitaly::tree_entry_response::ObjectType;
use kas_proto::gitaly::{
    Branch, FindBranchRequest, FindBranchResponse, FindCommitRequest, FindCommitResponse,
    GetTreeEntriesRequest, GetTreeEntriesResponse, GitCommit, Repository, TreeEntry,
    TreeEntryRequest, TreeEntryResponse,
};

use crate::sources::gitaly::token::verify_v2_authorization_now;

/// The one storage this stand-in has.
pub const STORAGE: &str = "default";
const GIT_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 * 1024;
const ENTRIES_PER_MESSAGE: usize = 100;
/// How long [`GitalyStandin::set_down`]`(false)` keeps trying to listen on the address again.
const REBIND_ATTEMPTS: u32 = 100;
const REBIND_PAUSE: Duration = Duration::from_millis(50);

struct State {
    root: PathBuf,
    calls: Mutex<HashMap<&'static str, u64>>,
}

/// A running stand-in; dropping it stops the server.
pub struct GitalyStandin {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
    /// `true` while the stand-in plays a stopped Gitaly ([`GitalyStandin::set_down`]).
    down: watch::Sender<bool>,
    /// Whether the listener is open right now (follows `down` a moment later).
    listening: watch::Receiver<bool>,
}

impl Drop for GitalyStandin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl GitalyStandin {
    /// Serves the repositories under `storage_root` on `addr` (port 0 in tests). With a
    /// `secret`, every call must carry a valid v2 token signed with it, as Gitaly demands.
    pub async fn start(
        addr: SocketAddr,
        storage_root: &Path,
        secret: Option<Vec<u8>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            root: storage_root.to_owned(),
            calls: Mutex::new(HashMap::new()),
        });
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            if let Some(secret) = &secret {
                let header = request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                verify_v2_authorization_now(header, secret)?;
            }
            Ok(request)
        };
        let service = Service {
            state: state.clone(),
        };
        let router = tonic::transport::Server::builder()
            .add_service(RefServiceServer::with_interceptor(
                service.clone(),
                check.clone(),
            ))
            .add_service(CommitServiceServer::with_interceptor(service, check));
        let stop = CancellationToken::new();
        let (down, down_rx) = watch::channel(false);
        let (listening_tx, listening) = watch::channel(true);
        tokio::spawn(serve_until_stopped(
            router,
            listener,
            down_rx,
            listening_tx,
            stop.clone(),
        ));
        Ok(Self {
            addr,
            state,
            stop,
            down,
            listening,
        })
    }

    /// Plays a stopped Gitaly server while `down`: the listener closes (new connections are
    /// refused) and every open connection is cut (its calls fail as on a server crash).
    /// `set_down(false)` listens again on the same address, as a restarted Gitaly does.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// Waits until the listener is closed (`false`) or open again (`true`) after
    /// [`GitalyStandin::set_down`], at most `limit`; returns whether it got there.
    pub async fn wait_listening(&self, listening: bool, limit: Duration) -> bool {
        let mut rx = self.listening.clone();
        tokio::time::timeout(limit, rx.wait_for(|l| *l == listening))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address in GitLab's `gitaly_info.address` form.
    pub fn address(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    pub fn storage_root(&self) -> &Path {
        &self.state.root
    }

    /// Calls served so far of one RPC (`FindBranch`, `TreeEntry`, `GetTreeEntries`).
    pub fn calls(&self, rpc: &str) -> u64 {
        self.state
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(rpc)
            .copied()
            .unwrap_or(0)
    }
}

/// Serves `router` on `listener` until `stop`, closing the listener and cutting every
/// connection whenever `down` turns `true`, and listening again on the same address when it
/// turns `false`.
async fn serve_until_stopped(
    router: Router,
    listener: TcpListener,
    mut down: watch::Receiver<bool>,
    listening: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let Ok(addr) = listener.local_addr() else {
        return;
    };
    let mut listener = Some(listener);
    loop {
        let Some(current) = listener.take() else {
            return;
        };
        listening.send_replace(true);
        // One "up" period: ends when `down` turns true (or the stand-in is dropped).
        let up = stop.child_token();
        let watcher = {
            let (up, mut down) = (up.clone(), down.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = down.wait_for(|d| *d) => up.cancel(),
                    _ = up.cancelled() => {}
                }
            })
        };
        let cut = up.clone();
        let incoming = TcpListenerStream::new(current)
            .map(move |accepted| accepted.map(|io| Severable::new(io, cut.clone())));
        // Tonic drops `incoming` (closing the listener) as soon as `up` is cancelled, then
        // waits for the connections, which `Severable` has already cut.
        if let Err(e) = router
            .clone()
            .serve_with_incoming_shutdown(incoming, up.clone().cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "Gitaly stand-in stopped");
        }
        up.cancel();
        let _ = watcher.await;
        listening.send_replace(false);
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            _ = down.wait_for(|d| !*d) => {}
            _ = stop.cancelled() => return,
        }
        listener = rebind(addr).await;
    }
}

/// Listens on `addr` again (the port may take a moment to be free), or gives up.
async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..REBIND_ATTEMPTS {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Some(listener),
            Err(e) => {
                tracing::debug!(error = %e, %addr, "Gitaly stand-in: cannot listen again yet");
                tokio::time::sleep(REBIND_PAUSE).await;
            }
        }
    }
    tracing::warn!(%addr, "Gitaly stand-in: cannot listen again; it stays down");
    None
}

/// A server-side connection that fails every read and write once `cut` is cancelled, as
/// a connection to a process that died does.
struct Severable {
    io: TcpStream,
    cut: CancellationToken,
    cut_wait: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Severable {
    fn new(io: TcpStream, cut: CancellationToken) -> Self {
        let cut_wait = Box::pin(cut.clone().cancelled_owned());
        Self { io, cut, cut_wait }
    }

    /// Whether the connection is cut; registers the task to be woken when it is.
    fn is_cut(&mut self, cx: &mut Context<'_>) -> bool {
        self.cut.is_cancelled() || self.cut_wait.as_mut().poll(cx).is_ready()
    }
}

fn severed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "Gitaly stand-in is down",
    )
}

impl AsyncRead for Severable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Severable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(severed()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Severable {
    type ConnectInfo = <TcpStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[derive(Clone)]
struct Service {
    state: Arc<State>,
}

fn bytes_text(bytes: &[u8], what: &str) -> Result<String, Status> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| Status::invalid_argument(format!("{what} is not UTF-8")))
}

/// A revision git will not take for an option.
fn revision(bytes: &[u8]) -> Result<String, Status> {
    let rev = bytes_text(bytes, "revision")?;
    if rev.is_empty() || rev.starts_with('-') || rev.contains(char::is_whitespace) {
        return Err(Status::invalid_argument("invalid revision"));
    }
    Ok(rev)
}

/// A repository-relative path without `..`, absolute parts or a leading `-`.
fn repo_path(bytes: &[u8]) -> Result<String, Status> {
    let path = bytes_text(bytes, "path")?;
    let path = path.trim_end_matches('/');
    let path = if path == "." { "" } else { path };
    let clean = Path::new(path)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !clean || path.starts_with('-') {
        return Err(Status::invalid_argument("invalid path"));
    }
    Ok(path.to_owned())
}

impl Service {
    fn count(&self, rpc: &'static str) {
        *self
            .state
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(rpc)
            .or_default() += 1;
    }

    fn repository(&self, repo: Option<&Repository>) -> Result<PathBuf, Status> {
        let repo = repo.ok_or_else(|| Status::invalid_argument("empty Repository"))?;
        if repo.storage_name != STORAGE {
            return Err(Status::invalid_argument(format!(
                "no such storage: {:?}",
                repo.storage_name
            )));
        }
        let relative = Path::new(&repo.relative_path);
        let clean = !repo.relative_path.is_empty()
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !clean {
            return Err(Status::invalid_argument("invalid relative_path"));
        }
        let path = self.state.root.join(relative);
        if !path.is_dir() {
            return Err(Status::not_found(format!(
                "repository not found: {}",
                repo.relative_path
            )));
        }
        Ok(path)
    }
}

/// Runs git in `repo`; `Ok(None)` when git exits non-zero (no such object or ref).
async fn git(repo: &Path, args: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(GIT_TIMEOUT, command.output())
        .await
        .map_err(|_| Status::deadline_exceeded("git took too long"))?
        .map_err(|e| Status::internal(format!("cannot run git: {e}")))?;
    Ok(output.status.success().then_some(output.stdout))
}

/// One `git ls-tree -z` record: `<mode> <type> <oid>[ <size>]\t<path>`.
struct LsTreeEntry {
    mode: i32,
    kind: String,
    oid: String,
    size: Option<i64>,
    path: Vec<u8>,
}

fn parse_ls_tree(output: &[u8]) -> Vec<LsTreeEntry> {
    output
        .split(|b| *b == 0)
        .filter(|r| !r.is_empty())
        .filter_map(|record| {
            let tab = record.iter().position(|b| *b == b'\t')?;
            let meta = std::str::from_utf8(&record[..tab]).ok()?;
            let mut fields = meta.split_whitespace();
            let mode = i32::from_str_radix(fields.next()?, 8).ok()?;
            let kind = fields.next()?.to_owned();
            let oid = fields.next()?.to_owned();
            let size = fields.next().and_then(|s| s.parse().ok());
            Some(LsTreeEntry {
                mode,
                kind,
                oid,
                size,
                path: record[tab + 1..].to_vec(),
            })
        })
        .collect()
}

#[tonic::async_trait]
impl RefService for Service {
    async fn find_branch(
        &self,
        request: Request<FindBranchRequest>,
    ) -> Result<Response<FindBranchResponse>, Status> {
        self.count("FindBranch");
        let request = request.into_inner();
        let repo = self.repository(request.repository.as_ref())?;
        let name = bytes_text(&request.name, "branch name")?;
        let name = name.strip_prefix("refs/heads/").unwrap_or(&name);
        if name.is_empty() || name.contains("..") || name.contains(char::is_whitespace) {
            return Err(Status::invalid_argument("invalid branch name"));
        }
        let reference = format!("refs/heads/{name}^{{commit}}");
        let Some(out) = git(&repo, &["rev-parse", "--verify", "--quiet", &reference]).await? else {
            return Err(Status::not_found("branch not found"));
        };
        let id = String::from_utf8_lossy(&out).trim().to_owned();
        Ok(Response::new(FindBranchResponse {
            branch: Some(Branch {
                name: name.as_bytes().to_vec(),
                target_commit: Some(GitCommit {
                    id,
                    ..Default::default()
                }),
            }),
        }))
    }
}

#[tonic::async_trait]
impl CommitService for Service {
    type TreeEntryStream = ReceiverStream<Result<TreeEntryResponse, Status>>;
    type GetTreeEntriesStream = ReceiverStream<Result<GetTreeEntriesResponse, Status>>;

    async fn find_commit(
        &self,
        request: Request<FindCommitRequest>,
    ) -> Result<Response<FindCommitResponse>, Status> {
        self.count("FindCommit");
        let request = request.into_inner();
        let repo = self.repository(request.repository.as_ref())?;
        let rev = revision(&request.revision)?;
        let id = git(
            &repo,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{rev}^{{commit}}"),
            ],
        )
        .await?;
        // Like Gitaly: no commit is an empty answer, not an error.
        Ok(Response::new(FindCommitResponse {
            commit: id.map(|id| GitCommit {
                id: String::from_utf8_lossy(&id).trim().to_owned(),
                ..Default::default()
            }),
        }))
    }

    async fn tree_entry(
        &self,
        request: Request<TreeEntryRequest>,
    ) -> Result<Response<Self::TreeEntryStream>, Status> {
        self.count("TreeEntry");
        let request = request.into_inner();
        let repo = self.repository(request.repository.as_ref())?;
        let rev = revision(&request.revision)?;
        let path = repo_path(&request.path)?;
        if path.is_empty() {
            return Err(Status::invalid_argument("empty path"));
        }
        let listing = git(&repo, &["ls-tree", "-z", "--long", &rev, "--", &path])
            .await?
            .ok_or_else(|| Status::not_found("tree entry not found"))?;
        let entry = parse_ls_tree(&listing)
            .into_iter()
            .find(|e| e.path == path.as_bytes())
            .ok_or_else(|| Status::not_found("tree entry not found"))?;
        let kind = match entry.kind.as_str() {
            "blob" => ObjectType::Blob,
            "tree" => ObjectType::Tree,
            _ => ObjectType::Commit,
        };
        let size = entry.size.unwrap_or(0);
        if kind == ObjectType::Blob && request.max_size > 0 && size > request.max_size {
            return Err(Status::failed_precondition(format!(
                "object size ({size}) is bigger than the maximum allowed size ({})",
                request.max_size
            )));
        }
        let data = if kind == ObjectType::Blob {
            git(&repo, &["cat-file", "blob", &entry.oid])
                .await?
                .ok_or_else(|| Status::internal("blob vanished"))?
        } else {
            Vec::new()
        };
        let (tx, rx) = mpsc::channel(4);
        let head = TreeEntryResponse {
            r#type: kind as i32,
            oid: entry.oid,
            size,
            mode: entry.mode,
            data: Vec::new(),
        };
        tokio::spawn(async move {
            let mut chunks = data.chunks(CHUNK);
            let mut first = head;
            first.data = chunks.next().map(<[u8]>::to_vec).unwrap_or_default();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            for chunk in chunks {
                let message = TreeEntryResponse {
                    data: chunk.to_vec(),
                    ..Default::default()
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_tree_entries(
        &self,
        request: Request<GetTreeEntriesRequest>,
    ) -> Result<Response<Self::GetTreeEntriesStream>, Status> {
        self.count("GetTreeEntries");
        let request = request.into_inner();
        let repo = self.repository(request.repository.as_ref())?;
        let rev = revision(&request.revision)?;
        let path = repo_path(&request.path)?;
        let invalid = || Status::invalid_argument("invalid revision or path");
        let commit = git(
            &repo,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("{rev}^{{commit}}"),
            ],
        )
        .await?
        .ok_or_else(invalid)?;
        let commit = String::from_utf8_lossy(&commit).trim().to_owned();
        // `<commit>:<path>` names the path's object (everything after the colon is the
        // path, so no `^{tree}` suffix can follow): it must be a tree.
        let tree = format!("{commit}:{path}");
        let kind = git(&repo, &["cat-file", "-t", &tree]).await?;
        if kind.as_deref().map(<[u8]>::trim_ascii) != Some(b"tree") {
            return Err(invalid());
        }
        let mut args = vec!["ls-tree", "-z"];
        if request.recursive {
            args.extend(["-r", "-t"]);
        }
        args.push(&commit);
        let prefix = format!("{path}/");
        if !path.is_empty() {
            args.extend(["--", &prefix]);
        }
        let listing = git(&repo, &args).await?.ok_or_else(invalid)?;
        let entries: Vec<TreeEntry> = parse_ls_tree(&listing)
            .into_iter()
            .filter(|e| e.path != path.as_bytes())
            .map(|e| TreeEntry {
                oid: e.oid,
                flat_path: e.path.clone(),
                path: e.path,
                r#type: match e.kind.as_str() {
                    "blob" => EntryType::Blob,
                    "tree" => EntryType::Tree,
                    _ => EntryType::Commit,
                } as i32,
                mode: e.mode,
                commit_oid: commit.clone(),
            })
            .collect();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
                let message = GetTreeEntriesResponse {
                    entries: chunk.to_vec(),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Commits with the `git` CLI, for the local stack and tests: `git init` when `dir` is not
/// a repository yet (on `branch`), then stage everything and commit if anything changed.
/// Returns the new head commit.
pub fn commit_all(dir: &Path, branch: &str, message: &str) -> std::io::Result<String> {
    let run = |args: &[&str]| -> std::io::Result<std::process::Output> {
        let output = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=kas dev",
                "-c",
                "user.email=kas-dev@example.invalid",
                "-c",
                "commit.gpgsign=false",
                "-c",
                "core.hooksPath=/dev/null",
            ])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(std::io::Error::other(format!(
                "git {} in {}: {}",
                args.join(" "),
                dir.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    };
    std::fs::create_dir_all(dir)?;
    if !dir.join(".git").exists() {
        run(&["init", "--quiet", "--initial-branch", branch])?;
    }
    run(&["add", "--all"])?;
    let has_head = run(&["rev-parse", "--verify", "--quiet", "HEAD"]).is_ok();
    let unchanged = run(&["diff", "--cached", "--quiet"]).is_ok();
    if !(has_head && unchanged) {
        run(&[
            "commit",
            "--quiet",
            "--allow-empty",
            "--no-verify",
            "-m",
            message,
        ])?;
    }
    let head = run(&["rev-parse", "HEAD"])?;
    Ok(String::from_utf8_lossy(&head.stdout).trim().to_owned())
}
