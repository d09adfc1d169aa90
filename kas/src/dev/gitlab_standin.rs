//! A local stand-in for the parts of GitLab's API kas uses, speaking the real shape:
//! the same paths, the `Gitlab-Kas-Api-Request` JWT check, bearer agent tokens and JSON
//! bodies. The local stack and the tests run kas against it, so kas's GitLab code runs
//! exactly as it would against gitlab.com.
//!
//! Repositories are real git repositories under `<repo_root>/<project_path>`, served by a
//! Gitaly stand-in ([`crate::sources::gitaly::standin`]) that this stand-in starts on the same
//! address; `agent_info` and `project_info` point at it (`gitaly_info`,
//! `gitaly_repository`), or at another Gitaly set with [`GitlabStandin::set_gitaly`].
//! Like GitLab, the REST repository API refuses agent tokens and takes only an API token
//! (`PRIVATE-TOKEN`, [`GitlabStandin::api_token`]).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::gitaly_standin::{commit_all, GitalyStandin, STORAGE};
use base64::Engine;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::standin_proxy_access::ProxyAccess;
pub use super::standin_proxy_access::{StandinAllowedAgent, StandinCiJob, StandinProxyUser};
use crate::gitlab::{verify_api_request_jwt, SharedSecret, JWT_HEADER};
use crate::sources::config_file_path;

/// An agent the stand-in knows.
#[derive(Debug, Clone)]
pub struct StandinAgent {
    pub token: String,
    pub agent_id: i64,
    pub agent_name: String,
    pub project_id: i64,
    pub project_path: String,
    pub default_branch: String,
    /// Answer 403 instead of the agent's info (a token GitLab knows but refuses).
    pub forbidden: bool,
    /// The repository's `relative_path` on the Gitaly server; `None`: `project_path`.
    pub relative_path: Option<String>,
}

/// A project the stand-in knows besides the agents' own (e.g. a GitOps manifest project).
#[derive(Debug, Clone)]
pub struct StandinProject {
    pub project_id: i64,
    pub project_path: String,
    pub default_branch: String,
    /// `None`: `project_path`.
    pub relative_path: Option<String>,
}

impl StandinProject {
    fn relative_path(&self) -> &str {
        self.relative_path.as_deref().unwrap_or(&self.project_path)
    }
}

impl StandinAgent {
    pub fn project(&self) -> StandinProject {
        StandinProject {
            project_id: self.project_id,
            project_path: self.project_path.clone(),
            default_branch: self.default_branch.clone(),
            relative_path: self.relative_path.clone(),
        }
    }
}

/// A GitLab outage the stand-in plays, for tests and the faults scenario
/// ([`GitlabStandin::set_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GitlabFault {
    /// Answers normally.
    #[default]
    None,
    /// Every call answers 503, like GitLab behind its load balancer during an outage.
    Unavailable,
    /// Every call answers (normally) only after this delay, like an overloaded GitLab.
    Slow(Duration),
}

/// The Gitaly server `agent_info` and `project_info` name.
#[derive(Debug, Clone)]
struct GitalyTarget {
    address: String,
    token: String,
}

impl StandinAgent {
    pub fn demo(token: &str) -> Self {
        Self {
            token: token.to_owned(),
            agent_id: 1,
            agent_name: "demo".into(),
            project_id: 1,
            project_path: "demo-group/demo-project".into(),
            default_branch: "main".into(),
            forbidden: false,
            relative_path: None,
        }
    }
}

struct State {
    secret: SharedSecret,
    repo_root: PathBuf,
    agents: Mutex<HashMap<String, StandinAgent>>,
    projects: Mutex<Vec<StandinProject>>,
    gitaly: Mutex<GitalyTarget>,
    api_token: String,
    /// The outage being played, if any.
    fault: Mutex<GitlabFault>,
    last_jwt: Mutex<Option<String>>,
    /// Every request, counted when it arrives (before a [`GitlabFault::Slow`] delay).
    requests_received: AtomicU64,
    /// When the latest [`ARRIVALS_KEPT`] requests arrived: how kas paced its calls.
    arrivals: Mutex<VecDeque<Instant>>,
    /// Requests being answered now, and the most there ever were at once.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    agent_info_requests: AtomicU64,
    project_info_requests: AtomicU64,
    /// kas API ports told about pushes (GitLab's `gitlab_kas.internal_url`).
    kas_apis: Mutex<Vec<SocketAddr>>,
    /// CI jobs and users of the Kubernetes API proxy.
    proxy_access: ProxyAccess,
}

/// Arrival times kept: a test's burst of calls, while a long-running local stack's memory
/// stays bounded.
const ARRIVALS_KEPT: usize = 4096;

/// A running stand-in. Dropping it stops the server.
pub struct GitlabStandin {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
    gitaly: GitalyStandin,
}

impl Drop for GitlabStandin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn message(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({ "message": text }))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A repository-relative path that stays inside the repository.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// Runs git in `repo` and returns stdout on success (REST API emulation only).
fn git_output(repo: &Path, args: &[&str]) -> Option<Vec<u8>> {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    output.status.success().then_some(output.stdout)
}

impl State {
    fn arrived(&self, at: Instant) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        if arrivals.len() == ARRIVALS_KEPT {
            arrivals.pop_front();
        }
        arrivals.push_back(at);
    }

    fn fault(&self) -> GitlabFault {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn repo_dir(&self, project: &StandinProject) -> Option<PathBuf> {
        let relative = project.relative_path();
        safe_relative(relative).then(|| self.repo_root.join(relative))
    }

    fn rest_head(&self, project: &StandinProject, branch: &str) -> Option<String> {
        if branch.starts_with('-') {
            return None;
        }
        let out = git_output(
            &self.repo_dir(project)?,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("refs/heads/{branch}^{{commit}}"),
            ],
        )?;
        Some(String::from_utf8_lossy(&out).trim().to_owned())
    }

    fn rest_file(&self, project: &StandinProject, path: &str, git_ref: &str) -> Option<Vec<u8>> {
        if !safe_relative(path) || git_ref.is_empty() || git_ref.starts_with('-') {
            return None;
        }
        git_output(
            &self.repo_dir(project)?,
            &["cat-file", "blob", &format!("{git_ref}:{path}")],
        )
    }

    fn project_json(&self, project: &StandinProject) -> serde_json::Value {
        let gitaly = self
            .gitaly
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!({
            "project_id": project.project_id,
            "gitaly_info": { "address": gitaly.address, "token": gitaly.token, "features": {} },
            "gitaly_repository": {
                "storage_name": STORAGE,
                "relative_path": project.relative_path(),
                "gl_repository": format!("project-{}", project.project_id),
                "gl_project_path": project.project_path,
            },
            "default_branch": project.default_branch,
        })
    }

    /// A project by numeric id or full path, among agents' projects and added ones.
    fn find_project(&self, id_or_path: &str) -> Option<StandinProject> {
        let matches = |p: &StandinProject| {
            p.project_path == id_or_path || id_or_path.parse::<i64>().ok() == Some(p.project_id)
        };
        if let Some(p) = self
            .projects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|p| matches(p))
        {
            return Some(p.clone());
        }
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(StandinAgent::project)
            .find(|p| matches(p))
    }

    fn project_by_path(&self, path: &str) -> Option<StandinProject> {
        let path = path.trim_matches('/');
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let from_agents = agents
            .values()
            .map(StandinAgent::project)
            .find(|p| p.project_path == path);
        drop(agents);
        from_agents.or_else(|| {
            self.projects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|p| p.project_path == path)
                .cloned()
        })
    }

    /// Sends a push event of the project to every kas API port known (in the background;
    /// failures are logged, as GitLab only logs them).
    fn notify_kas(&self, id: i64, path: &str) {
        let apis = self
            .kas_apis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for api in apis {
            let (secret, path) = (self.secret.clone(), path.to_owned());
            runtime.spawn(async move {
                if let Err(e) = super::push_events::send(api, &secret, id, &path).await {
                    tracing::warn!(error = %e, "GitLab stand-in: push event not delivered");
                }
            });
        }
    }

    fn bearer_agent(&self, req: &http::request::Parts) -> Option<StandinAgent> {
        let value = req.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ")?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    fn answer(&self, req: &http::request::Parts, body: &[u8]) -> Response<Full<Bytes>> {
        if self.fault() == GitlabFault::Unavailable {
            return message(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable");
        }
        if let Some(path) = req.uri.path().strip_prefix("/-/push/") {
            // The local repositories' post-commit hook: GitLab's own push handling, which
            // tells kas (no JWT: only the hook on this machine calls it).
            return match self.project_by_path(path) {
                Some(project) => {
                    self.notify_kas(project.project_id, &project.project_path);
                    message(StatusCode::ACCEPTED, "202 Accepted")
                }
                None => message(StatusCode::NOT_FOUND, "404 Project Not Found"),
            };
        }
        if req.uri.path() == "/api/v4/job/allowed_agents" {
            // Authenticated by the job token alone, without kas's JWT, as on GitLab.
            let token = req.headers.get("job-token").and_then(|v| v.to_str().ok());
            let (status, body) = self.proxy_access.allowed_agents(token);
            return json_response(status, body);
        }
        let jwt = req.headers.get(JWT_HEADER).and_then(|v| v.to_str().ok());
        if let Some(jwt) = jwt {
            *self.last_jwt.lock().unwrap_or_else(|p| p.into_inner()) = Some(jwt.to_owned());
        }
        if jwt
            .map(|j| verify_api_request_jwt(j, &self.secret))
            .is_none_or(|r| r.is_err())
        {
            return message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
        }
        let path = req.uri.path();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["api", "v4", "internal", "kubernetes", "agent_info"]
            | ["api", "v4", "internal", "agents", "agentk", "agent_info"] => {
                self.agent_info_requests.fetch_add(1, Ordering::SeqCst);
                match self.bearer_agent(req) {
                    None => message(StatusCode::UNAUTHORIZED, "401 Unauthorized"),
                    Some(a) if a.forbidden => message(StatusCode::FORBIDDEN, "403 Forbidden"),
                    Some(a) => {
                        let mut body = self.project_json(&a.project());
                        body["agent_id"] = json!(a.agent_id);
                        body["agent_name"] = json!(a.agent_name);
                        json_response(StatusCode::OK, body)
                    }
                }
            }
            ["api", "v4", "internal", "kubernetes", "authorize_proxy_user"] => {
                let (status, body) = self.proxy_access.authorize_proxy_user(body);
                json_response(status, body)
            }
            ["api", "v4", "internal", "kubernetes", "project_info"] => {
                self.project_info_requests.fetch_add(1, Ordering::SeqCst);
                let Some(agent) = self.bearer_agent(req) else {
                    return message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
                };
                if agent.forbidden {
                    return message(StatusCode::FORBIDDEN, "403 Forbidden");
                }
                let id = req
                    .uri
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("id="))
                    .and_then(percent_decode);
                match id.and_then(|id| self.find_project(&id)) {
                    Some(project) => json_response(StatusCode::OK, self.project_json(&project)),
                    None => message(StatusCode::NOT_FOUND, "404 Project Not Found"),
                }
            }
            ["api", "v4", "projects", id, "repository", kind, rest] => {
                // Like GitLab: the repository API takes API tokens, never agent tokens.
                let api_token = req
                    .headers
                    .get("private-token")
                    .and_then(|v| v.to_str().ok());
                if api_token != Some(self.api_token.as_str()) {
                    return message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
                }
                let Some(project) = self.find_project(id) else {
                    return message(StatusCode::NOT_FOUND, "404 Project Not Found");
                };
                let (rest, query) = (rest, req.uri.query().unwrap_or(""));
                let Some(name) = percent_decode(rest) else {
                    return message(StatusCode::BAD_REQUEST, "bad path encoding");
                };
                match *kind {
                    "branches" => match self.rest_head(&project, &name) {
                        Some(head) => json_response(
                            StatusCode::OK,
                            json!({ "name": name, "commit": { "id": head } }),
                        ),
                        None => message(StatusCode::NOT_FOUND, "404 Branch Not Found"),
                    },
                    "files" => {
                        let git_ref = query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix("ref="))
                            .and_then(percent_decode)
                            .unwrap_or_else(|| project.default_branch.clone());
                        match self.rest_file(&project, &name, &git_ref) {
                            Some(content) => json_response(
                                StatusCode::OK,
                                json!({
                                    "file_path": name,
                                    "encoding": "base64",
                                    "content": base64::engine::general_purpose::STANDARD.encode(content),
                                    "ref": git_ref,
                                }),
                            ),
                            None => message(StatusCode::NOT_FOUND, "404 File Not Found"),
                        }
                    }
                    _ => message(StatusCode::NOT_FOUND, "404 Not Found"),
                }
            }
            _ => message(StatusCode::NOT_FOUND, "404 Not Found"),
        }
    }
}

/// Counts one request in [`State::in_flight`] while it lives (dropped when the answer is
/// ready or the client went away).
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn enter(state: &'a State) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl GitlabStandin {
    /// Starts serving on `addr` (use port 0 in tests).
    pub async fn start(
        addr: SocketAddr,
        secret: SharedSecret,
        repo_root: &Path,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        // The Gitaly stand-in on the same address, its own port, with a v2 token secret.
        let gitaly_token = random_hex(16);
        std::fs::create_dir_all(repo_root)?;
        let gitaly = GitalyStandin::start(
            SocketAddr::new(addr.ip(), 0),
            repo_root,
            Some(gitaly_token.clone().into_bytes()),
        )
        .await?;
        let state = Arc::new(State {
            secret,
            repo_root: repo_root.to_owned(),
            agents: Mutex::new(HashMap::new()),
            projects: Mutex::new(Vec::new()),
            gitaly: Mutex::new(GitalyTarget {
                address: gitaly.address(),
                token: gitaly_token,
            }),
            api_token: format!("glpat-standin-{}", random_hex(10)),
            fault: Mutex::new(GitlabFault::None),
            last_jwt: Mutex::new(None),
            requests_received: AtomicU64::new(0),
            arrivals: Mutex::new(VecDeque::new()),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            agent_info_requests: AtomicU64::new(0),
            project_info_requests: AtomicU64::new(0),
            proxy_access: ProxyAccess::default(),
            kas_apis: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let (st, stop2) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = stop2.cancelled() => return,
                };
                let st = st.clone();
                let stop = stop2.clone();
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req: Request<Incoming>| {
                            let st = st.clone();
                            async move {
                                st.requests_received.fetch_add(1, Ordering::SeqCst);
                                st.arrived(Instant::now());
                                let _answering = InFlight::enter(&st);
                                if let GitlabFault::Slow(delay) = st.fault() {
                                    tokio::time::sleep(delay).await;
                                }
                                let (parts, body) = req.into_parts();
                                // GitLab's request bodies here are small JSON objects.
                                let body = http_body_util::Limited::new(body, 64 * 1024)
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                Ok::<_, Infallible>(st.answer(&parts, &body))
                            }
                        }),
                    );
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            state,
            stop,
            gitaly,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn add_agent(&self, agent: StandinAgent) {
        self.state
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.token.clone(), agent);
    }

    /// Writes the agent's `config.yaml` and commits it on the agent's default branch (a
    /// git repository is created the first time). Returns the file's path.
    pub fn write_agent_config(&self, agent: &StandinAgent, yaml: &str) -> std::io::Result<PathBuf> {
        let path = config_file_path(&agent.agent_name);
        self.commit_files(&agent.project(), &[(&path, Some(yaml.as_bytes()))])?;
        let dir = self
            .state
            .repo_dir(&agent.project())
            .ok_or_else(|| std::io::Error::other("invalid repository path"))?;
        Ok(dir.join(path))
    }

    /// Writes (`Some`) or deletes (`None`) files in a project's repository and commits
    /// them on its default branch. Returns the new head commit.
    pub fn commit_files(
        &self,
        project: &StandinProject,
        files: &[(&str, Option<&[u8]>)],
    ) -> std::io::Result<String> {
        let dir = self
            .state
            .repo_dir(project)
            .ok_or_else(|| std::io::Error::other("invalid repository path"))?;
        for (path, content) in files {
            if !safe_relative(path) {
                return Err(std::io::Error::other(format!("invalid file path {path:?}")));
            }
            let file = dir.join(path);
            match content {
                Some(content) => {
                    if let Some(parent) = file.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&file, content)?;
                }
                None => match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                },
            }
        }
        let head = commit_all(&dir, &project.default_branch, "kas stand-in commit")?;
        self.state
            .notify_kas(project.project_id, &project.project_path);
        Ok(head)
    }

    /// Tells these kas API ports about every push from now on (commits made through the
    /// stand-in, and the local repositories' post-commit hook), as GitLab does.
    pub fn set_kas_apis(&self, apis: Vec<SocketAddr>) {
        *self
            .state
            .kas_apis
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = apis;
    }

    /// A project `project_info` answers for (e.g. a GitOps manifest project).
    pub fn add_project(&self, project: StandinProject) {
        self.state
            .projects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(project);
    }

    /// Forgets an agent token: GitLab answers 401 for it from now on (a revoked token).
    pub fn remove_agent(&self, token: &str) {
        self.state
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token);
    }

    /// Points `gitaly_info` at another Gitaly server (e.g. HGitaly in tests).
    pub fn set_gitaly(&self, address: &str, token: &str) {
        *self.state.gitaly.lock().unwrap_or_else(|p| p.into_inner()) = GitalyTarget {
            address: address.to_owned(),
            token: token.to_owned(),
        };
    }

    /// The Gitaly stand-in serving `repo_root`.
    pub fn gitaly(&self) -> &GitalyStandin {
        &self.gitaly
    }

    /// The API token the REST repository API accepts (`PRIVATE-TOKEN`).
    pub fn api_token(&self) -> &str {
        &self.state.api_token
    }

    /// Plays an outage from the next call on (calls already waiting keep the delay they
    /// started with); [`GitlabFault::None`] ends it.
    pub fn set_fault(&self, fault: GitlabFault) {
        *self.state.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// `set_fault(Unavailable)` while `down`, `set_fault(None)` after.
    pub fn set_down(&self, down: bool) {
        self.set_fault(if down {
            GitlabFault::Unavailable
        } else {
            GitlabFault::None
        });
    }

    /// The last `Gitlab-Kas-Api-Request` header received, for tests to verify.
    pub fn last_jwt(&self) -> Option<String> {
        self.state
            .last_jwt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests of any kind, counted as they arrive (a slow answer is counted at once).
    pub fn requests_received(&self) -> u64 {
        self.state.requests_received.load(Ordering::SeqCst)
    }

    /// When requests of any kind arrived (the latest 4096), oldest first.
    pub fn request_arrivals(&self) -> Vec<Instant> {
        let arrivals = self
            .state
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        arrivals.iter().copied().collect()
    }

    /// The most requests the stand-in was answering at once (a slow GitLab's view of how
    /// many calls kas keeps waiting on it).
    pub fn max_requests_in_flight(&self) -> u64 {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// `agent_info` requests answered (counted when answered, after any delay).
    pub fn agent_info_requests(&self) -> u64 {
        self.state.agent_info_requests.load(Ordering::SeqCst)
    }

    /// A CI job whose token `GET /api/v4/job/allowed_agents` accepts.
    pub fn add_ci_job(&self, job: StandinCiJob) {
        self.state.proxy_access.add_job(job);
    }

    /// A user `authorize_proxy_user` accepts (personal access token or session cookie).
    pub fn add_proxy_user(&self, user: StandinProxyUser) {
        self.state.proxy_access.add_user(user);
    }

    pub fn project_info_requests(&self) -> u64 {
        self.state.project_info_requests.load(Ordering::SeqCst)
    }
}
