use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use prometheus::{Counter, HistogramVec, IntCounterVec};
use serde::Deserialize;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant as TokioInstant;

use super::jwt::{sign_api_request_jwt, JWT_HEADER};
use super::SharedSecret;
use super::{GitalyInfo, GitalyLocation, GitalyRepository};

/// What GitLab tells kas about an agent token (`GET /api/v4/internal/kubernetes/agent_info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub agent_id: i64,
    pub agent_name: String,
    pub project_id: i64,
    pub project_path: String,
    pub default_branch: String,
    /// Where the agent's project repository lives (`gitaly_info` + `gitaly_repository`);
    /// `None` when GitLab's answer has no Gitaly location.
    pub gitaly: Option<GitalyLocation>,
}

/// What GitLab tells kas about another project (`GET /api/v4/internal/kubernetes/project_info`),
/// e.g. a GitOps manifest project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInfo {
    pub project_id: i64,
    pub default_branch: String,
    pub gitaly: Option<GitalyLocation>,
}

/// GitLab's answer, reduced to what a gRPC caller can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitlabError {
    #[error("GitLab rejected the agent token")]
    Unauthenticated,
    #[error("GitLab denied access")]
    PermissionDenied,
    #[error("GitLab does not know this agent or resource")]
    NotFound,
    #[error("GitLab is unavailable: {0}")]
    Unavailable(String),
}

impl GitlabError {
    /// A definite answer about the token, as opposed to GitLab being unreachable.
    pub fn is_definite(&self) -> bool {
        !matches!(self, GitlabError::Unavailable(_))
    }

    pub fn outcome_label(&self) -> &'static str {
        match self {
            GitlabError::Unauthenticated => "unauthenticated",
            GitlabError::PermissionDenied => "permission_denied",
            GitlabError::NotFound => "not_found",
            GitlabError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<GitlabError> for tonic::Status {
    fn from(e: GitlabError) -> Self {
        match e {
            // The exact message agentk shows operators for a bad token or shared secret.
            GitlabError::Unauthenticated => tonic::Status::unauthenticated("unauthenticated"),
            GitlabError::PermissionDenied => tonic::Status::permission_denied("forbidden"),
            GitlabError::NotFound => tonic::Status::not_found("agent not found"),
            GitlabError::Unavailable(_) => {
                tonic::Status::unavailable("GitLab is unavailable, try again later")
            }
        }
    }
}

/// How a repository read is authorised.
#[derive(Clone, Copy)]
pub enum RepoAuth<'a> {
    /// The agent's own token (what the local GitLab stand-in accepts).
    AgentToken(&'a str),
    /// A GitLab API token with read_repository.
    ApiToken(&'a str),
}

#[derive(Clone)]
pub struct GitlabClient {
    http: reqwest::Client,
    base: String,
    secret: SharedSecret,
    latency: HistogramVec,
    /// Failures that are GitLab's (unreachable, slow, 5xx), by endpoint and kind.
    errors: IntCounterVec,
    /// Bounds the calls in flight (`gitlab.max_concurrent_requests`).
    slots: Arc<Semaphore>,
    /// Paces the calls started (`gitlab.api_rate_limit`), shared by every clone.
    rate: Arc<DefaultDirectRateLimiter>,
    /// Calls that waited for a token, by endpoint, and the seconds they waited.
    rate_limited: IntCounterVec,
    rate_limit_wait: Counter,
    /// The whole of a call, the waits for a token and a slot included (`gitlab.api_timeout`).
    timeout: Duration,
}

/// Why a call did not get to GitLab, or what GitLab answered, with the kind counted in
/// `kas_gitlab_api_errors_total` when it is GitLab's (or the limits') fault.
type CallError = (GitlabError, Option<&'static str>);

#[derive(Deserialize)]
struct AgentInfoBody {
    project_id: i64,
    agent_id: i64,
    agent_name: String,
    #[serde(default)]
    default_branch: String,
    #[serde(default)]
    gitaly_info: Option<GitalyInfo>,
    #[serde(default)]
    gitaly_repository: Option<GitalyRepository>,
}

#[derive(Deserialize)]
struct ProjectInfoBody {
    project_id: i64,
    #[serde(default)]
    default_branch: String,
    #[serde(default)]
    gitaly_info: Option<GitalyInfo>,
    #[serde(default)]
    gitaly_repository: Option<GitalyRepository>,
}

fn location(
    info: Option<GitalyInfo>,
    repository: Option<GitalyRepository>,
) -> Option<GitalyLocation> {
    match (info, repository) {
        (Some(info), Some(repository)) if !info.address.is_empty() => {
            Some(GitalyLocation { info, repository })
        }
        _ => None,
    }
}

fn default_branch_or_main(branch: String) -> String {
    if branch.is_empty() {
        "main".into()
    } else {
        branch
    }
}

#[derive(Deserialize)]
struct BranchBody {
    commit: CommitBody,
}

#[derive(Deserialize)]
struct CommitBody {
    id: String,
}

#[derive(Deserialize)]
struct FileBody {
    content: String,
    #[serde(default)]
    encoding: String,
}

/// Percent-encodes one URL path segment the way GitLab's API wants ids and file paths
/// (`/` becomes `%2F`).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl GitlabClient {
    /// A client for `config.address` with `config`'s timeout and limits, counting into
    /// `metrics`.
    pub fn new(
        config: &crate::config::GitlabConfig,
        secret: SharedSecret,
        metrics: &crate::telemetry::metrics::Metrics,
    ) -> anyhow::Result<Self> {
        let timeout = config.api_timeout;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("kas-edge-kas/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: config.address.trim_end_matches('/').to_owned(),
            secret,
            latency: metrics.gitlab_api_latency.clone(),
            errors: metrics.gitlab_api_errors.clone(),
            slots: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            rate: Arc::new(RateLimiter::direct(config.api_rate_limit.quota())),
            rate_limited: metrics.gitlab_api_rate_limited.clone(),
            rate_limit_wait: metrics.gitlab_api_rate_limit_wait.clone(),
            timeout,
        })
    }

    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Adds kas's `Gitlab-Kas-Api-Request` JWT, which GitLab's internal API requires.
    pub(super) fn with_jwt(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, GitlabError> {
        let jwt = sign_api_request_jwt(&self.secret).map_err(GitlabError::Unavailable)?;
        Ok(request.header(JWT_HEADER, jwt))
    }

    /// One GET against GitLab with kas's JWT.
    async fn get(
        &self,
        endpoint: &'static str,
        path: &str,
        auth: RepoAuth<'_>,
    ) -> Result<bytes::Bytes, GitlabError> {
        let request = self
            .http
            .get(self.url(path))
            .header(http::header::ACCEPT, "application/json");
        let request = match auth {
            RepoAuth::AgentToken(token) => request.bearer_auth(token),
            RepoAuth::ApiToken(token) => request.header("PRIVATE-TOKEN", token),
        };
        let request = self.with_jwt(request)?;
        self.send(endpoint, request).await
    }

    /// Sends one request to GitLab; maps transport failures and statuses to `GitlabError`
    /// and records latency per endpoint and outcome.
    pub(super) async fn send(
        &self,
        endpoint: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, GitlabError> {
        let started = Instant::now();
        let result = match self.admit(endpoint, started).await {
            Ok(_slot) => {
                // The call gets what is left of the timeout after the waits.
                let left = self.timeout.saturating_sub(started.elapsed());
                Self::send_inner(request.timeout(left)).await
            }
            Err(e) => Err(e),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err((e, kind)) => {
                if let Some(kind) = kind {
                    self.errors.with_label_values(&[endpoint, kind]).inc();
                }
                e.outcome_label()
            }
        };
        self.latency
            .with_label_values(&[endpoint, outcome])
            .observe(started.elapsed().as_secs_f64());
        result.map_err(|(e, _)| e)
    }

    /// Waits for a token of `gitlab.api_rate_limit`, then for a free slot of
    /// `gitlab.max_concurrent_requests`, both within `gitlab.api_timeout` from `started`:
    /// a limited call is delayed, and fails only when the wait outlasts the timeout.
    async fn admit(
        &self,
        endpoint: &'static str,
        started: Instant,
    ) -> Result<SemaphorePermit<'_>, CallError> {
        let deadline = TokioInstant::from_std(started) + self.timeout;
        if self.rate.check().is_err() {
            self.rate_limited.with_label_values(&[endpoint]).inc();
            let waiting = Instant::now();
            let ready = tokio::time::timeout_at(deadline, self.rate.until_ready()).await;
            self.rate_limit_wait.inc_by(waiting.elapsed().as_secs_f64());
            if ready.is_err() {
                return Err((
                    GitlabError::Unavailable(format!(
                        "no GitLab API call allowed within {:?} (gitlab.api_rate_limit)",
                        self.timeout
                    )),
                    Some("rate_limited"),
                ));
            }
        }
        match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err((
                GitlabError::Unavailable(format!(
                    "no free slot for a GitLab call within {:?} \
                     (gitlab.max_concurrent_requests calls in flight)",
                    self.timeout
                )),
                Some("saturated"),
            )),
        }
    }

    /// The request's answer, or the error with, when it is GitLab's fault, its kind.
    async fn send_inner(request: reqwest::RequestBuilder) -> Result<bytes::Bytes, CallError> {
        // reqwest's error text names the URL but never headers, so no token leaks.
        let transport = |e: reqwest::Error| {
            let kind = if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "transport"
            };
            (
                GitlabError::Unavailable(e.without_url().to_string()),
                Some(kind),
            )
        };
        let response = request.send().await.map_err(transport)?;
        match response.status().as_u16() {
            200..=299 => response.bytes().await.map_err(transport),
            401 => Err((GitlabError::Unauthenticated, None)),
            403 => Err((GitlabError::PermissionDenied, None)),
            404 => Err((GitlabError::NotFound, None)),
            status => Err((
                GitlabError::Unavailable(format!("HTTP status {status}")),
                Some(if status >= 500 {
                    "http_5xx"
                } else {
                    "http_other"
                }),
            )),
        }
    }

    pub(super) fn decode<T: for<'de> Deserialize<'de>>(
        body: &[u8],
        what: &str,
    ) -> Result<T, GitlabError> {
        serde_json::from_slice(body)
            .map_err(|e| GitlabError::Unavailable(format!("unexpected {what} response: {e}")))
    }

    pub async fn agent_info(&self, agent_token: &str) -> Result<AgentInfo, GitlabError> {
        let body = self
            .get(
                "agent_info",
                "/api/v4/internal/kubernetes/agent_info",
                RepoAuth::AgentToken(agent_token),
            )
            .await?;
        let info: AgentInfoBody = Self::decode(&body, "agent_info")?;
        Ok(AgentInfo {
            agent_id: info.agent_id,
            agent_name: info.agent_name,
            project_id: info.project_id,
            project_path: info
                .gitaly_repository
                .as_ref()
                .map(|r| r.gl_project_path.clone())
                .unwrap_or_default(),
            default_branch: default_branch_or_main(info.default_branch),
            gitaly: location(info.gitaly_info, info.gitaly_repository),
        })
    }

    /// Where another project's repository lives, asked with the agent's token (GitLab
    /// checks the agent may read it). `project` is a numeric id or a full path.
    pub async fn project_info(
        &self,
        agent_token: &str,
        project: &str,
    ) -> Result<ProjectInfo, GitlabError> {
        let path = format!(
            "/api/v4/internal/kubernetes/project_info?id={}",
            encode_segment(project)
        );
        let body = self
            .get("project_info", &path, RepoAuth::AgentToken(agent_token))
            .await?;
        let info: ProjectInfoBody = Self::decode(&body, "project_info")?;
        Ok(ProjectInfo {
            project_id: info.project_id,
            default_branch: default_branch_or_main(info.default_branch),
            gitaly: location(info.gitaly_info, info.gitaly_repository),
        })
    }

    /// The commit id at the head of `branch`.
    pub async fn branch_head(
        &self,
        auth: RepoAuth<'_>,
        project_id: i64,
        branch: &str,
    ) -> Result<String, GitlabError> {
        let path = format!(
            "/api/v4/projects/{project_id}/repository/branches/{}",
            encode_segment(branch)
        );
        let body = self.get("branch", &path, auth).await?;
        let branch: BranchBody = Self::decode(&body, "branch")?;
        Ok(branch.commit.id)
    }

    /// A file's bytes at `git_ref`, or `None` when it does not exist.
    pub async fn repository_file(
        &self,
        auth: RepoAuth<'_>,
        project_id: i64,
        file_path: &str,
        git_ref: &str,
    ) -> Result<Option<Vec<u8>>, GitlabError> {
        let path = format!(
            "/api/v4/projects/{project_id}/repository/files/{}?ref={}",
            encode_segment(file_path),
            encode_segment(git_ref)
        );
        let body = match self.get("repository_file", &path, auth).await {
            Ok(body) => body,
            Err(GitlabError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let file: FileBody = Self::decode(&body, "repository file")?;
        if !file.encoding.is_empty() && file.encoding != "base64" {
            return Err(GitlabError::Unavailable(format!(
                "unsupported file encoding {:?}",
                file.encoding
            )));
        }
        base64::engine::general_purpose::STANDARD
            .decode(file.content.replace(['\n', '\r'], ""))
            .map(Some)
            .map_err(|e| GitlabError::Unavailable(format!("file content is not base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::encode_segment;

    #[test]
    fn segments_are_encoded_like_gitlab_expects() {
        assert_eq!(
            encode_segment(".gitlab/agents/demo/config.yaml"),
            ".gitlab%2Fagents%2Fdemo%2Fconfig.yaml"
        );
        assert_eq!(encode_segment("a b"), "a%20b");
    }
}
