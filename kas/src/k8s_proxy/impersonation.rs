//! As whom a caller's requests run in the cluster. kas sets no `Impersonate-*` header
//! itself: it sends the agent an `ImpersonationConfig` (in `HttpRequest.Header.extra`) and
//! the agent's Kubernetes client applies it, exactly as real kas and agentk do.

use kas_proto::kubernetes_api::{ExtraKeyVal, ImpersonationConfig};

use crate::gitlab::{AllowedAgent, AllowedAgentsForJob, AuthorizedProxyUser, UserAccessType};

fn extra(key: &str, value: impl ToString) -> ExtraKeyVal {
    ExtraKeyVal {
        key: format!("agent.gitlab.com/{key}"),
        val: vec![value.to_string()],
    }
}

/// A CI job's requests: as the agent (no impersonation), as the configured identity
/// (`impersonate`), or as the job itself (`ci_job`: `gitlab:ci_job:<job id>` with groups
/// for its project, groups and environment).
pub fn for_ci_job(job: &AllowedAgentsForJob, agent: &AllowedAgent) -> Option<ImpersonationConfig> {
    let access_as = agent.configuration.access_as.as_ref()?;
    if let Some(imp) = &access_as.impersonate {
        return Some(ImpersonationConfig {
            username: imp.username.clone(),
            groups: imp.groups.clone(),
            uid: imp.uid.clone(),
            extra: imp
                .extra
                .iter()
                .map(|e| ExtraKeyVal {
                    key: e.key.clone(),
                    val: e.val.clone(),
                })
                .collect(),
        });
    }
    access_as.ci_job.as_ref()?;
    let project = job.project.id;
    let env = job.environment.as_ref();
    let mut groups = vec!["gitlab:ci_job".to_owned()];
    for group in &job.project.groups {
        groups.push(format!("gitlab:group:{}", group.id));
        if let Some(env) = env {
            groups.push(format!("gitlab:group_env_tier:{}:{}", group.id, env.tier));
        }
    }
    groups.push(format!("gitlab:project:{project}"));
    let mut extras = vec![
        extra("id", agent.id),
        extra("config_project_id", agent.config_project.id),
        extra("project_id", project),
        extra("ci_pipeline_id", job.pipeline.id),
        extra("ci_job_id", job.job.id),
        extra("username", &job.user.username),
    ];
    if let Some(env) = env {
        groups.push(format!("gitlab:project_env:{project}:{}", env.slug));
        groups.push(format!("gitlab:project_env_tier:{project}:{}", env.tier));
        extras.push(extra("environment_slug", &env.slug));
        extras.push(extra("environment_tier", &env.tier));
    }
    Some(ImpersonationConfig {
        username: format!("gitlab:ci_job:{}", job.job.id),
        groups,
        uid: String::new(),
        extra: extras,
    })
}

/// A user's requests: as the agent, or as `gitlab:user:<username>` with a group per role
/// the user has in the projects and groups the agent shares with users.
pub fn for_user(
    user: &AuthorizedProxyUser,
    access_type: UserAccessType,
) -> Option<ImpersonationConfig> {
    let access = user.access_as.user.as_ref()?;
    let mut groups = vec!["gitlab:user".to_owned()];
    for project in &access.projects {
        for role in &project.roles {
            groups.push(format!("gitlab:project_role:{}:{role}", project.id));
        }
    }
    for group in &access.groups {
        for role in &group.roles {
            groups.push(format!("gitlab:group_role:{}:{role}", group.id));
        }
    }
    Some(ImpersonationConfig {
        username: format!("gitlab:user:{}", user.user.username),
        groups,
        uid: String::new(),
        extra: vec![
            extra("id", user.agent.id),
            extra("username", &user.user.username),
            extra("access_type", access_type.as_str()),
            extra("config_project_id", user.agent.config_project.id),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ci_job_runs_as_itself_with_its_project_groups_and_environment() {
        let job: AllowedAgentsForJob = serde_json::from_str(
            r#"{"allowed_agents":[{"id":1,"config_project":{"id":2},
                "configuration":{"access_as":{"ci_job":{}}}}],
              "job":{"id":3},"pipeline":{"id":4},"project":{"id":5,"groups":[{"id":6}]},
              "user":{"id":7,"username":"root"},"environment":{"slug":"prod","tier":"production"}}"#,
        )
        .expect("json");
        let imp = for_ci_job(&job, &job.allowed_agents[0]).expect("impersonates");
        assert_eq!(imp.username, "gitlab:ci_job:3");
        assert_eq!(
            imp.groups,
            [
                "gitlab:ci_job",
                "gitlab:group:6",
                "gitlab:group_env_tier:6:production",
                "gitlab:project:5",
                "gitlab:project_env:5:prod",
                "gitlab:project_env_tier:5:production",
            ]
        );
        assert!(imp
            .extra
            .iter()
            .any(|e| e.key == "agent.gitlab.com/ci_job_id" && e.val == ["3"]));
        let mut as_agent = job.clone();
        as_agent.allowed_agents[0].configuration.access_as = None;
        assert_eq!(for_ci_job(&as_agent, &as_agent.allowed_agents[0]), None);
    }
}
