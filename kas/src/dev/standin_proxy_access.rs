//! The GitLab stand-in's answers for callers of the Kubernetes API proxy: CI jobs
//! (`GET /api/v4/job/allowed_agents` with `Job-Token`) and users
//! (`POST /api/v4/internal/kubernetes/authorize_proxy_user` with a personal access token
//! or a session cookie and its CSRF token), in GitLab's JSON shapes.

use std::collections::HashMap;
use std::sync::Mutex;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

/// A CI job GitLab knows: its token, context and the agents it may use.
#[derive(Debug, Clone)]
pub struct StandinCiJob {
    pub job_token: String,
    pub job_id: i64,
    pub pipeline_id: i64,
    pub project_id: i64,
    pub group_ids: Vec<i64>,
    pub username: String,
    /// `(slug, tier)` of the job's environment.
    pub environment: Option<(String, String)>,
    pub allowed_agents: Vec<StandinAllowedAgent>,
}

/// One agent a caller may use, with the `access_as` of the agent's configuration
/// (`{"agent": {}}`, `{"ci_job": {}}`, `{"impersonate": {...}}`, `{"user": {...}}`).
#[derive(Debug, Clone)]
pub struct StandinAllowedAgent {
    pub agent_id: i64,
    pub config_project_id: i64,
    pub access_as: Value,
}

/// A user GitLab lets through the proxy with a personal access token or session cookie.
#[derive(Debug, Clone)]
pub struct StandinProxyUser {
    /// The personal access token, or the session cookie's value.
    pub access_key: String,
    /// Required (and checked) for the session cookie, as GitLab does.
    pub csrf_token: String,
    pub user_id: i64,
    pub username: String,
    pub agents: Vec<StandinAllowedAgent>,
}

#[derive(Default)]
pub(super) struct ProxyAccess {
    jobs: Mutex<HashMap<String, StandinCiJob>>,
    users: Mutex<HashMap<String, StandinProxyUser>>,
}

#[derive(Deserialize)]
struct AuthorizeRequest {
    agent_id: i64,
    access_type: String,
    access_key: String,
    #[serde(default)]
    csrf_token: String,
}

impl ProxyAccess {
    pub(super) fn add_job(&self, job: StandinCiJob) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job.job_token.clone(), job);
    }

    pub(super) fn add_user(&self, user: StandinProxyUser) {
        self.users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user.access_key.clone(), user);
    }

    pub(super) fn allowed_agents(&self, job_token: Option<&str>) -> (StatusCode, Value) {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = job_token.and_then(|t| jobs.get(t)) else {
            return (
                StatusCode::UNAUTHORIZED,
                json!({"message": "401 Unauthorized"}),
            );
        };
        let agents: Vec<Value> = job
            .allowed_agents
            .iter()
            .map(|a| {
                json!({
                    "id": a.agent_id,
                    "config_project": {"id": a.config_project_id},
                    "configuration": {"default_namespace": "", "access_as": a.access_as},
                })
            })
            .collect();
        let mut body = json!({
            "allowed_agents": agents,
            "job": {"id": job.job_id},
            "pipeline": {"id": job.pipeline_id},
            "project": {"id": job.project_id, "groups": job.group_ids.iter().map(|g| json!({"id": g})).collect::<Vec<_>>()},
            "user": {"id": 1, "username": job.username},
        });
        if let Some((slug, tier)) = &job.environment {
            body["environment"] = json!({"slug": slug, "tier": tier});
        }
        (StatusCode::OK, body)
    }

    pub(super) fn authorize_proxy_user(&self, body: &[u8]) -> (StatusCode, Value) {
        let Ok(request) = serde_json::from_slice::<AuthorizeRequest>(body) else {
            return (
                StatusCode::BAD_REQUEST,
                json!({"message": "400 Bad request"}),
            );
        };
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let Some(user) = users.get(&request.access_key) else {
            return (
                StatusCode::UNAUTHORIZED,
                json!({"message": "401 Unauthorized"}),
            );
        };
        if request.access_type == "session_cookie" && request.csrf_token != user.csrf_token {
            return (
                StatusCode::UNAUTHORIZED,
                json!({"message": "401 Unauthorized"}),
            );
        }
        let Some(agent) = user.agents.iter().find(|a| a.agent_id == request.agent_id) else {
            return (StatusCode::FORBIDDEN, json!({"message": "403 Forbidden"}));
        };
        (
            StatusCode::OK,
            json!({
                "agent": {"id": agent.agent_id, "config_project": {"id": agent.config_project_id}},
                "user": {"id": user.user_id, "username": user.username},
                "access_as": agent.access_as,
            }),
        )
    }
}
