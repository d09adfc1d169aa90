//! A local stand-in for the parts of GitLab's API kas uses, speaking the real shape:
//! the same paths, the `Gitlab-Kas-Api-Request` JWT check, bearer agent tokens and JSON
//! bodies. The local stack and the tests run kas against it, so kas's GitLab code runs
//! exactly as it would against gitlab.com.
//!
//! Repository content is read from disk: `<repo_root>/<project_path>/<file path>`; the
//! "branch head" is a digest of the agent's config file, so editing the file is a commit.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent_config::config_file_path;
use crate::gitlab::{verify_api_request_jwt, SharedSecret, JWT_HEADER};

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
        }
    }
}

struct State {
    secret: SharedSecret,
    repo_root: PathBuf,
    agents: Mutex<HashMap<String, StandinAgent>>,
    /// When set, every request gets a 503, like GitLab in an outage.
    down: AtomicBool,
    last_jwt: Mutex<Option<String>>,
    agent_info_requests: AtomicU64,
}

/// A running stand-in. Dropping it stops the server.
pub struct GitlabStandin {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
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

impl State {
    fn file_path(&self, agent: &StandinAgent, path: &str) -> Option<PathBuf> {
        // Refuse anything that could step outside the project directory.
        if path.split('/').any(|c| c == ".." || c.is_empty()) {
            return None;
        }
        Some(self.repo_root.join(&agent.project_path).join(path))
    }

    fn head_commit(&self, agent: &StandinAgent) -> String {
        let path = self.file_path(agent, &config_file_path(&agent.agent_name));
        let content = path.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
        let digest = Sha256::digest(&content);
        digest.iter().take(20).map(|b| format!("{b:02x}")).collect()
    }

    fn bearer_agent(&self, req: &Request<Incoming>) -> Option<StandinAgent> {
        let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ")?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if self.down.load(Ordering::SeqCst) {
            return message(StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable");
        }
        let jwt = req.headers().get(JWT_HEADER).and_then(|v| v.to_str().ok());
        if let Some(jwt) = jwt {
            *self.last_jwt.lock().unwrap_or_else(|p| p.into_inner()) = Some(jwt.to_owned());
        }
        if jwt
            .map(|j| verify_api_request_jwt(j, &self.secret))
            .is_none_or(|r| r.is_err())
        {
            return message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
        }
        let path = req.uri().path();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match segments.as_slice() {
            ["api", "v4", "internal", "kubernetes", "agent_info"]
            | ["api", "v4", "internal", "agents", "agentk", "agent_info"] => {
                self.agent_info_requests.fetch_add(1, Ordering::SeqCst);
                match self.bearer_agent(req) {
                    None => message(StatusCode::UNAUTHORIZED, "401 Unauthorized"),
                    Some(a) if a.forbidden => message(StatusCode::FORBIDDEN, "403 Forbidden"),
                    Some(a) => json_response(
                        StatusCode::OK,
                        json!({
                            "project_id": a.project_id,
                            "agent_id": a.agent_id,
                            "agent_name": a.agent_name,
                            "gitaly_info": { "address": "tcp://gitaly.invalid:8075", "token": "", "features": {} },
                            "gitaly_repository": {
                                "storage_name": "default",
                                "relative_path": format!("{}.git", a.project_path),
                                "gl_repository": format!("project-{}", a.project_id),
                                "gl_project_path": a.project_path,
                            },
                            "default_branch": a.default_branch,
                        }),
                    ),
                }
            }
            ["api", "v4", "projects", id, "repository", kind, rest] => {
                let Some(agent) = self.bearer_agent(req) else {
                    return message(StatusCode::UNAUTHORIZED, "401 Unauthorized");
                };
                if id.parse::<i64>().ok() != Some(agent.project_id) {
                    return message(StatusCode::NOT_FOUND, "404 Project Not Found");
                }
                let Some(name) = percent_decode(rest) else {
                    return message(StatusCode::BAD_REQUEST, "bad path encoding");
                };
                match *kind {
                    "branches" if name == agent.default_branch => json_response(
                        StatusCode::OK,
                        json!({ "name": name, "commit": { "id": self.head_commit(&agent) } }),
                    ),
                    "files" => match self.file_path(&agent, &name).map(std::fs::read) {
                        Some(Ok(content)) => json_response(
                            StatusCode::OK,
                            json!({
                                "file_path": name,
                                "encoding": "base64",
                                "content": base64::engine::general_purpose::STANDARD.encode(content),
                                "ref": agent.default_branch,
                                "commit_id": self.head_commit(&agent),
                            }),
                        ),
                        _ => message(StatusCode::NOT_FOUND, "404 File Not Found"),
                    },
                    _ => message(StatusCode::NOT_FOUND, "404 Not Found"),
                }
            }
            _ => message(StatusCode::NOT_FOUND, "404 Not Found"),
        }
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
        let state = Arc::new(State {
            secret,
            repo_root: repo_root.to_owned(),
            agents: Mutex::new(HashMap::new()),
            down: AtomicBool::new(false),
            last_jwt: Mutex::new(None),
            agent_info_requests: AtomicU64::new(0),
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
                        service_fn(move |req| {
                            let response = st.answer(&req);
                            async move { Ok::<_, Infallible>(response) }
                        }),
                    );
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self { addr, state, stop })
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

    /// Writes the agent's `config.yaml` (a new "commit").
    pub fn write_agent_config(&self, agent: &StandinAgent, yaml: &str) -> std::io::Result<PathBuf> {
        let path = self
            .state
            .file_path(agent, &config_file_path(&agent.agent_name))
            .ok_or_else(|| std::io::Error::other("invalid agent name"))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, yaml)?;
        Ok(path)
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// The last `Gitlab-Kas-Api-Request` header received, for tests to verify.
    pub fn last_jwt(&self) -> Option<String> {
        self.state
            .last_jwt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn agent_info_requests(&self) -> u64 {
        self.state.agent_info_requests.load(Ordering::SeqCst)
    }
}
