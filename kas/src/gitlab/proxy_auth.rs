//! GitLab's answers for callers of the Kubernetes API proxy: which agents a CI job may use
//! (`GET /api/v4/job/allowed_agents`, authenticated by the job token alone) and whether a
//! user may use an agent (`POST /api/v4/internal/kubernetes/authorize_proxy_user`, with
//! kas's JWT). JSON shapes as GitLab Rails writes them.

use serde::{Deserialize, Serialize};

use super::client::GitlabClient;
use super::GitlabError;

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Id {
    #[serde(default)]
    pub id: i64,
}

/// How a CI job's requests run in the cluster (`ci_access.*.access_as` of the agent's
/// configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CiAccessAs {
    #[serde(default)]
    pub agent: Option<serde_json::Value>,
    #[serde(default)]
    pub impersonate: Option<ImpersonateAs>,
    #[serde(default)]
    pub ci_job: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImpersonateAs {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub extra: Vec<ExtraKeyVal>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ExtraKeyVal {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub val: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AgentCiConfiguration {
    #[serde(default)]
    pub default_namespace: String,
    #[serde(default)]
    pub access_as: Option<CiAccessAs>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AllowedAgent {
    pub id: i64,
    #[serde(default)]
    pub config_project: Id,
    #[serde(default)]
    pub configuration: AgentCiConfiguration,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct JobProject {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub groups: Vec<Id>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GitlabUser {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub username: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Environment {
    #[serde(default)]
    pub slug: String,
    #[serde(default)]
    pub tier: String,
}

/// The agents a CI job may reach, and the job's context for impersonation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AllowedAgentsForJob {
    #[serde(default)]
    pub allowed_agents: Vec<AllowedAgent>,
    #[serde(default)]
    pub job: Id,
    #[serde(default)]
    pub pipeline: Id,
    #[serde(default)]
    pub project: JobProject,
    #[serde(default)]
    pub user: GitlabUser,
    #[serde(default)]
    pub environment: Option<Environment>,
}

/// How a user reaches the proxy: a personal access token, or GitLab's session cookie
/// (which needs the page's CSRF token).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserAccessType {
    PersonalAccessToken,
    SessionCookie,
}

impl UserAccessType {
    pub fn as_str(self) -> &'static str {
        match self {
            UserAccessType::PersonalAccessToken => "personal_access_token",
            UserAccessType::SessionCookie => "session_cookie",
        }
    }
}

#[derive(Serialize)]
struct AuthorizeProxyUserRequest<'a> {
    agent_id: i64,
    access_type: &'static str,
    access_key: &'a str,
    csrf_token: &'a str,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RoleAccess {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct UserAccessAs {
    #[serde(default)]
    pub projects: Vec<RoleAccess>,
    #[serde(default)]
    pub groups: Vec<RoleAccess>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ProxyAccessAs {
    #[serde(default)]
    pub agent: Option<serde_json::Value>,
    #[serde(default)]
    pub user: Option<UserAccessAs>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AuthorizedAgent {
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub config_project: Id,
}

/// GitLab's yes to a user reaching an agent, with how the user's requests run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AuthorizedProxyUser {
    #[serde(default)]
    pub agent: AuthorizedAgent,
    #[serde(default)]
    pub user: GitlabUser,
    #[serde(default)]
    pub access_as: ProxyAccessAs,
}

impl GitlabClient {
    /// The agents a CI job may use. Authenticated by the job token alone (no kas JWT), as
    /// GitLab expects on this public endpoint.
    pub async fn allowed_agents_for_job(
        &self,
        job_token: &str,
    ) -> Result<AllowedAgentsForJob, GitlabError> {
        let request = self
            .http()
            .get(self.url("/api/v4/job/allowed_agents"))
            .header("Job-Token", job_token)
            .header(http::header::ACCEPT, "application/json");
        let body = self.send("allowed_agents", request).await?;
        Self::decode(&body, "allowed_agents")
    }

    /// Whether the user behind `access_key` may use `agent_id` through the proxy.
    pub async fn authorize_proxy_user(
        &self,
        agent_id: i64,
        access_type: UserAccessType,
        access_key: &str,
        csrf_token: &str,
    ) -> Result<AuthorizedProxyUser, GitlabError> {
        let request = self
            .http()
            .post(self.url("/api/v4/internal/kubernetes/authorize_proxy_user"))
            .header(http::header::ACCEPT, "application/json")
            .json(&AuthorizeProxyUserRequest {
                agent_id,
                access_type: access_type.as_str(),
                access_key,
                csrf_token,
            });
        let request = self.with_jwt(request)?;
        let body = self.send("authorize_proxy_user", request).await?;
        Self::decode(&body, "authorize_proxy_user")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_json_for_a_ci_job_decodes() {
        let body = r#"{
            "allowed_agents": [{"id": 1, "config_project": {"id": 2},
                "configuration": {"default_namespace": "ns", "access_as": {"ci_job": {}}}}],
            "job": {"id": 3}, "pipeline": {"id": 4},
            "project": {"id": 5, "groups": [{"id": 6}]},
            "user": {"id": 7, "username": "root", "roles_in_project": ["developer"]},
            "environment": {"slug": "prod", "tier": "production"}
        }"#;
        let job: AllowedAgentsForJob = serde_json::from_str(body).expect("decodes");
        assert_eq!(job.allowed_agents[0].id, 1);
        let access_as = job.allowed_agents[0].configuration.access_as.as_ref();
        assert!(access_as.is_some_and(|a| a.ci_job.is_some()));
        assert_eq!(job.project.groups, vec![Id { id: 6 }]);
        assert_eq!(
            job.environment.map(|e| e.tier).as_deref(),
            Some("production")
        );
    }
}
