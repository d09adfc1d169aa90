//! The agent configuration read through GitLab's REST repository API, an explicit
//! alternative to Gitaly for installations whose kas cannot reach Gitaly.

use std::path::Path;

use super::{config_file_path, ConfigSource, ConfigSourceError};
use crate::auth::Agent;
use crate::gitlab::{GitlabClient, GitlabError, RepoAuth};

/// Reads `config.yaml` through GitLab's repository REST API (branch head, then the file)
/// with an API token (`read_repository`): GitLab does not accept agent tokens there.
pub struct GitlabApiSource {
    gitlab: GitlabClient,
    api_token: String,
}

impl GitlabApiSource {
    pub fn new(gitlab: GitlabClient, api_token_file: &Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(api_token_file).map_err(|e| {
            anyhow::anyhow!(
                "cannot read agent_configuration.api_token_file {}: {e}",
                api_token_file.display()
            )
        })?;
        let api_token = token.trim().to_owned();
        if api_token.is_empty() {
            anyhow::bail!(
                "agent_configuration.api_token_file {} is empty",
                api_token_file.display()
            );
        }
        Ok(Self { gitlab, api_token })
    }

    fn auth(&self) -> RepoAuth<'_> {
        RepoAuth::ApiToken(&self.api_token)
    }
}

#[tonic::async_trait]
impl ConfigSource for GitlabApiSource {
    fn poll_key(&self, agent: &Agent) -> String {
        format!(
            "gitlab-api|{}|{}",
            agent.info.project_id, agent.info.default_branch
        )
    }

    async fn head_commit(&self, agent: &Agent) -> Result<Option<String>, ConfigSourceError> {
        match self
            .gitlab
            .branch_head(
                self.auth(),
                agent.info.project_id,
                &agent.info.default_branch,
            )
            .await
        {
            Ok(head) => Ok(Some(head)),
            // No such branch yet: an empty repository as far as the agent is concerned.
            Err(GitlabError::NotFound) => Ok(None),
            Err(e) => Err(api_token_error(e)),
        }
    }

    async fn config_file(
        &self,
        agent: &Agent,
        commit: &str,
    ) -> Result<Option<Vec<u8>>, ConfigSourceError> {
        let path = config_file_path(&agent.info.agent_name);
        self.gitlab
            .repository_file(self.auth(), agent.info.project_id, &path, commit)
            .await
            .map_err(api_token_error)
    }
}

/// A refusal of kas's API token is an operator problem, not the agent's: it is retried
/// (and logged) instead of ending the agent's stream as if its own token were bad.
fn api_token_error(e: GitlabError) -> ConfigSourceError {
    match e {
        GitlabError::Unauthenticated | GitlabError::PermissionDenied => {
            ConfigSourceError::Gitlab(GitlabError::Unavailable(format!(
                "GitLab refused the token of agent_configuration.api_token_file: {e}"
            )))
        }
        e => e.into(),
    }
}
