//! Where repository content comes from: the agent's configuration file through a
//! [`ConfigSource`] — Gitaly ([`gitaly::GitalyConfigSource`], the default, as real kas) or,
//! as an explicit option, GitLab's REST repository API with an API token
//! ([`gitlab_api::GitlabApiSource`]) — and the Gitaly client itself ([`gitaly`]), which the
//! GitOps manifests are read through as well.

pub mod gitaly;
mod gitlab_api;

pub use gitlab_api::GitlabApiSource;

use crate::auth::Agent;
use crate::gitlab::GitlabError;
use gitaly::GitalyError;

/// Upstream kas refuses configuration files above this size.
pub const MAX_CONFIG_FILE_BYTES: usize = 128 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigSourceError {
    #[error(transparent)]
    Gitlab(#[from] GitlabError),
    #[error(transparent)]
    Gitaly(#[from] GitalyError),
    #[error(
        "GitLab named no Gitaly server for the agent's project (no gitaly_info in agent_info)"
    )]
    NoGitalyLocation,
    #[error("invalid agent configuration file: {0}")]
    InvalidFile(String),
}

impl ConfigSourceError {
    /// Errors that end the agent's stream (its token is refused, its file is bad) rather
    /// than being retried at the next poll (GitLab or Gitaly unreachable or misconfigured).
    pub fn is_final(&self) -> bool {
        match self {
            ConfigSourceError::Gitlab(e) => e.is_definite(),
            ConfigSourceError::InvalidFile(_) => true,
            ConfigSourceError::Gitaly(_) | ConfigSourceError::NoGitalyLocation => false,
        }
    }
}

impl From<ConfigSourceError> for tonic::Status {
    fn from(e: ConfigSourceError) -> Self {
        match e {
            ConfigSourceError::Gitlab(e) => e.into(),
            ConfigSourceError::InvalidFile(msg) => tonic::Status::failed_precondition(msg),
            ConfigSourceError::Gitaly(_) | ConfigSourceError::NoGitalyLocation => {
                tonic::Status::unavailable("repository is unavailable, try again later")
            }
        }
    }
}

/// Path of an agent's configuration file inside its project.
pub fn config_file_path(agent_name: &str) -> String {
    format!(".gitlab/agents/{agent_name}/config.yaml")
}

#[tonic::async_trait]
pub trait ConfigSource: Send + Sync + 'static {
    /// Names what [`ConfigSource::head_commit`] polls (repository and branch), so every
    /// stream of agents in one project shares one poller.
    fn poll_key(&self, agent: &Agent) -> String;
    /// The commit the agent's configuration is currently at, `None` for an empty
    /// repository (nothing to send yet). Cheap: it is polled.
    async fn head_commit(&self, agent: &Agent) -> Result<Option<String>, ConfigSourceError>;
    /// The raw `config.yaml` at `commit`, or `None` if the agent has no file (empty config).
    async fn config_file(
        &self,
        agent: &Agent,
        commit: &str,
    ) -> Result<Option<Vec<u8>>, ConfigSourceError>;
}
